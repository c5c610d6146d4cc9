"""Every `pml-dist` command written in README.md, docs/ and the presets' comments still works, so a
documented command cannot drift from the code: each parses (its flags exist) and its config loads and
validates (its keys and values are right); each `pml-dist run` plans its whole pipeline with
`--dry-run` on the real Slurm test cluster (every sbatch script checked by `sbatch --test-only`).

Synopsis lines (placeholders such as CFG, N, `[--tau T]`, `teacher|student`) are not commands and are
left out. `my.yaml`, the docs' name for the reader's own preset, and a run's resolved config
(`runs/<dir>/config.yaml`, which predict and export read, written by the run) are the demo preset
here; a shell variable set in the same file (`C="..."`) is expanded. The data and weights a command names need
not exist: planning reads neither; the site keys (GPUs, memory, CPUs) are set to what the test
cluster has."""

from __future__ import annotations

import re
import shlex

import pytest

from pml_dist.cli import build_parser, main
from pml_dist.config import REPO_ROOT, load_config

SOURCES = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md")),
           *sorted((REPO_ROOT / "configs").glob("*.yaml"))]
# a command is an inline code span (which may wrap) or a line of its own (an indented code line, a
# preset's comment)
SPAN = re.compile(r"`(pml-dist [^`]+)`")
LINE = re.compile(r"^[#\s]*(pml-dist [a-z].*)$", re.M)
PLACEHOLDER = re.compile(r"^(?:[A-Z]{1,4}|\.\.\.|\[.*|.*\|.*|\$[A-Z]+.*|.*<[^>]*>.*)$")
RUN_CONFIG = re.compile(r"^runs/[^ ]+/config\.yaml$")
TEST_SITE = ["slurm.gpus_per_node=0", "slurm.gres=", "slurm.mem_gb=0", "slurm.cpus_per_task=1"]


def documented_commands() -> list[tuple[str, list[str]]]:
    """(where, argv after `pml-dist`) of every concrete command in the sources."""
    found = []
    for path in SOURCES:
        text = path.read_text()
        variables = dict(re.findall(r'^\s*([A-Z]+)="([^"]*)"', text, re.M))
        for match in [*SPAN.finditer(text), *LINE.finditer(text)]:
            command = " ".join(match.group(1).split(" # ")[0].split())  # a trailing shell comment, wraps
            for name, value in variables.items():
                command = command.replace(f"${name}", value)
            argv = shlex.split(command)[1:]
            if len(argv) < 2 or any(PLACEHOLDER.match(token) for token in argv):
                continue  # a synopsis, or the command's name in a sentence
            argv = ["configs/demo.yaml" if a == "my.yaml" or RUN_CONFIG.match(a) else a for a in argv]
            lineno = text.count("\n", 0, match.start()) + 1
            found.append((f"{path.relative_to(REPO_ROOT)}:{lineno}", argv))
    return [(w, list(a)) for w, a in sorted({(w, tuple(a)) for w, a in found})]


COMMANDS = documented_commands()


def test_the_documented_commands_are_found():
    """Not vacuous: the commands the presets and the protocol document are among them."""
    runs = [" ".join(argv) for _, argv in COMMANDS if argv[0] == "run"]
    for preset in ("coco2014_r50", "voc2012_r50", "nuswide_r50", "cub_r50", "demo_study"):
        assert any(f"configs/{preset}.yaml" in r for r in runs), preset
    assert sum("sweep.losses=" in r for r in runs) >= 3  # the protocol's rows
    assert any(argv[0] == "status" for _, argv in COMMANDS)
    assert {"predict", "export"} <= {argv[0] for _, argv in COMMANDS}  # the trained stage in use


@pytest.mark.parametrize("where, argv", COMMANDS, ids=[w for w, _ in COMMANDS])
def test_a_documented_command_parses_and_its_config_validates(where, argv):
    args = build_parser().parse_args(argv)  # an unknown flag exits here
    if hasattr(args, "overrides"):
        seeds = [f"run.seeds={args.seeds}"] if getattr(args, "seeds", None) else []
        load_config(args.config, [*args.overrides, *seeds])


RUNS = [(where, argv) for where, argv in COMMANDS if argv[0] == "run"]


@pytest.mark.slurm
@pytest.mark.parametrize("where, argv", RUNS, ids=[w for w, _ in RUNS])
def test_a_documented_run_plans_its_pipeline_on_the_test_cluster(where, argv, slurm_cluster, tmp_path,
                                                                  capsys):
    args = build_parser().parse_args(argv)
    seeds = ["--seeds", str(args.seeds)] if args.seeds else []
    config = args.config or "configs/demo.yaml"
    known = slurm_cluster.job_ids()
    assert main(["run", "--executor", "slurm", "--dry-run", *seeds, "--config", config, *args.overrides,
                 *TEST_SITE, f"run.dir={tmp_path / 'run'}"]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    jobs = [line.removeprefix("# ---- ") for line in out.splitlines() if line.startswith("# ---- ")]
    assert {"data", "teacher", "teacher/probs", "pseudo", "report"} <= set(jobs), jobs
    assert out.count("#!/bin/bash") == len(jobs)  # one checked script per job
    assert slurm_cluster.job_ids() == known  # nothing submitted
