"""`python train.py` end to end for latent diffusion: composition, resume, DDP on CPU, wandb offline,
broken shards, and loading the run's checkpoint for sampling."""

from __future__ import annotations

import re

import pytest
import torch

import ldm
from tests.test_data_broken import FILTERS, write_broken_dataset
from tests.train_utils import (
    FAST,
    logged,
    run_train,
    tensorboard_tags,
    tiny_autoencoder_file,
    wandb_history_keys,
)


@pytest.fixture(scope="module")
def common(tmp_path_factory):
    """Overrides shared by the runs: a tiny autoencoder file and a digits shard folder for the module."""
    root = tmp_path_factory.mktemp("train")
    ae = tiny_autoencoder_file(root / "ae.safetensors")
    return ["experiment=digits", f"model.autoencoder.path={ae}", f"paths.data_dir={root / 'data'}", *FAST]


@pytest.mark.slow  # 47 s; tests/test_resume.py's epoch-end resumes compare the same (weights, EMA...) fast
def test_resume_continues_exactly(common, tmp_path):
    """Stop after 3 steps, resume to 6: losses, weights, EMA, optimizer and LR equal an uninterrupted run."""
    fixed = [*common, "model.lr_scheduler.total_steps=6", "model.lr_scheduler.warmup_steps=2",
             "callbacks.model_checkpoint.every_n_train_steps=3"]  # fmt: skip
    full, part = tmp_path / "full", tmp_path / "part"
    run_train(full, *fixed, "trainer.max_steps=6")
    run_train(part, *fixed, "trainer.max_steps=3")
    first = torch.load(part / "checkpoints" / "last.ckpt", weights_only=True)
    assert first["global_step"] == 3
    run_train(part, *fixed, "trainer.max_steps=6", f"ckpt_path={part / 'checkpoints' / 'last.ckpt'}")

    a, b = logged(full, "train/loss"), logged(part, "train/loss")
    assert sorted(a) == sorted(b) == list(range(6))  # CSV steps are 0-based
    for step in range(6):
        assert a[step] == pytest.approx(b[step], rel=1e-6), step
    ca = torch.load(full / "checkpoints" / "last.ckpt", weights_only=True)
    cb = torch.load(part / "checkpoints" / "last.ckpt", weights_only=True)
    assert ca["global_step"] == cb["global_step"] == 6
    for k, v in ca["state_dict"].items():
        torch.testing.assert_close(cb["state_dict"][k], v, rtol=1e-6, atol=1e-7)
    for k, v in ca["ema"]["shadow"].items():
        torch.testing.assert_close(cb["ema"]["shadow"][k], v, rtol=1e-6, atol=1e-7)
    assert ca["ema"]["num_updates"] == cb["ema"]["num_updates"] == 6
    assert ca["lr_schedulers"][0]["last_epoch"] == cb["lr_schedulers"][0]["last_epoch"] == 6
    sa, sb = ca["optimizer_states"][0]["state"], cb["optimizer_states"][0]["state"]
    for i in sa:
        torch.testing.assert_close(sb[i]["exp_avg"], sa[i]["exp_avg"], rtol=1e-6, atol=1e-8)


def test_run_folder_loads_for_sampling(common, tmp_path):
    run = tmp_path / "run"
    run_train(run, *common, "trainer.max_steps=2")
    assert (run / ".hydra" / "config.yaml").is_file() and (run / "checkpoints" / "last.ckpt").is_file()
    args = dict(prompt="a photo of the digit four", steps=3, seed=0, sampler="ddim", output="tensor")
    from_run = ldm.load_pipeline(run)(**args)
    from_export = ldm.load_pipeline(run / "export")(**args)
    assert from_run.shape == (1, 3, 32, 32)
    assert torch.equal(from_run, from_export)
    # The experiment's recommended sampling settings travel with the run and its export.
    from omegaconf import OmegaConf

    from tests.tiny import REPO

    wanted = OmegaConf.to_container(OmegaConf.load(REPO / "configs/model/ldm/digits.yaml").sampling)
    assert ldm.load_pipeline(run).recommended == ldm.load_pipeline(run / "export").recommended == wanted


def test_ddp_two_processes_on_cpu(common, tmp_path):
    """trainer=ddp on the CPU (gloo): both ranks train, on different shards, and one checkpoint is written."""
    run, keys = tmp_path / "ddp", tmp_path / "keys"
    run_train(
        run, *common, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
        "trainer.max_steps=3", "data.num_workers=0",
        "+callbacks.record._target_=tests.train_utils.RecordKeys", f"+callbacks.record.path={keys}",
    )  # fmt: skip
    rank0 = (keys / "rank0.txt").read_text().split()
    rank1 = (keys / "rank1.txt").read_text().split()
    assert len(rank0) == len(rank1) == 3 * 8
    assert not set(rank0) & set(rank1)
    # Keys name their shard (5 digits of shard id): the ranks read disjoint shards.
    assert not {k[:5] for k in rank0} & {k[:5] for k in rank1}
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.ckpt"]


def test_wandb_offline_run_has_loss_lr_and_samples(common, tmp_path):
    run = tmp_path / "wandb_run"
    run_train(
        run, *[o for o in common if o != "callbacks.sample_grid=null"], "logger=wandb", "trainer.max_steps=4",
        "callbacks.sample_grid.every_n_steps=2", "callbacks.sample_grid.steps=2",
        "callbacks.sample_grid.n_per_prompt=1",
    )  # fmt: skip
    offline = list((run / "wandb").glob("offline-run-*"))
    assert len(offline) == 1
    files = offline[0] / "files"
    images = list(files.rglob("samples_*.png"))
    assert images, "the sample grid was not logged"
    keys = wandb_history_keys(next(offline[0].glob("run-*.wandb")))
    assert {"train/loss", "lr-AdamW", "samples/filenames", "train/images_per_sec"} <= keys
    assert (run / "samples" / "step_0000002.png").is_file()


def test_tensorboard_logger_has_loss_lr_and_samples(common, tmp_path):
    run = tmp_path / "tb"
    run_train(
        run, *[o for o in common if o != "callbacks.sample_grid=null"], "logger=tensorboard",
        "trainer.max_steps=2", "callbacks.sample_grid.every_n_steps=2", "callbacks.sample_grid.steps=2",
    )  # fmt: skip
    assert {"train/loss", "lr-AdamW", "samples"} <= tensorboard_tags(run / "tensorboard")


@pytest.mark.slow  # 36 s; tests/test_init_from.py checks the weights, test_digits_dreambooth runs init_from
def test_init_from_a_checkpoint(common, tmp_path):
    """model.init_from takes anything ldm.load_pipeline reads: a run folder's export initializes a new run
    (whose own seed would give other initial weights, so the match below comes from init_from)."""
    first = tmp_path / "first"
    run_train(first, *common, "trainer.max_steps=2")
    second = tmp_path / "second"
    run_train(second, *common, "seed=1", "trainer.max_steps=1", "model.lr_scheduler.warmup_steps=1000000",
              f"model.init_from={first / 'export'}", "model.optimizer.lr=1e-12")  # fmt: skip
    exported = ldm.load_pipeline(first / "export").unet.state_dict()
    trained = torch.load(second / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    for k, v in exported.items():  # one step at a ~0 learning rate: still the initial weights
        torch.testing.assert_close(trained[f"unet.{k}"], v, rtol=1e-4, atol=1e-6)
    third = tmp_path / "third"  # the same seed without init_from: other weights
    run_train(third, *common, "seed=1", "trainer.max_steps=1", "model.optimizer.lr=1e-12")
    own = torch.load(third / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert any(not torch.allclose(own[f"unet.{k}"], v) for k, v in exported.items())


def test_training_on_broken_shards_does_not_stop(common, tmp_path):
    (tmp_path / "shards").mkdir()
    urls, good = write_broken_dataset(tmp_path / "shards")
    filters = [f"data.filters.{k}={v}" for k, v in FILTERS.items() if not isinstance(v, dict)]
    nested = [(k, kk, vv) for k, v in FILTERS.items() if isinstance(v, dict) for kk, vv in v.items()]
    filters += [f"+data.filters.{k}.{kk}={vv}" for k, kk, vv in nested]
    run = tmp_path / "broken"
    proc = run_train(
        run, *common, "data=webdataset", f"data.urls='{urls}'", "data.resolution=24", "model.sample_size=6",
        "data.batch_size=4", "data.num_workers=1", "data.resampled=false", *filters, "trainer.max_steps=6",
    )  # fmt: skip
    # Every pass over the shards skips the 3 undecodable samples (truncated, not_image, empty_bytes) and
    # the run goes on over several passes.
    assert sum(logged(run, "data/skipped_decode_error").values()) >= 3
    assert sum(logged(run, "data/skipped_too_small").values()) >= 1
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 6
    # ... and says so on the console at the end, by reason (callbacks.skipped_samples).
    summary = [line for line in proc.stdout.splitlines() if line.startswith("data: skipped ")]
    assert summary and " training samples (" in summary[-1], proc.stdout[-2000:]
    assert int(re.search(r"decode_error (\d+)", summary[-1]).group(1)) >= 3
