"""Text encoder state dicts: transformers `CLIPTextModel` (our layout) <-> open_clip (SD2 single files).

Our text encoder is a transformers `CLIPTextModel` for SD1 and SD2 alike (OpenCLIP ViT-H/14's
text tower is expressible as one: diffusers' SD2 pipelines ship it as `text_encoder/`, converted by
`convert_open_clip_checkpoint` in `loaders/single_file_utils.py`). Its canonical key layout here is the
classic `text_model.*` one: what
released SD1 files hold under `cond_stage_model.transformer.` and what every transformers version loads.
transformers >= 5.6 flattened `CLIPTextModel` (its own state dict lost the `text_model.` prefix), and
very old SD1 files lack it too, so `normalize_clip_keys` puts it back and `fit_clip_keys` adapts a
state dict to whatever module it is loaded into. `position_ids` buffers (persistent before transformers
4.31) are dropped everywhere.

open_clip names (SD2 `cond_stage_model.model.*`; diffusers `convert_open_clip_checkpoint`):
  token_embedding.weight, positional_embedding, ln_final, text_projection (width x embed, used as x @ P),
  logit_scale, transformer.resblocks.N.{ln_1, attn.in_proj_weight/bias (q, k, v stacked), attn.out_proj,
  ln_2, mlp.c_fc, mlp.c_proj}.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from ldm.checkpoints._rename import KeyMap, Rule, StateDict, indices_after

TEXT_MODEL = "text_model."
# Keys that belong to CLIP models but not to a CLIPTextModel's `text_model` (projection heads).
_HEAD_KEYS = ("text_projection.weight", "logit_scale")

_LAYER_SUB = (
    ("ln_1.", "layer_norm1."),
    ("ln_2.", "layer_norm2."),
    ("attn.out_proj.", "self_attn.out_proj."),
    ("attn.in_proj_", "self_attn.in_proj_"),  # split into q/k/v below
    ("mlp.c_fc.", "mlp.fc1."),
    ("mlp.c_proj.", "mlp.fc2."),
)
_QKV = ("q_proj", "k_proj", "v_proj")


def normalize_clip_keys(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """Any transformers CLIPTextModel state dict -> classic `text_model.*` keys, without position_ids."""
    out: StateDict = {}
    for key, value in state_dict.items():
        if key.endswith("position_ids"):
            continue
        if not key.startswith(TEXT_MODEL) and key not in _HEAD_KEYS:
            key = TEXT_MODEL + key
        out[key] = value
    return out


def fit_clip_keys(
    state_dict: Mapping[str, torch.Tensor], reference_keys: Iterable[str]
) -> tuple[StateDict, StateDict]:
    """Adapt a text-encoder state dict to a module's keys: (keys it has, leftovers such as text_projection).

    Pass `module.state_dict().keys()` as `reference_keys`; the `text_model.` prefix is added or removed to
    match the installed transformers version.
    """
    reference = set(reference_keys)
    prefixed = any(k.startswith(TEXT_MODEL) for k in reference)
    fitted: StateDict = {}
    leftover: StateDict = {}
    for key, value in normalize_clip_keys(state_dict).items():
        name = key if prefixed or not key.startswith(TEXT_MODEL) else key[len(TEXT_MODEL) :]
        (fitted if name in reference else leftover)[name] = value
    return fitted, leftover


def _open_clip_rules(num_layers: int) -> list[Rule]:
    """Rules open_clip -> transformers (text_projection is transposed separately)."""
    rules = [
        Rule("token_embedding.weight", "text_model.embeddings.token_embedding.weight"),
        Rule("positional_embedding", "text_model.embeddings.position_embedding.weight"),
        Rule("ln_final.", "text_model.final_layer_norm."),
        Rule("text_projection", "text_projection.weight"),
        Rule("logit_scale", "logit_scale"),
    ]
    rules += [
        Rule(f"transformer.resblocks.{i}.", f"text_model.encoder.layers.{i}.", _LAYER_SUB)
        for i in range(num_layers)
    ]
    return rules


def open_clip_to_transformers(state_dict: Mapping[str, torch.Tensor], *, strict: bool = True) -> StateDict:
    """open_clip text tower keys (no `cond_stage_model.model.` prefix) -> CLIPTextModel `text_model.*` keys.

    `text_projection` becomes `text_projection.weight` (transposed, as CLIPTextModelWithProjection holds
    it) and `logit_scale` is kept, so nothing is lost; `fit_clip_keys` sets both aside for a CLIPTextModel.
    """
    sd = {k: v for k, v in state_dict.items() if k != "attn_mask"}  # a buffer, rebuilt by open_clip
    layers = len(indices_after(sd, "transformer.resblocks."))
    out = KeyMap(_open_clip_rules(layers)).apply(sd, what="open_clip_to_transformers", strict=strict)
    for key in [k for k in out if ".self_attn.in_proj_" in k]:
        stacked = out.pop(key)
        base, kind = key.rsplit(".in_proj_", 1)  # kind: "weight" | "bias"
        for name, part in zip(_QKV, stacked.chunk(3, dim=0)):
            out[f"{base}.{name}.{kind}"] = part
    if "text_projection.weight" in out:
        out["text_projection.weight"] = out["text_projection.weight"].t().contiguous()
    return out


def transformers_to_open_clip(state_dict: Mapping[str, torch.Tensor], *, strict: bool = True) -> StateDict:
    """CLIPTextModel keys (either prefix convention) -> open_clip text tower keys (no prefix)."""
    sd = normalize_clip_keys(state_dict)
    layers = len(indices_after(sd, "text_model.encoder.layers."))
    for i in range(layers):
        for kind in ("weight", "bias"):
            base = f"text_model.encoder.layers.{i}.self_attn"
            parts = [sd.pop(f"{base}.{name}.{kind}", None) for name in _QKV]
            if all(p is not None for p in parts):
                sd[f"{base}.in_proj_{kind}"] = torch.cat(parts, dim=0)
            elif any(p is not None for p in parts):
                raise KeyError(f"transformers_to_open_clip: layer {i} has only some of q/k/v_proj.{kind}")
    if "text_projection.weight" in sd:
        sd["text_projection.weight"] = sd["text_projection.weight"].t().contiguous()
    inverse = KeyMap(_open_clip_rules(layers)).inverted()
    return inverse.apply(sd, what="transformers_to_open_clip", strict=strict)


def infer_clip_text_config(
    state_dict: Mapping[str, torch.Tensor], *, hidden_act: str = "quick_gelu", head_width: int = 64
) -> dict[str, Any]:
    """A `CLIPTextConfig` dict read off the weight shapes (CLIPTextModel layout, either prefix).

    Shapes do not fix the head count: it is hidden_size / `head_width`, and both SD text encoders use
    64-wide heads (ViT-L/14: 768 / 12, OpenCLIP ViT-H/14: 1024 / 16). `hidden_act`: "quick_gelu" for
    OpenAI CLIP (SD1), "gelu" for OpenCLIP (SD2).
    """
    if head_width <= 0:
        raise ValueError(f"head_width must be positive, got {head_width}")
    sd = normalize_clip_keys(state_dict)
    vocab, hidden = sd["text_model.embeddings.token_embedding.weight"].shape
    positions = sd["text_model.embeddings.position_embedding.weight"].shape[0]
    proj = sd.get("text_projection.weight")
    return {
        "model_type": "clip_text_model",
        "architectures": ["CLIPTextModel"],
        "vocab_size": int(vocab),
        "hidden_size": int(hidden),
        "intermediate_size": int(sd["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0]),
        "num_hidden_layers": len(indices_after(sd, "text_model.encoder.layers.")),
        "num_attention_heads": max(1, int(hidden) // head_width),
        "max_position_embeddings": int(positions),
        "projection_dim": int(proj.shape[0]) if proj is not None else int(hidden),
        "hidden_act": hidden_act,
        "layer_norm_eps": 1e-5,
    }


def drop_last_text_layers(
    state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any], count: int
) -> tuple[StateDict, dict[str, Any]]:
    """Remove the last `count` encoder layers (weights and config), e.g. to turn SD2's penultimate-layer
    conditioning into a model whose last layer is that one, which is how diffusers stores SD2."""
    layers = int(config["num_hidden_layers"])
    keep = layers - count
    if count < 0 or keep < 1:
        raise ValueError(f"cannot drop {count} of {layers} text encoder layers")
    sd = normalize_clip_keys(state_dict)
    gone = tuple(f"text_model.encoder.layers.{i}." for i in range(keep, layers))
    return {k: v for k, v in sd.items() if not k.startswith(gone)}, {**config, "num_hidden_layers": keep}
