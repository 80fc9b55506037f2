"""
The exercises' graders: a list of named checks per exercise, each run on the modules of the
student's copy (`m.flow`, `m.mmdit`, ... : see exercises.load). A check passes or raises an
AssertionError whose message names the quantity that is wrong, what was expected and, where one
is known, the usual cause. Three kinds of evidence:
- exact values worked out by hand from the formula in the exercise (hinge losses, noising),
- the project's own outputs on fixed inputs, stored in reference.safetensors (`expect`),
- properties that whole classes of mistakes break, rather than a list of wrong answers: every
  head and every loss term counts, the gradient reaches what it must and nothing else, dtypes
  and batch size 1 are kept, the inpainting batch works, the statistics the loop reads are right.
A grader never writes the answer itself: a copy holds no solution (tests/test_exercises.py).
"""

import dataclasses
import inspect
import math
import os
import re
import traceback
import warnings

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REFERENCE = os.path.join(HERE, "reference.safetensors")
CHECKS = {}  # exercise -> [(description, function(m, ref), usual cause of a crash or None)]


def check(exercise, description, crash_hint=None):
    def register(fn):
        CHECKS.setdefault(exercise, []).append((description, fn, crash_hint))
        return fn
    return register


class Reference:
    """expect(key, tensor): compare with the stored project output, or record it."""
    def __init__(self, exercise, m, record):
        self.exercise, self.record = exercise, record
        self.stored = None if record is not None else m.weights.load_file(REFERENCE)

    def expect(self, key, got, what, ulps=8, scale=None, hint=None):
        """Within `ulps` float32 rounding steps of the magnitudes involved: the stored output's
        largest value, or `scale` where an intermediate is larger (at least 1). Float32 sums and
        sin/cos differ between CPUs and math libraries: about 8 steps for an elementwise formula,
        1024 where a model runs (a few hundred rounded operations in a row)."""
        key = f"{self.exercise}/{key}"
        if torch.is_tensor(got):
            got = got.detach().float()
        if self.record is not None:
            self.record[key] = got.clone()
            want = got
        else:
            want = self.stored[key]
        magnitude = want.abs().max().item() if scale is None and want.numel() else scale or 0.0
        TOLERANCES[key] = atol = ulps * EPS * max(1.0, magnitude)
        if self.record is None:
            close(got, want, what, atol, hint)


EPS = torch.finfo(torch.float32).eps
TOLERANCES = {}  # reference key -> the tolerance its check allows (filled as checks run)
MODEL = 1024     # ulps allowed for an output that a model pass computes


def close(got, want, what, atol=1e-5, hint=None):
    want = torch.as_tensor(want, dtype=torch.float32)
    if not torch.is_tensor(got):
        raise AssertionError(f"{what}: got a {type(got).__name__}, want a tensor")
    if got.shape != want.shape:
        raise AssertionError(f"{what}: shape {list(got.shape)}, want {list(want.shape)}")
    err = (got.detach().float() - want).abs().max().item()
    if not err <= atol:  # also catches NaN
        raise AssertionError(f"{what}: off by up to {err:.3g} (tolerance {atol:g})"
                             + (f"; usual causes: {hint}" if hint else ""))


def model_tol(x):
    """What two float32 model passes that should agree may differ by (batch size and kernel
    changes reorder sums): MODEL rounding steps of the output's magnitude (at least 1)."""
    return MODEL * EPS * max(1.0, x.detach().abs().max().item())


def randn(*shape, seed, dtype=torch.float32):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


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
    root = os.path.dirname(os.path.abspath(m.flow.__file__))
    results = []
    for description, fn, crash_hint in CHECKS[exercise]:
        try:
            fn(m, ref)
            results.append((description, None))
        except NotImplementedError as e:
            results.append((description, not_written(exercise, e)))
        except AssertionError as e:
            results.append((description, str(e) or "wrong"))
        except Exception as e:  # a crash is a failed check, with where and why
            results.append((description, f"{type(e).__name__}: {e}{where(e, root)}"
                            + (f"; usual cause: {crash_hint}" if crash_hint else "")))
    return results


def not_written(exercise, error):
    """The stub's message names its exercise: say which one is missing."""
    owner = re.match(r"exercise (\S+):", str(error))
    if owner and owner.group(1) != exercise:
        return (f"this check runs the code of exercise {owner.group(1)}, not written yet: do it "
                f"first (python exercises/exercises.py grade {owner.group(1)})")
    return "not written yet (the stub raises NotImplementedError)"


def where(error, root):
    """' (at file.py line N, in function)' for the innermost frame in the project's own files."""
    frames = [f for f in traceback.extract_tb(error.__traceback__)
              if os.path.dirname(os.path.abspath(f.filename)) == root]
    if not frames:
        return ""
    f = frames[-1]
    return f" (at {os.path.basename(f.filename)} line {f.lineno}, in {f.name})"


def save_reference(tensors):
    import sys
    sys.path.insert(0, os.path.dirname(HERE))
    import weights
    weights.save_file(dict(sorted(tensors.items())), REFERENCE,
                      {"made_by": "python exercises/exercises.py record"})


def untouched(m, module, function, *args):
    """Call m.module.function(*args) and check that it left every argument as it was."""
    before = [x.clone() for x in args]
    getattr(getattr(m, module), function)(*args)
    for i, (x, y) in enumerate(zip(args, before)):
        assert torch.equal(x, y), (
            f"{function} changed its argument {i + 1} in place (an in-place op such as sub_, "
            f"mul_, masked_fill_ or +=): the caller still needs it, and autograd may too")


def refuses(call, what, why):
    """call() must raise a ValueError."""
    try:
        call()
    except ValueError:
        return
    raise AssertionError(f"{what} returned; want a ValueError ({why})")


def keeps_dtype(out, dtype, what):
    assert torch.is_tensor(out), f"{what}: got a {type(out).__name__}, want a tensor"
    assert out.dtype == dtype, (
        f"{what} returned {out.dtype}, want {dtype}: keep the inputs' dtype (LADD's data and "
        f"autocast run in bf16 / fp16; a float64 result fails at the model's first layer)")


# ----------------------------------------------------------------------------------------------
# flow-noising


@check("flow-noising", "add_noise: x_t = (1 - t) x0 + t eps at t = 0, 0.25, 1")
def _(m, ref):
    x0, eps = randn(2, 3, 4, 4, seed=0), randn(2, 3, 4, 4, seed=1)
    for t in (0.0, 0.25, 1.0):
        close(m.flow.add_noise(x0, eps, t), (1 - t) * x0 + t * eps,
              f"add_noise(x0, eps, {t}) should be {1 - t} x0 + {t} eps")


@check("flow-noising", "add_noise and x0_from_v: one t per sample (t [B]), batch size 1 too")
def _(m, ref):
    x0, eps = randn(2, 3, 4, 4, seed=0), randn(2, 3, 4, 4, seed=1)
    for t in (torch.tensor([0.1, 0.9]), torch.tensor([0.3])):
        rows = len(t)
        want = torch.stack([(1 - t[i]) * x0[i] + t[i] * eps[i] for i in range(rows)])
        got = m.flow.add_noise(x0[:rows], eps[:rows], t)
        close(got, want, f"add_noise with t = {t.tolist()}: sample i uses t[i] for all its values")
        close(m.flow.x0_from_v(want, eps[:rows] - x0[:rows], t), x0[:rows],
              f"x0_from_v(x_t, eps - x0, t = {t.tolist()}) should give x0 back")


@check("flow-noising", "velocity_target: v = eps - x0 = d x_t / dt")
def _(m, ref):
    x0, eps = randn(2, 3, 4, 4, seed=0), randn(2, 3, 4, 4, seed=1)
    close(m.flow.velocity_target(x0, eps), eps - x0, "velocity_target(x0, eps) should be eps - x0")


@check("flow-noising", "x0_from_v: x_t - t v gives x0 back (t a float)")
def _(m, ref):
    x0, eps = randn(2, 3, 4, 4, seed=0), randn(2, 3, 4, 4, seed=1)
    close(m.flow.x0_from_v(0.4 * x0 + 0.6 * eps, eps - x0, 0.6), x0,
          "x0_from_v(x_t, eps - x0, 0.6) should be x0")


@check("flow-noising", "the latents' dtype is kept (bf16, fp16, fp32; t a float or [B] in fp32 or fp64)")
def _(m, ref):
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        x0, eps = randn(2, 3, 4, 4, seed=0, dtype=dtype), randn(2, 3, 4, 4, seed=1, dtype=dtype)
        keeps_dtype(m.flow.velocity_target(x0, eps), dtype, f"velocity_target of {dtype} latents")
        for t in (0.25, torch.tensor([0.1, 0.9]), torch.tensor([0.1, 0.9], dtype=torch.float64)):
            kind = f"{t.dtype} t [B]" if torch.is_tensor(t) else "a float t"
            keeps_dtype(m.flow.add_noise(x0, eps, t), dtype, f"add_noise of {dtype} latents and {kind}")
            keeps_dtype(m.flow.x0_from_v(x0, eps, t), dtype, f"x0_from_v of {dtype} latents and {kind}")


@check("flow-noising", "the autograd graph is kept: d x_t / d x0 = 1 - t, d x_t / d eps = t, d x0_hat / d v = -t")
def _(m, ref):
    t = torch.tensor([0.25, 0.75])
    x0, eps = randn(2, 3, 4, 4, seed=0).requires_grad_(), randn(2, 3, 4, 4, seed=1).requires_grad_()
    out = m.flow.add_noise(x0, eps, t)
    assert torch.is_tensor(out) and out.requires_grad, (
        "add_noise's result has no autograd graph (a detach, .data or no_grad inside): LADD's "
        "student gradient flows through it")
    out.sum().backward()
    slope = t.view(-1, 1, 1, 1).expand_as(x0)
    close(x0.grad, 1 - slope, "d add_noise / d x0 (want 1 - t for sample i)")
    close(eps.grad, slope, "d add_noise / d eps (want t for sample i)")
    v = randn(2, 3, 4, 4, seed=2).requires_grad_()
    out = m.flow.x0_from_v(randn(2, 3, 4, 4, seed=3), v, t)
    assert torch.is_tensor(out) and out.requires_grad, "x0_from_v's result has no autograd graph"
    out.sum().backward()
    close(v.grad, -slope, "d x0_from_v / d v (want -t for sample i)")


@check("flow-noising", "the inputs are left as they were (no in-place edits)")
def _(m, ref):
    untouched(m, "flow", "add_noise", randn(2, 3, 4, 4, seed=0), randn(2, 3, 4, 4, seed=1),
              torch.tensor([0.25, 0.75]))
    untouched(m, "flow", "velocity_target", randn(2, 3, 4, 4, seed=0), randn(2, 3, 4, 4, seed=1))
    untouched(m, "flow", "x0_from_v", randn(2, 3, 4, 4, seed=0), randn(2, 3, 4, 4, seed=1),
              torch.tensor([0.25, 0.75]))


# ----------------------------------------------------------------------------------------------
# sd3-schedule


@check("sd3-schedule", "shift_t: s t / (1 + (s - 1) t) on floats and tensors; shift 1 changes nothing")
def _(m, ref):
    t = torch.tensor([0.0, 0.25, 0.5, 1.0])
    close(m.flow.shift_t(t, 3.0), [0.0, 0.5, 0.75, 1.0], "shift_t([0, 0.25, 0.5, 1], 3)")
    close(m.flow.shift_t(t, 1.0), t, "shift_t(t, 1) should be t")
    close(m.flow.shift_t(t, 0.5), [0.0, 0.142857, 1 / 3, 1.0], "shift_t([0, 0.25, 0.5, 1], 0.5)")
    got = m.flow.shift_t(0.5, 3.0)
    assert isinstance(got, float) and abs(got - 0.75) < 1e-9, (
        f"shift_t(0.5, 3.0) should be the float 0.75, got {got!r}")


@check("sd3-schedule", "sd3_sigmas(4, 3.0) = [1.0, 0.85769, 0.60215, 0.00893, 0.0] (SD3's)")
def _(m, ref):
    got = m.flow.sd3_sigmas(4, 3.0)
    assert isinstance(got, list) and len(got) == 5, f"want a list of 5 floats, got {got!r}"
    close(torch.tensor(got), [1.0, 0.85769, 0.60215, 0.00893, 0.0], "sd3_sigmas(4, 3.0)", 1e-5,
          "linspace(1, 0) instead of the table's ends; the shift applied once instead of twice")


@check("sd3-schedule", "the table's ends: shift 1 runs from 1 to 1/1000; one step is [1, 0]")
def _(m, ref):
    close(torch.tensor(m.flow.sd3_sigmas(2, 1.0)), [1.0, 0.001, 0.0], "sd3_sigmas(2, 1.0)", 1e-7,
          "the table is t = i / 1000 for i = 1..1000: its smallest value is 1/1000, not 0")
    close(torch.tensor(m.flow.sd3_sigmas(1, 3.0)), [1.0, 0.0], "sd3_sigmas(1, 3.0)", 0.0)
    last = m.flow.sd3_sigmas(1000, 3.0)[-2]
    assert abs(last - 0.00892857) < 1e-7, (
        f"sd3_sigmas(1000, 3.0)[-2] is {last:.8f}, want 0.00892857 = shift_t(shift_t(1/1000, 3), "
        f"3): the table's smallest entry, shifted again like every interpolated timestep")


@check("sd3-schedule", "steps + 1 Python floats, from exactly 1.0 down to exactly 0.0")
def _(m, ref):
    for steps, shift in ((1, 3.0), (3, 1.0), (7, 3.0), (50, 6.0)):
        got = m.flow.sd3_sigmas(steps, shift)
        assert isinstance(got, list) and len(got) == steps + 1, (
            f"sd3_sigmas({steps}, {shift}): want a list of {steps + 1} values, got {got!r:.80}")
        assert all(type(x) is float for x in got), (
            f"sd3_sigmas({steps}, {shift}): want Python floats (float(...)), got "
            f"{sorted({type(x).__name__ for x in got})}")
        assert got[0] == 1.0 and got[-1] == 0.0, (
            f"sd3_sigmas({steps}, {shift}) starts at {got[0]!r} and ends at {got[-1]!r}, want "
            f"1.0 and 0.0")
        assert all(a > b for a, b in zip(got, got[1:])), f"sd3_sigmas({steps}, {shift}) must decrease"


@check("sd3-schedule", "sd3_sigmas(28, 3.0) and sd3_sigmas(3, 1.0) equal the reference")
def _(m, ref):
    # float64 arithmetic (the docstring's) rounded to float32 is the same on every machine
    ref.expect("sigmas_28", torch.tensor(m.flow.sd3_sigmas(28, 3.0)), "sd3_sigmas(28, 3.0)", 1,
               hint="the timesteps not in float64")
    ref.expect("sigmas_3", torch.tensor(m.flow.sd3_sigmas(3, 1.0)), "sd3_sigmas(3, 1.0)", 1)


@check("sd3-schedule", "bad arguments: ValueError for steps 0, -1 or 2.5 and for shift 0 or -1")
def _(m, ref):
    for args in ((0, 3.0), (-1, 3.0), (2.5, 3.0), (4, 0.0), (4, -1.0)):
        refuses(lambda: m.flow.sd3_sigmas(*args), f"sd3_sigmas{args}", "see the docstring")


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
          0.75 * (x - v) + 0.25 * eps, "renoise from 1 to 0.25", hint="the noise level of s "
          "instead of s_next")


@check("renoise-sampler", "the last step (s_next = 0) returns the prediction x0_hat itself")
def _(m, ref):
    x, v = randn(2, 4, 3, 3, seed=0), randn(2, 4, 3, 3, seed=1)
    close(m.flow.sampler_step(x, v, 0.25, 0.0, "renoise", None), x - 0.25 * v,
          "renoise to 0 (no noise is passed)")


@check("renoise-sampler", "both samplers keep the latents' dtype (bf16, fp16)")
def _(m, ref):
    for dtype in (torch.bfloat16, torch.float16):
        x, v, eps = (randn(1, 4, 3, 3, seed=i, dtype=dtype) for i in range(3))
        keeps_dtype(m.flow.sampler_step(x, v, 0.75, 0.5, "euler"), dtype, f"euler on {dtype}")
        keeps_dtype(m.flow.sampler_step(x, v, 0.75, 0.5, "renoise", eps), dtype,
                    f"renoise on {dtype}")
        keeps_dtype(m.flow.sampler_step(x, v, 0.25, 0.0, "renoise"), dtype,
                    f"renoise to 0 on {dtype}")


# ----------------------------------------------------------------------------------------------
# timestep-embedding


@check("timestep-embedding", "dim 4: [cos t, cos t/100, sin t, sin t/100]")
def _(m, ref):
    t = torch.tensor([3.0, 123.456, 250.0])
    want = torch.stack([torch.cos(t), torch.cos(t / 100), torch.sin(t), torch.sin(t / 100)], 1)
    close(m.mmdit.timestep_embedding(t, dim=4), want, "timestep_embedding(t, dim=4)",
          8 * EPS * 250, "sines before cosines; frequencies over dim instead of half; t "
          "rounded (to fp16 or an integer) before the product")


@check("timestep-embedding", "dim 6 and max_period 100 change the frequencies as the docstring says")
def _(m, ref):
    t = torch.tensor([7.0])
    f = [10000 ** (-k / 3) for k in range(3)]
    want = torch.tensor([[math.cos(7 * x) for x in f] + [math.sin(7 * x) for x in f]])
    close(m.mmdit.timestep_embedding(t, dim=6), want, "timestep_embedding(7, dim=6)")
    want = torch.tensor([[math.cos(7.0), math.cos(0.7), math.sin(7.0), math.sin(0.7)]])
    close(m.mmdit.timestep_embedding(t, dim=4, max_period=100.0), want,
          "timestep_embedding(7, dim=4, max_period=100)", hint="max_period ignored (10000 "
          "written in)")


@check("timestep-embedding", "t = 0 gives ones (the cosines) then zeros (the sines)")
def _(m, ref):
    got = m.mmdit.timestep_embedding(torch.zeros(2), dim=256)
    close(got, torch.cat([torch.ones(2, 128), torch.zeros(2, 128)], 1), "timestep_embedding(0)")


@check("timestep-embedding", "float32 [B, dim] out for float64, bf16 and integer t; batch size 1")
def _(m, ref):
    for dtype in (torch.float64, torch.bfloat16, torch.int64):
        got = m.mmdit.timestep_embedding(torch.tensor([500], dtype=dtype), dim=8)
        keeps_dtype(got, torch.float32, f"timestep_embedding of a {dtype} t")
        assert got.shape == (1, 8), f"timestep_embedding of t [1], dim 8: shape {list(got.shape)}"


@check("timestep-embedding", "dim 256 at t = 0, 1, 500, 999.5 equals the reference")
def _(m, ref):
    ref.expect("emb", m.mmdit.timestep_embedding(torch.tensor([0.0, 1.0, 500.0, 999.5])),
               "timestep_embedding of [0, 1, 500, 999.5]", scale=1000)  # sin, cos of t f <= 1000


# ----------------------------------------------------------------------------------------------
# joint-attention


def _block(m, index):
    cfg = m.mmdit.CONFIGS["test"]                 # depth 3, D 32, 2 heads; block 0 is MMDiT-X
    block = randomize(m.mmdit.JointBlock(cfg, index), seed=10 + index, std=0.2)
    ctx, x, c = randn(2, 5, 32, seed=1), randn(2, 6, 32, seed=2), randn(2, 32, seed=3)
    return block, ctx, x, c


HINT_BLOCK = ("each stream attending alone; the text not first in the joint sequence or the "
              "split back at the wrong place; a stream's post_attention given the other's state")


@check("joint-attention", "a block's text and image outputs equal the reference (blocks 0, 1)")
def _(m, ref):
    for index in (0, 1):
        block, ctx, x, c = _block(m, index)
        out_ctx, out_x = block(ctx, x, c)
        ref.expect(f"ctx_{index}", out_ctx, f"block {index}'s text output", MODEL, hint=HINT_BLOCK)
        ref.expect(f"x_{index}", out_x, f"block {index}'s image output", MODEL, hint=HINT_BLOCK)


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
    ref.expect("x_last", out_x, "the last block's image output", MODEL, hint=HINT_BLOCK)


@check("joint-attention", "samples stay separate: batch size 1 gives the batch's first row")
def _(m, ref):
    for index in (0, 1, 2):
        block, ctx, x, c = _block(m, index)
        whole, one = block(ctx, x, c), block(ctx[:1], x[:1], c[:1])
        for k, what in ((1, "image"), (0, "text")):
            if whole[k] is None:
                continue
            assert one[k].shape == whole[k][:1].shape, (
                f"block {index}'s {what} output for one sample has shape {list(one[k].shape)}, "
                f"want {list(whole[k][:1].shape)}")
            close(one[k], whole[k][:1], f"block {index}'s {what} output for batch size 1 against "
                  f"the same sample in a batch of 2", model_tol(whole[k]), "concatenating along the batch "
                  "dimension instead of the token dimension (dim 1)")


# ----------------------------------------------------------------------------------------------
# discriminator-head


def _head(m, seed=20, zero=None):
    head = randomize(m.discriminator.DiscriminatorHead(feature_dim=16, pooled_dim=6, hidden=16),
                     seed=seed, std=0.2)
    if zero is not None:
        torch.nn.init.zeros_(getattr(head, zero).weight)
        torch.nn.init.zeros_(getattr(head, zero).bias)
    return head, randn(2, 16, 3, 5, seed=4), torch.tensor([0.2123, 0.7071]), randn(2, 6, seed=5)


@check("discriminator-head", "a fresh head says 0 (logit_out and proj_embed start at zero)")
def _(m, ref):
    head = m.discriminator.DiscriminatorHead(feature_dim=16, pooled_dim=6, hidden=16)
    _, x, t_hat, pooled = _head(m)
    close(head(x, t_hat, pooled), torch.zeros(2), "a fresh head's logits")


@check("discriminator-head", "the spatial-mean term alone (proj_embed zeroed) equals the reference")
def _(m, ref):
    head, x, t_hat, pooled = _head(m, zero="proj_embed")
    ref.expect("logits_local", head(x, t_hat, pooled), "the logit_out term (mean over space)",
               MODEL, hint="t_hat not multiplied by 1000 before timestep_embedding; c without the "
               "SiLU of t_embedder(...) + y_embedder(pooled); a res block skipped or not given "
               "c; SiLU(norm_out(h)) missing; a sum over space instead of the mean")


@check("discriminator-head", "the projection term alone (logit_out zeroed) equals the reference")
def _(m, ref):
    head, x, t_hat, pooled = _head(m, zero="logit_out")
    ref.expect("logits_proj", head(x, t_hat, pooled), "the projection term", MODEL,
               hint="not divided by sqrt(hidden); h before SiLU(norm_out); proj_embed applied to h "
               "instead of c; a sum instead of the mean over space")


@check("discriminator-head", "logits [B] equal the reference, on a non-square 3 x 5 map")
def _(m, ref):
    head, x, t_hat, pooled = _head(m)
    ref.expect("logits", head(x, t_hat, pooled), "the head's logits", MODEL)


@check("discriminator-head", "the logit reads the features, t_hat and the prompt")
def _(m, ref):
    head, x, t_hat, pooled = _head(m)
    base = head(x, t_hat, pooled)
    for what, args in (("the features", (x + 0.5, t_hat, pooled)),
                       ("t_hat", (x, t_hat.flip(0), pooled)),
                       ("the pooled text", (x, t_hat, pooled + 0.5))):
        assert (head(*args) - base).abs().max() > 1e-5, f"changing {what} left the logits unchanged"


@check("discriminator-head", "samples stay separate: batch size 1, and maps one token high",
       "a .squeeze() drops the batch dimension when B = 1 (or a spatial one on a 1-high map)")
def _(m, ref):
    head, x, t_hat, pooled = _head(m)
    for what, x in (("a 3 x 5 map", x), ("a 1 x 5 map", x[:, :, :1])):
        one = head(x[:1], t_hat[:1], pooled[:1])
        assert torch.is_tensor(one) and one.shape == (1,), (
            f"one sample's logits on {what} have shape {list(getattr(one, 'shape', []))}, want "
            f"[1]: a .squeeze() drops the batch dimension when B = 1")
        close(one, head(x, t_hat, pooled)[:1], f"one sample's logit on {what} against the same "
              f"sample in a batch of 2", model_tol(one), "a .squeeze() that drops the batch or a spatial "
              "dimension, so the mean runs over the wrong ones")


@check("discriminator-head", "inputs of the wrong shape: ValueError (check_inputs first)")
def _(m, ref):
    head, x, t_hat, pooled = _head(m)
    for what, args in (("t_hat [1] for 2 samples", (x, t_hat[:1], pooled)),
                       ("pooled [1, 6] for 2 samples", (x, t_hat, pooled[:1])),
                       ("features [2, 8, 3, 5]", (x[:, :8], t_hat, pooled))):
        refuses(lambda: head(*args), f"the head on {what}", "call self.check_inputs(x, t_hat, "
                "pooled) first: broadcasting would give a silently wrong answer")


@check("discriminator-head", "the student's gradient reaches the features through the head")
def _(m, ref):
    head, x, t_hat, pooled = _head(m)
    x.requires_grad_()
    logits = head(x, t_hat, pooled)
    assert logits.requires_grad, ("the logits have no autograd graph to the features (a detach or "
                                  "no_grad): the student learns through them")
    logits.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0, "no gradient reached the features"


# ----------------------------------------------------------------------------------------------
# hinge-losses

# three heads with batch sizes 1, 2 and 4 (no logit on a hinge's kink at -1 or 1); by hand:
# heads: 0.5 + 1 | 1 + 1 | (1 + 1) / 4 + (1 + 1.5 + .5) / 4, i.e. 1.5 + 2 + 1.25 = 4.75
# student: -(0 + (-2 + 1) / 2 + (-1.5 + 0 + .5 - .5) / 4) = 0.875
REAL = [[0.5], [2.0, -1.0], [0.0, 0.0, 3.0, 1.5]]
FAKE = [[0.0], [-2.0, 1.0], [-1.5, 0.0, 0.5, -0.5]]
GRAD_REAL = [[-1.0], [0.0, -0.5], [-0.25, -0.25, 0.0, 0.0]]    # d heads' loss / d real logits
GRAD_FAKE = [[1.0], [0.0, 0.5], [0.0, 0.25, 0.25, 0.25]]       # ... / d fake logits


def _logits(values):
    return [torch.tensor(v, requires_grad=True) for v in values]


@check("hinge-losses", "hinge_heads_loss by hand: real [2, 0.5], fake [-2, 0.5] -> 0.25 + 0.75")
def _(m, ref):
    got = m.discriminator.hinge_heads_loss([torch.tensor([2.0, 0.5])], [torch.tensor([-2.0, 0.5])])
    close(got, 1.0, "hinge_heads_loss([[2, 0.5]], [[-2, 0.5]]) = mean(relu(1 - real)) + "
                    "mean(relu(1 + fake))", hint="real and fake swapped; a sum over the batch "
                    "instead of the mean")


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


@check("hinge-losses", "every head counts: three heads of batch sizes 1, 2, 4 -> 4.75 and 0.875")
def _(m, ref):
    heads = m.discriminator.hinge_heads_loss(_logits(REAL), _logits(FAKE))
    student = m.discriminator.hinge_student_loss(_logits(FAKE))
    for what, got, want, first in (("hinge_heads_loss", heads, 4.75, 1.5),
                                   ("hinge_student_loss", student, 0.875, 0.0)):
        assert torch.is_tensor(got), f"{what} returned a {type(got).__name__}, want a tensor"
        value = got.item()
        assert abs(value - want) < 1e-6, (
            f"{what} of three heads (batch sizes 1, 2, 4) is {value:g}, want {want:g} (the sum of "
            f"the heads' terms, each a mean over its own batch)"
            + ("; it equals the first head's term alone: does the loop return early?"
               if abs(value - first) < 1e-6 else ""))


@check("hinge-losses", "a tensor with the autograd graph: exact gradients for each head's logits")
def _(m, ref):
    real, fake = _logits(REAL), _logits(FAKE)
    for what, loss, grads in (("hinge_heads_loss", m.discriminator.hinge_heads_loss(real, fake),
                               [(real, GRAD_REAL, "real"), (fake, GRAD_FAKE, "fake")]),
                              ("hinge_student_loss", m.discriminator.hinge_student_loss(fake),
                               [(fake, [[-1.0], [-0.5] * 2, [-0.25] * 4], "fake")])):
        assert torch.is_tensor(loss) and loss.requires_grad, (
            f"{what} returned {type(loss).__name__} without an autograd graph (a .item(), "
            f"float(), .detach() or no_grad): the players learn from its gradient")
        assert loss.dim() == 0, f"{what}: want a single number (0-dim), got shape {list(loss.shape)}"
        for tensors, _, _ in grads:
            for x in tensors:
                x.grad = None
        loss.backward()
        for tensors, want, kind in grads:
            for k, (x, w) in enumerate(zip(tensors, want)):
                assert x.grad is not None, f"{what}: head {k}'s {kind} logits got no gradient"
                close(x.grad, w, f"d {what} / d head {k}'s {kind} logits (a mean over its batch "
                                 f"of {len(w)})")


@check("hinge-losses", "ValueError for no heads and for unequal numbers of real and fake heads")
def _(m, ref):
    a = [torch.zeros(2)]
    for what, call in (("hinge_heads_loss([], [])", lambda: m.discriminator.hinge_heads_loss([], [])),
                       ("hinge_heads_loss(two heads, one head)",
                        lambda: m.discriminator.hinge_heads_loss(a + a, a)),
                       ("hinge_student_loss([])", lambda: m.discriminator.hinge_student_loss([]))):
        refuses(call, what, "see the docstring: zip() would silently drop a head")


# ----------------------------------------------------------------------------------------------
# inpainting-input


@check("inpainting-input", "known_channels: channel 0 the mask, then the known latent zeroed where repainted")
def _(m, ref):
    z0 = randn(2, 4, 3, 5, seed=0)
    mask = (randn(2, 1, 3, 5, seed=1) > 0).float()
    got = m.inpainting.known_channels(z0, mask)
    assert torch.is_tensor(got) and got.shape == (2, 5, 3, 5), (
        f"known_channels of a [2, 4, 3, 5] latent: want [2, 5, 3, 5], got "
        f"{list(getattr(got, 'shape', []))}")
    close(got[:, :1], mask, "channel 0 (the mask, 1 = repaint)")
    keep = mask.expand_as(z0) == 0
    close(got[:, 1:][keep], z0[keep], "the latent where the mask is 0 (known: kept)",
          hint="the region kept and zeroed swapped")
    close(got[:, 1:][~keep], torch.zeros(int((~keep).sum())), "the latent where the mask is 1 "
          "(repainted: zeroed)", hint="the region kept and zeroed swapped")


@check("inpainting-input", "with_known: x first, then the known channels; None: x alone")
def _(m, ref):
    x, known = randn(2, 4, 3, 5, seed=2), randn(2, 5, 3, 5, seed=3)
    got = m.inpainting.with_known(x, known)
    assert torch.is_tensor(got) and got.shape == (2, 9, 3, 5), (
        f"with_known of [2, 4, 3, 5] and [2, 5, 3, 5]: want [2, 9, 3, 5], got "
        f"{list(getattr(got, 'shape', []))}")
    close(got[:, :4], x, "channels 0-3 (x)", hint="the known channels put before x")
    close(got[:, 4:], known, "channels 4-8 (the known channels)")
    assert m.inpainting.with_known(x, None) is x, "with_known(x, None) should return x itself"


@check("inpainting-input", "dtypes: bf16 in, bf16 out; an fp32 x keeps its precision beside fp16 known channels")
def _(m, ref):
    z0, mask = randn(1, 4, 3, 3, seed=0, dtype=torch.bfloat16), torch.ones(1, 1, 3, 3, dtype=torch.bfloat16)
    keeps_dtype(m.inpainting.known_channels(z0, mask), torch.bfloat16, "known_channels of bf16 inputs")
    x = randn(1, 4, 3, 3, seed=1) / 3  # not exact in fp16
    got = m.inpainting.with_known(x, randn(1, 5, 3, 3, seed=2, dtype=torch.float16))
    keeps_dtype(got, torch.float32, "with_known of an fp32 x and fp16 known channels (as stored)")
    assert torch.equal(got[:, :4], x), "with_known changed x's values: never cast x down"


@check("inpainting-input", "the graph is kept: the student's gradient reaches x through with_known")
def _(m, ref):
    x = randn(1, 4, 3, 3, seed=1).requires_grad_()
    out = m.inpainting.with_known(x, randn(1, 5, 3, 3, seed=2))
    assert out.requires_grad, ("with_known's result has no autograd graph to x (a detach or "
                               "no_grad): inpainting LADD's student learns through it")
    out.sum().backward()
    close(x.grad, torch.ones_like(x), "d with_known / d x")


@check("inpainting-input", "the inputs are left as they were (no in-place edits)")
def _(m, ref):
    untouched(m, "inpainting", "known_channels", randn(2, 4, 3, 5, seed=0),
              (randn(2, 1, 3, 5, seed=1) > 0).float())
    untouched(m, "inpainting", "with_known", randn(2, 4, 3, 5, seed=2), randn(2, 5, 3, 5, seed=3))


@check("inpainting-input", "an inpainting MMDiT on [x | mask | known latent] gives the reference velocity")
def _(m, ref):
    cfg = m.mmdit.CONFIGS["test"]
    model = randomize(m.mmdit.MMDiT(dataclasses.replace(cfg, in_channels=9)), seed=40, std=0.05)
    x, z0 = randn(1, 4, 8, 8, seed=4), randn(1, 4, 8, 8, seed=5)
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., :4] = 1
    t, ctx, y = torch.tensor([0.5]), randn(1, 3, cfg.context_dim, seed=6), randn(1, cfg.pooled_dim, seed=7)
    ref.expect("inpaint_v", model(m.inpainting.with_known(x, m.inpainting.known_channels(z0, mask)),
                                  t, ctx, y), "an inpainting model's velocity", MODEL)


# ----------------------------------------------------------------------------------------------
# student-step

HINT_STEP = ("the fake batch built from b.eps or b.t instead of b.eps_fake and b.t_hat; x0_hat "
             "or the fake batch detached; the teacher run under no_grad; the loss not the "
             "student hinge loss of ALL the heads' logits")
CRASH_STEP = ("'does not require grad': the loss has no graph to the student (x0_hat or the "
              "fake batch detached, the teacher under no_grad, a hinge loss without a graph); "
              "a size mismatch: the student and the teacher read b.input(x), x with an "
              "inpainting batch's known channels; 'feature maps for N heads': the teacher's "
              "features of the heads' blocks only, teacher.features(..., heads.blocks)")


def _ladd(m, rows=3, inpaint=False, blocks=None):
    """A tiny teacher (random weights), its copy as the student, heads with an opinion, a batch
    (an inpainting one: 9 input channels and b.known)."""
    cfg = m.mmdit.CONFIGS["test"]
    if inpaint:
        cfg = dataclasses.replace(cfg, in_channels=9)
    teacher = randomize(m.mmdit.MMDiT(cfg), seed=30, std=0.05).requires_grad_(False)
    student = m.mmdit.MMDiT(cfg)
    student.load_state_dict(teacher.state_dict())
    disc = randomize(m.discriminator.Discriminator.for_teacher(cfg, blocks, hidden=16), seed=31,
                     std=0.1)
    g = torch.Generator().manual_seed(32)
    x0 = torch.randn(3, 4, 8, 12, generator=g)
    batch = m.train_ladd.Batch(
        x0, torch.randn(3, 5, cfg.context_dim, generator=g), torch.randn(3, cfg.pooled_dim, generator=g),
        torch.tensor([1.0, 0.5, 0.25]), torch.tensor([0.3, 0.5, 0.9]),
        *(torch.randn(x0.shape, generator=g) for _ in range(3)))
    if inpaint:
        mask = (torch.rand(3, 1, 8, 12, generator=g) > 0.5).float()
        batch.known = torch.cat([mask, torch.randn(3, 4, 8, 12, generator=g) * (1 - mask)], 1)
    for name in ("x0", "context", "pooled", "t", "t_hat", "eps", "eps_fake", "eps_real", "known"):
        value = getattr(batch, name)
        setattr(batch, name, None if value is None else value[:rows])
    batch.paired = torch.zeros(rows, dtype=torch.bool)
    return teacher, student, disc, batch


def _params(module):
    return {k: v.detach().clone() for k, v in module.named_parameters()}


def _grad(module):
    return torch.cat([p.grad.flatten() for p in module.parameters() if p.grad is not None])


def _step(m, settings=None, lr=0.0, batch_change=None, weight_decay=0.0, **kwargs):
    """One student_step on fresh tiny models -> (student, heads, stats, features, before)."""
    teacher, student, disc, batch = _ladd(m, **kwargs)
    if batch_change:
        batch_change(batch)
    before = _params(student)
    opt = torch.optim.SGD(student.parameters(), lr=lr, weight_decay=weight_decay)
    run = settings if settings is not None else m.train_ladd.StepSettings()
    features, stats = m.train_ladd.student_step(student, teacher, disc, opt, batch, run)
    assert isinstance(stats, dict), f"student_step returned {type(stats).__name__} statistics, want a dict"
    return student, disc, stats, features, before


def _settings(m, **kwargs):
    return m.train_ladd.StepSettings(**{"grad_clip": float("inf"), **kwargs})


@check("student-step", "the student moves; the teacher and the heads do not", CRASH_STEP)
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


@check("student-step", "the heads are frozen during the step (no .grad) and trainable after it", CRASH_STEP)
def _(m, ref):
    teacher, student, disc, batch = _ladd(m)
    m.train_ladd.student_step(student, teacher, disc, torch.optim.SGD(student.parameters(), lr=0.1),
                              batch)
    with_grad = [k for k, p in disc.named_parameters() if p.grad is not None]
    assert not with_grad, (
        f"the heads got gradients ({with_grad[0]}, ...): freeze them (requires_grad_(False)) "
        f"before the student's forward pass; they only judge in this step")
    assert all(p.requires_grad for p in disc.parameters()), (
        "the heads are still frozen after the step: turn requires_grad back on, heads_step "
        "trains them next")
    assert not any(p.grad is not None for p in teacher.parameters()), "the teacher got gradients"


@check("student-step", "the gradient flows through the frozen teacher into the student", CRASH_STEP)
def _(m, ref):
    def grad(scale):
        teacher, student, disc, batch = _ladd(m)
        with torch.no_grad():
            teacher.joint_blocks[0].x_block.mlp.fc2.weight.mul_(scale)
        opt = torch.optim.SGD(student.parameters(), lr=0.0)
        m.train_ladd.student_step(student, teacher, disc, opt, batch)
        return _grad(student)
    a, b = grad(1.0), grad(2.0)
    assert a.abs().sum() > 0, "the student got no gradient"
    assert not torch.allclose(a, b), ("the student's gradient does not depend on the teacher: "
                                      "it must be the heads' verdict back-propagated through it")


@check("student-step", "every head's fake logits get the gradient -1/B (B = 3 and 1): the hinge loss of all heads", CRASH_STEP)
def _(m, ref):
    for rows in (3, 1):
        teacher, student, disc, batch = _ladd(m, rows)
        seen = {b: [] for b in disc.blocks}
        def spy(block):
            def hook(module, args, out):
                if torch.is_tensor(out) and out.requires_grad:
                    seen[block].append(out)
                    out.register_hook(lambda g: seen[block].append(g.detach().clone()))
            return hook
        hooks = [disc.heads[str(b)].register_forward_hook(spy(b)) for b in disc.blocks]
        try:
            _, stats = m.train_ladd.student_step(student, teacher, disc,
                                                 torch.optim.SGD(student.parameters(), lr=0.0), batch)
        finally:
            for h in hooks:
                h.remove()
        for k, block in enumerate(disc.blocks):
            grads = [x for x in seen[block][1:] if not x.requires_grad]
            assert seen[block], (f"head {k} (block {block}) never judged the fake batch with a graph "
                                 f"to the student: the heads' logits must come from the teacher's "
                                 f"features of x0_hat re-noised, with autograd")
            assert grads, f"head {k}'s logits got no gradient: every head's verdict enters the loss"
            close(sum(grads), torch.full((rows,), -1.0 / rows), f"batch size {rows}: d loss / d head "
                  f"{k}'s logits (want -1/B: the student's hinge loss is -(sum over heads of "
                  f"mean(fake logits)))")
        want = -sum(seen[b][0].mean() for b in disc.blocks).item()
        got = stats.get("student_loss")
        assert isinstance(got, float) and abs(got - want) <= 1e-5 * max(1.0, abs(want)), (
            f"stats['student_loss'] is {got!r}, want the hinge loss {want:.6g} as a float (.item())")


def _spy(m, rows=3, inpaint=False, blocks=None, settings=None):
    """One student_step with every call to the student, the teacher's features and the heads
    recorded: (batch, heads, {"student": [(args, output, autocast on)], "teacher": ..., "heads": ...})."""
    teacher, student, disc, batch = _ladd(m, rows, inpaint, blocks)
    calls = {"student": [], "teacher": [], "heads": []}
    def record(kind, module):
        def hook(mod, args, kwargs, out=None):
            bound = inspect.signature(module.forward).bind(*args, **kwargs).arguments
            calls[kind].append((bound, out, torch.is_autocast_enabled("cpu")))
        return hook
    student.register_forward_hook(record("student", student), with_kwargs=True)
    disc.register_forward_pre_hook(record("heads", disc), with_kwargs=True)
    features = teacher.features
    def spy_features(*args, **kwargs):
        bound = inspect.signature(features).bind(*args, **kwargs).arguments
        calls["teacher"].append((bound, None, torch.is_autocast_enabled("cpu")))
        return features(*args, **kwargs)
    teacher.features = spy_features
    terms = m.addons.student_terms
    def spy_terms(*args, **kwargs):
        calls["add-ons"].append((inspect.signature(terms).bind(*args, **kwargs).arguments, None, None))
        return terms(*args, **kwargs)
    m.addons.student_terms, calls["add-ons"] = spy_terms, []
    run = settings if settings is not None else m.train_ladd.StepSettings()
    try:
        m.train_ladd.student_step(student, teacher, disc,
                                  torch.optim.SGD(student.parameters(), lr=0.0), batch, run)
    finally:
        m.addons.student_terms = terms
    for kind in calls:
        assert calls[kind], f"student_step never called the {kind}"
    return batch, disc, calls


def _same(got, want, what):
    got = got.detach().float() if torch.is_tensor(got) else got
    assert torch.is_tensor(got) and got.shape == want.shape, (
        f"{what}: shape {list(getattr(got, 'shape', []))}, want {list(want.shape)}")
    close(got, want, what, 8 * EPS * max(1.0, want.abs().max().item()))


@check("student-step", "what each model reads: the student x_t at t, the teacher the fake batch at t_hat, the heads t_hat", CRASH_STEP)
def _(m, ref):
    for inpaint in (False, True):
        batch, disc, calls = _spy(m, inpaint=inpaint, blocks=[0, 2])
        kind = "an inpainting batch: " if inpaint else ""
        (args, v, _), C = calls["student"][0], batch.x0.shape[1]
        t, t_hat = batch.t.view(-1, 1, 1, 1), batch.t_hat.view(-1, 1, 1, 1)
        x_t = (1 - t) * batch.x0 + t * batch.eps
        _same(args["x"][:, :C], x_t, f"{kind}the student's input (want x_t = (1 - t) x0 + t eps "
              f"of b.x0, b.eps, b.t)")
        if inpaint:
            _same(args["x"][:, C:], batch.known, f"{kind}the student's extra channels (b.input)")
        for name, want in (("t", batch.t), ("context", batch.context), ("y", batch.pooled)):
            _same(args[name], want, f"{kind}the student's argument {name} (want b.{dict(t='t', context='context', y='pooled')[name]})")
        x0_hat = x_t - t * v.float()
        args = calls["teacher"][0][0]
        _same(args["x"][:, :C], (1 - t_hat) * x0_hat + t_hat * batch.eps_fake, f"{kind}what the "
              f"teacher judges (want the fake batch (1 - t_hat) x0_hat + t_hat eps_fake, "
              f"x0_hat = x_t - t v)")
        if inpaint:
            _same(args["x"][:, C:], batch.known, f"{kind}the teacher's extra channels (b.input)")
        for name, want in (("t", batch.t_hat), ("context", batch.context), ("y", batch.pooled)):
            _same(args[name], want, f"{kind}the teacher's argument {name} (want b.{dict(t='t_hat', context='context', y='pooled')[name]})")
        assert list(args.get("blocks") or []) == disc.blocks, (
            f"the teacher's features were taken at blocks {args.get('blocks')}, want the heads' "
            f"blocks {disc.blocks}")
        fake = args["x"]
        args = calls["add-ons"][0][0]
        _same(args["x0_hat"], x0_hat, f"{kind}the x0_hat given to addons.student_terms")
        _same(args["fake"], fake[:, :C], f"{kind}the fake batch given to addons.student_terms")
        assert args["batch"] is batch, "addons.student_terms must get the step's batch b"
        args = calls["heads"][0][0]
        _same(args["t_hat"], batch.t_hat, f"{kind}the heads' noise levels (want b.t_hat)")
        _same(args["pooled"], batch.pooled, f"{kind}the heads' pooled text (want b.pooled)")


@check("student-step", "stats: student_loss, student_grad_norm (before clipping) and student_skipped", CRASH_STEP)
def _(m, ref):
    student, _, stats, _, _ = _step(m, _settings(m))
    keys = {"student_loss", "student_grad_norm", "student_skipped"}
    assert keys <= set(stats), f"stats has {sorted(stats)}, want (at least) {sorted(keys)}"
    for key, value in stats.items():
        assert type(value) in (int, float), (
            f"stats[{key!r}] is a {type(value).__name__}, want a Python number (.item(), int()): "
            f"the loop logs and averages them")
    full = _grad(student).norm().item()
    assert abs(stats["student_grad_norm"] - full) <= 1e-4 * full, (
        f"stats['student_grad_norm'] is {stats['student_grad_norm']!r}, want the norm of the "
        f"student's whole gradient, {full:.6g} (what training.clip_grad_norm returns)")
    assert stats["student_skipped"] == 0, "stats['student_skipped'] should be 0 for a finite step"
    student, _, stats, _, _ = _step(m, _settings(m, grad_clip=1e-3))
    clipped = _grad(student).norm().item()
    assert abs(clipped - 1e-3) <= 1e-6, (
        f"with grad_clip 1e-3 the gradient's norm at opt.step is {clipped:.3g}: clip it with "
        f"training.clip_grad_norm(student.parameters(), s.grad_clip) before the step")
    assert abs(stats["student_grad_norm"] - full) <= 1e-4 * full, (
        "stats['student_grad_norm'] must be the norm before clipping")


@check("student-step", "a non-finite loss skips the update (student_skipped 1, the student unchanged)", CRASH_STEP)
def _(m, ref):
    def nan_row(b):
        b.x0[0, 0, 0, 0] = float("nan")
    student, _, stats, _, before = _step(m, lr=0.1, batch_change=nan_row)
    changed = [k for k, p in student.named_parameters() if not torch.equal(p, before[k])]
    assert not changed, (f"a NaN in the batch changed the student ({changed[0]}, ...): call "
                         f"opt.step() only when the clipped gradient's norm is finite")
    assert stats.get("student_skipped") == 1, (
        f"stats['student_skipped'] is {stats.get('student_skipped')!r} after a NaN step, want 1")


class _BadGradient(torch.autograd.Function):
    """0 on the way forward; a NaN (or a huge: its norm overflows) gradient on the way back."""
    @staticmethod
    def forward(ctx, x, bad):
        ctx.shape, ctx.bad = x.shape, bad
        return x.sum() * 0

    @staticmethod
    def backward(ctx, grad):
        return torch.full(ctx.shape, ctx.bad), None


@check("student-step", "a finite loss with a NaN or inf gradient skips too; the heads trainable after", CRASH_STEP)
def _(m, ref):
    real = m.addons.student_terms
    try:
        for bad, what in ((float("nan"), "NaN"), (1e30, "inf")):
            m.addons.student_terms = lambda teacher, x0_hat, *rest: [
                ("bad", _BadGradient.apply(x0_hat, bad), 1.0)]
            # weight decay: any opt.step() moves the student, even with a gradient clipped to 0
            student, disc, stats, _, before = _step(m, lr=0.1, weight_decay=0.1)
            assert all(p.requires_grad for p in disc.parameters()), (
                "after a skipped step the heads are still frozen: turn them back on in every case")
            assert not math.isfinite(stats.get("student_grad_norm", 0.0)), (
                f"stats['student_grad_norm'] is {stats.get('student_grad_norm')!r}, want {what}")
            changed = [k for k, p in student.named_parameters() if not torch.equal(p, before[k])]
            assert not changed, (
                f"a gradient of norm {what} (the loss finite) changed the student ({changed[0]}, "
                f"...): step only when torch.isfinite(norm), the clipped gradient's norm")
            assert stats.get("student_skipped") == 1, (
                f"stats['student_skipped'] is {stats.get('student_skipped')!r} after a gradient "
                f"of norm {what}, want 1")
    finally:
        m.addons.student_terms = real


@check("student-step", "old gradients are cleared: the update ignores what .grad held before", CRASH_STEP)
def _(m, ref):
    def stale(student):
        for p in student.parameters():
            p.grad = torch.full_like(p, 100.0)
    teacher, student, disc, batch = _ladd(m)
    stale(student)
    before = _params(student)
    m.train_ladd.student_step(student, teacher, disc, torch.optim.SGD(student.parameters(), lr=0.1),
                              batch)
    clean, _, _, _, _ = _step(m, lr=0.1)
    for (k, p), q in zip(student.named_parameters(), clean.parameters()):
        assert torch.allclose(p, q, atol=1e-6), (
            f"{k}: the update differs when .grad held old values: opt.zero_grad() before "
            f"backward (a step's gradient is its own)")
    assert before  # (the stale values were in place)


@check("student-step", "loss, features and the student's update equal the reference", CRASH_STEP)
def _(m, ref):
    student, disc, stats, features, before = _step(m, lr=0.1)
    assert isinstance(features, (list, tuple)) and len(features) == len(disc.blocks), (
        f"return one feature map per head ({len(disc.blocks)}), as a list")
    assert all(not f.requires_grad and f.dtype == torch.float32 for f in features), (
        "return the features detached, in fp32: the heads' step judges them next")
    ref.expect("student_loss", torch.tensor(stats["student_loss"]), "stats['student_loss']", MODEL,
               hint=HINT_STEP)
    ref.expect("features", torch.stack([f.mean((1, 2, 3)) for f in features]),
               "the fake features' means", MODEL, hint=HINT_STEP)
    step = torch.stack([(p - before[k]).norm() for k, p in student.named_parameters()])
    ref.expect("update", step, "the size of the student's update, per parameter", MODEL,
               hint=HINT_STEP)


@check("student-step", "each add-on term joins the loss as weight * value, its value in stats[name]", CRASH_STEP)
def _(m, ref):
    seen = []
    def probe(weight):
        def terms(teacher, x0_hat, fake, batch, settings):
            value = x0_hat.float().pow(2).mean()
            seen.append(value.item())
            return [("probe", value, weight)]
        return terms
    real = m.addons.student_terms
    runs = {}
    try:
        for weight in (0.0, 1.0, 2.0):
            m.addons.student_terms = probe(weight)
            student, _, stats, _, _ = _step(m, _settings(m))
            runs[weight] = (_grad(student), stats)
    finally:
        m.addons.student_terms = real
    assert seen, ("addons.student_terms was never called: loop over addons.student_terms(teacher, "
                  "x0_hat, fake, b, s) and add weight * value for each (name, value, weight)")
    (g0, s0), (g1, s1), (g2, s2) = runs[0.0], runs[1.0], runs[2.0]
    for stats, value, weight in ((s1, seen[1], 1), (s2, seen[2], 2)):
        assert stats.get("probe") == value, (
            f"with weight {weight}, stats['probe'] is {stats.get('probe')!r}, want the term's "
            f"unweighted value {value:.6g}")
    assert not torch.allclose(g1, g0), (
        "the student's gradient is the same for the term's weights 0 and 1: add weight * value "
        "to the loss for each (name, value, weight) of addons.student_terms")
    assert torch.allclose(g2 - g0, 2 * (g1 - g0), atol=1e-6, rtol=1e-3), (
        "the gradient is not linear in the term's weight: the loss must add weight * value "
        "(not value alone, nor a fixed factor)")
    assert abs(s1["student_loss"] - s0["student_loss"]) < 1e-6, (
        "stats['student_loss'] changed with an add-on term: it is the hinge loss alone (the "
        "terms are reported under their own names)")


@check("student-step", "the real add-ons: DMD's pairs and ADD's distillation loss, each at its weight", CRASH_STEP)
def _(m, ref):
    def pairs(b):
        b.paired = torch.tensor([True, False, False])
    cfg = m.mmdit.CONFIGS["test"]
    distill = lambda w: m.addons.Distill(w, torch.zeros(1, 5, cfg.context_dim),  # noqa: E731
                                         torch.zeros(1, cfg.pooled_dim), 2.0)
    for name, settings in (("pair_loss", lambda w: _settings(m, pair_weight=w)),
                           ("distill_loss", lambda w: _settings(m, distill=distill(w)))):
        grads, stats = [], []
        for w in (0.0, 1.0, 3.0):
            student, _, s, _, _ = _step(m, settings(w), batch_change=pairs)
            grads.append(_grad(student))
            stats.append(s)
        assert name in stats[1], f"with the {name} add-on on, stats has no {name!r}: {sorted(stats[1])}"
        assert torch.allclose(grads[2] - grads[0], 3 * (grads[1] - grads[0]), atol=1e-6, rtol=1e-3) \
            and not torch.allclose(grads[1], grads[0]), (
            f"the student's gradient is not weight * the {name} term's: pass the step's "
            f"settings to addons.student_terms and add weight * value for every term it returns")


@check("student-step", "an inpainting batch: the known channels reach the student and the teacher", CRASH_STEP)
def _(m, ref):
    _, _, a, _, _ = _step(m, inpaint=True)
    def other_known(b):
        b.known = b.known.flip(0)
    _, _, b, _, _ = _step(m, inpaint=True, batch_change=other_known)
    assert a["student_loss"] != b["student_loss"], (
        "other known channels gave the same loss: the student and the teacher must read "
        "b.input(x_t) and b.input(fake)")


@check("student-step", "batch size 1, and bf16 autocast (s.amp) around the forward passes", CRASH_STEP)
def _(m, ref):
    _, disc, _, features, _ = _step(m, rows=1)
    assert [tuple(f.shape) for f in features] == [(1, 32, 4, 6)] * len(disc.blocks), (
        f"one sample's features: {[list(f.shape) for f in features]}, want [1, 32, 4, 6] each")
    _, _, fp32, _, _ = _step(m)
    with warnings.catch_warnings():  # torch notes that bf16 rms_norm has no fused CPU kernel
        warnings.simplefilter("ignore")
        _, _, bf16, features, _ = _step(m, m.train_ladd.StepSettings(amp=torch.bfloat16))
        _, _, calls = _spy(m, settings=m.train_ladd.StepSettings(amp=torch.bfloat16))
    for kind, seen in calls.items():
        assert kind == "add-ons" or all(on for _, _, on in seen), (
            f"the {kind} ran outside autocast: every forward pass of the step runs under "
            f"training.autocast(b.x0.device, s.amp)")
    assert all(f.dtype == torch.float32 for f in features), "return the features in fp32 (.float())"
    assert fp32["student_loss"] != bf16["student_loss"], (
        "with s.amp = bfloat16 the loss is the fp32 one: run the forward passes under "
        "training.autocast(b.x0.device, s.amp)")
    assert math.isfinite(bf16["student_loss"]), "the bf16 loss is not finite"
