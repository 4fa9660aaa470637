"""Keep freed memory inside the process, so that large CPU tensors do not page-fault on every allocation.

glibc's malloc serves a request above its mmap threshold (128 KiB, rising with use to at most 32 MiB) with
a fresh `mmap` and gives the pages back to the kernel on `free`; it also trims the top of the heap once
128 KiB are free there (mallopt(3): M_MMAP_THRESHOLD, M_MMAP_MAX, M_TRIM_THRESHOLD). A training or
sampling step allocates and frees the same large activations and oneDNN's reordered convolution weights
on every call, so each call pays one page fault per 4 KiB page, the kernel zeroing every page first.
Measured on the SD1.5 UNet forward (2x4x32x32, 2 threads, benchmarks/unet_step.py `--malloc`): 5.6
million page faults and 12 s of system time over twelve forwards (ours and diffusers'), a fifth of the
wall time; with `reuse`, 57 thousand and 1.0 s.

`reuse` turns mmap off for allocations (glibc still maps memory when the heap cannot grow) and raises the
trim threshold, so freed blocks go back to malloc's free lists and the next step reuses them, faulted in
already: what PyTorch's CUDA caching allocator does for GPU memory. The cost: the process keeps its peak
heap for its lifetime (the usual state of a training process), and glibc before 2.38 does not reuse a
freed block at once for an aligned request of its size (sourceware bug 14581; torch allocates with
posix_memalign), so the heap first grows by a few of the largest blocks. Measured: the `small` UNet's
training step (benchmarks/bench_utils.py, batch 4) levels off at 1.20 GB resident against a 1.19 GB peak
with glibc's defaults, with no page faults after the third step; a loop over one 64 MiB tensor at 668 MB
against 284 MB.

The common alternative, jemalloc or tcmalloc through LD_PRELOAD (Intel's PyTorch CPU performance tuning
guide), needs a library installed and set before the process starts; `mallopt` works from inside.
Elsewhere than glibc (macOS, musl) it does nothing. DataLoader workers forked later inherit the setting.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc <malloc.h>
TRIM_THRESHOLD = 1 << 30  # free bytes at the top of the heap that stay mapped (1 GiB)
CHOICES = ("reuse", "system")


def configure_malloc(mode: str = "reuse") -> bool:
    """Apply `mode` (`reuse`: keep freed memory in the process; `system`: glibc's defaults, unchanged);
    returns whether settings were changed."""
    if mode not in CHOICES:
        raise ValueError(f"malloc must be one of {CHOICES}, got {mode!r}")
    if mode == "system":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        log.debug("malloc=reuse: no glibc mallopt here; allocator left as it is")
        return False
    ok = mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    if not ok:
        log.warning("malloc=reuse: mallopt refused the settings; allocator left as it is")
    return ok
