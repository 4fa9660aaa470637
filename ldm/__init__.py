"""ldm: train, fine-tune, evaluate and sample latent diffusion models (the Stable Diffusion family)."""

__version__ = "0.1.0"


def load_pipeline(path, **kwargs):
    """A sampling `Pipeline` from a checkpoint: our folder, an original single file or a diffusers folder.

    See `ldm.pipeline_io.load_pipeline` for the options; imported lazily so `import ldm` stays light.
    """
    from ldm.pipeline_io import load_pipeline as _load

    return _load(path, **kwargs)


__all__ = ["load_pipeline"]
