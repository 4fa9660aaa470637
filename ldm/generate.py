"""The generation loop of `sample.py` and `python -m ldm.eval`: batches of jobs -> PNGs + metadata records.

Image i of `jobs` (a prompt, or a class index for a class-conditional model) uses seed `seed + i`, whatever
the batch it lands in and whichever process draws it, so a run split over processes gives the same images.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from tqdm import tqdm

# configs/sampler/ of the repository: a recommended sampler's options (spacing, karras, eta, ...)
SAMPLER_CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "sampler"


def read_prompt_file(path: str | Path, key: str = "prompts_file") -> list[str]:
    """The non-empty lines of a text file, one prompt each; `key` names the setting in errors."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{key}: {path} not found")
    prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"{key}: {path} has no prompts")
    return prompts


def batch_starts(n_jobs: int, batch_size: int, rank: int = 0, world_size: int = 1) -> list[int]:
    """First job index of every batch this process draws: batches are cut once, then dealt round-robin, so
    each batch (and hence each image, bit for bit) is the same for any number of processes."""
    return list(range(0, n_jobs, batch_size))[rank::world_size]


def generate(
    pipe, jobs: Sequence[Any], out_dir: str | Path, *, seed: int, batch_size: int, sampler: str, steps: int,
    guidance_scale: float, negative_prompt: str | None = "", labels: bool = False, ckpt: str | None = None,
    starts: Sequence[int] | None = None, progress: bool = True, **pipe_kwargs: Any,
) -> Iterator[tuple[int, list[dict], list]]:  # fmt: skip
    """Sample `jobs` in batches, write `{i:05d}.png` (settings in its text chunk) and yield
    (start, metadata records, PIL images) per batch. `starts`: the batches to draw (default all, see
    `batch_starts`); `pipe_kwargs` go to `pipe(...)` (height, width, init_image, sampler options, ...)."""
    from ldm.utils.images import save_png

    out_dir = Path(out_dir)
    starts = list(range(0, len(jobs), batch_size)) if starts is None else list(starts)
    total = sum(len(jobs[s : s + batch_size]) for s in starts)
    bar = tqdm(total=total, desc="sampling", unit="img", disable=not progress)
    for start in starts:
        batch = list(jobs[start : start + batch_size])
        text = dict(prompt=batch, negative_prompt=negative_prompt) if not labels else dict(labels=batch)
        settings = dict(steps=steps, guidance_scale=guidance_scale, sampler=sampler, seed=seed + start)
        out = pipe(**text, **settings, **pipe_kwargs)
        records = []
        for i, (cond, image) in enumerate(zip(batch, out), start=start):
            meta = dict(
                file=f"{i:05d}.png", prompt=None if labels else cond,
                negative_prompt=None if labels else negative_prompt, seed=seed + i, sampler=sampler,
                steps=steps, guidance_scale=guidance_scale, height=pipe_kwargs.get("height"),
                width=pipe_kwargs.get("width"),
            )  # fmt: skip
            if labels:
                names = pipe.conditioner.class_names
                meta.update(label=cond, class_name=names[cond] if names else None)
            save_png(image, out_dir / meta["file"], dict(meta, ckpt=str(ckpt)))
            records.append(meta)
        bar.update(len(batch))
        yield start, records, list(out)
    bar.close()


def sampling_choice(cfg: Any, recommended: dict) -> tuple[dict, int, float]:
    """(sampler config, steps, guidance scale): what the command line gave, else the model's
    `recommended` settings (the recommended sampler with its configs/sampler/ file's options), else
    dpmpp_2m and guidance 7.5. A chosen sampler= takes its own config's steps unless steps= is given."""
    if cfg.get("sampler") is not None:
        sampler = OmegaConf.to_container(cfg.sampler)
    else:
        name = recommended.get("sampler", "dpmpp_2m")
        path = SAMPLER_CONFIGS / f"{name}.yaml"
        base = {"name": name, "steps": 20, "spacing": None, "karras": False, "options": {}}
        sampler = dict(base, **OmegaConf.to_container(OmegaConf.load(path))) if path.is_file() else base
        sampler["steps"] = recommended.get("steps", sampler["steps"])
    scale = cfg.guidance_scale if cfg.guidance_scale is not None else recommended.get("guidance_scale", 7.5)
    return sampler, int(cfg.steps or sampler["steps"]), float(scale)
