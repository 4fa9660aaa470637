"""The training callback (configs/callbacks/eval_fid.yaml) added to a real `python train.py` run: FID, KID
and CLIP score of the EMA model logged at its step."""

from __future__ import annotations

import pytest

from tests.eval_tiny import save_tiny_clip
from tests.train_utils import FAST, logged, run_train, tiny_autoencoder_file


@pytest.mark.slow
def test_eval_callback_logs_fid_kid_clip(tmp_path):
    ae = tiny_autoencoder_file(tmp_path / "ae.safetensors")
    clip = save_tiny_clip(tmp_path / "clip")
    run = tmp_path / "run"
    run_train(
        run, "experiment=digits", f"model.autoencoder.path={ae}", f"paths.data_dir={tmp_path / 'data'}",
        *FAST,
        "trainer.max_steps=2", "callbacks=[ldm,eval_fid]", "callbacks.sample_grid=null",
        f"callbacks.eval_fid.ref={tmp_path / 'data/digits/32px/val'}",
        'callbacks.eval_fid.prompts=["a photo of the digit one","a photo of the digit two"]',
        "callbacks.eval_fid.extractor._target_=tests.eval_tiny.TinyFeatures",
        "callbacks.eval_fid.extractor.weights=null",
        "callbacks.eval_fid.every_n_steps=2", "callbacks.eval_fid.n=4", "callbacks.eval_fid.steps=2",
        "callbacks.eval_fid.kid_subsets=5", f"callbacks.eval_fid.clip_model={clip}",
        f"callbacks.eval_fid.cache_dir={tmp_path / 'cache'}",
    )  # fmt: skip
    for key in ("eval/fid", "eval/kid_mean", "eval/kid_std", "eval/clip_score"):
        values = logged(run, key)
        assert list(values) == [2], (key, values)
    assert logged(run, "eval/fid")[2] > 0
    assert len(list((tmp_path / "cache").glob("ref_*.npz"))) == 1  # the reference, computed once
