"""train_ladd.py --task edit: LADD distils an instruction-editing teacher (editing.py) into an
unguided few-step student, on tiny models (conftest.make_edit_checkpoint)."""
import dataclasses
import hashlib
import json
import os

import pytest
import torch

import editing
import images
import ladd_data
import ladd_run
import pipeline
import train_ladd
import weights
from conftest import (LADD_SAMPLER, expect_one_line_error, ladd_argv, make_edit_checkpoint,
                      make_inpainting_checkpoint)
from test_train_ladd import batch, models, opt, tensors

ONE_THREAD = True


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A tiny editing teacher (image_cfg 1.5), its t2i parent model.safetensors beside it."""
    return make_edit_checkpoint(str(tmp_path_factory.mktemp("edit_teacher")), LADD_SAMPLER)


@pytest.fixture(scope="module")
def run(teacher, tmp_path_factory):
    out = tmp_path_factory.mktemp("edit_run") / "run"
    train_ladd.main(ladd_argv(teacher, out, "--task", "edit", "--judge-n", "2"))
    return out


def load_teacher(path):
    return pipeline.load_pipeline(path)


def shard_of(teacher, name="16x16_0000.safetensors"):
    """The run's data, cached beside the teacher -> (a shard's tensors, settings, captions)."""
    data = os.path.join(os.path.dirname(teacher), "data")
    (path,) = [p for p in (os.path.join(data, d, name) for d in os.listdir(data)) if os.path.isfile(p)]
    meta = weights.load_metadata(path)
    return weights.load_file(path), json.loads(meta["settings"]), json.loads(meta["captions"])


def test_an_edit_run_distils_the_teachers_own_edits_into_an_editing_student(teacher, run):
    shard, settings, captions = shard_of(teacher)
    # the data: instructions of the edits task_of(seed 0, i), the sources' latents as the extra
    # channels, and x0 the teacher's own edits with both its guidance scales
    t = load_teacher(teacher)
    tasks = [editing.task_of(0, i, 16, 16) for i in range(4)]  # bucket 16x16: edits 0-3
    assert captions == [task.instruction.text for task in tasks]
    assert settings["task"] == "edit" and settings["image_cfg"] == 1.5 and "vae" in settings
    sources = ladd_data.encode_images(t, torch.stack([task.render()[0] for task in tasks]))
    assert shard["extra"].dtype == torch.float16 and shard["extra"].shape == (4, sources.shape[1], 8, 8)
    assert torch.equal(shard["extra"], sources.half())
    edits = editing.edit_latents(t, sources, pipeline.encode(t, captions),
                                 [ladd_data.NOISE_SEED + i for i in range(4)], 2, 2.0, 1.5)
    assert torch.equal(shard["latents"], edits.half())
    # the student: an editing model, unguided in its checkpoint, judged on edits at 4, 2, 1 steps
    student = pipeline.load_pipeline(str(run))
    assert editing.is_edit_model(student.model) and student.model.config == t.model.config
    sampler = json.loads(student.metadata["sampler"])
    assert sampler["cfg"] == 1.0 and sampler["image_cfg"] == 1.0 and len(sampler["times"]) == 4
    assert set(json.loads(student.metadata["judge"])) == {"followed", "preserved", "both"}
    assert set(json.loads(student.metadata["judge_fewer_steps"])) == {"2", "1"}
    assert (run / "grid.png").is_file()


def test_real_edit_data_are_the_rendered_targets_through_the_vae(teacher, tmp_path):
    train_ladd.main(ladd_argv(teacher, tmp_path / "real", "--task", "edit", "--data", "real",
                              "--steps", "1", "--data-dir", str(tmp_path / "data")))
    (folder,) = [p for p in (tmp_path / "data").iterdir() if p.is_dir()]
    shard = weights.load_file(folder / "24x16_0000.safetensors")
    t = load_teacher(teacher)
    pairs = [editing.task_of(0, i, 24, 16).render() for i in range(4, 8)]  # bucket 24x16: 4-7
    for k, key in ((0, "extra"), (1, "latents")):  # the sources, the targets
        encoded = ladd_data.encode_images(t, torch.stack([p[k] for p in pairs]))
        assert torch.equal(shard[key], encoded.half()), key


def test_the_edit_student_samples_one_unguided_pass_per_step(teacher, run):
    student, t = pipeline.load_pipeline(str(run)), load_teacher(teacher)
    task = editing.task_of(5, 0, 16, 16)
    rows = {}
    for name, pipe in (("student", student), ("teacher", t)):
        calls = []
        hook = pipe.model.register_forward_pre_hook(lambda m, args: calls.append(len(args[0])))
        editing.edit(pipe, task.render()[0], [task.instruction.text] * 2)
        hook.remove()
        rows[name] = calls
    assert rows["student"] == [2] * 4  # 4 steps, one pass of the 2 edits each
    assert rows["teacher"] == [3 * 2] * 2  # guided: text, image and neither, 3 passes a step
    # the student reads the source: another source, another edit
    a, b = (editing.edit(student, src, [task.instruction.text]) for src in task.render())
    assert not torch.equal(a, b)


def test_the_source_channels_reach_the_students_loss(teacher):
    """The extra channels are the source latent [B, z, h, w]: student and teacher both read them."""
    t, student, disc = models(teacher)
    b = batch(t)
    z = t.config.out_channels
    losses, features = [], []
    for scale in (1.0, -1.0):
        b.known = scale * torch.ones(3, z, 8, 12)
        with torch.no_grad():
            features.append(t.features(b.input(b.x0), b.t_hat, b.context, b.pooled, disc.blocks)[0])
        _, stats = train_ladd.student_step(student, t, disc, opt(student), b)
        losses.append(stats["student_loss"])
    assert losses[0] != losses[1] and not torch.equal(*features)


def test_resume_of_an_edit_run_matches_an_uninterrupted_one(teacher, run, tmp_path):
    whole, part = tmp_path / "whole", tmp_path / "part"
    train_ladd.main(ladd_argv(teacher, whole, "--task", "edit", "--steps", "4"))
    train_ladd.main(ladd_argv(teacher, part, "--task", "edit", "--steps", "2"))
    assert weights.load_state(part / "state.safetensors")["step"] == 2
    train_ladd.main(["--resume", str(part), "--steps", "4"])
    a, b = (tensors(weights.load_state(f / "state.safetensors")) for f in (whole, part))
    assert a.keys() == b.keys() and len(a) > 100  # weights, EMA, heads, optimizers
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_edit_grid_shows_source_target_teacher_and_student(teacher, run, monkeypatch):
    t, student = load_teacher(teacher), pipeline.load_pipeline(str(run))
    cfg = dataclasses.replace(train_ladd.Config(), task="edit")
    grid = ladd_run.grid_prompts(cfg, None, t)
    assert grid == [editing.task_of(99, i, 16, 16) for i in range(6)]
    saved = []
    monkeypatch.setattr(images, "save_strip", lambda rows, path, labels: saved.append((rows, labels)))
    ladd_run.comparison_grid(t, student, grid, "grid.png", {})
    ((rows, labels),) = saved
    assert labels == ["source", "target", "teacher 2 steps, cfg 2, image cfg 1.5",
                      "teacher 4 steps, cfg 2, image cfg 1.5", "student 4 steps", "student 1 step"]
    assert all(r.shape == (6, 3, 16, 16) for r in rows)
    assert torch.equal(rows[0], torch.stack([task.render()[0] for task in grid]))
    assert torch.equal(rows[4], editing.edit(student, rows[0], [g.instruction.text for g in grid]))


def test_task_and_teacher_mismatches_are_one_line_errors(teacher, tmp_path, capsys):
    plain = os.path.join(os.path.dirname(teacher), "model.safetensors")  # its t2i parent
    expect_one_line_error(train_ladd.main, capsys, ladd_argv(plain, tmp_path / "x", "--task", "edit"),
                          "--task edit needs an editing teacher", plain, "train_teacher.py --preset edit")
    for task in ("t2i", "inpaint"):
        expect_one_line_error(train_ladd.main, capsys, ladd_argv(teacher, tmp_path / "x", "--task", task),
                              f"--teacher {teacher} is an editing model", "pass --task edit")
    inpainter = make_inpainting_checkpoint(str(tmp_path), LADD_SAMPLER)
    expect_one_line_error(train_ladd.main, capsys,
                          ladd_argv(inpainter, tmp_path / "x", "--task", "edit"), "editing teacher")
    expect_one_line_error(train_ladd.main, capsys,
                          ladd_argv(teacher, tmp_path / "x", "--task", "edit", "--data-sizes", "16x16"),
                          "--data-sizes", "--task edit uses the teacher's sizes")


def test_edit_options_that_do_not_apply_fail_before_any_work(teacher, tmp_path, capsys, no_loading):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle on a blue background\n")
    for option, value, words in (("--prompts", str(prompts), ["--prompts", "--task edit"]),
                                 ("--cond", str(tmp_path / "c.safetensors"), ["--cond", "--task edit"]),
                                 ("--distill-weight", "1", ["--distill-weight 1", "image guidance"])):
        expect_one_line_error(train_ladd.main, capsys,
                              ladd_argv(teacher, tmp_path / "x", "--task", "edit", option, value), *words)
    cfg = dataclasses.replace(train_ladd.Config(), task="edit", out=str(tmp_path / "y"),
                              data_dir=str(tmp_path / "d"))
    assert ladd_run.check_config(cfg)[0].teacher == os.path.join("assets", "shapes_edit_teacher.safetensors")


def key_of(task, teacher, data_dir):
    """The data cache key of the default run of `task` with `teacher`, as build_dataset names it."""
    cfg = dataclasses.replace(train_ladd.Config(), task=task, teacher=teacher, data_dir=str(data_dir))
    pipe = pipeline.load_pipeline(teacher)
    describe, _ = ladd_data.prompt_source(cfg, pipe)
    settings = ladd_data.data_settings(cfg, pipe, describe, pipe.sizes)
    return hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16], settings


def test_the_t2i_and_inpaint_data_cache_keys_are_unchanged(teacher, tmp_path):
    """The default run's key names its shipped data; an inpaint run's settings are the ones made
    before --task edit existed; only an edit run's settings name the teacher's image guidance."""
    t2i, settings = key_of("t2i", "assets/shapes_teacher.safetensors", tmp_path)
    assert os.path.isdir(os.path.join(ladd_data.SHIPPED_DATA, t2i)) and "image_cfg" not in settings
    _, settings = key_of("inpaint", "assets/shapes_inpaint_teacher.safetensors", tmp_path)
    assert set(settings) == {"kind", "teacher", "text_encoder", "prompts", "steps", "cfg", "shift",
                             "sampler", "sizes", "size", "seed", "vae", "task"}
    _, settings = key_of("edit", teacher, tmp_path)
    assert settings["prompts"] == "edit-tasks" and settings["image_cfg"] == 1.5


def test_the_edit_preset_is_the_edit_task_with_fewer_steps_and_its_own_folder():
    """--preset edit shares the data of --task edit (same cache key): only steps and out differ."""
    default, edit = train_ladd.Config(), train_ladd.Config(**train_ladd.PRESETS["edit"])
    changed = {f.name for f in dataclasses.fields(default)
               if getattr(default, f.name) != getattr(edit, f.name)}
    assert changed == {"task", "steps", "out"} and edit.task == "edit" and edit.steps < default.steps
