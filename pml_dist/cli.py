"""`pml-dist` command line. The only place that parses argv; every command is a thin call into the
library. User errors (errors.USER_ERRORS) print one line naming what is wrong and exit with status 2."""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import time
from pathlib import Path

from pml_dist.errors import USER_ERRORS, PmlError, error_line

log = logging.getLogger("pml_dist")


def _add_config_args(p: argparse.ArgumentParser, seeds: bool = False) -> None:
    p.add_argument("--config", default=None, help="YAML preset (default: configs/demo.yaml)")
    if seeds:
        p.add_argument("--seeds", type=int, default=None, metavar="N",
                       help="repeat the experiment with N training seeds (same as run.seeds=N): mean and "
                            "std in the report, error bars in the plots")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")


def _at_least(low: int):
    """An argparse type: an int >= low (argparse prints the one-line error and exits 2)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value
    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pml-dist", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("make-synthetic", help="write the built-in data set (COCO layout, or --layout csv)")
    p.add_argument("out", type=Path)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train", type=_at_least(1), default=2000, help="training images")
    p.add_argument("--test", type=_at_least(1), default=500, help="test images")
    p.add_argument("--size", type=_at_least(32), default=64, help="image side in pixels (>= 32)")
    p.add_argument("--classes", type=_at_least(20), default=20,
                   help="classes: the 20 drawn ones, and sparse tag classes above them")
    p.add_argument("--layout", choices=("coco", "csv"), default="coco",
                   help="csv: train.csv (one positive per image), val.csv, test.csv, classes.txt, images/")

    _add_config_args(sub.add_parser("prepare", help="encode train/val/test .beton files"))
    p = sub.add_parser("labels", help="a prepared split as CSV on stdout: row,file,observed,labels")
    p.add_argument("--split", choices=("train", "val", "test"), required=True)
    p.add_argument("--names", action="store_true", help="class names (separated by |) instead of indices")
    _add_config_args(p)
    p = sub.add_parser("train", help="train the teacher or one student (run once per rank)")
    p.add_argument("--stage", choices=("teacher", "student", "reference"), required=True,
                   help="reference: a teacher trained with --loss, for the report")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--loss", default=None, help="(reference) its loss, e.g. bce or em")
    which.add_argument("--index", type=int, default=None,
                       help="(student) the N-th target: pseudo.taus in order, then soft, class_prior "
                            "(for job arrays: --index $SLURM_ARRAY_TASK_ID)")
    which.add_argument("--tau", type=float, default=None, help="student on the hard labels p > tau")
    which.add_argument("--pseudo", choices=("soft", "class_prior"), default=None,
                       help="student on the soft or per-class-threshold pseudo labels")
    _add_config_args(p)
    _add_config_args(sub.add_parser("infer", help="score this rank's shard of the training split"))
    _add_config_args(sub.add_parser("merge", help="check and merge the shards, write pseudo labels"))
    p = sub.add_parser("run", help="the whole pipeline as one dependency graph of jobs")
    p.add_argument("--executor", choices=("local", "slurm"), default=None,
                   help="default: slurm when a working Slurm is found, else local")
    p.add_argument("--wait", action="store_true",
                   help="(slurm) wait for every job, showing progress; (both) when another `pml-dist run` "
                        "owns the run directory, wait for it, showing its stages, instead of stopping "
                        "with exit status 2")
    p.add_argument("--dry-run", action="store_true",
                   help="(slurm) print the sbatch script of every job that would be submitted, each "
                        "checked with sbatch --test-only; submit nothing")
    _add_config_args(p, seeds=True)
    _add_config_args(sub.add_parser("cancel", help="scancel every queued or running job in jobs.json"),
                     seeds=True)
    _add_config_args(sub.add_parser("job-env", help="(inside a job) the shell lines the plain sbatch "
                                                    "scripts eval: slurm.setup, slurm.env, log folder"))
    _add_config_args(sub.add_parser("status", help="each stage's state: done, running, failed + log"),
                     seeds=True)
    _add_config_args(sub.add_parser("report", help="report.md/json and the Figure 1 plots"), seeds=True)
    p = sub.add_parser("predict", intermixed=True,
                       help="score image files with a trained stage (JSON Lines or a labels CSV)")
    _add_use_stage_args(p)
    p.add_argument("--out", type=Path, default=None, help="write here (atomically) instead of stdout")
    p.add_argument("--top-k", type=_at_least(0), default=5, help="scores of the K likeliest classes (0: all)")
    p.add_argument("--format", choices=("jsonl", "labels"), default="jsonl",
                   help="labels: CSV file,labels (names joined by |), which data.format csv reads")
    p.add_argument("--batch-size", type=_at_least(1), default=64)
    p.add_argument("--config", default=None, help="YAML preset (default: configs/demo.yaml)")
    p.add_argument("paths", nargs="+", action=_PathsAndOverrides, metavar="PATH",
                   help="image files, folders (searched recursively) or .txt lists of image paths; "
                        "section.key=value config overrides may stand among them")
    p = sub.add_parser("export", intermixed=True,
                       help="a trained stage as a folder needing torch only (TorchScript model.pt, classes, "
                            "thresholds, state dict)")
    _add_use_stage_args(p)
    p.add_argument("--out", type=Path, required=True, help="a new (or empty) folder")
    _add_config_args(p)
    return parser


class _Parser(argparse.ArgumentParser):
    """A command's parser. intermixed=True lets its positionals sit on both sides of options
    (`predict run.dir=x --stage teacher images/`): argparse otherwise takes one run of them only."""

    def __init__(self, *args, intermixed: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.intermixed, self._inside = intermixed, False

    def parse_known_args(self, args=None, namespace=None):
        if not self.intermixed or self._inside:
            return super().parse_known_args(args, namespace)
        self._inside = True  # parse_known_intermixed_args calls parse_known_args itself
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._inside = False


class _PathsAndOverrides(argparse.Action):
    """predict's positionals: config overrides (section.key=value, not an existing file) and PATHs,
    in any order (two variable-length positionals cannot be told apart by argparse)."""

    OVERRIDE = re.compile(r"^[A-Za-z_]\w*\.[A-Za-z_][\w.]*=")

    def __call__(self, parser, namespace, values, option_string=None):
        overrides = [v for v in values if self.OVERRIDE.match(v) and not os.path.exists(v)]
        namespace.overrides = overrides
        namespace.paths = [v for v in values if v not in overrides]
        if not namespace.paths:
            parser.error("no PATH: name image files, folders or .txt lists")


def _add_use_stage_args(p: argparse.ArgumentParser) -> None:
    """predict's and export's stage: as `train` names it, a student by --tau or its target's name."""
    p.add_argument("--stage", choices=("teacher", "student", "reference"), required=True)
    which = p.add_mutually_exclusive_group()
    which.add_argument("--tau", type=float, default=None, help="(student) the one trained on p > tau")
    which.add_argument("--target", default=None, help="(student) its target's name: tau-T, soft, class_prior")
    which.add_argument("--loss", default=None, help="(reference) its loss, e.g. bce or em")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from pml_dist.log import enable_crash_traces, setup_logging

    enable_crash_traces()
    setup_logging()
    try:
        return COMMANDS[args.command](args)
    except USER_ERRORS as exc:
        print(error_line(args.command, str(exc)), file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: one line, the shell's status for SIGINT (128 + 2)
        print(f"pml-dist {args.command}: interrupted", file=sys.stderr)
        return 130


def cmd_make_synthetic(args) -> int:
    from ffcv_data.synthetic import make_synthetic

    if args.out.exists():
        raise PmlError(f"{args.out} already exists; choose a new folder (nothing was changed)")
    summary = make_synthetic(args.out, seed=args.seed, n_train=args.train, n_test=args.test,
                             image_size=args.size, num_classes=args.classes, layout=args.layout)
    log.info("wrote %s: %s", args.out, summary)
    return 0


def _config(args, write: bool = True):
    """The experiment config; commands that produce artefacts record it in the run directory."""
    from pml_dist.config import load_config, write_resolved

    seeds = [f"run.seeds={args.seeds}"] if getattr(args, "seeds", None) is not None else []
    cfg = load_config(args.config, [*args.overrides, *seeds])
    if write:
        write_resolved(cfg)
    return cfg


def cmd_prepare(args) -> int:
    from pml_dist.data_stage import prepare

    cfg = _config(args)
    stats = prepare(cfg)
    for name, s in stats["splits"].items():
        log.info("%-5s %6d images, %.2f labels/image", name, s["images"], s["labels_per_image"]["mean"])
    return 0


def cmd_labels(args) -> int:
    from ffcv_data.listing import write_labels_csv
    from pml_dist.layout import RunLayout

    try:
        write_labels_csv(RunLayout.of(_config(args, write=False)).data, args.split, sys.stdout, args.names)
    except BrokenPipeError:  # `| head`: the reader has what it wanted; no traceback at exit's flush
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def _stage(args, cfg):
    """The stage `--stage` and its target flags name, checked against the config."""
    from pml_dist.layout import tau_name
    from pml_dist.pseudo.labels import target_names
    from pml_dist.stages import Reference, Student, Teacher

    targets = target_names(cfg.pseudo.taus, cfg.pseudo.modes)
    if args.stage == "teacher":
        if args.tau is not None or args.pseudo or args.index is not None or args.loss:
            raise PmlError("--tau, --pseudo, --index and --loss do not apply to --stage teacher")
        return Teacher()
    if args.stage == "reference":
        if not args.loss:
            raise PmlError("--stage reference needs --loss")
        if args.loss not in cfg.report.references:
            raise PmlError(f"--loss {args.loss} is not one of report.references {cfg.report.references}")
        return Reference(args.loss)
    if args.index is not None:
        if not 0 <= args.index < len(targets):
            raise PmlError(f"--index {args.index}: there are {len(targets)} targets (0..{len(targets) - 1}: "
                           f"{', '.join(targets)})")
        return Student(targets[args.index])
    if args.tau is not None:
        if not any(abs(args.tau - t) < 1e-9 for t in cfg.pseudo.taus):
            raise PmlError(f"--tau {args.tau} is not one of pseudo.taus {cfg.pseudo.taus}")
        return Student(tau_name(args.tau))
    if args.pseudo:
        return Student(args.pseudo)
    raise PmlError("--stage student needs --tau T or --pseudo soft|class_prior")


def _warn_without_model_selection(cfg) -> None:
    from pml_dist.training.selection import NO_SELECTION_WARNING

    if not cfg.data.full_validation:
        log.warning("%s", NO_SELECTION_WARNING)


def cmd_train(args) -> int:
    from ffcv_data.atomic import write_text
    from pml_dist.training.stop import EXIT_STOPPED, STOPPED_FILE_ENV, StopFlag, Stopped
    from pml_dist.training.trainer import train

    cfg = _config(args)
    _warn_without_model_selection(cfg)
    stage = _stage(args, cfg)
    stop = StopFlag()
    stop.install()
    try:
        train(cfg, stage, stop)
    except Stopped as exc:
        log.info("%s", exc)
        # Every rank has saved: tell a plain sbatch script to requeue, whatever exit status srun
        # reports once a rank's slow teardown made it kill the others (137, not 3).
        if os.environ.get(STOPPED_FILE_ENV):
            write_text(Path(os.environ[STOPPED_FILE_ENV]), f"{exc}\n")
        return EXIT_STOPPED
    return 0


def cmd_infer(args) -> int:
    from pml_dist.pseudo.infer import infer

    infer(_config(args))
    return 0


def cmd_merge(args) -> int:
    from pml_dist.pseudo.make import make_pseudo_labels

    summary = make_pseudo_labels(_config(args))
    for name, target in summary["targets"].items():
        extra = (f", precision {target['precision']:.3f}, recall {target['recall']:.3f}"
                 if target.get("precision") is not None else "")
        log.info("%-12s %.2f positives/image%s", name, target["mean_positives_per_image"], extra)
    return 0


def cmd_run(args) -> int:
    from pml_dist.layout import RunLayout
    from pml_dist.pipeline.graph import run_pipeline
    from pml_dist.pipeline.slurm import default_executor

    # run_pipeline writes config.yaml (and each sub-run's) under the run directory's lock: a second
    # `run` with other settings cannot replace it while the first one runs
    cfg = _config(args, write=False)
    _warn_without_model_selection(cfg)
    run = RunLayout.of(cfg)
    kind = args.executor or default_executor()
    if not args.dry_run:  # every stage's event files, sub-runs' too, are under the run directory
        print(f"TensorBoard: tensorboard --logdir {run.root}", flush=True)
    t0 = time.perf_counter()
    record = run_pipeline(cfg, kind, args.wait, dry_run=args.dry_run)
    if args.dry_run:
        for name, script in record["scripts"].items():
            print(f"# ---- {name}\n{script}")
        log.info("%d job(s) would be submitted; sbatch --test-only accepted each", len(record["scripts"]))
        return 0
    if kind == "slurm" and not args.wait:
        log.info("submitted; `pml-dist status` shows progress; job ids in %s", run.jobs)
        return 0
    log.info("pipeline finished in %.0f s (%s executor)", time.perf_counter() - t0, record["executor"])
    print(run.report_md.read_text())
    for figure in ("figure1a", "figure1b"):
        print(run.figure(figure))
    return 0


def cmd_cancel(args) -> int:
    from pml_dist.pipeline.status import cancel_jobs

    for name, job_id in cancel_jobs(_config(args, write=False)):
        print(f"{name:24s} job {job_id} cancelled")
    return 0


def cmd_job_env(args) -> int:
    """Shell for the plain sbatch scripts to eval once Python runs: the site's setup lines and
    environment (the same as submitit's jobs get) and where the run keeps Slurm logs."""
    import shlex

    from pml_dist.layout import RunLayout
    from pml_dist.pipeline.executor import job_setup_lines

    cfg = _config(args, write=False)
    print("\n".join([*job_setup_lines(cfg),
                     f"PML_DIST_LOG_DIR={shlex.quote(str(RunLayout.of(cfg).slurm_logs))}",
                     f"PML_DIST_SRUN_EXTRA={shlex.quote(shlex.join(cfg.slurm.srun_extra))}"]))
    return 0


def cmd_status(args) -> int:
    from pml_dist.pipeline.status import status

    cfg = _config(args, write=False)
    for name, state, detail in status(cfg):  # with who holds the run's and each stage's lock
        print(f"{name:14s} {state:14s} {detail}")
    return 0


def cmd_report(args) -> int:
    from pml_dist.pipeline.report import report

    text, plots = report(_config(args))
    print(text)
    for path in plots:
        print(path)
    return 0


def _use_stage(args, cfg):
    """predict's and export's stage: --target names a student by its target (pseudo.taus/modes);
    everything else resolves as `train`'s flags do."""
    from pml_dist.pseudo.labels import target_names
    from pml_dist.stages import Student

    if args.target is None:
        if args.stage == "student" and args.tau is None:
            raise PmlError("--stage student needs --tau T or --target NAME")
        return _stage(argparse.Namespace(stage=args.stage, tau=args.tau, loss=args.loss, pseudo=None,
                                          index=None), cfg)
    if args.stage != "student":
        raise PmlError(f"--target applies to --stage student only, not {args.stage}")
    targets = target_names(cfg.pseudo.taus, cfg.pseudo.modes)
    if args.target not in targets:
        raise PmlError(f"--target {args.target} is not one of the run's targets ({', '.join(targets)})")
    return Student(args.target)


def cmd_predict(args) -> int:
    from pml_dist.use.predict import predict

    cfg = _config(args, write=False)  # reads a run, writes nothing into it
    try:
        summary = predict(cfg, _use_stage(args, cfg), args.paths, out=args.out, top_k=args.top_k,
                          fmt=args.format, batch_size=args.batch_size)
    except BrokenPipeError:  # `| head`: the reader has what it wanted; no traceback at exit's flush
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    if summary.failed:
        print(f"pml-dist predict: {summary.failed} of {summary.images} images could not be read",
              file=sys.stderr)
        return 1
    return 0


def cmd_export(args) -> int:
    from pml_dist.use.export import export

    cfg = _config(args, write=False)
    print(export(cfg, _use_stage(args, cfg), args.out))
    return 0


COMMANDS = {
    "make-synthetic": cmd_make_synthetic,
    "prepare": cmd_prepare,
    "labels": cmd_labels,
    "train": cmd_train,
    "infer": cmd_infer,
    "merge": cmd_merge,
    "run": cmd_run,
    "cancel": cmd_cancel,
    "job-env": cmd_job_env,
    "status": cmd_status,
    "report": cmd_report,
    "predict": cmd_predict,
    "export": cmd_export,
}
