"""Tests for flow.py: schedules, noising algebra, timestep densities, CFG batching, the samplers."""
import math

import pytest
import torch

import flow

SHAPE = (2, 3, 3)  # C, H, W of the toy latents


def gaussian_velocity(mu, sd):
    """The exact marginal velocity E[eps - x0 | x_t] for data x0 ~ N(mu, sd^2) per dimension."""
    def model(x, t, context, pooled):
        t = t.to(x.dtype).view(-1, 1, 1, 1)
        a = 1 - t
        var = a * a * sd * sd + t * t           # Var[x_t]
        r = x - a * mu                          # x_t - E[x_t]
        e_x0 = mu + a * sd * sd / var * r       # E[x0 | x_t]
        e_eps = t / var * r                     # E[eps | x_t]
        return e_eps - e_x0
    return model


class CountingModel:
    """Wraps a model and records the batch size of every call."""
    def __init__(self, fn):
        self.fn, self.batches = fn, []

    def __call__(self, x, t, context, pooled):
        assert x.shape[0] == t.shape[0] == context.shape[0] == pooled.shape[0]
        self.batches.append(x.shape[0])
        return self.fn(x, t, context, pooled)


def context_model(x, t, context, pooled):
    """A velocity that depends on x, t and both conditioning tensors, per sample."""
    c = context.mean(dim=(1, 2)) + pooled.sum(dim=1)  # [B]
    return torch.tanh(x) * t.view(-1, 1, 1, 1) + c.view(-1, 1, 1, 1)


def conditioning(B, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 4, 5, generator=g), torch.randn(B, 6, generator=g)


# ----------------------------------------------------------------------------- schedules

def test_sd3_sigmas_match_reference():
    assert flow.sd3_sigmas(4, 3.0) == pytest.approx([1.0, 0.85769, 0.60215, 0.00893, 0.0], abs=1e-5)
    s28 = flow.sd3_sigmas(28)
    assert len(s28) == 29
    assert s28[:3] == pytest.approx([1.0, 0.98738, 0.97411], abs=1e-5)
    assert s28[-3:] == pytest.approx([0.11091, 0.00893, 0.0], abs=1e-5)
    assert all(a > b for a, b in zip(s28, s28[1:]))
    assert flow.sd3_sigmas(1) == [1.0, 0.0]


def test_shift_t_properties():
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    assert torch.equal(flow.shift_t(t, 1.0), t)
    for s in (0.5, 3.0, 6.0):
        st = flow.shift_t(t, s)
        assert st[0] == 0 and st[-1] == pytest.approx(1.0, abs=1e-12)
        assert torch.all(st[1:] > st[:-1])                      # strictly monotone
        assert torch.all(st >= t) if s > 1 else torch.all(st <= t)
    assert isinstance(flow.shift_t(0.5, 3.0), float)
    assert flow.shift_t(0.5, 3.0) == pytest.approx(0.75)


def test_student_and_img2img_sigmas():
    assert flow.student_sigmas() == [1.0, 0.75, 0.5, 0.25, 0.0]
    s = flow.sd3_sigmas(28)
    assert flow.img2img_sigmas(s, 1.0) == s
    assert flow.img2img_sigmas(s, 0.0) == [0.0]
    assert len(flow.img2img_sigmas(s, 0.5)) - 1 == 14
    assert len(flow.img2img_sigmas(flow.sd3_sigmas(10), 0.9)) - 1 == 9  # no float off-by-one


# ----------------------------------------------------------------------------- noising

def test_noising_round_trip():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, *SHAPE, generator=g), torch.randn(4, *SHAPE, generator=g)
    t = torch.tensor([0.0, 0.3, 0.7, 1.0])
    x_t = flow.add_noise(x0, eps, t)
    assert torch.equal(x_t[0], x0[0]) and torch.equal(x_t[3], eps[3])
    v = flow.velocity_target(x0, eps)
    torch.testing.assert_close(flow.x0_from_v(x_t, v, t), x0)
    torch.testing.assert_close(flow.noise_from_v(x_t, v, t), eps)
    t_float, t_tensor = flow.add_noise(x0, eps, 0.3), flow.add_noise(x0, eps, torch.full((4,), 0.3))
    torch.testing.assert_close(t_float, t_tensor)


# ----------------------------------------------------------------------------- timestep densities

def test_logit_normal_and_uniform_timesteps():
    t = flow.sample_t_logit_normal(20000, 0.0, 1.0, torch.Generator().manual_seed(0))
    assert t.shape == (20000,) and t.min() > 0 and t.max() < 1
    assert abs(t.mean().item() - 0.5) < 0.01 and abs(t.median().item() - 0.5) < 0.01
    t1 = flow.sample_t_logit_normal(20000, 1.0, 1.0, torch.Generator().manual_seed(0))
    assert abs(t1.median().item() - 1 / (1 + math.exp(-1))) < 0.01  # median = sigmoid(mean)
    again = flow.sample_t_logit_normal(20000, 0.0, 1.0, torch.Generator().manual_seed(0))
    assert torch.equal(t, again)
    other = flow.sample_t_logit_normal(20000, 0.0, 1.0, torch.Generator().manual_seed(1))
    assert not torch.equal(t, other)
    u = flow.sample_t_uniform(20000, torch.Generator().manual_seed(0))
    assert 0 <= u.min() and u.max() < 1 and abs(u.mean().item() - 0.5) < 0.01
    assert torch.equal(u, flow.sample_t_uniform(20000, torch.Generator().manual_seed(0)))


# ----------------------------------------------------------------------------- CFG

@pytest.mark.parametrize("scale", [1.0, 0.0, None])
def test_cfg_off_is_one_conditional_pass(scale):
    B = 3
    x, t = torch.randn(B, *SHAPE), torch.rand(B)
    ctx, pooled = conditioning(B, 0)
    unc, unp = conditioning(B, 1)
    model = CountingModel(context_model)
    out = flow.cfg_velocity(model, x, t, ctx, pooled, unc, unp, scale)
    assert model.batches == [B]
    torch.testing.assert_close(out, context_model(x, t, ctx, pooled))


def test_cfg_batches_cond_and_uncond_in_one_pass():
    B, s = 3, 4.5
    x, t = torch.randn(B, *SHAPE), torch.rand(B)
    ctx, pooled = conditioning(B, 0)
    unc, unp = conditioning(B, 1)
    model = CountingModel(context_model)
    out = flow.cfg_velocity(model, x, t, ctx, pooled, unc, unp, s)
    assert model.batches == [2 * B]
    cond, uncond = context_model(x, t, ctx, pooled), context_model(x, t, unc, unp)
    torch.testing.assert_close(out, uncond + s * (cond - uncond))
    with pytest.raises(ValueError, match="uncond"):
        flow.cfg_velocity(model, x, t, ctx, pooled, None, None, s)


# ----------------------------------------------------------------------------- samplers

def test_euler_recovers_gaussian_data():
    mu, sd, B = 1.5, 0.5, 2048
    noise = torch.randn(B, *SHAPE, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ctx, pooled = torch.zeros(B, 1, 1), torch.zeros(B, 1)
    model = gaussian_velocity(mu, sd)
    euler = lambda n: flow.sample(model, noise, [1 - i / n for i in range(n + 1)], ctx, pooled)
    # The exact flow maps eps to mu + sd * eps; Euler converges to it per sample, at first order.
    err200, err400 = [(euler(n) - (mu + sd * noise)).abs().max().item() for n in (200, 400)]
    assert err400 < 0.01 and 0.45 < err400 / err200 < 0.55
    x = euler(400)
    assert abs(x.mean().item() - mu) < 0.01 and abs(x.std().item() - sd) < 0.01
    # The SD3 shifted schedule (28 steps) gets the mean right; its few low-noise steps
    # shrink this toy's spread a little (std 0.45 for 0.5).
    x28 = flow.sample(model, noise, flow.sd3_sigmas(28), ctx, pooled)
    assert abs(x28.mean().item() - mu) < 0.01 and abs(x28.std().item() - sd) < 0.07


@pytest.mark.parametrize("sampler", ["euler", "renoise"])
def test_point_mass_data_lands_exactly(sampler):
    mu, B = -0.7, 16
    noise = flow.seeded_noise(range(B), SHAPE, dtype=torch.float64)
    ctx, pooled = torch.zeros(B, 1, 1), torch.zeros(B, 1)
    x0_hats = []
    x = flow.sample(gaussian_velocity(mu, 0.0), noise, flow.sd3_sigmas(4), ctx, pooled,
                    sampler=sampler, seeds=list(range(B)),
                    callback=lambda i, x0: x0_hats.append((i, x0)))
    torch.testing.assert_close(x, torch.full_like(x, mu))
    assert [i for i, _ in x0_hats] == [0, 1, 2, 3]
    torch.testing.assert_close(x0_hats[0][1], torch.full_like(x, mu))  # exact x0_hat from step 0


def test_seeded_noise_is_per_sample():
    n = flow.seeded_noise([5, 9, 13], SHAPE)
    assert n.shape == (3, *SHAPE)
    assert torch.equal(n[1:2], flow.seeded_noise([9], SHAPE))
    assert not torch.equal(n[0], n[1])


@pytest.mark.parametrize("sampler", ["euler", "renoise"])
def test_fixed_seed_independent_of_batch_size(sampler):
    def run(seeds, cfg):
        ctx, pooled = torch.ones(len(seeds), 4, 5), torch.ones(len(seeds), 6)
        noise = flow.seeded_noise(seeds, SHAPE)
        return flow.sample(context_model, noise, flow.student_sigmas(), ctx, pooled, -ctx, -pooled,
                           cfg=cfg, sampler=sampler, seeds=seeds)
    for cfg in (1.0, 3.0):
        batch, alone = run([3, 7, 11], cfg), run([7], cfg)
        torch.testing.assert_close(batch[1:2], alone, atol=1e-6, rtol=0)
        assert not torch.allclose(batch[0], batch[1])


def test_renoise_with_generator_is_deterministic():
    ctx, pooled = torch.ones(2, 4, 5), torch.ones(2, 6)
    noise = flow.seeded_noise([0, 1], SHAPE)
    run = lambda seed: flow.sample(context_model, noise, flow.student_sigmas(), ctx, pooled,
                                   sampler="renoise", generator=torch.Generator().manual_seed(seed))
    assert torch.equal(run(0), run(0)) and not torch.equal(run(0), run(1))


def test_img2img_start_and_strength_zero():
    B = 2
    z0, noise = torch.randn(B, *SHAPE), flow.seeded_noise([0, 1], SHAPE)
    ctx, pooled = conditioning(B)
    model = CountingModel(context_model)
    no_steps = flow.img2img_sigmas(flow.sd3_sigmas(8), 0.0)
    out = flow.sample(model, noise, no_steps, ctx, pooled, x_init=z0)
    assert torch.equal(out, z0) and model.batches == []
    seen = []
    def spy(x, t, c, p):
        seen.append((x.clone(), t.clone()))
        return context_model(x, t, c, p)
    sig = flow.img2img_sigmas(flow.sd3_sigmas(8), 0.5)
    assert len(sig) == 5
    flow.sample(spy, noise, sig, ctx, pooled, x_init=z0)
    torch.testing.assert_close(seen[0][0], sig[0] * noise + (1 - sig[0]) * z0)
    torch.testing.assert_close(seen[0][1], torch.full((B,), sig[0]))
    assert len(seen) == 4


def test_sample_runs_without_grad():
    w = torch.nn.Parameter(torch.ones(()))
    out = flow.sample(lambda x, t, c, p: w * x, torch.randn(1, *SHAPE), flow.student_sigmas(),
                      torch.zeros(1, 1, 1), torch.zeros(1, 1))
    assert not out.requires_grad


def test_bad_inputs_raise_clear_errors():
    ctx, pooled = conditioning(1)
    with pytest.raises(ValueError, match="euler, renoise"):
        flow.sample(context_model, torch.randn(1, *SHAPE), [1.0, 0.0], ctx, pooled, sampler="heun")
    for strength in (-0.1, 1.5, "half"):
        with pytest.raises(ValueError, match=r"strength.*\[0, 1\]"):
            flow.img2img_sigmas(flow.sd3_sigmas(4), strength)
    for steps in (0, -3, 2.5):
        with pytest.raises(ValueError, match="steps must be an integer >= 1"):
            flow.sd3_sigmas(steps)
    with pytest.raises(ValueError, match="seeds"):  # renoise needs a source of fresh noise
        flow.sample(context_model, torch.randn(1, *SHAPE), flow.student_sigmas(), ctx, pooled,
                    sampler="renoise")
    with pytest.raises(ValueError, match="decreasing"):
        flow.student_sigmas((0.5, 0.75))
