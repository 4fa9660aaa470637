"""Images/s of a whole training step: our LatentDiffusionSystem against the loop of diffusers'
examples/text_to_image/train_text_to_image.py, same model, same data, same batch.

    python benchmarks/train_throughput.py [--size small] [--encoders sd|tiny] [--batch 4] [--px 64]
                                          [--repeats 5] [--cached] [--no-ema] [--threads N]
                                          [--malloc system|reuse] [--json out.json]

The model (benchmarks/sampling.py `save_folder`: an SD-shaped UNet, with SD1.x-sized encoders, the KL-f8
VAE and a CLIP ViT-L/14-shaped text transformer, or with the tiny test ones; random weights) is saved once
as a diffusers folder; ours loads it with `ldm.load_pipeline` into a LatentDiffusionSystem (eps-prediction,
uniform timesteps, unweighted MSE, EMA decay 0.9999, caption dropout 0.1, AdamW lr 1e-5), diffusers' side
loads the same folder into UNet2DConditionModel / AutoencoderKL / CLIPTextModel and EMAModel (the script's
`--use_ema`). One step, both sides: encode the batch of 64 px images with the VAE and sample the
posterior, encode the captions, noise at uniform timesteps, UNet, MSE, backward, AdamW step, zero_grad,
EMA update. diffusers' script tokenizes captions in its data loader; ours tokenizes inside the step
(counted). The two take turns after one warm-up step each; medians, and peak memory (ru_maxrss of the
process, so it only grows: the row order matters; on CUDA torch.cuda.max_memory_allocated per side).

`--cached`: our step from latents and text embeddings as the latent cache (ldm/data/latent_cache.py)
stores them, instead of images and captions, next to the same uncached diffusers loop; see `cached_batch`.
"""

from __future__ import annotations

import argparse
import functools
import resource
import tempfile
import warnings
from pathlib import Path

import bench_utils as bu
import torch
import torch.nn.functional as F

CAPTIONS = [f"a photo of the digit {w}" for w in
            ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")]  # fmt: skip


def ours_step(folder: Path, batch: dict, cached: bool, ema: bool):
    import ldm
    from ldm.diffusion.loss import DiffusionLoss
    from ldm.systems.diffusion import LatentDiffusionSystem

    pipe = ldm.load_pipeline(folder)
    # The optimizer as configs/model/ldm/*.yaml gives it (`_partial_: true`), so the system's own choices
    # (fused AdamW) apply as in a run.
    system = LatentDiffusionSystem(
        unet=pipe.unet, autoencoder=pipe.vae, conditioner=pipe.conditioner, schedule=pipe.schedule,
        loss=DiffusionLoss, optimizer=functools.partial(torch.optim.AdamW, lr=1e-5), ucg_rate=0.1,
        ema=dict(decay=0.9999, warmup=None) if ema else None,
    )  # fmt: skip
    system.train()
    warnings.filterwarnings("ignore", message=".*self.log.*")  # no Trainer here: logging is a no-op
    opt = system.configure_optimizers()
    opt = opt["optimizer"] if isinstance(opt, dict) else opt
    if cached:
        batch = cached_batch(system, batch)

    def step():
        loss = system.training_step(batch, 0)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if system.ema is not None:  # what LatentDiffusionSystem.optimizer_step does after the step
            system.ema.update(system.unet)

    return step


def cached_batch(system, batch: dict) -> dict:
    """The batch as the latent cache (ldm/data/latent_cache.py) hands it to training: the posterior's mean
    and std of each image and each caption's context (plus the empty caption's, for caption dropout),
    computed once here with the same functions the cache uses, outside the timed step."""
    from ldm.data.latent_cache import embed_captions, encode_images

    mean, std = encode_images(system.autoencoder, batch["image"])
    captions = list(batch["caption"])
    context = embed_captions(system.conditioner, captions)
    null = embed_captions(system.conditioner, [""]).expand(len(captions), -1, -1)
    return {"latent_mean": mean, "latent_std": std, "context": context, "uncond_context": null,
            "caption": captions}  # fmt: skip


def diffusers_step(folder: Path, batch: dict, ema: bool):
    """The body of train_text_to_image.py's training loop (no accelerate, SNR weighting or offset noise: the
    script's defaults), written out again; with `ema`, its `--use_ema` (EMAModel, default decay 0.9999 and
    `--foreach_ema` off, stepped after each optimizer step)."""
    import diffusers
    from diffusers.training_utils import EMAModel
    from transformers import CLIPTextModel, CLIPTokenizer

    unet = diffusers.UNet2DConditionModel.from_pretrained(folder / "unet").train()
    vae = diffusers.AutoencoderKL.from_pretrained(folder / "vae").requires_grad_(False)
    text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder").requires_grad_(False)
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    scheduler = diffusers.DDPMScheduler.from_pretrained(folder / "scheduler")
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-5)
    ema_unet = EMAModel(unet.parameters(), model_cls=diffusers.UNet2DConditionModel, model_config=unet.config)
    ids = tokenizer(
        batch["caption"], max_length=tokenizer.model_max_length, padding="max_length", truncation=True,
        return_tensors="pt",
    ).input_ids  # fmt: skip
    pixels = batch["image"]

    def step():
        latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
        noise = torch.randn_like(latents)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],)).long()
        noisy = scheduler.add_noise(latents, noise, t)
        context = text_encoder(ids, return_dict=False)[0]
        pred = unet(noisy, t, context, return_dict=False)[0]
        loss = F.mse_loss(pred.float(), noise.float(), reduction="mean")
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if ema:
            ema_unet.step(unet.parameters())

    return step


def main(argv=None) -> dict:
    from sampling import save_folder

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="small", choices=["tiny", "small"])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--px", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--cached", action="store_true", help="ours from cached latents and text embeddings")
    p.add_argument("--encoders", default="sd", choices=["sd", "tiny"],
                   help="SD1.x-sized VAE and CLIP text encoder, or the tiny test ones")  # fmt: skip
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True, help="EMA of the UNet, both")
    bu.add_common_args(p)
    args = p.parse_args(argv)
    n = bu.threads(args.threads)
    before = bu.header("train_throughput", n, args.malloc)
    g = torch.Generator().manual_seed(0)
    batch = {
        "image": torch.rand(args.batch, 3, args.px, args.px, generator=g) * 2 - 1,
        "caption": [CAPTIONS[i % 10] for i in range(args.batch)],
    }
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_folder(Path(tmp) / args.size, args.size, args.encoders)
        steps = {
            "ours": ours_step(folder, batch, args.cached, args.ema),
            "diffusers": diffusers_step(folder, batch, args.ema),
        }
        times = bu.alternate(steps, args.repeats)
    med = {k: bu.median(v) for k, v in times.items()}
    rss_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(
        f"\n{args.size} UNet, {args.encoders} encoders, EMA {'on' if args.ema else 'off'}, "
        f"batch {args.batch} at {args.px} px, median of {args.repeats}\n"
    )
    print("| trainer | s/step | images/s |")
    print("|---|---|---|")
    for k, s in med.items():
        label = f"{k} (cached latents)" if k == "ours" and args.cached else k
        print(f"| {label} | {s:.3f} | {args.batch / s:.1f} |")
    ratio = med["ours"] / med["diffusers"]
    print(f"\nours/diffusers time per step: {ratio:.2f}; peak RSS of the process (both): {rss_gib:.2f} GiB")
    return bu.finish(
        "train_throughput", n, args, before,
        seconds_per_step=med, images_per_s={k: args.batch / s for k, s in med.items()},
        ratio=ratio, times=times, peak_rss_gib=rss_gib,
    )  # fmt: skip


if __name__ == "__main__":
    main()
