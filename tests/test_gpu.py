"""The GPU tier (`python -m pytest -m gpu`): benchmarks/gpu.py's checks. On CUDA they run at full size; on a
CPU (CI) they run dry (tiny model, 64 px, CPU-capable dtypes), so the code cannot rot between GPU runs."""

import importlib
import sys

import pytest
import torch

from tests.tiny import REPO

# Also slow: a dry run takes about a minute on a 2-core CPU, so CI runs it with the slow tier.
pytestmark = [pytest.mark.gpu, pytest.mark.slow]
CUDA = torch.cuda.is_available()


@pytest.fixture(scope="module")
def gpu():
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        yield importlib.import_module("gpu")
    finally:
        sys.path.remove(str(REPO / "benchmarks"))


@pytest.fixture(scope="module")
def folder(gpu, tmp_path_factory):
    return gpu.save_model(tmp_path_factory.mktemp("gpu"), "tiny")


def test_sdpa_uses_a_fused_kernel(gpu):
    device = "cuda" if CUDA else "cpu"
    for dtype in (torch.float32, torch.bfloat16) + ((torch.float16,) if CUDA else ()):
        found = gpu.sdpa_kernels(device, dtype)
        assert found["fused"] and not found["math_fallback"], (dtype, found["kernels"])


def test_bf16_mixed_training_step(gpu, folder):
    device = "cuda" if CUDA else "cpu"
    out = gpu.train_step(folder, device, torch.bfloat16, batch=2, px=64, repeats=1)
    assert out["finite"] and len(out["losses"]) == 2
    assert out["losses"][0] != out["losses"][1]  # the optimizer stepped (and the batch randomness moved)
    if CUDA:  # step, backward, AdamW: nothing read back to the host (the CPU check: test_training_syncs.py)
        assert out["syncs_per_step"] == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_sampling_close_to_fp32(gpu, folder, dtype):
    if dtype == torch.float16 and not CUDA:
        pytest.skip("fp16 sampling needs CUDA")
    out = gpu.sample(folder, "cuda" if CUDA else "cpu", dtype, px=64, steps=4)
    assert out["finite"]
    assert out["max_diff_vs_fp32"] < 0.05  # images in [0, 1]


def test_unet_mfu_is_measured(gpu):
    if CUDA:
        out = gpu.unet_mfu("sd15", "cuda", torch.bfloat16, batch=8, px=256, repeats=3)
        assert out["forward_flops"] > 1e12  # SD1.5 at 256 px: ~0.2 TFLOP per image forward
    else:
        out = gpu.unet_mfu("tiny", "cpu", torch.float32, batch=2, px=64, repeats=1)
    assert out["step_flops"] > 2 * out["forward_flops"]  # backward: about twice the forward
    assert 0 < out["mfu"] <= 1.2  # measured against a matmul of the same run (some slack for its noise)


def test_compiled_training_step(gpu):
    """model.compile=true: the compiled UNet trains (inductor; a C++ compiler on CPU, Triton on CUDA)."""
    res = gpu.run(["compile"], "tiny", 64, 2, 1, dry=not CUDA)
    eager, compiled = res["compile"]["eager"], res["compile"]["compiled"]
    assert compiled["finite"]
    assert compiled["losses"][0] == pytest.approx(eager["losses"][0], rel=1e-2)  # same weights, batch, noise
