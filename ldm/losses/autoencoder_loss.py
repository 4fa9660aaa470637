"""The KL autoencoder's training loss: reconstruction + perceptual as a Laplace likelihood with a learned
scale, KL to N(0, I), and a patch-GAN term with an adaptive weight (Rombach et al. 2022, App. G; Esser et
al. 2021, eq. 7; CompVis `ldm/modules/losses/contperceptual.py` `LPIPSWithDiscriminator`).

The discriminator network is not held here (the system owns it and its optimizer); these functions take
its logits. What this module holds is the perceptual network (frozen) and the learned log-variance, which
the autoencoder's optimizer trains.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ldm.losses.gan import generator_loss, get_d_loss
from ldm.nn.autoencoder import DiagonalGaussianDistribution


def adaptive_weight(nll: Tensor, g_loss: Tensor, last_layer: Tensor, disc_weight: float = 1.0) -> Tensor:
    """lambda = ||grad nll|| / (||grad g_loss|| + 1e-4), clamped to [0, 1e4], times `disc_weight`; both
    gradients at the decoder's last layer (Esser et al. 2021, eq. 7). Detached: a weight, not a loss."""
    nll_grad = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    weight = torch.linalg.vector_norm(nll_grad) / (torch.linalg.vector_norm(g_grad) + 1e-4)
    return weight.clamp(0.0, 1e4).detach() * disc_weight


class AutoencoderLoss(nn.Module):
    """Callable pieces of `LPIPSWithDiscriminator`: `generator_loss(...)` for the autoencoder's step and
    `discriminator_loss(...)` for the discriminator's; each returns (loss, logs).

    rec = l1_weight |x - x'| + l2_weight (x - x')^2 + perceptual_weight LPIPS(x, x')  (per pixel; LPIPS
    broadcast per image), nll = sum(rec / exp(logvar) + logvar) / B, kl = sum KL(q(z|x) || N(0, I)) / B,
    loss = nll + kl_weight kl + lambda disc_factor g_loss. CompVis has a `pixelloss_weight` that its forward
    never uses; here `l1_weight` and `l2_weight` do weight the pixel terms (1 and 0 reproduce CompVis).
    """

    def __init__(
        self,
        perceptual: nn.Module | None = None,
        perceptual_weight: float = 1.0,
        l1_weight: float = 1.0,
        l2_weight: float = 0.0,
        kl_weight: float = 1e-6,
        logvar_init: float = 0.0,
        disc_weight: float = 0.5,
        disc_factor: float = 1.0,
        disc_loss: str = "hinge",
    ):
        super().__init__()
        if perceptual_weight > 0 and perceptual is None:
            raise ValueError("AutoencoderLoss: perceptual_weight > 0 needs a perceptual network")
        # Kept with a zero weight too: the system then still reports LPIPS in validation.
        self.perceptual = perceptual
        self.perceptual_weight = perceptual_weight
        self.l1_weight, self.l2_weight = l1_weight, l2_weight
        self.kl_weight = kl_weight
        self.disc_weight, self.disc_factor = disc_weight, disc_factor
        self.d_loss = get_d_loss(disc_loss)
        # The Laplace scale of the likelihood, learned with the autoencoder (CompVis `logvar`).
        self.logvar = nn.Parameter(torch.tensor(float(logvar_init)))

    def reconstruction_terms(
        self, x: Tensor, xrec: Tensor, posterior: DiagonalGaussianDistribution
    ) -> dict[str, Tensor]:
        """rec (per-pixel map), nll and kl (sums over an image, averaged over the batch), p_loss (B,)."""
        diff = x.contiguous() - xrec.contiguous()
        rec = self.l1_weight * diff.abs()
        if self.l2_weight:
            rec = rec + self.l2_weight * diff.pow(2)
        p_loss = None
        if self.perceptual is not None and self.perceptual_weight > 0:
            p_loss = self.perceptual(x.contiguous(), xrec.contiguous())
            rec = rec + self.perceptual_weight * p_loss.view(-1, 1, 1, 1)
        b = x.shape[0]
        nll = (rec / torch.exp(self.logvar) + self.logvar).sum() / b
        kl = posterior.kl().sum() / b
        terms = {"rec": rec, "nll": nll, "kl": kl}
        if p_loss is not None:
            terms["p_loss"] = p_loss
        return terms

    def generator_loss(
        self,
        x: Tensor,
        xrec: Tensor,
        posterior: DiagonalGaussianDistribution,
        logits_fake: Tensor | None = None,
        last_layer: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The autoencoder's loss; `logits_fake` = D(x') once the discriminator is on, else None (then the
        GAN term, which CompVis multiplies by a zero factor, is left out, as are its extra passes)."""
        t = self.reconstruction_terms(x, xrec, posterior)
        loss = t["nll"] + self.kl_weight * t["kl"]
        logs = {"rec_loss": t["rec"].detach().mean(), "nll": t["nll"].detach(), "kl": t["kl"].detach()}
        if "p_loss" in t:
            logs["p_loss"] = t["p_loss"].detach().mean()
        if logits_fake is not None:
            g_loss = generator_loss(logits_fake)
            if self.disc_factor > 0 and self.disc_weight > 0:
                if last_layer is None:
                    raise ValueError("generator_loss: the adaptive weight needs the decoder's last layer")
                d_weight = adaptive_weight(t["nll"], g_loss, last_layer, self.disc_weight)
            else:
                d_weight = torch.zeros((), device=x.device)
            loss = loss + d_weight * self.disc_factor * g_loss
            logs.update(g_loss=g_loss.detach(), d_weight=d_weight)
        logs.update(loss=loss.detach(), logvar=self.logvar.detach())
        return loss, logs

    def discriminator_loss(
        self, logits_real: Tensor, logits_fake: Tensor
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The discriminator's loss on D(x) and D(x') (x' detached by the caller)."""
        loss = self.disc_factor * self.d_loss(logits_real, logits_fake)
        logs = {
            "disc_loss": loss.detach(),
            "logits_real": logits_real.detach().mean(),
            "logits_fake": logits_fake.detach().mean(),
        }
        return loss, logs
