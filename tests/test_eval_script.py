"""`python -m ldm.eval` as a shell runs it, offline, on a tiny model: a guidance sweep writing images,
metadata.jsonl, metrics.json and the FID-vs-CLIP curve; re-scoring the written folder gives the same
numbers; two CPU processes (torchrun, gloo) give those of one."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tests.eval_tiny import save_tiny_clip
from tests.tiny import REPO

# A cheap feature extractor from the tests: the config group's _target_ swapped (inception_weights unset).
TINY_EXTRACTOR = ["extractor._target_=tests.eval_tiny.TinyFeatures"]
KEYS = ("fid", "kid_mean", "kid_std", "clip_score", "n_images")


def run(*args: str, launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", HYDRA_FULL_ERROR="1", HF_HUB_OFFLINE="1")
    cmd = (launcher or [sys.executable]) + ["-m", "ldm.eval", *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def setup(tiny_sd_folder, tmp_path_factory):
    import ldm

    root = tmp_path_factory.mktemp("eval")
    ldm.load_pipeline(tiny_sd_folder).save(root / "model", format="ldm")
    save_tiny_clip(root / "clip")
    (root / "ref").mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        Image.fromarray(small).resize((72, 72), Image.BICUBIC).save(root / "ref" / f"{i}.png")
    (root / "prompts.txt").write_text("a photo of the digit one\na photo of the digit two\n")
    common = [
        f"ckpt={root / 'model'}", f"prompts={root / 'prompts.txt'}", f"ref={root / 'ref'}", "steps=2",
        f"clip_model={root / 'clip'}", f"cache_dir={root / 'cache'}", "kid_subsets=10", *TINY_EXTRACTOR,
    ]  # fmt: skip
    return root, common


@pytest.mark.slow
def test_guidance_sweep_writes_images_metrics_and_curve(setup):
    root, common = setup
    sweep = root / "sweep"
    proc = run("-m", "guidance_scale=1.5,4", "n=5", "batch_size=2", f"out_dir={sweep}", *common)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert Image.open(sweep / "curve.png").size[0] > 100
    runs = [json.loads((sweep / str(j) / "metrics.json").read_text()) for j in (0, 1)]
    assert [m["guidance_scale"] for m in runs] == [1.5, 4.0]
    m = runs[0]
    assert m["n_images"] == 5 and m["sampler"] == "dpmpp_2m" and m["steps"] == 2 and m["seed"] == 0
    assert m["image_size"] == 64 and "BICUBIC" in m["resize_filter"] and m["kid_subset_size"] == 5
    assert m["extractor"]["target"] == "tests.eval_tiny.TinyFeatures" and m["reference"]["n"] == 8
    assert all(np.isfinite(m[k]) for k in KEYS) and m["fid"] > 0 and m["wall_time_s"] > 0
    assert runs[0]["fid"] != runs[1]["fid"]
    records = [json.loads(x) for x in (sweep / "0" / "metadata.jsonl").read_text().splitlines()]
    assert [r["seed"] for r in records] == [0, 1, 2, 3, 4]
    assert [r["prompt"][-3:] for r in records] == ["one", "two", "one", "two", "one"]
    assert all(Image.open(sweep / "0" / r["file"]).size == (64, 64) for r in records)

    # Scoring the folder sample.py-style gives the same numbers (prompts from its metadata.jsonl).
    proc = run(f"images={sweep / '0'}", f"ref={root / 'ref'}", f"clip_model={root / 'clip'}",
               f"cache_dir={root / 'cache'}", "kid_subsets=10", f"out_dir={root / 'rescored'}",
               *TINY_EXTRACTOR)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = json.loads((root / "rescored" / "metrics.json").read_text())
    assert {k: again[k] for k in KEYS} == {k: m[k] for k in KEYS}
    assert again["reference"]["cached"] is True


@pytest.mark.slow
def test_two_processes_give_the_numbers_of_one(setup):
    root, common = setup
    args = ["n=7", "batch_size=2", "guidance_scale=3", *common]
    one = run(*args, f"out_dir={root / 'one'}")
    assert one.returncode == 0, one.stderr[-3000:]
    # torchrun: accelerate 1.15's `launch --cpu` starts one process unless MPI is set up.
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    two = run(*args, f"out_dir={root / 'two'}", launcher=launcher)
    assert two.returncode == 0, two.stderr[-3000:]
    m1, m2 = (json.loads((root / d / "metrics.json").read_text()) for d in ("one", "two"))
    assert m2["num_processes"] == 2 and m1["num_processes"] == 1
    assert {k: m2[k] for k in KEYS} == {k: m1[k] for k in KEYS}
    assert (root / "one" / "metadata.jsonl").read_text() == (root / "two" / "metadata.jsonl").read_text()
    for i in range(7):
        a, b = (np.asarray(Image.open(root / d / f"{i:05d}.png")) for d in ("one", "two"))
        assert np.array_equal(a, b)
