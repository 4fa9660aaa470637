"""DreamBooth on the bundled digits: write the instance folder, and score what a model draws.

    python -m ldm.data.dreambooth_digits write data/dreambooth/sks_digit --digit 3 --n 5
    python -m ldm.data.dreambooth_digits score CKPT --digit 3 [--n 20 --steps 20 --guidance-scale 3]

`write` copies `n` images of one digit from the training split of scikit-learn's digits (seeded choice).
`score` prints, as JSON, the share of "a photo of sks digit" images that the digits classifier
(ldm.eval.digits) reads as that digit, and the accuracy of "a photo of the digit {word}" on the other
digits (language drift: what prior preservation is there to keep; Ruiz et al. 2023, Sec. 4.3).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import numpy as np
import torch


def write_digit_instances(
    out: str | Path, digit: int, n: int = 5, resolution: int = 32, seed: int = 0
) -> list[Path]:
    """`n` PNGs of `digit` (training split, seeded choice) at `resolution` px in `out`."""
    from sklearn.datasets import load_digits

    from ldm.data.digits import digit_image, split_digits

    if not 0 <= digit <= 9:
        raise ValueError(f"--digit {digit}: must be 0..9")
    digits = load_digits()
    train, _ = split_digits(digits.target, 0.1, 0)
    pool = [i for i in train if digits.target[i] == digit]
    if not 1 <= n <= len(pool):
        raise ValueError(f"--n {n}: must be 1..{len(pool)}")
    chosen = random.Random(f"dreambooth-digits/{seed}").sample(pool, n)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, i in enumerate(chosen):
        path = out / f"sks_{digit}_{k:02d}.png"
        digit_image(digits.images[i], resolution).save(path)
        paths.append(path)
    return paths


@torch.no_grad()
def prompt_share(pipe, clf, prompt: str, digit: int, n: int, steps: int, sampler: str, guidance_scale: float,
                 seed: int) -> float:  # fmt: skip
    """Share of n images of `prompt` that the classifier reads as `digit`."""
    from ldm.eval.digits import to_digit_features

    images = pipe(prompt, num_images_per_prompt=n, steps=steps, sampler=sampler,
                  guidance_scale=guidance_scale, seed=seed, output="tensor")  # fmt: skip
    return float((clf.predict(to_digit_features(images.cpu())) == digit).mean())


def score(ckpt: str, digit: int, prompt: str, n: int, steps: int, sampler: str, guidance_scale: float,
          seed: int) -> dict:  # fmt: skip
    """The subject share of `prompt` and the per-digit accuracy of the other digits' prompts."""
    import ldm
    from ldm.eval.digits import WORDS, fit_classifier, generated_accuracy

    clf, _, _ = fit_classifier()
    pipe = ldm.load_pipeline(ckpt)
    share = prompt_share(pipe, clf, prompt, digit, n, steps, sampler, guidance_scale, seed)
    per_digit = generated_accuracy(pipe, clf, n, steps, sampler, guidance_scale, seed)
    others = [per_digit[w] for d, w in enumerate(WORDS) if d != digit]
    return {
        "subject_share": share, "other_digits_accuracy": float(np.mean(others)),
        "per_digit": per_digit, "settings": {"ckpt": str(ckpt), "digit": digit, "prompt": prompt, "n": n,
        "steps": steps, "sampler": sampler, "guidance_scale": guidance_scale, "seed": seed},
    }  # fmt: skip


def main(argv: list[str] | None = None) -> dict | list:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    w = sub.add_parser("write", help="write the instance images of one digit")
    w.add_argument("out")
    w.add_argument("--digit", type=int, required=True)
    w.add_argument("--n", type=int, default=5)
    w.add_argument("--resolution", type=int, default=32)
    w.add_argument("--seed", type=int, default=0)
    s = sub.add_parser("score", help="subject share and other digits' accuracy of a model")
    s.add_argument("ckpt", help="anything ldm.load_pipeline reads")
    s.add_argument("--digit", type=int, required=True)
    s.add_argument("--prompt", default="a photo of sks digit")
    s.add_argument("--n", type=int, default=20)
    s.add_argument("--steps", type=int, default=20)
    s.add_argument("--sampler", default="dpmpp_2m")
    s.add_argument("--guidance-scale", type=float, default=3.0)
    s.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "write":
        paths = write_digit_instances(args.out, args.digit, args.n, args.resolution, args.seed)
        print(f"wrote {len(paths)} images of the digit {args.digit} to {args.out}")
        return [str(p) for p in paths]
    result = score(args.ckpt, args.digit, args.prompt, args.n, args.steps, args.sampler, args.guidance_scale,
                   args.seed)  # fmt: skip
    print(f"subject share ({args.prompt!r} drawn as {args.digit}): {result['subject_share']:.3f}; "
          f"other digits' accuracy: {result['other_digits_accuracy']:.3f}")  # fmt: skip
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
