"""Loggers as Lightning ships them, minus what makes them print warnings about their own arguments."""

from __future__ import annotations

from typing import Any

from pytorch_lightning.loggers import WandbLogger as _WandbLogger


class WandbLogger(_WandbLogger):
    """Lightning's WandbLogger without its `anonymous=None` default. Lightning always passes the key to
    `wandb.init` (pytorch_lightning/loggers/wandb.py), and recent wandb (0.31 here) warns whenever it is
    present ("The anonymous setting has no effect", wandb/sdk/wandb_settings.py `validate_anonymous`)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if self._wandb_init.get("anonymous") is None:
            self._wandb_init.pop("anonymous", None)
