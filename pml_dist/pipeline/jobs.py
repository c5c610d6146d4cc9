"""The pipeline's stages as submitit job callables (picklable classes holding only the path of the
run's resolved config, and for training the stage value, so a login node pickles them in
microseconds, and editing a preset after submission cannot change a queued job).

Every stage is idempotent on its run directory: prepare skips complete .beton files, training
resumes from its newest checkpoint and returns at once when it is done, inference skips complete
shards. `checkpoint()` therefore only resubmits a fresh instance pointing at the same run
directory; it saves nothing (the trainer saves at the next step boundary, see training/stop.py).

On Slurm a job's Python starts with SIGTERM and USR2 blocked (executor.py: stop.DEFERRED_START), so
a preemption before any handler is installed waits instead of killing the task (which Slurm would
record FAILED, without a requeue). A training job unblocks them once its StopFlag handles them (a
pending one then stops it at the first step boundary, and submitit requeues it); every other job
once submitit's handlers are in (`_setup`).
"""

from __future__ import annotations

from dataclasses import dataclass

from pml_dist.stages import Stage


@dataclass
class StageJob:
    resolved: str  # <run>/config.yaml, written at submission

    def config(self, resolved: str | None = None):
        from pml_dist.config import load_config

        return load_config(resolved or self.resolved)

    def checkpoint(self, *args, **kwargs):
        import submitit

        # The same arguments again (for an array task, its stage): the run directory resumes.
        return submitit.helpers.DelayedSubmission(type(self)(**self.__dict__), *args, **kwargs)

    def _setup(self) -> None:
        from pml_dist import dist
        from pml_dist.log import enable_crash_traces, setup_logging
        from pml_dist.training.stop import release_stop_signals

        release_stop_signals()  # submitit's handlers are in place (a TrainJob's StopFlag's too)
        enable_crash_traces()
        info = dist.export_submitit_env()
        setup_logging(info.rank if info else 0)


@dataclass
class PrepareJob(StageJob):
    def __call__(self) -> str:
        from pml_dist.data_stage import prepare
        from pml_dist.layout import RunLayout

        self._setup()
        cfg = self.config()
        prepare(cfg)
        return str(RunLayout.of(cfg).data.stats_file)


@dataclass
class TrainJob(StageJob):
    stage: Stage | None = None  # None for a job array: map_array passes each task's stage

    def __call__(self, stage: Stage | None = None, resolved: str | None = None) -> dict:
        """resolved: an array task's own run (a sweep's tasks are one sub-run each)."""
        from pml_dist.training.stop import StopFlag, Stopped
        from pml_dist.training.trainer import train

        stop = StopFlag()
        stop.install()  # first: a stop signal deferred since the job started is a request to it
        self._setup()
        stage = stage if stage is not None else self.stage
        try:
            result = train(self.config(resolved), stage, stop)
        except Stopped:
            stop.hand_over()  # submitit: requeue (rank 0) now that every rank has saved
            raise
        return {"target": stage.target, "test_map": result["test_map"], "val_map": result["val_map"]}


@dataclass
class SelectJob(StageJob):
    """The best point of a stage's sweep grid becomes the stage (pipeline/sweep.py)."""

    stage: Stage | None = None

    def __call__(self) -> dict:
        from pml_dist.pipeline.sweep import select

        self._setup()
        result = select(self.config(), self.stage)
        chosen = result["sweep"]["grid"][result["sweep"]["chosen"]]
        return {"val_map": result["val_map"], "test_map": result["test_map"], "lr": chosen["lr"],
                "micro_batch": chosen["micro_batch"]}


@dataclass
class PromoteJob(StageJob):
    """A self-training round's teacher: the previous round's best student (pipeline/rounds.py)."""

    previous: str = ""  # the previous round's resolved config

    def __call__(self) -> dict:
        from pml_dist.pipeline.rounds import promote

        self._setup()
        result = promote(self.config(), self.config(self.previous))
        return {"val_map": result["val_map"], "test_map": result["test_map"],
                "student": result["round"]["chosen"]}


@dataclass
class InferJob(StageJob):
    def __call__(self) -> str:
        from pml_dist.pseudo.infer import infer

        self._setup()
        return str(infer(self.config()))


@dataclass
class PseudoLabelsJob(StageJob):
    """Merge the inference shards and write every pseudo-label target (`pml-dist merge`)."""

    def __call__(self) -> dict:
        from pml_dist.pseudo.make import make_pseudo_labels

        self._setup()
        stats = make_pseudo_labels(self.config())
        return {name: t["mean_positives_per_image"] for name, t in stats["targets"].items()}


@dataclass
class ReportJob(StageJob):
    def __call__(self) -> str:
        from pml_dist.pipeline.report import report

        self._setup()
        text, _ = report(self.config())
        return text
