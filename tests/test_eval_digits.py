"""The digits accuracy check: its classifier reads real digits after the shard round trip, a generator
that draws the asked-for digit scores high while one that draws another digit or noise does not, and the
CLI runs end to end on a saved pipeline."""

import json

import numpy as np
import pytest
import torch

from ldm.data.digits import digit_image
from ldm.eval import digits


class HeldOutDigits:
    """A stand-in generator with the Pipeline's call signature that "draws" held-out real digits (the
    shards' 32 px upscaling) for the prompt's digit, or for the digit `shift` further on."""

    def __init__(self, data, val: list[int], shift: int = 0):
        self.data, self.shift = data, shift
        self.by_label = {c: [i for i in val if data.target[i] == c] for c in range(10)}

    def __call__(self, prompt: str, num_images_per_prompt: int, output: str, **kwargs) -> torch.Tensor:
        assert output == "tensor" and prompt.startswith("a photo of the digit ")
        label = (digits.WORDS.index(prompt.rsplit(" ", 1)[-1]) + self.shift) % 10
        picks = self.by_label[label][:num_images_per_prompt]
        images = np.stack([np.asarray(digit_image(self.data.images[i], 32)) for i in picks])
        return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0


@pytest.fixture(scope="module")
def classifier():
    return digits.fit_classifier()


def accuracy(pipe, clf) -> float:
    per_digit = digits.generated_accuracy(
        pipe, clf, n=10, steps=1, sampler="euler", guidance_scale=1.0, seed=0
    )
    assert set(per_digit) == set(digits.WORDS)
    return float(np.mean(list(per_digit.values())))


def test_accuracy_tells_right_digits_from_wrong_ones_and_noise(classifier):
    clf, data, val = classifier
    assert accuracy(HeldOutDigits(data, val), clf) > 0.9
    assert accuracy(HeldOutDigits(data, val, shift=1), clf) < 0.1  # well drawn, but not the digit asked for

    def noise(prompt, num_images_per_prompt, output, seed, **kwargs):
        return torch.rand(num_images_per_prompt, 3, 32, 32, generator=torch.Generator().manual_seed(seed))

    assert accuracy(noise, clf) < 0.3


def test_classifier_reads_real_upscaled_digits(classifier):
    clf, data, val = classifier
    assert digits.real_ceiling(clf, data, val, resolution=32) > 0.95


def test_cli_on_a_run_export(tiny_sd_folder, capsys):
    result = digits.main([str(tiny_sd_folder), "--n", "2", "--steps", "2", "--sampler", "euler"])
    out = capsys.readouterr().out
    assert json.loads(out.strip().splitlines()[-1])["per_digit"].keys() == set(digits.WORDS)
    assert result["settings"]["n"] == 2 and result["real_heldout_accuracy"] > 0.95
    assert result["accuracy"] < 0.5  # random weights: about chance (0.1), far from the real digits


def test_reconstruction_table_for_the_shipped_autoencoder(tmp_path, capsys):
    from ldm.eval import reconstruction

    rows = reconstruction.main(["--root", str(tmp_path / "digits")])
    assert rows["trained"]["psnr"] > rows["untrained"]["psnr"] + 15
    assert rows["trained"]["psnr"] > 28 and rows["trained"]["ssim"] > 0.8
    assert "| trained |" in capsys.readouterr().out
