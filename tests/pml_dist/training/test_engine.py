"""The generated DeepSpeed config, the optimizer and the CUDA settings: pure functions, checked on CPU
(on_gpu=True only builds the dict a GPU run would hand DeepSpeed)."""

from __future__ import annotations

import pytest
import torch

from pml_dist.config import REPO_ROOT, load_config
from pml_dist.errors import ConfigError
from pml_dist.training import engine
from pml_dist.training.models import build_model, param_groups

LARGE = REPO_ROOT / "configs" / "coco2014_r50_largebatch.yaml"


def generated(zero: int, on_gpu: bool, *overrides: str) -> dict:
    cfg = load_config(None, [f"dist.deepspeed_config=configs/deepspeed/zero{zero}.json", *overrides])
    return engine.deepspeed_config(cfg, engine.derive(cfg, 1000, 2), on_gpu)


@pytest.mark.parametrize("zero", [0, 1, 2])
def test_bf16_autocast_reduces_gradients_in_fp32_at_every_zero_stage(zero):
    """DeepSpeed tags the parameters of its "lower precision safe" modules (Conv, Linear by default)
    comm_dtype=bf16, which ZeRO-1/2 follow and ZeRO-0 does not: the generated config lists no such
    module and states fp32, so every stage reduces in fp32."""
    ds = generated(zero, True, "dist.precision=bf16")
    assert ds["torch_autocast"] == {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
    assert ds["communication_data_type"] == "fp32"
    assert ds["zero_optimization"]["stage"] == zero

    # ... and DeepSpeed 0.19.8 reads it so: its own parsers, and its tagging of a real ResNet
    from deepspeed.runtime import config as ds_config
    from deepspeed.runtime import torch_autocast

    assert ds_config.get_torch_autocast_enabled(ds) and ds_config.get_lower_precision_safe_modules(ds) == []
    assert ds_config.get_communication_data_type(ds) == torch.float32
    model = build_model("small_resnet", 5, width=8)
    stub = type("Engine", (), {"module": model, "zero_quantized_weights": lambda self: False})()
    saved = torch_autocast.TORCH_AUTOCAST_INITIALIZED, torch_autocast.TORCH_AUTOCAST_DTYPE
    try:  # module globals of DeepSpeed: restored, so nothing else in this process sees them
        safe = ds["torch_autocast"]["lower_precision_safe_modules"]
        torch_autocast.init_autocast_params(stub, torch.bfloat16, safe)
        assert torch_autocast.get_all_comm_dtypes(model.parameters()) == {torch.float32}
    finally:
        torch_autocast.TORCH_AUTOCAST_INITIALIZED, torch_autocast.TORCH_AUTOCAST_DTYPE = saved


@pytest.mark.parametrize("zero", [0, 1, 2])
def test_fp32_and_the_cpu_reduce_in_fp32_without_autocast(zero):
    for on_gpu, overrides in ((True, ["dist.precision=fp32"]), (False, [])):
        ds = generated(zero, on_gpu, *overrides)
        assert "torch_autocast" not in ds and ds["communication_data_type"] == "fp32"


def test_auto_precision_is_bf16_on_gpu_fp32_on_cpu():
    assert "torch_autocast" in generated(0, True)
    assert "torch_autocast" not in generated(0, False)
    with pytest.raises(ConfigError, match="dist.precision=bf16 on CPU"):
        generated(0, False, "dist.precision=bf16")


def test_the_json_presets_cannot_set_precision_or_reduction(tmp_path):
    preset = tmp_path / "ds.json"
    for key in ('"torch_autocast": {"enabled": true}', '"communication_data_type": "bf16"'):
        preset.write_text('{"zero_optimization": {"stage": 1}, ' + key + "}")
        with pytest.raises(ConfigError, match="is set by the experiment config"):
            generated(0, True, f"dist.deepspeed_config={preset}")


@pytest.mark.parametrize("zero", [1, 2])
def test_gpu_zero_stages_overlap_bucketed_reduction_with_backward(zero):
    ds = generated(zero, True)
    z = ds["zero_optimization"]
    assert z["overlap_comm"] is True and z["contiguous_gradients"] is True
    # several buckets per ResNet-50 backward (25.6 M parameters), one all-gather after the step
    assert z["reduce_bucket_size"] < 25_600_000 <= z["allgather_bucket_size"]
    assert ds["timers"] == {"throughput": {"enabled": False, "synchronized": False}}


def test_cpu_config_is_unchanged_and_zero0_gets_no_bucket_settings():
    for zero in (0, 1, 2):
        ds = generated(zero, False)
        assert ds["zero_optimization"] == {"stage": zero} and "timers" not in ds
    gpu0 = generated(0, True)
    assert gpu0["zero_optimization"] == {"stage": 0}  # ZeRO-0 reduces after backward, unbucketed
    assert gpu0["timers"]["throughput"]["enabled"] is False  # its per-step device syncs


def test_a_preset_keeps_its_own_bucket_sizes(tmp_path):
    preset = tmp_path / "ds.json"
    preset.write_text('{"zero_optimization": {"stage": 2, "overlap_comm": false, '
                      '"reduce_bucket_size": 1000}}')
    z = generated(0, True, f"dist.deepspeed_config={preset}")["zero_optimization"]
    assert (z["overlap_comm"], z["reduce_bucket_size"], z["contiguous_gradients"]) == (False, 1000, True)


def test_the_large_batch_preset_runs_zero1_bf16_with_fp32_reduction():
    cfg = load_config(LARGE)
    ds = engine.deepspeed_config(cfg, engine.derive(cfg, 65_000, 16), on_gpu=True)
    assert ds["zero_optimization"]["stage"] == 1 and ds["zero_optimization"]["overlap_comm"]
    assert ds["torch_autocast"]["lower_precision_safe_modules"] == []
    assert ds["communication_data_type"] == "fp32"


def test_autocast_of_evaluation_follows_the_training_precision():
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")  # a device object needs no GPU
    auto, fp32, bf16 = (load_config(None, [f"dist.precision={p}"]) for p in ("auto", "fp32", "bf16"))
    assert engine.autocast_dtype(auto, cuda) is torch.bfloat16
    assert engine.autocast_dtype(bf16, cuda) is torch.bfloat16
    assert engine.autocast_dtype(fp32, cuda) is None
    assert engine.autocast_dtype(auto, cpu) is None and engine.autocast_dtype(bf16, cpu) is None


def test_fused_adam_on_gpu_only():
    cfg = load_config(None, [])
    model = build_model("small_resnet", 5, width=8)
    assert engine.build_optimizer(cfg, param_groups(model, 0.0), 1e-3, on_gpu=True).defaults["fused"] is True
    assert not engine.build_optimizer(cfg, param_groups(model, 0.0), 1e-3).defaults.get("fused")
    adamw = load_config(None, ["optim.name=adamw"])
    assert engine.build_optimizer(adamw, param_groups(model, 0.0), 1e-3, on_gpu=True).defaults["fused"]


def test_cuda_settings_leave_the_cpu_alone(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    before = torch.get_float32_matmul_precision()
    engine.configure_cuda(torch.device("cpu"))
    assert torch.backends.cudnn.benchmark is False and torch.get_float32_matmul_precision() == before
