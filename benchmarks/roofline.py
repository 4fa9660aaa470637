"""Achieved FLOP/s of the UNet forward as a fraction of this machine's fp32 matmul rate, measured in one run.

    python benchmarks/roofline.py [--size sd15] [--batch 2] [--latent 32] [--repeats 3] [--threads N]
                                  [--matmul 4096] [--diffusers] [--channels-last] [--json out.json]

FLOPs: torch.utils.flop_counter.FlopCounterMode over one forward on the meta device (no memory, no
time; convolutions, matmuls and attention counted, elementwise ops not), listed per operator. Peak: the
median rate of an N x N x N fp32 matmul (2 N^3 FLOPs) with the same threads, timed before and after the
network so that a change in the machine's load shows. `--diffusers` also times diffusers'
UNet2DConditionModel with the same weights.
"""

from __future__ import annotations

import argparse

import bench_utils as bu
import torch
from torch.utils.flop_counter import FlopCounterMode


def matmul_rate(n: int, repeats: int) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    return 2 * n**3 / bu.median([bu.timed(lambda: a @ b) for _ in range(repeats)])


def count_flops(size: str, batch: int, latent: int) -> tuple[int, dict[str, int]]:
    from ldm.nn.unet import UNetModel

    with torch.device("meta"):
        unet = UNetModel(in_channels=4, out_channels=4, **bu.UNET_SIZES[size])
        x = torch.empty(batch, 4, latent, latent)
        t = torch.zeros(batch, dtype=torch.long)
        ctx = torch.empty(batch, 77, unet.config["context_dim"])
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            unet(x, t, ctx)
    by_op = {str(k): int(v) for k, v in counter.get_flop_counts()["Global"].items()}
    return counter.get_total_flops(), by_op


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="sd15", choices=list(bu.UNET_SIZES))
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--latent", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--matmul", type=int, default=4096, help="side of the peak-rate matmul")
    p.add_argument("--diffusers", action="store_true", help="also time diffusers' UNet on the same weights")
    p.add_argument("--channels-last", action="store_true")
    bu.add_common_args(p)
    args = p.parse_args(argv)
    n = bu.threads(args.threads)
    before = bu.header("roofline", n, args.malloc)

    flops, by_op = count_flops(args.size, args.batch, args.latent)
    peak_before = matmul_rate(args.matmul, args.repeats)
    ours = bu.our_unet(bu.UNET_SIZES[args.size]).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, 4, args.latent, args.latent, generator=g)
    t = torch.randint(0, 1000, (args.batch,), generator=g)
    ctx = torch.randn(args.batch, 77, ours.config["context_dim"], generator=g)
    nets = {"ours": lambda: ours(x, t, ctx)}
    if args.diffusers:
        theirs = bu.diffusers_unet_like(ours, args.latent).eval()
        nets["diffusers"] = lambda: theirs(x, t, encoder_hidden_states=ctx).sample
    if args.channels_last:
        ours.to(memory_format=torch.channels_last)
        if args.diffusers:
            theirs.to(memory_format=torch.channels_last)
        x = x.to(memory_format=torch.channels_last)
    with torch.no_grad():
        times = bu.alternate(nets, args.repeats)
    peak_after = matmul_rate(args.matmul, args.repeats)
    peak = max(peak_before, peak_after)

    print(
        f"\nforward FLOPs ({args.size}, {args.batch}x4x{args.latent}x{args.latent}): {flops / 1e9:.1f} GFLOP"
    )
    for op, f in sorted(by_op.items(), key=lambda kv: -kv[1]):
        print(f"  {op:40s} {f / 1e9:8.1f} GFLOP ({f / flops:.0%})")
    print(
        f"fp32 matmul {args.matmul}^3: {peak_before / 1e9:.1f} GFLOP/s before, {peak_after / 1e9:.1f} after "
        f"(peak = the larger)\n"
    )
    print("| network | forward s (median) | GFLOP/s | fraction of matmul peak |")
    print("|---|---|---|---|")
    rows = {}
    for name, ts in times.items():
        s = bu.median(ts)
        rows[name] = {
            "seconds": s,
            "times": ts,
            "flops_per_s": flops / s,
            "fraction_of_peak": flops / s / peak,
        }
        print(f"| {name} | {s:.3f} | {flops / s / 1e9:.1f} | {flops / s / peak:.2f} |")
    return bu.finish(
        "roofline", n, args, before,
        flops=flops, flops_by_op=by_op, matmul_flops_per_s=[peak_before, peak_after], rows=rows,
    )  # fmt: skip


if __name__ == "__main__":
    main()
