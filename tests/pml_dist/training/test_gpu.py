"""The trainer on one CUDA GPU (marker gpu; skipped without CUDA): a bf16 autocast step with BatchNorm
and no host syncs, the trainer's own step loop without host syncs, and a single-rank NCCL DeepSpeed
run stopped at a checkpoint and resumed. DeepSpeed runs in its own processes, as the CPU tests run
it (one DeepSpeed accelerator per process: this one may have picked the CPU's)."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ffcv_data.sparse import LabelRows
from pml_dist.cli import main
from pml_dist.config import load_config
from pml_dist.stored_probs import ScoreKeeper, StoredProbs, StoreRule
from pml_dist.training import engine
from pml_dist.training.losses import build_loss
from pml_dist.training.models import build_model, on_device, param_groups
from pml_dist.training.targets import Target, pseudo_lookup
from pml_dist.training.trainer import TrainModule, _Window

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
              pytest.mark.timeout(300)]
REPO = Path(__file__).resolve().parents[3]
# 150 generated images: 120 train (15 steps of 8 per epoch), 30 validation
BASE = ["data.image_size=32", "data.max_resolution=48", "data.jit=false", "data.loader_workers=2",
        "model.width=8", "train.micro_batch=8", "train.eval_batch=64", "train.keep_last=100",
        "train.device=cuda", "dist.precision=bf16"]


def test_bf16_autocast_step_with_batchnorm_is_finite_and_makes_no_host_sync():
    """The trainer's step as plain torch (model, loss and a student's label table from the project,
    fused Adam, channels_last): three steps under sync debug mode "error", after two warm-up steps
    (cuDNN autotuning, Adam's state)."""
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    engine.configure_cuda(device)
    torch.manual_seed(0)
    n, classes, batch = 64, 20, 16
    model = on_device(build_model("small_resnet", classes, width=16), device)
    module = TrainModule(model, build_loss("bce", classes, n)).to(device)
    optimizer = engine.build_optimizer(load_config(None, ["train.device=cuda"]), param_groups(model, 1e-4),
                                       1e-3, on_gpu=True)
    keeper = ScoreKeeper(classes, StoreRule(0.3, None), "cpu")  # a teacher's kept probabilities
    keeper.add(torch.rand(n, classes), n)
    kept = keeper.arrays()
    stored = StoredProbs(LabelRows(kept["indptr"], kept["classes"], classes), kept["values"], kept["hist"],
                         kept["sums"], StoreRule(0.3, None))
    targets_of = pseudo_lookup(stored, Target("tau-0.5", "hard", 0.5), device)
    channels_last = torch.channels_last  # as the loaders give CUDA batches
    batches = [{"image": torch.randn(batch, 3, 32, 32, device=device).contiguous(memory_format=channels_last),
                "index": torch.randint(0, n, (batch,), device=device, dtype=torch.int32),
                "observed": torch.nn.functional.one_hot(torch.randint(0, classes, (batch,), device=device),
                                                        classes).float()} for _ in range(5)]
    bn = model.stem[1]
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    window = _Window()

    def step(b: dict) -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            value = module(b["image"], targets_of(b), b["index"])
        value.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        window.add(value.detach(), batch)

    for b in batches[:2]:
        step(b)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any synchronising CUDA call raises
    try:
        for b in batches[2:]:
            step(b)
    finally:
        torch.cuda.set_sync_debug_mode("default")

    assert math.isfinite(window.mean_loss.item()) and window.steps == 5
    after = model.state_dict()
    assert not torch.equal(after["fc.weight"], before["fc.weight"])
    assert not torch.equal(after["stem.0.weight"], before["stem.0.weight"])
    assert bn.running_mean.dtype == bn.running_var.dtype == bn.weight.dtype == torch.float32
    assert not torch.equal(bn.running_mean, before["stem.1.running_mean"])  # statistics were updated
    assert int(bn.num_batches_tracked) == 5
    assert model.stem[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert optimizer.defaults["fused"] is True
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        features = model.stages(model.stem(batches[0]["image"]))
        assert features.dtype == torch.bfloat16  # autocast really computed in bf16
        assert model(batches[0]["image"]).dtype == torch.float32  # but the head in fp32 (Fp32Head)


# ------------------------------------------------------------------ the project's trainer, NCCL


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    """One rank, as torchrun would start it; none of the test session's CPU settings."""
    drop = ("PML_DIST_DEVICE", "DS_ACCELERATOR", "LOCAL_SIZE")
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("SLURM_")}
    return {**env, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}


def _run_dir(synthetic_root: Path, path: Path, *extra: str) -> list[str]:
    overrides = [f"run.dir={path}", f"data.root={synthetic_root}", *BASE, *extra]
    assert main(["prepare", *overrides]) == 0
    return overrides


def _start(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *args], env=_env(), text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)


def _finish(proc: subprocess.Popen, timeout: float = 240) -> tuple[int, str]:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    return proc.returncode, out


SYNC_SCRIPT = r"""
import json, os, sys, threading, warnings
import torch
import ffcv_data, pml_dist
from pml_dist import dist
from pml_dist.config import load_config
from pml_dist.stages import Teacher
from pml_dist.training.trainer import Trainer

trainer = Trainer(load_config(None, sys.argv[1:]), Teacher(), dist.resolve())
trainer._train_epoch()  # not counted: cuDNN autotuning, first allocations, the loader's first batches
first = trainer.state.step
trainer.state.epoch, trainer.state.epoch_samples = 1, 0
torch.cuda.synchronize()
syncs = []  # (thread, file:line) of each synchronising call: the step loop is the main thread's


def record(message, category, filename, lineno, file=None, line=None):
    if "synchroniz" in str(message):
        syncs.append((threading.current_thread().name, f"{filename}:{lineno}"))


with warnings.catch_warnings():
    warnings.simplefilter("always")
    warnings.showwarning = record  # restored by catch_warnings
    torch.cuda.set_sync_debug_mode("warn")
    try:
        trainer._train_epoch()
    finally:
        torch.cuda.set_sync_debug_mode("default")
ours = tuple(os.path.dirname(p.__file__) + os.sep for p in (pml_dist, ffcv_data))
main = threading.main_thread().name
in_loop = [w for t, w in syncs if t == main and w.startswith(ours)]
others = [f"{t} {w}" for t, w in syncs if t != main or not w.startswith(ours)]
print("RESULT " + json.dumps({"steps": trainer.state.step - first, "device": str(trainer.device),
                               "ours": in_loop, "others": others}))
torch.distributed.destroy_process_group()
"""


def test_the_trainer_step_loop_makes_no_host_sync_of_its_own(synthetic_root, tmp_path):
    """A whole epoch of Trainer._train_epoch (DeepSpeed ZeRO-0, bf16 autocast, FFCV on the GPU) under
    sync debug mode "warn": no synchronising call from pml_dist or ffcv_data in the loop's thread
    (log_every is beyond the epoch, so no log step reads the loss). The others (DeepSpeed's, FFCV's,
    the loading thread's) are counted and printed."""
    overrides = _run_dir(synthetic_root, tmp_path / "run", "train.log_every=1000", "train.epochs=2")
    code, out = _finish(_start("-c", SYNC_SCRIPT, *overrides))
    assert code == 0, out[-4000:]
    result = json.loads(next(line[7:] for line in out.splitlines() if line.startswith("RESULT ")))
    print(f"synchronising calls outside the project in {result['steps']} steps: {result['others']}")
    assert result["device"] == "cuda:0" and result["steps"] == 15
    assert result["ours"] == [], f"host syncs in the step loop: {result['ours']}"


STOP_SCRIPT = r"""
import sys
from pml_dist import dist
from pml_dist.config import load_config
from pml_dist.stages import Teacher
from pml_dist.training.stop import StopFlag, Stopped
from pml_dist.training.trainer import Trainer


class StopAt(StopFlag):
    # a stop request that has arrived by step `at` (as SIGUSR2 would, but at a known step)
    def agreed(self, device):
        self.requested = self.requested or trainer.state.step >= at
        return super().agreed(device)


at = int(sys.argv[1])
trainer = Trainer(load_config(None, sys.argv[2:]), Teacher(), dist.resolve(), StopAt())
try:
    trainer.train()
except Stopped:
    sys.exit(3)
"""


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """The network in the newest (ZeRO-0) checkpoint."""
    ckpt = run_dir / "teacher" / "ckpt"
    step = max(int(p.name[5:]) for p in ckpt.glob("step-*"))
    state = torch.load(ckpt / f"step-{step}" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    return {k[len("model."):]: v.float().cpu() for k, v in state.items()
            if k.startswith("model.") and v.is_floating_point()}


def _losses(run_dir: Path) -> list[tuple[int, float]]:
    lines = (run_dir / "teacher" / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["loss"]) for r in map(json.loads, lines) if r["kind"] == "train"]


def test_nccl_engine_stopped_and_resumed_ends_where_an_uninterrupted_run_does(synthetic_root, tmp_path):
    """One NCCL rank, DeepSpeed ZeRO-0, bf16 autocast, fused Adam: stopped at step 7 (mid-epoch, a
    checkpoint with the GPU's RNG state), resumed by the ordinary command, against an uninterrupted
    run. Tolerance: not bitwise, since cuDNN's autotuned algorithms (cudnn.benchmark) may differ
    between processes and bf16 rounding follows them; the resumed weights must lie within 5% of the
    distance the weights travelled in training from the uninterrupted ones (a lost optimizer state
    or replayed data moves them much further), and each logged loss within 5%."""
    common = ("train.epochs=2", "train.log_every=1", "train.ckpt_every=5")
    whole = _run_dir(synthetic_root, tmp_path / "whole", *common)
    parts = _run_dir(synthetic_root, tmp_path / "parts", *common)
    train = (str(REPO / "launch" / "train.py"), "--stage", "teacher")
    uninterrupted = _start(*train, *whole)  # both at once: one GPU holds them easily
    stopped = _start("-c", STOP_SCRIPT, "7", *parts)
    for proc, expected in ((stopped, 3), (uninterrupted, 0)):
        code, out = _finish(proc)
        assert code == expected, out[-4000:]
    parts_dir, whole_dir = tmp_path / "parts", tmp_path / "whole"
    ckpt = parts_dir / "teacher" / "ckpt"
    assert sorted(int(p.name[5:]) for p in ckpt.glob("step-*")) == [5, 7]
    assert "cuda" in torch.load(ckpt / "step-7" / "rng-rank0.pt", weights_only=False)

    code, out = _finish(_start(*train, *parts))  # the ordinary command resumes
    assert code == 0, out[-4000:]
    assert "resumed from" in out and "step-7" in out

    torch.manual_seed(0)  # the trainer's initial weights (train.seed 0)
    initial = {k: v.float() for k, v in build_model("small_resnet", 20, width=8).state_dict().items()
               if v.is_floating_point()}
    final_whole, final_parts = _weights(whole_dir), _weights(parts_dir)
    assert final_whole.keys() == final_parts.keys() == initial.keys()
    flat = {name: torch.cat([w[k].flatten() for k in sorted(initial)])
            for name, w in (("whole", final_whole), ("parts", final_parts), ("initial", initial))}
    travelled = (flat["whole"] - flat["initial"]).norm()
    gap = (flat["whole"] - flat["parts"]).norm()
    assert travelled > 0
    assert gap <= 0.05 * travelled, f"resumed run is {gap:.4g} from the uninterrupted one ({travelled:.4g})"

    result = json.loads((parts_dir / "teacher" / "result.json").read_text())
    assert result["world_size"] == 1 and math.isfinite(result["test_map"])
    a, b = _losses(whole_dir), _losses(parts_dir)
    assert [s for s, _ in a] == [s for s, _ in b] == list(range(1, 31))
    for (step, x), (_, y) in zip(a, b, strict=True):
        assert y == pytest.approx(x, rel=0.05, abs=1e-3), step


SHARED_GPU_SCRIPT = r"""
import sys, torch
from pml_dist import dist
from pml_dist.errors import PmlError
try:
    dist.init_process_group(dist.resolve(), timeout_s=120, device=torch.device("cuda", 0))
except PmlError as err:
    print("ERROR", err)
    sys.exit(3)
print("no error")
"""


def test_two_ranks_on_one_gpu_are_a_one_line_error_before_nccl(tmp_path):
    """Each of two ranks sees one GPU, the same one: counting cannot tell this from one GPU bound
    per task; the GPUs' UUIDs can, before NCCL would refuse with a traceback."""
    port = str(_free_port())
    procs = []
    for rank in (0, 1):
        env = {**_env(), "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank),
               "LOCAL_WORLD_SIZE": "2", "MASTER_PORT": port, "CUDA_VISIBLE_DEVICES": "0"}
        procs.append(subprocess.Popen([sys.executable, "-c", SHARED_GPU_SCRIPT], env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    outputs = [_finish(p, timeout=180) for p in procs]
    for rc, out in outputs:
        assert rc == 3, out
        assert "ranks 0 and 1 both compute on GPU" in out, out
