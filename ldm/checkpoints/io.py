"""Reading and writing weight files: `.safetensors`, and pickle-based `.ckpt` / `.pt` / `.pth` / `.bin`.

Pickle files are opened with `torch.load(weights_only=True)`, which only rebuilds tensors and plain
containers. A file that also carries pickled Python objects (a Lightning `hyper_parameters` Namespace,
a config class, ...) could run arbitrary code while loading, so it is refused with `UnsafeCheckpointError`
unless the caller opts in (the PyTorch `torch.load` documentation's warning on untrusted pickles, and the
reason safetensors exists). Writes go to a temporary file in the same folder, are flushed to disk (fsync)
and renamed over the target with `os.replace`, so a crash never leaves a half-written checkpoint behind
under the real name. Files are checked before they are used (`check_safetensors`,
`check_training_checkpoint`): a truncated or damaged file is named, with what is wrong, instead of a
zip or deserializer traceback.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import struct
import tempfile
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

StateDict = dict[str, torch.Tensor]
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
SAFETENSORS_SUFFIXES = (".safetensors",)


class UnsafeCheckpointError(RuntimeError):
    """A pickle checkpoint holds Python objects besides tensors; loading it could execute code."""


class DamagedCheckpointError(ValueError):
    """A checkpoint file is truncated, corrupt or lacks what it must hold; the message names the file."""


def check_safetensors(path: str | os.PathLike) -> None:
    """Raise DamagedCheckpointError unless `path` is a whole .safetensors file.

    The format (huggingface/safetensors README, "Format"): 8 bytes little-endian u64 N, N bytes of JSON
    header mapping each tensor to its `data_offsets` [begin, end) relative to the byte after the header,
    then the data buffer, which the offsets must cover exactly. A truncated file fails the last check;
    safetensors' own error ("incomplete metadata, file not fully covered") does not name the file.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise DamagedCheckpointError(f"{path}: {size} bytes, too short for a .safetensors file")
        (n,) = struct.unpack("<Q", head)
        if 8 + n > size:
            raise DamagedCheckpointError(
                f"{path}: truncated .safetensors file: its header says {n} header bytes, the file has "
                f"{size} bytes"
            )
        try:
            header = json.loads(f.read(n))
        except ValueError as err:
            raise DamagedCheckpointError(f"{path}: corrupt .safetensors header ({err})") from None
    if not isinstance(header, dict):
        raise DamagedCheckpointError(f"{path}: corrupt .safetensors header (not a JSON object)")
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)]
    expected = 8 + n + max(ends, default=0)
    if expected != size:
        raise DamagedCheckpointError(
            f"{path}: {'truncated' if size < expected else 'corrupt'} .safetensors file: its header "
            f"describes {expected} bytes, the file has {size} bytes"
        )


# What Lightning needs to resume a fit (pytorch_lightning/trainer/connectors/checkpoint_connector.py:
# `restore_training_state` reads "loops", "optimizer_states", "lr_schedulers"; `restore_model` reads
# "state_dict"); a `save_weights_only` checkpoint lacks the optimizer and loop states.
TRAINING_CHECKPOINT_KEYS = ("state_dict", "global_step", "loops", "optimizer_states")


def check_training_checkpoint(
    path: str | os.PathLike, required: tuple[str, ...] = TRAINING_CHECKPOINT_KEYS
) -> dict[str, Any]:
    """Verify a Lightning training checkpoint without reading its tensors -> its top-level scalars
    (`global_step`, `epoch`, ...). Raises DamagedCheckpointError naming the file and what is wrong.

    torch.save writes a zip archive whose central directory is at the end of the file (PyTorch
    docs, "torch.save"; PKWARE APPNOTE 4.3.16), so any truncation removes it: `zipfile` finds that
    without reading the data. `torch.load(weights_only=True, mmap=True)` then unpickles the structure
    (the data.pkl entry) and maps the tensors' storages instead of reading them (PyTorch docs,
    "torch.load", `mmap`), so the check costs little even for a multi-GB file; corruption inside tensor
    bytes is not detected (that would need reading, and CRC-checking, all of them).
    """
    path = Path(path)
    if not path.is_file():
        raise DamagedCheckpointError(f"{path}: no such checkpoint file")
    size = path.stat().st_size
    if not zipfile.is_zipfile(path):
        raise DamagedCheckpointError(
            f"{path}: not a complete torch checkpoint ({size} bytes, no zip directory at its end): the "
            "file is truncated (a write or copy that was cut short) or not a checkpoint"
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as err:
        if re.search(r"Unsupported (global|class)", str(err)):
            return {}  # intact, but holds Python objects: Lightning's own load decides
        first = (str(err).splitlines() or [""])[0]
        raise DamagedCheckpointError(f"{path}: corrupt torch checkpoint ({first})") from None
    except Exception as err:  # noqa: BLE001  zip / pickle / storage errors of a damaged file
        first = (str(err).splitlines() or [""])[0]
        what = f"{type(err).__name__}: {first}"
        raise DamagedCheckpointError(f"{path}: corrupt torch checkpoint ({what})") from None
    if not isinstance(obj, Mapping):
        raise DamagedCheckpointError(f"{path}: holds a {type(obj).__name__}, not a training checkpoint")
    missing = [k for k in required if k not in obj]
    if missing:
        raise DamagedCheckpointError(
            f"{path}: not a checkpoint a run can resume from: it lacks {', '.join(missing)} (a weights-only "
            "or exported file?)"
        )
    return _scalars(obj)


def _unsafe_message(path: Path, detail: str, opt_in: str) -> str:
    """Say what was found, why it is refused, and how to load it anyway."""
    found = re.search(r"Unsupported global: GLOBAL (\S+)", detail)
    what = f" (e.g. `{found.group(1)}`)" if found else ""
    return (
        f"{path} holds pickled Python objects besides tensors{what}. Unpickling them can run arbitrary code, "
        f"so it was refused. If you trust where the file came from, load it with {opt_in}; "
        "or convert it once to .safetensors, which holds tensors only."
    )


def _torch_load(path: Path, allow_pickle: bool, opt_in: str) -> Any:
    """torch.load on CPU, weights-only unless the caller opted in to full unpickling."""
    if allow_pickle:
        return torch.load(path, map_location="cpu", weights_only=False)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # Corrupt files fail the same way ("Unsupported operand ..."); only a refused class is unsafe.
        if re.search(r"Unsupported (global|class)", str(err)):
            raise UnsafeCheckpointError(_unsafe_message(path, str(err), opt_in)) from err
        raise ValueError(f"{path} cannot be read as a torch checkpoint (corrupt or another format)") from err


def _scalars(obj: Mapping[str, Any]) -> dict[str, Any]:
    """The plain scalar entries of a checkpoint's top level (global_step, epoch, versions)."""
    return {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, (int, float, str, bool))}


def read_state_dict(
    path: str | os.PathLike, *, allow_pickle: bool = False, opt_in: str = "allow_pickle=True"
) -> tuple[StateDict, dict[str, Any]]:
    """Load a weight file -> (flat state dict of tensors, info).

    `info` holds the safetensors metadata under "metadata" and, for pickle files, the top-level scalars
    such as "global_step". A `{"state_dict": ...}` wrapper (Lightning, CompVis) is unwrapped. `opt_in`
    is how the refusal message tells the user to opt in (e.g. "ckpt_allow_pickle=true" from a config).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {path}")
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        check_safetensors(path)
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
        return load_file(str(path), device="cpu"), {"metadata": metadata}
    if suffix not in PICKLE_SUFFIXES:
        raise ValueError(
            f"{path}: unknown weight file type {suffix!r} (expected .safetensors, .ckpt, .pt, .pth, .bin)"
        )
    obj = _torch_load(path, allow_pickle, opt_in)
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict")
    info = _scalars(obj)
    if isinstance(obj.get("metadata"), Mapping):
        info["metadata"] = {str(k): str(v) for k, v in obj["metadata"].items()}
    inner = obj.get("state_dict", obj)
    if not isinstance(inner, Mapping):
        raise ValueError(f"{path}: 'state_dict' is a {type(inner).__name__}, not a mapping")
    return {k: v for k, v in inner.items() if isinstance(v, torch.Tensor)}, info


def _fsync(path: str | os.PathLike, directory: bool = False) -> None:
    """Flush a file's (or a folder's entries') data to the disk: without it, a power loss or node crash
    after the rename can leave the new name pointing at unwritten (zero) blocks (fsync(2), rename(2))."""
    try:
        fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    except OSError:
        return  # e.g. folders cannot be opened on Windows
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on folders
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call `write(tmp_path)` on a temporary file next to `path`, fsync it, then rename it into place
    (and fsync the folder, so that the rename itself is durable). If `write` fails or the process dies
    midway, the previous file under `path` is untouched and at most a hidden `.NAME.*.tmp` is left."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        _fsync(tmp)
        # mkstemp makes the file private (0600); give it the permissions a plain open() would (umask).
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)  # atomic on POSIX and Windows when on the same file system
        _fsync(path.parent, directory=True)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def _unshared(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """Contiguous tensors that own their whole storage.

    safetensors refuses tensors sharing memory (tied weights, q/k/v chunks of one in_proj), and torch.save
    would write a view's entire base storage; copying views fixes both.
    """
    seen: set[int] = set()
    out: StateDict = {}
    for key, value in state_dict.items():
        t = value.detach().contiguous()
        storage = t.untyped_storage()
        if t.numel() and (storage.data_ptr() in seen or storage.nbytes() != t.numel() * t.element_size()):
            t = t.clone()
            storage = t.untyped_storage()
        seen.add(storage.data_ptr())
        out[key] = t
    return out


def write_state_dict(
    path: str | os.PathLike,
    state_dict: Mapping[str, torch.Tensor],
    *,
    metadata: Mapping[str, str] | None = None,
    global_step: int | None = None,
) -> Path:
    """Write a flat state dict atomically: `.safetensors` (with str metadata) or `.ckpt`/`.pt`/`.pth`/`.bin`.

    Pickle files get the CompVis layout `{"state_dict": ..., "global_step": ...}`, except `.bin`, which
    is the flat transformers/diffusers layout.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    tensors = _unshared(state_dict)
    if suffix in SAFETENSORS_SUFFIXES:
        meta = {str(k): str(v) for k, v in (metadata or {}).items()}
        if global_step is not None:
            meta.setdefault("global_step", str(global_step))
        return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta or None))
    if suffix not in PICKLE_SUFFIXES:
        raise ValueError(f"{path}: unknown weight file type {suffix!r}")
    if suffix == ".bin":
        payload: dict[str, Any] = tensors
    else:
        payload = {"state_dict": tensors}
        if global_step is not None:
            payload["global_step"] = int(global_step)
        if metadata:
            payload["metadata"] = {str(k): str(v) for k, v in metadata.items()}
    return atomic_write(path, lambda tmp: torch.save(payload, tmp))
