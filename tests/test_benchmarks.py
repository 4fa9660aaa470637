"""Smoke runs of the benchmark scripts as a shell runs them, at tiny sizes: each prints its table with the
load average and writes its JSON (the full-size runs take minutes: README "Performance")."""

import json
import os
import subprocess
import sys

import pytest

from tests.tiny import REPO

pytestmark = pytest.mark.slow

RUNS = {
    "unet_step": ["--sizes", "tiny", "--repeats", "1", "--threads", "1"],
    "roofline": ["--size", "tiny", "--latent", "16", "--repeats", "1", "--matmul", "256", "--diffusers"],
    "sampling": ["--sizes", "tiny", "--steps", "3", "--repeats", "1", "--threads", "1"],
    "train_throughput": "--size tiny --encoders tiny --batch 2 --repeats 1 --threads 1".split(),
    "conv_lowering": "--shapes 640,1280,4 64,64,8 --batches 1 --repeats 1 --threads 1".split(),
    "gpu": ["--dry", "--checks", "sdpa", "mfu"],
}


def run(name: str, tmp_path, *extra: str) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / f"{name}.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    cmd = [sys.executable, f"benchmarks/{name}.py", *RUNS[name], *extra, "--json", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "load average (1 min) before" in proc.stdout and "load average (1 min) after" in proc.stdout
    res = json.loads(out.read_text())
    assert res["other_cores_busy"] >= 0 and res["seconds"] > 0
    return proc, res


def test_unet_step(tmp_path):
    """Also `--malloc reuse` (ldm/utils/malloc.py) for the process that runs both sides."""
    proc, res = run("unet_step", tmp_path, "--malloc", "reuse")
    assert res["args"]["malloc"] == "reuse" and "malloc=reuse" in proc.stdout
    assert "fused_adamw=True" in proc.stdout  # ours steps with the AdamW ldm trains with (CPU fp32: fused)
    (row,) = res["rows"]
    assert row["size"] == "tiny" and row["mode"] == "train step"
    assert row["output_rel_err"] < 1e-5  # the two networks hold the same weights
    assert row["ours_s"] > 0 and row["ratio"] == pytest.approx(row["ours_s"] / row["diffusers_s"])


def test_roofline(tmp_path):
    proc, res = run("roofline", tmp_path)
    assert res["flops"] > 0 and set(res["rows"]) == {"ours", "diffusers"}
    assert "aten.convolution" in res["flops_by_op"]
    assert 0 < res["rows"]["ours"]["fraction_of_peak"] < 2


def test_sampling(tmp_path):
    _, res = run("sampling", tmp_path)
    (row,) = res["rows"]
    assert row["max_pixel_diff"] < 1e-3  # the same images from both pipelines


def test_train_throughput(tmp_path):
    proc, res = run("train_throughput", tmp_path)
    assert set(res["images_per_s"]) == {"ours", "diffusers"}
    assert "| ours |" in proc.stdout and res["peak_rss_gib"] > 0


def test_train_throughput_cached(tmp_path):
    """Ours from cached latents and text embeddings (the latent cache's batch format) against diffusers."""
    proc, res = run("train_throughput", tmp_path, "--cached")
    assert res["args"]["cached"] and "ours (cached latents)" in proc.stdout


def test_conv_lowering(tmp_path):
    """Both ways of a convolution timed per shape; the rule lowers the wide one and not the narrow one."""
    _, res = run("conv_lowering", tmp_path)
    picks = {(r["cin"], r["side"]): r["pick"] for r in res["rows"]}
    assert picks == {(640, 4): "gemm", (64, 8): "onednn"}
    assert all(r["fwd_bwd_ms"]["gemm"] > 0 and r["fwd_ms"]["onednn"] > 0 for r in res["rows"])


def test_gpu_dry_run(tmp_path):
    _, res = run("gpu", tmp_path)
    assert res["dry"] and res["device"] == "cpu"
    assert res["sdpa"]["torch.float32"]["fused"]
    assert res["mfu"]["mfu"] > 0
