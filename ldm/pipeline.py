"""`Pipeline`: the trained components put back together for sampling (`ldm.load_pipeline` returns one).

Text to image, image to image and inpainting on a standard model, in the order of LDM's sampling: encode
the prompt with the frozen text encoder (or the class labels with a class-conditional LDM's label
embedding, Rombach et al. 2022 Sec. 4.3), run a sampler (ldm.diffusion.samplers) over the guided denoiser
in latent space, decode once with the autoencoder. Starting noise, per-step noise and the timestep grids
are drawn and built as diffusers' StableDiffusionPipeline does, so the same initial latents give the same
images. Loading and saving live in `ldm/pipeline_io.py`, which imports this module and not the reverse
(`Pipeline.save` reaches it at call time).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from ldm.diffusion.denoiser import Denoiser
from ldm.diffusion.guidance import cfg_denoiser
from ldm.diffusion.sampler_utils import randn
from ldm.diffusion.samplers import sampling_plan
from ldm.diffusion.schedule import NoiseSchedule
from ldm.nn.autoencoder import AutoencoderKL
from ldm.nn.conditioners import ClassConditioner, TextConditioner
from ldm.nn.unet import UNetModel


def to_image_tensor(image: Image.Image | Tensor | np.ndarray, height: int, width: int) -> Tensor:
    """A PIL image, HWC uint8 array or NCHW/CHW tensor in [0, 1] -> 1 x 3 x H x W tensor in [0, 1]."""
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        image = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float() / 255.0
    image = image if image.ndim == 4 else image[None]
    if image.shape[-2:] != (height, width):
        image = F.interpolate(image.float(), size=(height, width), mode="bicubic", antialias=True).clamp(0, 1)
    return image.float()


def to_pil(images: Tensor) -> list[Image.Image]:
    """N x 3 x H x W tensor in [0, 1] -> PIL images (rounded as diffusers' `numpy_to_pil`)."""
    arr = (images.permute(0, 2, 3, 1).float().cpu().numpy() * 255).round().astype("uint8")
    return [Image.fromarray(a) for a in arr]


class LatentBlend:
    """Inpainting on a standard model by latent blending: outside the mask the clean-latent estimate is
    replaced by the known latent at every step, so the sampler keeps the known region and only repaints
    where mask = 1 (RePaint-style replacement, Lugmayr et al. 2022; A1111 / diffusers' non-inpainting path
    blend the noised known latent instead, which is the same in the limit of many steps)."""

    def __init__(self, denoiser: Any, z0: Tensor, mask: Tensor):
        self.inner, self.z0, self.mask = denoiser, z0, mask
        self.schedule = denoiser.schedule

    def __call__(self, x: Tensor, sigma: Tensor | float, **kwargs: Any) -> Tensor:
        """Sigma view: the blended z0 estimate."""
        return self.mask * self.inner(x, sigma, **kwargs) + (1 - self.mask) * self.z0

    def net_output_at(self, x: Tensor, t: int, **kwargs: Any) -> Tensor:
        """Timestep view: the inner network output, unblended (PLMS with combine="model_output"
        extrapolates these and converts the result with `convert_at`, where the blend happens)."""
        return self.inner.net_output_at(x, t, **kwargs)

    def predict_at(self, x: Tensor, t: int, **kwargs: Any) -> tuple[Tensor, Tensor]:
        """Timestep view: the blended (z0, eps) of `convert_at` from one network call."""
        return self.convert_at(self.net_output_at(x, t, **kwargs), x, t)

    def convert_at(self, output: Tensor, x: Tensor, t: int) -> tuple[Tensor, Tensor]:
        """Timestep view: blend z0, then the eps consistent with it, (x - alpha_t z0) / sigma_t."""
        z0, eps = self.inner.convert_at(output, x, t)
        z0 = self.mask * z0 + (1 - self.mask) * self.z0
        alpha_t, sigma_t = self.schedule.vp_coefficients(torch.as_tensor(t))
        if float(sigma_t) > 0:
            known = (x - float(alpha_t) * self.z0) / float(sigma_t)
            eps = self.mask * eps + (1 - self.mask) * known
        return z0, eps


SAMPLING_KEYS = ("sampler", "steps", "guidance_scale")


def check_sampling(settings: dict[str, Any] | None, where: str = "sampling") -> dict[str, Any]:
    """Recommended sampling settings ({sampler, steps, guidance_scale}, any subset) checked and as plain
    values; {} for None. A bad key or value raises, naming it."""
    from ldm.diffusion.samplers import canonical_sampler_name

    settings = dict(settings or {})
    unknown = sorted(set(settings) - set(SAMPLING_KEYS))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; expected some of {list(SAMPLING_KEYS)}")
    out: dict[str, Any] = {}
    if settings.get("sampler") is not None:
        canonical_sampler_name(str(settings["sampler"]))  # raises on an unknown sampler, listing them
        out["sampler"] = str(settings["sampler"])
    if settings.get("steps") is not None:
        if int(settings["steps"]) != settings["steps"] or int(settings["steps"]) < 1:
            raise ValueError(f"{where}.steps={settings['steps']}: expected a positive integer")
        out["steps"] = int(settings["steps"])
    if settings.get("guidance_scale") is not None:
        if float(settings["guidance_scale"]) < 0:
            raise ValueError(f"{where}.guidance_scale={settings['guidance_scale']}: expected >= 0")
        out["guidance_scale"] = float(settings["guidance_scale"])
    return out


class Pipeline:
    """UNet + autoencoder + conditioner + noise schedule, callable as text-to-image / img2img / inpaint.

    The conditioner is a `TextConditioner` (Stable Diffusion: `pipe(prompt)`) or a `ClassConditioner`
    (class-conditional LDMs: `pipe(labels=[3, "seven"])`). `recommended` holds the sampling settings the
    model was trained to be sampled with ({sampler, steps, guidance_scale}, from the experiment's
    `model.sampling`; saved with it): `sampling_settings` fills what a caller leaves out from them."""

    def __init__(
        self,
        unet: UNetModel,
        vae: AutoencoderKL,
        conditioner: TextConditioner | ClassConditioner,
        schedule: NoiseSchedule,
        prediction_type: str = "epsilon",
        sample_size: int | None = None,
        recommended: dict[str, Any] | None = None,
    ):
        if not isinstance(conditioner, (TextConditioner, ClassConditioner)):
            raise TypeError(f"a Pipeline samples text- or class-conditional models, got {type(conditioner)}")
        self.unet, self.vae, self.conditioner = unet.eval(), vae.eval(), conditioner.eval()
        self.schedule = schedule
        self.prediction_type = prediction_type
        # Default image side in latent pixels (diffusers' unet sample_size): 64 for SD1 (512 px).
        self.sample_size = sample_size or 64
        self.recommended = check_sampling(recommended, "recommended")

    def sampling_settings(
        self,
        sampler: str | None = None,
        steps: int | None = None,
        guidance_scale: float | None = None,
        fallback: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """{sampler, steps, guidance_scale}: each as given, else the model's recommended, else `fallback`
        (default: dpmpp_2m, 30 steps, guidance 7.5, as `__call__`)."""
        chosen = {"sampler": "dpmpp_2m", "steps": 30, "guidance_scale": 7.5}
        chosen.update(fallback or {})
        chosen.update(self.recommended)
        given = check_sampling({"sampler": sampler, "steps": steps, "guidance_scale": guidance_scale})
        chosen.update(given)
        return chosen

    @property
    def is_class_conditional(self) -> bool:
        """Whether the model is conditioned on class labels rather than text."""
        return isinstance(self.conditioner, ClassConditioner)

    @property
    def text_encoder(self) -> TextConditioner | None:
        """The CLIP text encoder (None for a class-conditional model)."""
        return None if self.is_class_conditional else self.conditioner

    @property
    def tokenizer(self):
        """The text encoder's CLIP tokenizer (None for a class-conditional model)."""
        return getattr(self.conditioner, "tokenizer", None)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Pipeline:
        """Move to `device`; `dtype` casts UNet and text encoder. The autoencoder stays in fp32, where SD's
        decoder does not overflow."""
        self.unet.to(device=device, dtype=dtype)
        self.conditioner.to(device=device, dtype=dtype)
        self.vae.to(device=device)
        self.schedule = self.schedule.to(device=device)
        return self

    def _net(self, x: Tensor, t: Tensor, context: Tensor | None = None, **kwargs: Any) -> Tensor:
        """The UNet in its own dtype (bf16 / fp16 when cast) while the sampler keeps latents in fp32."""
        return self.unet(x.to(self.dtype), t, context, **kwargs).float()

    def save(self, path: str | Path, format: str = "ldm") -> Path:
        """Write as "ldm" (our folder), "single_file" or "diffusers" (see `ldm.pipeline_io.save_pipeline`).
        A loaded LoRA is saved merged in (at its current scale)."""
        from ldm.adapters.lora import has_lora, merged_copy
        from ldm.pipeline_io import save_pipeline  # pipeline_io builds Pipelines: import here, not at the top

        if has_lora(self.unet) or has_lora(self.conditioner):
            plain = Pipeline(merged_copy(self.unet), self.vae, merged_copy(self.conditioner), self.schedule,
                             self.prediction_type, self.sample_size)  # fmt: skip
            return save_pipeline(plain, path, format)
        return save_pipeline(self, path, format)

    # ------------------------------------------------------------------ LoRA (ldm/adapters)
    def load_lora(self, path: str | Path, scale: float = 1.0) -> Pipeline:
        """Add a LoRA file's adapters at `scale`: kohya layout (A1111 / ComfyUI files, ours) or diffusers /
        PEFT (`pytorch_lora_weights.safetensors`), or a folder holding either (ldm/checkpoints/lora_files.py).
        Layers of the file that match none of this model's are an error naming them. One LoRA at a time:
        `fuse_lora()` or `unload_lora()` first."""
        from ldm.adapters.lora import has_lora, load_lora
        from ldm.checkpoints.lora_files import read_lora

        if has_lora(self.unet) or has_lora(self.conditioner):
            raise ValueError("a LoRA is already loaded: call pipe.fuse_lora() or pipe.unload_lora() first")
        text = getattr(self.text_encoder, "transformer", None)
        lora = read_lora(path, self.unet, text)
        if lora.unet:
            load_lora(self.unet, lora.unet, scale)
        if lora.text_encoder:
            load_lora(text, lora.text_encoder, scale)
        return self

    def set_lora_scale(self, scale: float) -> Pipeline:
        """Change the loaded LoRA's strength (0 = the base model)."""
        from ldm.adapters.lora import set_lora_scale

        set_lora_scale(self.unet, scale)
        set_lora_scale(self.conditioner, scale)
        return self

    def fuse_lora(self) -> Pipeline:
        """Merge the loaded LoRA into the weights for good (plain layers again, no adapter cost)."""
        from ldm.adapters.lora import remove_lora

        remove_lora(self.unet, merge=True)
        remove_lora(self.conditioner, merge=True)
        return self

    def unload_lora(self) -> Pipeline:
        """Drop the loaded LoRA: the base model again, bit for bit."""
        from ldm.adapters.lora import remove_lora

        remove_lora(self.unet, merge=False)
        remove_lora(self.conditioner, merge=False)
        return self

    @torch.no_grad()
    def encode_prompt(self, prompts: Sequence[str]) -> Tensor:
        """Cross-attention contexts (B x 77 x D) for the prompts."""
        if self.text_encoder is None:
            raise ValueError("this model is class-conditional: pass labels=..., not a prompt")
        ids = self.text_encoder.tokenize(list(prompts)).to(self.device)
        return self.text_encoder(ids).to(self.dtype)

    @torch.no_grad()
    def encode_labels(self, labels: Sequence[int | str]) -> Tensor:
        """Contexts (B x 1 x D) for class labels, given as indices or class names ("seven")."""
        if not self.is_class_conditional:
            raise ValueError("this model is text-conditional: pass a prompt, not labels")
        index = [self.conditioner.label_index(label) for label in labels]
        return self.conditioner(index).to(self.dtype)

    @torch.no_grad()
    def encode_image(self, images: Tensor) -> Tensor:
        """Images in [0, 1] -> scaled latents (posterior mean: deterministic, unlike diffusers' sample)."""
        vae_dtype = next(self.vae.parameters()).dtype
        posterior = self.vae.encode((images * 2 - 1).to(self.device, vae_dtype))
        return posterior.mean * self.vae.scale_factor

    @torch.no_grad()
    def decode(self, latents: Tensor, batch_size: int = 8) -> Tensor:
        """Scaled latents -> images in [0, 1], decoded `batch_size` at a time to bound memory."""
        vae_dtype = next(self.vae.parameters()).dtype
        out = [
            self.vae.decode(chunk.to(vae_dtype) / self.vae.scale_factor).float()
            for chunk in latents.split(max(1, batch_size))
        ]
        return (torch.cat(out) / 2 + 0.5).clamp(0, 1)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | Sequence[str] | None = None,
        negative_prompt: str | Sequence[str] | None = None,
        steps: int = 30,
        guidance_scale: float = 7.5,
        sampler: str = "dpmpp_2m",
        seed: int | None = None,
        latents: Tensor | None = None,
        height: int | None = None,
        width: int | None = None,
        init_image: Image.Image | Tensor | None = None,
        strength: float | None = None,
        mask: Image.Image | Tensor | None = None,
        output: str = "pil",
        num_images_per_prompt: int = 1,
        guidance_rescale: float = 0.0,
        callback: Callable[[dict[str, Any]], None] | None = None,
        decode_batch_size: int = 8,
        labels: int | str | Sequence[int | str] | None = None,
        **sampler_options: Any,
    ) -> list[Image.Image] | Tensor:
        """Generate images; image i of the batch uses seed `seed + i`. `latents` is unit-variance starting
        noise (scaled by the sampler as diffusers does). `init_image` + `strength` for image to image,
        plus `mask` (white = repaint) for inpainting. `callback(info)` runs after every step with the
        step index "i", the latent "x" and the clean estimate "denoised". Returns PIL images, or with
        output="tensor" an N x 3 x H x W tensor in [0, 1]. A class-conditional model takes `labels` (indices
        or class names) instead of prompts; its unconditional input for guidance is the null class."""
        conds = self._conditions(prompt, negative_prompt, labels)
        conds = [tuple(c for c in pair for _ in range(num_images_per_prompt)) for pair in conds]
        n = len(conds[0])
        height = height or self.sample_size * self.vae.downsampling_factor
        width = width or self.sample_size * self.vae.downsampling_factor
        f = self.vae.downsampling_factor
        if height % 8 or width % 8 or height % f or width % f:
            raise ValueError(f"height and width must be multiples of 8 (and of {f}), got {height} x {width}")
        if output not in ("pil", "tensor"):
            raise ValueError(f"output must be 'pil' or 'tensor', got {output!r}")
        if mask is not None and init_image is None:
            raise ValueError("inpainting needs init_image as well as mask")

        seed = random.randrange(2**31) if seed is None else int(seed)
        generators = [torch.Generator("cpu").manual_seed(seed + i) for i in range(n)]
        shape = (n, self.unet.in_channels, height // f, width // f)
        if latents is None:
            latents = randn(shape, generators, self.device, torch.float32)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents have shape {tuple(latents.shape)}, expected {shape}")
        latents = latents.to(self.device, torch.float32)

        if self.is_class_conditional:
            context = self.encode_labels(conds[0])
        else:
            context = self.encode_prompt(conds[0])
        denoiser: Any = Denoiser(self._net, self.schedule, self.prediction_type)
        extra_args: dict[str, Any] = {"context": context}
        if guidance_scale > 1.0:  # as StableDiffusionPipeline: no unconditional pass at scale <= 1
            if self.is_class_conditional:
                uncond = self.conditioner.unconditional(n).to(self.dtype)
            else:
                uncond = self.encode_prompt(conds[1])
            denoiser = cfg_denoiser(denoiser, guidance_scale, guidance_rescale)
            extra_args = {"context": context, "uncond_context": uncond}

        plan = sampling_plan(self.schedule, sampler, steps, **sampler_options)
        if init_image is None:
            x = plan.initial_latents(latents)
        else:
            z0 = self.encode_image(to_image_tensor(init_image, height, width)).float()
            z0 = z0.expand(n, -1, -1, -1) if z0.shape[0] == 1 else z0
            plan = plan.truncate(1.0 if strength is None else strength)
            x = plan.add_noise(z0, latents)
            if mask is not None:
                m = to_image_tensor(mask, height, width).mean(dim=1, keepdim=True)
                m = F.interpolate(m, size=shape[-2:], mode="nearest").round().to(self.device)
                denoiser = LatentBlend(denoiser, z0, m.expand(n, 1, *shape[-2:]))
        z = plan(denoiser, x, extra_args=extra_args, callback=callback, generator=generators)
        images = self.decode(z, decode_batch_size)
        return images if output == "tensor" else to_pil(images)

    def _conditions(
        self,
        prompt: str | Sequence[str] | None,
        negative_prompt: str | Sequence[str] | None,
        labels: int | str | Sequence[int | str] | None,
    ) -> list[list[Any]]:
        """[conditions, negative prompts] for a text model, [labels] for a class-conditional one."""
        if self.is_class_conditional:
            if prompt is not None or negative_prompt:
                raise ValueError("this model is class-conditional: pass labels=..., not a prompt")
            if labels is None:
                raise ValueError("this model is class-conditional: pass labels= (class indices or names)")
            return [[labels] if isinstance(labels, (int, str)) else list(labels)]
        if labels is not None:
            raise ValueError("this model is text-conditional: pass a prompt, not labels")
        if prompt is None:
            raise ValueError("pass a prompt")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if negative_prompt is None:
            negatives = [""] * len(prompts)
        else:
            negatives = [negative_prompt] if isinstance(negative_prompt, str) else list(negative_prompt)
        if len(negatives) == 1 and len(prompts) > 1:
            negatives = negatives * len(prompts)
        if len(negatives) != len(prompts):
            raise ValueError(f"{len(negatives)} negative prompts for {len(prompts)} prompts")
        return [prompts, negatives]
