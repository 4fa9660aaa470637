"""Checkpoints that resume exactly, whenever they were written: `ExactResume` rewrites the fit loop's
progress in every checkpoint to say what was trained, in a form Lightning's restart reads correctly.

Lightning (2.x) stores its loops' progress counters as they are at the moment of saving
(pytorch_lightning/loops/fit_loop.py, training_epoch_loop.py, progress.py) and on restart infers from
their pattern where the run stopped (`FitLoop.update_restart_stage`, `_TrainingEpochLoop.reset`). Some
moments leave patterns that it reads wrongly:

- `max_steps` (or `trainer.should_stop`) ends training mid-epoch: the epoch loop returns, and
  `FitLoop.on_advance_end` still marks the epoch processed and completed before `on_train_end` writes
  last.ckpt. Resumed, the run starts the *next* epoch and the data stream restarts: the most common
  resume, extending a finished run, diverged from the first step.
- an epoch ends exactly at `max_steps`: the checkpoint keeps the finished epoch's batch count, which the
  next epoch then starts from (its batch index, the gradient-accumulation phase and the data position
  are all off; Lightning-AI/pytorch-lightning#19617).
- a checkpoint written in `on_train_batch_end` of an epoch's last batch: `FitLoop.reset` marks the epoch
  done without its end hooks, starts the next one without its start hooks and, for an iterable loader
  (no length), without resetting the batch count.
- a checkpoint written from `on_exception` while a batch was in flight (fetched, its step not taken):
  restart counts it as trained in the logging step (`_batches_that_stepped`).
- a stop inside a gradient-accumulation window: the accumulated gradients are not in the checkpoint, so
  the window's batches must be trained again, from its first batch.

The canonical forms, both patterns Lightning restores exactly:
- mid-epoch: what a periodic ModelCheckpoint writes in `on_train_batch_end` of the last trained batch
  (epoch E started, b >= 1 of its batches processed, the last not yet "completed");
- at an epoch start: epoch E not started, no batch of it counted (after a whole epoch, or when no batch
  of E had its optimizer step).
The data modules resume their streams from these counters (`ldm.data.webdataset`).

Known limits (Lightning's): a resumed epoch does not step epoch-interval LR schedulers at its end
(`FitLoop.on_advance_end` skips them while restarting); a checkpoint written in `on_train_epoch_end`
is left as Lightning wrote it.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl

_FIELDS = ("ready", "started", "processed", "completed")


def _set(progress: dict[str, Any], part: str, **values: int) -> None:
    """Set counters of `progress[part]` ("total" or "current"), only those the tracker has."""
    for key, value in values.items():
        if key in progress[part]:
            progress[part][key] = int(value)


def _shift(progress: dict[str, Any], delta: int, *fields: str) -> None:
    """Add `delta` to `fields` of both the total and the current counters."""
    for part in ("total", "current"):
        for key in fields:
            progress[part][key] += delta


def canonical_fit_loop_state(
    state: dict[str, Any], *, accumulate: int, epoch_batches: float, validating: bool
) -> dict[str, Any]:
    """The fit loop's state dict (`checkpoint["loops"]["fit_loop"]`) rewritten in place to a canonical
    form (see the module doc); returned for convenience. `accumulate`: the trainer's
    accumulate_grad_batches; `epoch_batches`: its num_training_batches (inf for an iterable loader of
    unknown length); `validating`: the checkpoint is written from inside validation (before the epoch
    loop counts the batch in `_batches_that_stepped`)."""
    ep, bp = state.get("epoch_progress"), state.get("epoch_loop.batch_progress")
    loop_state = state.get("epoch_loop.state_dict", {})
    if ep is None or bp is None or "_batches_that_stepped" not in loop_state:
        return state  # not a layout this code knows: leave it to Lightning
    e, cur, tot = ep["current"], bp["current"], bp["total"]
    if e["ready"] != e["started"] or e["processed"] not in (e["completed"], e["ready"]) or e["ready"] == 0:
        return state  # inside an epoch's start hooks, or no epoch begun: nothing to do
    if e["processed"] != e["completed"]:
        return state  # written in on_train_epoch_end: Lightning re-runs the epoch end (left as is)
    end_ran = e["processed"] == e["ready"]  # the epoch loop returned and the epoch's end hooks ran
    b0, t0 = cur["processed"], tot["processed"]
    in_flight = cur["ready"] > b0 or cur["started"] > b0  # fetched or started, its step not taken
    last_of_epoch = (bp.get("is_last_batch", False) and not in_flight) or b0 == epoch_batches
    if end_ran and last_of_epoch:  # a whole epoch: the next one starts from its first batch
        _set(bp, "current", **dict.fromkeys(_FIELDS, 0))
        _set(bp, "total", **dict.fromkeys(_FIELDS, t0))
        bp["is_last_batch"] = False
        return state
    if end_ran:  # cut short by max_steps / should_stop: the epoch is still open
        _shift(ep, -1, "processed", "completed")
    # Back to the last optimizer step: accumulated gradients are not saved. Lightning steps when the
    # epoch's batch count is a multiple of `accumulate`, and on the epoch's last batch.
    stepped = b0 % max(1, accumulate) == 0 or last_of_epoch
    rollback = 0 if stepped else b0 % accumulate
    b, t = b0 - rollback, t0 - rollback
    # Did the epoch loop already count the last trained batch in `_batches_that_stepped` (its
    # on_advance_end done)? Yes once a later batch was fetched or rolled back, or after the batch ended
    # outside validation; no in on_train_batch_end or inside validation.
    counted = rollback > 0 or in_flight or (cur["completed"] == b0 and not validating)
    bp["is_last_batch"] = False
    if b == 0:  # nothing of this epoch trained: restart it, start hooks included
        _shift(ep, -1, "ready", "started")
        _set(bp, "current", **dict.fromkeys(_FIELDS, 0))
        _set(bp, "total", **dict.fromkeys(_FIELDS, t))
        return state
    # The on_train_batch_end pattern: Lightning's restart adds the one to `completed` that the batch's
    # end would have added, and one to `_batches_that_stepped` when it judges from the counters that the
    # batch stepped (`_TrainingEpochLoop.reset`, `_should_accumulate`); the saved count makes up the rest.
    _set(bp, "current", ready=b, started=b, processed=b, completed=b - 1)
    _set(bp, "total", ready=t, started=t, processed=t, completed=t - 1)
    stepped_through_b = loop_state["_batches_that_stepped"] + (0 if counted else 1)
    restart_adds = 1 if b % max(1, accumulate) == 0 or b == epoch_batches else 0
    loop_state["_batches_that_stepped"] = stepped_through_b - restart_adds
    return state


class ExactResume(pl.Callback):
    """Writes every checkpoint's loop progress in the canonical form of `canonical_fit_loop_state`, so
    that `ckpt_path=` continues exactly where the run stopped (same batches, steps, logging steps)
    whichever callback wrote it: periodic, last, on max_steps, on interrupt, at or between epochs."""

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        fit = checkpoint.get("loops", {}).get("fit_loop")
        if fit is None or trainer.sanity_checking:
            return
        canonical_fit_loop_state(
            fit,
            accumulate=int(trainer.accumulate_grad_batches),
            epoch_batches=trainer.num_training_batches,
            validating=bool(trainer.validating),
        )
        checkpoint["epoch"] = int(fit["epoch_progress"]["current"]["completed"])
