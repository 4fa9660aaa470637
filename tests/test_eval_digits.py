"""The digits accuracy check: its classifier reads real digits after the shard round trip, and the CLI
runs end to end on a saved pipeline."""

import json

from ldm.eval import digits


def test_classifier_reads_real_upscaled_digits():
    clf, data, val = digits.fit_classifier()
    assert digits.real_ceiling(clf, data, val, resolution=32) > 0.95


def test_cli_on_a_run_export(tiny_sd_folder, capsys):
    result = digits.main([str(tiny_sd_folder), "--n", "2", "--steps", "2", "--sampler", "euler"])
    out = capsys.readouterr().out
    assert json.loads(out.strip().splitlines()[-1])["per_digit"].keys() == set(digits.WORDS)
    assert 0.0 <= result["accuracy"] <= 1.0 and result["settings"]["n"] == 2


def test_reconstruction_table_for_the_shipped_autoencoder(tmp_path, capsys):
    from ldm.eval import reconstruction

    rows = reconstruction.main(["--root", str(tmp_path / "digits")])
    assert rows["trained"]["psnr"] > rows["untrained"]["psnr"] + 15
    assert rows["trained"]["psnr"] > 28 and rows["trained"]["ssim"] > 0.8
    assert "| trained |" in capsys.readouterr().out
