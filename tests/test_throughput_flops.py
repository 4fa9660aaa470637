"""The Throughput callback's FLOPs: UNet forward + backward counted on the meta device; the logged rates."""

from types import SimpleNamespace

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from ldm.nn.unet import UNetModel
from ldm.training.callbacks import Throughput, unet_flops_per_batch
from tests.tiny import UNET_KW


def test_flops_per_batch_match_a_real_forward_and_backward():
    unet = UNetModel(**UNET_KW)
    module = SimpleNamespace(unet=unet, sample_size=8, conditioner=SimpleNamespace(max_length=77))
    counted = unet_flops_per_batch(module, batch_size=3)
    # The counter knows the FLOPs of the math attention (as on meta), not of the CPU's fused kernel.
    with FlopCounterMode(display=False) as real, sdpa_kernel(SDPBackend.MATH):
        unet(torch.randn(3, 4, 8, 8), torch.tensor([1, 2, 3]), torch.randn(3, 77, 32)).sum().backward()
    assert counted == real.get_total_flops() > 0
    assert unet_flops_per_batch(SimpleNamespace(unet=None), 3) is None  # e.g. the autoencoder system


def test_throughput_logs_tflops_and_mfu():
    logged = {}
    module = SimpleNamespace(
        unet=UNetModel(**UNET_KW), sample_size=8, conditioner=SimpleNamespace(max_length=77),
        device=torch.device("cpu"), log=lambda k, v, **kw: logged.__setitem__(k, v),
    )  # fmt: skip
    trainer = SimpleNamespace(world_size=1, global_step=0, log_every_n_steps=1, precision="32-true")
    cb = Throughput(peak_flops=1e12)
    batch = {"image": torch.zeros(2, 3, 32, 32)}
    for step in range(3):
        trainer.global_step = step
        cb.on_train_batch_end(trainer, module, None, batch, step)
    assert cb.flops_per_batch > 0
    assert logged["train/tflops_per_sec"] > 0
    assert logged["train/mfu"] == logged["train/tflops_per_sec"] * 1e12 / 1e12
    assert logged["train/samples_seen"] == 6.0
