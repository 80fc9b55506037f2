"""
The exercises' graders: a list of named checks per exercise, each run on the modules of the
student's copy (`m.flow`, `m.mmdit`, ... : see exercises.load). A check passes or raises an
AssertionError whose message says what is wrong. Three kinds of evidence:
- exact values worked out by hand from the formula in the exercise (hinge losses, noising),
- the project's own outputs on fixed inputs, stored in reference.safetensors (`expect`),
- properties that the typical wrong answers break (text must reach the image tokens, the
  gradient must reach the student through the frozen teacher).
"""

import dataclasses
import os

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REFERENCE = os.path.join(HERE, "reference.safetensors")
CHECKS = {}  # exercise -> [(description, function(m, ref))]


def check(exercise, description):
    def register(fn):
        CHECKS.setdefault(exercise, []).append((description, fn))
        return fn
    return register


class Reference:
    """expect(key, tensor): compare with the stored project output, or record it."""
    def __init__(self, exercise, m, record):
        self.exercise, self.record = exercise, record
        self.stored = None if record is not None else m.weights.load_file(REFERENCE)

    def expect(self, key, got, what, atol=1e-5):
        key = f"{self.exercise}/{key}"
        TOLERANCES[key] = atol
        got = got.detach().float()
        if self.record is not None:
            self.record[key] = got.clone()
            return
        want = self.stored[key]
        close(got, want, what, atol)


TOLERANCES = {}  # reference key -> the tolerance its check allows (filled as checks run)


def close(got, want, what, atol=1e-5):
    want = torch.as_tensor(want, dtype=torch.float32)
    if not torch.is_tensor(got):
        raise AssertionError(f"{what}: got a {type(got).__name__}, want a tensor")
    if got.shape != want.shape:
        raise AssertionError(f"{what}: shape {list(got.shape)}, want {list(want.shape)}")
    err = (got.float() - want).abs().max().item()
    if not err <= atol:  # also catches NaN
        raise AssertionError(f"{what}: off by up to {err:.3g} (tolerance {atol:g})")


def randn(*shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def randomize(module, seed, std=0.3):
    """Every parameter drawn from a seeded normal: zero-initialised layers would hide mistakes."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return module


def run(exercise, m, record=None):
    """-> [(description, None if it passed else what is wrong)]."""
    ref = Reference(exercise, m, record)
    results = []
    for description, fn in CHECKS[exercise]:
        try:
            fn(m, ref)
            results.append((description, None))
        except NotImplementedError:
            results.append((description, "not written yet (the stub raises NotImplementedError)"))
        except AssertionError as e:
            results.append((description, str(e) or "wrong"))
        except Exception as e:  # a crash is a failed check, with its reason
            results.append((description, f"{type(e).__name__}: {e}"))
    return results


def save_reference(tensors):
    import sys
    sys.path.insert(0, os.path.dirname(HERE))
    import weights
    weights.save_file(dict(sorted(tensors.items())), REFERENCE,
                      {"made_by": "python exercises/exercises.py record"})


# ----------------------------------------------------------------------------------------------
# flow-noising


@check("flow-noising", "add_noise: x_t = (1 - t) x0 + t eps at t = 0, 0.25, 1")
def _(m, ref):
    x0, eps = randn(2, 3, 4, 4, seed=0), randn(2, 3, 4, 4, seed=1)
    for t in (0.0, 0.25, 1.0):
        close(m.flow.add_noise(x0, eps, t), (1 - t) * x0 + t * eps,
              f"add_noise(x0, eps, {t}) should be {1 - t} x0 + {t} eps")


@check("flow-noising", "add_noise: one t per sample, t [B] broadcast over C, H, W")
def _(m, ref):
    x0, eps, t = randn(2, 3, 4, 4, seed=0), randn(2, 3, 4, 4, seed=1), torch.tensor([0.1, 0.9])
    want = torch.stack([(1 - t[i]) * x0[i] + t[i] * eps[i] for i in range(2)])
    close(m.flow.add_noise(x0, eps, t), want, "add_noise with t = [0.1, 0.9]: sample i uses t[i]")


@check("flow-noising", "velocity_target: v = eps - x0 = d x_t / dt")
def _(m, ref):
    x0, eps = randn(2, 3, 4, 4, seed=0), randn(2, 3, 4, 4, seed=1)
    close(m.flow.velocity_target(x0, eps), eps - x0, "velocity_target(x0, eps) should be eps - x0")


@check("flow-noising", "x0_from_v: x_t - t v gives x0 back")
def _(m, ref):
    x0, eps, t = randn(2, 3, 4, 4, seed=0), randn(2, 3, 4, 4, seed=1), torch.tensor([0.3, 0.8])
    x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * eps
    close(m.flow.x0_from_v(x_t, eps - x0, t), x0, "x0_from_v(x_t, eps - x0, t) should be x0",
          atol=1e-5)


# ----------------------------------------------------------------------------------------------
# sd3-schedule


@check("sd3-schedule", "shift_t: s t / (1 + (s - 1) t); shift 1 changes nothing")
def _(m, ref):
    t = torch.tensor([0.0, 0.25, 0.5, 1.0])
    close(m.flow.shift_t(t, 3.0), 3 * t / (1 + 2 * t), "shift_t(t, 3)")
    close(m.flow.shift_t(t, 1.0), t, "shift_t(t, 1) should be t")
    assert abs(m.flow.shift_t(0.5, 3.0) - 0.75) < 1e-9, "shift_t(0.5, 3.0) should be 0.75"


@check("sd3-schedule", "sd3_sigmas(4, 3.0) = [1.0, 0.85769, 0.60215, 0.00893, 0.0] (SD3's)")
def _(m, ref):
    got = m.flow.sd3_sigmas(4, 3.0)
    assert isinstance(got, list) and len(got) == 5, f"want a list of 5 floats, got {got!r}"
    close(torch.tensor(got), [1.0, 0.85769, 0.60215, 0.00893, 0.0], "sd3_sigmas(4, 3.0)", 1e-5)


@check("sd3-schedule", "sd3_sigmas(28, 3.0) and sd3_sigmas(3, 1.0) equal the reference")
def _(m, ref):
    ref.expect("sigmas_28", torch.tensor(m.flow.sd3_sigmas(28, 3.0)), "sd3_sigmas(28, 3.0)")
    ref.expect("sigmas_3", torch.tensor(m.flow.sd3_sigmas(3, 1.0)), "sd3_sigmas(3, 1.0)")


# ----------------------------------------------------------------------------------------------
# timestep-embedding


@check("timestep-embedding", "dim 4: [cos t, cos t/100, sin t, sin t/100]")
def _(m, ref):
    t = torch.tensor([3.0, 250.0])
    want = torch.stack([torch.cos(t), torch.cos(t / 100), torch.sin(t), torch.sin(t / 100)], 1)
    close(m.mmdit.timestep_embedding(t, dim=4), want, "timestep_embedding(t, dim=4)")


@check("timestep-embedding", "t = 0 gives ones (the cosines) then zeros (the sines)")
def _(m, ref):
    got = m.mmdit.timestep_embedding(torch.zeros(2), dim=256)
    close(got, torch.cat([torch.ones(2, 128), torch.zeros(2, 128)], 1), "timestep_embedding(0)")


@check("timestep-embedding", "dim 256 at t = 0, 1, 500, 999.5 equals the reference")
def _(m, ref):
    ref.expect("emb", m.mmdit.timestep_embedding(torch.tensor([0.0, 1.0, 500.0, 999.5])),
               "timestep_embedding of [0, 1, 500, 999.5]", atol=1e-4)


# ----------------------------------------------------------------------------------------------
# joint-attention


def _block(m, index):
    cfg = m.mmdit.CONFIGS["test"]                 # depth 3, D 32, 2 heads; block 0 is MMDiT-X
    block = randomize(m.mmdit.JointBlock(cfg, index), seed=10 + index, std=0.2)
    ctx, x, c = randn(2, 5, 32, seed=1), randn(2, 6, 32, seed=2), randn(2, 32, seed=3)
    return block, ctx, x, c


@check("joint-attention", "a block's text and image outputs equal the reference (blocks 0, 1)")
def _(m, ref):
    for index in (0, 1):
        block, ctx, x, c = _block(m, index)
        out_ctx, out_x = block(ctx, x, c)
        ref.expect(f"ctx_{index}", out_ctx, f"block {index}'s text output", atol=1e-4)
        ref.expect(f"x_{index}", out_x, f"block {index}'s image output", atol=1e-4)


@check("joint-attention", "one attention: text tokens reach the image tokens and back")
def _(m, ref):
    block, ctx, x, c = _block(m, 1)
    ctx2, x2 = ctx.clone(), x.clone()
    ctx2[:, 0] = randn(2, 32, seed=8)  # (a constant shift would vanish in the LayerNorm)
    x2[:, 0] = randn(2, 32, seed=9)
    base = block(ctx, x, c)
    assert (block(ctx2, x, c)[1] - base[1]).abs().max() > 1e-4, (
        "changing a text token left every image token's output unchanged: text and image must "
        "attend to each other in ONE attention over both streams' tokens")
    assert (block(ctx, x2, c)[0][:, 1:] - base[0][:, 1:]).abs().max() > 1e-4, (
        "changing an image token left the text outputs unchanged: the text stream must read the "
        "joint attention's output for its own tokens")


@check("joint-attention", "the last block: None for the pre-only text, the reference image output")
def _(m, ref):
    block, ctx, x, c = _block(m, 2)
    out_ctx, out_x = block(ctx, x, c)
    assert out_ctx is None, "the last block's text stream is pre-only: return None for it"
    ref.expect("x_last", out_x, "the last block's image output", atol=1e-4)


# ----------------------------------------------------------------------------------------------
# discriminator-head


def _head(m, seed=20):
    head = randomize(m.discriminator.DiscriminatorHead(feature_dim=16, pooled_dim=6, hidden=16),
                     seed=seed, std=0.2)
    return head, randn(2, 16, 3, 5, seed=4), torch.tensor([0.2, 0.7]), randn(2, 6, seed=5)


@check("discriminator-head", "a fresh head says 0 (logit_out and proj_embed start at zero)")
def _(m, ref):
    head = m.discriminator.DiscriminatorHead(feature_dim=16, pooled_dim=6, hidden=16)
    _, x, t_hat, pooled = _head(m)
    close(head(x, t_hat, pooled), torch.zeros(2), "a fresh head's logits")


@check("discriminator-head", "logits [B] equal the reference, on a non-square 3 x 5 map")
def _(m, ref):
    head, x, t_hat, pooled = _head(m)
    ref.expect("logits", head(x, t_hat, pooled), "the head's logits", atol=1e-4)


@check("discriminator-head", "the logit reads the features, t_hat and the prompt")
def _(m, ref):
    head, x, t_hat, pooled = _head(m)
    base = head(x, t_hat, pooled)
    for what, args in (("the features", (x + 0.5, t_hat, pooled)),
                       ("t_hat", (x, t_hat.flip(0), pooled)),
                       ("the pooled text", (x, t_hat, pooled + 0.5))):
        assert (head(*args) - base).abs().max() > 1e-5, f"changing {what} left the logits unchanged"


# ----------------------------------------------------------------------------------------------
# hinge-losses


@check("hinge-losses", "hinge_heads_loss by hand: real [2, 0.5], fake [-2, 0.5] -> 0.25 + 0.75")
def _(m, ref):
    got = m.discriminator.hinge_heads_loss([torch.tensor([2.0, 0.5])], [torch.tensor([-2.0, 0.5])])
    close(got, 1.0, "hinge_heads_loss([[2, 0.5]], [[-2, 0.5]]) = mean(relu(1 - real)) + "
                    "mean(relu(1 + fake))")


@check("hinge-losses", "summed over heads; zero once real >= 1 and fake <= -1")
def _(m, ref):
    r, f = [torch.tensor([0.0]), torch.tensor([3.0])], [torch.tensor([0.0]), torch.tensor([-3.0])]
    close(m.discriminator.hinge_heads_loss(r, f), 2.0, "two heads: 2 for the first, 0 for the second")
    close(m.discriminator.hinge_heads_loss([torch.tensor([1.0, 5.0])], [torch.tensor([-1.0, -7.0])]),
          0.0, "confident, correct heads")


@check("hinge-losses", "hinge_student_loss = -sum over heads of mean(fake): the student raises them")
def _(m, ref):
    got = m.discriminator.hinge_student_loss([torch.tensor([1.0, 3.0]), torch.tensor([-1.0, 0.0])])
    close(got, -1.5, "hinge_student_loss([[1, 3], [-1, 0]]) = -(2 + -0.5)")


@check("hinge-losses", "the heads' gradient raises real logits and lowers fake ones")
def _(m, ref):
    r, f = torch.tensor([0.0], requires_grad=True), torch.tensor([0.0], requires_grad=True)
    m.discriminator.hinge_heads_loss([r], [f]).backward()
    assert r.grad.item() < 0 < f.grad.item(), (
        f"d loss / d real = {r.grad.item():g}, d loss / d fake = {f.grad.item():g}: descending "
        "the loss must raise real logits and lower fake ones")


# ----------------------------------------------------------------------------------------------
# student-step


def _ladd(m):
    """A tiny teacher (random weights), its copy as the student, heads with an opinion."""
    cfg = m.mmdit.CONFIGS["test"]
    teacher = randomize(m.mmdit.MMDiT(cfg), seed=30, std=0.05).requires_grad_(False)
    student = m.mmdit.MMDiT(cfg)
    student.load_state_dict(teacher.state_dict())
    disc = randomize(m.discriminator.Discriminator.for_teacher(cfg, hidden=16), seed=31, std=0.1)
    g = torch.Generator().manual_seed(32)
    x0 = torch.randn(3, 4, 8, 12, generator=g)
    batch = m.train_ladd.Batch(
        x0, torch.randn(3, 5, cfg.context_dim, generator=g), torch.randn(3, cfg.pooled_dim, generator=g),
        torch.tensor([1.0, 0.5, 0.25]), torch.tensor([0.3, 0.5, 0.9]),
        *(torch.randn(x0.shape, generator=g) for _ in range(3)))
    return teacher, student, disc, batch


def _params(module):
    return {k: v.detach().clone() for k, v in module.named_parameters()}


@check("student-step", "the student moves; the teacher and the heads do not")
def _(m, ref):
    teacher, student, disc, batch = _ladd(m)
    before = [_params(x) for x in (teacher, student, disc)]
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    m.train_ladd.student_step(student, teacher, disc, opt, batch)
    moved = [sum(not torch.equal(p, b[k]) for k, p in x.named_parameters())
             for x, b in zip((teacher, student, disc), before)]
    assert moved[1] > 0, ("the student did not move: its loss must come from the heads' verdict "
                          "on the teacher's features of its x0_hat, with autograd on all the way")
    assert moved[0] == 0, "the teacher changed: it is frozen"
    assert moved[2] == 0, "the heads changed: only the student is updated in this step"
    assert all(p.requires_grad for p in disc.parameters()), (
        "the heads are frozen only during the step: turn requires_grad back on for them")


@check("student-step", "the gradient flows through the frozen teacher into the student")
def _(m, ref):
    def grad(scale):
        teacher, student, disc, batch = _ladd(m)
        with torch.no_grad():
            teacher.joint_blocks[0].x_block.mlp.fc2.weight.mul_(scale)
        opt = torch.optim.SGD(student.parameters(), lr=0.0)
        m.train_ladd.student_step(student, teacher, disc, opt, batch)
        return torch.cat([p.grad.flatten() for p in student.parameters() if p.grad is not None])
    a, b = grad(1.0), grad(2.0)
    assert a.abs().sum() > 0, "the student got no gradient"
    assert not torch.allclose(a, b), ("the student's gradient does not depend on the teacher: "
                                      "it must be the heads' verdict back-propagated through it")


@check("student-step", "loss, features and the student's update equal the reference")
def _(m, ref):
    teacher, student, disc, batch = _ladd(m)
    before = _params(student)
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    features, stats = m.train_ladd.student_step(student, teacher, disc, opt, batch)
    assert len(features) == len(disc.blocks), f"want {len(disc.blocks)} feature maps"
    assert all(not f.requires_grad and f.dtype == torch.float32 for f in features), (
        "return the features detached, in fp32: the heads' step judges them next")
    ref.expect("student_loss", torch.tensor(stats["student_loss"]), "stats['g_loss']", atol=1e-4)
    ref.expect("features", torch.stack([f.mean((1, 2, 3)) for f in features]),
               "the fake features' means", atol=1e-4)
    step = torch.stack([(p - before[k]).norm() for k, p in student.named_parameters()])
    ref.expect("update", step, "the size of the student's update, per parameter", atol=1e-4)


@check("student-step", "with run.pair_weight, the paired rows' squared error joins the loss")
def _(m, ref):
    def step(pair_weight):
        teacher, student, disc, batch = _ladd(m)
        batch.paired = torch.tensor([True, False, False])
        opt = torch.optim.SGD(student.parameters(), lr=0.0)  # lr 0: p.grad is all that changes
        run = m.train_ladd.StepSettings(grad_clip=float("inf"), pair_weight=pair_weight)
        _, stats = m.train_ladd.student_step(student, teacher, disc, opt, batch, run)
        grad = torch.cat([p.grad.flatten() for p in student.parameters() if p.grad is not None])
        with torch.no_grad():
            x_t = m.flow.add_noise(batch.x0, batch.eps, batch.t)
            x0_hat = m.flow.x0_from_v(x_t, student(x_t, batch.t, batch.context, batch.pooled), batch.t)
        return stats, grad, m.addons.pair_loss(x0_hat, batch.x0, batch.paired).item()
    (stats, with_pairs, want), (_, without, _) = step(3.0), step(0.0)
    assert "pair_loss" in stats, "with run.pair_weight, report stats['pair_loss']"
    assert abs(stats["pair_loss"] - want) <= 1e-5 * max(1.0, want), (
        f"stats['pair_loss'] is {stats['pair_loss']:.6g}, want pair_loss(x0_hat, x0, paired) = "
        f"{want:.6g}")
    assert not torch.allclose(with_pairs, without), (
        "the student's gradient is the same with and without the pairs: add run.pair_weight * "
        "pair_loss(...) to the loss that student_step back-propagates")


# ----------------------------------------------------------------------------------------------
# renoise-sampler


@check("renoise-sampler", "euler: x + (s_next - s) v")
def _(m, ref):
    x, v = randn(2, 4, 3, 3, seed=0), randn(2, 4, 3, 3, seed=1)
    close(m.flow.sampler_step(x, v, 0.75, 0.5, "euler"), x - 0.25 * v, "euler from 0.75 to 0.5")


@check("renoise-sampler", "renoise: (1 - s_next)(x - s v) + s_next eps")
def _(m, ref):
    x, v, eps = randn(2, 4, 3, 3, seed=0), randn(2, 4, 3, 3, seed=1), randn(2, 4, 3, 3, seed=2)
    close(m.flow.sampler_step(x, v, 0.75, 0.5, "renoise", eps),
          0.5 * (x - 0.75 * v) + 0.5 * eps, "renoise from 0.75 to 0.5")
    close(m.flow.sampler_step(x, v, 1.0, 0.25, "renoise", eps),
          0.75 * (x - v) + 0.25 * eps, "renoise from 1 to 0.25")


@check("renoise-sampler", "the last step (s_next = 0) returns the prediction x0_hat itself")
def _(m, ref):
    x, v = randn(2, 4, 3, 3, seed=0), randn(2, 4, 3, 3, seed=1)
    close(m.flow.sampler_step(x, v, 0.25, 0.0, "renoise", None), x - 0.25 * v,
          "renoise to 0 (no noise is passed)")


# ----------------------------------------------------------------------------------------------
# inpainting-input


@check("inpainting-input", "known_channels: [mask | known latent zeroed where repainted]")
def _(m, ref):
    z0 = randn(2, 4, 3, 5, seed=0)
    mask = (randn(2, 1, 3, 5, seed=1) > 0).float()
    got = m.inpainting.known_channels(z0, mask)
    close(got, torch.cat([mask, z0 * (1 - mask)], 1), "known_channels(z0, mask)")


@check("inpainting-input", "with_known: x first, then the known channels; None: x alone")
def _(m, ref):
    x, known = randn(2, 4, 3, 5, seed=2), randn(2, 5, 3, 5, seed=3)
    close(m.inpainting.with_known(x, known), torch.cat([x, known], 1), "with_known(x, known)")
    assert m.inpainting.with_known(x, None) is x, "with_known(x, None) should return x itself"


@check("inpainting-input", "an inpainting MMDiT on [x | mask | known latent] gives the reference velocity")
def _(m, ref):
    cfg = m.mmdit.CONFIGS["test"]
    model = randomize(m.mmdit.MMDiT(dataclasses.replace(cfg, in_channels=9)), seed=40, std=0.05)
    x, z0 = randn(1, 4, 8, 8, seed=4), randn(1, 4, 8, 8, seed=5)
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., :4] = 1
    t, ctx, y = torch.tensor([0.5]), randn(1, 3, cfg.context_dim, seed=6), randn(1, cfg.pooled_dim, seed=7)
    ref.expect("inpaint_v", model(m.inpainting.with_known(x, m.inpainting.known_channels(z0, mask)),
                                  t, ctx, y), "an inpainting model's velocity", atol=1e-4)
