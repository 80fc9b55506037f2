import dataclasses
import glob
import json
import os

import pytest
import torch

import flow
import ladd_data
import ladd_run
import metrics
import mmdit
import pipeline
import train_ladd
import training
import weights
from conftest import LADD_SAMPLER, expect_one_line_error, ladd_argv, make_checkpoint
from discriminator import Discriminator, hinge_heads_loss, hinge_student_loss
from pipeline import load_pipeline

ONE_THREAD = True


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return make_checkpoint(str(tmp_path_factory.mktemp("teacher")), LADD_SAMPLER)


argv = ladd_argv


def models(teacher_path):
    pipe = load_pipeline(teacher_path)
    teacher = pipe.model.requires_grad_(False)
    torch.manual_seed(0)
    student = mmdit.MMDiT(teacher.config)
    student.load_state_dict(teacher.state_dict())
    disc = Discriminator.for_teacher(teacher.config)
    with torch.no_grad():  # heads start at logit 0 with zero gradient; make them opinionated
        for p in disc.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return teacher, student, disc


def batch(teacher, B=3, H=8, W=12, seed=0):
    """A non-square batch (8 x 12 latent -> a 4 x 6 token map)."""
    g = torch.Generator().manual_seed(seed)
    c = teacher.config
    x0 = torch.randn(B, c.out_channels, H, W, generator=g)
    context, pooled = torch.randn(B, 5, c.context_dim, generator=g), torch.randn(B, c.pooled_dim, generator=g)
    t = torch.tensor([1.0, 0.5, 0.25])[:B]
    t_hat = flow.sample_t_logit_normal(B, 1.0, 1.0, g)
    noise = {k: torch.randn(x0.shape, generator=g) for k in ("eps", "eps_fake", "eps_real")}
    return train_ladd.Batch(x0, context, pooled, t, t_hat, **noise)


def snapshot(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def changed(before, module):
    return [k for k, v in module.state_dict().items() if not torch.equal(before[k], v)]


def opt(module):
    return torch.optim.AdamW(module.parameters(), lr=1e-3)


def test_student_step_updates_the_student_only(teacher):
    teacher_m, student, disc = models(teacher)
    b = batch(teacher_m)
    before = [snapshot(m) for m in (teacher_m, student, disc)]
    fake_features, stats = train_ladd.student_step(student, teacher_m, disc, opt(student), b)
    assert changed(before[1], student)                  # the student moved
    assert not changed(before[0], teacher_m)            # the teacher did not
    assert not changed(before[2], disc)                 # nor the heads (not its optimizer)
    assert len(fake_features) == teacher_m.config.depth            # one map per head, detached
    assert all(f.shape == (3, 32, 4, 6) and not f.requires_grad for f in fake_features)
    assert stats["student_skipped"] == 0 and stats["student_grad_norm"] > 0


def test_heads_step_updates_the_heads_only(teacher):
    teacher_m, student, disc = models(teacher)
    b = batch(teacher_m)
    before = [snapshot(m) for m in (teacher_m, student, disc)]
    fake = flow.add_noise(b.x0 + 0.5 * torch.randn_like(b.x0), b.eps_fake, b.t_hat)
    fake_features = teacher_m.features(fake, b.t_hat, b.context, b.pooled, disc.blocks)
    stats = train_ladd.heads_step(teacher_m, disc, opt(disc), b, fake_features)
    assert set(changed(before[2], disc)) == set(before[2])  # every head parameter moved
    assert not changed(before[0], teacher_m) and not changed(before[1], student)
    assert stats["heads_skipped"] == 0 and stats["heads_loss"] > 0


def student_gradient(student, teacher_m, disc, b, pair_weight=0.0):
    """student_step's gradient of the student as its optimizer receives it: SGD with lr 0
    leaves every weight as it was and p.grad as student_step left it (unclipped: no limit)."""
    sgd = torch.optim.SGD(student.parameters(), lr=0.0)
    run = train_ladd.StepSettings(grad_clip=float("inf"), pair_weight=pair_weight)
    features, stats = train_ladd.student_step(student, teacher_m, disc, sgd, b, run)
    assert stats["student_skipped"] == 0
    assert all(p.grad is not None for p in student.parameters())  # every weight takes part
    return torch.cat([p.grad.flatten() for p in student.parameters()]), features, stats


def test_student_step_back_propagates_through_the_frozen_teacher_and_heads(teacher):
    """The student's gradient comes through the teacher's features and the heads' logits: it
    changes with either's weights, and neither collects a gradient or moves."""
    teacher_m, student, disc = models(teacher)
    b = batch(teacher_m)
    before = [snapshot(m) for m in (teacher_m, student, disc)]
    g1, features, stats = student_gradient(student, teacher_m, disc, b)
    assert g1.abs().sum() > 0
    assert all(p.grad is None for p in [*teacher_m.parameters(), *disc.parameters()])
    assert not any(changed(s, m) for s, m in zip(before, (teacher_m, student, disc)))
    assert all(p.requires_grad for p in disc.parameters())  # judges only for this step
    assert all(f.grad_fn is None and not f.requires_grad for f in features)  # detached
    with torch.no_grad():  # the returned features are the ones the heads judged
        logits = disc(features, b.t_hat, b.pooled)
    assert stats["student_loss"] == pytest.approx(-sum(l.mean() for l in logits).item(), rel=1e-5)
    assert torch.equal(student_gradient(student, teacher_m, disc, b)[0], g1)  # reproducible
    weight = teacher_m.joint_blocks[0].x_block.mlp.fc2.weight
    with torch.no_grad():
        weight.mul_(2.0)  # another teacher: another gradient
    g_teacher = student_gradient(student, teacher_m, disc, b)[0]
    assert not torch.allclose(g_teacher, g1)
    with torch.no_grad():
        weight.div_(2.0)  # the teacher back, exactly
        disc.heads[str(disc.blocks[0])].logit_out.weight.mul_(2.0)  # another head
    g_heads = student_gradient(student, teacher_m, disc, b)[0]
    assert not torch.allclose(g_heads, g1)


def test_heads_judge_non_square_token_maps_of_every_block(teacher):
    teacher_m, _, disc = models(teacher)
    b = batch(teacher_m, H=8, W=12)
    x0, context, pooled, t_hat = b.x0, b.context, b.pooled, b.t_hat
    feats = teacher_m.features(x0, t_hat, context, pooled, disc.blocks)
    assert [f.shape[-2:] for f in feats] == [(4, 6)] * teacher_m.config.depth
    logits = disc(feats, t_hat, pooled)
    depth = teacher_m.config.depth
    assert len(logits) == depth and all(l.shape == (3,) for l in logits)
    # by hand: these logits lie in (-1, 1), so each head's real term relu(1 - l) plus its fake
    # term relu(1 + l) is (1 - l) + (1 + l) = 2 for every sample: 2 a head in all
    assert all(l.abs().max() < 1 for l in logits)
    assert hinge_heads_loss(logits, logits).item() == pytest.approx(2 * depth)
    # fakes 5 lower are all below -1: no fake term, the real ones are mean(1 - l) = 1 - mean(l)
    means = [l.mean().item() for l in logits]
    lower = [l - 5 for l in logits]
    assert hinge_heads_loss(logits, lower).item() == pytest.approx(sum(1 - m for m in means))
    assert hinge_student_loss(lower).item() == pytest.approx(sum(5 - m for m in means))  # -mean(l - 5)


def test_student_times_follow_the_warmup_then_the_main_distribution():
    g = torch.Generator().manual_seed(0)
    times, probs, warm = [1, .75, .5, .25], [.7, .1, .1, .1], [0, 0, .5, .5]
    early = train_ladd.student_times(4000, 0, times, probs, warm, 10, g)
    late = train_ladd.student_times(4000, 10, times, probs, warm, 10, g)
    assert set(early.tolist()) == {0.5, 0.25}
    assert abs((late == 1).float().mean().item() - 0.7) < 0.03
    assert set(late.tolist()) == set(times)


def test_one_run_makes_a_sampleable_4_step_student(teacher, tmp_path, capsys):
    out = tmp_path / "run"
    train_ladd.main(argv(teacher, out, "--judge-n", "4"))
    for name in ("model.safetensors", "student.safetensors", "state.safetensors", "vae.safetensors",
                 "log.jsonl", "config.json", "grid.png"):
        assert (out / name).is_file(), name
    pipe = load_pipeline(str(out))
    sampler = json.loads(pipe.metadata["sampler"])
    assert sampler["times"] == [1, 0.75, 0.5, 0.25] and sampler["cfg"] == 1.0
    assert pipe.defaults["steps"] == 4 and json.loads(pipe.metadata["judge"])["nfe"] == 4
    keys = set(weights.read_header(out / "model.safetensors")[0])
    assert keys == set(mmdit.MMDiT(pipe.model.config).state_dict())  # the SD3 layout, bare keys
    logs = [json.loads(line) for line in open(out / "log.jsonl")]
    steps = [r for r in logs if "heads_loss" in r]
    assert [r["step"] for r in steps] == [0, 1, 2, 3]
    for key in ("student_loss", "logit_real", "logit_fake", "student_grad_norm", "heads_grad_norm", "skipped",
                "samples_per_s"):
        assert all(key in r for r in steps), key
    assert {tuple(r["size"]) for r in steps} <= {(8, 8), (8, 12)}  # latents of the two buckets


def test_resume_matches_an_uninterrupted_run(teacher, tmp_path):
    whole, part = tmp_path / "whole", tmp_path / "part"
    train_ladd.main(argv(teacher, whole, "--steps", "4"))
    train_ladd.main(argv(teacher, part, "--steps", "2"))
    assert weights.load_state(part / "state.safetensors")["step"] == 2
    train_ladd.main(["--resume", str(part), "--steps", "4"])
    a, b = weights.load_state(whole / "state.safetensors"), weights.load_state(part / "state.safetensors")
    assert a["step"] == b["step"] == 4
    flat_a, flat_b = tensors(a), tensors(b)
    assert flat_a.keys() == flat_b.keys() and len(flat_a) > 100  # weights, EMA, heads, optimizers
    for name in flat_a:
        assert torch.equal(flat_a[name], flat_b[name]), name


def test_a_run_saved_before_the_pairs_resumes_as_it_was(teacher, tmp_path):
    """A config.json without pair_weight comes from plain LADD: it resumes with --pair-weight 0."""
    whole, part = tmp_path / "whole", tmp_path / "part"
    train_ladd.main(argv(teacher, whole, "--steps", "4", "--pair-weight", "0"))
    train_ladd.main(argv(teacher, part, "--steps", "2", "--pair-weight", "0"))
    config = json.load(open(part / "config.json"))
    del config["pair_weight"], config["pair_share"]  # as such runs saved it
    (part / "config.json").write_text(json.dumps(config))
    train_ladd.main(["--resume", str(part), "--steps", "4"])
    a, b = weights.load_state(whole / "state.safetensors"), weights.load_state(part / "state.safetensors")
    assert all(torch.equal(a["student"][k], b["student"][k]) for k in a["student"])
    assert json.load(open(part / "config.json"))["pair_weight"] == 0


def dataset_folder(data_dir):
    """The one dataset folder under --data-dir (beside it: file_hashes.json)."""
    (folder,) = [p for p in data_dir.iterdir() if p.is_dir()]
    return folder


def tensors(tree, prefix=""):
    if isinstance(tree, torch.Tensor):
        return {prefix: tree}
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, (list, tuple)) else []
    return {k: v for key, sub in items for k, v in tensors(sub, f"{prefix}/{key}").items()}


def test_the_synthetic_data_cache_is_reused(teacher, tmp_path, capsys, monkeypatch):
    data = tmp_path / "data"
    args = ["--data-dir", str(data), "--steps", "1"]
    train_ladd.main(argv(teacher, tmp_path / "a", *args))
    assert "8 generated now, 0 from the cache" in capsys.readouterr().out
    calls = []
    monkeypatch.setattr(ladd_data, "_write_shard", lambda *a, **k: calls.append(1))
    train_ladd.main(argv(teacher, tmp_path / "b", *args))
    assert "0 generated now, 8 from the cache" in capsys.readouterr().out and not calls
    folders = lambda: [p for p in data.iterdir() if p.is_dir()]  # noqa: E731 (one per dataset)
    shards = sorted(p.name for p in folders()[0].glob("*.safetensors"))
    assert shards == ["16x16_0000.safetensors", "24x16_0000.safetensors"]
    # other settings, another dataset
    monkeypatch.undo()
    train_ladd.main(argv(teacher, tmp_path / "c", *args, "--data-cfg", "3"))
    assert "8 generated now" in capsys.readouterr().out and len(folders()) == 2


def test_a_non_finite_step_is_skipped_and_never_saved(teacher, tmp_path, monkeypatch):
    real = ladd_data.sample_batch

    def poisoned(*args):
        rows = real(*args)
        return {**rows, "latents": rows["latents"] * float("nan")}
    monkeypatch.setattr(ladd_data, "sample_batch", poisoned)
    out = tmp_path / "nan"
    train_ladd.main(argv(teacher, out, "--steps", "2"))
    state = weights.load_state(out / "state.safetensors")
    assert state["skipped"] == {"student": 2, "heads": 2}
    saved = weights.load_file(out / "model.safetensors")
    start = load_pipeline(teacher).model.state_dict()
    assert all(torch.equal(saved[k], start[k]) for k in start)  # untouched, finite


def test_bad_inputs_fail_before_any_work(teacher, tmp_path, capsys):
    out = tmp_path / "bad"
    vae_file = os.path.join(os.path.dirname(teacher), "shapes_vae.safetensors")
    expect_one_line_error(train_ladd.main, capsys, argv(vae_file, out), vae_file)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle on a blue background\na cat on a sofa\n")
    expect_one_line_error(train_ladd.main, capsys, argv(teacher, out, "--prompts", str(prompts)),
                          "line 2")
    expect_one_line_error(train_ladd.main, capsys, argv(teacher, out, "--student-config", "sd3-medium"),
                          "in_channels", "16", "4")
    expect_one_line_error(train_ladd.main, capsys, argv(teacher, out, "--student-config", "nope"),
                          "nope", "shapes")
    expect_one_line_error(train_ladd.main, capsys, argv(teacher, out, "--time-probs", "1,0"),
                          "time-probs")
    expect_one_line_error(train_ladd.main, capsys, argv(teacher, out, "--pair-share", "1.5"),
                          "--pair-share 1.5", "[0, 1]")
    expect_one_line_error(train_ladd.main, capsys, argv(teacher, out, "--pair-steps", "-1"),
                          "--pair-steps -1", "integer >= 0")
    expect_one_line_error(train_ladd.main, capsys, argv(teacher, out, "--data", "real",
                                                          "--pair-weight", "30"),
                          "--pair-weight 30", "--data real", "--pair-weight 0")
    assert not out.exists()  # nothing was written


def test_a_prompts_file_in_the_world_grammar_is_used(teacher, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle on a blue background\n")
    train_ladd.main(argv(teacher, tmp_path / "p", "--prompts", str(prompts), "--steps", "1",
                         "--data-dir", str(tmp_path / "data")))
    shard = dataset_folder(tmp_path / "data") / "16x16_0000.safetensors"
    captions = json.loads(weights.load_metadata(shard)["captions"])
    assert captions == ["a red circle on a blue background"] * 4


def test_a_model_without_a_text_encoder_trains_on_precomputed_conditioning(teacher, tmp_path):
    """The real-SD3 path: conditioning from a --cond file, no shapes judge."""
    meta = weights.load_metadata(teacher)
    meta["text_encoder"] = json.dumps({"name": "sd3"})
    sd3 = os.path.join(os.path.dirname(teacher), "sd3like.safetensors")
    weights.save_file(dict(weights.load_file(teacher)), sd3, meta)
    g = torch.Generator().manual_seed(0)
    cond = tmp_path / "cond.safetensors"
    weights.save_file({"context": torch.randn(3, 7, 64, generator=g), "pooled": torch.randn(3, 64, generator=g),
                       "uncond_context": torch.zeros(1, 7, 64), "uncond_pooled": torch.zeros(1, 64)}, cond)
    out = tmp_path / "sd3run"
    train_ladd.main(argv(sd3, out, "--cond", str(cond), "--steps", "2", "--distill-weight", "0.5",
                         "--data-dir", str(tmp_path / "data")))
    logs = [json.loads(line) for line in open(out / "log.jsonl")]
    assert all("distill_loss" in r for r in logs if "student_loss" in r)
    shard = weights.load_file(dataset_folder(tmp_path / "data") / "16x16_0000.safetensors")
    assert shard["context"].shape == (4, 7, 64)  # rows of the cond file, cycled
    assert torch.equal(shard["context"][3].float(), shard["context"][0].float())
    assert (out / "grid.png").is_file() and "judge" not in weights.load_metadata(out / "model.safetensors")
    with pytest.raises(SystemExit):  # prompts for a model without a text encoder: a clear error
        train_ladd.main(argv(sd3, tmp_path / "x", "--steps", "1"))


def test_a_shallower_student_starts_from_the_teachers_first_and_last_blocks():
    import dataclasses
    teacher_cfg = dataclasses.replace(mmdit.CONFIGS["test"], depth=4, dual_attention_layers=())
    torch.manual_seed(0)
    teacher_m = mmdit.MMDiT(teacher_cfg)
    student = mmdit.MMDiT(dataclasses.replace(teacher_cfg, depth=2))
    assert mmdit.init_from(student, teacher_m) == len(student.state_dict())
    for j, i in ((0, 0), (1, 3)):  # the last block (pre-only context) comes from the last
        mine, theirs = student.joint_blocks[j].state_dict(), teacher_m.joint_blocks[i].state_dict()
        assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert torch.equal(student.final_layer.linear.weight, teacher_m.final_layer.linear.weight)


def test_real_data_are_rendered_captions_through_the_vae(teacher, tmp_path):
    import shapes
    train_ladd.main(argv(teacher, tmp_path / "real", "--data", "real", "--pair-weight", "0",
                         "--steps", "1", "--data-dir", str(tmp_path / "data")))
    path = dataset_folder(tmp_path / "data") / "24x16_0000.safetensors"
    shard, captions = weights.load_file(path), json.loads(weights.load_metadata(path)["captions"])
    images = shapes.render_batch(captions, 24, 16, seed=4)  # bucket 1 starts at sample 4
    expected = load_pipeline(teacher).vae.encode(images)
    # the shard holds them in fp16: half a unit in the last place of the largest, with a margin
    fp16 = torch.finfo(torch.float16).eps * expected.abs().max()
    assert torch.allclose(shard["latents"].float(), expected, rtol=0, atol=fp16)
    assert json.loads((dataset_folder(tmp_path / "data") / "settings.json").read_text())["kind"] == "real"


def after_one_step(teacher, optim_dtype):
    """What a run holds after its first step: teacher, student, EMA, heads and both optimizers,
    the student's moments in optim_dtype (train_ladd's --optim-dtype)."""
    teacher_m, student, disc = models(teacher)
    b, cpu = batch(teacher_m), torch.device("cpu")
    opt_g = training.make_optimizer(student.parameters(), 1e-3, (0.9, 0.99), cpu, optim_dtype)
    opt_d = training.make_optimizer(disc.parameters(), 1e-3, (0.0, 0.99), cpu)
    fake, _ = train_ladd.student_step(student, teacher_m, disc, opt_g, b)
    train_ladd.heads_step(teacher_m, disc, opt_d, b, fake)
    ema = mmdit.MMDiT(student.config).requires_grad_(False)
    ema.load_state_dict(student.state_dict())
    return [teacher_m, student, ema, disc, opt_g, opt_d]


def memory_rows(held, **kw):
    rows, text = training.memory_report(*held, torch.device("cpu"), **kw)
    assert text.count("\n") == len(rows) and all(name in text for name, _, _ in rows)
    return {name: (est, real) for name, est, real in rows}


@pytest.mark.parametrize("optim_dtype,moment_dtype,moment_bytes",
                         [("fp32", torch.float32, 4), ("bf16", torch.bfloat16, 2)])
def test_memory_report_estimates_what_is_held(teacher, optim_dtype, moment_dtype, moment_bytes):
    """The plan (element counts times planned bytes) equals the bytes of the storages held."""
    held = after_one_step(teacher, optim_dtype)
    teacher_m, student, _, disc, opt_g, _ = held
    rows = memory_rows(held, teacher_dtype=torch.float32)
    assert memory_rows(held)["held in all"] == rows["held in all"]  # teacher_dtype: as loaded
    n_t, n_s, n_d = (sum(p.numel() for p in m.parameters()) for m in (teacher_m, student, disc))
    pos = student.pos_embed.numel()  # the weights' one buffer
    planned = {"teacher weights (frozen)": 4 * (n_t + teacher_m.pos_embed.numel()),
               "student weights (fp32 master)":
               4 * (n_s + pos), "student gradients": 4 * n_s, "student AdamW moments":
               2 * moment_bytes * n_s, "student EMA": 4 * (n_s + pos),
               "heads: weights, gradients, AdamW": (4 + 4 + 8) * n_d}
    assert {name: rows[name][0] for name in planned} == planned
    assert all(v.dtype == moment_dtype for s in opt_g.state.values()
               for k, v in s.items() if k.startswith("exp_avg"))
    for name, (est, real) in rows.items():  # every byte held is planned
        if est is not None:
            assert est == real, name
    assert rows["held in all"][1] == sum(planned.values())
    assert rows["process peak RSS (+ activations, data)"][1] > rows["held in all"][1]


def test_memory_report_shows_what_the_plan_did_not_expect(teacher):
    held = after_one_step(teacher, "bf16")
    teacher_m, student, ema, disc, opt_g, opt_d = held
    plan = memory_rows(held)
    moments, ema_row = plan["student AdamW moments"][0], plan["student EMA"][0]
    # moments kept in fp32 where the plan says bf16: twice the bytes
    for state in opt_g.state.values():
        for key in ("exp_avg", "exp_avg_sq"):
            state[key] = state[key].float()
    assert memory_rows(held)["student AdamW moments"] == (moments, 2 * moments)
    # an EMA sharing the student's storage holds nothing of its own
    shared = [teacher_m, student, student, disc, opt_g, opt_d]
    assert memory_rows(shared)["student EMA"] == (ema_row, 0)
    # an EMA whose weights are views of one buffer twice their size: the buffer is held
    flat = torch.zeros(2 * sum(t.numel() for t in ema.state_dict().values()))
    offset = 0
    for t in [*ema.parameters(), *ema.buffers()]:
        t.data = flat[offset:offset + t.numel()].view_as(t)
        offset += t.numel()
    assert memory_rows(held)["student EMA"] == (ema_row, 2 * ema_row)
    # a teacher planned in bf16 but held in fp32
    teacher_row = plan["teacher weights (frozen)"][0]
    assert memory_rows(held, teacher_dtype=torch.bfloat16)["teacher weights (frozen)"] == (
        teacher_row // 2, teacher_row)


def test_adamw_with_fp32_state_equals_torch_and_bf16_state_halves_it():
    torch.manual_seed(0)
    start = torch.randn(50, 40)
    runs = {}
    for name, make in {"torch": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
                       "fp32": lambda p: training.AdamW(p, lr=1e-2, weight_decay=0.1,
                                                          state_dtype="fp32"),
                       "bf16": lambda p: training.AdamW(p, lr=1e-2, weight_decay=0.1)}.items():
        w = torch.nn.Parameter(start.clone())
        opt = make([w])
        g = torch.Generator().manual_seed(1)
        for _ in range(5):
            w.grad = torch.randn(w.shape, generator=g)
            opt.step()
        runs[name] = (w.detach(), opt.state[w])
    # the same update in another operation order: each of the 5 steps may round a weight to a
    # neighbouring float32, one unit in the last place (<= eps |w|) apart
    ulps = 5 * torch.finfo(torch.float32).eps * runs["torch"][0].abs().max()
    assert torch.allclose(runs["fp32"][0], runs["torch"][0], rtol=0, atol=ulps)
    assert (runs["bf16"][0] - runs["torch"][0]).abs().max() < 1e-3 < (runs["torch"][0] - start).abs().max()
    assert runs["bf16"][1]["exp_avg"].dtype == runs["bf16"][1]["exp_avg_sq"].dtype == torch.bfloat16


def test_bf16_optimizer_state_resumes_exactly(teacher, tmp_path, capsys):
    whole, part = tmp_path / "whole", tmp_path / "part"
    train_ladd.main(argv(teacher, whole, "--steps", "3", "--optim-dtype", "bf16"))
    train_ladd.main(argv(teacher, part, "--steps", "2", "--optim-dtype", "bf16"))
    train_ladd.main(["--resume", str(part), "--steps", "3"])
    a, b = (tensors(weights.load_state(f / "state.safetensors")) for f in (whole, part))
    moments = [k for k in a if k.startswith("/opt_g/state") and "exp_avg" in k]
    assert moments and all(a[k].dtype == torch.bfloat16 for k in moments)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    capsys.readouterr()
    expect_one_line_error(train_ladd.main, capsys, argv(teacher, tmp_path / "x", "--optim-dtype",
                                                        "int8"), "--optim-dtype 'int8'")


def test_inpainting_ladd_end_to_end(tmp_path, capsys):
    """--task inpaint: data carry the mask and known latent, student, teacher and heads all read
    them, and the student is an inpainting model judged on edits."""
    from conftest import make_inpainting_checkpoint
    teacher = make_inpainting_checkpoint(str(tmp_path), LADD_SAMPLER)
    out = tmp_path / "inp"
    train_ladd.main(argv(teacher, out, "--task", "inpaint", "--judge-n", "2"))
    assert "edits judged" in capsys.readouterr().out
    shard = weights.load_file(next((tmp_path / "data").glob("*/16x16_0000.safetensors")))
    z = shard["latents"].shape[1]
    assert shard["extra"].shape == (shard["latents"].shape[0], 1 + z, 8, 8)
    pipe = load_pipeline(str(out))
    assert pipe.model.config.in_channels == 2 * z + 1 and json.loads(pipe.metadata["judge"])["kept"] == 1.0
    assert (out / "grid.png").is_file()
    # the extra channels reach the student's loss (through student and teacher)
    teacher_m = load_pipeline(teacher).model.requires_grad_(False)
    student = mmdit.MMDiT(teacher_m.config)
    student.load_state_dict(teacher_m.state_dict())
    disc = Discriminator.for_teacher(teacher_m.config)
    with torch.no_grad():
        for p in disc.parameters():
            p.add_(0.1 * torch.randn_like(p))
    b = batch(teacher_m)
    losses = []
    for scale in (1.0, -1.0):
        b.known = scale * torch.ones(3, 1 + z, 8, 12)
        _, stats = train_ladd.student_step(student, teacher_m, disc, opt(student), b)
        losses.append(stats["student_loss"])
    assert losses[0] != losses[1]
    # a t2i teacher with --task inpaint, an inpainting one without: one-line errors
    capsys.readouterr()
    expect_one_line_error(train_ladd.main, capsys, argv(teacher, tmp_path / "x"), "--task inpaint")
    plain = os.path.join(tmp_path, "model.safetensors")
    expect_one_line_error(train_ladd.main, capsys, argv(plain, tmp_path / "x", "--task", "inpaint"),
                          "inpainting teacher")


def test_the_seed_moves_data_heads_and_draws_and_repeats_exactly(teacher, tmp_path):
    runs = {}
    for name, seed in (("a", "0"), ("b", "0"), ("c", "1")):
        out = tmp_path / name
        train_ladd.main(argv(teacher, out, "--steps", "2", "--seed", seed, "--data-dir",
                             str(tmp_path / "data")))
        runs[name] = (weights.load_file(str(out / "model.safetensors")),
                      weights.load_state(str(out / "state.safetensors"))["disc"])
    same = lambda x, y: x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    assert same(runs["a"][0], runs["b"][0]) and same(runs["a"][1], runs["b"][1])
    assert not same(runs["a"][0], runs["c"][0]) and not same(runs["a"][1], runs["c"][1])
    seeds = sorted(json.load(open(f))["seed"] for f in glob.glob(str(tmp_path / "data" / "*" / "settings.json")))
    assert seeds == [0, 1]  # a dataset of its own per seed (its captions and noises)


def test_data_at_other_sizes_than_the_teachers(teacher, tmp_path, capsys):
    out = tmp_path / "run"
    train_ladd.main(argv(teacher, out, "--steps", "2", "--data-size", "6", "--batch-size", "2",
                         "--judge-n", "3", "--data-sizes", "16x16,32x16,16x24",
                         "--data-dir", str(tmp_path / "data")))  # two latents a size
    meta = weights.load_metadata(str(out / "model.safetensors"))
    assert json.loads(meta["sizes"]) == [[16, 16], [32, 16], [16, 24]]  # the student's buckets
    settings = [json.load(open(f)) for f in glob.glob(str(tmp_path / "data" / "*" / "settings.json"))]
    assert [s["sizes"] for s in settings] == [[[16, 16], [32, 16], [16, 24]]]
    shard_sizes = sorted(os.path.basename(f).split("_")[0]
                         for f in glob.glob(str(tmp_path / "data" / "*" / "*x*_*.safetensors")))
    assert shard_sizes == ["16x16", "16x24", "32x16"]  # two latents each, one shard per size
    judge = [json.loads(line) for line in open(out / "log.jsonl")][-1]["judge"]
    assert list(judge["per_size"]) == ["16x16", "32x16", "16x24"]  # judged where it trained
    capsys.readouterr()
    bad = tmp_path / "bad"
    expect_one_line_error(train_ladd.main, capsys, argv(teacher, bad, "--data-sizes", "16x0"),
                          "--data-sizes 16x0", "multiples of 4", "trained sizes: 16x16, 24x16")
    expect_one_line_error(train_ladd.main, capsys, argv(teacher, bad, "--data-sizes", "lots"),
                          "--data-sizes 'lots'", "WIDTHxHEIGHT", "many (64x64, 72x72")
    assert not bad.exists()


def test_the_end_of_run_judge_at_sizes_no_model_trained_at(teacher, tmp_path, capsys):
    out = tmp_path / "run"
    train_ladd.main(argv(teacher, out, "--steps", "1", "--judge-n", "4", "--judge-sizes", "32x16,16x32"))
    record = [json.loads(line) for line in open(out / "log.jsonl")][-1]
    assert list(record["judge"]["per_size"]) == ["32x16", "16x32"]
    # the same student at 2 and 1 steps (times 1, .5 and 1), as sampling it with --steps gives
    fewer = record["judge_fewer_steps"]
    assert list(fewer) == ["2", "1"] and [fewer[k]["nfe"] for k in fewer] == [2, 1]
    pipe = load_pipeline(str(out / "model.safetensors"))
    for k in (2, 1):
        again = metrics.judge_pipeline(pipe, 4, seed=1234, sizes=[(32, 16), (16, 32)], steps=k)
        assert {m: again[m] for m in ("all_correct", "purity", "fd")} == \
            {m: fewer[str(k)][m] for m in ("all_correct", "purity", "fd")}
    assert json.loads(weights.load_metadata(out / "model.safetensors")["judge_fewer_steps"]) == fewer
    two = tmp_path / "two"  # a two-time student is also judged at 1 step
    train_ladd.main(argv(teacher, two, "--steps", "1", "--judge-n", "2", "--times", "1,0.5",
                         "--time-probs", "1,1", "--warmup-probs", "1,1"))
    assert list([json.loads(line) for line in open(two / "log.jsonl")][-1]["judge_fewer_steps"]) == ["1"]
    capsys.readouterr()
    bad = tmp_path / "bad"
    expect_one_line_error(train_ladd.main, capsys, argv(teacher, bad, "--judge-sizes", "18x16"),
                          "--judge-sizes 18x16", "multiples of 4", "trained sizes: 16x16, 24x16")
    assert not bad.exists()


def changed_fields(a, b):
    return {f.name for f in dataclasses.fields(a) if getattr(a, f.name) != getattr(b, f.name)}


def test_the_default_run_is_plain_ladd_with_every_add_on_off():
    cfg = train_ladd.Config()
    assert cfg.pair_weight == cfg.distill_weight == cfg.r1_weight == 0 and cfg.data == "synthetic"
    s = train_ladd.StepSettings()
    assert s.pair_weight == s.r1_weight == 0 and s.distill is None


def test_the_pairs_preset_adds_the_pairs_in_the_first_half_and_nothing_else():
    default, pairs = train_ladd.Config(), train_ladd.Config(**train_ladd.PRESETS["pairs"])
    assert changed_fields(default, pairs) == {"pair_weight", "pair_steps"}  # same data, steps, EMA
    assert pairs.pair_weight == 30 and 2 * pairs.pair_steps == pairs.steps


def pair_batches(teacher, tmp_path, steps, **changes):
    """draw_batch's batches of `steps` for a tiny run's config (t = 1 or .75 after the warmup)
    with `changes`, and the teacher's pipeline and prompt source."""
    out = tmp_path / "run"
    if not out.exists():
        train_ladd.main(argv(teacher, out, "--steps", "0", "--data-size", "8"))
    cfg = train_ladd.Config(**{**json.load(open(out / "config.json")), "time_probs": "1,1,0,0",
                               **changes})
    pipe = ladd_run.load_teacher(cfg, torch.device("cpu"), torch.float32)
    describe, take = ladd_data.prompt_source(cfg, pipe)
    dataset = ladd_data.build_dataset(cfg, pipe, describe, take, pipe.sizes)
    _, schedule = ladd_run.check_config(cfg)
    return [train_ladd.draw_batch(cfg, dataset, schedule, step, training.World(), torch.device("cpu"))
            for step in steps], pipe, take


def test_pair_steps_end_the_pairs_and_then_the_draws_are_plain_ladds(teacher, tmp_path):
    """--pair-steps 6: steps 0-5 draw what a run with pairs throughout draws, later steps what a
    run without pairs draws (the same noise, no paired row)."""
    steps = range(10)
    cut = pair_batches(teacher, tmp_path, steps, pair_weight=30.0, pair_steps=6)[0]
    pairs = pair_batches(teacher, tmp_path, steps, pair_weight=30.0)[0]
    plain = pair_batches(teacher, tmp_path, steps, pair_weight=0.0)[0]
    assert any(b.paired.any() for b in cut[:6])  # the check below can fail
    for step, b in enumerate(cut):
        same = pairs[step] if step < 6 else plain[step]
        for k in ("paired", "x0", "t", "t_hat", "eps", "eps_fake", "eps_real"):
            assert torch.equal(getattr(b, k), getattr(same, k)), (step, k)


def test_a_run_may_continue_without_the_pairs(teacher, tmp_path):
    """--resume RUN --steps N --pair-steps K is the run that had --pair-steps K from the start:
    the long preset is the default run continued this way."""
    whole, part = tmp_path / "whole", tmp_path / "part"
    train_ladd.main(argv(teacher, whole, "--steps", "4", "--pair-weight", "30", "--pair-steps", "2"))
    train_ladd.main(argv(teacher, part, "--steps", "2", "--pair-weight", "30"))
    train_ladd.main(["--resume", str(part), "--steps", "4", "--pair-steps", "2"])
    a, b = weights.load_state(whole / "state.safetensors"), weights.load_state(part / "state.safetensors")
    assert all(torch.equal(a["student"][k], b["student"][k]) for k in a["student"])
    assert json.load(open(part / "config.json"))["pair_steps"] == 2


def test_paired_rows_start_from_the_noise_the_teacher_turned_into_their_latent(teacher, tmp_path):
    """--pair-weight: a t = 1 row drawn as paired starts from the very noise the teacher sampled
    its latent from, so x0 is the known answer for it; other rows start from fresh noise."""
    batches, pipe, take = pair_batches(teacher, tmp_path, range(1, 9), pair_weight=1.0, pair_share=0.5)
    uncond, s = take([0])[0], pipeline.sampling_settings(pipe)
    for b in batches:  # after the warmup step
        assert not (b.paired & (b.t < 1)).any()  # only whole-noise rows are paired
        if not b.paired.any() or b.paired.all():
            continue
        B = len(b.x0)
        x0 = flow.sample(pipeline.velocity_of(pipe.model), b.eps, s["sigmas"], b.context, b.pooled,
                         uncond.uncond_context.expand(B, -1, -1), uncond.uncond_pooled.expand(B, -1),
                         cfg=s["cfg"], sampler=s["sampler"])                       # [B, C, h, w]
        error = (x0 - b.x0).abs().flatten(1).amax(1)                               # [B]
        assert (error[b.paired] < 5e-3).all()       # the teacher's own sample (fp16 in the cache)
        assert (error[~b.paired] > 0.1).all()       # fresh noise: another sample
        break
    else:
        raise AssertionError("no step drew both paired and unpaired rows")


def test_the_pair_loss_is_the_squared_error_of_the_paired_rows(teacher):
    teacher_m, student, disc = models(teacher)
    b = batch(teacher_m)
    b.paired = torch.tensor([True, False, False])
    with_pairs, _, stats = student_gradient(student, teacher_m, disc, b, pair_weight=3.0)
    with torch.no_grad():
        x_t = flow.add_noise(b.x0, b.eps, b.t)
        x0_hat = flow.x0_from_v(x_t, student(x_t, b.t, b.context, b.pooled), b.t)
    assert stats["pair_loss"] == pytest.approx(((x0_hat[0] - b.x0[0]) ** 2).mean().item() / 3, rel=1e-5)
    without = student_gradient(student, teacher_m, disc, b)[0]
    assert not torch.allclose(with_pairs, without)  # the regression moves the student
    b.paired[:] = False
    no_pairs, _, stats = student_gradient(student, teacher_m, disc, b, pair_weight=3.0)
    assert stats["pair_loss"] == 0 and torch.equal(no_pairs, without)


def rows_of(b, rows):
    """The batch's rows `rows` (an index list or a slice) of every tensor field."""
    return dataclasses.replace(b, **{f.name: getattr(b, f.name)[rows] for f in dataclasses.fields(b)
                                     if torch.is_tensor(getattr(b, f.name))})


def test_the_pair_loss_over_split_rows_averages_to_the_whole_batch(teacher):
    """What DDP does with two processes: each takes half the rows, the gradients are averaged.
    With the pair loss (normalised by the rows a process holds) that equals the whole batch's."""
    teacher_m, student, disc = models(teacher)
    b = rows_of(batch(teacher_m, B=3), [0, 1, 2, 0])
    b.t = torch.tensor([1.0, 1.0, 0.25, 1.0])
    b.paired = torch.tensor([True, True, False, True])  # two paired rows in one half, one in the other

    def gradient(rows):
        return student_gradient(student, teacher_m, disc, rows_of(b, rows), pair_weight=30.0)[0]
    whole, halves = gradient(slice(0, 4)), (gradient(slice(0, 2)) + gradient(slice(2, 4))) / 2
    assert torch.allclose(whole, halves, rtol=0, atol=1e-6 * whole.abs().max())
