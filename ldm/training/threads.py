"""How many CPU threads torch uses in the training process (`threads: auto | N` in configs/train.yaml).

torch's default is one intra-op thread per core, which pays on a machine to itself and collapses on a
shared one: OpenMP splits every op into equal chunks, one per thread, and waits at a barrier for the
slowest, so a thread that loses its core to another process stalls all the others. Measured with
benchmarks/cpu_threads.py on the 2-core machine (the digits model's training step, batch 64): alone,
2 threads ran 1.3-1.6x faster than 1; next to one busy process, 2 threads ran 1.7-1.9x slower than 1 (and
4-20x slower when several jobs competed).

`auto` therefore takes the cores that are free when the run starts (available cores minus the 1-minute
load average, at least one), and `AdaptiveThreads` re-checks that while training, so a job that starts or
ends beside the run moves it between "all cores" and "what is left". An explicit OMP_NUM_THREADS in the
environment wins over `auto` (the user or a scheduler such as SLURM or torchrun chose it; torchrun itself
sets 1 per process). DataLoader workers need nothing here: PyTorch runs each worker with one thread
(`torch.set_num_threads(1)` in `_worker_loop`, pytorch/pytorch torch/utils/data/_utils/worker.py).
"""

from __future__ import annotations

import logging
import os
import time

import pytorch_lightning as pl
import torch

log = logging.getLogger(__name__)


def available_cores() -> int:
    """CPUs this process may run on (its affinity mask: taskset, cgroup cpusets, SLURM's binding)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS and Windows have no affinity mask
        return os.cpu_count() or 1


def choose_threads(threads: int | str | None = "auto", environ: dict | None = None) -> int:
    """The intra-op thread count for `threads`: an int as given; `auto` (or None): OMP_NUM_THREADS when
    set, else the cores free now (`free_cores`)."""
    environ = os.environ if environ is None else environ
    if threads not in (None, "auto"):
        n = int(threads)
        if n < 1:
            raise ValueError(f"threads must be 'auto' or a positive integer, got {threads!r}")
        return n
    env = environ.get("OMP_NUM_THREADS", "").strip()
    if env:
        try:
            return max(1, int(env.split(",")[0]))  # OpenMP allows a per-nesting-level list: "4,2"
        except ValueError:
            log.warning("ignoring OMP_NUM_THREADS=%r (not an integer)", env)
    return free_cores()


def free_cores(own_threads: int = 0) -> int:
    """Available cores not kept busy by other processes: the 1-minute load average (Linux counts running
    and runnable threads), less `own_threads` of this process's own, rounded, at least one."""
    cores = available_cores()
    try:
        others = max(0.0, os.getloadavg()[0] - own_threads)
    except (AttributeError, OSError):  # no load average (Windows): keep headroom instead
        return max(1, cores // 2)
    return min(cores, max(1, cores - round(others)))


def configure_threads(threads: int | str | None = "auto") -> int:
    """Set torch's intra-op threads (and inter-op threads, while that is still allowed); returns the count.

    With several training processes on one machine (DDP on the CPU), Lightning's launchers give each
    process cores / processes threads, but only while OMP_NUM_THREADS is unset (`_set_num_threads_if_needed`
    in lightning_fabric/utilities/distributed.py, called from pytorch_lightning/strategies/launchers/
    subprocess_script.py and multiprocessing.py). So `auto` leaves the variable alone, and an explicit
    count is exported, for the ranks launched later to take the same count."""
    n = choose_threads(threads)
    torch.set_num_threads(n)
    try:
        # Inter-op threads run independent tasks side by side (TorchScript `fork`, `at::launch`; PyTorch
        # docs, "CPU threading and TorchScript inference"); on a small machine they compete for the same
        # cores. torch refuses a change once inter-op work has started, so this is best effort.
        torch.set_num_interop_threads(n)
    except RuntimeError:
        pass
    if threads not in (None, "auto"):
        os.environ["OMP_NUM_THREADS"] = str(n)
    log.info("torch threads: %d intra-op, %d inter-op (%d cores available)",
             torch.get_num_threads(), torch.get_num_interop_threads(), available_cores())  # fmt: skip
    return n


class AdaptiveThreads(pl.Callback):
    """With `threads: auto`, follow the free cores during training: every `every_n_seconds`, set torch's
    intra-op threads to `free_cores()` not counting this run's own threads (torch allows changing the
    count between ops). Off when the count was given (`threads=N` or OMP_NUM_THREADS), on accelerators
    other than the CPU, and with several processes (Lightning shares the cores among the ranks)."""

    def __init__(self, threads: int | str | None = "auto", every_n_seconds: float = 30.0):
        self.active = threads in (None, "auto") and not os.environ.get("OMP_NUM_THREADS", "").strip()
        self.every_n_seconds = every_n_seconds
        self._last = time.monotonic()

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if trainer.world_size > 1 or pl_module.device.type != "cpu":
            self.active = False

    def on_train_batch_end(self, trainer: pl.Trainer, *args) -> None:
        if not self.active or time.monotonic() - self._last < self.every_n_seconds:
            return
        self._last = time.monotonic()
        current = torch.get_num_threads()
        wanted = free_cores(own_threads=current)
        if wanted != current:
            torch.set_num_threads(wanted)
            log.info("torch threads: %d -> %d (free cores changed)", current, wanted)
