"""Sample a checkpoint: `python sample.py ckpt=PATH prompt="a photo of a cat" n=4 sampler=euler_a`.

Writes one PNG per image (settings in its text chunk), `grid.png` and `metadata.jsonl` (one object per
image: file, prompt, negative_prompt, seed, sampler, steps, guidance_scale, height, width: the settings
actually used) to `out_dir`, or
to a fresh run folder under outputs/samples/. A class-conditional model takes `label=7` (or a class name,
`label=seven`, or a list `label=[1,7]`) instead of a prompt; its records carry `label` and `class_name`.
Sampler, steps and guidance scale not given default to the model's recommended settings (recorded by
training, `Pipeline.recommended`), else dpmpp_2m (its config's steps) and guidance 7.5.
Options: configs/sample.yaml; samplers: configs/sampler/.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, ListConfig
from PIL import Image

from ldm.training.resolvers import register_resolvers

register_resolvers()  # before Hydra composes: configs/sample.yaml's hydra.run.dir uses ldm.first_set

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def read_prompts(cfg: DictConfig) -> list[str]:
    """The prompt, or the non-empty lines of prompts_file; exactly one of them (or label) must be given."""
    if sum(x is not None for x in (cfg.prompt, cfg.prompts_file, cfg.label)) != 1:
        raise ValueError("give exactly one of prompt=..., prompts_file=... or label=... (class-conditional)")
    if cfg.label is not None:
        return []
    if cfg.prompt is not None:
        return [str(cfg.prompt)]
    from ldm.generate import read_prompt_file

    return read_prompt_file(cfg.prompts_file)


def check_settings(cfg: DictConfig) -> None:
    """Fail before loading the model: bad sizes, a missing checkpoint or image, an unknown sampler."""
    from ldm.diffusion.samplers import canonical_sampler_name

    for key in ("height", "width"):
        if cfg[key] is not None and (int(cfg[key]) <= 0 or int(cfg[key]) % 8):
            raise ValueError(f"{key}={cfg[key]} is not a positive multiple of 8")
    for key in ("ckpt", "init_image", "mask"):
        if cfg[key] is not None and not Path(cfg[key]).exists():
            raise FileNotFoundError(f"{key} not found: {cfg[key]}")
    if cfg.dtype not in DTYPES:
        raise ValueError(f"dtype={cfg.dtype}: expected one of {sorted(DTYPES)}")
    if cfg.get("sampler") is not None:
        canonical_sampler_name(cfg.sampler.name)


def read_labels(cfg: DictConfig, pipe) -> list[int]:
    """Class indices from `label` (an index, a class name, or a list of them); [] when sampling prompts."""
    if cfg.label is None:
        if pipe.is_class_conditional:
            raise ValueError("this model is class-conditional: give label=INDEX or label=CLASS_NAME")
        return []
    if not pipe.is_class_conditional:
        raise ValueError("label=... needs a class-conditional model; this one takes prompt=...")
    if cfg.negative_prompt:
        raise ValueError("a class-conditional model takes no negative_prompt (it guides with its null class)")
    given = list(cfg.label) if isinstance(cfg.label, ListConfig) else [cfg.label]
    return [pipe.conditioner.label_index(x) for x in given]


@hydra.main(version_base="1.3", config_path="configs", config_name="sample")
def main(cfg: DictConfig) -> None:
    import ldm
    from ldm.generate import generate, sampling_choice
    from ldm.utils.images import image_grid
    from ldm.utils.malloc import configure_malloc

    check_settings(cfg)
    prompts = read_prompts(cfg)
    configure_malloc(cfg.get("malloc", "reuse"))  # freed CPU memory stays for the next step
    out_dir = Path(cfg.out_dir or HydraConfig.get().runtime.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    pipe = ldm.load_pipeline(
        cfg.ckpt, device=device, dtype=DTYPES[cfg.dtype], allow_pickle=cfg.allow_pickle,
        prediction_type=cfg.prediction_type, tokenizer=cfg.tokenizer,
    )  # fmt: skip
    if cfg.get("lora"):  # a kohya or diffusers/PEFT LoRA file (or a LoRA run's export folder)
        pipe.load_lora(cfg.lora, scale=float(cfg.lora_scale))
    size = pipe.sample_size * pipe.vae.downsampling_factor
    height, width = cfg.height or size, cfg.width or size
    sampler, steps, guidance_scale = sampling_choice(cfg, pipe.recommended)
    seed = random.randrange(2**31) if cfg.seed is None else int(cfg.seed)
    init_image = Image.open(cfg.init_image).convert("RGB") if cfg.init_image else None
    mask = Image.open(cfg.mask).convert("RGB") if cfg.mask else None
    sampler_kwargs = dict(sampler["options"], karras=sampler["karras"])
    if sampler["spacing"]:
        sampler_kwargs["spacing"] = sampler["spacing"]
    labels = read_labels(cfg, pipe)
    conds = labels or prompts  # a class-conditional model guides with its null class, not a negative prompt

    jobs = [c for c in conds for _ in range(cfg.n)]  # image i: condition jobs[i], seed + i
    images, records = [], []
    for _, batch_records, batch_images in generate(
        pipe, jobs, out_dir, seed=seed, batch_size=cfg.batch_size, sampler=sampler["name"], steps=steps,
        guidance_scale=guidance_scale, negative_prompt=cfg.negative_prompt, labels=bool(labels),
        ckpt=str(cfg.ckpt), height=height, width=width, init_image=init_image,
        strength=cfg.strength if init_image is not None else None, mask=mask,
        guidance_rescale=cfg.guidance_rescale, decode_batch_size=cfg.decode_batch_size, **sampler_kwargs,
    ):  # fmt: skip
        records += batch_records
        images += batch_images
    with open(out_dir / "metadata.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    if cfg.grid:
        image_grid(images, cols=cfg.n if len(conds) > 1 else None).save(out_dir / "grid.png")
    print(f"wrote {len(images)} images to {out_dir}")


if __name__ == "__main__":
    main()
