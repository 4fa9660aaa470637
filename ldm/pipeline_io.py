"""`load_pipeline` and `save_pipeline`: a Pipeline from / to any checkpoint format we read.

Formats: our own folder ("ldm": `ldm_pipeline.json` with every architecture argument, `model.safetensors` in
the original single-file layout, `tokenizer/`), an original single file (`.ckpt` / `.safetensors`,
architecture read off the weights), and a diffusers folder. Networks are created on empty weights and the
loaded tensors assigned (ldm.checkpoints.build), so a full-size model loads without a random init.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights

from ldm.checkpoints import (
    detect_format,
    fit_clip_keys,
    infer_clip_text_config,
    load_diffusers_folder,
    load_single_file,
    save_diffusers_folder,
    save_single_file,
)
from ldm.checkpoints.build import build_unet, build_vae, infer_unet_kwargs, infer_vae_kwargs
from ldm.diffusion.schedule import NoiseSchedule
from ldm.nn.conditioners import TextConditioner, tiny_tokenizer_path
from ldm.pipeline import Pipeline

LDM_CONFIG = "ldm_pipeline.json"
LDM_WEIGHTS = "model.safetensors"
# Where SD's tokenizers live when a single file names none (needs the hub or its cache).
DEFAULT_TOKENIZERS = {
    "clip": "openai/clip-vit-large-patch14",
    "open_clip": "stabilityai/stable-diffusion-2-1",
}


def build_text_encoder(
    state_dict: dict[str, torch.Tensor], config: dict[str, Any], tokenizer: str, layer: str | int
) -> TextConditioner:
    """A frozen TextConditioner with the given CLIP weights (classic `text_model.*` keys)."""
    tok_subfolder = "tokenizer" if (Path(tokenizer) / "tokenizer").is_dir() else None
    with init_empty_weights():
        cond = TextConditioner(
            config=config,
            pretrained=False,
            tokenizer=tokenizer,
            tokenizer_subfolder=tok_subfolder,
            layer=layer,
        )
    fitted, leftover = fit_clip_keys(state_dict, cond.transformer.state_dict().keys())
    missing, unexpected = cond.transformer.load_state_dict(fitted, strict=False, assign=True)
    if missing or leftover:
        raise ValueError(f"text encoder: missing weights {missing[:5]}, unused {sorted(leftover)[:5]}")
    return cond.eval()


def _schedule(config: dict[str, Any] | None) -> NoiseSchedule:
    return NoiseSchedule.from_diffusers_config(config) if config else NoiseSchedule()


def load_pipeline(
    path: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    use_ema: bool = True,
    allow_pickle: bool = False,
    prediction_type: str | None = None,
    tokenizer: str | None = None,
) -> Pipeline:
    """A Pipeline from our folder, an original single file or a diffusers folder (see the module doc).

    `prediction_type` overrides what the checkpoint says ("epsilon", "v_prediction", "sample"): an original
    SD2 file does not say whether it is v or eps, diffusers guesses from `global_step`; we default to eps and
    warn. `tokenizer` names a local folder or hub id for single files without one.
    """
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"checkpoint not found: {root}")
    if root.is_dir() and (root / LDM_CONFIG).is_file():
        pipe = _load_ldm_folder(root, use_ema, prediction_type)
    else:
        kind = detect_format(root)
        if kind == "diffusers":
            pipe = _load_diffusers(root, allow_pickle, prediction_type)
        elif kind == "single_file":
            pipe = _load_single(root, use_ema, allow_pickle, prediction_type, tokenizer)
        else:
            pipe = _load_run(root, use_ema, prediction_type, tokenizer)
    return pipe.to(device=device, dtype=dtype)


def _load_ldm_folder(root: Path, use_ema: bool, prediction_type: str | None) -> Pipeline:
    cfg = json.loads((root / LDM_CONFIG).read_text())
    ckpt = load_single_file(root / LDM_WEIGHTS, use_ema=use_ema)
    c = ckpt.components
    return Pipeline(
        build_unet(c["unet"], cfg["unet"]),
        build_vae(c["vae"], cfg["vae"]),
        build_text_encoder(
            c["text_encoder"], cfg["text_encoder"], str(root / "tokenizer"), cfg["text_layer"]
        ),
        _schedule(cfg["scheduler"]),
        prediction_type or cfg["prediction_type"],
        cfg.get("sample_size"),
        tokenizer_source=str(root / "tokenizer"),
    )


def _load_diffusers(root: Path, allow_pickle: bool, prediction_type: str | None) -> Pipeline:
    folder = load_diffusers_folder(root, allow_pickle=allow_pickle)
    if folder.vae is None or folder.text_encoder is None or folder.tokenizer_path is None:
        raise ValueError(f"{root}: a diffusers folder needs vae/, text_encoder/ and tokenizer/ to sample")
    sched = folder.scheduler_config or {}
    return Pipeline(
        build_unet(folder.unet, folder.unet_kwargs),
        build_vae(folder.vae, folder.vae_kwargs),
        build_text_encoder(
            folder.text_encoder, folder.text_encoder_config, str(folder.tokenizer_path), "last"
        ),
        _schedule(sched),
        prediction_type or sched.get("prediction_type", "epsilon"),
        folder.sample_size,
        tokenizer_source=str(folder.tokenizer_path),
    )


def _load_single(
    root: Path, use_ema: bool, allow_pickle: bool, prediction_type: str | None, tokenizer: str | None
) -> Pipeline:
    ckpt = load_single_file(root, use_ema=use_ema, allow_pickle=allow_pickle)
    c = ckpt.components
    if not c.get("text_encoder") or not c.get("vae"):
        raise ValueError(f"{root}: sampling needs the autoencoder and text encoder in the file")
    meta = json.loads(ckpt.metadata["ldm"]) if "ldm" in ckpt.metadata else {}
    fmt = ckpt.text_encoder_format or "clip"
    if prediction_type is None and "prediction_type" not in meta and fmt == "open_clip":
        warnings.warn(
            f"{root}: an SD2 file does not say whether it predicts eps or v; using eps. "
            "Pass prediction_type='v_prediction' for 768-v models.",
            stacklevel=3,
        )
    tokenizer = tokenizer or meta.get("tokenizer") or DEFAULT_TOKENIZERS[fmt]
    if tokenizer == "tiny":
        tokenizer = str(tiny_tokenizer_path())
    return Pipeline(
        build_unet(c["unet"], meta.get("unet") or infer_unet_kwargs(c["unet"])),
        build_vae(c["vae"], meta.get("vae") or infer_vae_kwargs(c["vae"])),
        build_text_encoder(
            c["text_encoder"],
            meta.get("text_encoder") or ckpt.text_encoder_config(),
            tokenizer,
            meta.get("text_layer", ckpt.text_layer),
        ),
        _schedule(meta.get("scheduler")),
        prediction_type or meta.get("prediction_type", "epsilon"),
        meta.get("sample_size"),
        tokenizer_source=tokenizer,
    )


def _run_files(path: Path) -> tuple[Path, Path | None]:
    """(checkpoint, resolved config or None) for a run folder or a .ckpt (inside one, or alone)."""
    ckpt = path / "checkpoints" / "last.ckpt" if path.is_dir() else path
    if not ckpt.is_file():
        raise FileNotFoundError(f"{path}: no checkpoints/last.ckpt in this run folder")
    root = path if path.is_dir() else path.parent.parent
    config = root / "config_resolved.yaml"
    return ckpt, config if config.is_file() else None


def _load_run(path: Path, use_ema: bool, prediction_type: str | None, tokenizer: str | None) -> Pipeline:
    """A Pipeline from a LatentDiffusionSystem checkpoint (weights_only): architecture from the run's
    resolved config when there is one, else read off the weights; EMA weights for the UNet when kept."""
    from omegaconf import OmegaConf

    ckpt_path, config_path = _run_files(path)
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    sd = ckpt["state_dict"]
    parts = {p: {k[len(p) :]: v for k, v in sd.items() if k.startswith(p)} for p in ("unet.", "autoencoder.")}
    prefix = "conditioner.transformer."
    text = {k.removeprefix(prefix): v for k, v in sd.items() if k.startswith(prefix)}
    if not parts["unet."] or not text:
        raise ValueError(f"{ckpt_path} is not a text-conditioned latent diffusion run")
    if use_ema and "ema" in ckpt:
        parts["unet."].update(ckpt["ema"]["shadow"])
    run_cfg = OmegaConf.to_container(OmegaConf.load(config_path)) if config_path else {}
    model = run_cfg.get("model", {})
    unet_kwargs = {k: v for k, v in model.get("unet", {}).items() if not k.startswith("_")} or None
    cond = model.get("conditioner", {})
    tok = tokenizer or cond.get("tokenizer") or cond.get("version")
    if tok is None:
        raise ValueError(f"{ckpt_path}: no run config names the tokenizer; pass tokenizer=PATH")
    vae_kwargs = infer_vae_kwargs(parts["autoencoder."], scale_factor=ckpt.get("scale_factor", 0.18215))
    schedule = {k: v for k, v in model.get("schedule", {}).items() if not k.startswith("_")}
    resolution = run_cfg.get("data", {}).get("resolution")
    f = 2 ** (len(vae_kwargs["ch_mult"]) - 1)
    return Pipeline(
        build_unet(parts["unet."], unet_kwargs),
        build_vae(parts["autoencoder."], vae_kwargs),
        build_text_encoder(
            text, cond.get("config") or infer_clip_text_config(text), tok, cond.get("layer", "last")
        ),
        NoiseSchedule(**schedule) if schedule else NoiseSchedule(),
        prediction_type or ckpt.get("prediction_type") or model.get("prediction_type", "epsilon"),
        sample_size=resolution // f if resolution else None,
    )


def pipeline_config(pipe: Pipeline) -> dict[str, Any]:
    """Every argument needed to rebuild `pipe`'s networks and schedule, as plain JSON values."""

    def plain(kwargs: dict[str, Any]) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()}

    return {
        "unet": plain(pipe.unet.config),
        "vae": plain(pipe.vae.config),
        "text_encoder": pipe.text_encoder.transformer.config.to_dict(),
        "text_layer": pipe.text_encoder.layer,
        "scheduler": pipe.schedule.to_diffusers_config(pipe.prediction_type),
        "prediction_type": pipe.prediction_type,
        "sample_size": pipe.sample_size,
    }


def _components(pipe: Pipeline) -> dict[str, dict[str, torch.Tensor]]:
    text = {k.removeprefix("transformer."): v for k, v in pipe.text_encoder.state_dict().items()}
    return {"unet": pipe.unet.state_dict(), "vae": pipe.vae.state_dict(), "text_encoder": text}


def save_pipeline(pipe: Pipeline, path: str | os.PathLike, format: str = "ldm") -> Path:
    """Write `pipe` as "ldm" (our folder), "single_file" (.safetensors with our config in its metadata;
    loads in A1111 / ComfyUI / diffusers' from_single_file) or "diffusers" (a StableDiffusionPipeline
    folder). Returns the path written."""
    path = Path(path)
    cfg = pipeline_config(pipe)
    if format == "ldm":
        path.mkdir(parents=True, exist_ok=True)
        save_single_file(path / LDM_WEIGHTS, _components(pipe))
        pipe.tokenizer.save_pretrained(str(path / "tokenizer"))
        (path / LDM_CONFIG).write_text(json.dumps(cfg, indent=2))
    elif format == "single_file":
        # A single file holds no tokenizer: record where it came from ("tiny" for the bundled one).
        source = pipe.tokenizer_source
        if source and Path(source).resolve() == tiny_tokenizer_path().resolve():
            source = "tiny"
        meta = dict(cfg, tokenizer=source) if source else cfg
        save_single_file(path, _components(pipe), metadata={"ldm": json.dumps(meta)})
    elif format == "diffusers":
        c = _components(pipe)
        save_diffusers_folder(
            path,
            unet=c["unet"],
            unet_kwargs=cfg["unet"],
            vae=c["vae"],
            vae_kwargs=cfg["vae"],
            text_encoder=c["text_encoder"],
            text_encoder_config=pipe.text_encoder.transformer.config,
            tokenizer=pipe.tokenizer,
            scheduler_config=cfg["scheduler"],
            sample_size=pipe.sample_size,
            overwrite=True,
        )
    else:
        raise ValueError(f"unknown format {format!r}; use 'ldm', 'single_file' or 'diffusers'")
    return path
