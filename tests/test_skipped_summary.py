"""Skipped samples on the console: a real Trainer on shards with broken samples prints, on rank zero, one
line by reason after validation and at the end of training (the counts are also logged as metrics)."""

from collections import Counter

import pytorch_lightning as pl

from ldm.data.webdataset import WebDataModule
from ldm.training.callbacks import SkippedSamples, format_skipped
from tests.test_data_broken import BROKEN, FILTERS, S, write_broken_dataset
from tests.test_diffusion_system import text_system


def test_format_skipped_orders_reasons_by_count():
    counts = Counter(too_small=1, decode_error=2, unsafe=1)
    assert format_skipped(counts) == "4 samples (decode_error 2, too_small 1, unsafe 1)"
    assert format_skipped(Counter(), "training samples") == "0 training samples"


def test_trainer_prints_skipped_samples_by_reason(tmp_path, capsys):
    urls, _ = write_broken_dataset(tmp_path)
    data = WebDataModule(
        urls, val_urls=urls, resolution=S, batch_size=4, num_workers=0, resampled=False,
        shuffle_buffer=0, random_flip=False, filters=FILTERS,
    )  # fmt: skip
    trainer = pl.Trainer(
        accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=1,
        callbacks=[SkippedSamples()],
    )  # fmt: skip
    # The sanity check reads a validation batch first: its skips are not reported, the full pass's are.
    trainer.fit(text_system(), datamodule=data)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("data: skipped")]
    # One pass over the shards skips every broken sample, plus the cut-off third shard (one shard_error and
    # the caption-less fragment of its last sample), in training and again in validation.
    expected = Counter(reason for _, reason in BROKEN.values())
    expected.update(shard_error=1, missing_caption=1)
    n = expected.total()
    assert len(lines) == 2, lines
    after_validation, at_end = lines
    train_line = f"data: skipped {format_skipped(expected, 'training samples')}"
    assert after_validation == f"{train_line}; validation skipped {format_skipped(expected)}"
    assert at_end == train_line
    assert at_end.startswith(f"data: skipped {n} training samples (decode_error 3, ")
    for reason, count in expected.items():
        assert f"{reason} {count}" in at_end
