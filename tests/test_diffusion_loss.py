"""The training loss: targets per parameterization, timestep sampling, min-SNR weights, noise offset,
input perturbation, and the bucketed logging helper."""

import pytest
import torch

from ldm.diffusion.denoiser import x0_to_eps, x0_to_v
from ldm.diffusion.loss import DiffusionLoss, LossByTimestep
from ldm.diffusion.schedule import NoiseSchedule

SCHED = NoiseSchedule()


def oracle(z0, prediction_type, schedule=SCHED):
    """A network that knows z0 and so returns the exact target for any x_t."""

    def net(x_t, t, context):
        a, s = schedule.vp_coefficients(t)
        a, s = a.float()[:, None, None, None], s.float()[:, None, None, None]
        if prediction_type == "epsilon":
            return x0_to_eps(z0, x_t, a, s)
        if prediction_type == "v_prediction":
            return x0_to_v(z0, x_t, a, s)
        return z0

    return net


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_oracle_network_has_zero_loss(prediction_type):
    z0 = torch.randn(16, 4, 8, 8)
    loss, t = DiffusionLoss(SCHED, prediction_type)(oracle(z0, prediction_type), z0)
    assert loss.shape == t.shape == (16,)
    assert loss.max() < 1e-6


def test_wrong_target_has_loss():
    z0 = torch.randn(16, 4, 8, 8)
    loss, _ = DiffusionLoss(SCHED, "v_prediction")(oracle(z0, "epsilon"), z0)
    assert loss.mean() > 1e-3


def test_input_perturbation_shows_in_the_input_not_the_target():
    z0 = torch.randn(64, 4, 8, 8)
    loss, _ = DiffusionLoss(SCHED, "epsilon", input_perturbation=0.1)(oracle(z0, "epsilon"), z0)
    # The oracle recovers the perturbed noise from x_t; the target is the original: error = 0.1 * N(0, 1).
    assert loss.mean().item() == pytest.approx(0.01, rel=0.1)


def test_noise_offset_adds_a_per_channel_constant():
    seen = {}

    def net(x_t, t, context):
        seen["x"] = x_t
        return torch.zeros_like(x_t)

    z0 = torch.zeros(512, 4, 8, 8)
    loss = DiffusionLoss(SCHED, "epsilon", noise_offset=0.5, timestep_sampling="weights",
                         timestep_weights=[0.0] * 999 + [1.0])  # fmt: skip
    loss(net, z0)
    channel_means = seen["x"].mean(dim=(2, 3)) / SCHED.vp_coefficients(torch.tensor(999))[1].float()
    assert channel_means.var().item() == pytest.approx(0.25 + 1 / 64, rel=0.15)


def test_min_snr_weights_by_hand():
    t = torch.tensor([0, 500, 999])
    snr = SCHED.alphas_cumprod[t] / (1 - SCHED.alphas_cumprod[t])
    gamma = 5.0
    clipped = snr.clamp(max=gamma)
    for ptype, expected in [
        ("epsilon", clipped / snr),
        ("v_prediction", clipped / (snr + 1)),
        ("sample", clipped),
    ]:
        w = DiffusionLoss(SCHED, ptype, weighting="min_snr", min_snr_gamma=gamma).weight(t)
        torch.testing.assert_close(w, expected.float())


def test_timestep_samplings():
    g = torch.Generator().manual_seed(0)
    uniform = DiffusionLoss(SCHED).sample_timesteps(20000, torch.device("cpu"), g)
    assert uniform.min() == 0 and uniform.max() == 999 and abs(uniform.float().mean() - 499.5) < 10
    ln = DiffusionLoss(SCHED, timestep_sampling="logit_normal").sample_timesteps(
        20000, torch.device("cpu"), g
    )
    # Logit-normal(0, 1) puts ~68% of the mass in sigmoid(-1..1) = [0.269, 0.731].
    inside = ((ln >= 269) & (ln < 731)).float().mean()
    assert inside.item() == pytest.approx(0.683, abs=0.02)
    w = [0.0] * 1000
    w[10] = 1.0
    fixed = DiffusionLoss(SCHED, timestep_sampling="weights", timestep_weights=w)
    assert (fixed.sample_timesteps(100, torch.device("cpu"), g) == 10).all()


def test_bad_settings_fail_clearly():
    with pytest.raises(ValueError, match="v_prediction"):
        DiffusionLoss(NoiseSchedule(rescale_zero_terminal_snr=True), "epsilon")
    with pytest.raises(ValueError, match="timestep_sampling"):
        DiffusionLoss(SCHED, timestep_sampling="cosine")
    with pytest.raises(ValueError, match="weighting"):
        DiffusionLoss(SCHED, weighting="p2")
    with pytest.raises(ValueError, match="1000 values"):
        DiffusionLoss(SCHED, timestep_sampling="weights", timestep_weights=[1.0])


def test_zero_terminal_snr_v_loss_at_the_last_step():
    """At t = T-1 with zero terminal SNR, x_t is pure noise and v = -z0 (Lin et al. 2023, Sec. 3.2): the
    unweighted loss is zero for the right network and large for wrong ones; min-SNR's v weight
    min(SNR, gamma) / (SNR + 1) is exactly 0 there (finite, where the eps weight would be 0 / 0)."""
    z0 = torch.randn(8, 4, 8, 8)
    sched = NoiseSchedule(rescale_zero_terminal_snr=True)
    last = dict(timestep_sampling="weights", timestep_weights=[0.0] * 999 + [1.0])
    plain = DiffusionLoss(sched, "v_prediction", **last)
    loss, t = plain(oracle(z0, "v_prediction", sched), z0)
    assert (t == 999).all() and torch.isfinite(loss).all() and loss.max() < 1e-6
    # The v target there is -z0, neither the noise (x_t itself) nor z0.
    assert plain(lambda x_t, t, c: -z0, z0)[0].max() < 1e-10
    for wrong in (lambda x_t, t, c: x_t, lambda x_t, t, c: z0, lambda x_t, t, c: torch.zeros_like(x_t)):
        assert plain(wrong, z0)[0].mean() > 0.5
    weighted = DiffusionLoss(sched, "v_prediction", weighting="min_snr", **last)
    assert weighted.weight(torch.tensor([999])).item() == 0.0
    w = weighted(lambda x_t, t, c: x_t, z0)[0]
    assert torch.isfinite(w).all() and (w == 0).all()


def test_loss_by_timestep_means_over_the_committed_steps():
    """Means per timestep range over the steps committed since the last pop; NaN where none fell; a step
    dropped (skipped) or never committed (cut short) does not count; the window survives a state dict."""
    window = LossByTimestep(1000, buckets=10)
    assert window.pop() == {}
    window.add(torch.tensor([1.0, 3.0, 10.0]), torch.tensor([5, 50, 999]))
    window.add(torch.tensor([5.0]), torch.tensor([99]))  # a second micro-batch of the same step
    window.commit()
    window.add(torch.tensor([100.0]), torch.tensor([0]))
    window.commit(keep=False)  # skipped by the non-finite guard
    window.add(torch.tensor([7.0]), torch.tensor([990]))
    state = window.state_dict()  # a checkpoint written before that step completed
    window.commit()
    out = window.pop()
    assert list(out) == [f"t{k}00-{k}99" for k in range(10)]
    assert out["t000-099"].item() == 3.0 and out["t900-999"].item() == 8.5
    assert all(out[k].isnan() for k in out if k not in ("t000-099", "t900-999"))
    assert window.pop() == {}
    resumed = LossByTimestep(1000, buckets=10)
    resumed.load_state_dict(state)
    resumed.add(torch.tensor([7.0]), torch.tensor([990]))  # the cut step, run again
    resumed.commit()
    again = torch.stack(list(resumed.pop().values()))
    torch.testing.assert_close(again, torch.stack(list(out.values())), rtol=0, atol=0, equal_nan=True)
    # A schedule whose length is not a multiple: the last range takes the rest.
    assert LossByTimestep(1005, buckets=10).names[-1] == "t900-1004"
