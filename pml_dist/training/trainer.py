"""One trainer for every stage (pml_dist.stages): the teacher and the references (single positives
and an SPML loss, or full labels for bce) and the students (pseudo labels, BCE).

Runs as one process or as one of N ranks (torchrun, the deepspeed launcher, srun); the same code
and config either way. It fills the stage's folder (layout.StageFiles): DeepSpeed checkpoints,
metrics.jsonl (rank 0, after a reduction over ranks), derived.json (the global batch, scaled LR and
steps per epoch actually used), best.pt + best.json (the best validation epoch's plain weights),
result.json (written last: its presence means the stage is done), TensorBoard event files
(board.py, rank 0) and one log file per rank. Without a fully labelled validation split the last
epoch is kept instead of the best (selection.py).

Resume: the newest complete checkpoint restores weights, optimizer, scheduler, RNG and `TrainState`
(step, epoch, position inside the epoch, best), so no data is replayed. A stop request (SIGUSR2 /
SIGTERM, e.g. Slurm preemption) only sets a flag (stop.py); all ranks agree on it at the next
optimizer step that logs (every train.log_every: agreeing waits for the GPU) or epoch end, save
together, and raise `Stopped`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
import time
from pathlib import Path

import torch
from torch import nn

from ffcv_data.atomic import save_with, write_json
from ffcv_data.loaders import threads_per_rank, train_loader
from ffcv_data.protocol import one_hot
from pml_dist import dist, provenance
from pml_dist.config import Config, apl_schedule
from pml_dist.errors import USER_ERRORS, PmlError, error_line
from pml_dist.layout import RunLayout, StageFiles
from pml_dist.lock import stage_lock
from pml_dist.log import setup_logging
from pml_dist.stages import Stage
from pml_dist.start_gate import StartGate
from pml_dist.training import checkpoint, engine, selection
from pml_dist.training.board import Board
from pml_dist.training.checkpoint import Checkpointer
from pml_dist.training.environment import environment
from pml_dist.training.evaluate import barrier, evaluate, gather, predict, split_loader, write_rows
from pml_dist.training.losses import LossParams, build_loss, dense_state_problem, param_groups_lr_mult
from pml_dist.training.models import build_model, on_device, param_groups
from pml_dist.training.stop import StopFlag, Stopped
from pml_dist.training.targets import positives_per_image, training_targets

log = logging.getLogger(__name__)


def train(cfg: Config, stage: Stage, stop: StopFlag | None = None) -> dict:
    """Train `stage` to completion (or to a stop request: `Stopped`); returns result.json's content,
    at once when the stage is already done. A rank that fails with a user error leaves its line
    for the others (dist.PeerFailures); a rank whose collective then fails stops with one line,
    `rank R: stopped because rank Q failed: <Q's line>`, instead of gloo's traceback."""
    info = dist.resolve()
    run = RunLayout.of(cfg)
    files = stage.files(run)
    setup_logging(info.rank, files.log(info.rank))
    # One process trains a stage's folder: rank 0 holds its lock (pml_dist/lock.py); a second
    # training of the same stage stops here with one line naming the holder, and so do its other
    # ranks, which wait for rank 0's word before anything (StartGate).
    # Each rank deletes its failure line of an earlier attempt as it passes the gate, and rank 0
    # passes last: from then on a line a rank finds is this run's (PeerFailures).
    peers = dist.PeerFailures(files.log(info.rank).parent, info.rank, info.world_size)
    gate = StartGate(info, cfg.dist.timeout_s)
    with gate.decided_by_rank0(USER_ERRORS, on_go=peers.clear), \
            stage_lock(files.lock, f"stage {files.dir}", take=info.is_main) as lock:
        peers.release = lock.release if lock is not None else None  # before its watch ends this rank
        gate.go()
        done = files.read_result()
        if done is not None and _stale_outputs(files, provenance.training_inputs(run, stage)) is None:
            log.info("%s is already trained (%s exists)", files.dir, files.result)
            return done.raw
        try:
            result = Trainer(cfg, stage, info, stop, gate.store, peers).train()
        except USER_ERRORS as exc:  # the others' next collective fails: they name this line, not gloo
            peers.unwatch()
            peers.publish(str(exc))
            raise
        except RuntimeError as exc:
            peers.unwatch()  # this thread says the line (a collective failed: gloo)
            # past the gate: also when the collective that failed was the rendezvous itself
            met = info.world_size > 1
            found = peers.first() if met and dist.is_collective_failure(exc) else None
            if found is None:
                raise  # a crash, or a peer that crashed: the traceback stands
            raise PmlError(dist.stopped_because(info.rank, *found)) from None
        finally:
            peers.unwatch()
    # On success only: after a failure a pending NCCL collective can make the destroy itself hang.
    dist.destroy_process_group()
    return result


def _stale_outputs(files: StageFiles, inputs: dict) -> str | None:
    """Why what the stage's folder holds (its result, else its newest checkpoint) was made from
    other inputs than `inputs` (provenance.py); None when it was not, or holds nothing."""
    result = files.read_result()
    found = checkpoint.latest(files.ckpt) if result is None else None
    recorded = result.inputs if result is not None else (found[1].get("inputs") if found else None)
    return provenance.stale(recorded, inputs)


@dataclasses.dataclass
class TrainState:
    """Everything the loop itself needs to resume (the engine restores weights, optimizer and LR)."""

    step: int = 0  # optimizer steps taken: the engine's global_steps
    epoch: int = 0  # the epoch being trained; all of them (Trainer.epochs) once done
    epoch_samples: int = 0  # samples all ranks together trained on in `epoch` (the loader skips them)
    best: dict | None = None  # epoch, step and val_map of the best validation epoch so far
    stopped_early: int | None = None  # the epoch after which train.early_stop ended training

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict) -> None:
        self.step, self.epoch = state["step"], state["epoch"]
        self.epoch_samples, self.best = state["epoch_samples"], state["best"]
        self.stopped_early = state.get("stopped_early")  # absent from checkpoints before it existed


class TrainModule(nn.Module):
    """Model and loss in one module, so DeepSpeed averages and optimizes the loss's own parameters
    (ROLE's label matrix) together with the network's."""

    def __init__(self, model: nn.Module, loss: nn.Module):
        super().__init__()
        self.model = model
        self.loss = loss

    def forward(self, images: torch.Tensor, targets: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return self.loss(self.model(images), targets, index)


def build_engine(cfg: Config, model: nn.Module, loss: nn.Module, derived: engine.Derived, device):
    """The DeepSpeed engine that trains `model` with `loss` (bench/bench_dp.py measures this one)."""
    groups = param_groups(model, cfg.optim.weight_decay)
    groups += [{"params": list(p), "weight_decay": 0.0, "lr_mult": m} for p, m in param_groups_lr_mult(loss)]
    return engine.initialize(cfg, TrainModule(model, loss), groups, derived, device)


class Trainer:
    """One stage's training on this rank; the components are built once, here, in this order
    (every rank must reach the same collectives in the same order)."""

    def __init__(self, cfg: Config, stage: Stage, info: dist.RankInfo, stop: StopFlag | None = None,
                 store=None, peers: dist.PeerFailures | None = None):
        self.cfg, self.stage, self.info = cfg, stage, info
        self.store = store  # the launch's rendezvous store (StartGate's), or None for env://
        self.peers = peers  # watched once joined: a peer's failure ends this rank (NCCL would wait)
        self.stop = stop or StopFlag()
        self.run = RunLayout.of(cfg)
        self.files: StageFiles = stage.files(self.run)
        # train() makes it for its log file; a Trainer built directly (tests, tools) must not depend on that
        self.files.dir.mkdir(parents=True, exist_ok=True)
        stats = self.run.data.stats()
        self.num_classes, self.num_train = stats.num_classes, stats.images("train")
        # TensorBoard's per-class tags (prepared data of older versions may lack the names)
        self.class_names = stats.raw.get("category_names") or [str(c) for c in range(self.num_classes)]
        # what the prepared validation split holds decides (config.DataSection.full_validation
        # refused early stopping, sweeps and rounds before anything ran)
        self.selection = selection.model_selection(stats.complete_labels("val"))
        self.loss_name = stage.loss(cfg)
        # LinearInit's head-only epochs come first; epoch numbers count both phases.
        self.linear_epochs = cfg.train.linear_init_epochs
        self.epochs = self.linear_epochs + cfg.train.epochs
        self.early_stop = self.loss_name in cfg.train.early_stop
        self.inputs = provenance.training_inputs(self.run, stage)  # what result.json was made from
        self.derived = engine.derive(cfg, self.num_train, info.world_size)
        self.batch_samples = cfg.train.micro_batch * info.world_size  # all ranks' samples per micro-step
        self.samples_trained = 0  # by this process (a resumed run counts from its restart)
        self.threads = threads_per_rank(cfg.data.loader_workers, info.local_world_size)
        self.device = self._start_process_group()
        targets_source, self.targets_of = training_targets(cfg, self.run, stage, self.num_train, self.device)
        self.autocast = engine.autocast_dtype(cfg, self.device)  # of evaluation (DeepSpeed trains)
        self.environment = environment(info, self.device, self.threads)  # after configure_cuda's flags
        log.info("%s: %s", self.files.dir, dist.rank_summary(
            info, self.device, self.threads, _backend(), [e.split("=")[0] for e in cfg.slurm.env]))
        log.info("targets: %s", targets_source)
        log.info("model selection: %s", self.selection)
        log.info("derived: %s", self.derived.to_dict())

        self.model, self.loss = self._build_model(), self._build_loss()
        self.engine = self._build_engine()
        if self.linear_epochs and self.engine.zero_optimization_stage() > 0:
            raise PmlError(f"train.linear_init_epochs={self.linear_epochs} needs ZeRO stage 0 (frozen "
                           f"parameters under ZeRO's flat partitions are not supported); "
                           f"{cfg.dist.deepspeed_config} sets stage {self.engine.zero_optimization_stage()}")
        self._discard_stale_outputs()
        self.checkpointer = Checkpointer(self.files.ckpt, self.engine, info, cfg.train.keep_last,
                                         inputs=self.inputs, device=self.device)
        self.state = self._resume()
        self.metrics = _MetricsFile(self.files.metrics, info.is_main, self.state.step)
        self.board = Board(self.files.tensorboard, info.is_main, self.state.step)
        if self.state.step == 0:  # once: a resumed run's board already holds it
            self.board.scalar("targets/positives_per_image", positives_per_image(cfg, self.run, stage), 0)
        if info.is_main:
            write_json(self.files.derived, self.derived.to_dict())
        self.loader = self._train_loader()
        self.val_targets = "labels" if cfg.data.val_labels == "full" else "observed"
        self.val_loader = split_loader(cfg, "val", info, self.device, (self.val_targets,))

    # ------------------------------------------------------------------------------ the loop

    def train(self) -> dict:
        """Every epoch left, then the test of the best one; returns result.json's content."""
        try:
            return self._train()
        finally:  # done, stopped or failed: what the board holds reaches its file
            self.board.close()

    def _train(self) -> dict:
        start = time.perf_counter()
        while self.state.epoch < self.epochs and self.state.stopped_early is None:
            self._train_epoch()
            _broadcast_buffers(self.engine.module)
            if getattr(self.loss, "pseudo_labels_due", False):
                self._apl_update()
            improved = self._keep_if_best(self._validate())
            if self.early_stop and not improved and self.state.epoch >= self.linear_epochs:
                self.state.stopped_early = self.state.epoch
                log.info("epoch %d did not improve validation mAP: stopping (train.early_stop)",
                         self.state.epoch)
            self.state.epoch, self.state.epoch_samples = self.state.epoch + 1, 0
            if self.state.epoch == self.linear_epochs > 0:
                self._end_linear_init()
            self._save()
            self.board.flush()
            if self.state.epoch < self.epochs and self.state.stopped_early is None:
                # a request since the last log step: stop at this epoch's checkpoint
                self._stop_if_requested()
        return self._finish(time.perf_counter() - start)

    def _train_epoch(self) -> None:
        """The rest of epoch `state.epoch`: all of it, or what a resumed run had not trained yet."""
        epoch = self.state.epoch
        self._freeze_backbone(epoch < self.linear_epochs)
        self.loader.set_epoch(epoch)
        self.loss.set_epoch(epoch)
        window = _Window()
        with self._progress(f"{self.files.dir.name} epoch {epoch}") as bar:
            for batch in self.loader:
                if self.state.epoch_samples >= self.derived.epoch_samples:
                    break  # the loader's last batches would start an incomplete accumulation cycle
                window.add(self._micro_step(batch), self.batch_samples)
                bar.update(self.batch_samples)
                if self.engine.global_steps > self.state.step:  # this micro-step ended a cycle
                    self.state.step = self.engine.global_steps
                    self._after_optimizer_step(window, bar)

    def _micro_step(self, batch: dict) -> torch.Tensor:
        """Forward and backward; DeepSpeed's step() updates the weights at the end of each
        gradient-accumulation cycle only. Returns the loss as a tensor on the device: reading it
        here (float()) would wait for the GPU at every step; the window reads it every log_every."""
        value = self.engine(batch["image"], self.targets_of(batch), batch["index"])
        self.engine.backward(value)
        self.engine.step()
        self.state.epoch_samples += self.batch_samples
        self.samples_trained += self.batch_samples
        return value.detach()

    def _after_optimizer_step(self, window: _Window, bar) -> None:
        """Log, honour a stop request, checkpoint: only here, where every rank holds the same weights.
        Reading the loss and agreeing on the stop flag both wait for the device, so they happen every
        train.log_every steps only, together; the other steps queue GPU work without a host sync."""
        step = self.state.step
        if step % self.cfg.train.log_every == 0:
            self._log_train(window, bar)
            self._stop_if_requested()
        if self.cfg.train.ckpt_every and step % self.cfg.train.ckpt_every == 0:
            self._save()

    def _stop_if_requested(self) -> None:
        """Collective: when any rank was asked to stop, all save and raise `Stopped`."""
        if self.stop.agreed(self.device):
            self._save()
            raise Stopped(f"stopped at step {self.state.step}; rerun the same command to resume")

    def _log_train(self, window: _Window, bar) -> None:
        # The window's work is queued on the GPU, not done: wait for it (reading the loss does)
        # before taking the time. The loss's reduction over ranks is not training time.
        loss = window.mean_loss
        loss = loss.item() if isinstance(loss, torch.Tensor) else loss
        rate = window.samples_per_s()
        record = {"kind": "train", "step": self.state.step, "epoch": self.state.epoch,
                  "loss": _mean_over_ranks(loss, self.device),
                  "lr": self.engine.get_lr()[0], "samples_per_s": rate}
        self._record(record)
        bar.set_postfix(loss=f"{record['loss']:.4f}")
        window.reset()

    def _record(self, record: dict) -> None:
        """One metrics.jsonl record, and its scalars on the TensorBoard."""
        self.metrics.write(record)
        self.board.record(record)

    def _save(self) -> None:
        best = self.state.best
        self.checkpointer.save(self.state.state_dict(), protect={best["step"]} if best else set())

    # ------------------------------------------------------------------- evaluation and best

    def _apl_update(self) -> None:
        """EM+APL: score the whole training split (observed labels only), identically on every rank,
        and let the loss pseudo-label its next share of unobserved negatives."""
        loader = split_loader(self.cfg, "train", self.info, self.device, ())
        indices, arrays = gather(*predict(self.net, loader, self.device, self.num_classes,
                                          autocast=self.autocast))
        added = self.loss.update_pseudo_labels(torch.from_numpy(arrays["probs"]), torch.from_numpy(indices))
        log.info("EM+APL: %d unobserved labels pseudo-labelled as negatives", added)

    def _validate(self) -> dict:
        val = evaluate(self.net, self.val_loader, self.device, self.num_classes, self.val_targets,
                       autocast=self.autocast)
        epoch, step = self.state.epoch, self.state.step
        left_out = val["classes_without_positives"]
        self._record({"kind": "val", "step": step, "epoch": epoch, "map": val["map"],
                      "targets": val["targets"], "classes_without_positives": left_out})
        log.info("epoch %d step %d: val mAP %.2f (against %s%s)", epoch, step, val["map"],
                 "full labels" if val["targets"] == "labels" else "observed labels",
                 f"; {len(left_out)} of {self.num_classes} classes have no positive there and are left out: "
                 f"{left_out}" if left_out else "")
        return val

    def _keep_if_best(self, val: dict) -> bool:
        """A new best validation epoch (or, without model selection, the latest one): remember it,
        and rank 0 exports its weights (best.pt)."""
        if not selection.keeps(self.selection, val["map"], self.state.best):
            return False
        self.state.best = {"epoch": self.state.epoch, "step": self.state.step, "val_map": val["map"],
                           "val_classes_without_positives": val["classes_without_positives"],
                           "val_ap": val.get("ap")}
        if self.info.is_main:
            _export(self.net, self.files, self.state.best)
        return True

    # ------------------------------------------------------------------------------ LinearInit

    def _freeze_backbone(self, frozen: bool) -> None:
        """LinearInit's first phase trains the head (`fc`) alone: the backbone gets no gradients
        (DeepSpeed then reduces none for it) and keeps its BatchNorm statistics, as Cole et al.'s
        precomputed features do."""
        if not self.linear_epochs:
            return
        for name, p in self.net.named_parameters():
            p.requires_grad_(not frozen or name.startswith("fc."))
        if frozen:
            for name, module in self.net.named_children():
                module.train(name == "fc")

    def _end_linear_init(self) -> None:
        """As Cole et al. fine-tune: from the best head-only epoch's weights, with a fresh optimizer,
        choosing the best epoch among the end-to-end ones only."""
        barrier()  # rank 0's best.pt is complete
        self.net.load_state_dict(torch.load(self.files.best_weights, map_location=self.device,
                                            weights_only=True))
        optimizer = self.engine.optimizer
        getattr(optimizer, "optimizer", optimizer).state.clear()  # Adam's moments and step counts
        log.info("LinearInit: %d head-only epochs done (best epoch %d, val mAP %.2f); training end to end",
                 self.linear_epochs, self.state.best["epoch"], self.state.best["val_map"])
        self.state.best = None

    # ---------------------------------------------------------------------------- the finish

    def _finish(self, seconds: float) -> dict:
        """Test mAP of the best epoch's weights, then result.json (the stage's completion marker)."""
        digests = self._rank_digests()
        test = self._test_best()
        thresholds = self._thresholds()
        result = self._result(test, digests, seconds)
        if self.info.is_main:
            write_json(self.files.thresholds, thresholds)
            write_json(self.files.result, result)
            best = self.state.best
            log.info("%s done: best epoch %d, val mAP %.2f, test mAP %.2f", self.files.dir,
                     best["epoch"], best["val_map"], test["map"])
        barrier()
        return result

    def _rank_digests(self) -> list[str]:
        """Each rank's weight digest: data parallelism must leave them bit-identical."""
        import torch.distributed as tdist

        digests = [_digest(self.net)]
        if tdist.is_initialized() and tdist.get_world_size() > 1:
            digests = [None] * tdist.get_world_size()
            tdist.all_gather_object(digests, _digest(self.net))
        if len(set(digests)) > 1:
            log.warning("ranks hold different weights after training: %s", digests)
        return digests

    def _test_best(self) -> dict:
        barrier()  # best.pt from rank 0 is complete
        self.net.load_state_dict(torch.load(self.files.best_weights, map_location=self.device,
                                            weights_only=True))
        loader = split_loader(self.cfg, "test", self.info, self.device, ("labels",))
        test = evaluate(self.net, loader, self.device, self.num_classes, autocast=self.autocast,
                        keep_logits=True)
        # the report's paired intervals compare models on these (layout.py); every rank writes its rows
        write_rows(self.files.test_logits, test.pop("logits"), test["num_samples"])
        best = self.state.best
        self._record({"kind": "test", "step": best["step"], "epoch": best["epoch"], "map": test["map"],
                      "classes_without_positives": test["classes_without_positives"]})
        if best.get("val_ap"):  # absent from checkpoints of older versions
            self.board.class_ap("val_ap", self.class_names, best["val_ap"], best["step"])
        return test

    def _thresholds(self) -> dict:
        """thresholds.json: each class's decision threshold chosen on the validation split with the
        best epoch's weights (loaded by _test_best): the one maximising the class's F1 there, with
        the F1, precision and recall it gives; a class without a validation positive gets the
        global threshold (metrics.decision_thresholds). One more pass over the validation split."""
        val = evaluate(self.net, self.val_loader, self.device, self.num_classes, self.val_targets,
                       autocast=self.autocast, thresholds=True)
        best = self.state.best
        return {"chosen_on": "val", "against": val["targets"], "best_epoch": best["epoch"],
                "best_step": best["step"], "val_map": val["map"], "rule": "p >= threshold",
                **val["thresholds"]}

    def _result(self, test: dict, digests: list[str], seconds: float) -> dict:
        best, derived, world = self.state.best, self.derived, self.info.world_size
        # samples_trained already counts every rank's samples (the same on each rank)
        samples_per_s = _mean_over_ranks(self.samples_trained, self.device) / max(seconds, 1e-9)
        return {
            "stage": self.stage.kind, "target": self.stage.target, "loss": self.loss_name,
            "best_epoch": best["epoch"], "best_step": best["step"], "val_map": best["val_map"],
            "model_selection": self.selection, "val_ap": best.get("val_ap"),
            "epochs_trained": self.state.epoch, "stopped_early_after_epoch": self.state.stopped_early,
            "linear_init_epochs": self.linear_epochs,
            "test_map": test["map"], "test_ap": test["ap"],
            "test_classes_without_positives": test["classes_without_positives"],
            "val_classes_without_positives": best.get("val_classes_without_positives", []),
            "world_size": world, "global_batch": derived.global_batch, "lr": derived.lr,
            "rank_weight_digests": digests,
            "train_seconds": seconds, "train_samples_per_s": samples_per_s,
            "inputs": self.inputs,
            "environment": self.environment,
        }

    # ------------------------------------------------------------------------------ building

    @property
    def net(self) -> nn.Module:
        """The network inside the engine (what is evaluated and exported)."""
        return self.engine.module.model

    def _start_process_group(self):
        """Threads first (FFCV's and torch's share the cores), then the group; returns the device."""
        torch.set_num_threads(self.threads)
        device = dist.compute_device(self.info, self.cfg.train.device, self.cfg.model.name)
        dist.init_process_group(self.info, self.cfg.dist.timeout_s, device, self.store)
        if self.peers is not None and self.info.world_size > 1:
            self.peers.watch(prefix=error_line("train", ""))
        engine.configure_cuda(device)
        _check_sync_bn(self.cfg, device)
        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        return device

    def _discard_stale_outputs(self) -> None:
        """An input changed since this folder was written (a retrained teacher, new pseudo labels):
        its result and checkpoints belong to another training, so start afresh. Rank 0 deletes,
        every rank waits, and only then does any rank look for a checkpoint."""
        why = _stale_outputs(self.files, self.inputs)
        if why is not None and self.info.is_main:
            log.info("%s is stale (%s): training it anew", self.files.dir, why)
            shutil.rmtree(self.files.ckpt, ignore_errors=True)
            shutil.rmtree(self.files.tensorboard, ignore_errors=True)
            for path in (self.files.result, self.files.best_weights, self.files.best_record,
                         self.files.metrics, self.files.derived, self.files.test_logits,
                         self.files.thresholds):
                path.unlink(missing_ok=True)
        barrier()

    def _resume(self) -> TrainState:
        state = TrainState()
        saved = self.checkpointer.load()
        if saved is not None:
            state.load_state_dict(saved)
        return state

    def _build_model(self) -> nn.Module:
        m = self.cfg.model
        torch.manual_seed(self.cfg.train.seed)  # identical initial weights on every rank
        model = build_model(m.name, self.num_classes, pretrained=m.pretrained, width=m.width, norm=m.norm,
                            sync_bn=m.sync_bn)
        return on_device(model, self.device)

    def _build_loss(self) -> nn.Module:
        if problem := dense_state_problem(self.loss_name, self.num_train, self.num_classes):
            raise PmlError(problem)  # before its N x L state is built
        # Observed positives are training information (ROLE and EM+APL initialise from them),
        # unlike the full labels.
        observed = (one_hot(self.run.data.labels("train").observed, self.num_classes)
                    if self.loss_name in ("role", "em_apl") else None)
        return build_loss(self.loss_name, self.num_classes, self.num_train, _loss_params(self.cfg),
                          seed=self.cfg.train.seed, observed_labels=observed)

    def _build_engine(self):
        return build_engine(self.cfg, self.model, self.loss, self.derived, self.device)

    def _train_loader(self):
        cfg, info = self.cfg, self.info
        return train_loader(
            self.run.data.beton("train"), cfg.train.micro_batch, cfg.data.image_size, rank=info.rank,
            world_size=info.world_size, seed=cfg.train.seed, order=cfg.data.order,
            transform=cfg.data.train_transform, device=self.device, workers=cfg.data.loader_workers,
            local_world_size=info.local_world_size, drop_last=True, start_epoch=self.state.epoch,
            skip_samples=self.state.epoch_samples, jit=cfg.data.jit,
        )

    def _progress(self, desc: str):
        """Rank 0's bar over the epoch's samples (all ranks together)."""
        from tqdm import tqdm

        return tqdm(total=self.derived.epoch_samples, initial=self.state.epoch_samples, desc=desc,
                    unit="img", disable=not self.info.is_main, leave=False, dynamic_ncols=True)


class _Window:
    """Training loss and throughput since the last train record (or since the epoch began).

    The loss is summed where it was computed, without reading it (no host sync); in float64, which
    gives the very sums the float() of each step's float32 loss gave before on CPU."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.loss_sum, self.steps, self.samples, self.start = 0.0, 0, 0, time.perf_counter()

    def add(self, loss: torch.Tensor | float, samples: int) -> None:
        if isinstance(loss, torch.Tensor):
            loss = loss.detach().to(torch.float64)
        self.loss_sum, self.steps, self.samples = self.loss_sum + loss, self.steps + 1, self.samples + samples

    @property
    def mean_loss(self) -> torch.Tensor | float:
        """A 0-d tensor on the loss's device (a float if only floats were added)."""
        return self.loss_sum / self.steps

    def samples_per_s(self) -> float:
        return self.samples / max(time.perf_counter() - self.start, 1e-9)


class _MetricsFile:
    """metrics.jsonl, appended by rank 0. On resume, records after the checkpoint's step (written
    before the interruption) are dropped, so the file reads as if the run had never stopped."""

    def __init__(self, path: Path, enabled: bool, resume_step: int):
        self.path, self.enabled = path, enabled
        if enabled and path.exists():
            kept = [line for line in path.read_text().splitlines()
                    if line and json.loads(line).get("step", 0) <= resume_step]
            path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def _loss_params(cfg: Config) -> LossParams:
    c = cfg.loss
    warmup, num_epochs = apl_schedule(c.apl_warmup_epochs, cfg.train.epochs)
    return LossParams(ls_eps=c.ls_eps, expected_positives=c.expected_positives, em_alpha=c.em_alpha,
                      role_lr_mult=c.role_lr_mult, apl_beta=c.apl_beta,
                      apl_neg_proportion=c.apl_neg_proportion,
                      apl_warmup_epochs=warmup, apl_num_epochs=num_epochs, ll_delta_rel=c.ll_delta_rel)


def _check_sync_bn(cfg: Config, device) -> None:
    if cfg.model.sync_bn and device.type == "cpu":
        raise PmlError("model.sync_bn=true needs GPUs: torch's SyncBatchNorm runs only on CUDA/XPU. On "
                       "CPU every rank gets rank 0's BatchNorm statistics before each evaluation instead")


def _backend() -> str:
    import torch.distributed as tdist

    return str(tdist.get_backend()) if tdist.is_initialized() else "none (one process)"


def _mean_over_ranks(value: float, device) -> float:
    import torch.distributed as tdist

    t = torch.tensor([value], dtype=torch.float64, device=device)
    if tdist.is_initialized():
        tdist.all_reduce(t)
        t /= tdist.get_world_size()
    return float(t.item())


def _broadcast_buffers(model: nn.Module) -> None:
    """DeepSpeed does not synchronise BatchNorm running statistics; give every rank rank 0's (the
    ones its checkpoints hold) so that evaluation shards and saved weights agree across ranks."""
    import torch.distributed as tdist

    if tdist.is_initialized() and tdist.get_world_size() > 1:
        for buffer in model.buffers():
            tdist.broadcast(buffer, src=0)


def _export(model: nn.Module, files: StageFiles, best: dict) -> None:
    """best.pt: the plain fp32 state dict of the network (no DeepSpeed needed to load it)."""
    state = {k: v.detach().float().cpu() if v.is_floating_point() else v.cpu()
             for k, v in model.state_dict().items()}
    save_with(files.best_weights, lambda tmp: torch.save(state, tmp))
    write_json(files.best_record, best)


def _digest(model: nn.Module) -> str:
    h = hashlib.sha256()
    for tensor in model.state_dict().values():
        h.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]
