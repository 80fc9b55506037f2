"""LoRA students: the frozen teacher plus adapters, sharing the teacher's tensors."""
import os

import pytest
import torch

import lora
import mmdit
import sample
import train_ladd
import training
import weights
from conftest import LADD_SAMPLER, PROMPTS, expect_one_line_error, ladd_argv, make_checkpoint, read_png
from discriminator import Discriminator
from pipeline import load_pipeline

ONE_THREAD = True


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return make_checkpoint(str(tmp_path_factory.mktemp("teacher")), LADD_SAMPLER)


def ladd(teacher, out, *extra):
    return ladd_argv(teacher, out, "--lora", "4", *extra)


def inputs(config, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, config.in_channels, 8, 12, generator=g), torch.rand(2, generator=g),
            torch.randn(2, 5, config.context_dim, generator=g),
            torch.randn(2, config.pooled_dim, generator=g))


def trained_adapters(student, seed=1):
    with torch.no_grad():  # what training would leave: B no longer zero
        g = torch.Generator().manual_seed(seed)
        for _, m in lora.layers(student):
            m.lora_B.copy_(0.1 * torch.randn(m.lora_B.shape, generator=g))
    return student


def test_a_fresh_student_is_the_teacher_and_shares_its_tensors(teacher):
    t = load_pipeline(teacher).model
    student = lora.add_adapters(t, rank=4, targets="attn,mlp,mod")
    x = inputs(t.config)
    assert torch.equal(student(*x), t(*x))  # B = 0: exactly the teacher
    assert student.joint_blocks[0].x_block.attn.qkv.weight.data_ptr() == \
        t.joint_blocks[0].x_block.attn.qkv.weight.data_ptr()  # one copy of the big weights
    trained = {n for n, p in student.named_parameters() if p.requires_grad}
    assert trained == set(lora.adapter_state(student)) and trained
    # attn: qkv and proj of both streams (the last block's text stream has no proj)
    attn = lora.add_adapters(t, rank=4)
    assert len(lora.layers(attn)) == 4 * t.config.depth - 1


def test_merging_equals_the_adapters(teacher):
    t = load_pipeline(teacher).model
    student = trained_adapters(lora.add_adapters(t, rank=4, alpha=8, targets="attn,mlp"))
    x = inputs(t.config)
    merged = mmdit.MMDiT(t.config)
    merged.load_state_dict(lora.merged_state(student))
    with torch.no_grad():
        assert not torch.allclose(student(*x), t(*x), atol=1e-3)  # the adapters do something
        torch.testing.assert_close(merged(*x), student(*x), rtol=1e-5, atol=1e-5)
    assert set(lora.merged_state(student)) == set(t.state_dict())  # the SD3 keys only


def test_adapter_files_round_trip_and_refuse_another_base(teacher, tmp_path):
    t = load_pipeline(teacher).model
    student = trained_adapters(lora.add_adapters(t, rank=4))
    lora.save_adapters(student, tmp_path / "a.safetensors", {"note": "x"})
    torch.manual_seed(5)  # another A: the file must set every adapter
    again = lora.add_adapters(t, rank=4)
    tensors, settings, meta = lora.read_adapters(tmp_path / "a.safetensors", t.config)
    lora.load_adapter_state(again, tensors)
    x = inputs(t.config)
    assert torch.equal(again(*x), student(*x)) and settings["rank"] == 4 and meta["note"] == "x"
    other = mmdit.MMDiT(mmdit.CONFIGS["test"])
    with pytest.raises(ValueError, match="another architecture.*pass the base"):
        lora.merge_file(other, tmp_path / "a.safetensors")
    with pytest.raises(ValueError, match="rank"):
        lora.load_adapter_state(lora.add_adapters(t, rank=2), tensors)
    with pytest.raises(ValueError, match="not a LoRA adapter file"):
        lora.merge_file(other, teacher)


def test_student_step_trains_only_the_adapters_and_never_the_shared_teacher(teacher):
    t = load_pipeline(teacher).model.requires_grad_(False)
    before = {k: v.clone() for k, v in t.state_dict().items()}
    torch.manual_seed(0)
    student = lora.add_adapters(t, rank=4)
    disc = Discriminator.for_teacher(t.config)
    with torch.no_grad():
        for p in disc.parameters():
            p.add_(0.1 * torch.randn_like(p))
    params = [p for p in student.parameters() if p.requires_grad]
    opt = training.make_optimizer(params, 1e-2, (0.9, 0.99), torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, t.config.out_channels, 8, 12, generator=g)
    batch = train_ladd.Batch(x0, torch.randn(3, 5, t.config.context_dim, generator=g),
                             torch.randn(3, t.config.pooled_dim, generator=g),
                             torch.tensor([1.0, 0.5, 0.25]), torch.rand(3, generator=g),
                             *(torch.randn(x0.shape, generator=g) for _ in range(3)))
    for _ in range(3):
        train_ladd.student_step(student, t, disc, opt, batch)
    assert all(p.grad is None for n, p in student.named_parameters() if ".lora_" not in n)
    assert len(opt.state) == len(params)  # AdamW state for the adapters alone
    assert all(torch.equal(before[k], v) for k, v in t.state_dict().items())  # the teacher
    off = lora.without_adapters(student)  # the student with its adapters off
    x = inputs(t.config)
    fresh = load_pipeline(teacher).model
    assert torch.equal(off(*x), fresh(*x)) and not torch.equal(student(*x), fresh(*x))


def test_lora_ladd_run_samples_resumes_exactly_and_merges(teacher, tmp_path, capsys):
    whole, part = tmp_path / "whole", tmp_path / "part"
    train_ladd.main(ladd(teacher, whole, "--memory-report"))
    report = capsys.readouterr().out
    assert "student LoRA adapters (fp32)" in report and "student EMA (of the adapters)" in report
    assert {"adapters.safetensors", "model.safetensors", "state.safetensors"} <= set(os.listdir(whole))
    assert not (whole / "student.safetensors").exists()
    train_ladd.main(ladd(teacher, part, "--steps", "2"))
    train_ladd.main(["--resume", str(part), "--steps", "4"])
    for name in ("adapters.safetensors", "model.safetensors"):
        a, b = weights.load_file(whole / name), weights.load_file(part / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name
    state = weights.load_state(whole / "state.safetensors")
    assert set(state["student"]) == set(state["ema"]) == set(weights.load_file(whole / "adapters.safetensors"))
    # sampling: the teacher + the adapter file equals the merged student, pixel for pixel
    capsys.readouterr()
    for name, extra in (("merged", ["--ckpt", str(whole)]),
                        ("adapters", ["--ckpt", teacher, "--lora", str(whole / "adapters.safetensors")])):
        sample.main([*extra, "--prompt", PROMPTS[0], "--out", str(tmp_path / name), "--quiet"])
    assert (read_png(tmp_path / "merged" / "000.png") == read_png(tmp_path / "adapters" / "000.png")).all()
    assert load_pipeline(teacher, adapters=whole / "adapters.safetensors").defaults["steps"] == 4


def test_memory_report_of_a_lora_run(teacher):
    """Estimated from the model built (its adapters' element counts), measured from the storages
    (the student's shared base counts once, in the teacher's row)."""
    t = load_pipeline(teacher).model.requires_grad_(False)
    student = lora.add_adapters(t, rank=4)
    ema = lora.add_adapters(t, rank=4).requires_grad_(False)
    disc = Discriminator.for_teacher(t.config)
    params = [p for p in student.parameters() if p.requires_grad]
    opt_g = training.make_optimizer(params, 1e-3, (0.9, 0.99), torch.device("cpu"))
    opt_d = training.make_optimizer(disc.parameters(), 1e-3, (0.0, 0.99), torch.device("cpu"))
    for p in (*params, *disc.parameters()):
        p.grad = torch.zeros_like(p)
    opt_g.step()
    opt_d.step()
    rows, text = training.memory_report(t, student, ema, disc, opt_g, opt_d, torch.device("cpu"))
    held = {name: (est, real) for name, est, real in rows}
    adapters = sum(r * (i + o) for r, i, o in
                   ((m.rank, m.in_features, m.out_features) for _, m in lora.layers(student)))
    assert held["student LoRA adapters (fp32)"] == (4 * adapters, 4 * adapters)
    assert held["student AdamW moments"] == (8 * adapters, 8 * adapters)
    for name, (est, real) in held.items():
        if est is not None:
            assert est == real, name


@pytest.mark.parametrize("extra, words", [
    (["--lora", "-1"], ["--lora -1"]),
    (["--lora-targets", "attn,nope"], ["--lora-targets", "attn, mlp, mod"]),
    (["--student-config", "shapes-small"], ["--lora", "--student-config"]),
    (["--lora-alpha", "nan"], ["--lora-alpha nan"]),
])
def test_bad_lora_options_fail_before_any_work(teacher, tmp_path, capsys, extra, words):
    expect_one_line_error(train_ladd.main, capsys, ladd(teacher, tmp_path / "run", *extra), *words)
    assert not (tmp_path / "run").exists()
