"""Figure 1 of the paper from a report (report.py): student test mAP vs tau with the reference
lines (figure1a.png) and mean positives per image of the pseudo labels vs tau (figure1b.png). Over
seeds, error bars and one-standard-deviation bands."""

from __future__ import annotations

from pathlib import Path

from pml_dist.layout import RunLayout
from pml_dist.pipeline.names import loss_label


def figures(r: dict, run: RunLayout) -> tuple[Path, Path]:
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
        label=f"student (y = p > tau), {loss_label(r['teacher_loss'])} teacher",
    )
    styles = {"an": ("tab:red", "--"), "em": ("tab:green", "-."), "bce": ("black", ":")}
    for row in r["rows"]:
        if row["kind"] in ("teacher", "reference") and row["test_map"] is not None:
            color, style = styles.get(row["loss"], ("gray", "--"))
            label = loss_label(row["loss"]) + (" (the teacher)" if row["kind"] == "teacher" else "")
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
        fig, ax, "test mAP (%)", f"Figure 1a: student mAP vs tau ({title})", run.figure("figure1a")
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
        run.figure("figure1b"),
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
