"""The table of bench/gpu.sh: each step's status and time, the demo's stage times, the throughput
numbers against the issue's goals; printed and written to OUTDIR/gpu-check.md and .json (which
also holds the step records of OUTDIR/steps.jsonl, the demo's report and the throughput result read
from WORK). gpu.sh runs it after every step, so it makes do with whatever is there so far.

    python bench/gpu_table.py WORK OUTDIR [--dry-run]
"""

import json
import platform
import sys
from pathlib import Path

import torch

GOAL_TRAIN = 1000.0  # training img/s on one H100/H200 at the COCO settings
GOAL_LOADER_SHARE = 0.90  # FFCV-fed training at least 90% of training on synthetic GPU tensors
GOAL_INFER_RATIO = 2.5  # inference at least 2.5x training img/s


def read_json(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def main(argv: list[str]) -> int:
    work, out = Path(argv[0]), Path(argv[1])
    dry = "--dry-run" in argv
    steps_file = out / "steps.jsonl"
    steps = [json.loads(line) for line in steps_file.read_text().splitlines() if line] \
        if steps_file.is_file() else []
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU (CPU)"
    lines = [f"# GPU check{' (dry run: the GPU steps replaced by their CPU stand-ins)' if dry else ''}", "",
             f"Machine: {device}; {platform.node()}; Python {platform.python_version()}; "
             f"torch {torch.__version__} "
             f"(CUDA {torch.version.cuda}).", "", "| step | status | seconds |", "|---|---|---:|"]
    for s in steps:
        status = "ok" if s["rc"] == 0 else s["note"] if s["rc"] == -1 else f"FAILED (exit {s['rc']})"
        if s["rc"] > 0 and "note" in s:
            status += f": {s['note']}"
        lines.append(f"| {s['step']} | {status} | {s['seconds']} |")
    lines.append(f"| total | | {sum(s['seconds'] for s in steps):.1f} |")

    report = read_json(work / "demo-report.json")
    if report:
        lines += ["", "Demo on the GPU, stage wall times (its report.json):", "",
                  "| stage | value |", "|---|---:|"]
        lines += [f"| {k} | {v:.1f} |" for k, v in report.get("stages", {}).items() if v is not None]

    result = read_json(work / "throughput.json")
    verdicts = {}
    if result:
        rates, ratios = result["img_per_s"], result["ratios"]
        goals = {
            "train_img_per_s >= 1000": ("ffcv_train", rates, GOAL_TRAIN),
            "ffcv_train within 10% of synthetic": ("ffcv_train / synthetic_train", ratios, GOAL_LOADER_SHARE),
            "ffcv_infer >= 2.5x ffcv_train": ("ffcv_infer / ffcv_train", ratios, GOAL_INFER_RATIO),
        }
        # a measurement the run did not reach is no verdict either way
        verdicts = {goal: where[key] >= bound for goal, (key, where, bound) in goals.items() if key in where}
        lines += ["", f"Throughput on {result['device']}, {json.dumps(result['settings'])}:", "",
                  "| measurement | img/s |", "|---|---:|"]
        lines += [f"| {k} | {v:,.1f} |" for k, v in rates.items()]
        lines += [f"| {k} | {v:.3f} |" for k, v in result["ratios"].items()]
        if not dry:
            met = (f"{k}: {'met' if ok else 'NOT met'}" for k, ok in verdicts.items())
            lines += ["", "Goals: " + "; ".join(met)]
    text = "\n".join(lines) + "\n"
    print(text)
    (out / "gpu-check.md").write_text(text)
    (out / "gpu-check.json").write_text(json.dumps({"device": device, "dry_run": dry, "steps": steps,
                                                     "demo": report, "throughput": result,
                                                     "goals": verdicts}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
