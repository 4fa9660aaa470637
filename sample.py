"""Sample a checkpoint: `python sample.py ckpt=PATH prompt="a photo of a cat" n=4 sampler=euler_a`.

Writes one PNG per image (settings in its text chunk), `grid.png` and `metadata.jsonl` (one object per
image: file, prompt, negative_prompt, seed, sampler, steps, guidance_scale, height, width) to `out_dir`, or
to a fresh run folder under outputs/samples/. Options: configs/sample.yaml; samplers: configs/sampler/.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from PIL import Image
from tqdm import tqdm

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def read_prompts(cfg: DictConfig) -> list[str]:
    """The prompt, or the non-empty lines of prompts_file; exactly one of them must be given."""
    if (cfg.prompt is None) == (cfg.prompts_file is None):
        raise ValueError("give exactly one of prompt=... or prompts_file=...")
    if cfg.prompt is not None:
        return [str(cfg.prompt)]
    path = Path(cfg.prompts_file)
    if not path.is_file():
        raise FileNotFoundError(f"prompts_file not found: {path}")
    prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"prompts_file {path} has no prompts")
    return prompts


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
    canonical_sampler_name(cfg.sampler.name)


@hydra.main(version_base="1.3", config_path="configs", config_name="sample")
def main(cfg: DictConfig) -> None:
    import ldm
    from ldm.utils.images import image_grid, save_png

    check_settings(cfg)
    prompts = read_prompts(cfg)
    out_dir = Path(cfg.out_dir or HydraConfig.get().runtime.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    pipe = ldm.load_pipeline(
        cfg.ckpt, device=device, dtype=DTYPES[cfg.dtype], allow_pickle=cfg.allow_pickle,
        prediction_type=cfg.prediction_type, tokenizer=cfg.tokenizer,
    )  # fmt: skip
    size = pipe.sample_size * pipe.vae.downsampling_factor
    height, width = cfg.height or size, cfg.width or size
    steps = cfg.steps or cfg.sampler.steps
    seed = random.randrange(2**31) if cfg.seed is None else int(cfg.seed)
    init_image = Image.open(cfg.init_image).convert("RGB") if cfg.init_image else None
    mask = Image.open(cfg.mask).convert("RGB") if cfg.mask else None
    sampler_kwargs = dict(cfg.sampler.options, karras=cfg.sampler.karras)
    if cfg.sampler.spacing:
        sampler_kwargs["spacing"] = cfg.sampler.spacing

    jobs = [p for p in prompts for _ in range(cfg.n)]  # image i: prompt jobs[i], seed + i
    images, records = [], []
    bar = tqdm(total=len(jobs), desc="sampling", unit="img")
    for start in range(0, len(jobs), cfg.batch_size):
        batch = jobs[start : start + cfg.batch_size]
        out = pipe(
            batch, negative_prompt=cfg.negative_prompt, steps=steps, guidance_scale=cfg.guidance_scale,
            sampler=cfg.sampler.name, seed=seed + start, height=height, width=width, init_image=init_image,
            strength=cfg.strength if init_image is not None else None, mask=mask,
            guidance_rescale=cfg.guidance_rescale, decode_batch_size=cfg.decode_batch_size, **sampler_kwargs,
        )  # fmt: skip
        for i, (prompt, image) in enumerate(zip(batch, out), start=start):
            meta = dict(
                file=f"{i:05d}.png", prompt=prompt, negative_prompt=cfg.negative_prompt, seed=seed + i,
                sampler=cfg.sampler.name, steps=steps, guidance_scale=cfg.guidance_scale,
                height=height, width=width,
            )  # fmt: skip
            save_png(image, out_dir / meta["file"], dict(meta, ckpt=str(cfg.ckpt)))
            images.append(image)
            records.append(meta)
        bar.update(len(batch))
    bar.close()
    with open(out_dir / "metadata.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    if cfg.grid:
        image_grid(images, cols=cfg.n if len(prompts) > 1 else None).save(out_dir / "grid.png")
    print(f"wrote {len(images)} images to {out_dir}")


if __name__ == "__main__":
    main()
