"""Start-up validation of the composed config (ldm/training/checks.py `check_config`): `python train.py`
with a bad override exits non-zero with one line per problem naming the key and the reason, before the
run folder is announced or anything is loaded or written (no traceback). Several problems of one run are
reported together, so a few runs cover every check."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from ldm.training.checks import ConfigError, check_config
from tests.tiny import REPO


def train_py(tmp_path, *overrides: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("HYDRA_FULL_ERROR", None)
    cmd = [sys.executable, str(REPO / "train.py"), *overrides, f"hydra.run.dir={tmp_path / 'run'}"]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def assert_fails_fast(proc: subprocess.CompletedProcess, tmp_path, *messages: str) -> None:
    assert proc.returncode != 0, proc.stdout[-2000:]
    for message in messages:
        assert message in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "run folder:" not in proc.stdout  # failed before the run started
    assert not (tmp_path / "run" / "config_resolved.yaml").exists()
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_misspelt_key_is_refused_by_hydra_struct_mode(tmp_path):
    """Hydra's struct mode holds for our composed config: a key that is not there is refused."""
    proc = train_py(tmp_path, "model.ucg_rat=0.1")
    assert_fails_fast(proc, tmp_path, "Key 'ucg_rat' is not in struct", "model.ucg_rat")


def test_added_key_and_wrong_type_are_checked_against_the_constructor(tmp_path):
    """`+key=` gets past Hydra; the constructor's signature does not take it. A string for a float."""
    proc = train_py(tmp_path, "+model.ucg_rat=0.1", "model.ucg_rate=abc", "+trainer.max_step=5")
    assert_fails_fast(
        proc,
        tmp_path,
        "invalid config:",
        "model.ucg_rat: LatentDiffusionSystem takes no argument 'ucg_rat' (did you mean ucg_rate?)",
        "model.ucg_rate='abc' (str): LatentDiffusionSystem expects float",
        "trainer.max_step: Trainer takes no argument 'max_step' (did you mean max_steps?)",
    )


def test_model_parts_that_do_not_fit_together(tmp_path):
    proc = train_py(
        tmp_path,
        "data.resolution=30",
        "model.unet.in_channels=3",
        "model.unet.context_dim=64",
        "model.prediction_type=flow",
        "callbacks.sample_grid.sampler=euler_x",
        "malloc=jemalloc",
    )
    assert_fails_fast(
        proc,
        tmp_path,
        "data.resolution=30 is not divisible by the autoencoder's downsampling factor 4",
        "model.unet.in_channels=3, but the autoencoder's latents have 4 channels",
        "model.unet.context_dim=64, but the conditioner's output is 32 wide",
        "model.prediction_type='flow': the samplers take one of",
        "callbacks.sample_grid.sampler='euler_x': unknown sampler 'euler_x'",
        "malloc='jemalloc': must be one of reuse, system",
    )


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["data=webdataset", "data.urls='/nonexistent/shards/{00000..00009}.tar'"],
         "data.urls: '/nonexistent/shards/{00000..00009}.tar' matches no file (10 shard name(s) expanded)"),
        (["data=folder", "data.root=/nonexistent/photos"], "data.root='/nonexistent/photos': no such folder"),
        (["data=webdataset"], "data.urls: missing (???): set it"),
        (["model.autoencoder.path=/nonexistent/ae.safetensors"],
         "model.autoencoder.path='/nonexistent/ae.safetensors': no such file or folder"),
        # The SD recipes without the released weights: stopped before the text encoder tries the hub.
        (["experiment=finetune_sd15", "data.root=."],
         "model.autoencoder.path is null: the autoencoder's weights file or folder is needed"),
        (["experiment=lora_sd15", "data.root=."], "model.init_from is null: LoRA adapts released weights"),
    ],
    ids=["shards_match_nothing", "missing_folder", "missing_value", "missing_autoencoder_file",
         "finetune_without_init_from", "lora_without_init_from"],
)  # fmt: skip
def test_missing_data_and_weights(tmp_path, overrides, message):
    """Through check_config in this process: the tests above show that train.py stops on its ConfigError
    before anything runs, which a `python train.py` per case (~9 s of imports each) would only repeat.
    The config is composed as @hydra.main composes it, its hydra: keys (paths.output_dir) resolvable."""
    from hydra.core.hydra_config import HydraConfig

    from tests.test_configs import composed

    cfg = composed(*overrides, f"hydra.run.dir={tmp_path / 'run'}")
    HydraConfig.instance().set_config(cfg)
    try:
        with pytest.raises(ConfigError) as err:
            check_config(cfg)
    finally:
        HydraConfig.instance().cfg = None  # as after a hydra.main run: no run config left for other tests
    assert message in str(err.value)
