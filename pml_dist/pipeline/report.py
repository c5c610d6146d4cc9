"""`pml-dist report`: test mAP of every teacher chain (each teacher and its students, per
self-training round), the reference teachers, the pseudo-label statistics and stage timings, as
report.md + report.json, and the paper's Figure 1 as two plots (figures.py).

Every verdict is statistical: each model's test-set scores (<stage>/test_logits.npy) are
compared on the same test images, as a paired difference with a 95% bootstrap interval
(intervals.py; over seeds too, with run.seeds > 1). A claim is "yes" only when its interval is
above zero, "no" when it is below, and "not resolved" otherwise.

    comparisons   each student against its own teacher and against the AN, EM and full-BCE
                  teachers the run has (a chain's teacher is its loss's reference)
    findings      the paper's claims per chain, and the beyond-the-paper ones: a student beating
                  its own teacher, self-training rounds
"""

from __future__ import annotations

import statistics
from pathlib import Path

import numpy as np

from ffcv_data.atomic import write_json, write_text
from ffcv_data.sparse import LabelRows
from pml_dist.config import Config, git_revision
from pml_dist.errors import PmlError
from pml_dist.layout import RunLayout, StageResult
from pml_dist.pipeline.figures import figures
from pml_dist.pipeline.intervals import Seeds, mean_ap_interval, paired_difference
from pml_dist.pipeline.names import DATA_SET_LABELS, loss_label, published_record
from pml_dist.pipeline.stage_list import Entry, experiment, report_inputs
from pml_dist.pipeline.subruns import seed_runs

NUMBERS = ("test_map", "val_map", "positives", "precision", "recall", "train_seconds", "samples_per_s")
REFERENCE_LOSSES = ("an", "em", "bce")  # what every student is compared with, when the run has it
RESAMPLES = 1000


def _trained(result: StageResult | None) -> dict:
    keys = {"test_map": "test_map", "val_map": "val_map", "train_seconds": "train_seconds",
            "samples_per_s": "train_samples_per_s"}
    return {k: (result.raw if result else {}).get(v) for k, v in keys.items()}


def _row(entry: Entry) -> dict | None:
    """The report's row of one training entry of the stage list (None: not shown). `id` is the
    entry's name, the same in every seed's run."""
    if entry.role == "sweep":  # a grid point: shown in its stage's model-selection table
        return None
    layout = RunLayout.of(entry.run)
    stage, result = entry.stage, entry.stage.files(layout).read_result()
    base = {"id": entry.name, "chain": entry.chain, "round": entry.round, **_trained(result)}
    if entry.role == "reference":
        return {**base, "kind": "reference", "name": f"reference {loss_label(stage.loss(entry.run))}",
                "loss": stage.loss(entry.run)}
    chain = loss_label(entry.chain)
    if entry.role == "teacher":
        pseudo = (layout.pseudo.read_stats() or {}).get("teacher", {})
        promoted = (result.raw.get("round") or {}).get("chosen") if result else None
        name = f"{chain} teacher" if entry.round == 1 else \
            f"{chain} round {entry.round} teacher (student {promoted or '?'})"
        return {**base, "kind": "teacher", "name": name, "loss": entry.chain if entry.round == 1 else "bce",
                "positives": pseudo.get("mean_positives_per_image")}
    stats = (layout.pseudo.read_stats() or {"targets": {}})["targets"].get(stage.target, {})
    rounds = f" (round {entry.round})" if entry.round > 1 else ""
    return {**base, "kind": "student", "name": f"{chain} -> {stage.target}{rounds}", "loss": "bce",
            "mode": stats.get("mode"), "tau": stats.get("tau"),
            "positives": stats.get("mean_positives_per_image"), "precision": stats.get("precision"),
            "recall": stats.get("recall")}


ROW_ORDER = {"teacher": 0, "reference": 1, "student": 2}


def collect(cfg: Config) -> dict:
    """Everything the report shows for one run (one seed), from its run directory."""
    run = RunLayout.of(cfg)
    teacher = run.teacher.read_result()
    if teacher is None:
        raise PmlError(f"no {run.teacher.result}: the teacher has not finished")
    entries = [e for e in experiment(cfg, cfg) if e.stage is not None]
    rows = [row for row in map(_row, entries) if row is not None]
    rows.sort(key=lambda row: ROW_ORDER[row["kind"]])  # stable: stage-list order within a kind
    merge = run.pseudo.read_record() or {}
    data = run.data.stats().raw if run.data.is_complete() else {}
    names = data.get("category_names") or []
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
        "model_selection": [s for s in selection if s is not None],
        # a single-positive training CSV (ffcv_data/csv_lists.py) shows one label per image, not its truth
        "true_labels_per_image": data.get("splits", {}).get("train", {}).get("labels_per_image", {})
        .get("mean") if data.get("complete_labels", {}).get("train", True) else None,
        "test_images": data.get("splits", {}).get("test", {}).get("images"),
        # classes without a positive in a split are left out of its mAP (metrics.py): the teacher's
        # record says which (every stage of the run reads the same splits)
        "classes_left_out": {split: [names[i] if i < len(names) else str(i)
                                     for i in teacher.raw.get(f"{split}_classes_without_positives") or []]
                             for split in ("val", "test")},
        "published": published_record(cfg.report.published),
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


def summarize(reports: list[dict]) -> dict:
    """Mean and standard deviation over seeds of every number (fields `<x>` and `<x>_std`)."""
    first = reports[0]

    def mean_std(values: list) -> tuple:
        values = [v for v in values if v is not None]
        if not values:
            return None, None
        return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)

    by_id = [{row["id"]: row for row in r["rows"]} for r in reports]
    rows = []
    for row in first["rows"]:
        merged = dict(row)
        for key in NUMBERS:
            merged[key], merged[f"{key}_std"] = mean_std([r.get(row["id"], {}).get(key) for r in by_id])
        rows.append(merged)
    stages = {key: mean_std([r["stages"].get(key) for r in reports])[0] for key in first["stages"]}
    return {**first, "seeds": [s for r in reports for s in r["seeds"]], "rows": rows, "stages": stages,
            "model_selection": [m for r in reports for m in r["model_selection"]]}


# ------------------------------------------------------------------------ intervals and verdicts


def test_scores(runs: list[Config]) -> tuple[LabelRows, dict[str, np.ndarray]]:
    """The test labels (sparse) and, per row id, the stage's test logits of the seeds' runs as one
    (S, N, L) `Seeds`, each seed's file memory-mapped (intervals.py reads a block of classes at a
    time); a stage missing in any seed (not finished, or trained before they were kept) is left
    out. AP needs only the order of the scores, so logits serve as the probabilities would."""
    labels = RunLayout.of(runs[0]).data.labels("test").labels
    shape = (len(labels), labels.num_classes)
    paths: dict[str, list[Path]] = {}
    for run in runs:
        for entry in experiment(run, run):
            if entry.stage is not None and entry.role != "sweep":
                files = entry.stage.files(RunLayout.of(entry.run))
                paths.setdefault(entry.name, []).append(files.test_logits)
    scores = {}
    for name, files in paths.items():
        if len(files) == len(runs) and all(f.is_file() for f in files):
            stacked = Seeds(np.load(f, mmap_mode="r") for f in files)
            if stacked.shape[1:] != shape:
                raise PmlError(f"{files[0]}: shape {stacked.shape[1:]} is not the test split's "
                               f"{shape}: retrain that stage")
            scores[name] = stacked
    return labels, scores


def references(rows: list[dict]) -> dict[str, dict]:
    """The row standing for each loss of REFERENCE_LOSSES: a chain's first-round teacher or a
    reference teacher."""
    out = {}
    for row in rows:
        if (row["kind"] == "reference" or (row["kind"] == "teacher" and row["round"] == 1)) \
                and row["loss"] in REFERENCE_LOSSES:
            out.setdefault(row["loss"], row)
    return out


def own_teacher(rows: list[dict], student: dict) -> dict | None:
    return next((r for r in rows if r["kind"] == "teacher" and r["chain"] == student["chain"]
                 and r["round"] == student["round"]), None)


def add_intervals(r: dict, labels: LabelRows, scores: dict[str, np.ndarray]) -> None:
    """Each row's test mAP interval, and `comparisons`: every student against its own teacher and
    each reference; a round's teacher against the teacher before it."""
    for row in r["rows"]:
        if row["id"] in scores:
            ci = mean_ap_interval(scores[row["id"]], labels, resamples=RESAMPLES)
            # centred on the mAP of the float16 test logits, which can differ from the printed one
            # (float32 probabilities) in the second decimal: centred on the printed one instead
            shift = row["test_map"] - ci["map"]
            row["test_map_low"], row["test_map_high"] = ci["low"] + shift, ci["high"] + shift
    refs = references(r["rows"])
    comparisons = []

    def compare(a: dict, b: dict, against: str) -> None:
        if a["id"] in scores and b["id"] in scores and a["id"] != b["id"]:
            d = paired_difference(scores[a["id"]], scores[b["id"]], labels, resamples=RESAMPLES)
            comparisons.append({"a": a["id"], "b": b["id"], "against": against,
                                **{k: d[k] for k in ("diff", "low", "high", "verdict", "images", "seeds")}})

    for row in r["rows"]:
        if row["kind"] == "student":
            teacher = own_teacher(r["rows"], row)
            if teacher is not None:
                compare(row, teacher, "teacher")
            for loss, ref in refs.items():
                if ref is not teacher:  # a chain's first teacher is also its loss's reference
                    compare(row, ref, loss)
        elif row["kind"] == "teacher" and row["round"] > 1:
            before = next((t for t in r["rows"] if t["kind"] == "teacher" and t["chain"] == row["chain"]
                           and t["round"] == row["round"] - 1), None)
            if before is not None:
                compare(row, before, "previous round")
    r["comparisons"] = comparisons
    r["interval"] = {"level": 0.95, "resamples": RESAMPLES, "images": len(labels),
                     "seeds": len(r["seeds"])}


def _comparison(r: dict, a: str, against: str) -> dict | None:
    return next((c for c in r["comparisons"] if c["a"] == a and c["against"] == against), None)


def _combine(verdicts: list[str]) -> str:
    """All of several claims: yes when every one is resolved yes, no when one is resolved no."""
    if not verdicts:
        return "not measured"
    if all(v == "yes" for v in verdicts):
        return "yes"
    if any(v == "no" for v in verdicts):
        return "no"
    return f"not resolved ({sum(v == 'yes' for v in verdicts)} of {len(verdicts)} resolved yes)"


def findings(r: dict) -> list[dict]:
    """The claims the report states, each with its verdict and the numbers behind it."""
    rows, out = r["rows"], []
    refs = references(rows)
    for chain in dict.fromkeys(row["chain"] for row in rows if row["chain"]):
        label = loss_label(chain)
        students = [s for s in rows if s["kind"] == "student" and s["chain"] == chain and s["round"] == 1]
        hard = sorted((s for s in students if s["mode"] == "hard" and s["tau"] is not None),
                      key=lambda s: s["tau"])
        vs_teacher = [c for s in hard if (c := _comparison(r, s["id"], "teacher"))]
        if vs_teacher:
            out.append({"chain": chain, "claim": f"every tau's student beats its {label} teacher",
                        "verdict": _combine([c["verdict"] for c in vs_teacher]), "comparisons": vs_teacher})
        positives = [s["positives"] for s in hard if s["positives"] is not None]
        if len(positives) > 1:
            falls = all(a >= b for a, b in zip(positives, positives[1:], strict=False))
            out.append({"chain": chain, "claim": "mean positives per image fall as tau rises",
                        "verdict": "yes" if falls else "no",
                        "values": [round(p, 3) for p in positives]})
        best = _best_by_val(students)
        for loss in ("em", "bce"):
            c = best and loss in refs and _comparison(r, best["id"], loss)
            if c:
                out.append({"chain": chain, "claim": f"its best student (by val mAP, {best['name']}) beats "
                            f"{loss_label(loss)}", "verdict": c["verdict"], "comparisons": [c]})
    # beyond the paper: any student (any chain, any round) resolved above its own teacher
    wins = [c for c in r["comparisons"] if c["against"] == "teacher" and c["verdict"] == "yes"]
    tried = [c for c in r["comparisons"] if c["against"] == "teacher"]
    if tried:
        names = {row["id"]: row["name"] for row in rows}
        out.append({"chain": "", "claim": "beyond the paper: a student beats its own teacher by a resolved "
                    "margin", "verdict": "yes" if wins else "no such student",
                    "students": [names[c["a"]] for c in wins], "comparisons": wins})
    for c in r["comparisons"]:
        if c["against"] == "previous round":
            row = next(x for x in rows if x["id"] == c["a"])
            out.append({"chain": row["chain"], "claim": f"self-training: the round {row['round']} teacher "
                        "(the best student before) beats the teacher of the round before",
                        "verdict": c["verdict"], "comparisons": [c]})
    return out


def _best_by_val(rows: list[dict]) -> dict | None:
    done = [row for row in rows if row["val_map"] is not None]
    return max(done, key=lambda row: row["val_map"]) if done else None


# ------------------------------------------------------------------------------------ markdown


def _fmt(row: dict, key: str, digits: int = 2) -> str:
    value, std = row.get(key), row.get(f"{key}_std")
    if value is None:
        return "-"
    return f"{value:.{digits}f}" + (f" ± {std:.{digits}f}" if std else "")


def _ci(value: float | None, low: float | None, high: float | None, signed: bool = False) -> str:
    if value is None:
        return "-"
    text = f"{value:+.2f}" if signed else f"{value:.2f}"
    return text + (f" [{low:.2f}, {high:.2f}]" if low is not None else "")


def markdown(r: dict) -> str:
    seeds = r["seeds"]
    spread = f" (means over {len(seeds)} seeds)" if len(seeds) > 1 else ""
    iv = r.get("interval") or {}
    lines = [
        f"# pml-dist report: {r['data_root']}",
        "",
        f"seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}, observed-label seed "
        f"{r['observed_seed']}, git {r['git']}{spread}",
        "",
        f"Test mAP with its 95% bootstrap interval over the {iv.get('images', '?')} test images"
        + (" and the seeds" if len(seeds) > 1 else "") + "; differences are paired (the same images "
        "for both models): a verdict is yes or no only when its interval excludes 0.",
        "",
        "| run | test mAP [95% CI] | val mAP | positives / image | precision | recall | train s |",
        "|---|---:|---:|---:|---:|---:|---:|",
        *_table_rows(r),
    ]
    if r["true_labels_per_image"] is not None:
        lines += ["", f"True labels per training image: {r['true_labels_per_image']:.2f}."]
    left_out = [f"{split} {len(names)} ({', '.join(names)})"
                for split, names in (r.get("classes_left_out") or {}).items() if names]
    if left_out:
        lines += ["", f"Classes without a positive, left out of that split's mAP: {'; '.join(left_out)}."]
    lines += _comparison_tables(r)
    if r.get("findings"):
        lines += ["", "Findings:"]
        for f in r["findings"]:
            chain = f"{loss_label(f['chain'])} chain: " if f["chain"] else ""
            detail = "; ".join(_ci(c["diff"], c["low"], c["high"], signed=True)
                               for c in f.get("comparisons", []))
            if "values" in f:
                detail = ", ".join(f"{v:g}" for v in f["values"])
            lines.append(f"- {chain}{f['claim']}: **{f['verdict']}**" + (f" ({detail})" if detail else ""))
    lines += _model_selection(r["model_selection"])
    lines += ["", _timing(r["stages"])]
    if r["published"]:
        p, best = r["published"], r["published"]["best_known"]
        lines += ["", f"Published {DATA_SET_LABELS[p['data_set']]} test mAP (Zhou et al. 2022; LL-R: Kim "
                  "et al. 2022): " + ", ".join(f"{loss_label(k)} {v}" for k, v in p["mAP"].items()),
                  "", f"best known: {best['name']} {best['mAP']}"]
    return "\n".join(lines) + "\n"


def _table_rows(r: dict) -> list[str]:
    lines = []
    published = (r["published"] or {}).get("mAP", {})
    for row in r["rows"]:
        test = _ci(row["test_map"], row.get("test_map_low"), row.get("test_map_high"))
        if row["kind"] in ("teacher", "reference") and row.get("loss") in published and row["round"] == 1:
            test += f" (published {published[row['loss']]})"
        # a teacher's positives are its probabilities' sum per image (pseudo/labels.py), in every
        # round: a later round's teacher, a promoted student, is scored like the first
        positives = _fmt(row, "positives") + (" (expected)" if row["kind"] == "teacher"
                                              and row.get("positives") is not None else "")
        lines.append(f"| {row['name']} | {test} | {_fmt(row, 'val_map')} | "
                     f"{positives if row.get('positives') is not None else '-'} | "
                     f"{_fmt(row, 'precision', 3)} | {_fmt(row, 'recall', 3)} | "
                     f"{_fmt(row, 'train_seconds', 0)} |")
    return lines


def _comparison_tables(r: dict) -> list[str]:
    """Per chain and round: each student minus its teacher and minus each reference, with intervals."""
    rows = r["rows"]
    refs = [loss for loss in REFERENCE_LOSSES if loss in references(rows)]
    lines = []
    groups = dict.fromkeys((row["chain"], row["round"]) for row in rows if row["kind"] == "student")
    for chain, k in groups:
        students = [s for s in rows if s["kind"] == "student" and (s["chain"], s["round"]) == (chain, k)]
        rounds = f", round {k}" if k > 1 else ""
        head = ["vs its teacher", *(f"vs {loss_label(loss)}" for loss in refs)]
        lines += ["", f"{loss_label(chain)} chain{rounds}: student minus teacher, test mAP [95% CI], verdict",
                  "", "| student | " + " | ".join(head) + " |", "|---|" + "---:|" * len(head)]
        for s in students:
            cells = []
            for against in ("teacher", *refs):
                c = _comparison(r, s["id"], against)
                cells.append(f"{_ci(c['diff'], c['low'], c['high'], signed=True)} {c['verdict']}" if c else
                             "(its teacher)" if against == s["chain"] and s["round"] == 1 else "-")
            lines.append(f"| {s['name']} | " + " | ".join(cells) + " |")
    return lines


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


def _timing(s: dict) -> str:
    timing = [f"{name} {s[key]:.0f} s" for name, key in (
        ("prepare", "prepare_seconds"), ("teacher", "teacher_seconds"), ("inference", "infer_seconds"),
        ("merge", "merge_seconds"), ("students", "students_seconds")) if s.get(key) is not None]
    rates = [f"{name} {s[key]:.0f} samples/s" for name, key in (
        ("teacher", "teacher_samples_per_s"), ("inference", "infer_samples_per_s"),
        ("students", "student_samples_per_s")) if s.get(key) is not None]
    return f"Stage wall time: {', '.join(timing)}; throughput: {', '.join(rates)}."


def report(cfg: Config) -> tuple[str, list[Path]]:
    """report.md, report.json (with the ids of the results it read) and the two figures."""
    runs = seed_runs(cfg)
    inputs = report_inputs(cfg)
    r = collect(cfg) if len(runs) == 1 else summarize([collect(run) for run in runs])
    add_intervals(r, *test_scores(runs))
    r["findings"] = findings(r)
    r["inputs"] = inputs
    layout = RunLayout.of(cfg)
    text = markdown(r)
    write_text(layout.report_md, text)
    write_json(layout.report_json, r)
    return text, list(figures(r, layout))
