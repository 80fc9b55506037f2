"""Tests that guard the method: one behaviour test for each line of the LADD step.

Each test is named after the quantity it guards (`pytest -k eps_fake`, `-k t_hat`, `-k grad_clip`,
`-k ema` ...), so a broken line (a swapped argument, a missing re-noise, a wrong time, a wrong
sign, an ignored setting) fails a test that says what broke. Tiny models (mmdit.CONFIGS["test"]),
fixed seeds and draws; recording wrappers around the student's forward, the teacher's
`features` and the heads' forward make "who reads what" exact.
"""
import inspect
import math

import pytest
import torch

import addons
import flow
import ladd_data
import mmdit
import train_ladd
import training
from conftest import LADD_SAMPLER, ladd_argv, make_checkpoint
from discriminator import Discriminator

ONE_THREAD = True  # see conftest.py

CONFIG = mmdit.CONFIGS["test"]  # depth 3, width 32, 4 latent channels, context 10, pooled 12
BLOCKS = [0, 2]                 # heads on two of the teacher's three blocks
NOISES = ("eps", "eps_fake", "eps_real")
INF = float("inf")
TIMES, PROBS, WARM = [1.0, 0.75, 0.5, 0.25], [0.7, 0.1, 0.1, 0.1], [0.0, 0.0, 0.5, 0.5]


# ----------------------------------------------------------------------------------------------
# helpers: tiny models, a fixed batch, recording wrappers


def perturb(module, seed, std):
    """Add std * noise to every parameter (the MMDiT's zero-initialised gates and output layer
    and the heads' zero output layers included), so that every part acts."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(std * torch.randn(p.shape, generator=g))
    return module


def tiny_models(seed=0):
    """The frozen teacher, the student (its copy, as LADD starts) and opinionated heads."""
    torch.manual_seed(seed)
    teacher = perturb(mmdit.MMDiT(CONFIG), seed, 0.05).requires_grad_(False)
    student = mmdit.MMDiT(CONFIG)
    student.load_state_dict(teacher.state_dict())
    heads = perturb(Discriminator.for_teacher(CONFIG, BLOCKS, hidden=16), seed + 1, 0.1)
    return teacher, student, heads


def tiny_batch(B=3, H=8, W=12, seed=0):
    """A fixed Batch: a non-square 8 x 12 latent (a 4 x 6 token map), t = 1, .5, .25, a drawn t_hat
    unlike every t, and three separate noises."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(B, CONFIG.out_channels, H, W, generator=g)             # [B, C, h, w]
    context = torch.randn(B, 5, CONFIG.context_dim, generator=g)            # [B, L, Dc]
    pooled = torch.randn(B, CONFIG.pooled_dim, generator=g)                 # [B, Dp]
    t = torch.tensor([1.0, 0.5, 0.25])[:B]                                  # [B]
    t_hat = flow.sample_t_logit_normal(B, 0.0, 1.0, g)                      # [B]
    noise = {k: torch.randn(x0.shape, generator=g) for k in NOISES}         # [B, C, h, w] each
    assert ((t_hat - t).abs() > 0.05).all()  # the times tell apart which one was used
    return train_ladd.Batch(x0, context, pooled, t, t_hat, **noise)


def settings(grad_clip=INF):
    return train_ladd.StepSettings(grad_clip=grad_clip)


def sgd(module, lr=0.0):
    """lr 0: every weight stays as it was and p.grad is what the step left."""
    return torch.optim.SGD(module.parameters(), lr=lr)


def frozen_copy(x):
    """Detached copies of the tensors in x (a tensor, a list of them, or anything else)."""
    if torch.is_tensor(x):
        return x.detach().clone()
    if isinstance(x, (list, tuple)):
        return [frozen_copy(y) for y in x]
    return x


def record(obj, name):
    """Wrap obj.<name> (a bound method: a module's forward, the teacher's features) so that each
    call appends {argument name: detached copy, "grad": autograd on?, "out": detached output}."""
    real, calls = getattr(obj, name), []
    signature = inspect.signature(real)

    def wrapper(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        out = real(*args, **kwargs)
        calls.append({**{k: frozen_copy(v) for k, v in bound.arguments.items()},
                      "grad": torch.is_grad_enabled(), "out": frozen_copy(out)})
        return out
    setattr(obj, name, wrapper)  # an instance attribute: shadows the method (and nn.Module calls it)
    return calls


def flat(values):
    return torch.cat([v.detach().flatten() for v in values])


def weights_of(module):
    return flat(module.parameters()).clone()


def grads_of(module):
    return flat(p.grad for p in module.parameters())


def noised(x0, eps, t):
    """x0 noised to t [B] with eps, by hand (not flow.add_noise, which the step uses):
    (1 - t) x0 + t eps."""
    t = t.view(-1, 1, 1, 1)                                                  # [B, 1, 1, 1]
    return (1 - t) * x0 + t * eps                                            # [B, C, h, w]


def mean_logits(heads, features, b):
    """The heads' mean logit on `features`, one per head [K], weights as they are now."""
    with torch.no_grad():
        return torch.stack([l.mean() for l in heads(features, b.t_hat, b.pooled)])


def real_features_of(teacher, heads, b):
    """The teacher's features of the real batch, computed here by hand (x0 at t_hat, eps_real)."""
    with torch.no_grad():
        real = noised(b.x0, b.eps_real, b.t_hat)                             # [B, C, h, w]
        return teacher.features(real, b.t_hat, b.context, b.pooled, heads.blocks)


def x0_hat_by_hand(student, b, grad=False):
    """The student's x0_hat of the batch, by hand: x_t = x0 noised to t with eps, x_t - t v."""
    with torch.set_grad_enabled(grad):
        x_t = noised(b.x0, b.eps, b.t)                                       # [B, C, h, w]
        v = student(x_t, b.t, b.context, b.pooled)                           # [B, C, h, w]
        return x_t - b.t.view(-1, 1, 1, 1) * v


# ----------------------------------------------------------------------------------------------
# what is re-noised, to which level, with which noise


def test_student_input_x_t_is_x0_noised_to_t_with_eps():
    """student_step: the student reads x_t = (1 - t) x0 + t eps (its own noise, its own time)."""
    teacher, student, heads = tiny_models()
    b = tiny_batch()
    calls = record(student, "forward")
    train_ladd.student_step(student, teacher, heads, sgd(student), b, settings())
    assert len(calls) == 1
    assert torch.equal(calls[0]["x"], noised(b.x0, b.eps, b.t))


def test_fake_is_x0_hat_noised_to_t_hat_with_eps_fake():
    """student_step: the teacher judges fake = x0_hat noised to t_hat with eps_fake, where
    x0_hat = x_t - t v is the student's prediction (not x0, not at t, not with eps/eps_real)."""
    teacher, student, heads = tiny_models()
    b = tiny_batch()
    x0_hat = x0_hat_by_hand(student, b)                                      # [B, C, h, w]
    assert not torch.allclose(x0_hat, b.x0, atol=0.1)  # the student's answer is not the data
    calls = record(teacher, "features")
    train_ladd.student_step(student, teacher, heads, sgd(student), b, settings())
    assert len(calls) == 1
    expected = noised(x0_hat, b.eps_fake, b.t_hat)                           # [B, C, h, w]
    assert torch.allclose(calls[0]["x"], expected, rtol=0, atol=1e-5)


def test_real_is_x0_noised_to_t_hat_with_eps_real():
    """heads_step: the teacher reads real = x0 noised to t_hat with eps_real."""
    teacher, student, heads = tiny_models()
    b = tiny_batch()
    fake_features, _ = train_ladd.student_step(student, teacher, heads, sgd(student), b, settings())
    calls = record(teacher, "features")
    train_ladd.heads_step(teacher, heads, sgd(heads), b, fake_features, settings())
    assert len(calls) == 1
    assert torch.equal(calls[0]["x"], noised(b.x0, b.eps_real, b.t_hat))


# ----------------------------------------------------------------------------------------------
# which time and which prompt the student, the teacher and the heads are told


def test_student_time_is_t_and_its_context_and_pooled_the_batchs():
    """student_step: the student is told t (not t_hat) and the batch's context and pooled."""
    teacher, student, heads = tiny_models()
    b = tiny_batch()
    calls = record(student, "forward")
    train_ladd.student_step(student, teacher, heads, sgd(student), b, settings())
    (call,) = calls
    assert torch.equal(call["t"], b.t)
    assert torch.equal(call["context"], b.context) and torch.equal(call["y"], b.pooled)


def test_teacher_time_is_t_hat_in_student_step():
    """student_step: the teacher is told t_hat (the fake's level), the batch's context and pooled
    and the heads' blocks."""
    teacher, student, heads = tiny_models()
    b = tiny_batch()
    calls = record(teacher, "features")
    train_ladd.student_step(student, teacher, heads, sgd(student), b, settings())
    (call,) = calls
    assert torch.equal(call["t"], b.t_hat)
    assert torch.equal(call["context"], b.context) and torch.equal(call["y"], b.pooled)
    assert list(call["blocks"]) == heads.blocks


def test_teacher_time_is_t_hat_in_heads_step():
    """heads_step: the teacher is told t_hat (the real's level), the batch's context and pooled
    and the heads' blocks."""
    teacher, student, heads = tiny_models()
    b = tiny_batch()
    fake_features, _ = train_ladd.student_step(student, teacher, heads, sgd(student), b, settings())
    calls = record(teacher, "features")
    train_ladd.heads_step(teacher, heads, sgd(heads), b, fake_features, settings())
    (call,) = calls
    assert torch.equal(call["t"], b.t_hat)
    assert torch.equal(call["context"], b.context) and torch.equal(call["y"], b.pooled)
    assert list(call["blocks"]) == heads.blocks


def test_teacher_autograd_on_in_student_step_off_in_heads_step():
    """The teacher runs with autograd on in student_step (the verdict flows back through it to
    the student) and off in heads_step (the real batch needs no graph)."""
    teacher, student, heads = tiny_models()
    b = tiny_batch()
    calls = record(teacher, "features")
    fake_features, _ = train_ladd.student_step(student, teacher, heads, sgd(student), b, settings())
    train_ladd.heads_step(teacher, heads, sgd(heads), b, fake_features, settings())
    assert [call["grad"] for call in calls] == [True, False]


def test_heads_time_is_t_hat_in_student_step():
    """student_step: the heads judge the teacher's fake features, told t_hat and the batch's
    pooled vector."""
    teacher, student, heads = tiny_models()
    b = tiny_batch()
    teacher_calls, heads_calls = record(teacher, "features"), record(heads, "forward")
    train_ladd.student_step(student, teacher, heads, sgd(student), b, settings())
    (call,) = heads_calls
    assert torch.equal(call["t_hat"], b.t_hat) and torch.equal(call["pooled"], b.pooled)
    features = teacher_calls[0]["out"]                                       # [B, D, h', w'] each
    assert len(call["features"]) == len(features) == len(BLOCKS)
    assert all(torch.equal(h, t) for h, t in zip(call["features"], features))  # in block order


def test_heads_time_is_t_hat_for_real_and_fake_in_heads_step():
    """heads_step: one heads pass over [real; fake] rows (real first), every row told its own
    t_hat and pooled vector: t_hat and pooled repeated as a block, not interleaved."""
    teacher, student, heads = tiny_models()
    b = tiny_batch()
    B = len(b.x0)
    fake_features, _ = train_ladd.student_step(student, teacher, heads, sgd(student), b, settings())
    teacher_calls, heads_calls = record(teacher, "features"), record(heads, "forward")
    train_ladd.heads_step(teacher, heads, sgd(heads), b, fake_features, settings())
    (call,) = heads_calls
    assert torch.equal(call["t_hat"], torch.cat([b.t_hat, b.t_hat]))        # [2B]
    assert torch.equal(call["pooled"], torch.cat([b.pooled, b.pooled]))     # [2B, Dp]
    real_features = teacher_calls[0]["out"]
    assert len(call["features"]) == len(BLOCKS)
    for judged, real, fake in zip(call["features"], real_features, fake_features):  # [2B, D, h', w']
        assert torch.equal(judged[:B], real) and torch.equal(judged[B:], fake)


# ----------------------------------------------------------------------------------------------
# which logits are real, and the losses


def test_real_logits_up_fake_logits_down_after_heads_step():
    """One heads_step (SGD) on a fixed batch: every head's mean logit on the real features rises
    against its mean logit on the fake features (the heads learn which is which). The gap is what
    a gradient step on the hinge loss guarantees; each side alone need not move its way, since
    parts shared by both (the logit bias) move real and fake alike."""
    teacher, student, heads = tiny_models()
    b = tiny_batch()
    fake_features, _ = train_ladd.student_step(student, teacher, heads, sgd(student), b, settings())
    real_features = real_features_of(teacher, heads, b)
    real0, fake0 = mean_logits(heads, real_features, b), mean_logits(heads, fake_features, b)  # [K]
    assert ((real0.abs() < 1) & (fake0.abs() < 1)).all()  # every hinge term active
    train_ladd.heads_step(teacher, heads, sgd(heads, lr=0.1), b, fake_features, settings())
    real1, fake1 = mean_logits(heads, real_features, b), mean_logits(heads, fake_features, b)
    assert ((real1 - real0) - (fake1 - fake0) > 1e-3).all(), (real1 - real0, fake1 - fake0)


def test_heads_loss_is_the_hinge_of_real_and_fake_logits():
    """heads_loss = sum over heads of mean(relu(1 - real)) + mean(relu(1 + fake)), by hand from
    the heads' logits before the step; logit_real and logit_fake are their means."""
    teacher, student, heads = tiny_models()
    with torch.no_grad():  # logits from about -2 to 2: the relu clips some rows of either side
        for head in heads.heads.values():
            head.logit_out.weight.mul_(30.0)
            head.logit_out.bias.fill_(3.3)
    b = tiny_batch(B=3)
    fake_features, _ = train_ladd.student_step(student, teacher, heads, sgd(student), b, settings())
    real_features = real_features_of(teacher, heads, b)
    with torch.no_grad():
        real = heads(real_features, b.t_hat, b.pooled)                       # [B] each
        fake = heads(fake_features, b.t_hat, b.pooled)
    assert (torch.cat(real) > 1).any() and (torch.cat(fake) < -1).any()  # some terms clipped
    assert (torch.cat(real) < 1).any() and (torch.cat(fake) > -1).any()  # and some not
    expected = sum((1 - r).clamp(min=0).mean() + (1 + f).clamp(min=0).mean() for r, f in zip(real, fake))
    stats = train_ladd.heads_step(teacher, heads, sgd(heads), b, fake_features, settings())
    assert stats["heads_loss"] == pytest.approx(expected.item(), rel=1e-4, abs=1e-6)
    assert stats["logit_real"] == pytest.approx(torch.stack([r.mean() for r in real]).mean().item(),
                                                rel=1e-4, abs=1e-6)
    assert stats["logit_fake"] == pytest.approx(torch.stack([f.mean() for f in fake]).mean().item(),
                                                rel=1e-4, abs=1e-6)


def test_student_loss_is_minus_the_mean_fake_logit():
    """student_loss = -sum over heads of mean(fake logits), by hand from the heads' logits on the
    features student_step returns (the ones it judged)."""
    teacher, student, heads = tiny_models()
    b = tiny_batch()
    fake_features, stats = train_ladd.student_step(student, teacher, heads, sgd(student), b, settings())
    expected = -mean_logits(heads, fake_features, b).sum()
    assert abs(expected.item()) > 1e-3  # the sign is visible
    assert stats["student_loss"] == pytest.approx(expected.item(), rel=1e-5)


def test_student_step_raises_the_fake_logits():
    """The sign of the student's update: after one student_step (SGD) the heads' logits on its
    fake batch (same draws, by hand) are higher: the student learns to pass as real."""
    teacher, student, heads = tiny_models()
    b = tiny_batch()

    def fake_logit():
        fake = noised(x0_hat_by_hand(student, b), b.eps_fake, b.t_hat)
        with torch.no_grad():
            return mean_logits(heads, teacher.features(fake, b.t_hat, b.context, b.pooled,
                                                       heads.blocks), b).sum().item()
    before = fake_logit()
    train_ladd.student_step(student, teacher, heads, sgd(student, lr=0.01), b, settings())
    assert fake_logit() > before + 1e-4


# ----------------------------------------------------------------------------------------------
# what receives gradient


def test_student_gradient_flows_through_the_teacher():
    """The student's gradient is non-zero and changes with the teacher's weights: the heads'
    verdict flows back through the frozen teacher (not through a copy, not the student itself)."""
    teacher, student, heads = tiny_models()
    b = tiny_batch()

    def student_gradient():
        train_ladd.student_step(student, teacher, heads, sgd(student), b, settings())
        return grads_of(student)
    g1 = student_gradient()
    assert g1.abs().sum() > 0
    with torch.no_grad():
        teacher.joint_blocks[0].x_block.mlp.fc2.weight.mul_(2.0)  # another teacher only
    g2 = student_gradient()
    assert not torch.allclose(g1, g2)


def test_heads_grad_is_none_in_student_step():
    """student_step: the heads only judge; their parameters get no gradient (grad None) and do
    not move; the teacher gets none either."""
    teacher, student, heads = tiny_models()
    b = tiny_batch()
    before = weights_of(heads)
    train_ladd.student_step(student, teacher, heads, sgd(student), b, settings())
    assert all(p.grad is None for p in heads.parameters())
    assert torch.equal(weights_of(heads), before)
    assert all(p.grad is None for p in teacher.parameters())


def test_heads_requires_grad_is_restored_after_student_step():
    """student_step freezes the heads only while it runs: they end with requires_grad True, so
    heads_step can train them."""
    teacher, student, heads = tiny_models()
    train_ladd.student_step(student, teacher, heads, sgd(student), tiny_batch(), settings())
    assert all(p.requires_grad for p in heads.parameters())


def test_fake_features_are_detached_so_heads_step_leaves_the_student_alone():
    """student_step returns the fake features detached: heads_step's backward reaches neither the
    student's weights nor its gradients, nor the teacher."""
    teacher, student, heads = tiny_models()
    b = tiny_batch()
    fake_features, _ = train_ladd.student_step(student, teacher, heads, sgd(student), b, settings())
    assert all(not f.requires_grad and f.grad_fn is None for f in fake_features)
    weights, grads = weights_of(student), grads_of(student).clone()
    train_ladd.heads_step(teacher, heads, sgd(heads, lr=0.01), b, fake_features, settings())
    assert torch.equal(weights_of(student), weights) and torch.equal(grads_of(student), grads)
    assert all(p.grad is None for p in teacher.parameters())


def test_teacher_runs_once_per_player_step_fake_features_reused():
    """The teacher runs once in student_step (on the fake batch) and once in heads_step (on the
    real batch only): heads_step reuses student_step's fake features, never re-computes them."""
    teacher, student, heads = tiny_models()
    b = tiny_batch()
    calls = record(teacher, "features")
    fake_features, _ = train_ladd.student_step(student, teacher, heads, sgd(student), b, settings())
    assert len(calls) == 1
    train_ladd.heads_step(teacher, heads, sgd(heads), b, fake_features, settings())
    assert len(calls) == 2


# ----------------------------------------------------------------------------------------------
# the update: clip, reported norm, skipped steps, zero_grad, EMA


def test_student_grad_clip_bounds_the_update():
    """student_step: with SGD lr 1 the weights move by the applied gradient, whose norm the clip
    bounds (the raw gradient is 10+ times larger)."""
    teacher, student, heads = tiny_models()
    clip, before = 1e-3, weights_of(student)
    _, stats = train_ladd.student_step(student, teacher, heads, sgd(student, lr=1.0), tiny_batch(),
                                       settings(clip))
    assert stats["student_skipped"] == 0 and stats["student_grad_norm"] > 10 * clip
    change = (weights_of(student) - before).double().norm().item()
    assert 0 < change <= clip * (1 + 1e-3)


def test_heads_grad_clip_bounds_the_update():
    """heads_step: as the student's, the heads' applied gradient is clipped to grad_clip."""
    teacher, student, heads = tiny_models()
    b = tiny_batch()
    fake_features, _ = train_ladd.student_step(student, teacher, heads, sgd(student), b, settings())
    clip, before = 1e-3, weights_of(heads)
    stats = train_ladd.heads_step(teacher, heads, sgd(heads, lr=1.0), b, fake_features, settings(clip))
    assert stats["heads_skipped"] == 0 and stats["heads_grad_norm"] > 10 * clip
    change = (weights_of(heads) - before).double().norm().item()
    assert 0 < change <= clip * (1 + 1e-3)


def test_student_grad_norm_is_the_pre_clip_norm():
    """student_grad_norm reports the gradient's norm before clipping (the unclipped gradient's,
    by hand), while the gradient applied is the clipped one."""
    teacher, student, heads = tiny_models()
    b = tiny_batch()
    train_ladd.student_step(student, teacher, heads, sgd(student), b, settings(INF))  # no clip
    raw = grads_of(student).double().norm().item()
    clip = raw / 100
    _, stats = train_ladd.student_step(student, teacher, heads, sgd(student), b, settings(clip))
    assert stats["student_grad_norm"] == pytest.approx(raw, rel=1e-4)
    assert grads_of(student).double().norm().item() == pytest.approx(clip, rel=1e-3)


def test_heads_grad_norm_is_the_pre_clip_norm():
    """heads_grad_norm reports the heads' gradient norm before clipping."""
    teacher, student, heads = tiny_models()
    b = tiny_batch()
    fake_features, _ = train_ladd.student_step(student, teacher, heads, sgd(student), b, settings())
    train_ladd.heads_step(teacher, heads, sgd(heads), b, fake_features, settings(INF))
    raw = grads_of(heads).double().norm().item()
    clip = raw / 100
    stats = train_ladd.heads_step(teacher, heads, sgd(heads), b, fake_features, settings(clip))
    assert stats["heads_grad_norm"] == pytest.approx(raw, rel=1e-4)
    assert grads_of(heads).double().norm().item() == pytest.approx(clip, rel=1e-3)


def test_student_non_finite_loss_is_skipped():
    """A NaN in the batch makes the student's loss NaN: the step is skipped (weights exactly as
    they were, student_skipped = 1)."""
    teacher, student, heads = tiny_models()
    b = tiny_batch()
    b.x0[1, 0, 0, 0] = float("nan")
    before = weights_of(student)
    _, stats = train_ladd.student_step(student, teacher, heads, sgd(student, lr=0.01), b, settings(1.0))
    assert not math.isfinite(stats["student_loss"])
    assert stats["student_skipped"] == 1 and not math.isfinite(stats["student_grad_norm"])
    assert torch.equal(weights_of(student), before)


def test_heads_non_finite_loss_is_skipped():
    """A NaN in the real batch makes the heads' loss NaN: the step is skipped (heads_skipped = 1,
    the heads exactly as they were)."""
    teacher, student, heads = tiny_models()
    b = tiny_batch()
    fake_features, _ = train_ladd.student_step(student, teacher, heads, sgd(student), b, settings())
    b.x0[1, 0, 0, 0] = float("nan")
    before = weights_of(heads)
    stats = train_ladd.heads_step(teacher, heads, sgd(heads, lr=0.01), b, fake_features, settings(1.0))
    assert not math.isfinite(stats["heads_loss"])
    assert stats["heads_skipped"] == 1 and not math.isfinite(stats["heads_grad_norm"])
    assert torch.equal(weights_of(heads), before)


def test_student_zero_grad_gradients_do_not_accumulate():
    """student_step clears the old gradient first: two calls on the same batch (SGD lr 0) leave
    the same gradient, not twice it."""
    teacher, student, heads = tiny_models()
    b = tiny_batch()
    opt = sgd(student)
    train_ladd.student_step(student, teacher, heads, opt, b, settings())
    first = grads_of(student).clone()
    train_ladd.student_step(student, teacher, heads, opt, b, settings())
    assert torch.allclose(grads_of(student), first, rtol=1e-5, atol=1e-9)


def test_heads_zero_grad_gradients_do_not_accumulate():
    """heads_step clears the old gradient first, as student_step does."""
    teacher, student, heads = tiny_models()
    b = tiny_batch()
    fake_features, _ = train_ladd.student_step(student, teacher, heads, sgd(student), b, settings())
    opt = sgd(heads)
    train_ladd.heads_step(teacher, heads, opt, b, fake_features, settings())
    first = grads_of(heads).clone()
    train_ladd.heads_step(teacher, heads, opt, b, fake_features, settings())
    assert torch.allclose(grads_of(heads), first, rtol=1e-5, atol=1e-9)


def test_ema_update_moves_by_one_minus_decay():
    """training.ema_update: ema <- ema + (1 - decay) (model - ema) for each trained parameter; a
    frozen one (a LoRA student's shared base) is left alone."""
    torch.manual_seed(0)
    model, ema = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    model.bias.requires_grad_(False)
    w, bias = ema.weight.detach().clone(), ema.bias.detach().clone()
    training.ema_update(ema, model, 0.75)
    assert torch.allclose(ema.weight, w + 0.25 * (model.weight - w), rtol=0, atol=1e-7)
    assert torch.equal(ema.bias, bias)


# ----------------------------------------------------------------------------------------------
# the loop in train(): one tiny run, recorded


@pytest.fixture(scope="module")
def loop(tmp_path_factory):
    """A 4-step run of the test preset (--ema 0.6 --ema-warmup 3 --grad-clip 0.5) whose draw_batch,
    student_step, heads_step and ema_update calls are recorded."""
    folder = tmp_path_factory.mktemp("loop")
    teacher = make_checkpoint(str(folder), LADD_SAMPLER)
    calls = {"draw_batch": [], "student_step": [], "heads_step": [], "ema_update": []}

    def recorded(module, name, after=None):
        real = getattr(module, name)
        signature = inspect.signature(real)

        def wrapper(*args, **kwargs):
            out = real(*args, **kwargs)
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            call = {**bound.arguments, "out": out}
            if after:
                call.update(after(call))
            calls[name].append(call)
            return out
        return wrapper

    def teacher_state(call):  # right after the step: the teacher as the step left it
        params = list(call["teacher"].parameters())
        return {"teacher_frozen": all(not p.requires_grad for p in params),
                "teacher_grads": [p.grad for p in params if p.grad is not None]}

    def ema_state(call):
        return {"ema_weights": weights_of(call["ema"]), "model_weights": weights_of(call["model"])}

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_ladd, "draw_batch", recorded(train_ladd, "draw_batch"))
        mp.setattr(train_ladd, "student_step", recorded(train_ladd, "student_step", teacher_state))
        mp.setattr(train_ladd, "heads_step", recorded(train_ladd, "heads_step", teacher_state))
        mp.setattr(training, "ema_update", recorded(training, "ema_update", ema_state))
        train_ladd.main(ladd_argv(teacher, folder / "run", "--steps", "4", "--ema", "0.6",
                                  "--ema-warmup", "3", "--grad-clip", "0.5"))
    return calls


def test_loop_ema_decay_ramp(loop):
    """The loop's EMA decay at step s: min(ema, (1 + s) / (ema_warmup + s)), both settings read
    (with ema 0.6, warmup 3: the ramp 1/3, 1/2, then the cap 0.6)."""
    decays = [call["decay"] for call in loop["ema_update"]]
    expected = [min(0.6, (1 + s) / (3 + s)) for s in range(4)]
    assert decays == pytest.approx(expected) and expected[-2:] == [0.6, 0.6] and expected[0] < 0.6


def test_loop_ema_follows_the_trained_student(loop):
    """Each step the EMA (a separate model) moves towards the student student_step trained, by
    exactly (1 - decay), after both steps."""
    assert len(loop["ema_update"]) == len(loop["student_step"]) == 4
    previous = None
    for ema_call, step_call in zip(loop["ema_update"], loop["student_step"]):
        assert ema_call["model"] is step_call["student"] and ema_call["ema"] is not ema_call["model"]
        if previous is not None:  # the EMA's weights before this update were the last update's
            expected = previous + (1 - ema_call["decay"]) * (ema_call["model_weights"] - previous)
            assert torch.allclose(ema_call["ema_weights"], expected, rtol=0, atol=1e-6)
        previous = ema_call["ema_weights"]


def test_loop_heads_step_gets_student_steps_fake_features_and_batch(loop):
    """Each step draws one batch (steps 0, 1, 2, 3 in order) that both steps use; heads_step gets
    the very features student_step returned and the heads student_step judged with."""
    assert [call["step"] for call in loop["draw_batch"]] == [0, 1, 2, 3]
    fields = ("x0", "context", "pooled", "t", "t_hat", *NOISES)
    for draw, student, heads in zip(loop["draw_batch"], loop["student_step"], loop["heads_step"]):
        for k in fields:
            assert torch.equal(getattr(student["b"], k), getattr(draw["out"], k)), k
            assert torch.equal(getattr(heads["b"], k), getattr(draw["out"], k)), k
        fake_features = student["out"][0]
        assert len(heads["fake_features"]) == len(fake_features)
        assert all(torch.equal(h, s) for h, s in zip(heads["fake_features"], fake_features))
        assert heads["heads"] is student["heads"] and heads["teacher"] is student["teacher"]


def test_loop_teacher_is_frozen(loop):
    """The run's teacher never trains: requires_grad off, no gradient after either step."""
    for call in loop["student_step"] + loop["heads_step"]:
        assert call["teacher_frozen"] and not call["teacher_grads"]


def test_loop_settings_grad_clip_reaches_both_steps_and_addons_are_off(loop):
    """--grad-clip reaches both steps' settings; the default run passes no add-on."""
    for call in loop["student_step"] + loop["heads_step"]:
        s = call["s"]
        assert s.grad_clip == 0.5
        assert s.pair_weight == 0 and s.distill is None and s.r1_weight == 0


# ----------------------------------------------------------------------------------------------
# the draws


def tiny_dataset(n=256, seed=0):
    """What ladd_data.build_dataset returns, in memory: one bucket {(w, h): {name: [shards]}},
    shards of ladd_data.SHARD rows, 2 x 2 latents (draw_batch reads no model)."""
    g = torch.Generator().manual_seed(seed)
    rows = {"latents": torch.randn(n, 4, 2, 2, generator=g),                 # [n, C, h, w]
            "context": torch.randn(n, 3, CONFIG.context_dim, generator=g),   # [n, L, Dc]
            "pooled": torch.randn(n, CONFIG.pooled_dim, generator=g),        # [n, Dp]
            "seed": ladd_data.NOISE_SEED + torch.arange(n)}                  # [n]
    return {(8, 8): {k: list(torch.split(v, ladd_data.SHARD)) for k, v in rows.items()}}


DATASET = tiny_dataset()


def draw(step, schedule=(TIMES, PROBS, WARM), **config):
    cfg = train_ladd.Config(**{"batch_size": 64, **config})
    return train_ladd.draw_batch(cfg, DATASET, schedule, step, training.World(), torch.device("cpu"))


def frequencies(t, times):
    return torch.tensor([(t == x).float().mean().item() for x in times])


def test_student_times_follow_warmup_probs_then_probs():
    """student_times: steps < warmup draw the times with warmup_probs, from step `warmup` on with
    probs; frequencies within 0.03 of them (4000 draws, fixed seed)."""
    g = torch.Generator().manual_seed(0)
    for step, expected in ((0, WARM), (9, WARM), (10, PROBS), (500, PROBS)):
        t = train_ladd.student_times(4000, step, TIMES, PROBS, WARM, 10, g)  # [4000]
        assert set(t.tolist()) <= set(TIMES)
        error = (frequencies(t, TIMES) - torch.tensor(expected)).abs().max().item()
        assert error < 0.03, (step, frequencies(t, TIMES))


def test_draw_batch_student_times_follow_the_schedule_and_warmup():
    """draw_batch passes its schedule and cfg.warmup on: with warmup 5, warmup_probs on the last
    time only and probs on the first only, step 4 draws t = .25 and step 5 t = 1 in every row."""
    schedule = (TIMES, [1.0, 0, 0, 0], [0, 0, 0, 1.0])
    assert (draw(4, schedule, warmup=5).t == 0.25).all()
    assert (draw(5, schedule, warmup=5).t == 1.0).all()


def logit_stats(t_hat):
    u = torch.logit(t_hat.double())
    return u.mean().item(), u.std().item()


def test_t_hat_logit_normal_mean_and_std():
    """flow.sample_t_logit_normal(n, mean, std): logit(t_hat) ~ N(mean, std^2) (20000 draws: mean
    and std within 0.03)."""
    g = torch.Generator().manual_seed(0)
    mean, std = logit_stats(flow.sample_t_logit_normal(20000, 1.0, 0.5, g))
    assert mean == pytest.approx(1.0, abs=0.03) and std == pytest.approx(0.5, abs=0.03)


def test_draw_batch_t_hat_follows_t_hat_mean_and_std():
    """draw_batch draws t_hat with the run's t_hat_mean and t_hat_std (16 x 256 draws: mean and
    std of logit(t_hat) within 0.05)."""
    t_hat = torch.cat([draw(step, batch_size=256, t_hat_mean=1.0, t_hat_std=0.5).t_hat
                       for step in range(16)])                               # [4096]
    mean, std = logit_stats(t_hat)
    assert mean == pytest.approx(1.0, abs=0.05) and std == pytest.approx(0.5, abs=0.05)


def test_draw_batch_is_a_pure_function_of_seed_and_step():
    """The same (seed, step) draws the same batch, whatever happened in between; another step or
    another seed draws another (other rows, times, levels, noises)."""
    fields = ("x0", "context", "pooled", "t", "t_hat", *NOISES, "paired")
    a = draw(3, seed=7)
    torch.randn(10)  # the global generator moves: draw_batch must not read it
    same = draw(3, seed=7)
    assert all(torch.equal(getattr(a, k), getattr(same, k)) for k in fields)
    for other in (draw(4, seed=7), draw(3, seed=8)):
        for k in ("x0", "t_hat", *NOISES):
            assert not torch.equal(getattr(a, k), getattr(other, k)), k


def test_draw_batch_three_noises_eps_eps_fake_eps_real_differ():
    """A drawn batch's three noises are separate draws: no two are equal in any row."""
    b = draw(0)
    for i, j in ((0, 1), (0, 2), (1, 2)):
        x, y = getattr(b, NOISES[i]), getattr(b, NOISES[j])                  # [B, C, h, w]
        assert ((x - y).flatten(1).abs().amax(1) > 0).all(), (NOISES[i], NOISES[j])


def test_draw_batch_no_row_paired_by_default():
    """With the default settings (pair_weight 0) no row is paired, though the t = 1 rows that the
    pairs add-on would pair are drawn."""
    batches = [draw(step, warmup=0) for step in range(4)]
    assert any((b.t == 1).any() for b in batches)
    assert not any(b.paired.any() for b in batches)


# ----------------------------------------------------------------------------------------------
# the add-ons stay off by default


def test_addons_default_settings_add_no_terms():
    """A default StepSettings adds no term to either loss (addons.student_terms / heads_terms
    return [])."""
    teacher, student, heads = tiny_models()
    b = tiny_batch()
    s = train_ladd.StepSettings()
    fake = noised(b.x0, b.eps_fake, b.t_hat)
    assert addons.student_terms(teacher, b.x0, fake, b, s) == []
    assert addons.heads_terms(heads, real_features_of(teacher, heads, b), b, s) == []


def test_stats_hold_only_the_plain_keys():
    """With default settings the steps report only plain LADD's statistics, no add-on's."""
    teacher, student, heads = tiny_models()
    b = tiny_batch()
    fake_features, stats = train_ladd.student_step(student, teacher, heads, sgd(student), b)
    assert set(stats) == {"student_loss", "student_grad_norm", "student_skipped"}
    stats = train_ladd.heads_step(teacher, heads, sgd(heads), b, fake_features)
    assert set(stats) == {"heads_loss", "heads_grad_norm", "heads_skipped", "logit_real", "logit_fake"}


# ----------------------------------------------------------------------------------------------
# the heads' equations (discriminator.py's docstring), on an opinionated head


def test_head_logit_is_its_five_equations_film_projection_and_t_hat_times_1000():
    """A head's logit by hand: c from 1000 t_hat and the pooled text; FiLM (1 + scale), shift
    in each residual block; the spatial mean of logit_out plus <mean h, proj_embed(c)> / sqrt."""
    from mmdit import timestep_embedding
    F = torch.nn.functional
    heads = perturb(Discriminator.for_teacher(CONFIG, [0], hidden=16), 3, 0.3)
    head = heads.heads["0"]
    assert heads.config["hidden"] == head.hidden == 16 and len(head.res_blocks) == 2
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, CONFIG.hidden_size, 4, 6, generator=g)                # [B, D, h, w]
    t_hat, pooled = torch.tensor([0.1, 0.5, 0.9]), torch.randn(3, CONFIG.pooled_dim, generator=g)
    c = F.silu(head.t_embedder(timestep_embedding(1000 * t_hat)) + head.y_embedder(pooled))
    h = head.x_in(x)                                                          # [B, hidden, h, w]
    for block in head.res_blocks:
        shift, scale = block.film(c)[:, :, None, None].chunk(2, dim=1)       # [B, hidden, 1, 1]
        h = h + block.conv(F.silu(block.norm(h) * (1 + scale) + shift))
    h = F.silu(head.norm_out(h))
    want = head.logit_out(h).mean((1, 2, 3)) + (h.mean((2, 3)) * head.proj_embed(c)).sum(1) / 4
    assert torch.allclose(heads([x], t_hat, pooled)[0], want, atol=1e-5)


def test_r1_is_the_squared_logit_change_under_sigma_noise_from_the_batchs_generator():
    """addons' R1: sum over heads of mean((D(F + 0.01 eps) - D(F))^2) / 0.01^2 on the real
    features, eps drawn from the step's generator (so a resumed run draws the same)."""
    teacher, student, heads = tiny_models()
    b = tiny_batch()
    b.generator = torch.Generator().manual_seed(11)
    real = real_features_of(teacher, heads, b)
    s = train_ladd.StepSettings(r1_weight=2.0)
    [(name, value, weight)] = addons.heads_terms(heads, real, b, s)
    g = torch.Generator().manual_seed(11)
    noisy = [f + 0.01 * torch.randn(f.shape, generator=g) for f in real]
    want = sum(((n - c) ** 2).mean() for n, c in zip(heads(noisy, b.t_hat, b.pooled),
                                                      heads(real, b.t_hat, b.pooled))) / 1e-4
    assert name == "r1" and weight == 1.0 and value.item() == pytest.approx(want.item(), rel=1e-4)


# ----------------------------------------------------------------------------------------------
# the add-ons, when switched on, see the step's own tensors


def test_addons_pair_loss_is_the_paired_rows_squared_error_over_the_whole_batch():
    """With pair_weight, the student step reports pair_loss: the mean squared error of this step's
    x0_hat against x0 on the paired rows, summed and divided by the batch size (by hand)."""
    teacher, student, heads = tiny_models()
    b = tiny_batch()
    b.paired = torch.tensor([True, False, True])
    error = ((x0_hat_by_hand(student, b) - b.x0) ** 2).mean(dim=(1, 2, 3))  # [B]
    want = ((error[0] + error[2]) / 3).item()
    _, stats = train_ladd.student_step(student, teacher, heads, sgd(student), b,
                                       train_ladd.StepSettings(grad_clip=INF, pair_weight=3.0))
    assert stats["pair_loss"] == pytest.approx(want, rel=1e-5) and want > 0


def test_addons_enter_the_student_loss_as_plus_weight_times_their_value():
    """The student's gradient with pairs of weight 3 is the plain LADD gradient plus 3 times the
    gradient of the pair loss (by hand, through the student's x0_hat)."""
    def gradient(pair_weight):
        teacher, student, heads = tiny_models()
        b = tiny_batch()
        b.paired = torch.tensor([True, False, True])
        train_ladd.student_step(student, teacher, heads, sgd(student), b,
                                train_ladd.StepSettings(grad_clip=INF, pair_weight=pair_weight))
        return grads_of(student)
    teacher, student, heads = tiny_models()
    b = tiny_batch()
    error = ((x0_hat_by_hand(student, b, grad=True) - b.x0) ** 2).mean(dim=(1, 2, 3))  # [B]
    ((error[0] + error[2]) / 3).backward()
    assert torch.allclose(gradient(3.0) - gradient(0.0), 3 * grads_of(student), atol=1e-5)


def test_addons_distill_loss_reads_the_steps_fake_and_the_teacher():
    """With a Distill, the student step reports |x0_hat - the guided teacher's x0 of the fake|^2,
    the teacher run on this step's fake batch at t_hat."""
    teacher, student, heads = tiny_models()
    b = tiny_batch()
    uncond = (torch.zeros(1, 5, CONFIG.context_dim), torch.zeros(1, CONFIG.pooled_dim))
    distill = addons.Distill(1.0, *uncond, cfg=2.0)
    x0_hat = x0_hat_by_hand(student, b)
    fake = noised(x0_hat, b.eps_fake, b.t_hat)
    with torch.no_grad():
        v = flow.cfg_velocity(teacher, fake, b.t_hat, b.context, b.pooled,
                              uncond[0].expand(3, -1, -1), uncond[1].expand(3, -1), 2.0)
    want = ((x0_hat - flow.x0_from_v(fake, v, b.t_hat)) ** 2).mean().item()
    _, stats = train_ladd.student_step(student, teacher, heads, sgd(student), b,
                                       train_ladd.StepSettings(grad_clip=INF, distill=distill))
    assert stats["distill_loss"] == pytest.approx(want, rel=1e-4)


# ----------------------------------------------------------------------------------------------
# the batch draw: its size, its generator, the pairs' steps, the inpainting channels


def test_draw_batch_batch_size_rows_for_the_student_times_and_t_hat():
    """draw_batch draws cfg.batch_size rows, and one t and one t_hat per row (batch 3: fewer rows
    than latent channels, so the row count cannot be confused with them)."""
    b = draw(0, batch_size=3)
    assert b.x0.shape[0] == b.t.shape[0] == b.t_hat.shape[0] == b.paired.shape[0] == 3
    assert b.paired.dtype == torch.bool


def test_draw_batch_carries_the_steps_generator_for_draws_inside_the_step():
    """Batch.generator is the step's generator, after the batch's draws: two draws of one step
    hand the steps the same generator state, and it is not the global one."""
    a, b = draw(2), draw(2)
    assert a.generator is not None and torch.equal(a.generator.get_state(), b.generator.get_state())
    assert not torch.equal(a.generator.get_state(), draw(3).generator.get_state())


def test_draw_batch_pairs_only_before_pair_steps_and_every_step_at_pair_steps_0():
    """The pairs add-on: with pair_steps 5, steps 0-4 may pair rows and step 5 on does not; with
    pair_steps 0 every step may."""
    def paired(step, pair_steps):
        return draw(step, warmup=0, pair_weight=1.0, pair_share=1.0, pair_steps=pair_steps).paired
    assert paired(4, 5).any() and not paired(5, 5).any()
    assert paired(5, 0).any() and paired(50, 0).any()


def test_draw_batch_known_channels_come_with_their_rows_and_reach_the_models_input():
    """An inpainting dataset's extra channels (mask and known latent) are drawn with their rows
    as Batch.known, and Batch.input appends them to what the models read."""
    rows = {k: torch.cat(v) for k, v in DATASET[(8, 8)].items()}
    rows["extra"] = torch.randn(len(rows["latents"]), 5, 2, 2)               # [n, 1 + C, h, w]
    dataset = {(8, 8): {k: list(torch.split(v, ladd_data.SHARD)) for k, v in rows.items()}}
    cfg = train_ladd.Config(batch_size=8)
    b = train_ladd.draw_batch(cfg, dataset, (TIMES, PROBS, WARM), 0, training.World(),
                              torch.device("cpu"))
    index = [int((rows["latents"] == x).flatten(1).all(1).nonzero()) for x in b.x0]
    assert torch.equal(b.known, rows["extra"][index])
    assert torch.equal(b.input(b.x0), torch.cat([b.x0, b.known], dim=1))


def test_t_hat_logit_normal_default_is_sd3s_0_1_and_std_0_is_a_constant():
    """flow.sample_t_logit_normal's defaults are SD3's training density logit-normal(0, 1); std 0
    is allowed and gives sigmoid(mean) every time."""
    mean, std = logit_stats(flow.sample_t_logit_normal(20000, generator=torch.Generator().manual_seed(1)))
    assert mean == pytest.approx(0.0, abs=0.03) and std == pytest.approx(1.0, abs=0.03)
    t = flow.sample_t_logit_normal(5, 0.5, 0.0, torch.Generator().manual_seed(0))
    assert torch.allclose(t, torch.sigmoid(torch.tensor(0.5)).expand(5))


def test_optimizer_lr_betas_and_no_weight_decay_are_what_the_run_asks():
    """training.make_optimizer: torch's AdamW (fp32 moments) with the lr and betas given and no
    weight decay, or with bf16 moments the project's AdamW with the same settings."""
    params = [torch.nn.Parameter(torch.ones(3))]
    opt = training.make_optimizer(params, 1e-5, (0.0, 0.99), torch.device("cpu"))
    assert type(opt) is torch.optim.AdamW
    group = opt.param_groups[0]
    assert (group["lr"], group["betas"], group["weight_decay"]) == (1e-5, (0.0, 0.99), 0.0)
    half = training.make_optimizer(params, 2e-5, (0.9, 0.99), torch.device("cpu"), "bf16")
    assert type(half) is training.AdamW and half.param_groups[0]["state_dtype"] == "bf16"
    assert (half.param_groups[0]["lr"], half.param_groups[0]["betas"]) == (2e-5, (0.9, 0.99))


def test_addons_r1_in_heads_step_reads_the_heads_real_features_and_the_steps_generator():
    """With r1_weight, heads_step reports R1 of its own heads on the real rows' features, with
    eps from the batch's generator (by hand), and adds r1_weight / 2 of it to the heads' loss."""
    teacher, student, heads = tiny_models()
    b = tiny_batch()
    fake_features, _ = train_ladd.student_step(student, teacher, heads, sgd(student), b)
    real = real_features_of(teacher, heads, b)
    g = torch.Generator().manual_seed(5)
    noisy = [f + 0.01 * torch.randn(f.shape, generator=g) for f in real]
    want = sum(((n - c) ** 2).mean() for n, c in zip(heads(noisy, b.t_hat, b.pooled),
                                                      heads(real, b.t_hat, b.pooled))) / 1e-4
    b.generator = torch.Generator().manual_seed(5)
    stats = train_ladd.heads_step(teacher, heads, sgd(heads), b, fake_features,
                                  train_ladd.StepSettings(grad_clip=INF, r1_weight=2.0))
    assert stats["r1"] == pytest.approx(want.item(), rel=1e-4)


def test_pairs_draw_only_t_1_rows_a_share_of_them_from_the_steps_generator():
    """addons.draw_pairs: only rows at t = 1 are paired; share 1 pairs all of them, share 0.5
    some; the draw comes from the given generator (the same generator state, the same rows)."""
    t = torch.tensor([1.0, 0.5, 1.0, 0.25] * 16)                            # [64]
    seeds = torch.arange(64)

    def pairs(share, seed):
        return addons.draw_pairs(t, torch.zeros(64, 4, 2, 2), seeds, share,
                                 torch.Generator().manual_seed(seed))
    assert torch.equal(pairs(1.0, 0), t == 1)
    half = pairs(0.5, 0)
    assert not half[t != 1].any() and 0 < half.sum() < (t == 1).sum()
    torch.randn(3)  # the global generator moves: the pairs must not read it
    assert torch.equal(pairs(0.5, 0), half) and not torch.equal(pairs(0.5, 1), half)


def test_autocast_bf16_casts_matmuls_and_fp32_leaves_them():
    """training.autocast(device, amp): bf16 autocast on that device (a name or a torch.device);
    fp32 means no autocast."""
    a = torch.randn(4, 4)
    for device in ("cpu", torch.device("cpu")):
        with training.autocast(device, torch.bfloat16):
            assert (a @ a).dtype == torch.bfloat16
        with training.autocast(device, torch.float32):
            assert (a @ a).dtype == torch.float32


def test_addons_enter_the_heads_loss_as_plus_weight_times_their_value():
    """The heads' gradient with R1 of weight 2 is the plain hinge gradient plus 2 / 2 times the
    gradient of R1 (the same noise: the batch's generator)."""
    def gradient(r1_weight):
        teacher, student, heads = tiny_models()
        b = tiny_batch()
        fake_features, _ = train_ladd.student_step(student, teacher, heads, sgd(student), b)
        b.generator = torch.Generator().manual_seed(5)
        train_ladd.heads_step(teacher, heads, sgd(heads), b, fake_features,
                              train_ladd.StepSettings(grad_clip=INF, r1_weight=r1_weight))
        return grads_of(heads)
    teacher, student, heads = tiny_models()
    b = tiny_batch()
    b.generator = torch.Generator().manual_seed(5)
    [(_, r1, _)] = addons.heads_terms(heads, real_features_of(teacher, heads, b), b,
                                      train_ladd.StepSettings(r1_weight=1.0))
    r1.backward()
    assert torch.allclose(gradient(2.0) - gradient(0.0), grads_of(heads), atol=1e-4)


def test_optimizer_with_bf16_moments_steps_like_torchs_adamw():
    """training.AdamW (the --optim-dtype bf16 optimizer) with fp32 moments makes torch's AdamW
    update (same eps, no weight decay); with bf16 moments it stores them in bf16."""
    g = torch.Generator().manual_seed(0)
    start, grads = torch.randn(6, generator=g), [torch.randn(6, generator=g) for _ in range(3)]

    def run(make):
        p = torch.nn.Parameter(start.clone())
        opt = make([p])
        for grad in grads:
            p.grad = grad.clone()
            opt.step()
        return p.detach(), opt
    ours, _ = run(lambda ps: training.AdamW(ps, lr=0.1, betas=(0.9, 0.99), state_dtype="fp32"))
    torchs, _ = run(lambda ps: torch.optim.AdamW(ps, lr=0.1, betas=(0.9, 0.99), weight_decay=0.0))
    assert torch.allclose(ours, torchs, atol=1e-6)
    _, half = run(lambda ps: training.AdamW(ps, lr=0.1, betas=(0.9, 0.99)))
    state = next(iter(half.state.values()))
    assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.bfloat16


def test_draw_batch_pairs_come_from_the_steps_generator():
    """With the pairs on, which rows are paired is part of step k's draw: the same whatever the
    global generator did in between (so a resumed run pairs the same rows)."""
    def paired():
        torch.randn(7)  # the global generator moves
        return draw(3, warmup=0, pair_weight=1.0, pair_share=0.5).paired
    a = paired()
    assert a.any() and torch.equal(a, paired())


def test_addons_distill_loss_of_an_inpainting_teacher_reads_the_known_channels():
    """ADD's distillation loss with an inpainting teacher: the guided teacher denoises the fake
    batch with the batch's known channels appended (by hand), as in the step itself."""
    import dataclasses
    config = dataclasses.replace(CONFIG, in_channels=2 * CONFIG.out_channels + 1)  # x | mask | z0
    teacher = perturb(mmdit.MMDiT(config), 0, 0.05).requires_grad_(False)
    b = tiny_batch()
    b.known = torch.randn(3, CONFIG.out_channels + 1, 8, 12, generator=torch.Generator().manual_seed(2))
    uncond = (torch.zeros(1, 5, CONFIG.context_dim), torch.zeros(1, CONFIG.pooled_dim))
    x0_hat = b.x0 + 0.1                                                      # [B, C, h, w]
    fake = noised(x0_hat, b.eps_fake, b.t_hat)
    got = addons.distillation_loss(teacher, x0_hat, fake, b, addons.Distill(1.0, *uncond, cfg=2.0))
    with torch.no_grad():
        x = torch.cat([fake, b.known], dim=1)
        cond = teacher(x, b.t_hat, b.context, b.pooled)
        free = teacher(x, b.t_hat, uncond[0].expand(3, -1, -1), uncond[1].expand(3, -1))
        v = free + 2.0 * (cond - free)
    want = ((x0_hat - (fake - b.t_hat.view(-1, 1, 1, 1) * v)) ** 2).mean()
    assert got.item() == pytest.approx(want.item(), rel=1e-4)
