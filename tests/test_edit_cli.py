"""edit.py, the command line for instruction editing, on tiny editing models:

  * an edit writes out.png (one file per instruction) at the source's size, strip.png and
    config.json; a teacher edits guided by its defaults, a student unguided in its own steps;
  * --eval N prints one JSON line (followed, preserved, both and the settings) and writes
    grid.png and scores.json, the library's numbers;
  * every bad input is a one-line error that writes nothing; sample.py and inpaint.py refuse an
    editing model, naming edit.py;
  * the real-SD3 path: a tiny random SD3 whose patch embedding reads 32 channels
    (tests/tiny_sd3.py --edit), in both layouts, edited with free text by the block in
    docs/sd3.md, as written; its velocity equals diffusers' SD3Transformer2DModel with
    in_channels=32 (skipped without diffusers); SD3 widened with zeros samples as SD3.
"""
import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import edit
import editing
import images
import inpaint
import mmdit
import pipeline
import sample
import shapes
import tiny_sd3
from conftest import (expect_one_line_error, files, make_checkpoint, make_edit_checkpoint,
                      make_inpainting_checkpoint, read_png)
from test_sd3_chain import run_as_user

ONE_THREAD = True
REPO = Path(__file__).parent.parent
TEACHER = {"steps": 2, "cfg": 2.0, "shift": 1.0, "sampler": "euler"}    # image_cfg 1.5 added
STUDENT = {"times": [1.0, 0.5], "cfg": 1.0, "image_cfg": 1.0, "sampler": "euler"}
CAPTION = "a red circle to the left of a green triangle on a yellow background"
RECOLOUR, REMOVE = "make the red circle blue", "remove the green triangle"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """{"teacher", "student", "t2i", "inpaint"}: tiny checkpoints (the editing ones
    conftest.make_edit_checkpoint's), and a 24x16 shapes-world source image."""
    root = tmp_path_factory.mktemp("models")
    teacher = make_edit_checkpoint(str(root), TEACHER)
    out = {"teacher": teacher, "t2i": str(root / "model.safetensors"),
           "inpaint": make_inpainting_checkpoint(str(root), TEACHER)}
    out["student"] = make_edit_checkpoint(str(tmp_path_factory.mktemp("student")), STUDENT)
    images.save_png(shapes.render(CAPTION, 24, 16, rng=0), root / "source.png")
    images.save_png(shapes.render(CAPTION, 24, 18, rng=0), root / "odd.png")
    out["source"], out["odd"] = str(root / "source.png"), str(root / "odd.png")
    return out


def run_edit(*argv):
    return edit.main([*map(str, argv), "--device", "cpu"])


def expect_error(capsys, argv, *words):
    return expect_one_line_error(edit.main, capsys, [*map(str, argv), "--device", "cpu"], *words)


def counting(monkeypatch):
    """Every MMDiT pass's batch size, in order."""
    calls, forward = [], mmdit.MMDiT.forward
    monkeypatch.setattr(mmdit.MMDiT, "forward",
                        lambda self, x, *a, **k: calls.append(len(x)) or forward(self, x, *a, **k))
    return calls


# ----------------------------------------------------------------------------------------------
# an edit


def test_an_edit_writes_an_image_per_instruction_at_the_source_size(models, tmp_path, capsys,
                                                                    monkeypatch):
    out = tmp_path / "e"
    calls = counting(monkeypatch)
    run_edit("--ckpt", models["teacher"], "--image", models["source"], "--instruction", RECOLOUR,
             "--instruction", REMOVE, "--seed", 3, "--out", out, "--quiet")
    assert calls == [3 * 2] * 2  # 2 steps, one batched pass of 3 (two guidance scales) x 2 edits
    assert sorted(os.listdir(out)) == ["000.png", "001.png", "config.json", "out.png", "strip.png"]
    assert capsys.readouterr().out == ""
    first, second = read_png(out / "000.png"), read_png(out / "001.png")
    assert first.shape == second.shape == (16, 24, 3) and (read_png(out / "out.png") == first).all()
    # edit i starts from the noise of seed + i: the second alone, from seed 4, is the same image
    pipe = pipeline.load_pipeline(models["teacher"])
    source = images.load_image(models["source"])
    want = editing.edit(pipe, source, [REMOVE], seed=4)[0]
    assert np.abs(second - np.asarray(images.to_pil(want)).astype(int)).max() <= 1
    assert np.abs(first - second).max() > 0
    # the strip: a row per instruction, source | output, the instruction as its label
    probe = tmp_path / "probe.png"
    images.save_strip([[source, source]] * 2, probe, [RECOLOUR, REMOVE])
    assert read_png(out / "strip.png").shape == read_png(probe).shape
    config = json.loads((out / "config.json").read_text())
    assert (config["steps"], config["cfg"], config["image_cfg"]) == (2, 2.0, 1.5)  # the ckpt's
    assert config["instruction"] == [RECOLOUR, REMOVE] and (config["width"], config["height"]) == (24, 16)


def test_the_guidance_options_are_used_and_recorded(models, tmp_path, monkeypatch):
    calls = counting(monkeypatch)
    run_edit("--ckpt", models["teacher"], "--image", models["source"], "--instruction", RECOLOUR,
             "--cfg", 1, "--image-cfg", 1, "--steps", 3, "--out", tmp_path / "e", "--quiet")
    assert calls == [1] * 3  # both scales 1: unguided, one pass a step
    config = json.loads((tmp_path / "e" / "config.json").read_text())
    assert (config["steps"], config["cfg"], config["image_cfg"]) == (3, 1.0, 1.0)
    run_edit("--ckpt", models["teacher"], "--image", models["source"], "--instruction", RECOLOUR,
             "--out", tmp_path / "d", "--quiet")
    assert np.abs(read_png(tmp_path / "e" / "out.png") - read_png(tmp_path / "d" / "out.png")).max() > 0


def test_a_student_edits_unguided_in_its_own_steps(models, tmp_path, monkeypatch):
    calls = counting(monkeypatch)
    run_edit("--ckpt", models["student"], "--image", models["source"], "--instruction", RECOLOUR,
             "--out", tmp_path / "e", "--quiet")
    assert calls == [1, 1]  # its times 1, .5: two unguided passes
    config = json.loads((tmp_path / "e" / "config.json").read_text())
    assert (config["steps"], config["cfg"], config["image_cfg"]) == (2, 1.0, 1.0)
    assert config["sigmas"] == [1.0, 0.5, 0.0]


# ----------------------------------------------------------------------------------------------
# --eval


def test_eval_prints_one_json_line_and_writes_the_grid_and_scores(models, tmp_path, capsys):
    out = tmp_path / "ev"
    run_edit("--ckpt", models["teacher"], "--eval", 4, "--steps", 1, "--out", out, "--quiet")
    lines = capsys.readouterr().out.strip().split("\n")
    assert len(lines) == 1, lines
    line = json.loads(lines[0])
    assert set(line) == {"followed", "preserved", "both", "steps", "cfg", "image_cfg"}
    assert all(0 <= line[k] <= 1 for k in ("followed", "preserved", "both"))
    assert (line["steps"], line["cfg"], line["image_cfg"]) == (1, 2.0, 1.5)
    # the library's numbers, from the same edits
    pipe = pipeline.load_pipeline(models["teacher"])
    scores, rows = editing.evaluate(pipe, 4, keep=4, steps=1)   # seed: editing.EVAL_SEED, not 0
    assert scores == {k: line[k] for k in scores}
    assert sorted(os.listdir(out)) == ["grid.png", "scores.json"]
    saved = json.loads((out / "scores.json").read_text())
    assert saved["scores"] == scores and saved["eval"] == 4 and saved["image_cfg"] == 1.5
    # the grid: a row per edit (source | output | target), its instruction as the label
    assert saved["seed"] == editing.EVAL_SEED != 0   # not the LADD data's edits (seed 0)
    labels = [editing.task_of(editing.EVAL_SEED, i, 16, 16).instruction.text for i in range(4)]
    probe = tmp_path / "probe.png"
    images.save_strip([list(r) for r in rows], probe, labels)
    assert read_png(out / "grid.png").shape == read_png(probe).shape
    assert np.abs(read_png(out / "grid.png") - read_png(probe)).max() <= 1
    # again: refused without --overwrite, replaced with it
    before = files(out)
    expect_error(capsys, ["--ckpt", models["teacher"], "--eval", 2, "--out", out], "earlier outputs",
                 "--overwrite")
    assert files(out) == before
    run_edit("--ckpt", models["teacher"], "--eval", 2, "--steps", 1, "--out", out, "--overwrite",
             "--quiet")
    assert json.loads((out / "scores.json").read_text())["eval"] == 2


# ----------------------------------------------------------------------------------------------
# bad inputs: one line, nothing written


def test_bad_inputs_are_one_line_errors_that_write_nothing(models, tmp_path, capsys):
    t, src = models["teacher"], models["source"]
    one = ["--ckpt", t, "--image", src, "--instruction", RECOLOUR]
    cases = [
        (["--ckpt", t, "--image", tmp_path / "nope.png", "--instruction", RECOLOUR],
         "--image", "nope.png", "no such image file"),
        (["--ckpt", t, "--image", models["odd"], "--instruction", RECOLOUR],
         "24x18", "multiples of 4", "nearest valid sizes", "24x16"),
        (["--ckpt", models["t2i"], "--image", src, "--instruction", RECOLOUR],
         "text-to-image model", "edit.py needs an instruction-editing model", "--preset edit"),
        (["--ckpt", models["inpaint"], "--image", src, "--instruction", RECOLOUR],
         "inpainting model", "inpaint.py"),
        ([*one, "--instruction", "make the red circle sparkle"], "'make the red circle sparkle'",
         "edit grammar", *shapes.INSTRUCTIONS.values()),
        (["--ckpt", t, "--image", src, "--instruction", CAPTION], "edit grammar"),  # a caption
        ([*one, "--eval", 2], "--eval", "drop --image and --instruction"),
        (["--ckpt", t, "--instruction", RECOLOUR], "pass --image", "--eval N"),
        (["--ckpt", t], "pass --image", "--eval N"),
        (["--ckpt", t, "--image", src], "no instructions", "--instruction"),
        (["--ckpt", t, "--eval", -1], "--eval -1", ">= 0"),
        (["--ckpt", t, "--eval", 10001], "--eval 10001", "at most 10000"),
        ([*one, "--image-cfg", -1], "--image-cfg -1.0", ">= 0", "1 = unguided"),
        ([*one, "--image-cfg", "nan"], "--image-cfg nan"),
        ([*one, "--cfg", "inf"], "--cfg inf"),
        ([*one, "--steps", 0], "--steps 0"),
        ([*one, "--seed", -1], "--seed -1"),
        ([*one, "--text-encoders", tmp_path / "nowhere"], "--text-encoders", "nowhere"),
        ([*one, "--imagecfg", 2], "unknown option --imagecfg", "--image-cfg"),
    ]
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "out.png").write_bytes(b"an earlier edit")
    for out in (tmp_path / "fresh" / "out", earlier):
        for argv, *words in cases:
            before = files(out)
            expect_error(capsys, [*argv, "--out", out, "--quiet"], *words)
            assert files(out) == before, argv
    expect_error(capsys, [*one, "--out", earlier], f"--out {earlier}", "earlier outputs", "out.png",
                 "--overwrite")
    (tmp_path / "a_file").write_text("")
    expect_error(capsys, [*one, "--out", tmp_path / "a_file"], "--out", "is a file")
    expect_error(capsys, [*one, "--out", tmp_path / "a_file" / "o"], "--out", "cannot write")
    assert (tmp_path / "a_file").read_text() == ""
    assert (earlier / "out.png").read_bytes() == b"an earlier edit"


def test_a_wrong_checkpoint_or_instruction_is_refused_before_loading(models, tmp_path, capsys,
                                                                     no_loading):
    """The header says what a model is: no loading to refuse a t2i or inpainting model, or an
    instruction outside a shapes-world model's grammar."""
    for ckpt, instruction, word in ((models["t2i"], RECOLOUR, "text-to-image"),
                                    (models["inpaint"], RECOLOUR, "inpainting model"),
                                    (models["teacher"], "make it pop", "edit grammar")):
        expect_error(capsys, ["--ckpt", ckpt, "--image", models["source"], "--instruction",
                              instruction, "--out", tmp_path / "o"], word)
    assert not (tmp_path / "o").exists()


def test_out_as_a_png_file_is_the_one_edit_and_nothing_else(models, tmp_path, capsys):
    out = tmp_path / "edited.png"
    run_edit("--ckpt", models["teacher"], "--image", models["source"], "--instruction", RECOLOUR,
             "--steps", 1, "--out", out, "--quiet")
    assert os.listdir(tmp_path) == ["edited.png"] and read_png(out).shape == read_png(models["source"]).shape
    run_edit("--ckpt", models["teacher"], "--image", models["source"], "--instruction", RECOLOUR,
             "--steps", 1, "--out", tmp_path / "folder", "--quiet")
    assert np.array_equal(read_png(out), read_png(tmp_path / "folder" / "out.png"))
    before = out.read_bytes()
    expect_error(capsys, ["--ckpt", models["teacher"], "--image", models["source"], "--instruction",
                          RECOLOUR, "--out", out], "exists", "--overwrite")
    expect_error(capsys, ["--ckpt", models["teacher"], "--image", models["source"], "--instruction",
                          RECOLOUR, "--instruction", RECOLOUR, "--out", tmp_path / "two.png"],
                 "one --instruction")
    assert out.read_bytes() == before and not (tmp_path / "two.png").exists()


def test_eval_of_a_text_to_image_model_draws_the_target_captions(models, tmp_path, capsys):
    """The baseline that never sees the source: its samples of the target captions, judged as
    edits (the same numbers as the library's), and no image guidance to set."""
    run_edit("--ckpt", models["t2i"], "--eval", 3, "--steps", 1, "--seed", 0, "--out", tmp_path / "t2i",
             "--quiet")
    line = json.loads(capsys.readouterr().out)
    assert line["image_cfg"] is None and line["steps"] == 1
    pipe = pipeline.load_pipeline(models["t2i"])
    scores, rows = editing.evaluate(pipe, 3, 0, keep=1, steps=1)
    assert scores == {k: line[k] for k in scores}
    task = editing.task_of(0, 0, *pipe.sizes[0])
    want = pipeline.generate(pipe, [task.target.caption], *pipe.sizes[0], steps=1, progress=False)
    torch.testing.assert_close(rows[0][1], want[0], rtol=0, atol=1e-5)  # batch 3 vs 1
    expect_error(capsys, ["--ckpt", models["t2i"], "--eval", 2, "--image-cfg", 2, "--out",
                          tmp_path / "o"], "--image-cfg", "text-to-image")
    assert not (tmp_path / "o").exists()


def test_sample_and_inpaint_refuse_an_editing_model_naming_edit_py(models, tmp_path, capsys):
    teacher = models["teacher"]
    images.save_png(torch.ones(3, 16, 24), tmp_path / "mask.png")
    for main, argv in [
            (sample.main, ["--prompt", CAPTION]),
            (inpaint.main, ["--image", models["source"], "--mask", str(tmp_path / "mask.png"),
                            "--prompt", CAPTION]),
            (inpaint.main, ["--eval", "2"])]:
        expect_one_line_error(main, capsys, ["--ckpt", teacher, *argv, "--out", str(tmp_path / "o"),
                                             "--device", "cpu", "--quiet"],
                              "instruction-editing model", "latent and source latent", "edit.py")
    assert not (tmp_path / "o").exists()
    with pytest.raises(ValueError, match="edit.py"):
        pipeline.generate(pipeline.load_pipeline(teacher), [CAPTION], 16, 16, progress=False)


def test_every_option_has_a_description(capsys):
    with pytest.raises(SystemExit):
        edit.main(["--help"])
    text = capsys.readouterr().out.split("options:")[1]
    import re
    entries = re.split(r"\n  (?=-)", text)
    assert not [e.split()[0] for e in entries if e.strip() and len(e.split()) <= 2]


# ----------------------------------------------------------------------------------------------
# the real-SD3 path on a tiny random SD3 editing model

MARK = "<!-- edit: tests/test_edit_cli.py runs the next block -->"


def doc_commands():
    """The commands of the block after MARK in docs/sd3.md, continuation lines joined."""
    text = (REPO / "docs" / "sd3.md").read_text()
    assert text.count(MARK) == 1, f"the mark {MARK!r} must appear once in docs/sd3.md"
    block = text.split(MARK, 1)[1].split("```bash\n", 1)[1].split("\n```", 1)[0]
    return [c.strip() for c in block.replace("\\\n", " ").split("\n") if c.strip()]


@pytest.fixture(scope="module")
def sd3_edit(tmp_path_factory):
    """{"folder", "single"}: the tiny SD3 editing model in the diffusers and single-file layouts."""
    root = tmp_path_factory.mktemp("sd3")
    built = tiny_sd3.build_models(edit=True)
    return {"folder": tiny_sd3.write_diffusers(root / "tiny-sd3-edit", built),
            "single": tiny_sd3.write_single(root / "single" / "sd3.safetensors", built)}


def test_the_documented_sd3_edit_runs_as_written(tmp_path):
    """docs/sd3.md's block, one subprocess per command, in a fresh folder that sees docs/."""
    os.symlink(REPO / "docs", tmp_path / "docs")
    times = []
    for command in doc_commands():
        done, seconds = run_as_user(command, tmp_path)
        assert done.returncode == 0, f"{command}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
        times.append((command, round(seconds, 1)))
    print("\nthe documented SD3 edit, seconds per command (2 shared CPU cores):")
    for command, seconds in times:
        print(f"  {seconds:5.1f}  {command[:100]}")
    assert [c.split()[1] for c, _ in times] == ["tests/tiny_sd3.py", "edit.py"]
    out = tmp_path / "edits" / "tiny-sd3"
    assert sorted(os.listdir(out)) == ["000.png", "001.png", "config.json", "out.png", "strip.png"]
    for name in ("000.png", "001.png"):
        image = read_png(out / name)
        assert image.shape == (64, 64, 3) and image.std() > 0   # the source's size, not flat
    config = json.loads((out / "config.json").read_text())
    assert config["instruction"][1] == "turn it into a photo of a cat"  # free text, no grammar
    assert (config["steps"], config["cfg"], config["image_cfg"], config["shift"]) == (28, 7.0, 1.5, 3.0)


def test_both_layouts_load_as_the_same_editing_model_and_edit_with_free_text(sd3_edit, tmp_path):
    a, b = pipeline.load_pipeline(sd3_edit["folder"]), pipeline.load_pipeline(sd3_edit["single"])
    assert a.model.config == b.model.config == tiny_sd3.mmdit_config("sd3-medium", edit=True)
    assert (a.model.config.in_channels, a.model.config.out_channels) == (32, 16)
    assert editing.is_edit_model(a.model) and not pipeline.is_shapes(a)
    source = torch.rand(3, 32, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1
    outs = [editing.edit(p, source, ["make it winter", "add a hat"], steps=2, image_cfg=1.5, seed=1)
            for p in (a, b)]
    assert outs[0].shape == (2, 3, 32, 48) and torch.isfinite(outs[0]).all()
    assert torch.allclose(outs[0], outs[1], atol=1e-5, rtol=0)
    # the header tells edit.py what the single file is before it loads it
    assert edit.header_facts(str(sd3_edit["single"])) == (32, 16, False)
    # sample.py refuses it; --eval is for the shapes world
    with pytest.raises(ValueError, match="instruction-editing model.*edit.py"):
        pipeline.generate(a, ["a cat"], 32, 32, progress=False)
    with pytest.raises(SystemExit):
        edit.main(["--ckpt", str(sd3_edit["folder"]), "--eval", "2", "--out", str(tmp_path / "o"),
                   "--device", "cpu"])
    assert not (tmp_path / "o").exists()


def test_sd3_widened_with_zeros_samples_as_sd3_and_sd3_itself_is_refused(tmp_path, capsys):
    """docs/sd3.md's start for an SD3 edit model: the patch embedding's 16 new channels at zero
    (train_teacher.widen_input). It ignores the source: edits at both guidance scales are SD3's
    own guided samples from the same prompts and noise. SD3 itself is no editing model."""
    from train_teacher import widen_input
    models = tiny_sd3.build_models()
    t2i = tiny_sd3.write_diffusers(tmp_path / "t2i", models)
    sd3 = models["mmdit"]
    wide = mmdit.MMDiT(dataclasses.replace(sd3.config, in_channels=32))
    wide.load_state_dict(widen_input(sd3.state_dict(), 32))
    models["mmdit"] = wide
    zero = tiny_sd3.write_diffusers(tmp_path / "zero", models)
    a, b = pipeline.load_pipeline(t2i), pipeline.load_pipeline(zero)
    prompts = ["a red circle on a blue background", "the photo of a cat"]
    want = pipeline.generate(a, prompts, 32, 32, steps=3, seed=5, progress=False, decode=False)
    source = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    cond = pipeline.encode(b, prompts)
    latents = b.vae.encode(source).float()                                    # [2, 16, 4, 4]
    got = editing.edit_latents(b, latents, cond, [5, 6], steps=3, image_cfg=1.5)  # cfg: 7, SD3's
    assert torch.allclose(got, want, atol=1e-4, rtol=0), (got - want).abs().max()
    images.save_png(source[0], tmp_path / "source.png")
    expect_error(capsys, ["--ckpt", t2i, "--image", tmp_path / "source.png", "--instruction", "x",
                          "--out", tmp_path / "o"], "text-to-image model", "docs/sd3.md")
    assert not (tmp_path / "o").exists()


def test_the_tiny_sd3_edit_velocity_equals_diffusers(sd3_edit):
    """The folder's transformer through diffusers' SD3Transformer2DModel (in_channels 32 from its
    config.json) and through this project's MMDiT, on one [noisy latent | source latent] input."""
    diffusers = pytest.importorskip("diffusers")
    diffusers.utils.logging.set_verbosity_error()
    theirs = diffusers.SD3Transformer2DModel.from_pretrained(
        str(sd3_edit["folder"]), subfolder="transformer", torch_dtype=torch.float32).eval()
    assert (theirs.config.in_channels, theirs.config.out_channels) == (32, 16)
    ours = pipeline.load_pipeline(sd3_edit["folder"]).model
    g = torch.Generator().manual_seed(0)
    x, source = torch.randn(2, 16, 4, 6, generator=g), torch.randn(2, 16, 4, 6, generator=g)
    xs = torch.cat([x, source], dim=1)                                        # [2, 32, 4, 6]
    t = torch.tensor([0.9, 0.3])
    context, pooled = torch.randn(2, 154, 192, generator=g), torch.randn(2, 128, generator=g)
    with torch.no_grad():
        want = theirs(hidden_states=xs, encoder_hidden_states=context, pooled_projections=pooled,
                      timestep=1000 * t, return_dict=False)[0]                # [2, 16, 4, 6]
        got = ours(xs, t, context, pooled)
    rel = float((got - want).norm() / want.norm())
    print(f"\ntiny SD3 edit model vs diffusers: max abs {float((got - want).abs().max()):.1e}, "
          f"relative {rel:.1e}")
    assert got.shape == (2, 16, 4, 6) and rel < 1e-5
    with torch.no_grad():  # the source matters: another source, another velocity
        other = ours(torch.cat([x, torch.zeros_like(source)], dim=1), t, context, pooled)
    assert (other - got).abs().max() > 1e-3
