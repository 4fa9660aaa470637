"""`load_pipeline` and `save_pipeline`: a Pipeline from / to any checkpoint format we read.

Formats: our own folder ("ldm": `ldm_pipeline.json` with every architecture argument, `model.safetensors` in
the original single-file layout, `tokenizer/`), an original single file (`.ckpt` / `.safetensors`,
architecture read off the weights; ours also carry the config and the tokenizer in their metadata), and a
diffusers folder. Networks are created on empty weights and the loaded tensors assigned
(ldm.checkpoints.build), so a full-size model loads without a random init. This module imports
`ldm.pipeline`, never the reverse.

One rule holds across formats: the same weights give the same images whichever format they came in. A file
that says nothing about its scheduler gets the scheduler config Stable Diffusion was released with (which
leaves the timestep spacing to each sampler), exactly as its diffusers folder would.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from ldm.checkpoints import (
    atomic_write,
    detect_format,
    drop_last_text_layers,
    infer_clip_text_config,
    load_diffusers_folder,
    load_single_file,
    save_diffusers_folder,
    save_single_file,
)
from ldm.checkpoints.build import build_unet, build_vae, infer_unet_kwargs, infer_vae_kwargs
from ldm.checkpoints.conditioning import (
    TOKENIZER_METADATA_KEY,
    build_class_conditioner,
    build_text_encoder,
    class_conditioner_config,
    portable_config,
    tokenizer_folder,
    tokenizer_to_metadata,
)
from ldm.diffusion.schedule import NoiseSchedule
from ldm.pipeline import Pipeline

LDM_CONFIG = "ldm_pipeline.json"
LDM_WEIGHTS = "model.safetensors"
# The tokenizers released SD files were trained with, for files that carry none (needs the hub or its
# cache): (hub id, subfolder). SD2's pads with "!" (OpenCLIP's tokenizer), so it is the pipeline's own.
DEFAULT_TOKENIZERS = {
    "clip": ("openai/clip-vit-large-patch14", ""),
    "open_clip": ("stabilityai/stable-diffusion-2-1", "tokenizer"),
}
# The scheduler config of the released SD1 and SD2 pipelines (runwayml/stable-diffusion-v1-5 and
# stabilityai/stable-diffusion-2-1 `scheduler/scheduler_config.json`, less prediction_type): what
# diffusers' `from_single_file` gives a file that names none. No timestep_spacing: each sampler's default.
SD_SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
    "clip_sample": False,
    "set_alpha_to_one": False,
}
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")


def _schedule(config: dict[str, Any] | None) -> NoiseSchedule:
    return NoiseSchedule.from_diffusers_config(config or SD_SCHEDULER)


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
    warn. `tokenizer` (a local folder, "tiny" or a hub id) replaces the checkpoint's own; a single file we
    wrote carries its tokenizer, a community single file gets the one its model family was released with.
    """
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"checkpoint not found: {root}")
    if root.is_dir() and (root / LDM_CONFIG).is_file():
        pipe = _load_ldm_folder(root, use_ema, prediction_type, tokenizer)
    else:
        kind = detect_format(root)
        if kind == "diffusers":
            pipe = _load_diffusers(root, allow_pickle, prediction_type, tokenizer)
        elif kind == "single_file":
            pipe = _load_single(root, use_ema, allow_pickle, prediction_type, tokenizer)
        else:
            pipe = _load_run(root, use_ema, prediction_type, tokenizer)
    return pipe.to(device=device, dtype=dtype)


def _load_ldm_folder(
    root: Path, use_ema: bool, prediction_type: str | None, tokenizer: str | None
) -> Pipeline:
    cfg = json.loads((root / LDM_CONFIG).read_text())
    c = load_single_file(root / LDM_WEIGHTS, use_ema=use_ema).components
    if "class_conditioner" in cfg:
        cond = build_class_conditioner(c["class_embedder"], cfg["class_conditioner"])
    else:
        tok = tokenizer or str(root / "tokenizer")
        cond = build_text_encoder(c["text_encoder"], cfg["text_encoder"], tok, cfg["text_layer"])
    return Pipeline(
        build_unet(c["unet"], cfg["unet"]),
        build_vae(c["vae"], cfg["vae"]),
        cond,
        _schedule(cfg["scheduler"]),
        prediction_type or cfg["prediction_type"],
        cfg.get("sample_size"),
        cfg.get("sampling"),
    )


def _load_diffusers(
    root: Path, allow_pickle: bool, prediction_type: str | None, tokenizer: str | None
) -> Pipeline:
    folder = load_diffusers_folder(root, allow_pickle=allow_pickle)
    if folder.vae is None or folder.text_encoder is None or folder.tokenizer_path is None:
        raise ValueError(f"{root}: a diffusers folder needs vae/, text_encoder/ and tokenizer/ to sample")
    sched = folder.scheduler_config
    return Pipeline(
        build_unet(folder.unet, folder.unet_kwargs),
        build_vae(folder.vae, folder.vae_kwargs),
        build_text_encoder(
            folder.text_encoder, folder.text_encoder_config, tokenizer or str(folder.tokenizer_path), "last"
        ),
        _schedule(sched),
        prediction_type or (sched or {}).get("prediction_type", "epsilon"),
        folder.sample_size,
    )


def _single_file_tokenizer(
    root: Path, meta: dict[str, Any], stored: str | None, fmt: str, given: str | None
) -> tuple[str, str | None]:
    """(source, subfolder) of a single file's tokenizer: the one `given` by the caller, stored in the file,
    named by it (older files of ours), or, for a file written elsewhere, the one its family was released
    with. Never a guess for a file of ours."""
    if given:
        return given, None
    if stored is not None:
        return stored, None
    if meta.get("tokenizer"):
        return meta["tokenizer"], None
    if meta:
        raise ValueError(
            f"{root} was written without its tokenizer; pass tokenizer=PATH (the folder of the tokenizer "
            "the model was trained with, or 'tiny')"
        )
    return DEFAULT_TOKENIZERS[fmt]


def _load_single(
    root: Path, use_ema: bool, allow_pickle: bool, prediction_type: str | None, tokenizer: str | None
) -> Pipeline:
    ckpt = load_single_file(root, use_ema=use_ema, allow_pickle=allow_pickle)
    c = ckpt.components
    if not c.get("vae") or not (c.get("text_encoder") or c.get("class_embedder")):
        raise ValueError(f"{root}: sampling needs the autoencoder and a text encoder or class embedding")
    meta = json.loads(ckpt.metadata["ldm"]) if "ldm" in ckpt.metadata else {}
    fmt = ckpt.text_encoder_format or "clip"
    if prediction_type is None and "prediction_type" not in meta and fmt == "open_clip":
        warnings.warn(
            f"{root}: an SD2 file does not say whether it predicts eps or v; using eps. "
            "Pass prediction_type='v_prediction' for 768-v models.",
            stacklevel=3,
        )
    if c.get("class_embedder"):
        cond = build_class_conditioner(c["class_embedder"], meta.get("class_conditioner"))
    else:
        with tokenizer_folder(ckpt.metadata) as stored:
            source, subfolder = _single_file_tokenizer(root, meta, stored, fmt, tokenizer)
            cond = build_text_encoder(
                c["text_encoder"],
                meta.get("text_encoder") or ckpt.text_encoder_config(),
                source,
                meta.get("text_layer", ckpt.text_layer),
                tokenizer_subfolder=subfolder,
            )
    return Pipeline(
        build_unet(c["unet"], meta.get("unet") or infer_unet_kwargs(c["unet"])),
        build_vae(c["vae"], meta.get("vae") or infer_vae_kwargs(c["vae"])),
        cond,
        _schedule(meta.get("scheduler")),
        prediction_type or meta.get("prediction_type", "epsilon"),
        meta.get("sample_size"),
        meta.get("sampling"),
    )


def _run_files(path: Path) -> tuple[Path, Path | None]:
    """(checkpoint, resolved config or None) for a run folder or a .ckpt (inside one, or alone)."""
    ckpt = path / "checkpoints" / "last.ckpt" if path.is_dir() else path
    if not ckpt.is_file():
        raise FileNotFoundError(f"{path}: no checkpoints/last.ckpt in this run folder")
    root = path if path.is_dir() else path.parent.parent
    config = root / "config_resolved.yaml"
    return ckpt, config if config.is_file() else None


def _run_conditioner(
    sd: dict[str, torch.Tensor], cond_cfg: dict[str, Any], tokenizer: str | None, where: Path
) -> Any:
    """The run's frozen conditioner: a CLIP text encoder (`conditioner.transformer.*`) or a class-label
    embedding (`conditioner.embedding.weight`), its arguments from the run's config when there is one."""
    args = {k: v for k, v in cond_cfg.items() if not k.startswith("_")}
    if "conditioner.embedding.weight" in sd:
        keys = ("n_classes", "embed_dim", "ucg", "class_names")
        config = {k: args[k] for k in keys if k in args} if "n_classes" in args else None
        return build_class_conditioner({"embedding.weight": sd["conditioner.embedding.weight"]}, config)
    prefix = "conditioner.transformer."
    text = {k.removeprefix(prefix): v for k, v in sd.items() if k.startswith(prefix)}
    if not text:
        raise ValueError(f"{where}: a run with a text or class conditioner is needed to sample")
    tok = tokenizer or args.get("tokenizer") or args.get("version")
    if tok is None:
        raise ValueError(f"{where}: no run config names the tokenizer; pass tokenizer=PATH")
    config = args.get("config") or infer_clip_text_config(text)
    return build_text_encoder(text, config, tok, args.get("layer", "last"))


def _load_run(path: Path, use_ema: bool, prediction_type: str | None, tokenizer: str | None) -> Pipeline:
    """A Pipeline from a LatentDiffusionSystem checkpoint (weights_only): architecture from the run's
    resolved config when there is one, else read off the weights; EMA weights for the UNet when kept."""
    from omegaconf import OmegaConf

    ckpt_path, config_path = _run_files(path)
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    if "lora" in ckpt:  # a LoRA run keeps only its adapters: the base is its init_from
        return _load_lora_run(ckpt, prediction_type, tokenizer)
    sd = ckpt["state_dict"]
    parts = {p: {k[len(p) :]: v for k, v in sd.items() if k.startswith(p)} for p in ("unet.", "autoencoder.")}
    if not parts["unet."]:
        raise ValueError(f"{ckpt_path} is not a latent diffusion run (no unet.* weights)")
    if use_ema and "ema" in ckpt:
        parts["unet."].update(ckpt["ema"]["shadow"])
    run_cfg = OmegaConf.to_container(OmegaConf.load(config_path)) if config_path else {}
    model = run_cfg.get("model", {})
    unet_kwargs = {k: v for k, v in model.get("unet", {}).items() if not k.startswith("_")} or None
    cond = _run_conditioner(sd, model.get("conditioner", {}), tokenizer, ckpt_path)
    vae_kwargs = infer_vae_kwargs(parts["autoencoder."], scale_factor=ckpt.get("scale_factor", 0.18215))
    schedule = {k: v for k, v in model.get("schedule", {}).items() if not k.startswith("_")}
    resolution = run_cfg.get("data", {}).get("resolution")
    f = 2 ** (len(vae_kwargs["ch_mult"]) - 1)
    return Pipeline(
        build_unet(parts["unet."], unet_kwargs),
        build_vae(parts["autoencoder."], vae_kwargs),
        cond,
        NoiseSchedule(**schedule) if schedule else _schedule(None),
        prediction_type or ckpt.get("prediction_type") or model.get("prediction_type", "epsilon"),
        sample_size=resolution // f if resolution else None,
        recommended=model.get("sampling"),
    )


def _load_lora_run(ckpt: dict[str, Any], prediction_type: str | None, tokenizer: str | None) -> Pipeline:
    """The base model of a LoRA run (model.init_from) with the checkpoint's adapters added (unmerged)."""
    from ldm.adapters.lora import load_lora
    from ldm.adapters.policy import adapter_weights

    info, sd = ckpt["lora"], ckpt["state_dict"]
    alpha = float(info["rank"] if info.get("alpha") is None else info["alpha"])
    pipe = load_pipeline(
        info["init_from"], use_ema=bool(info.get("init_from_ema", False)), prediction_type=prediction_type,
        tokenizer=tokenizer,
    )  # fmt: skip
    load_lora(pipe.unet, adapter_weights(sd, "unet.", alpha))
    text = adapter_weights(sd, "conditioner.transformer.", alpha)
    if text:
        load_lora(pipe.conditioner.transformer, text)
    return pipe


def pipeline_config(pipe: Pipeline) -> dict[str, Any]:
    """Every argument needed to rebuild `pipe`'s networks and schedule, as plain JSON values (no paths)."""

    def plain(kwargs: dict[str, Any]) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()}

    cfg: dict[str, Any] = {"unet": plain(pipe.unet.config), "vae": plain(pipe.vae.config)}
    if pipe.is_class_conditional:
        cfg["class_conditioner"] = class_conditioner_config(pipe.conditioner)
    else:
        cfg["text_encoder"] = portable_config(pipe.text_encoder.transformer.config.to_dict())
        cfg["text_layer"] = pipe.text_encoder.layer
    cfg.update(
        scheduler=pipe.schedule.to_diffusers_config(pipe.prediction_type),
        prediction_type=pipe.prediction_type,
        sample_size=pipe.sample_size,
    )
    if pipe.recommended:  # the experiment's recommended sampler, steps and guidance scale
        cfg["sampling"] = dict(pipe.recommended)
    return cfg


def _components(pipe: Pipeline) -> dict[str, dict[str, torch.Tensor]]:
    parts = {"unet": pipe.unet.state_dict(), "vae": pipe.vae.state_dict()}
    if pipe.is_class_conditional:
        parts["class_embedder"] = pipe.conditioner.state_dict()
    else:
        parts["text_encoder"] = {
            k.removeprefix("transformer."): v for k, v in pipe.text_encoder.state_dict().items()
        }
    return parts


def text_encoder_format(pipe: Pipeline) -> str:
    """The single-file text layout of the model's family: "open_clip" (SD2, `cond_stage_model.model.*`) for
    an OpenCLIP text tower, recognised by its GELU (OpenAI's CLIP, SD1, uses quick_gelu), else "clip"."""
    act = pipe.text_encoder.transformer.config.hidden_act
    return "open_clip" if act == "gelu" else "clip"


def single_file_path(path: str | os.PathLike) -> Path:
    """`path` as a single file's name: `.safetensors` appended unless it ends in .safetensors or .ckpt."""
    path = Path(path)
    return path if path.suffix.lower() in SINGLE_FILE_SUFFIXES else path.with_name(path.name + ".safetensors")


def _save_diffusers(pipe: Pipeline, path: Path, cfg: dict[str, Any]) -> None:
    """A StableDiffusionPipeline folder. diffusers' pipeline conditions on the text encoder's last layer,
    so the blocks after the one we condition on are dropped (SD2: 23 of 24, as diffusers ships it)."""
    if pipe.is_class_conditional:
        raise ValueError(
            "diffusers has no pipeline for a class-label cross-attention LDM; save as 'ldm' or 'single_file'"
        )
    c = _components(pipe)
    text, text_config = c["text_encoder"], cfg["text_encoder"]
    unused = int(text_config["num_hidden_layers"]) - pipe.text_encoder.hidden_index
    if unused > 0:
        text, text_config = drop_last_text_layers(text, text_config, unused)
    save_diffusers_folder(
        path,
        unet=c["unet"],
        unet_kwargs=cfg["unet"],
        vae=c["vae"],
        vae_kwargs=cfg["vae"],
        text_encoder=text,
        text_encoder_config=text_config,
        tokenizer=pipe.tokenizer,
        scheduler_config=cfg["scheduler"],
        sample_size=pipe.sample_size,
        overwrite=True,
    )


def save_pipeline(pipe: Pipeline, path: str | os.PathLike, format: str = "ldm") -> Path:
    """Write `pipe` as "ldm" (our folder), "single_file" (.safetensors, appended when missing, in the text
    layout of the model's family, with our config and the tokenizer in its metadata; loads in A1111 /
    ComfyUI / diffusers' from_single_file) or "diffusers" (a StableDiffusionPipeline folder). Returns the
    path written. No file names a path of this machine, so every format samples the same elsewhere."""
    path = Path(path)
    cfg = pipeline_config(pipe)
    if format == "ldm":
        path.mkdir(parents=True, exist_ok=True)
        save_single_file(path / LDM_WEIGHTS, _components(pipe))
        if pipe.tokenizer is not None:
            pipe.tokenizer.save_pretrained(str(path / "tokenizer"))
        # Last and atomic (tmp + fsync + rename): the folder's config appears only once its weights are whole.
        text = json.dumps(cfg, indent=2)
        atomic_write(path / LDM_CONFIG, lambda tmp: Path(tmp).write_text(text))
    elif format == "single_file":
        path = single_file_path(path)
        meta = {"ldm": json.dumps(cfg)}
        fmt = "clip"
        if pipe.tokenizer is not None:
            meta[TOKENIZER_METADATA_KEY] = tokenizer_to_metadata(pipe.tokenizer)
            fmt = text_encoder_format(pipe)
        save_single_file(path, _components(pipe), text_encoder_format=fmt, metadata=meta)
    elif format == "diffusers":
        _save_diffusers(pipe, path, cfg)
    else:
        raise ValueError(f"unknown format {format!r}; use 'ldm', 'single_file' or 'diffusers'")
    return path
