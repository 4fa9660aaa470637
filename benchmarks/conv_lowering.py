"""oneDNN's convolution against im2col + one matrix product (ldm/nn/conv.py) per shape, and the rule's pick.

    python benchmarks/conv_lowering.py [--batches 1 2 4 8] [--repeats 5] [--threads N]
                                       [--malloc system|reuse] [--json out.json]

Shapes: the 3x3 convolutions of SD-shaped UNets at their lowest levels (channels in -> out at a side of
4, 8 or 16 latent pixels: SD1.5 at 32x32 latents, and the `small` UNet of bench_utils at 1/5 the width).
Each cell times the forward, and forward + backward (input, weight and bias gradients), of both ways on
the same tensors, in turns, median of `--repeats`; `pick` is what `ldm.nn.conv.gemm_pays` chooses for that
shape and `pick/oneDNN` the time of the pick relative to always using oneDNN (forward + backward).
"""

from __future__ import annotations

import argparse

import bench_utils as bu
import torch

SHAPES = [  # (in, out, side)
    (256, 256, 4), (256, 256, 8), (320, 320, 16), (640, 640, 8), (640, 1280, 8), (640, 1280, 4),
    (1280, 1280, 16), (1280, 1280, 8), (1280, 1280, 4), (1920, 1280, 8), (2560, 1280, 8), (2560, 1280, 4),
]  # fmt: skip


def time_shape(conv, side: int, batch: int, repeats: int) -> dict:
    """Forward and forward + backward times (ms) of both ways for one shape, and the rule's pick."""
    from ldm.nn.conv import conv2d_gemm, gemm_pays

    cin, cout = conv.in_channels, conv.out_channels
    x = torch.randn(batch, cin, side, side, requires_grad=True)
    ways = {"onednn": lambda: torch.nn.Conv2d.forward(conv, x), "gemm": lambda: conv2d_gemm(x, conv)}

    def train(fn):
        def step():
            fn().sum().backward()
            x.grad = conv.weight.grad = conv.bias.grad = None

        return step

    with torch.no_grad():
        fwd = bu.alternate(ways, repeats)
    both = bu.alternate({k: train(fn) for k, fn in ways.items()}, repeats)
    fwd_ms = {k: bu.median(v) * 1e3 for k, v in fwd.items()}
    both_ms = {k: bu.median(v) * 1e3 for k, v in both.items()}
    pick = "gemm" if gemm_pays(conv, x.detach()) else "onednn"
    return dict(cin=cin, cout=cout, side=side, batch=batch, fwd_ms=fwd_ms, fwd_bwd_ms=both_ms, pick=pick,
                pick_over_onednn=both_ms[pick] / both_ms["onednn"])  # fmt: skip


def main(argv=None) -> dict:
    from ldm.nn.conv import Conv2d

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--shapes", nargs="+", default=None, help="IN,OUT,SIDE triples (default: SD shapes)")
    p.add_argument("--repeats", type=int, default=5)
    bu.add_common_args(p)
    args = p.parse_args(argv)
    n = bu.threads(args.threads)
    before = bu.header("conv_lowering", n, args.malloc)
    shapes = [tuple(int(v) for v in s.split(",")) for s in args.shapes] if args.shapes else SHAPES
    print("| in -> out | side | batch | fwd oneDNN ms | fwd GEMM ms | fwd+bwd oneDNN ms | fwd+bwd GEMM ms "
          "| pick | pick/oneDNN |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    rows = []
    for cin, cout, side in shapes:
        torch.manual_seed(0)
        conv = Conv2d(cin, cout, 3, padding=1)  # one weight for every batch size
        for b in args.batches:
            r = time_shape(conv, side, b, args.repeats)
            rows.append(r)
            ms = [f"{r[t][k]:.2f}" for t in ("fwd_ms", "fwd_bwd_ms") for k in ("onednn", "gemm")]
            cells = [f"{cin} -> {cout}", side, b, *ms, r["pick"], f"{r['pick_over_onednn']:.2f}"]
            print("| " + " | ".join(map(str, cells)) + " |", flush=True)
    return bu.finish("conv_lowering", n, args, before, rows=rows)


if __name__ == "__main__":
    main()
