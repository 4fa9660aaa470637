"""The contract of `python train.py` with no arguments (slow: the whole default run, ~7 min on 2 cores):
it finishes, and its model draws the prompted digit most of the time."""

import pytest

from ldm.eval import digits
from tests.train_utils import run_train


@pytest.mark.slow
def test_default_run_draws_the_prompted_digits(tmp_path):
    run = tmp_path / "default"
    run_train(run, timeout=1800)
    assert (run / "checkpoints" / "last.ckpt").is_file() and (run / "export" / "ldm_pipeline.json").is_file()
    result = digits.main([str(run / "export"), "--n", "20"])
    assert result["accuracy"] > 0.8  # measured 0.938 with n=50 (README); chance is 0.1
