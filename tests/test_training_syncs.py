"""No host read of a device value in the training step (on a GPU each one is a sync that drains the kernel
queue; issue 13), checked through `python train.py` with a callback that records every such read."""

from __future__ import annotations

import json

import pytest

from tests.train_utils import FAST, logged, run_train, tiny_autoencoder_file

pytestmark = pytest.mark.slow


def digits_args(tmp_path) -> list[str]:
    ae = tiny_autoencoder_file(tmp_path / "ae.safetensors")
    return ["experiment=digits", f"model.autoencoder.path={ae}", f"paths.data_dir={tmp_path / 'data'}"]


def dreambooth_args(tmp_path) -> list[str]:
    """digits_dreambooth from a random digits-shaped model: cached latents and contexts, the prior loss."""
    from ldm.data.dreambooth_digits import write_digit_instances
    from tests.test_init_from import system

    start = system().to_pipeline(use_ema=False)
    start.sample_size = 8
    start.save(tmp_path / "start")
    write_digit_instances(tmp_path / "data" / "dreambooth" / "sks_digit", digit=3, n=3)
    return ["experiment=digits_dreambooth", f"model.init_from={tmp_path / 'start'}",
            f"paths.data_dir={tmp_path / 'data'}", f"data.class_root={tmp_path / 'class'}",
            "data.num_class_images=3", "data.class_steps=2"]  # fmt: skip


@pytest.mark.parametrize("args", [digits_args, dreambooth_args], ids=["digits", "dreambooth_cached"])
def test_a_training_step_reads_back_only_the_nonfinite_flags(tmp_path, args):
    """Steps 2..7 of a run with the terminal progress bar, caption dropout and timestep-bucket losses (digits:
    encoders on the fly and EMA; DreamBooth: cached latents and contexts, the prior loss): the one read per
    step is the non-finite guard's (ldm/training/nonfinite.py, documented), plus the logger's own flush
    every `log_every_n_steps` and the bar's loss on the last step."""
    reads_file = tmp_path / "reads.json"
    run_dir = tmp_path / "run"
    run_train(
        run_dir, *args(tmp_path),
        *[o for o in FAST if not o.startswith(("trainer.enable_progress_bar", "trainer.log_every_n_steps"))],
        "trainer.max_steps=8", "trainer.log_every_n_steps=4", "model.log_buckets_every_n_steps=4",
        "callbacks.progress_bar.plain=false", "callbacks.progress_bar.postfix_every_n_seconds=1e9",
        "callbacks.model_checkpoint.every_n_train_steps=100",
        "+callbacks.host_reads._target_=tests.train_utils.HostReads",
        f"+callbacks.host_reads.path={reads_file}",
    )  # fmt: skip
    reads = {int(k): v for k, v in json.loads(reads_file.read_text()).items()}
    # Attributed to the global step at the moment of the read: reads after the last optimizer step count
    # for step 8 (the run's end: the bar's last redraw, the last flush).
    assert set(reads) <= set(range(2, 9)), sorted(reads)
    for step, sites in reads.items():
        guard = [s for s in sites if s.startswith("nonfinite.py")]
        flush = [s for s in sites if "log_metrics" in s]  # Lightning's logger flush, every 4th step
        bar = [s for s in sites if s.startswith("progress.py")]
        assert len(guard) == (step < 8), (step, sites)
        assert not flush or step % 4 == 0, (step, sites)
        assert not bar or step == 8, (step, sites)
        assert len(guard) + len(flush) + len(bar) == len(sites), (step, sites)
    # The timestep-bucket losses still arrive: each range's mean over steps 0-3, then 4-7 (NaN for a range
    # that no sample fell in: 32 samples over 10 ranges).
    buckets = [logged(run_dir, f"train/loss_t{k}00-{k}99") for k in range(10)]
    assert all(buckets), "a timestep range was never logged"
    assert any(v == v for values in buckets for v in values.values())
