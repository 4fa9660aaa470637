"""The GPU settings, checked and timed: bf16-mixed training step (and its host-device syncs: none expected),
fp16/bf16 sampling, `model.compile=true`, the SDPA kernel in use, and throughput / MFU of the SD1.5 UNet at
256 px.

    python benchmarks/gpu.py [--checks sdpa train sample mfu compile] [--size sd15] [--px 256] [--batch 8]
                             [--dry] [--json out.json]

On a CUDA device each check runs at the given sizes. Without one (or with `--dry`) it runs dry: the same
code on the CPU with the tiny model at 64 px, fp32 where the CPU has no fast half precision, and skips
what only CUDA has (fp16 sampling); tests/test_gpu.py (`pytest -m gpu`) runs the dry mode in CI so this
script cannot rot, and the full mode where a GPU exists. MFU = (forward + backward FLOPs counted by
torch.utils.flop_counter.FlopCounterMode on the meta device) / step time / the matmul rate of the device
in the same dtype, measured in the same run with a large matmul.
"""

from __future__ import annotations

import argparse
import tempfile
import warnings
from pathlib import Path

import bench_utils as bu
import torch
from torch.utils.flop_counter import FlopCounterMode

CHECKS = ("sdpa", "train", "sample", "mfu", "compile")
# Attention kernels of torch.nn.functional.scaled_dot_product_attention, by profiler event name.
FUSED_SDPA = (
    "aten::_scaled_dot_product_flash_attention",
    "aten::_scaled_dot_product_efficient_attention",
    "aten::_scaled_dot_product_cudnn_attention",
    "aten::_scaled_dot_product_flash_attention_for_cpu",
)
MATH_SDPA = "aten::_scaled_dot_product_attention_math"


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(device: str, fn, repeats: int) -> float:
    """Median seconds of `fn` after one warm-up call, synchronizing the device around each call."""
    fn()
    ts = []
    for _ in range(repeats):
        sync(device)
        ts.append(bu.timed(lambda: (fn(), sync(device))))
    return bu.median(ts)


def sdpa_kernels(device: str, dtype: torch.dtype) -> dict:
    """The SDPA kernels our CrossAttention runs on `device` in `dtype` (from the profiler's op names)."""
    from ldm.nn.attention import CrossAttention

    self_attn = CrossAttention(320, None, heads=8, dim_head=40).to(device, dtype)
    cross_attn = CrossAttention(320, 768, heads=8, dim_head=40).to(device, dtype)
    x = torch.randn(2, 256, 320, device=device, dtype=dtype)
    ctx = torch.randn(2, 77, 768, device=device, dtype=dtype)
    with torch.no_grad(), torch.profiler.profile() as prof:
        self_attn(x), cross_attn(x, ctx)
    names = sorted({e.name for e in prof.events() if "attention" in e.name and e.name.startswith("aten::_")})
    fused = [n for n in names if n in FUSED_SDPA]
    return {"kernels": names, "fused": bool(fused), "math_fallback": MATH_SDPA in names}


def save_model(tmp: Path, size: str) -> Path:
    from sampling import save_folder

    return save_folder(tmp / size, size)


def train_step(
    folder: Path, device: str, dtype: torch.dtype, batch: int, px: int, repeats: int, compile_=False
):
    """A whole training step of LatentDiffusionSystem under autocast(dtype) (Lightning's `bf16-mixed`)."""
    import ldm
    from ldm.diffusion.loss import DiffusionLoss
    from ldm.systems.diffusion import LatentDiffusionSystem

    pipe = ldm.load_pipeline(folder)
    system = LatentDiffusionSystem(
        unet=pipe.unet, autoencoder=pipe.vae, conditioner=pipe.conditioner, schedule=pipe.schedule,
        loss=DiffusionLoss, optimizer=lambda params: torch.optim.AdamW(params, lr=1e-5), compile=compile_,
    ).to(device)  # fmt: skip
    system.train()
    warnings.filterwarnings("ignore", message=".*self.log.*")  # no Trainer here: logging is a no-op
    opt = system.configure_optimizers()
    opt = opt["optimizer"] if isinstance(opt, dict) else opt
    g = torch.Generator().manual_seed(0)
    data = {
        "image": (torch.rand(batch, 3, px, px, generator=g) * 2 - 1).to(device),
        "caption": [f"a photo of the digit {i % 10}" for i in range(batch)],
    }
    losses = []

    def step():
        with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
            loss = system.training_step(data, 0)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    s = timed(device, step, repeats)
    out = {"s_per_step": s, "images_per_s": batch / s, "losses": [float(v) for v in losses]}
    out["syncs_per_step"] = step_syncs(device, step)  # after the timed steps: `losses` holds theirs only
    out["finite"] = all(torch.isfinite(v).item() for v in losses)
    if device == "cuda":
        out["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def step_syncs(device: str, step, steps: int = 2) -> float | None:
    """Host-device synchronizations per call of `step`, counted by CUDA's sync debug mode (a warning for
    each synchronizing call); None where there is no CUDA to count on."""
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(steps):
                step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught) / steps


def sample(folder: Path, device: str, dtype: torch.dtype, px: int, steps: int) -> dict:
    """Text-to-image in `dtype` against fp32 on the same latents: time and the largest pixel difference."""
    import ldm

    latents = torch.randn(2, 4, px // 8, px // 8, generator=torch.Generator().manual_seed(5))
    args = dict(prompt="a photo of the digit seven", num_images_per_prompt=2, steps=steps, latents=latents,
                height=px, width=px, output="tensor", sampler="dpmpp_2m")  # fmt: skip
    ref = ldm.load_pipeline(folder).to(device)(**args)
    pipe = ldm.load_pipeline(folder).to(device, dtype)
    s = timed(device, lambda: pipe(**args), 1)
    img = pipe(**args)
    return {"s_per_call": s, "max_diff_vs_fp32": (img.float() - ref.float()).abs().max().item(),
            "finite": bool(torch.isfinite(img).all())}  # fmt: skip


def matmul_rate(device: str, dtype: torch.dtype, n: int) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / timed(device, lambda: a @ b, 5)


def unet_mfu(size: str, device: str, dtype: torch.dtype, batch: int, px: int, repeats: int) -> dict:
    """Forward + backward of the UNet under autocast: FLOP/s and the fraction of the matmul rate."""
    from ldm.nn.unet import UNetModel

    kw = bu.UNET_SIZES[size]
    lat = px // 8
    with torch.device("meta"):
        meta = UNetModel(**kw)
        counter = FlopCounterMode(display=False)
        with counter:
            meta(
                torch.empty(batch, 4, lat, lat), torch.zeros(batch), torch.empty(batch, 77, kw["context_dim"])
            )
            counter_fwd = counter.get_total_flops()
        with FlopCounterMode(display=False) as both:
            meta(
                torch.empty(batch, 4, lat, lat), torch.zeros(batch), torch.empty(batch, 77, kw["context_dim"])
            ).sum().backward()
    flops = both.get_total_flops()
    unet = bu.our_unet(kw).to(device)
    x = torch.randn(batch, 4, lat, lat, device=device)
    t = torch.randint(0, 1000, (batch,), device=device)
    ctx = torch.randn(batch, 77, kw["context_dim"], device=device)

    def step():
        with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
            out = unet(x, t, ctx)
        out.float().square().mean().backward()
        unet.zero_grad(set_to_none=True)

    s = timed(device, step, repeats)
    peak = matmul_rate(device, dtype, 8192 if device == "cuda" else 1024)
    return {"size": size, "px": px, "batch": batch, "forward_flops": counter_fwd, "step_flops": flops,
            "s_per_step": s, "images_per_s": batch / s, "flops_per_s": flops / s, "matmul_peak": peak,
            "mfu": flops / s / peak}  # fmt: skip


def run(checks, size: str, px: int, batch: int, repeats: int, dry: bool) -> dict:
    """The checks; `dry` (no CUDA, or asked for): CPU, tiny model, 64 px, CPU-capable dtypes only."""
    device = "cpu" if dry or not torch.cuda.is_available() else "cuda"
    dry = device == "cpu"
    if dry:
        size, px, batch, repeats = "tiny", 64, 2, 1
    half = torch.bfloat16
    results: dict = {"device": device, "dry": dry, "size": size, "px": px, "batch": batch}
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_model(Path(tmp), "tiny" if dry else "small")
        if "sdpa" in checks:
            results["sdpa"] = {str(d): sdpa_kernels(device, d) for d in (torch.float32, half)}
        if "train" in checks:
            results["train_bf16"] = train_step(folder, device, half, batch, px, repeats)
        if "sample" in checks:
            results["sample_bf16"] = sample(folder, device, torch.bfloat16, px, 4 if dry else 20)
            results["sample_fp16"] = (
                {"skipped": "fp16 sampling needs CUDA"}
                if dry
                else sample(folder, device, torch.float16, px, 20)
            )
        if "mfu" in checks:
            results["mfu"] = unet_mfu(size, device, torch.float32 if dry else half, batch, px, repeats)
        if "compile" in checks:
            eager = train_step(folder, device, half, batch, px, 1)
            compiled = train_step(folder, device, half, batch, px, 1, compile_=True)
            results["compile"] = {"eager": eager, "compiled": compiled,
                                  "speedup": eager["s_per_step"] / compiled["s_per_step"]}  # fmt: skip
    return results


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checks", nargs="+", default=list(CHECKS), choices=CHECKS)
    p.add_argument("--size", default="sd15", choices=list(bu.UNET_SIZES), help="UNet of the MFU check")
    p.add_argument("--px", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dry", action="store_true", help="the CPU dry run even where CUDA exists")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    before = bu.header("gpu", torch.get_num_threads())
    res = run(args.checks, args.size, args.px, args.batch, args.repeats, args.dry)
    print(f"device: {res['device']}{' (dry run: tiny model, 64 px)' if res['dry'] else ''}\n")
    print("| check | result |")
    print("|---|---|")
    for name, value in res.items():
        if isinstance(value, dict):
            brief = {
                k: (f"{v:.3g}" if isinstance(v, float) else v) for k, v in value.items() if k != "losses"
            }
            print(f"| {name} | {brief} |")
    res |= bu.footer(before)
    bu.write_json(args.json, res)
    return res


if __name__ == "__main__":
    main()
