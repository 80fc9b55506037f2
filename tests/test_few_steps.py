"""The add-ons for 1 and 2 steps (addons.py, docs/few_steps.md): consistency along the teacher's
path, distribution matching with an online fake score, and the t = 1 rows' shifted t_hat. Each
is off by default, reaches the student, keeps its target out of the gradient, enters linearly by
its weight, and (DMD) saves and resumes its own model exactly. Tiny models, fixed draws."""
import copy

import pytest
import torch

import addons
import flow
import ladd_data
import ladd_run
import mmdit
import train_ladd
import weights
from conftest import LADD_SAMPLER, expect_one_line_error, ladd_argv, make_checkpoint
from test_ladd_method import perturb, tiny_models  # the LADD step's tiny models
from test_train_ladd import tensors  # a training state's tensors by path

ONE_THREAD = True

CONFIG = mmdit.CONFIGS["test"]
TIMES = [1.0, 0.75, 0.5, 0.25]
INF = float("inf")


def tiny(seed=0):
    """Teacher (frozen), student (its copy), opinionated heads, a guide with guidance 2."""
    teacher, student, heads = tiny_models(seed)
    g = torch.Generator().manual_seed(seed + 2)
    guide = addons.Guide(torch.randn(1, 5, CONFIG.context_dim, generator=g),
                         torch.randn(1, CONFIG.pooled_dim, generator=g), 2.0)
    return teacher, student, heads, guide


def batch(seed=0, t=(1.0, 0.5, 0.25)):
    g = torch.Generator().manual_seed(seed)
    B = len(t)
    x0 = torch.randn(B, CONFIG.out_channels, 8, 12, generator=g)
    noise = {k: torch.randn(x0.shape, generator=g) for k in ("eps", "eps_fake", "eps_real")}
    return train_ladd.Batch(x0, torch.randn(B, 5, CONFIG.context_dim, generator=g),
                            torch.randn(B, CONFIG.pooled_dim, generator=g), torch.tensor(t),
                            flow.sample_t_logit_normal(B, 0.0, 1.0, g), **noise,
                            generator=torch.Generator().manual_seed(seed + 7))


def student_x0(student, b):
    x_t = flow.add_noise(b.x0, b.eps, b.t)
    return flow.x0_from_v(x_t, student(x_t, b.t, b.context, b.pooled), b.t)


def grads(module):
    return torch.cat([p.grad.flatten() for p in module.parameters() if p.grad is not None])


def step_grads(weight, kind, seed=0):
    """The student's gradient after one student_step (lr 0, no clipping) with one add-on at
    `weight`, and the step's statistics."""
    teacher, student, heads, guide = tiny(seed)
    s = train_ladd.StepSettings(grad_clip=INF)
    if kind == "consistency" and weight:
        s.consistency = addons.Consistency(weight, student, TIMES, guide)
    if kind == "dmd" and weight:
        s.dmd = addons.DMD(weight, teacher, guide)
    _, stats = train_ladd.student_step(student, teacher, heads,
                                       torch.optim.SGD(student.parameters(), lr=0.0), batch(), s)
    return grads(student).clone(), stats


# ----------------------------------------------------------------------------------------------
# off by default


def test_every_few_step_add_on_is_off_by_default():
    cfg, s = train_ladd.Config(), train_ladd.StepSettings()
    assert (cfg.consistency_weight, cfg.dmd_weight, cfg.one_step_t_hat_shift) == (0.0, 0.0, 1.0)
    assert s.consistency is None and s.dmd is None
    teacher, student, _, _ = tiny()
    b = batch()
    x0_hat = student_x0(student, b)
    assert addons.student_terms(teacher, x0_hat, b.x0, b, s) == []
    t_hat = torch.rand(3)
    assert torch.equal(addons.shift_one_step(b.t, t_hat, 1.0), t_hat)


def test_few_step_settings_are_none_when_off():
    cfg = train_ladd.Config()
    assert ladd_run.few_step_settings(cfg, None, None, None, (TIMES,), "cpu") == (None, None)


# ----------------------------------------------------------------------------------------------
# consistency


def test_next_times_follow_the_schedule_and_end_at_zero():
    t = torch.tensor([1.0, 0.75, 0.5, 0.25, 1.0])
    assert addons.next_times(t, TIMES).tolist() == [0.75, 0.5, 0.25, 0.0, 0.75]
    assert addons.next_times(torch.tensor([1.0, 0.5]), [1.0, 0.5]).tolist() == [0.5, 0.0]


def test_the_consistency_target_is_the_students_x0_at_the_guided_teachers_next_point():
    teacher, student, _, guide = tiny()
    b = batch()
    target, s = addons.consistency_target(teacher, b, addons.Consistency(1.0, student, TIMES, guide))
    assert s.tolist() == [0.75, 0.25, 0.0]
    with torch.no_grad():  # by hand: x_t, the guided velocity, one Euler step, the student there
        x_t = (1 - b.t.view(-1, 1, 1, 1)) * b.x0 + b.t.view(-1, 1, 1, 1) * b.eps
        cond = teacher(x_t, b.t, b.context, b.pooled)
        uncond = teacher(x_t, b.t, guide.uncond_context.expand(3, -1, -1),
                         guide.uncond_pooled.expand(3, -1))
        v = uncond + 2.0 * (cond - uncond)
        x_s = x_t + (s - b.t).view(-1, 1, 1, 1) * v
        expected = x_s - s.view(-1, 1, 1, 1) * student(x_s, s, b.context, b.pooled)
    torch.testing.assert_close(target, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(target[2], x_s[2])  # s = 0: the teacher's point itself


def test_the_consistency_target_gets_no_gradient():
    """The target is the student itself, read without gradient: the term's gradient on the
    student comes only through x0_hat, 2 (x0_hat - target) / N."""
    teacher, student, _, guide = tiny()
    b = batch()
    c = addons.Consistency(1.0, student, TIMES, guide)
    x0_hat = student_x0(student, b).detach().requires_grad_(True)
    loss = addons.consistency_loss(teacher, x0_hat, b, c)
    loss.backward()
    assert all(p.grad is None for p in student.parameters())  # nothing through the target
    target, _ = addons.consistency_target(teacher, b, c)
    torch.testing.assert_close(x0_hat.grad, 2 * (x0_hat - target).detach() / x0_hat.numel())


@pytest.mark.parametrize("kind", ["consistency", "dmd"])
def test_the_add_on_reaches_the_student_and_enters_linearly(kind):
    g0, _ = step_grads(0.0, kind)
    g1, stats1 = step_grads(1.0, kind)
    g3, stats3 = step_grads(3.0, kind)
    name = f"{kind}_loss"
    assert name in stats1 and name not in step_grads(0.0, kind)[1]
    assert stats1[name] == pytest.approx(stats3[name])  # logged unweighted
    assert (g1 - g0).abs().max() > 1e-6                 # the term moves the student's gradient
    torch.testing.assert_close(g3 - g0, 3 * (g1 - g0), rtol=1e-3, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# distribution matching


def test_dmd_pushes_x0_hat_along_the_normalised_score_difference():
    teacher, student, _, guide = tiny()
    b = batch()
    dmd = addons.DMD(1.0, teacher, guide)
    perturb(dmd.fake, 5, 0.02)  # a fake score unlike the teacher
    before = copy.deepcopy(dmd.fake)
    x0_hat = student_x0(student, b).detach().requires_grad_(True)
    fake = flow.add_noise(x0_hat, b.eps_fake, b.t_hat)
    addons.dmd_loss(teacher, x0_hat, fake, b, dmd).backward()
    with torch.no_grad():  # by hand, with the fake score as it was before its update
        noisy = fake.detach()
        t = b.t_hat.view(-1, 1, 1, 1)
        real = noisy - t * guide.velocity(teacher, noisy, b.t_hat, b.context, b.pooled)
        mine = noisy - t * before(noisy, b.t_hat, b.context, b.pooled)
        scale = (x0_hat - real).abs().mean(dim=(1, 2, 3), keepdim=True)
        expected = (mine - real) / scale / x0_hat.numel()
    torch.testing.assert_close(x0_hat.grad, expected, rtol=1e-4, atol=1e-9)


def test_dmd_is_zero_when_the_fake_score_is_the_unguided_teacher():
    teacher, student, _, guide = tiny()
    b = batch()
    dmd = addons.DMD(1.0, teacher, addons.Guide(guide.uncond_context, guide.uncond_pooled, 1.0))
    x0_hat = student_x0(student, b).detach()
    loss = addons.dmd_loss(teacher, x0_hat, flow.add_noise(x0_hat, b.eps_fake, b.t_hat), b, dmd)
    assert loss.item() < 1e-10


def test_the_fake_score_trains_on_the_students_samples_and_the_teacher_does_not():
    teacher, student, _, guide = tiny()
    dmd = addons.DMD(1.0, teacher, guide)
    teacher_before = copy.deepcopy(teacher.state_dict())
    fake_before = [p.detach().clone() for p in dmd.fake.parameters()]
    losses = []
    for k in range(4):
        b = batch(seed=k)
        x0 = student_x0(student, b).detach()
        losses.append(addons.train_fake_score(dmd, x0, b))
    assert all(p.requires_grad for p in dmd.fake.parameters())
    assert any(not torch.equal(a, p) for a, p in zip(fake_before, dmd.fake.parameters()))
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in teacher_before.items())
    assert not any(p.requires_grad for p in teacher.parameters())
    assert all(l == l for l in losses)  # finite
    # the step's generator drew the times and noise: the same generator state, the same update
    d1, d2 = addons.DMD(1.0, teacher, guide), addons.DMD(1.0, teacher, guide)
    for d in (d1, d2):
        b = batch(seed=9)
        addons.train_fake_score(d, student_x0(student, b).detach(), b)
    assert all(torch.equal(a, c) for a, c in zip(d1.fake.parameters(), d2.fake.parameters()))


def test_the_dmd_state_round_trips():
    teacher, student, _, guide = tiny()
    a = addons.DMD(1.0, teacher, guide)
    b = batch()
    addons.train_fake_score(a, student_x0(student, b).detach(), b)
    c = addons.DMD(1.0, teacher, guide)
    c.load_state_dict(a.state_dict())
    assert all(torch.equal(p, q) for p, q in zip(a.fake.parameters(), c.fake.parameters()))
    assert c.opt.state_dict()["state"].keys() == a.opt.state_dict()["state"].keys()


# ----------------------------------------------------------------------------------------------
# the shifted t_hat of the t = 1 rows


def test_the_shift_moves_only_the_one_step_rows_and_draws_nothing():
    t = torch.tensor([1.0, 0.75, 1.0, 0.25])
    t_hat = torch.tensor([0.5, 0.5, 0.9, 0.1])
    out = addons.shift_one_step(t, t_hat, 0.5)
    assert torch.equal(out[[1, 3]], t_hat[[1, 3]])
    torch.testing.assert_close(out[[0, 2]], 0.5 * t_hat[[0, 2]] / (1 - 0.5 * t_hat[[0, 2]]))
    assert (out[[0, 2]] < t_hat[[0, 2]]).all()  # < 1: lower noise


# ----------------------------------------------------------------------------------------------
# the trainer: options, the shift in draw_batch, DMD's state saved and resumed exactly


@pytest.fixture(scope="module")
def teacher_path(tmp_path_factory):
    return make_checkpoint(str(tmp_path_factory.mktemp("teacher")), LADD_SAMPLER)


def test_draw_batch_shifts_the_t_hat_of_the_t1_rows_only(teacher_path, tmp_path):
    base = train_ladd.Config(teacher=teacher_path, data_dir=str(tmp_path / "data"), data_size=12,
                             batch_size=4, out=str(tmp_path / "o"), judge_n=0)
    cfg, schedule = ladd_run.check_config(base)
    pipe = ladd_run.load_teacher(cfg, torch.device("cpu"), torch.float32)
    describe, take = ladd_data.prompt_source(cfg, pipe)
    data = ladd_data.build_dataset(cfg, pipe, describe, take, pipe.sizes, train_ladd.training.World())
    w = train_ladd.training.World()
    for step in range(40, 46):
        a = train_ladd.draw_batch(cfg, data, schedule, step, w, "cpu")
        shifted = cfg.__class__(**{**cfg.__dict__, "one_step_t_hat_shift": 0.4})
        b = train_ladd.draw_batch(shifted, data, schedule, step, w, "cpu")
        for k in ("x0", "t", "eps", "eps_fake", "eps_real"):
            assert torch.equal(getattr(a, k), getattr(b, k)), k
        torch.testing.assert_close(b.t_hat, addons.shift_one_step(a.t, a.t_hat, 0.4))


def test_a_dmd_run_saves_its_fake_score_and_resumes_exactly(teacher_path, tmp_path):
    whole, part = tmp_path / "whole", tmp_path / "part"
    extra = ("--dmd-weight", "2", "--consistency-weight", "1", "--one-step-t-hat-shift", "0.5")
    train_ladd.main(ladd_argv(teacher_path, whole, "--steps", "4", *extra))
    train_ladd.main(ladd_argv(teacher_path, part, "--steps", "2", *extra))
    train_ladd.main(["--resume", str(part), "--steps", "4"])
    a, b = weights.load_state(whole / "state.safetensors"), weights.load_state(part / "state.safetensors")
    assert "addon" in a and a["step"] == b["step"] == 4
    flat_a, flat_b = tensors(a), tensors(b)
    assert flat_a.keys() == flat_b.keys()
    assert any(k.startswith("/addon/fake/") for k in flat_a)
    assert any(k.startswith("/addon/opt/") for k in flat_a)
    for name in flat_a:
        assert torch.equal(flat_a[name], flat_b[name]), name
    fake = {k: v for k, v in flat_a.items() if k.startswith("/addon/fake/")}
    start = mmdit.MMDiT.from_pretrained(teacher_path).state_dict()
    assert any(not torch.equal(v, start[k[len("/addon/fake/"):]]) for k, v in fake.items())


def run_tensors(folder):
    """Every tensor a run folder holds: the student, its EMA (model) and the training state."""
    out = {f"student/{k}": v for k, v in weights.load_file(folder / "student.safetensors").items()}
    out.update({f"model/{k}": v for k, v in weights.load_file(folder / "model.safetensors").items()})
    out.update(tensors(weights.load_state(folder / "state.safetensors"), "state"))
    return out


def test_weight_0_is_plain_ladd_bit_for_bit(teacher_path, tmp_path, monkeypatch):
    """Asked for by name at weight 0 (shift 1), the add-ons leave the run what plain LADD makes
    with their code cut out: no term, no extra draw, no extra model."""
    zeros = ("--dmd-weight", "0", "--consistency-weight", "0", "--one-step-t-hat-shift", "1")
    train_ladd.main(ladd_argv(teacher_path, tmp_path / "zero", "--steps", "3", *zeros))
    train_ladd.main(ladd_argv(teacher_path, tmp_path / "dmd", "--steps", "3", "--dmd-weight", "1"))
    with monkeypatch.context() as m:
        m.setattr(ladd_run, "few_step_settings", lambda *args: (None, None))
        m.setattr(addons, "shift_one_step", lambda t, t_hat, shift: t_hat)
        train_ladd.main(ladd_argv(teacher_path, tmp_path / "plain", "--steps", "3"))
    zero, plain = run_tensors(tmp_path / "zero"), run_tensors(tmp_path / "plain")
    assert zero.keys() == plain.keys()
    for name in plain:
        assert torch.equal(zero[name], plain[name]), name
    dmd = run_tensors(tmp_path / "dmd")  # the comparison can fail: weight 1 moves the student
    assert any(not torch.equal(dmd[k], plain[k]) for k in plain if k.startswith("student/"))


@pytest.mark.parametrize("extra, words", [
    (("--consistency-weight", "-1"), "--consistency-weight"),
    (("--dmd-weight", "nan"), "--dmd-weight"),
    (("--one-step-t-hat-shift", "0"), "--one-step-t-hat-shift"),
])
def test_bad_values_are_refused(teacher_path, tmp_path, capsys, extra, words):
    expect_one_line_error(train_ladd.main, capsys, ladd_argv(teacher_path, tmp_path / "r", *extra),
                          words)


def test_consistency_and_dmd_refuse_inpainting(teacher_path, tmp_path, capsys):
    expect_one_line_error(train_ladd.main, capsys,
                          ladd_argv(teacher_path, tmp_path / "r", "--task", "inpaint",
                                    "--dmd-weight", "1"), "--dmd-weight", "text-to-image")
