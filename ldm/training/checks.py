"""Start-up checks of a composed run: mistakes that would otherwise surface hours later (or never),
each reported with the config keys involved and the fix."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def check_callbacks_fit_model(callbacks: Iterable[Any], model: Any) -> None:
    """Callbacks that cannot work with this model fail here, not after the training they were meant to
    serve: a checkpoint callback monitoring a metric the model never logs (Lightning's ModelCheckpoint
    looks the key up only at its first validation), or a sample grid on a model that cannot sample.
    Systems list what their validation logs in `val_metrics`; models without that list are not checked."""
    from ldm.training.callbacks import SampleGrid

    logged = getattr(model, "val_metrics", None)
    callbacks = list(callbacks)
    for cb in callbacks:
        monitor = getattr(cb, "monitor", None)
        if logged is not None and monitor and monitor.startswith("val/") and monitor not in logged:
            raise ValueError(
                f"a checkpoint callback monitors {monitor!r}, which {type(model).__name__} does not log "
                f"(its validation logs {', '.join(sorted(logged))}): set `callbacks.<name>.monitor` to one "
                f"of these, or pick the callbacks made for this model (experiments with an autoencoder "
                f"use callbacks=autoencoder)"
            )
    for cb in callbacks:
        if isinstance(cb, SampleGrid) and not hasattr(model, "to_pipeline"):
            raise ValueError(
                f"callbacks.sample_grid draws samples, which {type(model).__name__} cannot: set "
                f"callbacks.sample_grid=null, or callbacks=autoencoder for an autoencoder"
            )


def check_data_fits_model(datamodule: Any, model: Any) -> None:
    """The data's image side must give the latent side the model was built for (`model.sample_size`).
    Otherwise a run trains (and its sample grids draw) at a size the model was not made for, with the
    batch size of the other one: e.g. the digits model (8x8 latents, batch 64) on 256 px images gets
    64x64 latents, 64x the activations, and draws noise at its native size."""
    sample_size = getattr(model, "sample_size", None)
    resolution = getattr(datamodule, "resolution", None)
    autoencoder = getattr(model, "autoencoder", None)
    factor = getattr(autoencoder, "downsampling_factor", None)
    if not (sample_size and resolution and factor):
        return
    native = int(sample_size) * int(factor)
    if int(resolution) != native:
        raise ValueError(
            f"data.resolution={resolution} gives {int(resolution) // factor}x{int(resolution) // factor} "
            f"latents (the autoencoder downsamples by {factor}), but model.sample_size={sample_size} (the "
            f"model is built for {native} px images): set data.resolution={native}, "
            f"or model.sample_size={int(resolution) // factor} to train this model at {resolution} px "
            f"(then check data.batch_size: activations grow with the square of the side)"
        )
