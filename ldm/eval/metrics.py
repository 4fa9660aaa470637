"""FID, KID and CLIP score on torchmetrics, from features extracted once.

Features come from any `nn.Module` mapping uint8 N x 3 x H x W images to N x D features (the TF InceptionV3
of `ldm.eval.inception` for the standard numbers). They are extracted once per image, so that they can be
gathered from several processes in image order and cached for reference sets; torchmetrics'
`FrechetInceptionDistance` and `KernelInceptionDistance` then run on them through `Precomputed`, a feature
"extractor" that hands its input through. Statistics are float64.

FID: Heusel et al. 2017 (||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^1/2)); KID: Binkowski et al. 2018
(unbiased MMD^2, cubic polynomial kernel, mean and std over random subsets); CLIP score: Hessel et al. 2021
(100 x max(cos(image, caption), 0), as torchmetrics' `CLIPScore`).
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

# Images enter the metrics as uint8 at `image_size`, centre-cropped to a square and resized with this filter
# (PIL's bicubic resize is antialiased when it shrinks; clean-fid, Parmar et al. 2022, shows why it matters).
RESIZE_FILTER = "PIL.Image.BICUBIC (antialiased), centre crop to square"


def to_uint8(images: list[Image.Image], size: int | None) -> Tensor:
    """PIL images -> uint8 N x 3 x S x S: centre crop to a square, resize to `size` with PIL bicubic (no
    resize when `size` is None or the image is already that size)."""
    out = []
    for img in images:
        img = img.convert("RGB")
        if size is not None and img.size != (size, size):
            w, h = img.size
            s = min(w, h)
            img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
            img = img.resize((size, size), Image.BICUBIC)
        out.append(torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1))
    shapes = {tuple(x.shape) for x in out}
    if len(shapes) > 1:
        raise ValueError(f"images of different sizes {sorted(shapes)}: set image_size=... to resize them")
    return torch.stack(out)


def extractor_info(extractor: nn.Module) -> dict:
    """What identifies a feature space: class, `identity` (if the module has one), weights file sha256, and
    a fingerprint of the weights themselves (so that two random initializations never share a cache)."""
    h = hashlib.sha256()
    for name, t in sorted(extractor.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().float().numpy().tobytes())
    cls = type(extractor)
    return dict(
        target=f"{cls.__module__}.{cls.__qualname__}",
        identity=getattr(extractor, "identity", None),
        weights_sha256=getattr(extractor, "weights_sha256", None),
        fingerprint=h.hexdigest()[:16],
    )


@torch.no_grad()
def extract(extractor: nn.Module, images: Tensor, batch_size: int = 50) -> Tensor:
    """uint8 images -> float64 N x D features, in batches."""
    device = next(extractor.parameters(), torch.empty(0)).device
    chunks = [images[i : i + batch_size].to(device) for i in range(0, len(images), batch_size)]
    parts = [extractor(x).double().cpu() for x in chunks]
    return torch.cat(parts).flatten(1)


@dataclass
class FeatureStats:
    """Mean and covariance (float64) of a set's features, and the features themselves when known (KID
    needs them; published .npz statistics have only mu and sigma)."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int
    features: np.ndarray | None = None

    @classmethod
    def from_features(cls, features: Tensor | np.ndarray) -> FeatureStats:
        f = np.asarray(features, dtype=np.float64)
        if f.ndim != 2 or len(f) < 2:
            raise ValueError(f"need at least 2 feature vectors (N x D), got shape {f.shape}")
        return cls(mu=f.mean(0), sigma=np.cov(f, rowvar=False), n=len(f), features=f)

    def save(self, path: str | Path) -> None:
        arrays = dict(mu=self.mu, sigma=self.sigma, n=np.array(self.n))
        if self.features is not None:
            arrays["features"] = self.features.astype(np.float32)  # extractor outputs are float32
        np.savez(path, **arrays)

    @classmethod
    def load(cls, path: str | Path) -> FeatureStats:
        """Our cache files, or pytorch-fid's `.npz` format (`mu`, `sigma`), e.g. published COCO statistics."""
        with np.load(path) as z:
            if "mu" not in z or "sigma" not in z:
                raise ValueError(f"ref={path}: a statistics .npz needs arrays mu and sigma (has {z.files})")
            feats = z["features"].astype(np.float64) if "features" in z else None
            n = int(z["n"]) if "n" in z else (len(feats) if feats is not None else 0)
            mu, sigma = z["mu"].astype(np.float64), z["sigma"].astype(np.float64)
            return cls(mu=mu, sigma=sigma, n=n, features=feats)


class Precomputed(nn.Module):
    """The feature extractor torchmetrics sees: features already extracted, passed through."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = int(num_features)

    def forward(self, features: Tensor) -> Tensor:
        return features


def fid(ref: FeatureStats, gen: FeatureStats) -> float:
    """FID with torchmetrics' `FrechetInceptionDistance`, its float64 sums set from the two statistics."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    if ref.mu.shape != gen.mu.shape:
        raise ValueError(f"reference features have {ref.mu.shape[0]} dims, generated {gen.mu.shape[0]}")
    metric = FrechetInceptionDistance(feature=Precomputed(len(ref.mu)), sync_on_compute=False)
    for prefix, s in (("real", ref), ("fake", gen)):
        n = max(s.n, 2)  # published statistics carry no count; any n >= 2 gives back the same sigma
        mu, sigma = torch.from_numpy(s.mu), torch.from_numpy(s.sigma)
        setattr(metric, f"{prefix}_features_sum", mu * n)
        setattr(metric, f"{prefix}_features_cov_sum", sigma * (n - 1) + n * torch.outer(mu, mu))
        setattr(metric, f"{prefix}_features_num_samples", torch.tensor(n))
    metric.orig_dtype = torch.float64
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*was called before the ``update`` method.*")
        return float(metric.compute())


def kid(ref: FeatureStats, gen: FeatureStats, subsets: int = 100, subset_size: int = 1000, seed: int = 0):
    """(KID mean, KID std, subset size used) with torchmetrics' `KernelInceptionDistance`; the subsets are
    drawn from a generator seeded with `seed`. None when the reference has no features (published stats)."""
    from torchmetrics.image.kid import KernelInceptionDistance

    if ref.features is None or gen.features is None:
        return None
    size = min(subset_size, ref.n, gen.n)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        metric = KernelInceptionDistance(
            feature=Precomputed(len(ref.mu)), subsets=subsets, subset_size=size, sync_on_compute=False
        )
    metric.update(torch.from_numpy(ref.features), real=True)
    metric.update(torch.from_numpy(gen.features), real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std), size


def load_clip(path: str | Path):
    """(CLIPModel, CLIPProcessor) from a local folder written with `save_pretrained`, or a hub id (e.g.
    openai/clip-vit-large-patch14) for users with a network; a local folder never touches the network."""
    from transformers import CLIPModel, CLIPProcessor

    local = Path(path).expanduser()
    if local.exists() or str(path).startswith((".", "/", "~")):
        if not (local / "config.json").is_file():
            raise FileNotFoundError(f"clip_model: {path} is not a CLIP model folder (no config.json)")
        model = CLIPModel.from_pretrained(local, local_files_only=True).eval()
        return model, CLIPProcessor.from_pretrained(local, local_files_only=True)
    model = CLIPModel.from_pretrained(str(path)).eval()  # a hub id: needs a network (or the hub cache)
    return model, CLIPProcessor.from_pretrained(str(path))


class _ClipEmbeddings(nn.Module):
    """The CLIP model as torchmetrics calls it, `get_image_features` / `get_text_features` giving the
    projected embeddings as tensors (transformers 5 returns them as `pooler_output` of an output object,
    which torchmetrics 1.9 does not unpack)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model, self.config = model, model.config

    @staticmethod
    def _tensor(out) -> Tensor:
        return out if isinstance(out, Tensor) else out.pooler_output

    def get_image_features(self, pixel_values: Tensor) -> Tensor:
        return self._tensor(self.model.get_image_features(pixel_values=pixel_values))

    def get_text_features(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        return self._tensor(self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask))


class ClipScorer:
    """Sums and counts of CLIP scores of (uint8 images, captions) batches with torchmetrics' `CLIPScore`
    (its callable form, so that any local folder works). The score of a set is torchmetrics':
    max(mean over images of 100 x cos(image, caption), 0)."""

    def __init__(self, path: str | Path, device: str | torch.device = "cpu"):
        from torchmetrics.multimodal.clip_score import CLIPScore

        model, processor = load_clip(path)
        wrapped = _ClipEmbeddings(model)
        metric = CLIPScore(model_name_or_path=lambda: (wrapped, processor), sync_on_compute=False)
        self.metric = metric.to(device)

    @torch.no_grad()
    def batch(self, images: Tensor, captions: list[str]) -> tuple[float, int]:
        """(sum of 100 x cos over the batch, batch size): torchmetrics' `score` and `n_samples` states."""
        self.metric.reset()
        self.metric.update(images.to(self.metric.device), list(captions))
        return float(self.metric.score), int(self.metric.n_samples)
