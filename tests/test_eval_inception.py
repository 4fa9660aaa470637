"""The TF InceptionV3 of `ldm.eval.inception`: the released weights file's layout, loading it from a local
path (a random network of the same architecture saved to a file), TF 1.x resizing, clear errors."""

from __future__ import annotations

import pytest
import torch

from ldm.eval.inception import InceptionV3Features, file_sha256, resize_bilinear_tf1
from tests.eval_tiny import save_random_inception

# torchvision documents 27,161,264 parameters for inception_v3 (1000 classes, with AuxLogits); AuxLogits
# holds 3,326,696 (conv 768->128 1x1 + BN, conv 128->768 5x5 + BN, fc 768->1000); the TF graph has 1008
# classes (+8 x 2048 + 8). The released pt_inception-2015-12-05 file is that network without AuxLogits.
PARAMS = 27_161_264 - 3_326_696 + 8 * 2048 + 8

CONVS_PER_BLOCK = {
    "A": ["branch1x1", "branch5x5_1", "branch5x5_2", "branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3",
          "branch_pool"],
    "B": ["branch3x3", "branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"],
    "C": ["branch1x1", "branch7x7_1", "branch7x7_2", "branch7x7_3"]
    + [f"branch7x7dbl_{i}" for i in range(1, 6)] + ["branch_pool"],
    "D": ["branch3x3_1", "branch3x3_2"] + [f"branch7x7x3_{i}" for i in range(1, 5)],
    "E": ["branch1x1", "branch3x3_1", "branch3x3_2a", "branch3x3_2b", "branch3x3dbl_1", "branch3x3dbl_2",
          "branch3x3dbl_3a", "branch3x3dbl_3b", "branch_pool"],
}  # fmt: skip
BLOCKS = {"5b": "A", "5c": "A", "5d": "A", "6a": "B", "6b": "C", "6c": "C", "6d": "C", "6e": "C", "7a": "D",
          "7b": "E", "7c": "E"}  # fmt: skip


def reference_keys() -> set[str]:
    """The keys of pt_inception-2015-12-05-6726825d.pth (pytorch-fid / torch-fidelity layout)."""
    convs = ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "Conv2d_3b_1x1", "Conv2d_4a_3x3"]
    convs += [f"Mixed_{b}.{c}" for b, kind in BLOCKS.items() for c in CONVS_PER_BLOCK[kind]]
    suffixes = ["conv.weight", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var"]
    return {f"{c}.{s}" for c in convs for s in suffixes} | {"fc.weight", "fc.bias"}


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    return save_random_inception(tmp_path_factory.mktemp("inception") / "pt_inception-random.pth")


def test_layout_matches_the_released_file():
    net = InceptionV3Features()
    state = {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert set(state) == reference_keys() and len(state) == 472
    assert sum(p.numel() for p in net.parameters()) == PARAMS == 23_850_960
    shapes = {
        "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
        "Mixed_6b.branch7x7_2.conv.weight": (128, 128, 1, 7),
        "Mixed_7c.branch_pool.conv.weight": (192, 2048, 1, 1),
        "fc.weight": (1008, 2048),
    }
    assert {k: tuple(state[k].shape) for k in shapes} == shapes
    assert net.Conv2d_1a_3x3.bn.eps == 1e-3


def test_loads_a_local_weights_file(weights_file):
    net = InceptionV3Features(weights_file)
    saved = torch.load(weights_file, weights_only=True)
    assert all(torch.equal(v, saved[k]) for k, v in net.state_dict().items())
    assert net.weights_sha256 == file_sha256(weights_file)
    images = torch.randint(0, 256, (2, 3, 40, 56), dtype=torch.uint8)
    features = net(images)
    assert features.shape == (2, 2048) and features.dtype == torch.float32 and torch.isfinite(features).all()
    assert not torch.allclose(features[0], features[1])  # a live network: images are told apart
    # Batch norm stays in inference mode whatever Lightning or torchmetrics do with .train().
    assert torch.equal(net.train()(images), features)
    # Without num_batches_tracked (files saved before torch 0.4.1 have none) it loads the same.
    torch.save({k: v for k, v in saved.items() if "num_batches" not in k}, weights_file.with_suffix(".old"))
    old = InceptionV3Features(weights_file.with_suffix(".old")).state_dict()
    assert all(torch.equal(old[k], v) for k, v in saved.items() if "num_batches" not in k)


def test_clear_errors(tmp_path, weights_file):
    with pytest.raises(FileNotFoundError, match="inception_weights"):
        InceptionV3Features(tmp_path / "missing.pth")
    saved = torch.load(weights_file, weights_only=True)
    saved.pop("fc.bias")
    torch.save(saved, tmp_path / "broken.pth")
    with pytest.raises(ValueError, match=r"missing \['fc.bias'\]"):
        InceptionV3Features(tmp_path / "broken.pth")
    with pytest.raises(TypeError, match="uint8"):
        InceptionV3Features()(torch.rand(1, 3, 32, 32))


def test_resize_is_tf1_bilinear():
    # TF 1.x resize_bilinear(align_corners=False): source = destination * in / out, no half-pixel shift,
    # the last source row repeated: a ramp 0..3 upsampled to 8 is 0, .5, 1, ..., 3, 3.
    ramp = torch.arange(4.0).view(1, 1, 1, 4).expand(1, 1, 4, 4)
    out = resize_bilinear_tf1(ramp, 8)
    assert torch.equal(out[0, 0, 0], torch.tensor([0, 0.5, 1, 1.5, 2, 2.5, 3, 3]))
    assert torch.equal(out[0, 0, :, 3], torch.full((8,), 1.5))
    # Downsampling by 2 picks every other sample (no antialiasing in the TF graph).
    x = torch.rand(1, 3, 10, 10)
    assert torch.equal(resize_bilinear_tf1(x, 5), x[..., ::2, ::2])
