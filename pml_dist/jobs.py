"""The pipeline's stages as submitit job callables (picklable classes holding only the path of the
run's resolved config, so a login node pickles them in microseconds, and editing a preset after
submission cannot change a queued job).

Every stage is idempotent on its run directory: prepare skips complete .beton files, training
resumes from its newest checkpoint and returns at once when result.json exists, inference skips
complete shards. `checkpoint()` therefore only resubmits a fresh instance pointing at the same run
directory; it saves nothing (the trainer saves at the next step boundary, see trainer.StopFlag).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class StageJob:
    resolved: str  # <run>/config.yaml, written at submission

    def config(self):
        from pml_dist.config import load_config

        return load_config(self.resolved)

    def checkpoint(self, *args, **kwargs):
        import submitit

        # The same arguments again (for an array task, its target): the run directory resumes.
        return submitit.helpers.DelayedSubmission(type(self)(**self.__dict__), *args, **kwargs)

    def _setup(self) -> None:
        import faulthandler

        from pml_dist import dist
        from pml_dist.log import setup_logging

        try:  # a crash in native code (torch, numba) still prints the Python stack
            faulthandler.enable()
        except (OSError, ValueError, AttributeError):  # stderr is not a real file (e.g. captured)
            pass
        info = dist.export_submitit_env()
        setup_logging(info.rank if info else 0)


@dataclass
class PrepareJob(StageJob):
    def __call__(self) -> str:
        from ffcv_data.prepare import prepare

        self._setup()
        cfg = self.config()
        prepare(cfg)
        return str(cfg.data_dir / "stats.json")


@dataclass
class TrainJob(StageJob):
    stage: str = "teacher"
    target: str | None = None

    def __call__(self, target: str | None = None):
        """`target` comes from map_array for the students; a fixed one from the constructor."""
        from pml_dist.trainer import StopFlag, Stopped, train

        self._setup()
        target = target if target is not None else self.target
        stop = StopFlag()
        stop.install()
        try:
            result = train(self.config(), self.stage, target, stop)
        except Stopped:
            stop.hand_over()  # submitit: requeue (rank 0) now that every rank has saved
            raise
        return {"target": target, "test_map": result["test_map"], "val_map": result["val_map"]}


@dataclass
class InferJob(StageJob):
    def __call__(self) -> str:
        from pml_dist.infer import infer

        self._setup()
        return str(infer(self.config()))


@dataclass
class MergeJob(StageJob):
    def __call__(self) -> dict:
        from pml_dist.merge_job import merge

        self._setup()
        stats = merge(self.config())
        return {name: t["mean_positives_per_image"] for name, t in stats["targets"].items()}


@dataclass
class ReportJob(StageJob):
    def __call__(self) -> str:
        from pml_dist.report import report

        self._setup()
        text, _ = report(self.config())
        return text
