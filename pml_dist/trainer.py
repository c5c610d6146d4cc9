"""One trainer for the teacher (single positives, an SPML loss) and the students (pseudo labels, BCE).

Runs as one process or as one of N ranks (torchrun, the deepspeed launcher, srun); the same code
and config either way. Per stage directory (`<run>/teacher`, `<run>/students/tau-T`):

    ckpt/step-N/          DeepSpeed checkpoint + rng-rank*.pt + COMPLETE (written last)
    metrics.jsonl         train / val / test records from rank 0 (after a reduction over ranks)
    derived.json          global batch, scaled LR, steps per epoch actually used
    best.pt, best.json    plain fp32 weights of the best validation epoch, for inference
    result.json           final record; its presence means the stage is done
    logs/rank-R.log       one log file per rank

Resume: the newest complete checkpoint restores weights, optimizer, scheduler, step, epoch, RNG and
the position inside the epoch, so no data is replayed. A stop request (SIGUSR2/SIGTERM, e.g. Slurm
preemption) only sets a flag; all ranks agree on it at the next optimizer step, save together, and
exit with `EXIT_STOPPED` so a scheduler can requeue the job.
"""

from __future__ import annotations

import json
import logging
import signal
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pml_dist import checkpoint, layout
from pml_dist.atomic import save_with, write_json
from pml_dist.config import Config
from pml_dist.errors import PmlError

log = logging.getLogger(__name__)
EXIT_STOPPED = 3  # stopped at a checkpoint on request; rerunning resumes


class Stopped(Exception):
    """All ranks saved a checkpoint after a stop request; rerun the same command to resume."""


STAGES = ("teacher", "student", "reference")


def stage_dir(cfg: Config, stage: str, target: str | None = None) -> Path:
    if stage == "teacher":
        return layout.teacher_dir(cfg.run_dir)
    if stage == "reference":
        return layout.reference_dir(cfg.run_dir, target)
    if target is None:
        raise PmlError("--stage student needs --tau or --pseudo")
    return layout.student_dir(cfg.run_dir, target)


class TrainModule(nn.Module):
    """Model and loss in one module, so DeepSpeed averages and optimizes the loss's own parameters
    (ROLE's label matrix) together with the network's."""

    def __init__(self, model: nn.Module, loss: nn.Module):
        super().__init__()
        self.model = model
        self.loss = loss

    def forward(self, images: torch.Tensor, targets: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return self.loss(self.model(images), targets, index)


class StopFlag:
    """Set from a signal handler; read only at step boundaries (never save inside a handler).

    The handlers it replaces (submitit's checkpoint-and-requeue on USR2, for one) are kept and
    called by `hand_over()` once every rank has saved.
    """

    def __init__(self):
        self.requested = False
        self.signum: int | None = None
        self.previous: dict[int, object] = {}

    def install(self, signals=(signal.SIGUSR2, signal.SIGTERM)) -> None:
        for sig in signals:
            self.previous[sig] = signal.getsignal(sig)
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame) -> None:
        self.requested = True
        self.signum = signum

    def hand_over(self) -> None:
        """After the collective save: let the scheduler's own handler act. USR2's comes first
        (submitit checkpoints, requeues on rank 0 and exits; Slurm preempts with SIGTERM then USR2,
        and a rank may have stopped only because another rank was signalled); otherwise the
        received signal's. No-op where those are the default handlers (plain CLI: exit status 3)."""
        for signum in (signal.SIGUSR2, self.signum):
            previous = self.previous.get(signum)
            if callable(previous):
                previous(signum, None)
                return

    def agreed(self, device) -> bool:
        """True on every rank as soon as any rank was asked to stop (one tiny all-reduce)."""
        import torch.distributed as tdist

        flag = torch.tensor([1.0 if self.requested else 0.0], device=device)
        if tdist.is_initialized():
            tdist.all_reduce(flag, op=tdist.ReduceOp.MAX)
        return bool(flag.item())


def _targets(cfg: Config, stage: str, target: str | None, num_train: int):
    """What the loss is trained against: a function of the batch.

    teacher / reference + SPML loss: the single observed positive (the loader carries nothing else);
    teacher / reference + bce: the full labels (the upper bound), read by index from the meta file;
    student: its pseudo labels (`target`: tau-T, soft or class_prior), read by index.
    """
    loss = _loss_name(cfg, stage, target)
    if stage != "student" and loss != "bce":
        return "observed", lambda batch: batch["observed"].float()
    if stage != "student":
        matrix = np.load(cfg.data_dir / "train.meta.npz")["labels"]
        source = "full labels (loss.name=bce: the full-label upper bound)"
    else:
        path = layout.target_labels(cfg.run_dir, target)
        if not path.is_file():
            raise PmlError(f"no pseudo labels at {path} (run `pml-dist merge` first)")
        matrix = np.load(path)
        source = f"pseudo labels {path}"
    if matrix.shape[0] != num_train:
        raise PmlError(f"{source}: {matrix.shape[0]} rows, but the training split has {num_train}")
    table = torch.from_numpy(np.asarray(matrix, dtype=np.float32))
    return source, lambda batch: table[batch["index"].cpu()].to(batch["image"].device)


def _loss_name(cfg: Config, stage: str, target: str | None) -> str:
    """teacher: loss.name; reference: its own loss (the target); student: always full BCE."""
    return {"teacher": cfg.loss.name, "reference": target, "student": "bce"}[stage]


class _Metrics:
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


def train(cfg: Config, stage: str, target: str | None = None, stop: StopFlag | None = None) -> dict:
    """Train one stage to completion (or to a stop request); returns result.json's content.
    target: the student's pseudo-label set (layout.tau_name(tau), 'soft' or 'class_prior')."""
    from ffcv_data.loaders import threads_per_rank, train_loader
    from ffcv_data.prepare import beton_path
    from pml_dist import dist, engine
    from pml_dist.evaluate import evaluate, split_loader
    from pml_dist.log import setup_logging
    from pml_dist.losses import build_loss, param_groups_lr_mult
    from pml_dist.models import build_model, param_groups

    out = stage_dir(cfg, stage, target)
    info = dist.resolve()
    setup_logging(info.rank, out / "logs" / f"rank-{info.rank}.log")
    if (out / "result.json").is_file():
        log.info("%s is already trained (%s exists)", out, out / "result.json")
        return json.loads((out / "result.json").read_text())
    stats_file = cfg.data_dir / "stats.json"
    if not stats_file.is_file():
        raise PmlError(f"no {stats_file} (run `pml-dist prepare` first)")
    stats = json.loads(stats_file.read_text())
    num_classes, num_train = stats["num_classes"], stats["splits"]["train"]["images"]
    derived = engine.derive(cfg, num_train, info.world_size)
    threads = threads_per_rank(cfg.data.loader_workers, info.local_world_size)
    torch.set_num_threads(threads)
    device = dist.init_process_group(info, cfg.dist.timeout_s)
    if cfg.model.sync_bn and device.type == "cpu":
        raise PmlError("model.sync_bn=true needs GPUs: torch's SyncBatchNorm runs only on CUDA/XPU. On "
                       "CPU every rank gets rank 0's BatchNorm statistics before each evaluation instead")
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    target_source, targets_of = _targets(cfg, stage, target, num_train)
    log.info("%s: rank %d/%d (%s) on %s, %d threads; targets: %s", out, info.rank, info.world_size,
             info.source, device, threads, target_source)
    log.info("derived: %s", derived.to_dict())

    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    model = build_model(cfg.model.name, num_classes, pretrained=cfg.model.pretrained,
                        width=cfg.model.width, norm=cfg.model.norm, sync_bn=cfg.model.sync_bn)
    # Students always train with full BCE on their pseudo labels; observed positives are training
    # information (ROLE and EM+APL initialise from them), unlike the full labels.
    loss_name = _loss_name(cfg, stage, target)
    observed = (np.load(cfg.data_dir / "train.meta.npz")["observed"]
                if loss_name in ("role", "em_apl") else None)
    loss = build_loss(loss_name, num_classes, num_train, _loss_params(cfg), seed=cfg.train.seed,
                      observed_labels=observed)
    groups = param_groups(model, cfg.optim.weight_decay)
    groups += [{"params": list(p), "weight_decay": 0.0, "lr_mult": m} for p, m in param_groups_lr_mult(loss)]
    ds_engine = engine.initialize(cfg, TrainModule(model, loss), groups, derived, device)

    ckpt_root = out / "ckpt"
    state = _resume(ds_engine, ckpt_root, info, cfg)
    metrics = _Metrics(out / "metrics.jsonl", info.is_main, state["step"])
    if info.is_main:
        write_json(out / "derived.json", derived.to_dict())

    loader = train_loader(
        beton_path(cfg, "train"), cfg.train.micro_batch, cfg.data.image_size, rank=info.rank,
        world_size=info.world_size, seed=cfg.train.seed, order=cfg.data.order, augment=cfg.data.augment,
        device=device, workers=cfg.data.loader_workers, local_world_size=info.local_world_size,
        drop_last=True, start_epoch=state["epoch"], skip_samples=state["epoch_samples"], jit=cfg.data.jit,
    )
    val_targets = "labels" if cfg.data.val_labels == "full" else "observed"
    val_loader = split_loader(cfg, "val", info, device, with_labels=val_targets == "labels")
    stop = stop or StopFlag()
    best = state["best"]
    t_start = time.perf_counter()
    samples_trained = 0

    def save(epoch: int, epoch_samples: int) -> None:
        _save(ds_engine, ckpt_root, info, cfg, epoch, epoch_samples, best)

    for epoch in range(state["epoch"], cfg.train.epochs):
        loader.set_epoch(epoch)
        loss.set_epoch(epoch)
        per_step_samples = cfg.train.micro_batch * info.world_size
        done = state["epoch_samples"] // per_step_samples if epoch == state["epoch"] else 0
        running, count, t_log = 0.0, 0, time.perf_counter()
        progress = _progress(info, derived.micro_steps_per_epoch, done, f"{out.name} epoch {epoch}")
        for batch in loader:
            if done >= derived.micro_steps_per_epoch:
                break
            value = ds_engine(batch["image"], targets_of(batch), batch["index"])
            ds_engine.backward(value)
            ds_engine.step()
            done += 1
            samples_trained += per_step_samples
            running, count = running + float(value.detach()), count + 1
            progress.update(1)
            if done % cfg.train.grad_accum:
                continue
            step = ds_engine.global_steps
            if step % cfg.train.log_every == 0:
                elapsed = time.perf_counter() - t_log
                record = {"kind": "train", "step": step, "epoch": epoch,
                          "loss": _mean_over_ranks(running / count, device),
                          "lr": ds_engine.get_lr()[0],
                          "samples_per_s": count * per_step_samples / max(elapsed, 1e-9)}
                metrics.write(record)
                progress.set_postfix(loss=f"{record['loss']:.4f}")
                running, count, t_log = 0.0, 0, time.perf_counter()
            if stop.agreed(device):
                save(epoch, done * per_step_samples)
                progress.close()
                raise Stopped(f"stopped at step {step}; rerun the same command to resume")
            if cfg.train.ckpt_every and step % cfg.train.ckpt_every == 0:
                save(epoch, done * per_step_samples)
        progress.close()

        _broadcast_buffers(ds_engine.module)
        if getattr(loss, "pseudo_labels_due", False):
            _apl_update(loss, ds_engine.module.model, cfg, info, device, num_classes)
        val = evaluate(ds_engine.module.model, val_loader, device, num_classes, val_targets)
        step = ds_engine.global_steps
        metrics.write({"kind": "val", "step": step, "epoch": epoch, "map": val["map"],
                       "targets": val["targets"]})
        log.info("epoch %d step %d: val mAP %.2f (against %s)", epoch, step, val["map"],
                 "full labels" if val["targets"] == "labels" else "observed labels")
        if best is None or val["map"] > best["val_map"]:
            best = {"epoch": epoch, "step": step, "val_map": val["map"]}
            if info.is_main:
                _export(ds_engine.module.model, out, best)
        save(epoch + 1, 0)

    return _finish(cfg, out, info, device, ds_engine.module.model, num_classes, best, metrics,
                   stage, target, derived, time.perf_counter() - t_start, samples_trained)


def _apl_update(loss, model, cfg: Config, info, device, num_classes: int) -> None:
    """EM+APL: score the whole training split (observed labels only), identically on every rank,
    and let the loss pseudo-label its next share of unobserved negatives."""
    from pml_dist.evaluate import gather, predict, split_loader

    loader = split_loader(cfg, "train", info, device, with_labels=False)
    indices, arrays = gather(*predict(model, loader, device, num_classes))
    added = loss.update_pseudo_labels(torch.from_numpy(arrays["probs"]), torch.from_numpy(indices))
    log.info("EM+APL: %d unobserved labels pseudo-labelled as negatives", added)


def _loss_params(cfg: Config):
    from pml_dist.losses import LossParams

    c = cfg.loss
    return LossParams(ls_eps=c.ls_eps, expected_positives=c.expected_positives, em_alpha=c.em_alpha,
                      role_lr_mult=c.role_lr_mult, apl_beta=c.apl_beta,
                      apl_neg_proportion=c.apl_neg_proportion,
                      apl_warmup_epochs=min(c.apl_warmup_epochs, max(1, cfg.train.epochs - 1)),
                      apl_num_epochs=max(cfg.train.epochs, 2))


def _progress(info, total: int, initial: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, disable=not info.is_main, leave=False,
                dynamic_ncols=True)


def _save(ds_engine, ckpt_root: Path, info, cfg: Config, epoch: int, epoch_samples: int, best) -> None:
    """Collective: every rank writes its part, then rank 0 marks the checkpoint complete."""
    import torch.distributed as tdist

    step = ds_engine.global_steps
    client = {"epoch": epoch, "epoch_samples": epoch_samples, "best": best}
    ds_engine.save_checkpoint(str(ckpt_root), tag=checkpoint.tag(step), client_state=client)
    torch.save({"torch": torch.get_rng_state(), "numpy": np.random.get_state()},
               ckpt_root / checkpoint.tag(step) / f"rng-rank{info.rank}.pt")
    if tdist.is_initialized():
        tdist.barrier()
    if info.is_main:
        zero = ds_engine.zero_optimization_stage()
        checkpoint.write_marker(ckpt_root, step, {"epoch": epoch, "epoch_samples": epoch_samples,
                                                  "world_size": info.world_size, "zero_stage": zero})
        protect = {best["step"]} if best else set()
        checkpoint.prune(ckpt_root, cfg.train.keep_last, protect)
    if tdist.is_initialized():
        tdist.barrier()


def _resume(ds_engine, ckpt_root: Path, info, cfg: Config) -> dict:
    fresh = {"step": 0, "epoch": 0, "epoch_samples": 0, "best": None}
    found = checkpoint.latest(ckpt_root)
    if found is None:
        return fresh
    step, marker = found
    if marker["world_size"] != info.world_size and marker["zero_stage"] > 0:
        folder = ckpt_root / checkpoint.tag(step)
        raise PmlError(
            f"{folder}: a ZeRO-{marker['zero_stage']} checkpoint from {marker['world_size']} ranks "
            f"cannot load on {info.world_size}. Convert it with `python -m "
            f"deepspeed.checkpoint.ds_to_universal --input_folder {folder} --output_folder "
            f"{folder}_universal --inject_missing_state`, or resume with {marker['world_size']} ranks"
        )
    _, client = ds_engine.load_checkpoint(str(ckpt_root), tag=checkpoint.tag(step))
    rng_file = ckpt_root / checkpoint.tag(step) / f"rng-rank{info.rank}.pt"
    if rng_file.is_file():
        rng = torch.load(rng_file, weights_only=False)
        torch.set_rng_state(rng["torch"])
        np.random.set_state(rng["numpy"])
    log.info("resumed from %s (epoch %d, %d samples into it)", ckpt_root / checkpoint.tag(step),
             client["epoch"], client["epoch_samples"])
    return {"step": step, "epoch": client["epoch"], "epoch_samples": client["epoch_samples"],
            "best": client["best"]}


def _export(model: nn.Module, out: Path, best: dict) -> None:
    """best.pt: the plain fp32 state dict of the network (no DeepSpeed needed to load it)."""
    state = {k: v.detach().float().cpu() if v.is_floating_point() else v.cpu()
             for k, v in model.state_dict().items()}
    save_with(out / "best.pt", lambda tmp: torch.save(state, tmp))
    write_json(out / "best.json", best)


def _digest(model: nn.Module) -> str:
    import hashlib

    h = hashlib.sha256()
    for tensor in model.state_dict().values():
        h.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _finish(cfg, out, info, device, model, num_classes, best, metrics, stage, target, derived,
            seconds, samples) -> dict:
    """Test mAP of the best epoch's weights, then result.json (the stage's completion marker)."""
    import torch.distributed as tdist

    from pml_dist.evaluate import evaluate, split_loader

    # Data parallelism must leave every rank with bit-identical weights; record each rank's digest.
    digests = [_digest(model)]
    if tdist.is_initialized() and tdist.get_world_size() > 1:
        digests = [None] * tdist.get_world_size()
        tdist.all_gather_object(digests, _digest(model))
    if len(set(digests)) > 1:
        log.warning("ranks hold different weights after training: %s", digests)
    if tdist.is_initialized():
        tdist.barrier()  # best.pt from rank 0 is complete
    model.load_state_dict(torch.load(out / "best.pt", map_location=device, weights_only=True))
    test = evaluate(model, split_loader(cfg, "test", info, device), device, num_classes)
    metrics.write({"kind": "test", "step": best["step"], "epoch": best["epoch"], "map": test["map"]})
    result = {
        "stage": stage, "target": target, "loss": _loss_name(cfg, stage, target),
        "best_epoch": best["epoch"], "best_step": best["step"], "val_map": best["val_map"],
        "test_map": test["map"], "test_ap": test["ap"],
        "test_classes_without_positives": test["classes_without_positives"],
        "world_size": info.world_size, "global_batch": derived.global_batch, "lr": derived.lr,
        "rank_weight_digests": digests,
        "train_seconds": seconds, "train_samples_per_s": _mean_over_ranks(samples, device) *
        info.world_size / max(seconds, 1e-9),
    }
    if info.is_main:
        write_json(out / "result.json", result)
        log.info("%s done: best epoch %d, val mAP %.2f, test mAP %.2f", out, best["epoch"],
                 best["val_map"], test["map"])
    if tdist.is_initialized():
        tdist.barrier()
    return result
