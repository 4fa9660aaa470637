"""ldm.losses: LPIPS against torchmetrics' implementation, the PatchGAN layout, GAN losses, and every term
of the autoencoder loss against a step-by-step hand computation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ldm.losses import LPIPS, AutoencoderLoss, NLayerDiscriminator, adaptive_weight
from ldm.losses.gan import generator_loss, hinge_d_loss, vanilla_d_loss
from ldm.losses.perceptual import _normalize, torchmetrics_lpips_weights
from ldm.nn.autoencoder import AutoencoderKL


def torchvision_vgg16_features() -> nn.Sequential:
    """torchvision's `vgg16().features` (`make_layers(cfgs["D"])`), written out independently of ours,
    with torchvision's own init (Kaiming normal, fan_out) so random features keep a sane scale."""
    cfg = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
    layers, c = [], 3
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            conv = nn.Conv2d(c, v, kernel_size=3, padding=1)
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            nn.init.normal_(conv.bias, 0.0, 0.1)  # non-zero, so a bias that fails to load shows
            layers += [conv, nn.ReLU(inplace=True)]
            c = v
    return nn.Sequential(*layers)


@pytest.fixture(scope="module")
def vgg_file(tmp_path_factory):
    """Random VGG16 weights saved as torchvision saves them (`features.N.*` plus a classifier)."""
    torch.manual_seed(1)
    trunk = torchvision_vgg16_features()
    sd = {f"features.{k}": v for k, v in trunk.state_dict().items()}
    sd["classifier.0.weight"] = torch.randn(8, 4)  # must be ignored
    path = tmp_path_factory.mktemp("vgg") / "vgg16-random.pth"
    torch.save(sd, path)
    return path, trunk


def test_lpips_equals_torchmetrics_implementation(vgg_file, monkeypatch):
    """torchmetrics builds LPIPS' trunk through torchvision, which is not installed: its only torchvision
    call, `_get_tv_model_features`, is replaced by the independent trunk above; everything else (scaling
    layer, slices, normalization, linear layers and the shipped vgg.pth, averaging) is torchmetrics' code."""
    import torchmetrics.functional.image.lpips as tm_lpips

    path, trunk = vgg_file
    monkeypatch.setattr(tm_lpips, "_get_tv_model_features", lambda net, pretrained=False: trunk)
    reference = tm_lpips._LPIPS(pretrained=True, net="vgg")  # loads torchmetrics' lpips_models/vgg.pth
    ours = LPIPS(pretrained=True, vgg16_path=path)
    x, y = torch.rand(3, 3, 32, 48) * 2 - 1, torch.rand(3, 3, 32, 48) * 2 - 1
    y[0] = x[0] + 0.05 * torch.randn_like(x[0])  # a near pair as well as unrelated ones
    with torch.no_grad():
        expected = reference(x, y).flatten()
        got = ours(x, y)
        assert got.shape == (3,)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
        assert got[0] < got[1:].min()
        torch.testing.assert_close(ours(y, x), got, rtol=1e-6, atol=1e-7)  # symmetric
        assert ours(x, x).abs().max() == 0  # identical images: exactly zero


def test_lpips_loading_and_freezing(vgg_file, tmp_path):
    path, _ = vgg_file
    with pytest.raises(ValueError, match="vgg16-397923af.pth"):
        LPIPS(pretrained=True, vgg16_path=None)
    features_only = tmp_path / "features.pth"
    torch.save({k: v for k, v in torch.load(path).items() if k.startswith("features.0.")}, features_only)
    with pytest.raises(ValueError, match="missing"):
        LPIPS(pretrained=True, vgg16_path=features_only)
    negative = tmp_path / "lin.pth"
    lins = torch.load(torchmetrics_lpips_weights(), map_location="cpu", weights_only=True)
    lins["lin2.model.1.weight"] = -lins["lin2.model.1.weight"]
    torch.save(lins, negative)
    with pytest.raises(ValueError, match="negative"):
        LPIPS(pretrained=True, vgg16_path=path, linear_path=negative)

    m = LPIPS(pretrained=True, vgg16_path=path)
    shipped = torch.load(torchmetrics_lpips_weights(), map_location="cpu", weights_only=True)
    assert torch.equal(m.lins[4].weight, shipped["lin4.model.1.weight"])
    assert not any(p.requires_grad for p in m.parameters())
    assert not m.train().training  # stays in eval whatever the owner does
    x = (torch.rand(1, 3, 16, 16) * 2 - 1).requires_grad_()
    m(x, torch.zeros_like(x)).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0  # gradients reach the images, not the weights


def test_normalize_has_finite_gradient_at_zero():
    """A feature vector a ReLU zeroed entirely: the unit normalization must not produce NaN gradients."""
    f = torch.zeros(1, 4, 2, 2, requires_grad=True)
    _normalize(f).pow(2).sum().backward()
    assert torch.isfinite(f.grad).all()


def test_patchgan_layout_matches_taming():
    d = NLayerDiscriminator()  # taming defaults: 3 channels, ndf 64, 3 layers, batch norm
    # taming NLayerDiscriminator(3, 64, 3): 2,765,633 parameters and these `main.N` names.
    assert sum(p.numel() for p in d.parameters()) == 2_765_633
    assert [k for k in d.state_dict() if k.endswith("weight")] == [
        "main.0.weight", "main.2.weight", "main.3.weight", "main.5.weight", "main.6.weight",
        "main.8.weight", "main.9.weight", "main.11.weight",
    ]  # fmt: skip
    assert "main.2.bias" not in d.state_dict()  # no bias before batch norm
    with torch.device("meta"):
        shape = NLayerDiscriminator()(torch.empty(2, 3, 256, 256)).shape
    assert shape == (2, 1, 30, 30)  # 70x70 patches
    conv_w = torch.cat([d.main[i].weight.flatten() for i in (0, 2, 5, 8, 11)])
    assert abs(conv_w.std().item() - 0.02) < 1e-3 and abs(conv_w.mean().item()) < 1e-3  # N(0, 0.02) init
    assert abs(d.main[3].weight.mean().item() - 1.0) < 0.01 and d.main[3].bias.abs().max() == 0


@pytest.mark.parametrize("norm", ["spectral", "none"])
def test_patchgan_other_norms(norm):
    d = NLayerDiscriminator(ndf=8, n_layers=2, norm=norm)
    assert isinstance(d.main[3], nn.Identity) and d.main[2].bias is not None
    out = d(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 1, 6, 6)
    if norm == "spectral":
        # The spectral norm parametrization divides the weight by its largest singular value.
        w = d.main[2].weight.flatten(1)
        assert torch.linalg.matrix_norm(w, ord=2).item() == pytest.approx(1.0, rel=0.05)
    with pytest.raises(ValueError, match="norm"):
        NLayerDiscriminator(norm="group")


def test_gan_losses_by_hand():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-3.0, 0.0])
    # hinge: 0.5 * (mean(relu(1 - [2, .5])) + mean(relu(1 + [-3, 0]))) = 0.5 * (0.25 + 0.5)
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.375)
    sp = lambda t: torch.log1p(torch.exp(t))  # noqa: E731
    expected = 0.5 * (sp(-real).mean() + sp(fake).mean())
    assert vanilla_d_loss(real, fake).item() == pytest.approx(expected.item())
    assert generator_loss(torch.tensor([1.0, -3.0])).item() == pytest.approx(1.0)


def test_adaptive_weight_by_hand():
    w = torch.randn(3, 4, requires_grad=True)
    a, b = torch.randn(3, 4), torch.randn(3, 4)
    nll, g = (w * a).sum(), (w * b).sum()  # gradients a and b
    expected = a.norm() / (b.norm() + 1e-4) * 0.5
    assert adaptive_weight(nll, g, w, 0.5).item() == pytest.approx(expected.item(), rel=1e-6)
    # A generator gradient of zero would divide by 1e-4: clamped to 1e4 (times disc_weight).
    big = adaptive_weight((w * a * 100).sum(), (w * 0.0).sum(), w, 0.5)
    assert big.item() == pytest.approx(0.5e4) and not big.requires_grad


def test_autoencoder_loss_every_term_by_hand():
    """CompVis LPIPSWithDiscriminator.forward (optimizer_idx 0 and 1), recomputed step by step."""
    torch.manual_seed(0)
    ae = AutoencoderKL(ch=32, ch_mult=[1, 2], num_res_blocks=1, resolution=16)
    disc = NLayerDiscriminator(ndf=8, n_layers=2)
    lp = LPIPS(pretrained=False)
    kw = dict(perceptual_weight=0.7, l1_weight=1.0, l2_weight=0.3, kl_weight=0.01, logvar_init=0.4)
    loss_fn = AutoencoderLoss(lp, **kw, disc_weight=0.5, disc_factor=0.8, disc_loss="hinge")
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    xrec, post = ae(x, generator=torch.Generator().manual_seed(3))
    logits_fake = disc(xrec)
    last = ae.decoder.conv_out.weight
    loss, logs = loss_fn.generator_loss(x, xrec, post, logits_fake, last)

    rec = (x - xrec).abs() + 0.3 * (x - xrec) ** 2 + 0.7 * lp(x, xrec)[:, None, None, None]
    lv = loss_fn.logvar  # the learned parameter, initialized to 0.4
    assert lv.item() == pytest.approx(0.4)
    nll = (rec / torch.exp(lv) + lv).sum() / 2
    var = torch.exp(post.logvar)
    kl = (0.5 * (post.mean**2 + var - 1.0 - post.logvar)).sum() / 2
    g = -logits_fake.mean()
    g_nll = torch.autograd.grad(nll, last, retain_graph=True)[0]
    g_g = torch.autograd.grad(g, last, retain_graph=True)[0]
    d_weight = (g_nll.norm() / (g_g.norm() + 1e-4)).clamp(0, 1e4) * 0.5
    total = nll + 0.01 * kl + d_weight.detach() * 0.8 * g

    close = dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss, total, **close)
    for name, value in [("rec_loss", rec.mean()), ("nll", nll), ("kl", kl), ("g_loss", g)]:
        torch.testing.assert_close(logs[name], value.detach(), **close)
    torch.testing.assert_close(logs["d_weight"], d_weight.detach(), **close)
    torch.testing.assert_close(logs["p_loss"], lp(x, xrec).mean().detach(), **close)
    assert logs["logvar"].item() == pytest.approx(0.4)
    # Gradients: the adaptive weight is a constant, the log-variance is learned.
    params = [*ae.parameters(), loss_fn.logvar]
    ours = torch.autograd.grad(loss, params, retain_graph=True)
    hand = torch.autograd.grad(total, params, retain_graph=True)
    # One norm over all gradients: float32 summation order differs, and the biases in front of a
    # GroupNorm have (analytically zero) gradients made of rounding noise.
    a, b = torch.cat([t.flatten() for t in ours]), torch.cat([t.flatten() for t in hand])
    assert (a - b).norm() <= 1e-5 * b.norm()
    assert ours[-1] is not None and ours[-1].abs() > 0

    # Before the discriminator starts: no GAN term at all.
    loss0, logs0 = loss_fn.generator_loss(x, xrec, post, None, last)
    torch.testing.assert_close(loss0, nll + 0.01 * kl, **close)
    assert "g_loss" not in logs0

    # The discriminator's step: disc_factor x hinge on detached reconstructions.
    lr_, lf_ = disc(x), disc(xrec.detach())
    d_loss, d_logs = loss_fn.discriminator_loss(lr_, lf_)
    hinge = 0.5 * (F.relu(1 - lr_).mean() + F.relu(1 + lf_).mean())
    torch.testing.assert_close(d_loss, 0.8 * hinge, **close)
    torch.testing.assert_close(d_logs["logits_fake"], lf_.mean().detach(), **close)


def test_autoencoder_loss_needs_perceptual_network():
    with pytest.raises(ValueError, match="perceptual"):
        AutoencoderLoss(perceptual=None, perceptual_weight=1.0)
    with pytest.raises(ValueError, match="discriminator loss"):
        AutoencoderLoss(perceptual=None, perceptual_weight=0.0, disc_loss="wgan")
