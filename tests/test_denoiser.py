"""Parameterization conversions and the Denoiser, on toy networks whose answers are known in closed form."""

import math

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from ldm.diffusion import (
    Denoiser,
    NoiseSchedule,
    eps_to_v,
    eps_to_x0,
    sigma_to_vp,
    to_eps,
    to_x0,
    training_target,
    v_to_eps,
    v_to_x0,
    x0_to_eps,
    x0_to_v,
)

TYPES = ["epsilon", "v_prediction", "sample"]


def _vp(shape=(5, 1, 1, 1)):
    """Random VP coefficients with alpha^2 + sigma^2 = 1, away from the singular ends."""
    angle = torch.empty(shape, dtype=torch.float64).uniform_(0.05, math.pi / 2 - 0.05)
    return angle.cos(), angle.sin()


def test_conversion_round_trips():
    """eps -> x0 -> v -> eps (and the reverse cycle) recovers eps; every pair agrees with the definitions."""
    alpha_t, sigma_t = _vp()
    z0, eps = torch.randn(5, 3, 4, 4, dtype=torch.float64), torch.randn(5, 3, 4, 4, dtype=torch.float64)
    x_t = alpha_t * z0 + sigma_t * eps
    v = alpha_t * eps - sigma_t * z0  # Salimans & Ho 2022
    x0 = eps_to_x0(eps, x_t, alpha_t, sigma_t)
    torch.testing.assert_close(x0, z0)
    torch.testing.assert_close(x0_to_v(x0, x_t, alpha_t, sigma_t), v)
    torch.testing.assert_close(v_to_eps(v, x_t, alpha_t, sigma_t), eps)
    torch.testing.assert_close(eps_to_v(eps, x_t, alpha_t, sigma_t), v)
    torch.testing.assert_close(v_to_x0(v, x_t, alpha_t, sigma_t), z0)
    torch.testing.assert_close(x0_to_eps(z0, x_t, alpha_t, sigma_t), eps)
    outputs = {"epsilon": eps, "v_prediction": v, "sample": z0}
    for kind, output in outputs.items():
        torch.testing.assert_close(to_x0(output, kind, x_t, alpha_t, sigma_t), z0)
        torch.testing.assert_close(to_eps(output, kind, x_t, alpha_t, sigma_t), eps)
        torch.testing.assert_close(training_target(kind, z0, eps, alpha_t, sigma_t), output)


def test_training_target_v_matches_diffusers():
    """v target equals DDPMScheduler.get_velocity."""
    s = NoiseSchedule()
    t = torch.tensor([0, 250, 999])
    z0, noise = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    alpha_t, sigma_t = (c.float().reshape(-1, 1, 1, 1) for c in s.vp_coefficients(t))
    ours = training_target("v", z0, noise, alpha_t, sigma_t)
    theirs = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).get_velocity(
        z0, noise, t
    )
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


class ConstantNet:
    """Returns a fixed tensor and records its inputs."""

    def __init__(self, output):
        self.output = output
        self.calls = []

    def __call__(self, x, t, context=None):
        self.calls.append((x, t, context))
        return self.output.expand_as(x)


@pytest.mark.parametrize("prediction_type", TYPES)
def test_denoiser_constant_net(prediction_type):
    """D(x, sigma) = c_skip x + c_out F(c_in x, t(sigma)) with the EDM coefficients written out by hand."""
    s = NoiseSchedule()
    out = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    net = ConstantNet(out)
    den = Denoiser(net, s, prediction_type)
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64) * 3
    sigma = torch.tensor([0.5, 7.0], dtype=torch.float64)
    d = den(x, sigma, context="ctx")
    sg = sigma.reshape(-1, 1, 1, 1)
    expected = {
        "epsilon": x - sg * out,
        "v_prediction": x / (sg**2 + 1) - sg / (sg**2 + 1).sqrt() * out,
        "sample": out,
    }[prediction_type]
    torch.testing.assert_close(d, expected)
    x_in, t_in, ctx = net.calls[-1]
    torch.testing.assert_close(x_in, x / (sg**2 + 1).sqrt())
    torch.testing.assert_close(t_in.double(), s.sigma_to_t(sigma).double())
    assert ctx == "ctx"
    # eps view agrees with (x - D) / sigma.
    torch.testing.assert_close(den.predict_eps(x, sigma), (x - d) / sg)
    # A python float sigma is broadcast over the batch.
    torch.testing.assert_close(den(x, 7.0)[1], expected[1])


def _oracle_net(schedule, z0, prediction_type):
    """A perfect network for data concentrated at z0: it knows eps = (x_t - alpha_t z0) / sigma_t."""

    def net(x_t, t, context=None):
        alpha_t, sigma_t = schedule.vp_coefficients(t)
        alpha_t, sigma_t = (c.to(x_t.dtype).reshape(-1, 1, 1, 1) for c in (alpha_t, sigma_t))
        eps = (x_t - alpha_t * z0) / sigma_t
        return training_target(prediction_type, z0, eps, alpha_t, sigma_t).expand_as(x_t)

    return net


@pytest.mark.parametrize("prediction_type", TYPES)
def test_denoiser_recovers_z0_from_oracle(prediction_type):
    """With a perfect network, D(z0 + sigma n, sigma) = z0 and predict_eps = n at off-grid sigmas, and the
    timestep view gives (z0, eps) at integer t."""
    s = NoiseSchedule()
    z0 = torch.randn(1, 3, 4, 4, dtype=torch.float64)
    den = Denoiser(_oracle_net(s, z0, prediction_type), s, prediction_type)
    sigma = torch.exp(
        torch.empty(6, dtype=torch.float64).uniform_(math.log(s.sigma_min), math.log(s.sigma_max))
    )
    n = torch.randn(6, 3, 4, 4, dtype=torch.float64)
    x = z0 + sigma.reshape(-1, 1, 1, 1) * n
    torch.testing.assert_close(den(x, sigma), z0.expand_as(x), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(den.predict_eps(x, sigma), n, rtol=1e-6, atol=1e-6)

    t = torch.tensor([0, 1, 400, 998, 999, 999])
    x_t = s.add_noise(z0.expand_as(n), n, t)
    x0_hat, eps_hat = den.predict_at(x_t, t)
    torch.testing.assert_close(x0_hat, z0.expand_as(x_t), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(eps_hat, n, rtol=1e-6, atol=1e-6)


def test_predict_at_matches_ddim_pred_original_sample():
    """x0 from the timestep view equals DDIMScheduler.step's pred_original_sample for a v network."""
    s = NoiseSchedule(timestep_spacing="leading", steps_offset=1)
    ddim = DDIMScheduler.from_config(s.to_diffusers_config(prediction_type="v_prediction"))
    ddim.set_timesteps(10)
    t = int(ddim.timesteps[3])
    x_t, v = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    den = Denoiser(ConstantNet(v), s, "v")
    x0, _ = den.predict_at(x_t, t)
    theirs = ddim.step(v, t, x_t).pred_original_sample
    torch.testing.assert_close(x0, theirs, rtol=1e-5, atol=1e-5)


def test_zero_terminal_snr_v_denoiser_is_finite():
    """Under zero terminal SNR a v denoiser at sigma = inf / t = T-1 returns -v: finite, and exact for the
    oracle; an eps denoiser cannot (documented)."""
    s = NoiseSchedule(rescale_zero_terminal_snr=True, timestep_spacing="trailing", steps_offset=0)
    assert math.isinf(s.sigmas[-1])
    v = torch.randn(2, 3, 4, 4)
    net = ConstantNet(v)
    den = Denoiser(net, s, "v_prediction")
    x = torch.randn(2, 3, 4, 4)
    d = den(x, math.inf)
    assert torch.isfinite(d).all()
    torch.testing.assert_close(d, -v)
    x_in, t_in, _ = net.calls[-1]
    assert torch.all(x_in == 0) and torch.all(t_in == 999)  # c_in -> 0, t -> T - 1
    assert torch.isfinite(den.predict_eps(x, math.inf)).all()
    c_skip, c_out, c_in = den.scalings(torch.tensor([math.inf]))
    assert c_skip.item() == 0 and c_out.item() == -1 and c_in.item() == 0
    x0, eps = den.predict_at(x, 999)
    torch.testing.assert_close(x0, -v)
    torch.testing.assert_close(eps, x)  # alpha_t = 0: x_t is pure noise
    # Oracle v network: exact z0 from pure noise at the terminal step.
    z0 = torch.randn(1, 3, 4, 4, dtype=torch.float64)
    oracle = Denoiser(_oracle_net(s, z0, "v_prediction"), s, "v_prediction")
    x0, _ = oracle.predict_at(torch.randn(2, 3, 4, 4, dtype=torch.float64), torch.tensor([999, 999]))
    torch.testing.assert_close(x0, z0.expand(2, -1, -1, -1))
    # eps-prediction has no finite answer there.
    assert not torch.isfinite(Denoiser(ConstantNet(v), s, "epsilon")(x, math.inf)).all()


def test_scalings_limits_and_dtype():
    """c_in = alpha_t, sigma = 0 is the identity for eps/v, and half-precision x stays half."""
    s = NoiseSchedule()
    sigma = torch.tensor([0.0, 1.0, 14.6])
    alpha_t, sigma_t = sigma_to_vp(sigma)
    for kind in TYPES:
        c_skip, c_out, c_in = Denoiser(None, s, kind).scalings(sigma)
        torch.testing.assert_close(c_in, alpha_t)
        if kind != "sample":
            assert c_skip[0] == 1 and c_out[0] == 0
    den = Denoiser(ConstantNet(torch.zeros(1, dtype=torch.bfloat16)), s, "eps")
    x = torch.randn(2, 3, 2, 2, dtype=torch.bfloat16)
    assert den(x, torch.tensor([1.0, 2.0])).dtype == torch.bfloat16
    torch.testing.assert_close(sigma_t / alpha_t, sigma)
    with pytest.raises(ValueError):
        Denoiser(None, s, "flow")
