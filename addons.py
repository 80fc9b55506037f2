"""
Terms from other methods that train_ladd.py can add to LADD. All are off by default: the plain
run is the paper's method (hinge losses only). Each is one option, enters the step through one
line (`student_terms` or `heads_terms`), and says below where it comes from and what it measured
here (docs/results.md has the tables).

- pairs (`--pair-weight`, DMD's regression onto the teacher's noise -> sample pairs): half the
  t = 1 rows start from the very noise the teacher turned into their x0, so x0 is the right answer
  for them: + weight * |x0_hat - x0|^2 on those rows. It costs no model pass. It helps early (at
  1600 steps 0.828 against plain LADD's 0.790 on the seven-size table) and blurs later (squared
  error rewards the mean of the possible outlines), so `--preset pairs` stops it halfway: 0.868
  at 3200 steps against plain LADD's 0.850.
- distillation (`--distill-weight`, ADD's second loss, which LADD drops): + weight *
  |x0_hat - the guided teacher's x0 from the fake batch|^2. One more (guided: two) teacher pass.
- R1 (`--r1-weight`, ADD used gamma 1e-5, LADD reports none): a finite-difference estimate of the
  heads' gradient norm on real features, + gamma / 2 * R1 on the heads' loss.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

import flow
import inpainting
from discriminator import approx_r1


@dataclass
class Distill:
    """ADD's distillation loss: weight * |x0_hat - the guided teacher's x0|^2."""
    weight: float
    uncond_context: torch.Tensor     # [1, L, Dc] the empty prompt's, for the teacher's guidance
    uncond_pooled: torch.Tensor      # [1, Dp]
    cfg: float                       # the teacher's guidance scale


# ----------------------------------------------------------------------------------------------
# the pairs


def draw_pairs(t, eps, seeds, share, generator):
    """Which rows [B] bool start from their latent's own noise: a `share` of the t = 1 rows. Their
    rows of eps [B, C, h, w] are replaced, in place, by that noise (flow.seeded_noise of `seeds`)."""
    paired = (t == 1) & (torch.rand(len(t), generator=generator) < share)    # [B]
    if paired.any():
        eps[paired] = flow.seeded_noise(seeds[paired].tolist(), eps.shape[1:])
    return paired


def pair_loss(x0_hat, x0, paired):
    """The paired rows started from the noise the teacher turned into their x0, so x0 is the
    answer for them: their squared error, averaged over the batch (unpaired rows count 0)."""
    error = ((x0_hat - x0) ** 2).mean(dim=(1, 2, 3))                              # [B]
    return (error * paired).sum() / len(error)


# ----------------------------------------------------------------------------------------------
# ADD's distillation loss


def distillation_loss(teacher, x0_hat, fake, batch, distill):
    """ADD's extra term: pull x0_hat towards the guided teacher's denoising of `fake`."""
    with torch.no_grad():
        B = x0_hat.shape[0]
        judge = teacher if batch.known is None else inpainting.conditioned(teacher, batch.known)
        v = flow.cfg_velocity(judge, fake.detach(), batch.t_hat, batch.context, batch.pooled,
                              distill.uncond_context.expand(B, -1, -1),           # [B, L, Dc]
                              distill.uncond_pooled.expand(B, -1), distill.cfg).float()  # [B, Dp]
        target = flow.x0_from_v(fake.detach(), v, batch.t_hat)                    # [B, C, h, w]
    return F.mse_loss(x0_hat, target)


# ----------------------------------------------------------------------------------------------
# what the two steps add


def student_terms(teacher, x0_hat, fake, batch, settings):
    """The student step's extra terms: [(name, unweighted value, weight)], empty for plain LADD."""
    terms = []
    if settings.pair_weight:
        terms.append(("pair_loss", pair_loss(x0_hat, batch.x0, batch.paired), settings.pair_weight))
    if settings.distill is not None:
        terms.append(("distill_loss", distillation_loss(teacher, x0_hat, fake, batch,
                                                        settings.distill), settings.distill.weight))
    return terms


def heads_terms(heads, real_features, batch, settings):
    """The heads step's extra terms, as student_terms: R1 on the real features."""
    if not settings.r1_weight:
        return []
    r1 = approx_r1(heads, real_features, batch.t_hat, batch.pooled, generator=batch.generator)
    return [("r1", r1, settings.r1_weight / 2)]
