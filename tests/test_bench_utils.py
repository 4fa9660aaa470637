"""benchmarks/bench_utils.py: a benchmark notices CPU time that other processes take while it runs (the
load average cannot tell that apart from the benchmark's own threads)."""

import subprocess
import sys
import time

from tests.tiny import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import bench_utils as bu  # noqa: E402


def test_footer_counts_other_processes_cpu_time():
    start = bu.header("test", 1)
    # A busy process that is not our waited-for child while footer reads the counters (its CPU time is
    # not in RUSAGE_CHILDREN yet): to the benchmark it is another process.
    spin = "import time\nt = time.time()\nwhile time.time() - t < 1.5: pass"
    busy = subprocess.Popen([sys.executable, "-c", spin])
    time.sleep(2.0)
    res = bu.footer(start)
    busy.wait()
    assert res["other_cores_busy"] > 0.5 and not res["idle"]
    assert res["seconds"] >= 2.0
