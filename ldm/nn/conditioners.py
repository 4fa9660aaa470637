"""Conditioners: turn a batch's conditioning (captions, class labels, nothing) into a cross-attention context.

Every conditioner is an ``nn.Module`` with ``output_dim`` (the UNet's ``context_dim``), ``forward(batch_cond)
-> context (B, L, output_dim)`` and ``unconditional(batch_size)``, the context classifier-free guidance and
caption/label dropout use for "no condition".

- ``TextConditioner``: a frozen transformers CLIP text model (CompVis ``ldm/modules/encoders/modules.py``
  ``FrozenCLIPEmbedder`` for SD1, ``FrozenOpenCLIPEmbedder`` with ``layer="penultimate"`` for SD2).
- ``ClassConditioner``: a label embedding (CompVis ``ClassEmbedder``), one context token.
- ``NullConditioner``: a constant zero context for unconditional models.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

# The architecture fields a pretrained checkpoint must agree on with a given `config` (the rest, such as
# dropout or token ids, do not change the shape of the context or the state dict).
_ARCH_KEYS = (
    "hidden_size",
    "num_attention_heads",
    "intermediate_size",
    "vocab_size",
    "max_position_embeddings",
)
_NAMED_LAYERS = {"last": -1, "penultimate": -2}


def tiny_tokenizer_path() -> Path:
    """Folder of the bundled tiny CLIP BPE tokenizer (made by ``ldm/assets/make_tiny_tokenizer.py``)."""
    return Path(__file__).resolve().parent.parent / "assets" / "tiny_clip_tokenizer"


def _is_local(source: str) -> bool:
    """True when `source` names an existing folder, so loading must not consult the Hub at all."""
    return Path(source).expanduser().exists()


def _hub_offline() -> bool:
    """Whether the Hugging Face Hub must not be contacted (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE)."""
    import huggingface_hub.constants

    flags = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("TRANSFORMERS_OFFLINE", ""))
    truthy = ("1", "ON", "YES", "TRUE")
    return bool(huggingface_hub.constants.HF_HUB_OFFLINE) or any(f.upper() in truthy for f in flags)


# A tokenizer's vocabulary: tokenizer.json (the `tokenizers` backend) or vocab.json (+ merges.txt).
_VOCAB_FILES = ("tokenizer.json", "vocab.json")


def _hub_cached(repo_id: str, subfolder: str) -> bool:
    """Whether the Hugging Face cache holds the vocabulary of `repo_id` (no network)."""
    from huggingface_hub import try_to_load_from_cache

    prefix = f"{subfolder.strip('/')}/" if subfolder else ""
    return any(isinstance(try_to_load_from_cache(repo_id, prefix + f), str) for f in _VOCAB_FILES)


def _load_tokenizer(source: str, subfolder: str) -> CLIPTokenizer:
    """CLIP tokenizer from a local folder, or a Hub id (its local cache; the network only when online).

    A tokenizer that cannot be found is an error that says what to pass, never a stand-in: another
    tokenizer gives other token ids, so other images, without any other sign. (transformers 5 builds an
    empty two-token tokenizer from a folder or an uncached Hub id without vocabulary files, hence the
    checks before and after loading.)
    """
    # transformers >= 5 has one tokenizers-backed CLIPTokenizer (CLIPTokenizerFast is an alias); on v4 the
    # fast class avoids the slow tokenizer's ftfy fallback. Both read vocab.json + merges.txt.
    import transformers

    cls = getattr(transformers, "CLIPTokenizerFast", CLIPTokenizer)
    hint = "pass tokenizer=PATH (a local tokenizer folder, or 'tiny')"
    if _is_local(source):
        root = Path(source).expanduser()
        if not any((root / subfolder / f).is_file() for f in _VOCAB_FILES):
            where = root / subfolder
            raise FileNotFoundError(f"{where} holds no tokenizer ({' or '.join(_VOCAB_FILES)}); {hint}")
        tokenizer = cls.from_pretrained(str(root), subfolder=subfolder, local_files_only=True)
    elif Path(source).expanduser().is_absolute() or source.startswith((".", "~")) or source.count("/") > 1:
        raise FileNotFoundError(f"tokenizer folder {source!r} does not exist; {hint}")
    elif _hub_cached(source, subfolder):
        tokenizer = cls.from_pretrained(source, subfolder=subfolder, local_files_only=True)
    elif _hub_offline():
        raise OSError(
            f"tokenizer {source!r} is not in the local Hugging Face cache and the Hub is offline "
            f"(HF_HUB_OFFLINE); {hint}"
        )
    else:
        try:
            tokenizer = cls.from_pretrained(source, subfolder=subfolder)
        except OSError as error:
            raise OSError(f"tokenizer {source!r} could not be loaded from the Hub; {hint}") from error
    if len(tokenizer.get_vocab()) <= len(tokenizer.all_special_tokens):
        raise OSError(f"tokenizer {source!r} loaded without a vocabulary; {hint}")
    return tokenizer


class _TextModelHolder(nn.Module):
    """Gives transformers >= 5's ``CLIPTextModel`` back the ``text_model`` level it had in v4.

    transformers 5 removed the ``CLIPTextModel.text_model`` wrapper (its state dict is ``embeddings.*``;
    the ``text_model.`` prefix is only added back in saved files). SD1 checkpoints store the text encoder
    as ``cond_stage_model.transformer.text_model.*`` (CompVis FrozenCLIPEmbedder wraps a v4
    ``CLIPTextModel``), so this holder keeps those key names native on either major version.
    """

    def __init__(self, model: CLIPTextModel):
        super().__init__()
        self.text_model = model

    @property
    def config(self) -> CLIPTextConfig:
        """The wrapped model's ``CLIPTextConfig``."""
        return self.text_model.config

    @property
    def dtype(self) -> torch.dtype:
        """Parameter dtype, as on a ``PreTrainedModel`` (diffusers pipelines read it)."""
        return self.text_model.dtype

    @property
    def device(self) -> torch.device:
        """Parameter device, as on a ``PreTrainedModel``."""
        return self.text_model.device

    def forward(self, *args, **kwargs):
        """Same call and output as ``CLIPTextModel.forward``."""
        return self.text_model(*args, **kwargs)

    def save_pretrained(self, path: str | Path, **kwargs) -> None:
        """Save in the transformers layout with ``text_model.*`` keys, as v4 (and every released file) has.

        transformers 5.x writes the bare ``embeddings.*`` names, which v4 (and tools built on it) would
        silently skip, leaving random weights; v5 strips the prefix again on load, so both versions read it.
        """
        state = {f"text_model.{k}": v for k, v in self.text_model.state_dict().items()}
        self.text_model.save_pretrained(path, state_dict=state, **kwargs)


def _wrap(model: CLIPTextModel) -> nn.Module:
    """``model`` itself on transformers 4 (already has ``.text_model``), else a ``_TextModelHolder``."""
    return model if isinstance(getattr(model, "text_model", None), nn.Module) else _TextModelHolder(model)


class TextConditioner(nn.Module):
    """CLIP text encoder giving the SD cross-attention context (B, max_length, hidden).

    CompVis ``ldm/modules/encoders/modules.py`` ``FrozenCLIPEmbedder`` (SD1: openai ViT-L/14,
    ``last_hidden_state``) and Stability-AI ``FrozenOpenCLIPEmbedder`` (SD2: OpenCLIP ViT-H/14 expressed as a
    transformers ``CLIPTextModel``, ``layer="penultimate"``).

    Args:
        version: local folder or Hub id of a ``CLIPTextModel`` (a full CLIP repo such as
            ``openai/clip-vit-large-patch14`` works, and so does a diffusers pipeline folder with
            ``subfolder="text_encoder"``). Existing local paths are loaded with ``local_files_only``.
        tokenizer: folder / Hub id of the tokenizer; ``"tiny"`` is the bundled tiny BPE tokenizer. Default:
            ``version`` (its ``tokenizer`` subfolder when ``subfolder`` is set: the diffusers layout).
        config: ``CLIPTextConfig`` keyword arguments. Without weights (``pretrained=False``) the model is
            built from it (tests, meta-device parameter counts, training from scratch). With weights it is
            the expected architecture: the checkpoint is checked against it, and its ``num_hidden_layers``
            is the depth ``layer`` counts from (see below).
        pretrained: load weights from ``version``; otherwise initialise randomly (from ``config``, or else
            from ``version``'s config file).
        layer: ``"last"`` (``last_hidden_state``; SD1), ``"penultimate"``
            (``final_layer_norm(hidden_states[-2])``; SD2, and A1111's "clip skip 2"), or a negative int -n
            for ``hidden_states[-n]`` (A1111's clip skip n).
            Earlier layers pass through ``final_layer_norm`` as OpenCLIP's ``ln_final`` does in SD2 and as
            diffusers' ``clip_skip`` does. Layers count from the end of the *declared* architecture
            (``config["num_hidden_layers"]``): diffusers stores SD2's text encoder with the unused 24th block
            dropped (23 layers), so with the 24-layer config "penultimate" is block 23 whether the checkpoint
            holds 23 blocks (diffusers folder: its last output) or 24 (original SD2 file): same context.
        max_length: tokens per caption (padded with the tokenizer's pad token, truncated; 77 in SD).
        freeze: eval mode and no gradients, kept in eval by ``train()`` (CompVis ``disabled_train``).
        subfolder / tokenizer_subfolder: subfolders of ``version`` / ``tokenizer`` to load from.

    No attention mask is passed to the text model, as in CompVis and diffusers' SD pipelines: padding
    tokens attend causally like any others, and the UNet sees all ``max_length`` positions.
    """

    def __init__(
        self,
        version: str | None = None,
        tokenizer: str | None = None,
        config: Mapping[str, Any] | None = None,
        pretrained: bool = True,
        layer: str | int = "last",
        max_length: int = 77,
        freeze: bool = True,
        subfolder: str | None = None,
        tokenizer_subfolder: str | None = None,
    ):
        super().__init__()
        # Hydra hands a DictConfig; CLIPTextConfig wants plain values.
        config = dict(config.items()) if config is not None else None
        model = self._build_model(version, subfolder, config, pretrained)
        self.transformer = _wrap(model)
        n_layers = model.config.num_hidden_layers
        n_declared = int(config.get("num_hidden_layers", n_layers)) if config else n_layers
        self.layer = layer
        self.hidden_index = self._resolve_layer(layer, n_declared, n_layers)
        self.max_length = max_length
        self.tokenizer = self._build_tokenizer(tokenizer, tokenizer_subfolder, version, subfolder)
        if len(self.tokenizer) > model.config.vocab_size:
            raise ValueError(
                f"tokenizer has {len(self.tokenizer)} tokens, the text model only {model.config.vocab_size}"
            )
        if max_length > model.config.max_position_embeddings:
            raise ValueError(f"max_length {max_length} > max_position_embeddings")
        self.frozen = freeze
        if freeze:
            self.requires_grad_(False)
            self.eval()

    @staticmethod
    def _build_model(
        version: str | None, subfolder: str | None, config: dict | None, pretrained: bool
    ) -> CLIPTextModel:
        """Load (``pretrained``) or build a ``CLIPTextModel`` with SDPA attention."""
        # SDPA instead of the eager matmul-softmax: same function (to float rounding, ~1e-6), less memory.
        if pretrained:
            if version is None:
                raise ValueError("pretrained=True needs `version` (a local folder or Hub id)")
            local = _is_local(version)
            model = CLIPTextModel.from_pretrained(
                str(Path(version).expanduser()) if local else version,
                subfolder=subfolder or "",
                local_files_only=local,
                attn_implementation="sdpa",
            )
            # transformers 5 keeps the checkpoint's dtype (e.g. fp16 files); v4 and our callers assume fp32.
            model = model.float()
            if config is not None:
                mismatched = {
                    k: (config[k], getattr(model.config, k))
                    for k in _ARCH_KEYS
                    if k in config and config[k] != getattr(model.config, k)
                }
                if mismatched:
                    raise ValueError(
                        f"checkpoint {version} does not match `config` (expected, found): {mismatched}; "
                        "override config=null to take the checkpoint's architecture"
                    )
            return model
        if config is not None:
            cfg = CLIPTextConfig(**config)
        elif version is not None:
            local = _is_local(version)
            cfg = CLIPTextConfig.from_pretrained(
                str(Path(version).expanduser()) if local else version,
                subfolder=subfolder or "",
                local_files_only=local,
            )
        else:
            raise ValueError("pretrained=False needs `config` (CLIPTextConfig kwargs) or `version`")
        return CLIPTextModel._from_config(cfg, attn_implementation="sdpa")

    @staticmethod
    def _resolve_layer(layer: str | int, n_declared: int, n_loaded: int) -> int:
        """Index into ``hidden_states`` (0 = embeddings, i = output of block i) that ``layer`` names."""
        offset = _NAMED_LAYERS.get(layer) if isinstance(layer, str) else layer
        if not isinstance(offset, int) or offset >= 0:
            raise ValueError(f"layer must be 'last', 'penultimate' or a negative int, got {layer!r}")
        index = n_declared + 1 + offset
        if n_loaded > n_declared or not 1 <= index <= n_loaded:
            raise ValueError(
                f"layer {layer!r} of a {n_declared}-layer text model needs block {index}, "
                f"but the model has {n_loaded} blocks"
            )
        return index

    @staticmethod
    def _build_tokenizer(
        tokenizer: str | None, tokenizer_subfolder: str | None, version: str | None, subfolder: str | None
    ) -> CLIPTokenizer:
        """Resolve the tokenizer source: explicit, bundled ``"tiny"``, or next to the text model."""
        if tokenizer == "tiny":
            return _load_tokenizer(str(tiny_tokenizer_path()), "")
        if tokenizer is not None:
            return _load_tokenizer(tokenizer, tokenizer_subfolder or "")
        if version is None:
            raise ValueError("no `version` to take the tokenizer from: pass `tokenizer` (a path, or 'tiny')")
        # diffusers pipeline folders keep text_encoder/ and tokenizer/ side by side.
        default_sub = "tokenizer" if subfolder else ""
        return _load_tokenizer(version, default_sub if tokenizer_subfolder is None else tokenizer_subfolder)

    @property
    def output_dim(self) -> int:
        """Width of the context (the UNet's ``context_dim``): 768 for SD1, 1024 for SD2."""
        return self.transformer.config.hidden_size

    @property
    def device(self) -> torch.device:
        """Device of the weights (token ids are moved there)."""
        return self.transformer.text_model.embeddings.token_embedding.weight.device

    def train(self, mode: bool = True) -> TextConditioner:
        """Switch train/eval, except that a frozen conditioner stays in eval (CompVis ``disabled_train``)."""
        return super().train(mode and not self.frozen)

    def tokenize(self, text: Sequence[str] | str) -> torch.Tensor:
        """Token ids (B, max_length): BOS, tokens, EOS, then pad tokens; long captions cut (EOS kept)."""
        text = [text] if isinstance(text, str) else list(text)
        batch = self.tokenizer(
            text, padding="max_length", max_length=self.max_length, truncation=True, return_tensors="pt"
        )
        return batch["input_ids"]

    def forward(self, text: Sequence[str] | str | torch.Tensor) -> torch.Tensor:
        """Context (B, max_length, output_dim) for captions or already-tokenized ids (B, L)."""
        input_ids = text if isinstance(text, torch.Tensor) else self.tokenize(text)
        if input_ids.device.type == "cpu" and len(input_ids) > 1:
            # Repeated captions (a digits batch has 10, caption dropout adds ""): each distinct one once,
            # rows are independent in CLIP (causal mask only). Found on the CPU, before the ids move to
            # the device, so no host-device sync.
            unique, inverse = torch.unique(input_ids, dim=0, return_inverse=True)
            if len(unique) < len(input_ids):
                return self._encode(unique.to(self.device, torch.long))[inverse.to(self.device)]
        return self._encode(input_ids.to(self.device, torch.long))

    def _encode(self, input_ids: torch.Tensor) -> torch.Tensor:
        n_blocks = self.transformer.config.num_hidden_layers
        if self.hidden_index == n_blocks:
            # last block: transformers already applied final_layer_norm.
            return self.transformer(input_ids=input_ids).last_hidden_state
        hidden = self.transformer(input_ids=input_ids, output_hidden_states=True).hidden_states
        return self.transformer.text_model.final_layer_norm(hidden[self.hidden_index])

    def encode(self, text: Sequence[str] | str | torch.Tensor) -> torch.Tensor:
        """Alias of ``forward`` (CompVis ``AbstractEncoder.encode``)."""
        return self(text)

    def unconditional(self, batch_size: int) -> torch.Tensor:
        """Context of the empty caption, (batch_size, max_length, D): the SD unconditional input for CFG.

        Computed once and expanded (a view): the empty caption is the same for every sample. Without
        gradients it is kept until the weights, device, dtype or autocast change, so caption dropout in
        training does not run the frozen text encoder once more every step (diffusers'
        train_text_to_image.py replaces dropped captions in the batch instead).
        """
        if torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters()):
            return self([""]).expand(batch_size, -1, -1)  # a trained text encoder: gradients flow
        device_type = self.device.type
        autocast = torch.is_autocast_enabled(device_type) and torch.get_autocast_dtype(device_type)
        # _version counts in-place writes (load_state_dict, optimizer steps); ids catch replaced tensors.
        key = (autocast, tuple((id(t), t._version, t.device, t.dtype) for t in self.transformer.parameters()))
        cached = self.__dict__.get("_null_context")
        if cached is None or cached[0] != key:
            with torch.no_grad():
                cached = self.__dict__["_null_context"] = (key, self([""]))
        return cached[1].expand(batch_size, -1, -1)

    def save_pretrained(self, path: str | Path) -> None:
        """Write text model and tokenizer to one folder, loadable as ``TextConditioner(version=path)``."""
        self.transformer.save_pretrained(path)
        self.tokenizer.save_pretrained(path)


class ClassConditioner(nn.Module):
    """Class-label embedding as a one-token context (B, 1, D) (CompVis ``ClassEmbedder``, LDM cin models).

    With ``ucg`` an extra row (index ``n_classes``) is the learned "null" class that label dropout and
    classifier-free guidance use. CompVis instead counts the null class inside ``n_classes`` (its last
    index), so a CompVis checkpoint with ``n_classes=1001`` is ours with ``n_classes=1000, ucg=True``; the
    state-dict key ``embedding.weight`` is the same.
    """

    def __init__(
        self, n_classes: int, embed_dim: int, ucg: bool = True, class_names: Sequence[str] | None = None
    ):
        super().__init__()
        if class_names is not None and len(class_names) != n_classes:
            raise ValueError(f"{len(class_names)} class_names for n_classes={n_classes}")
        self.n_classes = n_classes
        self.ucg = ucg
        # Names let a sampler ask for "seven" instead of 7; they are part of the exported config.
        self.class_names = [str(n) for n in class_names] if class_names is not None else None
        self.embedding = nn.Embedding(n_classes + int(ucg), embed_dim)

    def label_index(self, label: int | str) -> int:
        """The integer label of a class given by index (7, "7") or by name ("seven", case-insensitive)."""
        if isinstance(label, str) and not label.strip().lstrip("-").isdigit():
            names = [n.lower() for n in self.class_names or []]
            if label.strip().lower() not in names:
                known = f"one of {self.class_names}" if self.class_names else "an integer (no class names)"
                raise ValueError(f"unknown class {label!r}: expected {known}")
            return names.index(label.strip().lower())
        index = int(label)
        if not 0 <= index < self.n_classes:
            raise ValueError(f"class label {index} out of range [0, {self.n_classes})")
        return index

    @property
    def output_dim(self) -> int:
        """Context width (the UNet's ``context_dim``)."""
        return self.embedding.embedding_dim

    @property
    def null_class(self) -> int:
        """Label of the unconditional class."""
        if not self.ucg:
            raise ValueError("this ClassConditioner has no null class (ucg=False)")
        return self.n_classes

    def forward(self, labels: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """Context (B, 1, D) for integer labels of shape (B,) or (B, 1)."""
        labels = torch.as_tensor(labels, dtype=torch.long, device=self.embedding.weight.device).reshape(-1)
        return self.embedding(labels)[:, None, :]

    def unconditional(self, batch_size: int) -> torch.Tensor:
        """Context of the null class, (batch_size, 1, D)."""
        return self([self.null_class] * batch_size)


class NullConditioner(nn.Module):
    """Constant zero context (B, 1, D) for unconditional models.

    Zeros rather than ``None`` so an unchanged cross-attention UNet works: attention over one all-zero key
    puts weight 1 on a zero value, so cross-attention adds only its output bias, the same for every
    sample, i.e. no conditioning. (``None`` would make CompVis-style attention attend to the image tokens,
    which fails whenever ``context_dim`` differs from the block's width.)
    """

    def __init__(self, output_dim: int = 768):
        super().__init__()
        self.output_dim = output_dim
        # A buffer so the context follows .to(device, dtype); not saved (it carries no information).
        self.register_buffer("_zero", torch.zeros(1, 1, output_dim), persistent=False)

    def forward(self, cond: Sequence[Any] | torch.Tensor | int) -> torch.Tensor:
        """Zeros (B, 1, D), B from the batch's conditioning (any sequence or tensor) or an int."""
        batch_size = cond if isinstance(cond, int) else len(cond)
        return self._zero.expand(batch_size, -1, -1)

    def unconditional(self, batch_size: int) -> torch.Tensor:
        """Same zeros: an unconditional model has nothing to drop."""
        return self(batch_size)
