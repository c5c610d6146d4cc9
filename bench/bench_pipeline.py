"""Where `make demo`'s time goes: every stage of a finished run, read from the run directory's own
records, largest first, with its share of the stages' total.

    data/stats.json           seconds (prepare: decode check + .beton writing)
    <stage>/result.json       train_seconds, train_samples_per_s (teachers, references, students,
                              sweep points; chain-<loss>/ and round-<k>/ sub-runs too)
    <run>/pseudo/merge.json   infer_seconds (the slowest rank's scoring loop), infer_samples_per_s,
                              merge_seconds (merge + every pseudo-label target)

The stages come from the run's stage list (pml_dist/pipeline/stage_list.py), so every stage of every
sub-run is listed; one without a record is shown as not run. The records time the work inside each
job, not process start-up or waiting for a worker: the end-to-end wall time (config.yaml written to
report.json written) is printed beside their sum. Nothing is run; this only reads.

    .venv/bin/python bench/bench_pipeline.py [--run runs/demo]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_RUN = REPO / "runs" / "demo"  # configs/demo.yaml's run.dir


def stage_times(run_dir: Path) -> list[dict]:
    """One row per stage of the run's stage list: name, kind, seconds, samples/s (None: no record)."""
    from pml_dist.config import load_config
    from pml_dist.layout import RunLayout
    from pml_dist.pipeline.stage_list import stage_list

    cfg = load_config(run_dir / "config.yaml", [f"run.dir={run_dir}"])
    rows = []
    for entry in stage_list(cfg):
        layout = RunLayout.of(entry.run)
        row = {"name": entry.name, "kind": entry.role, "seconds": None, "samples_per_s": None, "note": ""}
        if entry.role == "data":
            if layout.data.is_complete():
                stats = layout.data.stats()
                images = sum(s.get("images", 0) for s in stats.raw.get("splits", {}).values())
                rate = images / stats.seconds if stats.seconds else None
                row.update(seconds=stats.seconds, samples_per_s=rate, note=f"{images} images")
        elif entry.role in ("infer", "pseudo"):
            record = layout.pseudo.read_record() or {}
            if entry.role == "infer":
                note = f"{record.get('world_size', '?')} ranks, slowest rank's loop" if record else ""
                row.update(seconds=record.get("infer_seconds"), note=note,
                           samples_per_s=record.get("infer_samples_per_s"))
            else:
                seconds = record.get("merge_seconds")
                row.update(seconds=seconds, note="merge + pseudo-label targets" if record else "",
                           samples_per_s=record["samples"] / seconds if seconds else None)
        elif entry.stage is not None:
            result = entry.stage.files(layout).read_result()
            raw = result.raw if result else {}
            if entry.role == "teacher" and entry.round > 1:
                row["note"] = "promoted student (no training of its own)"
            elif "sweep" in raw:
                row["note"] = "chosen sweep point (its time is the point's row)"
            else:
                row.update(seconds=raw.get("train_seconds"), samples_per_s=raw.get("train_samples_per_s"))
        else:  # the report: no timing record
            continue
        rows.append(row)
    return rows


def wall_seconds(run_dir: Path) -> float | None:
    """config.yaml written (the run's start) to report.json written (its end)."""
    start, end = run_dir / "config.yaml", run_dir / "report.json"
    if not (start.is_file() and end.is_file()):
        return None
    return end.stat().st_mtime - start.stat().st_mtime


def table(run_dir: Path) -> list[str]:
    rows = stage_times(run_dir)
    timed = sorted((r for r in rows if r["seconds"] is not None), key=lambda r: -r["seconds"])
    untimed = [r for r in rows if r["seconds"] is None]
    total = sum(r["seconds"] for r in timed)
    width = max([len(r["name"]) for r in rows] + [5])
    lines = [f"stages of {run_dir} (its own records), largest first",
             f"{'stage':<{width}}  {'kind':<9} {'seconds':>8} {'share':>6} {'samples/s':>10}  note"]
    for r in timed:
        rate = f"{r['samples_per_s']:.0f}" if r["samples_per_s"] else "-"
        lines.append(f"{r['name']:<{width}}  {r['kind']:<9} {r['seconds']:>8.1f} "
                     f"{100 * r['seconds'] / total if total else 0:>5.1f}% {rate:>10}  {r['note']}")
    for r in untimed:
        lines.append(f"{r['name']:<{width}}  {r['kind']:<9} {'-':>8} {'':>6} {'-':>10}  "
                     f"{r['note'] or 'no record (not run)'}")
    wall = wall_seconds(run_dir)
    lines.append(f"{'total of the stages':<{width}}  {'':<9} {total:>8.1f} {100.0 if total else 0:>5.1f}%")
    lines.append("end-to-end wall time (config.yaml to report.json): "
                 + (f"{wall:.1f} s; the stages' records cover {100 * total / wall:.0f}% of it (the rest: "
                    "job and process start-up, model and loader set-up, evaluation and checkpoints "
                    "outside the timed loops, the report)" if wall else "no report.json yet"))
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=DEFAULT_RUN, help="a run directory (default runs/demo)")
    args = parser.parse_args()
    run_dir = args.run.resolve()
    if not (run_dir / "config.yaml").is_file():
        if run_dir == DEFAULT_RUN:
            print("bench_pipeline: no run at runs/demo: `make demo` makes it (or pass --run DIR); "
                  "nothing to show")
        else:
            print(f"bench_pipeline: {run_dir} is no run directory (no config.yaml); nothing to show")
        return 0
    print("\n".join(table(run_dir)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
