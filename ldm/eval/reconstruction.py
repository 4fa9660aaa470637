"""Reconstruction quality of an autoencoder on the held-out digits: PSNR and SSIM (torchmetrics), next to
the same architecture untrained, so a table shows what training bought.

    python -m ldm.eval.reconstruction [AE_PATH] [--root data/digits --resolution 32]

AE_PATH defaults to the autoencoder shipped for the default experiment (ldm/assets/digits_ae).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

from ldm.nn.autoencoder import AutoencoderKL

SHIPPED = Path(__file__).resolve().parents[1] / "assets" / "digits_ae" / "autoencoder.safetensors"


@torch.no_grad()
def reconstruction_metrics(autoencoder: AutoencoderKL, loader) -> dict[str, float]:
    """PSNR and SSIM (data range 1, images in [0, 1]) of posterior-mean reconstructions over `loader`."""
    psnr, ssim = PeakSignalNoiseRatio(data_range=1.0), StructuralSimilarityIndexMeasure(data_range=1.0)
    autoencoder.eval()
    for batch in loader:
        x = batch["image"]
        xrec = autoencoder.decode(autoencoder.encode(x).mode()).clamp(-1, 1)
        psnr.update((xrec + 1) / 2, (x + 1) / 2)
        ssim.update((xrec + 1) / 2, (x + 1) / 2)
    return {"psnr": float(psnr.compute()), "ssim": float(ssim.compute())}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("autoencoder", nargs="?", default=str(SHIPPED))
    parser.add_argument("--root", default="data/digits")
    parser.add_argument("--resolution", type=int, default=32)
    args = parser.parse_args(argv)

    from ldm.checkpoints import load_autoencoder
    from ldm.data.digits import DigitsDataModule

    data = DigitsDataModule(root=args.root, resolution=args.resolution, batch_size=64, num_workers=0)
    data.prepare_data()
    data.setup("validate")
    trained = load_autoencoder(args.autoencoder)
    torch.manual_seed(0)
    untrained = AutoencoderKL(**{**trained.config, "scale_factor": 1.0})
    rows = {
        "untrained": reconstruction_metrics(untrained, data.val_dataloader()),
        "trained": reconstruction_metrics(trained, data.val_dataloader()),
    }
    print("| autoencoder | PSNR (dB) | SSIM |\n|---|---|---|")
    for name, m in rows.items():
        print(f"| {name} | {m['psnr']:.2f} | {m['ssim']:.3f} |")
    print(f"scale factor of the trained one: {trained.scale_factor:.4f}")
    print(json.dumps(rows))
    return rows


if __name__ == "__main__":
    main()
