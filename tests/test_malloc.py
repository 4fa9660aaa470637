"""ldm/utils/malloc.py: `malloc: reuse` keeps freed memory in the process, so a large tensor allocated
again does not page-fault in again (glibc); `system` leaves the allocator alone; other values are refused."""

import subprocess
import sys

import pytest

from ldm.utils.malloc import configure_malloc
from tests.tiny import REPO

# Allocate, touch and free a 64 MiB tensor 30 times; print the page faults of the last 10 (glibc before 2.38
# does not reuse a freed block for an aligned allocation of its size at once, sourceware bug 14581, so the
# heap first grows by a few blocks; the steady state is what a training loop lives in).
FAULTS = """
import resource, sys, torch
from ldm.utils.malloc import configure_malloc
print(configure_malloc(sys.argv[1]))
for i in range(30):
    if i == 20:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(16 * 2**20)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(mode: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", FAULTS, mode], cwd=REPO, capture_output=True, text=True,
                         check=True, timeout=120).stdout.split()  # fmt: skip
    return out[0], int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_reuse_stops_page_faults_of_repeated_large_tensors():
    changed, reuse = faults("reuse")
    unchanged, system = faults("system")
    assert (changed, unchanged) == ("True", "False")
    assert system > 10 * 16_000  # 16,384 pages of 4 KiB per allocation, every time
    assert reuse < system / 100  # faulted in once, then reused


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="malloc must be one of"):
        configure_malloc("jemalloc")
