"""CPU threads for the default run: training steps/s of the digits model at 1 and 2 torch threads, alone and
next to busy processes this script starts itself.

    python benchmarks/cpu_threads.py [--threads 1 2] [--busy 0 1] [--seconds 8] [--batch-size 64]
                                     [--repeats 1] [--json out.json]

Each measurement is a fresh subprocess (OMP_NUM_THREADS and torch.set_num_threads set before any work)
that builds the default experiment's model from configs/model/ldm/digits.yaml (tiny UNet, tiny CLIP text
encoder, the shipped digits autoencoder), then runs full training steps (encode, loss, backward, AdamW
step) on a random batch of 32 px images with digit captions for `--seconds` after 1 warm-up step.
A "busy" competitor is a Python process spinning on one core (`while True: pass`), started before and
killed after the measurement: the situation of a laptop or a shared machine where something else runs.
Every run is bounded: `--seconds` of timing plus start-up and the step that crosses the limit (a
measurement still running `--seconds` + 180 s later is killed and reported as 0), each competitor is
killed in a `finally`. Contention from outside (other users, the OS) adds to the busy processes: the
1-minute load average is printed with each row.

Prints a table (threads, busy processes, it/s, images/s, ms/step, load) and writes JSON with `--json`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CAPTIONS = [f"a photo of the digit {w}" for w in
            ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")]  # fmt: skip


def measure(threads: int, seconds: float, batch_size: int) -> dict:
    """In this process: steps/s of the digits model's training step with `threads` intra-op threads."""
    import torch
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from ldm.training.resolvers import register_resolvers

    torch.set_num_threads(threads)
    register_resolvers()
    with initialize_config_dir(str(REPO / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=digits"])
    model = instantiate(cfg.model)
    model.train()
    opt = model.configure_optimizers()
    opt = opt["optimizer"] if isinstance(opt, dict) else opt
    g = torch.Generator().manual_seed(0)
    batch = {"image": torch.rand(batch_size, 3, 32, 32, generator=g) * 2 - 1,
             "caption": [CAPTIONS[i % 10] for i in range(batch_size)]}  # fmt: skip

    def step() -> None:
        loss = model.training_step(batch, 0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()  # warm-up: one step, so that a badly oversubscribed setting stays bounded in time too
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        step()
        n += 1
    dt = time.perf_counter() - t0
    return {"threads": threads, "torch_threads": torch.get_num_threads(), "steps": n, "seconds": dt,
            "it_per_s": n / dt, "images_per_s": n * batch_size / dt}  # fmt: skip


def run_one(threads: int, busy: int, seconds: float, batch_size: int) -> dict:
    """A fresh measuring subprocess with `busy` spinning competitors alive around it."""
    spin = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(busy)]
    try:
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        cmd = [sys.executable, __file__, "--measure", str(threads), "--seconds", str(seconds),
               "--batch-size", str(batch_size)]  # fmt: skip
        try:
            out = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True,
                                 timeout=seconds + 180, check=True)  # fmt: skip
            result = json.loads(out.stdout.strip().splitlines()[-1])
        except subprocess.TimeoutExpired:  # start-up plus one step took minutes: report it as 0
            result = {"threads": threads, "steps": 0, "it_per_s": 0.0, "images_per_s": 0.0}
    finally:
        for p in spin:
            p.kill()
            p.wait()
    return {**result, "busy": busy, "load_1min": os.getloadavg()[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--busy", type=int, nargs="+", default=[0, 1], help="spinning competitor processes")
    parser.add_argument("--seconds", type=float, default=8.0, help="timed seconds per measurement")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=1, help="rounds over all settings (interleaved)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--measure", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure is not None:
        print(json.dumps(measure(args.measure, args.seconds, args.batch_size)))
        return

    print(f"cores available: {len(os.sched_getaffinity(0))}, load average before: {os.getloadavg()}")
    rows = []
    for r in range(args.repeats):
        for busy in args.busy:
            for threads in args.threads:
                row = {**run_one(threads, busy, args.seconds, args.batch_size), "round": r}
                rows.append(row)
                print(
                    f"  round {r}: {threads} thread(s), {busy} busy: {row['it_per_s']:.2f} it/s", flush=True
                )
    print("\n| threads | busy processes | it/s | images/s | ms/step | load (1 min) after |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        ms = f"{1000 / row['it_per_s']:.0f}" if row["it_per_s"] else "-"
        cells = [row["threads"], row["busy"], f"{row['it_per_s']:.2f}", f"{row['images_per_s']:.0f}", ms]
        print("| " + " | ".join(map(str, cells)) + f" | {row['load_1min']:.1f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
