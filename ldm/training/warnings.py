"""Silence the messages a run prints that its user can do nothing about, and only those: each filter below
matches one known message by its text and says why it does not apply to this project. Anything else (our
own warnings, a dependency warning about how we call it) still shows."""

from __future__ import annotations

import logging
import warnings


class _DropMessages(logging.Filter):
    def __init__(self, *fragments: str):
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(f in message for f in self.fragments)


def quiet_expected_warnings() -> None:
    """Install the filters (idempotent; call before building the Trainer)."""
    # Lightning >= 2.6 advertises its hosted logger on every Trainer whose loggers do not include it
    # (pytorch_lightning/trainer/connectors/logger_connector/logger_connector.py): an advertisement,
    # not a diagnosis; our loggers are configs/logger/*.
    rank_zero = logging.getLogger("pytorch_lightning.utilities.rank_zero")
    if not any(isinstance(f, _DropMessages) for f in rank_zero.filters):
        rank_zero.addFilter(_DropMessages("litlogger"))
    # Lightning warns when any submodule is in eval mode at the start of fit (loops/fit_loop.py,
    # `_warn_if_modules_in_eval_mode`). Ours are on purpose: the frozen autoencoder and text encoder of
    # LatentDiffusionSystem.train() and the LPIPS network stay in eval (no dropout, frozen norm statistics).
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")
    # Lightning's own pytree helper (pytorch_lightning/utilities/_pytree.py) still builds `LeafSpec()`,
    # which torch >= 2.9 deprecates; it is called on every batch transfer, not from our code.
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    # Lightning >= 2.6 warns at every periodic checkpoint of a manually optimized module that the file
    # holds the weights after the step (callbacks/model_checkpoint.py). That is the state we want: the
    # checkpoint's global_step counts that step, so a resume continues from it (AutoencoderSystem).
    warnings.filterwarnings("ignore", message=r"Using ModelCheckpoint with manual optimization")
    # Lightning's model summary cannot size bf16-mixed parameters and says so (utilities/model_summary/
    # model_summary.py); the summary falls back to 32-bit sizes, which is what mixed precision stores.
    warnings.filterwarnings("ignore", message=r"Precision .* is not supported by the model summary")
    # Lightning warns about any IterableDataset with a __len__ (utilities/data.py), in case workers all
    # read the same data. Ours split shards by rank and worker (ldm/data/streams.py), and __len__ is the
    # configured epoch length.
    warnings.filterwarnings("ignore", message=r"Your `IterableDataset` has `__len__` defined")
