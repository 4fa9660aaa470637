"""Helpers shared by the benchmark scripts: machine load, threads, timing, and our UNet next to diffusers'.

Every script imports `ldm` from this checkout (the repository root goes first on sys.path) and reports the
1-minute load average before and after its measurements and the CPU time other processes took during them
(`footer`): on a machine where other processes compete for the cores, a ratio ours/theirs is not a result.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

BUSY_LOAD = 0.5  # load average before a run worth a note
OTHERS_BUSY = 0.1  # cores other processes may use during a run that still counts as idle

# SD-shaped UNets of several sizes (our constructor arguments). SD1.5 is configs/model/unet/sd15.yaml.
UNET_SIZES = {
    # 3 levels, attention on the first two: seconds per step on a CPU.
    "tiny": dict(
        model_channels=32, channel_mult=[1, 2, 2], attention_resolutions=[1, 2], num_res_blocks=1,
        num_heads=8, context_dim=32,
    ),
    # The full SD1 layout (4 levels, 2 res blocks, attention at factors 4, 2, 1, 8 heads), 1/5 the width.
    "small": dict(
        model_channels=64, channel_mult=[1, 2, 4, 4], attention_resolutions=[4, 2, 1], num_res_blocks=2,
        num_heads=8, context_dim=128,
    ),
    "sd15": dict(
        model_channels=320, channel_mult=[1, 2, 4, 4], attention_resolutions=[4, 2, 1], num_res_blocks=2,
        num_heads=8, context_dim=768,
    ),
}  # fmt: skip


def load() -> float:
    """The 1-minute load average."""
    return os.getloadavg()[0]


def threads(n: int | None) -> int:
    """Set torch's intra-op threads (all cores when None) and return the number in use."""
    torch.set_num_threads(n or len(os.sched_getaffinity(0)))
    return torch.get_num_threads()


def add_common_args(p) -> None:
    """--threads, --malloc and --json, the same in every script."""
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument(
        "--malloc", default="system", choices=["system", "reuse"],
        help="C allocator: glibc's defaults (both sides of a comparison share them) or ldm's `malloc: reuse`",
    )  # fmt: skip
    p.add_argument("--json", type=Path, default=None)


def _busy_seconds() -> tuple[float, float]:
    """(CPU seconds all processes have been busy, of which this process and its children), from /proc/stat
    and getrusage. The difference over a run is the CPU time other processes took from it, which the load
    average cannot tell apart from the benchmark's own threads."""
    tick = os.sysconf("SC_CLK_TCK")
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    busy = (sum(fields[:8]) - idle) / tick  # user nice system idle iowait irq softirq steal
    own = sum(
        getattr(resource.getrusage(who), f)
        for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
        for f in ("ru_utime", "ru_stime")
    )
    return busy, own


@dataclass
class Conditions:
    """The machine's state when a benchmark starts: load average, wall clock and CPU counters."""

    load_before: float
    wall: float
    busy: float
    own: float


def header(name: str, n_threads: int, malloc: str = "system") -> Conditions:
    """Apply `malloc` (ldm/utils/malloc.py), print the conditions of the run and start counting the CPU time
    other processes use during it."""
    from ldm.utils.malloc import configure_malloc

    configure_malloc(malloc)
    before = load()
    print(
        f"{name}: torch {torch.__version__}, {n_threads} thread(s) of {len(os.sched_getaffinity(0))} cores, "
        f"malloc={malloc}, load average (1 min) before: {before:.2f}"
    )
    if before > BUSY_LOAD:
        print(f"note: load average {before:.2f} before the run (a process that just ended counts too)")
    return Conditions(before, time.perf_counter(), *_busy_seconds())


def footer(start: Conditions) -> dict:
    """How many cores other processes kept busy, on average, while the benchmark ran; a warning when that
    is above `OTHERS_BUSY` (a ratio measured while other processes compete for the cores is not a result)."""
    busy, own = _busy_seconds()
    wall = time.perf_counter() - start.wall
    others = max(0.0, (busy - start.busy) - (own - start.own)) / wall
    after = load()
    print(
        f"load average (1 min) after: {after:.2f} (this run included); other processes used "
        f"{others:.2f} core(s) on average during the run"
    )
    idle = others <= OTHERS_BUSY
    if not idle:
        print(
            f"WARNING: other processes used {others:.2f} cores (> {OTHERS_BUSY}) during the run: they "
            "competed for the CPU; re-run on an idle machine before reading the ratios as results"
        )
    return {
        "load_before": start.load_before,
        "load_after": after,
        "other_cores_busy": others,
        "seconds": wall,
        "idle": idle,
    }


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def alternate(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each function, interleaved (a, b, b, a, a, b, ...) so that drift in the machine's
    load hits all of them alike; `warmup` untimed calls each first."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for n in names if r % 2 == 0 else reversed(names):
            times[n].append(timed(fns[n]))
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def our_unet(kwargs: dict, seed: int = 0) -> torch.nn.Module:
    """Our UNetModel with random weights everywhere (zero-initialized layers too: same work either way)."""
    from ldm.nn.unet import UNetModel

    torch.manual_seed(seed)
    unet = UNetModel(in_channels=4, out_channels=4, **kwargs)
    with torch.no_grad():
        for p in unet.parameters():
            if p.ndim > 1 and not p.any():
                p.normal_(0, 0.02)
    return unet


def diffusers_unet_like(ours: torch.nn.Module, sample_size: int) -> torch.nn.Module:
    """diffusers' UNet2DConditionModel with the same architecture and the same weights as our SD1-style
    UNet: our state dict, under the original checkpoint's `model.diffusion_model.` prefix, goes through
    diffusers' own single-file converter (as tests/test_nn_parity.py does)."""
    import diffusers
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    c = ours.config
    if c["num_head_channels"] != -1:
        raise ValueError("diffusers_unet_like: only head-count UNets (SD1: num_head_channels=-1)")
    attn = set(c["attention_resolutions"])
    levels = len(c["channel_mult"])
    has_attn = [2**i in attn for i in range(levels)]
    theirs = diffusers.UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=c["in_channels"],
        out_channels=c["out_channels"],
        block_out_channels=tuple(c["model_channels"] * m for m in c["channel_mult"]),
        layers_per_block=c["num_res_blocks"],
        cross_attention_dim=c["context_dim"],
        attention_head_dim=c["num_heads"],
        transformer_layers_per_block=c["transformer_depth"],
        use_linear_projection=c["use_linear_in_transformer"],
        upcast_attention=c["upcast_attention"],
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in has_attn),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(has_attn)),
    )
    original = {f"model.diffusion_model.{k}": v for k, v in ours.state_dict().items()}
    theirs.load_state_dict(convert_ldm_unet_checkpoint(original, theirs.config), strict=True)
    return theirs


def write_json(path: Path | None, payload: dict) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(payload, indent=2))
        print(f"wrote {path}")


def finish(name: str, n_threads: int, args, before: Conditions, **fields) -> dict:
    """The result of a benchmark run: its name, threads, arguments and `fields`, with the load after the
    run (`footer`); written as JSON to `args.json` when given."""
    result = {"benchmark": name, "threads": n_threads, "args": vars(args) | {"json": str(args.json)}}
    result |= fields
    result |= footer(before)
    write_json(args.json, result)
    return result
