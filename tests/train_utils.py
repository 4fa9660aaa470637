"""Running `python train.py` in tests: the real script, real Hydra composition, real shards."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from pytorch_lightning import Callback

from ldm.checkpoints import save_autoencoder
from tests.tiny import REPO, randomize_

# Small and quick: batch 8 of 32 px digits, no sample grids, CSV logs with every step.
FAST = [
    "data.batch_size=8",
    "trainer.log_every_n_steps=1",
    "trainer.val_check_interval=1000",
    "trainer.limit_val_batches=0",
    "trainer.enable_progress_bar=false",
    "callbacks.sample_grid=null",
]


def tiny_autoencoder_file(path: Path) -> Path:
    """A random tiny f=4 autoencoder saved as `load_autoencoder` reads it (stands in for digits_ae)."""
    torch.manual_seed(0)
    ae = randomize_(instantiate(OmegaConf.load(REPO / "configs/model/autoencoder/tiny.yaml")), seed=7)
    ae.scale_factor = 0.5
    return save_autoencoder(ae, path)


def run_train(run_dir: Path, *overrides: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python train.py experiment=digits ... hydra.run.dir=run_dir` with one thread per process."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HYDRA_FULL_ERROR="1", WANDB_MODE="offline")
    env.pop("WANDB_API_KEY", None)
    cmd = [sys.executable, str(REPO / "train.py"), *overrides, f"hydra.run.dir={run_dir}"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        out, err = proc.stdout[-3000:], proc.stderr[-6000:]
        raise AssertionError(f"train.py failed ({proc.returncode}):\n{out}\n{err}")
    return proc


def logged(run_dir: Path, key: str) -> dict[int, float]:
    """step -> value of `key` from the run's CSV logs (a resumed run logs to the next version folder)."""
    out = {}
    versions = sorted((run_dir / "csv").glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    for version in versions:
        with open(version / "metrics.csv") as f:
            for row in csv.DictReader(f):
                if row.get(key):
                    out[int(row["step"])] = float(row[key])
    return out


class RecordKeys(Callback):
    """Writes the sample keys each rank trains on to `<path>/rank<N>.txt` (for the DDP test)."""

    def __init__(self, path: str):
        self.path = Path(path)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.path / f"rank{trainer.global_rank}.txt", "a") as f:
            f.writelines(k + "\n" for k in batch["key"])


def wandb_history_keys(run_file: Path) -> set[str]:
    """Metric names in an offline wandb run file (`run-*.wandb`): W&B's LevelDB-style log of protobuf
    records (a 7-byte header, then 32 KiB blocks of [crc32 u32, length u16, type u8, data] chunks;
    type 1 = a whole record, 2/3/4 = its first/middle/last part), read here to check what was logged."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data, pos, block, part, keys = Path(run_file).read_bytes(), 7, 32768, b"", set()
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        part += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(part)
            part = b""
            if record.WhichOneof("record_type") == "history":
                keys |= {item.key or "/".join(item.nested_key) for item in record.history.item}
    return keys


def tensorboard_tags(folder: Path) -> set[str]:
    """Scalar and image tags in the TensorBoard event files under `folder` (TFRecord framing: u64 length,
    u32 crc, Event proto, u32 crc), read with tensorboardX's Event proto."""
    import struct

    from tensorboardX.proto import event_pb2

    tags = set()
    for path in Path(folder).rglob("events.out.tfevents.*"):
        data, pos = path.read_bytes(), 0
        while pos + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            event = event_pb2.Event()
            event.ParseFromString(data[pos + 12 : pos + 12 + length])
            pos += 12 + length + 4
            tags |= {v.tag for v in event.summary.value}
    return tags


class HostReads(Callback):
    """Records, per training step, every read of a tensor's value by the host: on a GPU each is a device sync
    that drains the queue of kernels (`.item()`, `.tolist()`, `bool()`/`float()`/`int()`, `.numpy()`,
    `.cpu()`, `nonzero`/`unique`, boolean-mask indexing). The CPU cannot tell a device tensor from a host
    one, so the methods are wrapped and their callers recorded, leaving out the data loading (host data by
    definition). A read counts for the optimizer step the trainer is at (`global_step` when it happens: from
    just after step k-1 to step k, whatever the order of the callbacks), from step `skip` on. Written to
    `path` as JSON {global_step: ["reading frame < caller < ...", ...]}."""

    METHODS = ("item", "tolist", "__bool__", "__float__", "__int__", "numpy", "cpu", "nonzero", "unique")
    DATA = ("/torch/utils/data/", "/webdataset/", "/ldm/data/")

    def __init__(self, path: str, skip: int = 2):
        self.path, self.skip = Path(path), skip
        self.reads: dict[int, list[str]] = {}
        self.trainer = None
        self._saved: dict[str, object] = {}

    def _record(self) -> None:
        import traceback

        if self.trainer is None or self.trainer.global_step < self.skip:
            return
        frames = traceback.extract_stack()[:-2]  # without this method and the wrapper
        if any(d in f.filename for f in frames for d in self.DATA):
            return
        # The reading frame, then the frames that led to it (innermost first), for the message of a failure.
        sites = [f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(frames[-8:])]
        self.reads.setdefault(self.trainer.global_step, []).append(" < ".join(sites))

    def _wrap(self, name: str) -> None:
        original = getattr(torch.Tensor, name)
        self._saved[name] = original

        def wrapper(t, *args, **kwargs):
            self._record()
            return original(t, *args, **kwargs)

        setattr(torch.Tensor, name, wrapper)

    def on_fit_start(self, trainer, pl_module) -> None:
        for name in self.METHODS:
            self._wrap(name)
        original = torch.Tensor.__getitem__
        self._saved["__getitem__"] = original

        def getitem(t, index):
            if isinstance(index, torch.Tensor) and index.dtype == torch.bool:
                self._record()
            return original(t, index)

        torch.Tensor.__getitem__ = getitem

    def on_train_start(self, trainer, pl_module) -> None:
        self.trainer = trainer

    def on_train_end(self, trainer, pl_module) -> None:
        self.trainer = None
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)
        import json

        self.path.write_text(json.dumps(self.reads, indent=1))
