"""Learning-rate schedules with linear warm-up, as LambdaLR factories for `_partial_: true` configs.

SD1 trained with 10k steps of linear warm-up to a constant LR (CompVis `LambdaLinearScheduler`); cosine
and linear decay after warm-up are the other common choices (diffusers `get_scheduler`).
"""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

KINDS = ("constant", "cosine", "linear")


def warmup_factor(
    step: int, warmup_steps: int, total_steps: int | None, kind: str, min_ratio: float
) -> float:
    """LR multiplier at `step`: linear from ~0 to 1 over warm-up, then constant / cosine / linear decay to
    `min_ratio` at `total_steps`."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind == "constant" or not total_steps:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if kind == "cosine" else 1.0 - progress
    return min_ratio + (1 - min_ratio) * decay


def warmup_schedule(
    optimizer: Optimizer,
    warmup_steps: int = 0,
    total_steps: int | None = None,
    kind: str = "constant",
    min_ratio: float = 0.0,
) -> LambdaLR:
    """A per-step LambdaLR: linear warm-up over `warmup_steps`, then `kind` (constant, cosine, linear)."""
    if kind not in KINDS:
        raise ValueError(f"lr schedule kind={kind!r}: expected one of {KINDS}")
    if kind != "constant" and not total_steps:
        raise ValueError(f"lr schedule kind={kind!r} needs total_steps (e.g. ${{trainer.max_steps}})")
    return LambdaLR(optimizer, lambda s: warmup_factor(s, warmup_steps, total_steps, kind, min_ratio))
