"""Tiny stand-ins for the evaluation tests: a CLIP model folder, an Inception weights file and a cheap
feature extractor, all random (no downloads)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from tests.tiny import REPO


def save_tiny_clip(path: Path, seed: int = 0) -> Path:
    """A random CLIPModel + CLIPProcessor (bundled tiny tokenizer, 32 px images) via save_pretrained."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(REPO / "ldm/assets/tiny_clip_tokenizer")
    small = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2)
    text = dict(small, vocab_size=len(tok), max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)  # fmt: skip
    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=dict(small, image_size=32, patch_size=8),
                                 projection_dim=16))  # fmt: skip
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    model.save_pretrained(path)
    CLIPProcessor(image_processor=images, tokenizer=tok).save_pretrained(path)
    return path


def save_random_inception(path: Path, seed: int = 0) -> Path:
    """The TF InceptionV3 with random weights, saved as a plain state dict like the released .pth file."""
    from ldm.eval.inception import InceptionV3Features

    g = torch.Generator().manual_seed(seed)
    net = InceptionV3Features()
    with torch.no_grad():  # He-normal convolutions and near-identity batch norms keep the signal alive
        for name, t in net.state_dict().items():
            if name.endswith("conv.weight"):
                t.copy_(torch.randn(t.shape, generator=g) * (2 / t[0].numel()) ** 0.5)
            elif name.endswith(("bn.weight", "running_var")):
                t.copy_(1 + 0.1 * torch.rand(t.shape, generator=g))
            elif name.endswith(("bn.bias", "running_mean")):
                t.copy_(0.05 * torch.randn(t.shape, generator=g))
    torch.save(net.state_dict(), path)
    return path


class TinyFeatures(nn.Module):
    """uint8 N x 3 x H x W -> N x 16: a fixed random conv, ReLU, global average; cheap on a CPU."""

    identity = "tiny-random-conv16"

    def __init__(self, seed: int = 0, weights: str | None = None):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, 16, 5, stride=2)
        if weights is not None:  # the config's `weights` key, so that the inception config can be reused
            self.load_state_dict(torch.load(weights, weights_only=True))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(images.float() / 127.5 - 1)).mean(dim=(2, 3))
