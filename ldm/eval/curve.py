"""The FID-vs-CLIP-score curve of a guidance sweep (as in Imagen, Saharia et al. 2022, Fig. A.11; and the
SD model cards): one point per metrics.json, labelled with its guidance scale.

    python -m ldm.eval.curve DIR [DIR ...] [--out curve.png]

Every metrics.json under the folders counts. `python -m ldm.eval -m guidance_scale=1.5,3,5 ...` draws it
by itself at the end of the sweep (`CurveCallback`, configs/eval.yaml) into the sweep folder.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback


def collect(dirs: list[str | Path]) -> list[dict]:
    """The metrics.json files under `dirs`, by guidance scale."""
    found = [json.loads(p.read_text()) for d in dirs for p in sorted(Path(d).rglob("metrics.json"))]
    return sorted(found, key=lambda m: float(m["guidance_scale"]))


def plot_curve(metrics: list[dict], out: str | Path) -> Path:
    """FID (y) against CLIP score (x), one point per run, written as a PNG (matplotlib, Agg); against the
    guidance scale when the runs have no CLIP score (no clip_model)."""
    # A Figure of its own (no pyplot): no backend switch, so a notebook's plots keep showing.
    from matplotlib.figure import Figure

    points = [m for m in metrics if m.get("fid") is not None]
    if not points:
        raise ValueError("no metrics.json with an FID")
    xkey = "clip_score" if all(m.get("clip_score") is not None for m in points) else "guidance_scale"
    x, y = [m[xkey] for m in points], [m["fid"] for m in points]
    fig = Figure(figsize=(5, 4), dpi=100)
    ax = fig.subplots()
    ax.plot(x, y, "o-")
    for m, xi, yi in zip(points, x, y):
        ax.annotate(f"w={m['guidance_scale']:g}", (xi, yi), textcoords="offset points", xytext=(4, 4))
    first = points[0]
    ax.set_xlabel("CLIP score" if xkey == "clip_score" else "guidance scale (no CLIP score)")
    ax.set_ylabel("FID")
    ax.set_title(f"{first.get('sampler')}, {first.get('steps')} steps, n={first.get('n_images')}", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out)
    return out


class CurveCallback(Callback):
    """Hydra callback: after a multirun, plot the sweep's curve into `<sweep dir>/curve.png`."""

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        sweep = Path(config.hydra.sweep.dir)
        metrics = collect([sweep])
        if metrics:
            print(f"curve: {plot_curve(metrics, sweep / 'curve.png')}")


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dirs", nargs="+", help="folders holding metrics.json files (searched recursively)")
    parser.add_argument("--out", default="curve.png", help="the PNG to write")
    args = parser.parse_args(argv)
    out = plot_curve(collect(args.dirs), args.out)
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
