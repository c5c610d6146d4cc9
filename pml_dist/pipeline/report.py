"""`pml-dist report`: test mAP of the teacher, every student, the reference runs and the beyond-paper
chain, with the pseudo-label statistics and stage timings, as report.md + report.json, and the
paper's Figure 1 as two plots. With run.seeds > 1, every number is a mean with its standard
deviation over the seeds, and the plots carry error bars.

    figure1a.png   student test mAP vs tau, horizontal lines for the AN / EM / full-BCE references
    figure1b.png   mean positives per image of the pseudo labels vs tau (and the true mean)
"""

from __future__ import annotations

import statistics
from pathlib import Path

from ffcv_data.atomic import write_json, write_text
from pml_dist.config import Config, git_revision
from pml_dist.errors import PmlError
from pml_dist.layout import RunLayout, StageResult
from pml_dist.pipeline.figures import figures
from pml_dist.pipeline.names import PUBLISHED_COCO, loss_label
from pml_dist.pipeline.stage_list import Entry, experiment, report_inputs
from pml_dist.pipeline.subruns import seed_runs

NUMBERS = ("test_map", "val_map", "positives", "precision", "recall", "train_seconds", "samples_per_s")


def _trained(result: StageResult | None) -> dict:
    keys = {
        "test_map": "test_map",
        "val_map": "val_map",
        "train_seconds": "train_seconds",
        "samples_per_s": "train_samples_per_s",
    }
    return {k: (result.raw if result else {}).get(v) for k, v in keys.items()}


def _row(entry: Entry, teacher_loss: str) -> dict | None:
    """The report's row of one training entry of the stage list (None: not shown)."""
    if entry.role == "sweep":  # a grid point: shown in its stage's model-selection table
        return None
    layout = RunLayout.of(entry.run)
    stage, result = entry.stage, entry.stage.files(layout).read_result()
    loss = stage.loss(entry.run)
    if entry.role == "teacher" and not entry.beyond:
        pseudo = layout.pseudo.read_stats() or {}
        return {"kind": "teacher", "name": f"teacher ({loss_label(loss)})", "loss": loss, **_trained(result),
                "positives": pseudo.get("teacher", {}).get("mean_positives_per_image")}
    if entry.role in ("teacher", "reference"):  # the beyond chain's teacher is its loss's reference
        if result is None or loss == teacher_loss:
            return None
        return {"kind": "reference", "name": f"reference {loss_label(loss)}", "loss": loss,
                **_trained(result)}
    stats = (layout.pseudo.read_stats() or {"targets": {}})["targets"].get(stage.target, {})
    label = f"{loss_label(entry.run.loss.name)} teacher -> student " if entry.beyond else "student "
    return {
        "kind": "beyond" if entry.beyond else "student",
        "name": f"{label}{stage.target}",
        "mode": stats.get("mode"),
        "tau": stats.get("tau"),
        **_trained(result),
        "positives": stats.get("mean_positives_per_image"),
        "precision": stats.get("precision"),
        "recall": stats.get("recall"),
    }


ROW_ORDER = {"teacher": 0, "reference": 1, "student": 2, "beyond": 3}


def collect(cfg: Config) -> dict:
    """Everything the report shows for one run (one seed), from its run directory."""
    run = RunLayout.of(cfg)
    teacher = run.teacher.read_result()
    if teacher is None:
        raise PmlError(f"no {run.teacher.result}: the teacher has not finished")
    entries = [e for e in experiment(cfg, cfg) if e.stage is not None]
    rows = [row for row in (_row(e, cfg.loss.name) for e in entries) if row is not None]
    rows.sort(key=lambda row: ROW_ORDER[row["kind"]])  # stable: stage-list order within a kind
    merge = run.pseudo.read_record() or {}
    data = run.data.stats().raw if run.data.is_complete() else {}
    students = [r for r in rows if r["kind"] == "student" and r["train_seconds"] is not None]
    selection = [_selection(e, cfg.train.seed) for e in entries if e.role in ("teacher", "reference")]
    stages = {
        "prepare_seconds": data.get("seconds"),
        "teacher_seconds": teacher.raw["train_seconds"],
        "teacher_samples_per_s": teacher.raw["train_samples_per_s"],
        "infer_seconds": merge.get("infer_seconds"),
        "infer_samples_per_s": merge.get("infer_samples_per_s"),
        "merge_seconds": merge.get("merge_seconds"),
        "students_seconds": sum(r["train_seconds"] for r in students) if students else None,
        "student_samples_per_s": (
            statistics.fmean(r["samples_per_s"] for r in students) if students else None
        ),
    }
    return {
        "data_root": cfg.data.root,
        "seeds": [cfg.train.seed],
        "observed_seed": cfg.data.observed_seed,
        "teacher_loss": cfg.loss.name,
        "world_size": teacher.raw["world_size"],
        "rows": rows,
        "stages": stages,
        "findings": findings(rows, cfg),
        "model_selection": [s for s in selection if s is not None],
        "true_labels_per_image": data.get("splits", {})
        .get("train", {})
        .get("labels_per_image", {})
        .get("mean"),
        "published_coco": PUBLISHED_COCO if cfg.report.published_coco else None,
        "git": git_revision(),
        "config": cfg.to_dict(),
    }


def _selection(entry: Entry, seed: int) -> dict | None:
    """The sweep grid and choice a swept stage's result records (pipeline/sweep.py), or None."""
    layout = RunLayout.of(entry.run)
    result = entry.stage.files(layout).read_result()
    sweep = result.raw.get("sweep") if result else None
    if sweep is None:
        return None
    return {"stage": entry.name, "seed": seed, **sweep}


def findings(rows: list[dict], cfg: Config) -> dict:
    """The paper's claims and the beyond-paper one, measured on this run: margins in mAP points."""
    by_kind = {
        k: [r for r in rows if r["kind"] == k and r["test_map"] is not None]
        for k in ("teacher", "reference", "student", "beyond")
    }
    out: dict = {}
    teacher = by_kind["teacher"][0]["test_map"]
    hard = sorted((r for r in by_kind["student"] if r["mode"] == "hard"), key=lambda r: r["tau"])
    if hard:
        out["hard_students_minus_teacher_min"] = min(r["test_map"] for r in hard) - teacher
        positives = [r["positives"] for r in hard]
        pairs = zip(positives, positives[1:], strict=False)
        out["positives_fall_as_tau_rises"] = all(a >= b for a, b in pairs)
    em = next((r["test_map"] for r in by_kind["reference"] if r["loss"] == "em"), None)
    if em is not None and by_kind["student"]:
        out["students_minus_em_max"] = max(r["test_map"] for r in by_kind["student"]) - em
    beyond_loss = cfg.pseudo.beyond_teacher
    beyond_teacher = next((r["test_map"] for r in by_kind["reference"] if r["loss"] == beyond_loss), None)
    if beyond_teacher is not None and by_kind["beyond"]:
        best = max(by_kind["beyond"], key=lambda r: r["test_map"])
        out["beyond_best_student"] = best["name"]
        out["beyond_student_minus_teacher"] = best["test_map"] - beyond_teacher
    return out


def summarize(reports: list[dict]) -> dict:
    """Mean and standard deviation over seeds of every number (fields `<x>` and `<x>_std`)."""
    first = reports[0]

    def mean_std(values: list) -> tuple:
        values = [v for v in values if v is not None]
        if not values:
            return None, None
        return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)

    by_name = [{row["name"]: row for row in r["rows"]} for r in reports]
    rows = []
    for row in first["rows"]:
        merged = dict(row)
        for key in NUMBERS:
            merged[key], merged[f"{key}_std"] = mean_std([r.get(row["name"], {}).get(key) for r in by_name])
        rows.append(merged)
    found = {}
    for key, value in first["findings"].items():
        values = [r["findings"].get(key) for r in reports]
        if isinstance(value, bool):
            found[key] = all(values)
        elif isinstance(value, str):
            found[key] = sorted(set(values))
        else:
            found[key], found[f"{key}_std"] = mean_std(values)
            found[f"{key}_per_seed"] = values
    stages = {}
    for key in first["stages"]:
        stages[key], _ = mean_std([r["stages"].get(key) for r in reports])
    return {
        **first,
        "seeds": [s for r in reports for s in r["seeds"]],
        "rows": rows,
        "stages": stages,
        "findings": found,
        "model_selection": [m for r in reports for m in r["model_selection"]],
    }


def _fmt(row: dict, key: str, digits: int = 2) -> str:
    value, std = row.get(key), row.get(f"{key}_std")
    if value is None:
        return "-"
    return f"{value:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")


def markdown(r: dict) -> str:
    seeds = r["seeds"]
    spread = f" (mean ± std over {len(seeds)} seeds)" if len(seeds) > 1 else ""
    lines = [
        f"# pml-dist report: {r['data_root']}",
        "",
        f"seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}, observed-label seed "
        f"{r['observed_seed']}, git {r['git']}{spread}",
        "",
        "| run | test mAP | val mAP | positives / image | precision | recall | train s | samples/s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
        *_table_rows(r),
    ]
    if r["true_labels_per_image"] is not None:
        lines += ["", f"True labels per training image: {r['true_labels_per_image']:.2f}."]
    claims = _claims(r)
    if claims:
        lines += ["", "Findings (test mAP):", *claims]
    lines += _model_selection(r["model_selection"])
    lines += ["", _timing(r["stages"])]
    if r["published_coco"]:
        lines += [
            "",
            "Published COCO test mAP (Cole et al. 2021; Zhou et al. 2022): "
            + ", ".join(f"{loss_label(k)} {v}" for k, v in r["published_coco"].items()),
        ]
    return "\n".join(lines) + "\n"


def _model_selection(selection: list[dict]) -> list[str]:
    """Each swept stage's grid (Cole et al.'s lr x batch search), the chosen point marked."""
    if not selection:
        return []
    lines = ["", "Model selection (sweep.losses: every lr x micro batch trained, the best validation "
                 "mAP kept):", "", "| stage | seed | lr | micro batch | val mAP | test mAP | |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for s in selection:
        for i, p in enumerate(s["grid"]):
            lines.append(f"| {s['stage']} | {s['seed']} | {p['lr']:g} | {p['micro_batch']} | "
                         f"{_fmt(p, 'val_map')} | {_fmt(p, 'test_map')} | "
                         f"{'chosen' if i == s['chosen'] else ''} |")
    return lines


def _table_rows(r: dict) -> list[str]:
    lines = []
    published = r["published_coco"] or {}
    for row in r["rows"]:
        positives = _fmt(row, "positives") + (" (expected)" if row["kind"] == "teacher" else "")
        test = _fmt(row, "test_map")
        if row["kind"] in ("teacher", "reference") and row.get("loss") in published:
            test += f" (published {published[row['loss']]})"
        lines.append(
            f"| {row['name']} | {test} | {_fmt(row, 'val_map')} | "
            f"{positives if row.get('positives') is not None else '-'} | "
            f"{_fmt(row, 'precision', 3)} | {_fmt(row, 'recall', 3)} | "
            f"{_fmt(row, 'train_seconds', 0)} | {_fmt(row, 'samples_per_s', 0)} |"
        )
    return lines


def _claims(r: dict) -> list[str]:
    """The paper's claims (and the beyond-paper one) with their measured verdicts."""
    f = r["findings"]
    claims = []
    if "hard_students_minus_teacher_min" in f:
        key = "hard_students_minus_teacher_min"
        claims.append(
            f"- Every tau's student beats its {loss_label(r['teacher_loss'])} teacher: {_verdict(f, key)} "
            f"(smallest margin {_fmt(f, key)} mAP{_per_seed(f, key)})"
        )
        claims.append(
            f"- Mean positives per image fall as tau rises: "
            f"{'yes' if f['positives_fall_as_tau_rises'] else 'no'}"
        )
    if "students_minus_em_max" in f:
        key = "students_minus_em_max"
        claims.append(
            f"- A student beats EM: {_verdict(f, key)} "
            f"(best student - EM: {_fmt(f, key)} mAP{_per_seed(f, key)})"
        )
    if "beyond_student_minus_teacher" in f:
        key = "beyond_student_minus_teacher"
        best = f["beyond_best_student"]
        claims.append(
            f"- Beyond the paper, a student beats its own teacher: {_verdict(f, key)} "
            f"({', '.join(best) if isinstance(best, list) else best}: "
            f"{_fmt(f, key)} mAP{_per_seed(f, key)})"
        )
    return claims


def _timing(s: dict) -> str:
    timing = [
        f"{name} {s[key]:.0f} s"
        for name, key in (
            ("prepare", "prepare_seconds"),
            ("teacher", "teacher_seconds"),
            ("inference", "infer_seconds"),
            ("merge", "merge_seconds"),
            ("students", "students_seconds"),
        )
        if s.get(key) is not None
    ]
    rates = [
        f"{name} {s[key]:.0f} samples/s"
        for name, key in (
            ("teacher", "teacher_samples_per_s"),
            ("inference", "infer_samples_per_s"),
            ("students", "student_samples_per_s"),
        )
        if s.get(key) is not None
    ]
    return f"Stage wall time: {', '.join(timing)}; throughput: {', '.join(rates)}."


def _verdict(f: dict, key: str) -> str:
    """yes / no for one run; over seeds, yes only when it holds on every seed."""
    values = [v for v in f.get(f"{key}_per_seed") or [f[key]] if v is not None]
    wins = sum(v > 0 for v in values)
    if wins in (0, len(values)):
        return "yes" if wins else "no"
    return f"on {wins} of {len(values)} seeds"


def _per_seed(f: dict, key: str) -> str:
    values = f.get(f"{key}_per_seed")
    return f"; per seed: {', '.join(f'{v:+.2f}' for v in values if v is not None)}" if values else ""


def report(cfg: Config) -> tuple[str, list[Path]]:
    """report.md, report.json (with the ids of the results it read) and the two figures."""
    runs = seed_runs(cfg)
    inputs = report_inputs(cfg)
    r = collect(cfg) if len(runs) == 1 else summarize([collect(run) for run in runs])
    r["inputs"] = inputs
    layout = RunLayout.of(cfg)
    text = markdown(r)
    write_text(layout.report_md, text)
    write_json(layout.report_json, r)
    return text, list(figures(r, layout))
