"""`python sample.py` end to end on a saved tiny pipeline: files, PNG text chunks, metadata, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import pytest
from PIL import Image

from tests.tiny import REPO


def run_sample(*overrides: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", HYDRA_FULL_ERROR="0")
    run_dir = tempfile.mkdtemp(prefix="ldm-sample-")  # Hydra's own run folder, kept out of the repo
    return subprocess.run(
        [sys.executable, str(REPO / "sample.py"), *overrides, f"hydra.run.dir={run_dir}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


@pytest.fixture(scope="module")
def exported(tiny_sd_folder, tmp_path_factory):
    """Our own export format (folder), as a training run would write it."""
    import ldm

    path = tmp_path_factory.mktemp("export") / "model"
    ldm.load_pipeline(tiny_sd_folder).save(path, format="ldm")
    return path


def test_sample_script_writes_images_grid_and_metadata(exported, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of the digit one\n\na photo of the digit two\n")
    out = tmp_path / "out"
    proc = run_sample(
        f"ckpt={exported}", f"prompts_file={prompts}", "n=2", "steps=3", "sampler=euler_a", "seed=40",
        "guidance_scale=3.0", "negative_prompt=blurry", "batch_size=3", f"out_dir={out}",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    one, two = "a photo of the digit one", "a photo of the digit two"
    assert [r["prompt"] for r in records] == [one, one, two, two]
    assert [r["seed"] for r in records] == [40, 41, 42, 43]
    for r in records:
        assert r["sampler"] == "euler_a" and r["steps"] == 3 and r["guidance_scale"] == 3.0
        assert r["negative_prompt"] == "blurry" and (r["height"], r["width"]) == (64, 64)
        img = Image.open(out / r["file"])
        assert img.size == (64, 64)
        chunk = json.loads(img.text["ldm"])
        assert chunk["seed"] == r["seed"] and chunk["prompt"] == r["prompt"]
        assert f"Seed: {r['seed']}" in img.text["parameters"]
    assert Image.open(out / "grid.png").size == (2 * 64, 2 * 64)

    # The same seed through the Python API gives the same image (file for seed 42 = second prompt, first).
    import numpy as np

    import ldm

    again = ldm.load_pipeline(exported)(
        "a photo of the digit two", negative_prompt="blurry", steps=3, sampler="euler_a", seed=42,
        guidance_scale=3.0,
    )[0]  # fmt: skip
    assert np.array_equal(np.asarray(again), np.asarray(Image.open(out / records[2]["file"])))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["ckpt=/nonexistent/model.safetensors", "prompt=x"], "ckpt not found"),
        (["prompt=x", "height=60"], "not a positive multiple of 8"),
        (["prompt=x", "sampler=nonsense"], "euler_a"),  # Hydra lists the sampler configs there are
    ],
    ids=["missing-ckpt", "bad-size", "unknown-sampler"],
)
def test_sample_script_clear_errors(exported, tmp_path, overrides, message):
    args = list(overrides)
    if not any(a.startswith("ckpt=") for a in args):
        args.append(f"ckpt={exported}")
    proc = run_sample(*args, f"out_dir={tmp_path}")
    assert proc.returncode != 0
    assert message in proc.stderr + proc.stdout


@pytest.fixture(scope="module")
def class_run(tmp_path_factory):
    """A class-conditional digits run: `python train.py` for two steps with the digits_class conditioner."""
    from tests.train_utils import FAST, run_train, tiny_autoencoder_file

    root = tmp_path_factory.mktemp("class_run")
    ae = tiny_autoencoder_file(root / "ae.safetensors")
    run_train(
        root / "run", "experiment=digits", f"model.autoencoder.path={ae}", f"paths.data_dir={root / 'data'}",
        *[o for o in FAST if o != "callbacks.sample_grid=null"], "callbacks.sample_grid.every_n_steps=2",
        "callbacks.sample_grid.steps=2", "callbacks.sample_grid.n_per_prompt=1",
        "model/conditioner=digits_class", "model.cond_key=label", "trainer.max_steps=2",
    )  # fmt: skip
    # The run's sample grid draws every class (a class-conditional model has no prompts).
    assert Image.open(root / "run" / "samples" / "step_0000002.png").size == (4 * 32, 3 * 32)
    return root / "run"


def test_sample_script_samples_a_class_conditional_run(class_run, tmp_path):
    import numpy as np

    args = ["n=2", "steps=3", "sampler=euler_a", "seed=5", "guidance_scale=2.0"]
    by_name, by_index = tmp_path / "name", tmp_path / "index"
    proc = run_sample(f"ckpt={class_run}", "label=seven", *args, f"out_dir={by_name}")
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in (by_name / "metadata.jsonl").read_text().splitlines()]
    assert [(r["label"], r["class_name"], r["seed"]) for r in records] == [(7, "seven", 5), (7, "seven", 6)]
    assert all(r["prompt"] is None for r in records)
    assert "class seven" in Image.open(by_name / records[0]["file"]).text["parameters"]
    # The exported folder is the same model: label 7 by index gives the same pixels.
    proc = run_sample(f"ckpt={class_run / 'export'}", "label=7", *args, f"out_dir={by_index}")
    assert proc.returncode == 0, proc.stderr
    for r in records:
        a, b = Image.open(by_name / r["file"]), Image.open(by_index / r["file"])
        assert a.size == (32, 32) and np.array_equal(np.asarray(a), np.asarray(b))


def test_sample_script_class_run_needs_a_label(class_run, tmp_path):
    proc = run_sample(f"ckpt={class_run}", "prompt=a photo of the digit seven", f"out_dir={tmp_path}")
    assert proc.returncode != 0
    assert "class-conditional" in proc.stderr + proc.stdout
