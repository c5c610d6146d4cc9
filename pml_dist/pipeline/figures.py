"""Figure 1 of the paper from a report (report.py), one curve per teacher chain (and round):

    figure1a.png   left: student test mAP vs tau, each chain's own teacher as a horizontal line of
                   its colour, the full-BCE reference in black; right: the students without a tau
                   (soft, class prior), one marker per chain, beside the same lines
    figure1b.png   mean positives per image of the pseudo labels vs tau, with the true mean and
                   the single observed positive

Error bars are the 95% bootstrap intervals of the report (over test images, and seeds).
"""

from __future__ import annotations

from pathlib import Path

from pml_dist.layout import RunLayout
from pml_dist.pipeline.names import loss_label

COLOURS = ("tab:red", "tab:green", "tab:blue", "tab:purple", "tab:orange", "tab:brown")


def _curves(r: dict) -> list[tuple[str, int, list[dict], list[dict], dict | None]]:
    """(chain, round, hard students by tau, students without a tau, its teacher row) per curve."""
    out = []
    keys = dict.fromkeys((row["chain"], row["round"]) for row in r["rows"] if row["kind"] == "student")
    for chain, k in keys:
        mine = [s for s in r["rows"] if (s["chain"], s["round"]) == (chain, k)]
        students = [s for s in mine if s["kind"] == "student"]
        hard = sorted((s for s in students if s["mode"] == "hard" and s["tau"] is not None),
                      key=lambda s: s["tau"])
        teacher = next((t for t in mine if t["kind"] == "teacher"), None)
        out.append((chain, k, hard, [s for s in students if s not in hard], teacher))
    return out


def _label(chain: str, k: int) -> str:
    return f"{loss_label(chain)} teacher" + (f", round {k}" if k > 1 else "")


def _target(row: dict) -> str:
    return row["id"].rsplit("/", 1)[-1]  # students/<target>


def _yerr(rows: list[dict]) -> list[list[float]] | None:
    if any(row.get("test_map_low") is None for row in rows):
        return None
    # the interval comes from the float16 test probabilities, the mAP from the float32 ones: a tie
    # float16 makes can put the mAP a hair outside it
    return [[max(0.0, row["test_map"] - row["test_map_low"]) for row in rows],
            [max(0.0, row["test_map_high"] - row["test_map"]) for row in rows]]


def figures(r: dict, run: RunLayout) -> tuple[Path, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seeds = r["seeds"]
    title = f"{Path(r['data_root']).name}, seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}"
    curves = _curves(r)
    others = [c for c in curves if c[3]]
    fig, axes = plt.subplots(1, 2 if others else 1, figsize=(9.5 if others else 6.5, 4.4), squeeze=False,
                             sharey=True, gridspec_kw={"width_ratios": [3, 1]} if others else None)
    ax = axes[0][0]
    for i, (chain, k, hard, _, teacher) in enumerate(curves):
        colour = COLOURS[i % len(COLOURS)]
        done = [s for s in hard if s["test_map"] is not None]
        if done:
            ax.errorbar([s["tau"] for s in done], [s["test_map"] for s in done], yerr=_yerr(done), fmt="o-",
                        color=colour, capsize=3, label=f"students (y = p > tau), {_label(chain, k)}")
        for a in axes[0]:
            if teacher is not None and teacher["test_map"] is not None:
                a.axhline(teacher["test_map"], color=colour, linestyle="--", linewidth=1,
                          label=f"{_label(chain, k)} itself" if a is ax else None)
    for row in r["rows"]:
        if row["kind"] == "reference" and row["test_map"] is not None:
            for a in axes[0]:
                a.axhline(row["test_map"], color="black" if row["loss"] == "bce" else "gray", linestyle=":",
                          label=loss_label(row["loss"]) if a is ax else None)
    ax.set_xlabel("tau (pseudo-label threshold)")
    ax.set_ylabel("test mAP (%)")
    ax.legend(fontsize=7)
    if others:  # students without a tau: their own panel, so none stands at a fake tau
        side = axes[0][1]
        names = list(dict.fromkeys(_target(s) for c in others for s in c[3]))
        for i, (_, _, _, rest, _) in enumerate(curves):
            done = [s for s in rest if s["test_map"] is not None]
            if done:
                xs = [names.index(_target(s)) + 0.1 * (i - len(curves) / 2) for s in done]
                side.errorbar(xs, [s["test_map"] for s in done], yerr=_yerr(done), fmt="s",
                              color=COLOURS[i % len(COLOURS)], capsize=3)
        side.set_xticks(range(len(names)), [n.replace("_", " ") for n in names])
        side.set_xlim(-0.6, len(names) - 0.4)
        side.set_xlabel("no tau")
    fig.suptitle(f"Figure 1a: student mAP vs tau ({title}); bars: 95% bootstrap intervals", fontsize=10)
    a = _save(fig, run.figure("figure1a"))

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for i, (chain, k, hard, _, _) in enumerate(curves):
        done = [s for s in hard if s["positives"] is not None]
        ax.plot([s["tau"] for s in done], [s["positives"] for s in done], "o-",
                color=COLOURS[i % len(COLOURS)], label=f"pseudo labels, {_label(chain, k)}")
    if r["true_labels_per_image"] is not None:
        ax.axhline(r["true_labels_per_image"], color="black", linestyle=":", label="true labels")
    ax.axhline(1.0, color="gray", linestyle="--", label="observed (single positive)")
    ax.set_xlabel("tau (pseudo-label threshold)")
    ax.set_ylabel("mean positives per image")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    fig.suptitle(f"Figure 1b: positives per image vs tau ({title})", fontsize=10)
    b = _save(fig, run.figure("figure1b"))
    return a, b


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
