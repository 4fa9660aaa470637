"""Text-to-image end to end: our Pipeline against diffusers' StableDiffusionPipeline on the same folder.

    python benchmarks/sampling.py [--sizes tiny small] [--steps 20] [--batch 2] [--px N] [--repeats 3]
                                  [--compile] [--threads N] [--json out.json]

A tiny (tests/tiny.py UNET_KW) or small SD-shaped model (benchmarks/bench_utils.py `small`, its context
width set to the tiny CLIP text encoder's) with random weights is saved as a diffusers folder in a
temporary directory; `ldm.load_pipeline` and `StableDiffusionPipeline.from_pretrained` load the same
folder. Each call: prompt and negative prompt encoded, DPM-Solver++(2M) (diffusers'
DPMSolverMultistepScheduler / our `dpmpp_2m`) for `--steps` steps with classifier-free guidance 7.5 on
the same initial latents, VAE decode, images as tensors. The two pipelines take turns after one warm-up
call each; the table gives medians and the largest pixel difference between their images. `--compile`:
both UNets through `torch.compile` (inductor), the first call of each (compilation included) timed apart.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import bench_utils as bu
import torch

DEFAULT_PX = {"tiny": 64, "small": 256}


# The encoders of SD1.x: the KL-f8 autoencoder (configs/model/autoencoder/kl_f8.yaml) and the CLIP ViT-L/14
# text transformer's shape (configs/model/conditioner/clip_vit_l14.yaml: 12 layers, 768 wide), with the
# tiny tokenizer's vocabulary (the embedding table's size costs memory, not time).
SD_VAE_KW = dict(ch=128, ch_mult=[1, 2, 4, 4], num_res_blocks=2, scale_factor=0.18215)
SD_TEXT_CONFIG = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                      projection_dim=768)  # fmt: skip


def save_folder(path: Path, size: str, encoders: str = "tiny") -> Path:
    """The model of `size` as a diffusers folder (tests/tiny.py builder, random weights) with the tiny test
    VAE and CLIP text encoder (`encoders="tiny"`) or SD1.x-sized ones (`"sd"`)."""
    from tests.tiny import UNET_KW, save_tiny_sd_folder

    unet_kw = UNET_KW if size == "tiny" else bu.UNET_SIZES[size]
    if encoders == "tiny":
        return save_tiny_sd_folder(path, seed=11, unet_kw=unet_kw)
    return save_tiny_sd_folder(path, seed=11, unet_kw=unet_kw, vae_kw=SD_VAE_KW, text_config=SD_TEXT_CONFIG)


def run(size: str, args, tmp: Path) -> dict:
    import diffusers

    import ldm

    folder = save_folder(tmp / size, size)
    px = args.px or DEFAULT_PX[size]
    ours = ldm.load_pipeline(folder)
    theirs = diffusers.StableDiffusionPipeline.from_pretrained(
        folder, safety_checker=None, requires_safety_checker=False, local_files_only=True
    )
    theirs.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(theirs.scheduler.config)
    theirs.set_progress_bar_config(disable=True)
    latents = torch.randn(args.batch, 4, px // 8, px // 8, generator=torch.Generator().manual_seed(5))
    prompt, negative = "a photo of the digit seven", "blurry"
    common = dict(height=px, width=px)
    fns = {
        "ours": lambda: ours(
            prompt, negative_prompt=negative, num_images_per_prompt=args.batch, steps=args.steps,
            guidance_scale=7.5, sampler="dpmpp_2m", latents=latents, output="tensor", **common,
        ),
        "diffusers": lambda: theirs(
            [prompt] * args.batch, negative_prompt=[negative] * args.batch, num_inference_steps=args.steps,
            guidance_scale=7.5, latents=latents, output_type="pt", **common,
        ).images,
    }  # fmt: skip
    first = {}
    if args.compile:
        ours.unet, theirs.unet = torch.compile(ours.unet), torch.compile(theirs.unet)
    with torch.no_grad():
        first = {k: bu.timed(fn) for k, fn in fns.items()}  # with --compile: the compilation
        diff = (fns["ours"]() - fns["diffusers"]()).abs().max().item()
        times = bu.alternate(fns, args.repeats, warmup=0)
    med = {k: bu.median(v) for k, v in times.items()}
    row = {
        "size": size, "px": px, "batch": args.batch, "steps": args.steps, "ours_s": med["ours"],
        "diffusers_s": med["diffusers"], "ratio": med["ours"] / med["diffusers"], "times": times,
        "max_pixel_diff": diff, "first_call_s": first, "compile": args.compile, "load_after": bu.load(),
    }  # fmt: skip
    print(
        f"| {size} | {px} | {args.batch} | {args.steps} | {med['ours']:.2f} | {med['diffusers']:.2f} | "
        f"{row['ratio']:.2f} | {diff:.1e} | {row['load_after']:.2f} |",
        flush=True,
    )
    return row


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=["tiny", "small"], choices=list(DEFAULT_PX))
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--px", type=int, default=None, help="image side for every size (default per size)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--compile", action="store_true", help="torch.compile both UNets (inductor)")
    bu.add_common_args(p)
    args = p.parse_args(argv)
    n = bu.threads(args.threads)
    before = bu.header("sampling", n, args.malloc)
    print(f"DPM-Solver++(2M), CFG 7.5, same initial latents (median of repeats), compile={args.compile}\n")
    print("| size | px | images | steps | ours s | diffusers s | ours/diffusers | max pixel diff | load |")
    print("|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        rows = [run(size, args, Path(tmp)) for size in args.sizes]
    return bu.finish("sampling", n, args, before, rows=rows)


if __name__ == "__main__":
    main()
