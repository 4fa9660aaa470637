"""Conditioners from checkpoint files: the CLIP text encoder with its tokenizer, or a class-label embedding.

A text encoder in a file is only half of what sampling needs: the same weights with another tokenizer give
other images without any error. Folders (ours, diffusers') carry a `tokenizer/` folder. A single file has
no folders, so the tokenizer's own files (what `save_pretrained` writes: tokenizer.json or vocab.json +
merges.txt, and the special-token settings; about 2 MB for SD's CLIP BPE) are stored as text in the
safetensors header, which has a free-form
`__metadata__` string map for exactly such things (huggingface/safetensors, "Format"). Tools that do not
know the entry ignore it. Nothing written names a path of the writing machine: configs lose
`_name_or_path` (transformers records where a model was loaded from) before they are stored.

Class-conditional LDMs (CompVis `ldm/modules/encoders/modules.py` `ClassEmbedder`, the cin256 models) keep
their label embedding as `cond_stage_model.embedding.weight`, one row per class (plus the null class).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights

from ldm.checkpoints.build import aligned
from ldm.checkpoints.text_map import fit_clip_keys
from ldm.nn.conditioners import ClassConditioner, TextConditioner, tiny_tokenizer_path

TOKENIZER_METADATA_KEY = "ldm.tokenizer"
# The files transformers writes for a CLIP BPE tokenizer: tokenizer.json (the `tokenizers` backend, v5) or
# vocab.json + merges.txt (`CLIPTokenizer.vocab_files_names`, v4), plus the settings.
_TOKENIZER_FILES = (
    "tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json",
)  # fmt: skip
# Entries transformers adds to configs that describe the machine and session, not the model.
_LOCAL_KEYS = ("_name_or_path", "name_or_path", "is_local", "local_files_only", "_commit_hash", "cache_dir")


def portable_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """A config dict without the entries that record where it was loaded from (local paths, cache state)."""
    return {k: v for k, v in config.items() if k not in _LOCAL_KEYS}


def tokenizer_to_metadata(tokenizer: Any) -> str:
    """The tokenizer's files as one JSON string (file name -> text) for a safetensors metadata entry."""
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        files = {}
        for name in _TOKENIZER_FILES:
            path = Path(tmp) / name
            if path.is_file():
                files[name] = path.read_text(encoding="utf-8")
    if "tokenizer.json" not in files and "vocab.json" not in files:
        raise ValueError(f"the tokenizer wrote none of tokenizer.json / vocab.json, only {sorted(files)}")
    settings = json.loads(files.get("tokenizer_config.json", "{}"))
    files["tokenizer_config.json"] = json.dumps(portable_config(settings), indent=2, sort_keys=True)
    return json.dumps(files, sort_keys=True)


@contextmanager
def tokenizer_folder(metadata: Mapping[str, str]) -> Iterator[str | None]:
    """A temporary folder holding the tokenizer stored in a file's metadata (None if the file has none)."""
    if TOKENIZER_METADATA_KEY not in metadata:
        yield None
        return
    files = json.loads(metadata[TOKENIZER_METADATA_KEY])
    with tempfile.TemporaryDirectory(prefix="ldm-tokenizer-") as tmp:
        for name, text in files.items():
            if name not in _TOKENIZER_FILES:
                raise ValueError(f"unexpected tokenizer file {name!r} in the checkpoint's metadata")
            (Path(tmp) / name).write_text(text, encoding="utf-8")
        yield tmp


def build_text_encoder(
    state_dict: Mapping[str, torch.Tensor],
    config: Mapping[str, Any],
    tokenizer: str,
    layer: str | int,
    tokenizer_subfolder: str | None = None,
) -> TextConditioner:
    """A frozen TextConditioner with the given CLIP weights (classic `text_model.*` keys).

    `tokenizer`: a local folder (or its parent holding `tokenizer/`), "tiny" (the bundled one) or a hub
    id (with `tokenizer_subfolder` for a pipeline repo); one that cannot be found is an error that says to
    pass `tokenizer=`, never another tokenizer.
    """
    if tokenizer == "tiny":
        tokenizer = str(tiny_tokenizer_path())
    tok_subfolder = tokenizer_subfolder
    if tok_subfolder is None and (Path(tokenizer) / "tokenizer").is_dir():
        tok_subfolder = "tokenizer"
    with init_empty_weights():
        cond = TextConditioner(
            config=portable_config(config),
            pretrained=False,
            tokenizer=tokenizer,
            tokenizer_subfolder=tok_subfolder,
            layer=layer,
        )
    fitted, leftover = fit_clip_keys(state_dict, cond.transformer.state_dict().keys())
    missing, _ = cond.transformer.load_state_dict(aligned(fitted), strict=False, assign=True)
    if missing or leftover:
        raise ValueError(f"text encoder: missing weights {missing[:5]}, unused {sorted(leftover)[:5]}")
    return cond.eval()


def class_conditioner_config(cond: ClassConditioner) -> dict[str, Any]:
    """The arguments that rebuild `cond` (JSON values)."""
    names = list(cond.class_names) if cond.class_names is not None else None
    return {"n_classes": cond.n_classes, "embed_dim": cond.output_dim, "ucg": cond.ucg, "class_names": names}


def build_class_conditioner(
    state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any] | None = None
) -> ClassConditioner:
    """A frozen ClassConditioner with the given `embedding.weight`.

    Without `config` (a CompVis file), the table's rows are the classes plus the null class, as CompVis
    `ClassEmbedder` counts it (see `ClassConditioner`).
    """
    weight = state_dict["embedding.weight"]
    rows, dim = weight.shape
    config = dict(config) if config else {"n_classes": rows - 1, "embed_dim": dim, "ucg": True}
    cond = ClassConditioner(**config)
    cond.load_state_dict({"embedding.weight": weight})
    return cond.requires_grad_(False).eval()
