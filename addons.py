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

For 1 and 2 steps (docs/few_steps.md has what each measured):
- consistency (`--consistency-weight`, discrete consistency distillation: Song et al. 2023, LCM;
  SANA-Sprint and rCM pair it with an adversarial or a score term): the guided teacher takes one
  Euler step from the student's input x_t to the student's next time s (0 after its last), and the
  student's own x0 prediction there, without gradient, is the target of x0_hat:
  + weight * |x0_hat - sg(x0_student(x_s, s))|^2; two teacher passes, one student pass, no grad.
  Measured: it blurs (0.778 / 0.570 / 0.207 at 4 / 2 / 1 steps; plain 0.862 / 0.686 / 0.306).
- distribution matching (`--dmd-weight`, DMD / DMD2): a second copy of the teacher, the "fake"
  score, is trained online (flow matching, AdamW 1e-4) on the student's x0_hat; the student is
  pushed along the difference of the guided teacher's and the fake model's x0 predictions at the
  heads' noise level t_hat (the same `fake` batch), normalised as in DMD. Its model and AdamW are
  saved with the run. Measured: the best of these at 4 and 2 steps (0.880 / 0.727 / 0.299 in 1300
  steps, 3/4 of plain LADD's wall time), not at 1 step: the blobs stay.
- one-step judging (`--one-step-t-hat-shift`): the heads judge the t = 1 rows at a shifted t_hat
  (SD3's shift; < 1: lower noise, where outlines show); no extra pass or draw. Measured: no help.
"""

import copy
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
# for 1 and 2 steps: consistency along the teacher's trajectory


@dataclass
class Guide:
    """The teacher's guidance: the empty prompt's text and the scale (its sampling default)."""
    uncond_context: torch.Tensor     # [1, L, Dc]
    uncond_pooled: torch.Tensor      # [1, Dp]
    cfg: float

    def velocity(self, teacher, x, t, context, pooled):
        B = x.shape[0]
        return flow.cfg_velocity(teacher, x, t, context, pooled, self.uncond_context.expand(B, -1, -1),
                                 self.uncond_pooled.expand(B, -1), self.cfg).float()


@dataclass
class Consistency:
    """Discrete consistency distillation: weight * |x0_hat - sg(the student's x0 at the teacher's
    next point)|^2. `student` is the model being trained (read without gradient)."""
    weight: float
    student: torch.nn.Module
    times: list                      # the student's schedule, decreasing from 1
    guide: Guide


def next_times(t, times):
    """The student's next time after each t [B] in the schedule `times` (0 after the last)."""
    following = torch.tensor(list(times[1:]) + [0.0], device=t.device)               # [K]
    index = (t.view(-1, 1) - torch.tensor(times, device=t.device)).abs().argmin(dim=1)  # [B]
    return following[index].to(t.dtype)                                              # [B]


def consistency_target(teacher, batch, c):
    """The teacher's Euler step from x_t (t) to s (the next time), then the student's x0 there,
    all without gradient -> ([B, C, h, w] target, [B] s)."""
    with torch.no_grad():
        x_t = flow.add_noise(batch.x0, batch.eps, batch.t)                           # [B, C, h, w]
        s = next_times(batch.t, c.times)                                             # [B]
        v = c.guide.velocity(teacher, x_t, batch.t, batch.context, batch.pooled)     # [B, C, h, w]
        x_s = x_t + flow._bcast(s - batch.t, x_t) * v                                # [B, C, h, w]
        v_s = c.student(x_s, s, batch.context, batch.pooled).float()                 # [B, C, h, w]
        return flow.x0_from_v(x_s, v_s, s), s                                        # x_s at s = 0


def consistency_loss(teacher, x0_hat, batch, c):
    return F.mse_loss(x0_hat, consistency_target(teacher, batch, c)[0])


# ----------------------------------------------------------------------------------------------
# for 1 and 2 steps: distribution matching with a fake score trained online


class DMD:
    """Distribution matching (DMD, DMD2): `fake` is a trainable fp32 copy of the teacher that
    learns the student's samples (flow matching, AdamW at `lr`); the student's x0_hat moves along
    (fake x0 - real x0) / mean|x0_hat - real x0| at the heads' noise level."""

    def __init__(self, weight, teacher, guide, lr=1e-4):
        self.weight, self.guide = weight, guide
        self.fake = copy.deepcopy(teacher).float().requires_grad_(True)
        self.fake.gradient_checkpointing = False
        self.opt = torch.optim.AdamW(self.fake.parameters(), lr, betas=(0.0, 0.99),
                                     weight_decay=0.0)

    def state_dict(self):
        return {"fake": self.fake.state_dict(), "opt": self.opt.state_dict()}

    def load_state_dict(self, state):
        self.fake.load_state_dict(state["fake"])
        self.opt.load_state_dict(state["opt"])


def dmd_loss(teacher, x0_hat, fake, batch, dmd):
    """0.5 |x0_hat - sg(x0_hat - grad)|^2 (its gradient: grad, per element over their number),
    grad the normalised difference of the fake and the real (guided teacher) x0 predictions of
    `fake` at t_hat; then one update of the fake score on x0_hat (detached)."""
    with torch.no_grad():
        noisy = fake.detach()                                                        # [B, C, h, w]
        real_x0 = flow.x0_from_v(noisy, dmd.guide.velocity(teacher, noisy, batch.t_hat,
                                 batch.context, batch.pooled), batch.t_hat)          # [B, C, h, w]
        fake_x0 = flow.x0_from_v(noisy, dmd.fake(noisy, batch.t_hat, batch.context,
                                 batch.pooled).float(), batch.t_hat)                 # [B, C, h, w]
        scale = (x0_hat - real_x0).abs().mean(dim=(1, 2, 3), keepdim=True).clamp_min(1e-4)
        target = x0_hat - (fake_x0 - real_x0) / scale                               # [B, C, h, w]
    loss = 0.5 * F.mse_loss(x0_hat, target)
    train_fake_score(dmd, x0_hat.detach(), batch)
    return loss


def train_fake_score(dmd, x0, batch):
    """One flow-matching update of the fake score on the student's samples x0 [B, C, h, w], at
    times and noise drawn from the step's generator -> its loss (a float)."""
    g, B = batch.generator, x0.shape[0]
    t = flow.sample_t_logit_normal(B, 0.0, 1.0, g).to(x0.device)                     # [B]
    noise = torch.randn(x0.shape, generator=g).to(x0.device)                         # [B, C, h, w]
    with torch.enable_grad():
        v = dmd.fake(flow.add_noise(x0, noise, t), t, batch.context, batch.pooled).float()
        loss = F.mse_loss(v, flow.velocity_target(x0, noise))
        dmd.opt.zero_grad(set_to_none=True)
        loss.backward()
    if torch.isfinite(torch.nn.utils.clip_grad_norm_(dmd.fake.parameters(), 1.0)):
        dmd.opt.step()
    return loss.item()


def shift_one_step(t, t_hat, shift):
    """The heads' levels t_hat [B] with the t = 1 rows' shifted (flow.shift_t; 1: unchanged)."""
    return torch.where(t == 1, flow.shift_t(t_hat, shift), t_hat)


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
    if getattr(settings, "consistency", None) is not None:
        terms.append(("consistency_loss", consistency_loss(teacher, x0_hat, batch,
                                                           settings.consistency),
                      settings.consistency.weight))
    if getattr(settings, "dmd", None) is not None:
        terms.append(("dmd_loss", dmd_loss(teacher, x0_hat, fake, batch, settings.dmd),
                      settings.dmd.weight))
    return terms


def heads_terms(heads, real_features, batch, settings):
    """The heads step's extra terms, as student_terms: R1 on the real features."""
    if not settings.r1_weight:
        return []
    r1 = approx_r1(heads, real_features, batch.t_hat, batch.pooled, generator=batch.generator)
    return [("r1", r1, settings.r1_weight / 2)]
