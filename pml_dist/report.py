"""`pml-dist report`: test mAP of the teacher, every student, the reference runs and the beyond-paper
chain, with the pseudo-label statistics and stage timings, as report.md + report.json, and the
paper's Figure 1 as two plots. With run.seeds > 1, every number is a mean with its standard
deviation over the seeds, and the plots carry error bars.

    figure1a.png   student test mAP vs tau, horizontal lines for the AN / EM / full-BCE references
    figure1b.png   mean positives per image of the pseudo labels vs tau (and the true mean)
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from pml_dist import layout
from pml_dist.atomic import write_json, write_text
from pml_dist.config import Config, git_revision
from pml_dist.errors import PmlError
from pml_dist.pseudo import target_names
from pml_dist.subruns import beyond_run, reference_result, seed_runs

# Test mAP on COCO 2014 (val2014) with ResNet-50 at 448 px: Cole et al. 2021 (full BCE, AN),
# Zhou et al. 2022 (EM, EM+APL). Printed beside measured values when report.published_coco is set.
PUBLISHED_COCO = {"bce": 76.78, "an": 64.92, "em": 70.70, "em_apl": 70.87}
REFERENCE_NAMES = {
    "an": "AN",
    "bce": "full BCE",
    "em": "EM",
    "an_ls": "AN-LS",
    "wan": "WAN",
    "epr": "EPR",
    "role": "ROLE",
    "em_apl": "EM+APL",
}
NUMBERS = ("test_map", "val_map", "positives", "precision", "recall", "train_seconds", "samples_per_s")


def _read(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _name(loss: str) -> str:
    return REFERENCE_NAMES.get(loss, loss)


def _trained(result: dict | None) -> dict:
    keys = {
        "test_map": "test_map",
        "val_map": "val_map",
        "train_seconds": "train_seconds",
        "samples_per_s": "train_samples_per_s",
    }
    return {k: (result or {}).get(v) for k, v in keys.items()}


def _reference_row(loss: str, result: dict | None) -> dict:
    return {"kind": "reference", "name": f"reference {_name(loss)}", "loss": loss, **_trained(result)}


def _students(cfg: Config, kind: str, label: str) -> list[dict]:
    pseudo = _read(layout.pseudo_dir(cfg.run_dir) / "stats.json") or {"targets": {}}
    rows = []
    for name in target_names(cfg.pseudo.taus, cfg.pseudo.modes):
        stats = pseudo["targets"].get(name, {})
        rows.append(
            {
                "kind": kind,
                "name": f"{label}{name}",
                "mode": stats.get("mode"),
                "tau": stats.get("tau"),
                **_trained(_read(layout.student_dir(cfg.run_dir, name) / "result.json")),
                "positives": stats.get("mean_positives_per_image"),
                "precision": stats.get("precision"),
                "recall": stats.get("recall"),
            }
        )
    return rows


def collect(cfg: Config) -> dict:
    """Everything the report shows for one run (one seed), from its run directory."""
    run = cfg.run_dir
    teacher = _read(layout.teacher_dir(run) / "result.json")
    if teacher is None:
        raise PmlError(f"no {layout.teacher_dir(run) / 'result.json'}: the teacher has not finished")
    pseudo = _read(layout.pseudo_dir(run) / "stats.json") or {}
    data = _read(cfg.data_dir / "stats.json") or {}
    rows = [
        {
            "kind": "teacher",
            "name": f"teacher ({_name(cfg.loss.name)})",
            "loss": cfg.loss.name,
            **_trained(teacher),
            "positives": pseudo.get("teacher", {}).get("mean_positives_per_image"),
        }
    ]
    for loss in cfg.report.references:
        result = _read(reference_result(cfg, loss))
        if loss != cfg.loss.name and result is not None:
            rows.append(_reference_row(loss, result))
    rows += _students(cfg, "student", "student ")
    beyond = beyond_run(cfg)
    if beyond is not None:
        loss = beyond.loss.name
        if loss not in cfg.report.references:  # else the reference row above is this teacher
            rows.append(_reference_row(loss, _read(layout.teacher_dir(beyond.run_dir) / "result.json")))
        rows += _students(beyond, "beyond", f"{_name(loss)} teacher -> student ")
    merge = _read(layout.pseudo_dir(run) / "merge.json") or {}
    students = [r for r in rows if r["kind"] == "student" and r["train_seconds"] is not None]
    stages = {
        "prepare_seconds": data.get("seconds"),
        "teacher_seconds": teacher["train_seconds"],
        "teacher_samples_per_s": teacher["train_samples_per_s"],
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
        "world_size": teacher["world_size"],
        "rows": rows,
        "stages": stages,
        "findings": findings(rows, cfg),
        "true_labels_per_image": data.get("splits", {})
        .get("train", {})
        .get("labels_per_image", {})
        .get("mean"),
        "published_coco": PUBLISHED_COCO if cfg.report.published_coco else None,
        "git": git_revision(),
        "config": cfg.to_dict(),
    }


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
    ]
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
    if r["true_labels_per_image"] is not None:
        lines += ["", f"True labels per training image: {r['true_labels_per_image']:.2f}."]
    f = r["findings"]
    claims = []
    if "hard_students_minus_teacher_min" in f:
        key = "hard_students_minus_teacher_min"
        claims.append(
            f"- Every tau's student beats its {_name(r['teacher_loss'])} teacher: {_verdict(f, key)} "
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
    if claims:
        lines += ["", "Findings (test mAP):", *claims]
    s = r["stages"]
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
    lines += ["", f"Stage wall time: {', '.join(timing)}; throughput: {', '.join(rates)}."]
    if r["published_coco"]:
        lines += [
            "",
            "Published COCO test mAP (Cole et al. 2021; Zhou et al. 2022): "
            + ", ".join(f"{_name(k)} {v}" for k, v in r["published_coco"].items()),
        ]
    return "\n".join(lines) + "\n"


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


def figures(r: dict, out: Path) -> tuple[Path, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hard = sorted(
        (row for row in r["rows"] if row["kind"] == "student" and row["mode"] == "hard"),
        key=lambda row: row["tau"],
    )
    seeds = r["seeds"]
    title = f"{Path(r['data_root']).name}, seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}"
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    done = [row for row in hard if row["test_map"] is not None]
    taus = [row["tau"] for row in done]
    ax.errorbar(
        taus,
        [row["test_map"] for row in done],
        yerr=_err(done, "test_map"),
        fmt="o-",
        capsize=3,
        label=f"student (y = p > tau), {_name(r['teacher_loss'])} teacher",
    )
    styles = {"an": ("tab:red", "--"), "em": ("tab:green", "-."), "bce": ("black", ":")}
    for row in r["rows"]:
        if row["kind"] in ("teacher", "reference") and row["test_map"] is not None:
            color, style = styles.get(row["loss"], ("gray", "--"))
            label = _name(row["loss"]) + (" (the teacher)" if row["kind"] == "teacher" else "")
            ax.axhline(row["test_map"], color=color, linestyle=style, label=label)
            if row.get("test_map_std"):  # over seeds: a band of one standard deviation
                m, sd = row["test_map"], row["test_map_std"]
                ax.axhspan(m - sd, m + sd, color=color, alpha=0.08)
    # Students without a tau stand left of the tau axis, one column each, so none looks like a tau's.
    markers = iter("s^vD<>")
    step = (max(taus) - min(taus)) / 8 if len(taus) > 1 else 0.05
    column = 0
    for row in r["rows"]:
        if (
            row["kind"] in ("student", "beyond")
            and row["mode"] != "hard"
            and row["test_map"] is not None
            and taus
        ):
            column += 1
            ax.errorbar(
                [min(taus) - column * step],
                [row["test_map"]],
                yerr=_err([row], "test_map"),
                fmt=next(markers, "x"),
                capsize=3,
                label=row["name"].replace("student ", "").replace("_", " ") + " (no tau)",
            )
    a = _save_figure(
        fig, ax, "test mAP (%)", f"Figure 1a: student mAP vs tau ({title})", out / "figure1a.png"
    )

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    ax.errorbar(
        [row["tau"] for row in hard],
        [row["positives"] for row in hard],
        yerr=_err(hard, "positives"),
        fmt="o-",
        capsize=3,
        label="pseudo labels",
    )
    if r["true_labels_per_image"] is not None:
        ax.axhline(r["true_labels_per_image"], color="black", linestyle=":", label="true labels")
    ax.axhline(1.0, color="tab:red", linestyle="--", label="observed (single positive)")
    b = _save_figure(
        fig,
        ax,
        "mean positives per image",
        f"Figure 1b: positives per image vs tau ({title})",
        out / "figure1b.png",
    )
    return a, b


def _err(rows: list[dict], key: str) -> list[float] | None:
    stds = [row.get(f"{key}_std") for row in rows]
    return None if any(s is None for s in stds) else stds


def _save_figure(fig, ax, ylabel: str, title: str, path: Path) -> Path:
    import matplotlib.pyplot as plt

    ax.set_xlabel("tau (pseudo-label threshold)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def report(cfg: Config) -> tuple[str, list[Path]]:
    runs = seed_runs(cfg)
    r = collect(cfg) if len(runs) == 1 else summarize([collect(run) for run in runs])
    out = cfg.run_dir
    text = markdown(r)
    write_text(out / "report.md", text)
    write_json(out / "report.json", r)
    return text, list(figures(r, out))
