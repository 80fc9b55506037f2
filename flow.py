"""Rectified flow: noising, timestep densities, the SD3 shifted schedule, CFG and the sampler.

Conventions: t in [0, 1], t = 1 is pure noise.
    x_t = (1 - t) * x0 + t * eps        the model predicts  v = eps - x0
    x0_hat = x_t - t * v                eps_hat = x_t + (1 - t) * v
A model is any callable  model(x [B,C,H,W], t [B] in [0,1], context [B,L,Dc], pooled [B,Dp]) -> v.
The MMDiT scales t by 1000 for its timestep embedder; nothing here does.

Three separate small pieces, as in the SD3 reference: the schedule (`sd3_sigmas`,
`student_sigmas`, `img2img_sigmas`), guidance (`cfg_velocity`) and the loop (`sample`).
"""
from numbers import Integral, Real

import torch
from tqdm import tqdm

SAMPLERS = ("euler", "renoise")  # renoise: x0_hat re-noised with fresh noise (ADD/LADD few-step)


# ----------------------------------------------------------------------------- noising

def _bcast(t, x):
    """t: float or [B] -> something that broadcasts against x [B, ...]."""
    if not torch.is_tensor(t):
        return t
    return t.to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))  # [B, 1, 1, 1]


def add_noise(x0, noise, t):
    """x_t = (1 - t) x0 + t eps.  x0, noise: [B,C,H,W]; t: a float, or [B] (one per sample,
    broadcast over C, H, W). Keeps x0's dtype (a tensor t is cast to it) and the autograd graph."""
    t = _bcast(t, x0)
    return (1 - t) * x0 + t * noise


def velocity_target(x0, noise):
    """The regression target v = eps - x0, same shape and dtype as x0."""
    return noise - x0


def x0_from_v(x_t, v, t):
    """x0_hat = x_t - t v; t a float or [B], as in add_noise (x_t's dtype and the graph kept)."""
    return x_t - _bcast(t, x_t) * v


def noise_from_v(x_t, v, t):
    """eps_hat = x_t + (1 - t) v."""
    return x_t + (1 - _bcast(t, x_t)) * v


# ----------------------------------------------------------------------------- timestep densities

def _gen_device(generator):
    return generator.device if generator is not None else torch.device("cpu")


def sample_t_uniform(n, generator, device="cpu"):
    """t ~ U(0, 1): [n], drawn on the generator's device (CPU by convention), then moved."""
    return torch.rand(n, generator=generator, device=_gen_device(generator)).to(device)


def sample_t_logit_normal(n, mean=0.0, std=1.0, generator=None, device="cpu"):
    """t = sigmoid(u), u ~ N(mean, std^2): [n] in (0, 1).
    SD3 trains with (mean, std) = (0, 1); the LADD paper draws the discriminator's t_hat with
    (1, 1), train_ladd.py's default is (0, 2)."""
    if std < 0:
        raise ValueError(f"logit-normal std must be >= 0, got {std}")
    u = torch.randn(n, generator=generator, device=_gen_device(generator)) * std + mean
    return torch.sigmoid(u).to(device)


def shift_t(t, shift):
    """SD3 resolution shift: s t / (1 + (s - 1) t). Float in, float out; tensor in, tensor
    out; shift 1 is the identity."""
    return shift * t / (1 + (shift - 1) * t)


# ----------------------------------------------------------------------------- schedules

def sd3_sigmas(steps, shift=3.0):
    """The SD3 reference sigma list for `steps` Euler steps: steps + 1 Python floats, strictly
    decreasing from exactly 1.0 to exactly 0.0 (reference `get_sigmas`; diffusers agrees).

    The table: shift_t(i / 1000) for i = 1..1000, so its ends are sigma_min = shift_t(1/1000) and
    sigma_max = shift_t(1) = 1. `steps` timesteps run linearly (float64) from 1000 sigma_max down
    to 1000 sigma_min, each divided by 1000 and shifted again; then the final 0.0. ValueError
    unless steps is an integer >= 1 and shift > 0.
    """
    if not isinstance(steps, Integral) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    sigma_min = shift_t(1 / 1000, shift)     # table(1)
    sigma_max = shift_t(1000 / 1000, shift)  # table(1000) = 1
    ts = torch.linspace(1000 * sigma_max, 1000 * sigma_min, steps, dtype=torch.float64)
    return [float(shift_t(t / 1000, shift)) for t in ts] + [0.0]


def student_sigmas(times=(1.0, 0.75, 0.5, 0.25)):
    """A few-step student's schedule: its training timesteps, then 0."""
    times = [float(t) for t in times]
    decreasing = all(a > b for a, b in zip(times, times[1:]))
    if not times or not decreasing or any(not 0 < t <= 1 for t in times):
        raise ValueError(f"student times must be strictly decreasing values in (0, 1], got {times}")
    return times + [0.0]


def img2img_sigmas(sigmas, strength):
    """Keep the last share `strength` of the steps: 1 = all (txt2img), 0 = none (input unchanged).

    Drops the first int(n (1 - strength)) of the n steps, as the SD3 reference does with
    `denoise` (a 1e-9 guard stops float error from dropping one step too few, e.g. 10 * (1 - 0.9)).
    """
    if not isinstance(strength, Real) or not 0.0 <= strength <= 1.0:
        raise ValueError(f"img2img strength must be a number in [0, 1] (the share of steps run), "
                         f"got {strength!r}")
    n = len(sigmas) - 1
    return list(sigmas)[int(n * (1 - strength) + 1e-9):]


# ----------------------------------------------------------------------------- per-sample noise

def derive_seed(seed, k):
    """The seed of draw k made for `seed` (a sampler step, a training step): seed * p + k with a
    prime p, so the draws of nearby seeds do not collide."""
    return seed * 1_000_003 + k


def seeded_noise(seeds, shape_chw, device="cpu", dtype=torch.float32):
    """[B, C, H, W] noise; sample i drawn on its own CPU generator seeded with seeds[i],
    so an image depends only on its seed, not on batch size or device."""
    out = [torch.randn(tuple(shape_chw), generator=torch.Generator().manual_seed(int(s) % 2**63))
           for s in seeds]
    return torch.stack(out).to(device=device, dtype=dtype)  # [B, C, H, W]


def _step_noise(x, step, seeds, generator):
    """Fresh noise like x for the renoise sampler at loop index `step`."""
    if seeds is not None:  # per-sample: independent of batch size
        return seeded_noise([derive_seed(s, step + 1) for s in seeds], x.shape[1:], x.device, x.dtype)
    if generator is not None:
        return torch.randn(x.shape, generator=generator, device=generator.device).to(x)
    raise ValueError("sampler 'renoise' draws fresh noise each step: "
                     "pass seeds=[...] (one per sample) or generator=")


# ----------------------------------------------------------------------------- guidance

def _cat(a, b):
    return None if a is None else torch.cat([a, b])


def cfg_velocity(model, x, t, context, pooled, uncond_context=None, uncond_pooled=None, scale=1.0):
    """Classifier-free guided velocity: uncond + scale (cond - uncond), one batched pass.

    scale None, 0 or 1 means conditional only (SD3 reference uses 1, diffusers 0): one pass of
    batch B, no uncond evaluation. Otherwise one pass over [cond; uncond] of batch 2B.
    """
    if scale is None or scale == 0 or scale == 1:
        return model(x, t, context, pooled)
    if uncond_context is None or (pooled is not None and uncond_pooled is None):
        raise ValueError(f"cfg scale {scale} needs uncond_context and uncond_pooled "
                         "(encode the empty prompt), or use scale 1 for no guidance")
    v = model(torch.cat([x, x]), torch.cat([t, t]),                  # [2B, C, H, W], [2B]
              _cat(context, uncond_context), _cat(pooled, uncond_pooled))  # [2B, L, Dc], [2B, Dp]
    cond, uncond = v.chunk(2)                                          # [B, C, H, W] each
    return uncond + scale * (cond - uncond)


# ----------------------------------------------------------------------------- the loop

def sampler_step(x, v, s, s_next, sampler, eps=None):
    """One step from noise level s to s_next < s (floats), given the velocity v at (x, s).
    euler:   x + (s_next - s) v
    renoise: (1 - s_next) x0_hat + s_next eps, x0_hat = x - s v: the prediction re-noised with
             fresh noise eps (ADD / LADD few-step sampling; eps may be None at s_next = 0).
    The result keeps x's dtype."""
    if sampler == "euler":
        return x + (s_next - s) * v
    x0_hat = x - s * v
    return (1 - s_next) * x0_hat + (s_next * eps if s_next > 0 else 0.0)


@torch.no_grad()
def sample(model, noise, sigmas, context, pooled, uncond_context=None, uncond_pooled=None,
           cfg=1.0, sampler="euler", generator=None, seeds=None, x_init=None, callback=None,
           progress=False):
    """Integrate from sigmas[0] to sigmas[-1] (normally 0); returns x0 latents [B, C, H, W].

    noise: [B, C, H, W], the starting eps (see `seeded_noise`). x_init: latent to start from for
    img2img (x = s0 eps + (1 - s0) x_init); None means txt2img (x = eps when s0 = 1).
    sampler "euler":   x <- x + (s_next - s) v
            "renoise": x <- (1 - s_next) x0_hat + s_next eps_fresh, with eps_fresh drawn from the
                       per-sample `seeds` (batch-size independent) or else from `generator`.
    callback(i, x0_hat) is called after every step.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choices: {', '.join(SAMPLERS)}")
    if len(sigmas) < 1:
        raise ValueError("sigmas is empty; need at least one value (e.g. sd3_sigmas(28))")
    if seeds is not None and len(seeds) != noise.shape[0]:
        raise ValueError(f"got {len(seeds)} seeds for a batch of {noise.shape[0]}")
    s0 = float(sigmas[0])
    x = noise * s0 if x_init is None else s0 * noise + (1 - s0) * x_init.to(noise)
    B = x.shape[0]
    for i in tqdm(range(len(sigmas) - 1), disable=not progress, desc="sampling"):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        t = torch.full((B,), s, device=x.device, dtype=torch.float32)  # [B]
        v = cfg_velocity(model, x, t, context, pooled, uncond_context, uncond_pooled, cfg)
        v = v.to(x.dtype)                                              # [B, C, H, W]
        eps = _step_noise(x, i, seeds, generator) if sampler == "renoise" and s_next > 0 else None
        x0_hat = x - s * v                                             # [B, C, H, W]
        x = sampler_step(x, v, s, s_next, sampler, eps)
        if callback is not None:
            callback(i, x0_hat)
    return x
