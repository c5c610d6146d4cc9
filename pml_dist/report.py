"""`pml-dist report`: test mAP of the teacher, every student and the reference runs, with the
pseudo-label statistics, as report.md + report.json, and the paper's Figure 1 as two plots.

    figure1a.png   student test mAP vs tau, horizontal lines for the AN / EM / full-BCE references
    figure1b.png   mean positives per image of the pseudo labels vs tau (and the true mean)
"""

from __future__ import annotations

import json
from pathlib import Path

from pml_dist import layout
from pml_dist.atomic import write_json, write_text
from pml_dist.config import Config, git_revision
from pml_dist.errors import PmlError
from pml_dist.pseudo import target_names

# Test mAP on COCO 2014 (val2014) with ResNet-50 at 448 px: Cole et al. 2021 (full BCE, AN),
# Zhou et al. 2022 (EM, EM+APL). Printed beside measured values when report.published_coco is set.
PUBLISHED_COCO = {"bce": 76.78, "an": 64.92, "em": 70.70, "em_apl": 70.87}
REFERENCE_NAMES = {"an": "AN", "bce": "full BCE", "em": "EM", "an_ls": "AN-LS", "wan": "WAN", "epr": "EPR",
                   "role": "ROLE", "em_apl": "EM+APL"}


def _read(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def collect(cfg: Config) -> dict:
    """Everything the report shows, from the run directory."""
    run = cfg.run_dir
    teacher = _read(layout.teacher_dir(run) / "result.json")
    if teacher is None:
        raise PmlError(f"no {layout.teacher_dir(run) / 'result.json'}: the teacher has not finished")
    pseudo = _read(layout.pseudo_dir(run) / "stats.json") or {"targets": {}}
    data = _read(run / "data" / "stats.json") or {}
    references = {cfg.loss.name: teacher}
    for loss in cfg.report.references:
        result = _read(layout.reference_dir(run, loss) / "result.json")
        if result is not None:
            references[loss] = result
    students = {}
    for name in target_names(cfg.pseudo.taus, cfg.pseudo.modes):
        result = _read(layout.student_dir(run, name) / "result.json")
        stats = pseudo["targets"].get(name, {})
        students[name] = {
            "mode": stats.get("mode"), "tau": stats.get("tau"),
            "test_map": result["test_map"] if result else None,
            "val_map": result["val_map"] if result else None,
            "train_seconds": result["train_seconds"] if result else None,
            "samples_per_s": result["train_samples_per_s"] if result else None,
            "mean_positives_per_image": stats.get("mean_positives_per_image"),
            "precision": stats.get("precision"), "recall": stats.get("recall"),
        }
    true_mean = data.get("splits", {}).get("train", {}).get("labels_per_image", {}).get("mean")
    return {
        "data_root": cfg.data.root,
        "seed": cfg.train.seed,
        "observed_seed": cfg.data.observed_seed,
        "teacher": {"loss": cfg.loss.name, "test_map": teacher["test_map"], "val_map": teacher["val_map"],
                    "train_seconds": teacher["train_seconds"],
                    "samples_per_s": teacher["train_samples_per_s"], "world_size": teacher["world_size"]},
        "references": {loss: {"test_map": r["test_map"], "val_map": r["val_map"],
                              "train_seconds": r["train_seconds"]} for loss, r in references.items()},
        "published_coco": PUBLISHED_COCO if cfg.report.published_coco else None,
        "students": students,
        "true_labels_per_image": true_mean,
        "teacher_expected_positives": pseudo.get("teacher", {}).get("mean_positives_per_image"),
        "git": git_revision(),
        "config": cfg.to_dict(),
    }


def _fmt(value, digits=2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown(r: dict) -> str:
    lines = [f"# pml-dist report: {r['data_root']}", "",
             f"seed {r['seed']}, observed-label seed {r['observed_seed']}, git {r['git']}", "",
             "| run | test mAP | val mAP | positives / image | precision | recall | train s |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    t = r["teacher"]
    lines.append(f"| teacher ({REFERENCE_NAMES.get(t['loss'], t['loss'])}) | {_fmt(t['test_map'])} | "
                 f"{_fmt(t['val_map'])} | {_fmt(r['teacher_expected_positives'])} (expected) | - | - | "
                 f"{_fmt(t['train_seconds'], 0)} |")
    for loss, ref in r["references"].items():
        if loss == t["loss"]:
            continue
        lines.append(f"| reference {REFERENCE_NAMES.get(loss, loss)} | {_fmt(ref['test_map'])} | "
                     f"{_fmt(ref['val_map'])} | - | - | - | {_fmt(ref['train_seconds'], 0)} |")
    for name, s in r["students"].items():
        lines.append(f"| student {name} | {_fmt(s['test_map'])} | {_fmt(s['val_map'])} | "
                     f"{_fmt(s['mean_positives_per_image'])} | {_fmt(s['precision'], 3)} | "
                     f"{_fmt(s['recall'], 3)} | {_fmt(s['train_seconds'], 0)} |")
    if r["true_labels_per_image"] is not None:
        lines += ["", f"True labels per training image: {r['true_labels_per_image']:.2f}."]
    if r["published_coco"]:
        lines += ["", "Published COCO test mAP (Cole et al. 2021; Zhou et al. 2022): " + ", ".join(
            f"{REFERENCE_NAMES.get(k, k)} {v}" for k, v in r["published_coco"].items())]
    return "\n".join(lines) + "\n"


def figures(r: dict, out: Path) -> tuple[Path, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hard = [(s["tau"], s) for s in r["students"].values() if s["mode"] == "hard"]
    hard.sort(key=lambda x: x[0])
    title = f"{Path(r['data_root']).name}, seed {r['seed']}"
    fig, ax = plt.subplots(figsize=(6, 4))
    taus = [tau for tau, s in hard if s["test_map"] is not None]
    maps = [s["test_map"] for _, s in hard if s["test_map"] is not None]
    ax.plot(taus, maps, "o-", label="student (y = p > tau)")
    styles = {"an": ("AN", "tab:red", "--"), "em": ("EM", "tab:green", "-."),
              "bce": ("full BCE", "black", ":")}
    for loss, ref in r["references"].items():
        label, color, style = styles.get(loss, (REFERENCE_NAMES.get(loss, loss), "gray", "--"))
        ax.axhline(ref["test_map"], color=color, linestyle=style, label=label)
    for name, marker in (("soft", "s"), ("class_prior", "^")):
        s = r["students"].get(name)
        if s and s["test_map"] is not None and taus:
            ax.plot([min(taus)], [s["test_map"]], marker, label=f"student ({name.replace('_', ' ')})")
    a = _save_figure(fig, ax, "test mAP (%)", f"Figure 1a: student mAP vs tau ({title})",
                     out / "figure1a.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([tau for tau, _ in hard], [s["mean_positives_per_image"] for _, s in hard], "o-",
            label="pseudo labels")
    if r["true_labels_per_image"] is not None:
        ax.axhline(r["true_labels_per_image"], color="black", linestyle=":", label="true labels")
    ax.axhline(1.0, color="tab:red", linestyle="--", label="observed (single positive)")
    b = _save_figure(fig, ax, "mean positives per image",
                     f"Figure 1b: positives per image vs tau ({title})", out / "figure1b.png")
    return a, b


def _save_figure(fig, ax, ylabel: str, title: str, path: Path) -> Path:
    import matplotlib.pyplot as plt

    ax.set_xlabel("tau (pseudo-label threshold)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def report(cfg: Config) -> tuple[str, list[Path]]:
    r = collect(cfg)
    out = cfg.run_dir
    text = markdown(r)
    write_text(out / "report.md", text)
    write_json(out / "report.json", r)
    return text, list(figures(r, out))
