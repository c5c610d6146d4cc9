"""How small a difference the report can resolve, against the size of the test split.

Reads a finished run's report.json and the test probabilities of its stages, then, for each test
size n, draws random subsets of n test images and recomputes every comparison of the report on
them (paired bootstrap, intervals.py). Prints, per n, the median width of the 95% intervals and how
many comparisons are resolved (the interval excludes 0). Half the median width is about the
smallest difference that size resolves.

    .venv/bin/python bench/test_split_size.py runs/demo [--sizes 250 500 1000 2000 3000]
        [--subsets 3] [--resamples 300]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> int:
    from pml_dist.config import load_config
    from pml_dist.pipeline.intervals import paired_difference
    from pml_dist.pipeline.report import test_scores
    from pml_dist.pipeline.subruns import seed_runs

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a run directory with report.json (make demo: runs/demo)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[250, 500, 1000, 2000, 3000])
    parser.add_argument("--subsets", type=int, default=3, help="random subsets per size")
    parser.add_argument("--resamples", type=int, default=300)
    args = parser.parse_args()
    report = args.run / "report.json"
    if not report.is_file():
        print(f"{report}: not found (run the experiment first: make demo)", file=sys.stderr)
        return 2
    comparisons = json.loads(report.read_text())["comparisons"]
    cfg = load_config(args.run / "config.yaml")
    labels, probs = test_scores(seed_runs(cfg))
    labels = labels.dense()  # subsets of images index its rows
    pairs = [(c["a"], c["b"]) for c in comparisons if c["a"] in probs and c["b"] in probs]
    total = labels.shape[0]
    rng = np.random.default_rng(0)
    print(f"{args.run}: {len(pairs)} comparisons, {total} test images, {args.subsets} subsets per size, "
          f"{args.resamples} resamples")
    print(f"{'test images':>11}  {'median 95% CI width':>19}  {'resolved':>8}")
    for n in sorted(s for s in args.sizes if s <= total):
        widths, resolved = [], 0
        for _ in range(args.subsets if n < total else 1):
            keep = np.sort(rng.choice(total, n, replace=False))
            for a, b in pairs:
                d = paired_difference(probs[a][:, keep], probs[b][:, keep], labels[keep],
                                      resamples=args.resamples)
                widths.append(d["high"] - d["low"])
                resolved += d["verdict"] != "not resolved"
        print(f"{n:>11}  {statistics.median(widths):>19.2f}  {resolved / len(widths):>8.0%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
