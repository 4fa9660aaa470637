"""`python train.py` as a person runs it on a laptop: CPU threads from the config, readable progress when
the output is piped, and Ctrl-C / SIGTERM / a kill leaving a checkpoint that resumes."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from ldm.training.threads import AdaptiveThreads, choose_threads, free_cores
from tests.tiny import REPO
from tests.train_utils import logged, run_train, tiny_autoencoder_file

# tests/train_utils.FAST without `enable_progress_bar=false`: these tests read the progress lines.
QUICK = [
    "experiment=digits",
    "data.batch_size=8",
    "trainer.log_every_n_steps=1",
    "trainer.val_check_interval=1000",
    "trainer.limit_val_batches=0",
    "callbacks.sample_grid=null",
    "export=false",
    "callbacks.progress_bar.every_n_seconds=0",  # a line every step
]


@pytest.fixture(scope="module")
def common(tmp_path_factory):
    root = tmp_path_factory.mktemp("runtime")
    ae = tiny_autoencoder_file(root / "ae.safetensors")
    return [*QUICK, f"model.autoencoder.path={ae}", f"paths.data_dir={root / 'data'}"]


class Training:
    """`python train.py ...` in the background, its stdout (a pipe, not a terminal) read line by line."""

    def __init__(self, run_dir: Path, *overrides: str, omp_num_threads: str = "1"):
        env = dict(os.environ, OMP_NUM_THREADS=omp_num_threads, HYDRA_FULL_ERROR="1", WANDB_MODE="offline")
        cmd = [sys.executable, str(REPO / "train.py"), *overrides, f"hydra.run.dir={run_dir}"]
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, start_new_session=True)  # fmt: skip
        self.lines: list[str] = []
        self._queue: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self._queue.put(line)
        self._queue.put(None)

    def wait_for_step(self, step: int, timeout: float = 300) -> None:
        """Block until a progress line reports `step` or later."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self._queue.get(timeout=1)
            except queue.Empty:
                continue
            if line is None:
                break
            self.lines.append(line)
            if line.startswith("step ") and int(line.split()[1].split("/")[0]) >= step:
                return
        self.proc.kill()
        raise AssertionError(f"no progress line for step {step}:\n{''.join(self.lines)[-4000:]}")

    def finish(self, timeout: float = 300) -> int:
        rc = self.proc.wait(timeout=timeout)
        while (line := self._queue.get(timeout=10)) is not None:
            self.lines.append(line)
        return rc

    @property
    def output(self) -> str:
        return "".join(self.lines)


def test_threads_auto_respects_omp_num_threads_and_takes_the_free_cores(monkeypatch):
    assert choose_threads("auto", {"OMP_NUM_THREADS": "3"}) == 3
    assert choose_threads(None, {"OMP_NUM_THREADS": "4,2"}) == 4
    assert choose_threads(2, {"OMP_NUM_THREADS": "1"}) == 2  # an explicit count wins over the environment
    with pytest.raises(ValueError):
        choose_threads(0, {})
    monkeypatch.setattr("ldm.training.threads.available_cores", lambda: 4)
    for load, free in [(0.1, 4), (1.2, 3), (2.6, 1), (9.0, 1)]:
        monkeypatch.setattr(os, "getloadavg", lambda load=load: (load, load, load))
        assert choose_threads("auto", {}) == free
    # While training, the run's own threads are not "other processes": 4 of ours and 1 other -> 3.
    monkeypatch.setattr(os, "getloadavg", lambda: (5.0, 5.0, 5.0))
    assert free_cores(own_threads=4) == 3


def test_adaptive_threads_follows_the_free_cores_in_a_real_fit(monkeypatch):
    """A job appearing beside the run (load average up) brings the run to the cores left, and back."""
    import pytorch_lightning as pl
    from pytorch_lightning.demos.boring_classes import BoringModel

    # The load the OS would report after each step: our 2 threads alone; + 1 other job; it left.
    loads = iter([2.0] * 3 + [3.0] * 3 + [1.0] * 100)
    monkeypatch.setattr("ldm.training.threads.available_cores", lambda: 2)
    monkeypatch.setattr(os, "getloadavg", lambda: (next(loads),) * 3)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    seen = []

    class Record(pl.Callback):
        def on_train_batch_end(self, *args):
            seen.append(torch.get_num_threads())

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        trainer = pl.Trainer(max_steps=9, accelerator="cpu", logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                             callbacks=[AdaptiveThreads("auto", every_n_seconds=0), Record()])  # fmt: skip
        trainer.fit(BoringModel())
    finally:
        torch.set_num_threads(before)
    assert seen == [2, 2, 2, 1, 1, 1, 2, 2, 2], seen
    assert not AdaptiveThreads(3).active  # an explicit count is left alone


def test_piped_run_prints_step_progress_lines_and_uses_configured_threads(common, tmp_path):
    run = Training(tmp_path / "run", *common, "trainer.max_steps=5", "threads=1", omp_num_threads="2")
    assert run.finish() == 0, run.output[-4000:]
    out = run.output  # stdout and stderr, through a pipe
    assert "torch threads: 1 intra-op" in out  # the config's count wins over the environment's 2 (read back)
    lines = [line for line in out.splitlines() if line.startswith("step ")]
    assert [line.split(" | ")[0] for line in lines] == [f"step {i}/5 ({20 * i}%)" for i in range(1, 6)], out
    assert all("train/loss" in line for line in lines)
    assert "images/s" in lines[1] and "ETA" in lines[1]
    assert "\r" not in out  # no tqdm redraws in a log file


def test_terminal_bar_counts_steps_over_the_whole_run(common, tmp_path):
    """In a terminal (a pseudo-terminal here) one bar runs to max_steps across epoch boundaries (an epoch of
    45 training images at batch 8 is 6 steps); Lightning's stock bar restarted at "Epoch 1" each epoch."""
    import fcntl
    import pty
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))  # tqdm needs a width
    env = dict(os.environ, OMP_NUM_THREADS="1", HYDRA_FULL_ERROR="1", WANDB_MODE="offline")
    small = [f"paths.data_dir={tmp_path / 'data'}", "data.val_fraction=0.975"]  # 45 training images
    own = [o for o in common if not o.startswith("paths.data_dir=")]  # (the module's split is the default)
    overrides = [*own, *small, "trainer.max_steps=8", f"hydra.run.dir={tmp_path / 'run'}"]
    proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), *overrides], cwd=REPO, env=env,
                            stdout=slave, stderr=slave, start_new_session=True)  # fmt: skip
    os.close(slave)
    chunks: list[bytes] = []

    def read() -> None:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert proc.wait(timeout=600) == 0
    finally:
        proc.kill()
        reader.join(timeout=10)
        os.close(master)
    screen = b"".join(chunks).decode(errors="replace").replace("\r", "\n")
    assert "train: 100%" in screen and "8/8" in screen, screen[-3000:]
    assert "7/8" in screen and "Epoch 1" not in screen  # past the epoch boundary, still one bar
    assert not any(line.startswith("step ") for line in screen.splitlines())  # no plain lines on a terminal


@pytest.mark.slow  # 25 s; tests/test_resume.py's Ctrl-C at an epoch end covers the exit and resume fast
def test_ctrl_c_saves_a_checkpoint_that_resumes_exactly(common, tmp_path):
    """SIGINT mid-run: the step finishes, last.ckpt is written, exit 130; resuming it with ckpt_path
    repeats an uninterrupted run (losses and weights)."""
    fixed = [*common, "model.lr_scheduler.total_steps=400", "model.lr_scheduler.warmup_steps=2"]
    part, full = tmp_path / "part", tmp_path / "full"
    run = Training(part, *fixed, "trainer.max_steps=400")
    run.wait_for_step(3)
    run.proc.send_signal(signal.SIGINT)
    assert run.finish() == 130, run.output[-4000:]
    ckpt = part / "checkpoints" / "last.ckpt"
    assert "interrupted at step" in run.output and ckpt.is_file(), run.output[-4000:]
    stopped = torch.load(ckpt, weights_only=True)["global_step"]
    assert 3 <= stopped < 400

    end = stopped + 2
    run_train(part, *fixed, f"trainer.max_steps={end}", f"ckpt_path={ckpt}")
    run_train(full, *fixed, f"trainer.max_steps={end}")
    a, b = logged(full, "train/loss"), logged(part, "train/loss")
    assert sorted(a) == sorted(b) == list(range(end))
    for step in range(end):
        assert a[step] == pytest.approx(b[step], rel=1e-6), step
    ca = torch.load(full / "checkpoints" / "last.ckpt", weights_only=True)
    cb = torch.load(ckpt, weights_only=True)
    assert ca["global_step"] == cb["global_step"] == end
    assert not list((part / "checkpoints").glob("last-v*.ckpt"))  # every writer of last.ckpt shares it
    for k, v in ca["state_dict"].items():
        torch.testing.assert_close(cb["state_dict"][k], v, rtol=1e-6, atol=1e-7)


def test_sigterm_saves_a_checkpoint_and_exits_143(common, tmp_path):
    run = Training(tmp_path, *common, "trainer.max_steps=400")
    run.wait_for_step(2)
    run.proc.send_signal(signal.SIGTERM)
    assert run.finish() == 143, run.output[-4000:]
    step = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    assert 2 <= step < 400


def test_killed_run_has_a_time_based_checkpoint(common, tmp_path):
    """SIGKILL cannot be handled: the time-based checkpoint (here every 0.6 s instead of 10 min) is what
    is left, long before the first step-based one."""
    every = "callbacks.time_checkpoint.train_time_interval.minutes=0.01"
    run = Training(tmp_path, *common, "trainer.max_steps=400", every)
    run.wait_for_step(2)
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 120
    while not ckpt.is_file() and time.monotonic() < deadline:  # Lightning saves atomically (_atomic_save)
        time.sleep(0.5)
    run.proc.kill()
    run.finish()
    assert 1 <= torch.load(ckpt, weights_only=True)["global_step"] < 400
    assert not list((tmp_path / "checkpoints").glob("last-v*.ckpt"))


def test_digits_eval_reports_progress_per_digit(tiny_sd_folder, capsys):
    from ldm.eval import digits

    digits.main([str(tiny_sd_folder), "--n", "1", "--steps", "1", "--sampler", "euler"])
    err = capsys.readouterr().err
    assert [line.split(" (")[0] for line in err.splitlines() if line.startswith("digit ")] == [
        f"digit {i}/10" for i in range(1, 11)
    ]
    assert "ETA" in err
