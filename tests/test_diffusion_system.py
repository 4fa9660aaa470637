"""LatentDiffusionSystem pieces that the end-to-end runs don't pin down: condition dropout for class
labels as well as captions, start-up checks, the EMA (updated right after each optimizer step, also with
gradient accumulation), and a validation loss that does not depend on the global RNG."""

from functools import partial

import pytest
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from ldm.diffusion.loss import DiffusionLoss
from ldm.diffusion.schedule import NoiseSchedule
from ldm.nn.conditioners import ClassConditioner
from ldm.systems.diffusion import LatentDiffusionSystem
from tests.tiny import REPO, randomize_


def system(conditioner, cond_key, ucg_rate=0.5, **kwargs):
    unet = instantiate(OmegaConf.load(REPO / "configs/model/unet/tiny.yaml"))
    ae = instantiate(OmegaConf.load(REPO / "configs/model/autoencoder/tiny.yaml"))
    return LatentDiffusionSystem(
        unet, ae, conditioner, NoiseSchedule(), DiffusionLoss, partial(torch.optim.AdamW, lr=1e-3),
        cond_key=cond_key, ucg_rate=ucg_rate, **kwargs,
    )  # fmt: skip


def test_class_label_dropout_uses_the_null_class():
    cond = ClassConditioner(10, 32)
    sys_ = system(cond, "label")
    labels = torch.arange(10).repeat(20)
    g = torch.Generator().manual_seed(0)
    context = sys_.conditioning({"label": labels}, drop=True, generator=g)
    null = cond.unconditional(1)[0]
    dropped = (context == null).all(dim=(1, 2))
    assert 0.35 < dropped.float().mean() < 0.65  # ucg_rate 0.5
    torch.testing.assert_close(context[~dropped], cond(labels)[~dropped])
    assert torch.equal(sys_.conditioning({"label": labels}, drop=False), cond(labels))


def test_caption_dropout_uses_the_empty_caption():
    cond = instantiate(OmegaConf.load(REPO / "configs/model/conditioner/tiny.yaml"))
    sys_ = system(cond, "caption", ucg_rate=0.5)
    captions = [f"a photo of the digit {w}" for w in ["one", "two"]] * 50
    context = sys_.conditioning({"caption": captions}, drop=True, generator=torch.Generator().manual_seed(1))
    empty = cond([""])[0]
    dropped = torch.isclose(context, empty).all(dim=(1, 2))
    assert 0.35 < dropped.float().mean() < 0.65


def test_adamw_is_fused_on_cpu_and_matches_the_unfused_step():
    """AdamW from a config partial runs fused (one kernel per tensor, CPU too): the same update as the
    for-loop implementation, to float rounding."""
    s = system(ClassConditioner(10, 32), "label")
    opt = s.configure_optimizers()
    assert opt.defaults["fused"] is True
    params = [p for g in opt.param_groups for p in g["params"]]
    ref_params = [p.detach().clone().requires_grad_() for p in params]
    ref = torch.optim.AdamW(ref_params, lr=1e-3, foreach=False)
    for p, r in zip(params, ref_params, strict=True):
        p.grad = r.grad = torch.randn_like(p)
    opt.step(), ref.step()
    assert all(torch.allclose(p, r, rtol=1e-6, atol=1e-7) for p, r in zip(params, ref_params, strict=True))


def test_mismatched_modules_fail_at_start_up():
    cond = ClassConditioner(10, 16)  # the tiny UNet wants a 32-wide context
    with pytest.raises(ValueError, match="context_dim"):
        system(cond, "label")
    with pytest.raises(ValueError, match="ucg_rate"):
        system(ClassConditioner(10, 32), "label", ucg_rate=1.0)


# ---------------------------------------------------------------------------------------- EMA and training
def text_system(**kwargs) -> LatentDiffusionSystem:
    """The tiny UNet / autoencoder / text conditioner, trained with plain SGD (no momentum: nothing else
    carries state between steps)."""
    torch.manual_seed(0)
    unet = instantiate(OmegaConf.load(REPO / "configs/model/unet/tiny.yaml"))
    ae = instantiate(OmegaConf.load(REPO / "configs/model/autoencoder/tiny.yaml"))
    cond = instantiate(OmegaConf.load(REPO / "configs/model/conditioner/tiny.yaml"))
    kwargs = {"optimizer": partial(torch.optim.SGD, lr=0.5), "ucg_rate": 0.0, **kwargs}
    return LatentDiffusionSystem(unet, ae, cond, NoiseSchedule(), DiffusionLoss, **kwargs)


def caption_batches(n_batches: int, batch_size: int = 2, side: int = 16) -> DataLoader:
    g = torch.Generator().manual_seed(1)
    items = [
        {"image": torch.rand(3, side, side, generator=g) * 2 - 1, "caption": f"digit {i % 10}"}
        for i in range(n_batches * batch_size)
    ]
    return DataLoader(items, batch_size=batch_size)


class WeightsAfterEachStep(pl.Callback):
    """The UNet's weights after every optimizer step (global_step moves only on the batches that step)."""

    def __init__(self):
        self.weights: list[dict[str, torch.Tensor]] = []
        self._step = 0

    def on_fit_start(self, trainer, pl_module):
        self.initial = {k: v.detach().clone() for k, v in pl_module.unet.named_parameters()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step != self._step:
            self._step = trainer.global_step
            self.weights.append({k: v.detach().clone() for k, v in pl_module.unet.named_parameters()})


def fit(system, loader, accumulate: int = 1, **trainer_kwargs) -> WeightsAfterEachStep:
    record = WeightsAfterEachStep()
    pl.Trainer(
        accelerator="cpu", max_epochs=1, accumulate_grad_batches=accumulate, callbacks=[record],
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, **trainer_kwargs,
    ).fit(system, loader)  # fmt: skip
    return record


def test_ema_with_decay_zero_exports_the_final_weights(tmp_path):
    """decay 0: the EMA is the last weights; the export (what sample.py loads) holds the final step's."""
    import ldm

    system = text_system(ema={"decay": 0.0, "warmup": None})
    record = fit(system, caption_batches(3))
    assert len(record.weights) == 3 and system.ema.num_updates == 3
    final = record.weights[-1]
    assert any(not torch.equal(final[k], record.weights[-2][k]) for k in final)  # the last step moved
    exported = ldm.load_pipeline(system.export(tmp_path / "export")).unet.state_dict()
    for k, v in final.items():
        torch.testing.assert_close(exported[k], v, rtol=0, atol=0)


@pytest.mark.parametrize("accumulate, n_batches", [(1, 3), (2, 5)])
def test_ema_is_the_hand_computed_average_of_the_steps(accumulate, n_batches):
    """shadow_k = d shadow_{k-1} + (1 - d) w_k over the weights after each optimizer step, from the initial
    weights; with accumulation only the stepping micro-batches count (5 batches by 2: steps after 2, 4, 5)."""
    decay = 0.6
    system = text_system(ema={"decay": decay, "warmup": None})
    record = fit(system, caption_batches(n_batches), accumulate=accumulate)
    assert len(record.weights) == 3 and system.ema.num_updates == 3
    for name, w0 in record.initial.items():
        expected = w0
        for weights in record.weights:
            expected = decay * expected + (1 - decay) * weights[name]
        torch.testing.assert_close(system.ema.shadow[name], expected, rtol=1e-5, atol=1e-7)


def test_validation_loss_is_fixed_whatever_the_global_rng():
    """Two validations of the same weights give the same val/loss although the global RNG moved (the
    posterior sample, noise and timesteps all come from the per-batch generator)."""
    system = text_system(sample_posterior=True)
    randomize_(system.unet, seed=1)  # a zero-initialized output layer would make the loss ||noise||^2 alone
    trainer = pl.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    torch.manual_seed(1)
    (first,) = trainer.validate(system, caption_batches(2), verbose=False)
    torch.manual_seed(2)
    torch.rand(100)
    (second,) = trainer.validate(system, caption_batches(2), verbose=False)
    assert first["val/loss"] == second["val/loss"]
    # The posterior sample is really drawn (not the mean): another batch index gives another latent.
    images = next(iter(caption_batches(1)))["image"]
    z_a = system.encode(images, torch.Generator().manual_seed(0))
    z_b = system.encode(images, torch.Generator().manual_seed(1))
    assert not torch.allclose(z_a, z_b)
