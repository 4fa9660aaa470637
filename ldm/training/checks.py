"""Start-up checks of a composed run: mistakes that would otherwise surface hours later (or never),
each reported with the config keys involved and the fix."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def check_callbacks_fit_model(callbacks: Iterable[Any], model: Any) -> None:
    """Callbacks that cannot work with this model fail here, not after the training they were meant to
    serve: a checkpoint callback monitoring a metric the model never logs (Lightning's ModelCheckpoint
    looks the key up only at its first validation), or a sample grid on a model that cannot sample.
    Systems list what their validation logs in `val_metrics`; models without that list are not checked."""
    from ldm.training.callbacks import SampleGrid

    logged = getattr(model, "val_metrics", None)
    callbacks = list(callbacks)
    for cb in callbacks:
        monitor = getattr(cb, "monitor", None)
        if logged is not None and monitor and monitor.startswith("val/") and monitor not in logged:
            raise ValueError(
                f"a checkpoint callback monitors {monitor!r}, which {type(model).__name__} does not log "
                f"(its validation logs {', '.join(sorted(logged))}): set `callbacks.<name>.monitor` to one "
                f"of these, or pick the callbacks made for this model (experiments with an autoencoder "
                f"use callbacks=autoencoder)"
            )
    for cb in callbacks:
        if isinstance(cb, SampleGrid) and not hasattr(model, "to_pipeline"):
            raise ValueError(
                f"callbacks.sample_grid draws samples, which {type(model).__name__} cannot: set "
                f"callbacks.sample_grid=null, or callbacks=autoencoder for an autoencoder"
            )


def check_data_fits_model(datamodule: Any, model: Any) -> None:
    """The data's image side must give the latent side the model was built for (`model.sample_size`).
    Otherwise a run trains (and its sample grids draw) at a size the model was not made for, with the
    batch size of the other one: e.g. the digits model (8x8 latents, batch 64) on 256 px images gets
    64x64 latents, 64x the activations, and draws noise at its native size."""
    sample_size = getattr(model, "sample_size", None)
    resolution = getattr(datamodule, "resolution", None)
    autoencoder = getattr(model, "autoencoder", None)
    factor = getattr(autoencoder, "downsampling_factor", None)
    if not (sample_size and resolution and factor):
        return
    native = int(sample_size) * int(factor)
    if int(resolution) != native:
        raise ValueError(
            f"data.resolution={resolution} gives {int(resolution) // factor}x{int(resolution) // factor} "
            f"latents (the autoencoder downsamples by {factor}), but model.sample_size={sample_size} (the "
            f"model is built for {native} px images): set data.resolution={native}, "
            f"or model.sample_size={int(resolution) // factor} to train this model at {resolution} px "
            f"(then check data.batch_size: activations grow with the square of the side)"
        )


# ----------------------------------------------------------------------------------------------------------
# The composed config, before anything is built or read. Hydra itself refuses keys that are not in the
# config (struct mode: `model.ucg_rat=0.1` -> "Key 'ucg_rat' is not in struct"), but `+key=value` adds any
# key, and Hydra's instantiate passes every key of a `_target_` node to the constructor, which fails only
# when it is called, after the data and the other models were loaded (or, for a string where a number is
# expected, much later, in the middle of training). Every problem is collected and reported at once.


class ConfigError(ValueError):
    """Problems found in the composed config: one line per problem, each naming the key."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid config:\n" + "\n".join(f"  - {p}" for p in problems))


_SIMPLE = {"int", "float", "bool", "str", "None", "NoneType"}


def _allowed_types(annotation: Any) -> set[str] | None:
    """{"float", "None"} for `float | None` / Optional[float] (string annotations too); None when the
    annotation is anything else (Sequence, a class, Callable...): then the value is not checked."""
    import inspect
    import types
    import typing

    if annotation is inspect.Parameter.empty:
        return None
    if isinstance(annotation, str):
        text = annotation.replace("typing.", "").replace(" ", "")
        text = text.replace("Optional[", "None|").replace("Union[", "").replace("]", "").replace(",", "|")
        parts = set(text.split("|"))
        return {"None" if p == "NoneType" else p for p in parts} if parts <= _SIMPLE else None
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        parts = [_allowed_types(a) for a in typing.get_args(annotation)]
        return set().union(*parts) if all(p is not None for p in parts) else None
    if annotation is type(None):
        return {"None"}
    name = getattr(annotation, "__name__", None)
    return {name} if name in _SIMPLE else None


def _type_ok(value: Any, allowed: set[str]) -> bool:
    if value is None:
        return "None" in allowed
    if isinstance(value, bool):
        return "bool" in allowed
    if isinstance(value, int):
        return bool({"int", "float"} & allowed)
    if isinstance(value, float):
        return "float" in allowed
    if isinstance(value, str):
        return "str" in allowed
    return False  # a list or a mapping where a scalar is expected


def _signature(target: str):
    import inspect

    from hydra.utils import get_object

    return inspect.signature(get_object(target)).parameters


def _check_targets(node: Any, key: str, problems: list[str]) -> None:
    """Every `_target_` node under `node`: keys its constructor does not take, scalars of the wrong type."""
    import difflib
    import inspect

    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(node, ListConfig):
        for i in range(len(node)):
            child = node._get_node(i)
            if isinstance(child, (DictConfig, ListConfig)):
                _check_targets(child, f"{key}[{i}]", problems)
        return
    if not isinstance(node, DictConfig) or node._is_none():
        return
    prefix = f"{key}." if key else ""
    target = node.get("_target_") if "_target_" in node else None
    params = None
    if isinstance(target, str):
        try:
            params = _signature(target)
        except (ImportError, AttributeError) as e:
            problems.append(f"{prefix}_target_={target}: cannot be imported ({type(e).__name__}: {e})")
        except (ValueError, TypeError):  # no signature to compare with (a builtin such as timedelta)
            pass
    takes_any = params is not None and any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    name = target.rsplit(".", 1)[-1] if isinstance(target, str) else ""
    for k in node:
        if not isinstance(k, str) or (k.startswith("_") and k.endswith("_")):
            continue
        full = f"{prefix}{k}"
        if OmegaConf.is_missing(node, k):
            problems.append(f"{full}: missing (???): set it, e.g. `python train.py {full}=...`")
            continue
        if params is not None and not takes_any and k not in params:
            close = difflib.get_close_matches(k, list(params), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            problems.append(f"{full}: {name} takes no argument {k!r}{hint}")
            continue
        child = node._get_node(k)
        if isinstance(child, (DictConfig, ListConfig)) and not child._is_none():
            _check_targets(child, full, problems)
        if params is None or k not in params:
            continue
        allowed = _allowed_types(params[k].annotation)
        if allowed is None or (isinstance(child, DictConfig) and "_target_" in child):
            continue
        try:
            value = node[k]
        except Exception as e:  # an interpolation that does not resolve
            problems.append(f"{full}: cannot be resolved ({type(e).__name__}: {e})")
            continue
        if not _type_ok(value, allowed):
            want = " or ".join(sorted(t for t in allowed))
            problems.append(f"{full}={value!r} ({type(value).__name__}): {name} expects {want}")


def _autoencoder_shape(node: Any, key: str, problems: list[str]) -> tuple[int | None, int | None]:
    """(embed_dim, downsampling factor) from an autoencoder node: its AutoencoderKL arguments, or the
    metadata of the safetensors file that `load_autoencoder` reads (the header only, no weights)."""
    import json
    from pathlib import Path

    target = str(node.get("_target_", ""))
    kwargs: dict = {}
    if target.endswith("AutoencoderKL"):
        kwargs = dict(node)
    elif target.endswith("load_autoencoder") and node.get("path") is None:
        problems.append(
            f"{key}.path is null: the autoencoder's weights file or folder is needed (the fine-tuning "
            "experiments take it from model.init_from: set model.init_from=PATH)"
        )
    elif target.endswith("load_autoencoder") and node.get("path"):
        path = Path(str(node.path))
        if not path.exists():
            problems.append(f"{key}.path={str(path)!r}: no such file or folder")
            return None, None
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            from ldm.checkpoints.autoencoder_file import VAE_METADATA_KEY

            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
            kwargs = json.loads(meta[VAE_METADATA_KEY]) if VAE_METADATA_KEY in meta else {}
    embed_dim = kwargs.get("embed_dim")
    ch_mult = kwargs.get("ch_mult")
    factor = 2 ** (len(ch_mult) - 1) if ch_mult is not None else None
    return embed_dim, factor


def _context_dim(node: Any) -> int | None:
    """The conditioner's output width from its config (TextConditioner: config.hidden_size)."""
    target = str(node.get("_target_", ""))
    if target.endswith("TextConditioner") and node.get("config") is not None:
        return node.config.get("hidden_size")
    if target.endswith("ClassConditioner"):
        return node.get("embed_dim")
    return node.get("output_dim")


def _check_model(cfg: Any, problems: list[str]) -> None:
    model, data = cfg.get("model"), cfg.get("data")
    if model is None:
        return
    unet, ae, cond = model.get("unet"), model.get("autoencoder"), model.get("conditioner")
    embed_dim = factor = None
    if ae is not None and "_target_" in ae:
        embed_dim, factor = _autoencoder_shape(ae, "model.autoencoder", problems)
    if unet is not None and embed_dim is not None and unet.get("in_channels") not in (None, embed_dim):
        problems.append(
            f"model.unet.in_channels={unet.in_channels}, but the autoencoder's latents have {embed_dim} "
            f"channels (its embed_dim): set model.unet.in_channels={embed_dim} (and out_channels)"
        )
    if (model.get("lora") or model.get("trainable") == "lora") and not model.get("init_from"):
        problems.append("model.init_from is null: LoRA adapts released weights; set model.init_from=PATH")
    context = _context_dim(cond) if cond is not None else None
    if unet is not None and context is not None and unet.get("context_dim") not in (None, context):
        problems.append(
            f"model.unet.context_dim={unet.context_dim}, but the conditioner's output is {context} wide: "
            f"set model.unet.context_dim={context}"
        )
    resolution = data.get("resolution") if data is not None else None
    if factor and isinstance(resolution, int) and resolution % factor:
        problems.append(
            f"data.resolution={resolution} is not divisible by the autoencoder's downsampling factor "
            f"{factor}: use a multiple of {factor}, e.g. {max(factor, resolution // factor * factor)}"
        )
    bucket_step = (data.get("bucketing") or {}).get("step") if data is not None else None
    if factor and isinstance(bucket_step, int) and bucket_step % factor:
        problems.append(
            f"data.bucketing.step={bucket_step} is not a multiple of the autoencoder's factor {factor}"
        )
    prediction = model.get("prediction_type")
    if prediction is not None:
        from ldm.diffusion.denoiser import PREDICTION_TYPES, canonical_prediction_type

        try:
            canonical_prediction_type(str(prediction))
        except ValueError:
            problems.append(
                f"model.prediction_type={prediction!r}: the samplers take one of {PREDICTION_TYPES}"
            )


def _check_samplers(cfg: Any, problems: list[str]) -> None:
    from ldm.diffusion.samplers import canonical_sampler_name

    for name, cb in (cfg.get("callbacks") or {}).items():
        if cb is not None and str(cb.get("_target_", "")).endswith("SampleGrid") and cb.get("sampler"):
            try:
                canonical_sampler_name(str(cb.sampler))
            except KeyError as e:
                problems.append(f"callbacks.{name}.sampler={cb.sampler!r}: {e.args[0]}")


def _check_process(cfg: Any, problems: list[str]) -> None:
    """Settings of the training process itself: `malloc` (ldm/utils/malloc.py)."""
    from ldm.utils.malloc import CHOICES

    if cfg.get("malloc") is not None and cfg.malloc not in CHOICES:
        problems.append(f"malloc={cfg.malloc!r}: must be one of {', '.join(CHOICES)}")


def _check_data_paths(cfg: Any, problems: list[str]) -> None:
    """Local shard patterns must match files, and a folder dataset's root must exist (remote URLs and
    `pipe:` commands are not checked)."""
    from pathlib import Path

    from omegaconf import OmegaConf

    data = cfg.get("data")
    if data is None:
        return
    for key in ("urls", "val_urls"):
        if key not in data or OmegaConf.is_missing(data, key) or data.get(key) is None:
            continue
        from ldm.data.streams import expand_urls

        spec = (
            OmegaConf.to_container(data[key], resolve=True) if not isinstance(data[key], str) else data[key]
        )
        patterns = spec.split("::") if isinstance(spec, str) else spec
        for pattern in patterns:
            urls = expand_urls(pattern)
            local = [u for u in urls if "://" not in u and not u.startswith("pipe:")]
            if urls and len(local) == len(urls) and not any(Path(u).is_file() for u in local):
                problems.append(
                    f"data.{key}: {pattern!r} matches no file ({len(urls)} shard name(s) expanded)"
                )
    if str(data.get("_target_", "")).startswith("ldm.data.folder."):
        for key in ("root", "val_root"):
            if key in data and not OmegaConf.is_missing(data, key) and data.get(key) is not None:
                if not Path(str(data[key])).is_dir():
                    problems.append(f"data.{key}={str(data[key])!r}: no such folder")


def check_config(cfg: Any) -> None:
    """Check the composed config before anything is instantiated; raises ConfigError listing every problem:
    unknown keys and wrongly typed scalars of `_target_` constructors (compared with inspect.signature),
    missing values (???), image sizes the autoencoder cannot downsample, a UNet that does not fit the
    autoencoder's latents or the conditioner's context, unknown prediction types and sampler names, and
    local data paths that do not exist."""
    problems: list[str] = []
    for group in ("data", "model", "trainer", "callbacks", "logger"):
        if cfg.get(group) is not None:
            _check_targets(cfg._get_node(group), group, problems)
    for check in (_check_model, _check_samplers, _check_process, _check_data_paths):
        try:
            check(cfg, problems)
        except Exception:  # noqa: BLE001 - a value already reported above (a string for a number...)
            if not problems:
                raise
    if problems:
        raise ConfigError(problems)
