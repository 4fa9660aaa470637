"""Our UNet against diffusers' UNet2DConditionModel holding the same weights, in one process.

    python benchmarks/unet_step.py [--sizes tiny small sd15] [--repeats 5] [--batch 2] [--latent N]
                                   [--threads N] [--channels-last] [--compile] [--no-lowering]
                                   [--no-fused-adamw]
                                   [--malloc system|reuse] [--json out.json]

Sizes (benchmarks/bench_utils.py): `tiny` and `small` (the SD1 layout at 1/5 the width) time a whole training
step (forward, MSE loss, backward, AdamW step, zero_grad), each network with the AdamW its framework trains
with: ours fused into one kernel per tensor as `LatentDiffusionSystem.configure_optimizers` builds it in full
precision (`--no-fused-adamw`: torch's default, as diffusers'), diffusers' as its
`examples/text_to_image/train_text_to_image.py` builds it (`torch.optim.AdamW` with torch's defaults); `sd15`
(configs/model/unet/sd15.yaml, 859.5M parameters) times the forward pass only, with no_grad. Latents are B x 4
x N x N (N: 16 tiny, 32 otherwise), contexts B x 77 x context_dim. The two networks take turns (ours, theirs,
theirs, ours, ...) after one warm-up call each, and the table gives the median over `--repeats`; the outputs
of the two on the same input are compared first (relative error), so the weights are known to be the same.
"""

from __future__ import annotations

import argparse

import bench_utils as bu
import torch
import torch.nn.functional as F

DEFAULT_LATENT = {"tiny": 16, "small": 32, "sd15": 32}


def build(size: str, batch: int, latent: int, channels_last: bool, compile_: bool):
    ours = bu.our_unet(bu.UNET_SIZES[size])
    theirs = bu.diffusers_unet_like(ours, latent)
    ctx_dim = ours.config["context_dim"]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 4, latent, latent, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    ctx = torch.randn(batch, 77, ctx_dim, generator=g)
    if channels_last:
        ours, theirs = (
            ours.to(memory_format=torch.channels_last),
            theirs.to(memory_format=torch.channels_last),
        )
        x = x.to(memory_format=torch.channels_last)
    calls = {
        "ours": lambda: ours(x, t, ctx),
        "diffusers": lambda: theirs(x, t, encoder_hidden_states=ctx).sample,
    }
    if compile_:
        calls = {k: torch.compile(v) for k, v in calls.items()}
    return ours, theirs, x, calls


def train_step(module: torch.nn.Module, call, target: torch.Tensor, fused: bool | None = None):
    opt = torch.optim.AdamW(module.parameters(), lr=1e-5, fused=fused)

    def step():
        loss = F.mse_loss(call(), target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def run(size: str, args) -> dict:
    latent = args.latent or DEFAULT_LATENT[size]
    ours, theirs, x, calls = build(size, args.batch, latent, args.channels_last, args.compile)
    with torch.no_grad():
        err = ((calls["ours"]() - calls["diffusers"]()).norm() / calls["diffusers"]().norm()).item()
    mode = "forward" if size == "sd15" else "train step"
    if mode == "forward":
        fns = {}
        for name, call in calls.items():
            fns[name] = lambda call=call: _no_grad(call)
    else:
        ours.train(), theirs.train()
        target = torch.randn_like(x)
        fns = {
            "ours": train_step(ours, calls["ours"], target, fused=None if args.no_fused_adamw else True),
            "diffusers": train_step(theirs, calls["diffusers"], target),
        }
    times = bu.alternate(fns, args.repeats)
    med = {k: bu.median(v) for k, v in times.items()}
    row = {
        "size": size,
        "mode": mode,
        "shape": list(x.shape),
        "params": sum(p.numel() for p in ours.parameters()),
        "ours_s": med["ours"],
        "diffusers_s": med["diffusers"],
        "ratio": med["ours"] / med["diffusers"],
        "times": times,
        "output_rel_err": err,
        "load_after": bu.load(),
    }
    print(
        f"| {size} | {mode} | {'x'.join(map(str, x.shape))} | {row['params'] / 1e6:.1f}M | "
        f"{med['ours'] * 1e3:.0f} | {med['diffusers'] * 1e3:.0f} | {row['ratio']:.2f} | {err:.1e} | "
        f"{row['load_after']:.2f} |",
        flush=True,
    )
    return row


def _no_grad(call):
    with torch.no_grad():
        return call()


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=["tiny", "small", "sd15"], choices=list(bu.UNET_SIZES))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--latent", type=int, default=None, help="latent side for every size (default per size)")
    p.add_argument("--channels-last", action="store_true", help="both networks and inputs channels-last")
    p.add_argument("--compile", action="store_true", help="torch.compile both (inductor)")
    p.add_argument(
        "--no-lowering", action="store_true",
        help="ours without the GEMM lowering of weight-bound CPU convolutions (ldm/nn/conv.py)",
    )  # fmt: skip
    p.add_argument(
        "--no-fused-adamw", action="store_true",
        help="ours with torch's default AdamW (as diffusers') instead of the fused one ldm trains with",
    )  # fmt: skip
    bu.add_common_args(p)
    args = p.parse_args(argv)
    n = bu.threads(args.threads)
    before = bu.header("unet_step", n, args.malloc)
    from ldm.nn.conv import set_lowering

    set_lowering(not args.no_lowering)
    print(
        f"channels_last={args.channels_last} compile={args.compile} lowering={not args.no_lowering} "
        f"fused_adamw={not args.no_fused_adamw} "
        f"repeats={args.repeats} (median)\n"
    )
    print(
        "| size | timed | latents | params | ours ms | diffusers ms | ours/diffusers | out rel err | load |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    rows = [run(size, args) for size in args.sizes]
    return bu.finish("unet_step", n, args, before, rows=rows)


if __name__ == "__main__":
    main()
