"""Train a model: `python train.py [experiment=NAME] [key=value ...]` (configs/train.yaml).

Compose the config, build data, model, callbacks, loggers and trainer from it, fit (resuming from
`ckpt_path` when given, or with `resume=auto` from the run folder's newest good checkpoint), then export
the trained weights to <run>/export in a form that the next stage or `sample.py` loads by path. The run
folder is Hydra's (`hydra.run.dir=...`); it holds `.hydra/config.yaml` (the resolved config) and
`checkpoints/last.ckpt`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from ldm.training.resolvers import register_resolvers

register_resolvers()


def instantiate_all(group: DictConfig | None) -> list:
    """Instantiate every entry of a group such as `callbacks` or `logger` (null entries are dropped)."""
    return [hydra.utils.instantiate(c) for c in (group or {}).values() if c is not None and "_target_" in c]


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> None:
    import pytorch_lightning as pl

    from ldm.checkpoints.io import DamagedCheckpointError
    from ldm.training.checks import (
        ConfigError,
        check_callbacks_fit_model,
        check_config,
        check_data_fits_model,
    )
    from ldm.training.requeue import resolve_ckpt_path, use_atomic_checkpoint_io
    from ldm.training.threads import configure_threads
    from ldm.training.warnings import quiet_expected_warnings
    from ldm.utils.malloc import configure_malloc

    quiet_expected_warnings()
    try:  # the whole composed config, before any data or weights are read (ldm/training/checks.py)
        check_config(cfg)
    except ConfigError as e:
        sys.exit(f"{e}\n(stopped before loading data or weights; `python train.py --cfg job` shows it all)")
    configure_threads(cfg.get("threads", "auto"))  # before any work: see ldm/training/threads.py
    configure_malloc(cfg.get("malloc", "reuse"))  # freed memory kept: ldm/utils/malloc.py
    if os.environ.get("LOCAL_RANK", "0") == "0":  # DDP re-launches this script once per extra rank
        print(f"run folder: {Path(cfg.paths.output_dir).resolve()}", flush=True)
    # Before anything is built: a damaged checkpoint fails now, naming the file (ldm/training/requeue.py).
    try:
        ckpt_path = resolve_ckpt_path(cfg.get("resume"), cfg.ckpt_path, cfg.paths.output_dir)
    except DamagedCheckpointError as err:  # one line naming the file, not a zip traceback
        raise SystemExit(f"error: cannot resume: {err}") from None
    if ckpt_path is not None and os.environ.get("LOCAL_RANK", "0") == "0":
        print(f"resuming from {ckpt_path}", flush=True)
    pl.seed_everything(cfg.seed, workers=True)
    # Resolved as well as Hydra's raw .hydra/config.yaml: ldm.load_pipeline rebuilds the model from it.
    OmegaConf.save(cfg, Path(cfg.paths.output_dir) / "config_resolved.yaml", resolve=True)
    datamodule = hydra.utils.instantiate(cfg.data)
    model = hydra.utils.instantiate(cfg.model)
    callbacks, loggers = instantiate_all(cfg.get("callbacks")), instantiate_all(cfg.get("logger"))
    check_data_fits_model(datamodule, model)
    check_callbacks_fit_model(callbacks, model)
    if not cfg.trainer.get("enable_progress_bar", True):  # Lightning refuses a progress bar callback then
        callbacks = [c for c in callbacks if not isinstance(c, pl.callbacks.ProgressBar)]
    trainer: pl.Trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers)
    use_atomic_checkpoint_io(trainer)  # tmp + fsync + rename in the checkpoint's folder
    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)

    if cfg.export and hasattr(model, "export") and not trainer.fast_dev_run:
        out = Path(cfg.paths.output_dir) / "export"
        model.export(out, datamodule=datamodule, trainer=trainer)
        if trainer.is_global_zero:
            print(f"exported to {out}")


if __name__ == "__main__":
    main()
