"""OmegaConf resolvers the configs use (registered once by `register_resolvers`)."""

from __future__ import annotations

import os

from omegaconf import OmegaConf


def wandb_offline() -> bool:
    """wandb runs offline unless an API key is set or WANDB_MODE says online: no run blocks on a login."""
    mode = os.environ.get("WANDB_MODE", "").lower()
    if mode in ("offline", "disabled", "dryrun"):
        return True
    if mode == "online":
        return False
    return not os.environ.get("WANDB_API_KEY")


def asset(name: str) -> str:
    """Path of a file shipped in the package (ldm/assets/NAME), e.g. the digits autoencoder."""
    from pathlib import Path

    return str(Path(__file__).resolve().parents[1] / "assets" / name)


def default_precision(accelerator: str) -> str:
    """bf16 autocast on accelerators, fp32 on the CPU (no bf16 units there: autocast would be slower)."""
    return "32-true" if str(accelerator) == "cpu" else "bf16-mixed"


def first_set(*values):
    """The first argument that is not null (`${ldm.first_set:${out_dir},outputs/...}`): a folder the user
    may give, else a default."""
    return next((v for v in values if v is not None), None)


def register_resolvers() -> None:
    """Make `${ldm.wandb_offline:}` and `${ldm.asset:NAME}` available to Hydra configs; safe to call twice."""
    if not OmegaConf.has_resolver("ldm.wandb_offline"):
        OmegaConf.register_new_resolver("ldm.wandb_offline", wandb_offline)
    if not OmegaConf.has_resolver("ldm.precision"):
        OmegaConf.register_new_resolver("ldm.precision", default_precision)
    if not OmegaConf.has_resolver("ldm.first_set"):
        OmegaConf.register_new_resolver("ldm.first_set", first_set)
    if not OmegaConf.has_resolver("ldm.asset"):
        OmegaConf.register_new_resolver("ldm.asset", asset)
