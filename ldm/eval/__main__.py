"""FID, KID and CLIP score of a checkpoint: `python -m ldm.eval ckpt=PATH prompts=FILE ref=PATH n=1000`.

Generates n images (prompt i = prompts[i % len(prompts)], seed seed + i) through `ldm.generate` (sample.py's
loop), or reads a folder written by sample.py (`images=DIR`, prompts from its metadata.jsonl); scores them
against the reference statistics (`ldm.eval.reference`, cached); writes the images, metadata.jsonl and
metrics.json to the run folder. `accelerate launch -m ldm.eval ...` splits the batches over processes and
gathers the features in image order: the numbers are those of one process. Options: configs/eval.yaml.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from ldm.training.resolvers import register_resolvers

register_resolvers()
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def read_prompts(spec: str) -> list[str]:
    """A text file (one prompt a line) or webdataset shards (their captions)."""
    from ldm.eval.reference import read_captions, shard_paths
    from ldm.generate import read_prompt_file

    if shard_paths(spec):
        return read_captions(spec)
    if not Path(spec).is_file():
        raise FileNotFoundError(f"prompts: {spec} is neither a text file nor webdataset shards")
    return read_prompt_file(spec, key="prompts")


def check(cfg: DictConfig) -> None:
    if (cfg.ckpt is None) == (cfg.images is None):
        raise ValueError("give exactly one of ckpt=... (with prompts=...) or images=... (a sample.py folder)")
    if cfg.ckpt is not None:
        if not Path(cfg.ckpt).exists():
            raise FileNotFoundError(f"ckpt not found: {cfg.ckpt}")
        if cfg.prompts is None:
            raise ValueError("ckpt=... needs prompts=FILE (one a line) or prompts=SHARDS (their captions)")
        if int(cfg.n) < 2:
            raise ValueError(f"n={cfg.n}: FID needs at least 2 images")
    elif not (Path(cfg.images) / "metadata.jsonl").is_file():
        raise FileNotFoundError(f"images={cfg.images}: no metadata.jsonl (a folder written by sample.py)")
    if cfg.dtype not in DTYPES:
        raise ValueError(f"dtype={cfg.dtype}: expected one of {sorted(DTYPES)}")


def native_size(cfg: DictConfig, pipe) -> int:
    """The width of the generated images, or of the first image of the folder being scored."""
    if pipe is not None:
        return int(cfg.width or pipe.sample_size * pipe.vae.downsampling_factor)
    first = json.loads((Path(cfg.images) / "metadata.jsonl").read_text().splitlines()[0])
    return Image.open(Path(cfg.images) / first["file"]).size[0]


def generated_batches(cfg, state, pipe, out_dir: Path, score):
    """Generate this process's batches and score each; returns (batch scores, settings)."""
    from ldm.generate import batch_starts, generate, sampling_choice

    size = pipe.sample_size * pipe.vae.downsampling_factor
    height, width = cfg.height or size, cfg.width or size
    prompts = read_prompts(str(cfg.prompts))
    jobs = [prompts[i % len(prompts)] for i in range(int(cfg.n))]
    # What the command line gives, else the settings the model was exported with (Pipeline.recommended)
    sampler, steps, guidance_scale = sampling_choice(cfg, pipe.recommended)
    sampler_kwargs = dict(sampler["options"], karras=sampler["karras"])
    if sampler["spacing"]:
        sampler_kwargs["spacing"] = sampler["spacing"]
    starts = batch_starts(len(jobs), cfg.batch_size, state.process_index, state.num_processes)
    results = []
    for start, records, images in generate(
        pipe, jobs, out_dir, seed=int(cfg.seed), batch_size=cfg.batch_size, sampler=sampler["name"],
        steps=steps, guidance_scale=guidance_scale, negative_prompt=cfg.negative_prompt,
        ckpt=str(cfg.ckpt), starts=starts, progress=state.is_main_process, height=height, width=width,
        **sampler_kwargs,
    ):  # fmt: skip
        results.append(score(start, images, [r["prompt"] for r in records], records))
    settings = dict(sampler=sampler["name"], steps=steps, guidance_scale=guidance_scale)
    return results, dict(settings, seed=int(cfg.seed), height=height, width=width, ckpt=str(cfg.ckpt))


def folder_batches(cfg, state, score):
    """Score this process's batches of a sample.py folder; settings from its metadata."""
    from ldm.generate import batch_starts

    folder = Path(cfg.images)
    lines = (folder / "metadata.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines if line.strip()]
    if len(records) < 2:
        raise ValueError(f"images={folder}: FID needs at least 2 images, metadata.jsonl lists {len(records)}")
    results = []
    for start in batch_starts(len(records), cfg.batch_size, state.process_index, state.num_processes):
        batch = records[start : start + cfg.batch_size]
        images = [Image.open(folder / r["file"]) for r in batch]
        prompts = [r.get("prompt") or r.get("class_name") or "" for r in batch]
        results.append(score(start, images, prompts, []))
    keys = ("sampler", "steps", "guidance_scale", "seed", "height", "width")
    settings = {k: sorted({r.get(k) for r in records}, key=str) for k in keys}
    settings = {k: v[0] if len(v) == 1 else v for k, v in settings.items()}
    settings["seed"] = records[0].get("seed")  # image i has seed + i
    return results, dict(settings, images=str(folder))


@hydra.main(version_base="1.3", config_path="../../configs", config_name="eval")
def main(cfg: DictConfig) -> dict:
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list, gather_object

    from ldm.eval.metrics import RESIZE_FILTER, ClipScorer, extractor_info
    from ldm.eval.reference import reference_stats
    from ldm.eval.score import score_batch, summarize
    from ldm.utils.malloc import configure_malloc

    t0 = time.perf_counter()
    check(cfg)
    configure_malloc(cfg.get("malloc", "reuse"))  # freed CPU memory stays for the next step
    # cpu=True lets a CPU-only torchrun / accelerate group form (gloo); on GPUs each process takes its own.
    state = PartialState(cpu=cfg.device == "cpu" or not torch.cuda.is_available())
    out_dir = [str(HydraConfig.get().runtime.output_dir)]
    if state.num_processes > 1:
        broadcast_object_list(out_dir)  # the main process's folder (its clock names it)
    out_dir = Path(out_dir[0])
    out_dir.mkdir(parents=True, exist_ok=True)
    device = state.device if cfg.device == "auto" else torch.device(cfg.device)
    extractor = instantiate(cfg.extractor).to(device)
    clip = ClipScorer(cfg.clip_model, device) if cfg.clip_model else None

    pipe = None
    if cfg.ckpt is not None:
        import ldm

        dtype = DTYPES[cfg.dtype]
        pipe = ldm.load_pipeline(cfg.ckpt, device=device, dtype=dtype, allow_pickle=cfg.allow_pickle)
        if getattr(pipe, "is_class_conditional", False):
            raise ValueError(
                "ckpt is class-conditional: ldm.eval samples prompts; draw it with sample.py label=... "
                "and score the folder with images=DIR"
            )
    image_size = cfg.image_size or native_size(cfg, pipe)  # known before the reference is read
    with state.main_process_first():  # the main process computes and caches, the others read the cache
        ref, ref_info = reference_stats(
            str(cfg.ref), extractor, image_size=image_size, n=cfg.ref_n, cache_dir=cfg.cache_dir,
            batch_size=cfg.feature_batch_size,
        )  # fmt: skip

    def score(start, images, prompts, records):
        batch_size = cfg.feature_batch_size
        return score_batch(start, images, prompts, extractor, clip, image_size, batch_size, records)

    if cfg.ckpt is not None:
        results, settings = generated_batches(cfg, state, pipe, out_dir, score)
    else:
        results, settings = folder_batches(cfg, state, score)
    if state.num_processes > 1:
        results = gather_object(results)
    if not state.is_main_process:
        return {}
    results.sort(key=lambda b: b.start)
    metrics = summarize(
        results, ref, kid_subsets=cfg.kid_subsets, kid_subset_size=cfg.kid_subset_size, seed=int(cfg.seed)
    )
    metrics.update(
        settings, image_size=image_size, resize_filter=RESIZE_FILTER, extractor=extractor_info(extractor),
        reference=ref_info, clip_model=str(cfg.clip_model) if cfg.clip_model else None,
        num_processes=state.num_processes, wall_time_s=round(time.perf_counter() - t0, 3),
        config=OmegaConf.to_container(cfg, resolve=True),
    )  # fmt: skip
    if cfg.ckpt is not None:
        with open(out_dir / "metadata.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for b in results for r in b.records)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    shown = {k: metrics[k] for k in ("fid", "kid_mean", "kid_std", "clip_score", "n_images")}
    print(json.dumps(shown), f"-> {out_dir / 'metrics.json'}")
    return metrics


if __name__ == "__main__":
    main()
