"""Tests for sample.py: the real CLI on a tiny self-describing checkpoint, seeds, img2img,
trajectories, student schedules and one-line errors."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import cli
import images
import mmdit
import pipeline
import sample
import shapes
import weights
from conftest import expect_one_line_error, files, read_png, read_only, PROMPTS, make_checkpoint

ONE_THREAD = True
P = ["--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--prompt", PROMPTS[2]]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return make_checkpoint(str(tmp_path_factory.mktemp("teacher")),
                           {"steps": 3, "cfg": 3.0, "shift": 1.0, "sampler": "euler"})


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    return make_checkpoint(str(tmp_path_factory.mktemp("student")),
                           {"times": [1.0, 0.75, 0.5, 0.25], "cfg": 1.0, "sampler": "euler"})


def main(argv):
    """sample.main on the CPU (fp32) unless argv names a device, so results match on any machine."""
    return sample.main(argv if "--device" in argv else [*argv, "--device", "cpu"])


def expect_error(capsys, argv, *words):
    return expect_one_line_error(sample.main, capsys, argv, *words)


# ----------------------------------------------------------------------------------------------


def test_main_writes_images_grid_and_config(teacher, tmp_path, capsys):
    out = tmp_path / "out"
    main(["--ckpt", os.path.dirname(teacher), *P, "--out", str(out), "--quiet"])  # a run folder
    for i in range(3):
        assert read_png(out / f"{i:03d}.png").shape == (16, 16, 3)  # the first "sizes" entry
    grid = Image.open(out / "grid.png")
    assert grid.size == (2 + 2 * 18, 2 + 2 * 18)  # 3 images: 2 per row, 2 px padding
    assert (out / "prompts.txt").read_text().splitlines()[1] == f"001.png\t{PROMPTS[1]}"
    config = json.loads((out / "config.json").read_text())
    assert config["steps"] == 3 and config["cfg"] == 3.0
    assert config["sigmas"] == pytest.approx([1.0, 0.5005, 0.001, 0.0], abs=1e-6)  # 3 steps, shift 1
    assert not [f for f in os.listdir(out) if f.startswith(".tmp")]  # nothing half-written
    assert capsys.readouterr().out == ""  # --quiet

    main(["--ckpt", teacher, "--prompt", PROMPTS[0], "--width", "24", "--height", "16",
                 "--out", str(out), "--quiet", "--overwrite"])  # the earlier 3 images replaced
    assert read_png(out / "000.png").shape == (16, 24, 3) and not (out / "001.png").exists()


def test_prompt_file_and_final_message(teacher, tmp_path, capsys):
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text(f"{PROMPTS[0]}\n\n{PROMPTS[2]}\n")
    out = tmp_path / "out"
    main(["--ckpt", teacher, "--prompt", str(prompt_file), "--out", str(out)])
    assert sorted(f for f in os.listdir(out) if f.endswith(".png")) == ["000.png", "001.png", "grid.png"]
    assert str(out) in capsys.readouterr().out


@pytest.mark.parametrize("sampler", ["euler", "renoise"])
def test_seed_gives_same_image_whatever_the_batch_size(teacher, tmp_path, sampler):
    outs = []
    for bs in (1, 3):
        out = tmp_path / f"bs{bs}"
        main(["--ckpt", teacher, *P, "--seed", "7", "--batch-size", str(bs),
                     "--sampler", sampler, "--out", str(out), "--quiet"])
        outs.append([read_png(out / f"{i:03d}.png") for i in range(3)])
    for a, b in zip(*outs):
        assert np.abs(a - b).max() <= 1
    assert np.abs(outs[0][0] - outs[0][1]).max() > 10  # different seeds and prompts differ
    main(["--ckpt", teacher, *P, "--seed", "8", "--out", str(tmp_path / "s8"), "--quiet"])
    assert np.abs(read_png(tmp_path / "s8" / "000.png") - outs[0][0]).max() > 10


def test_generate_is_batch_independent_and_in_range(teacher):
    pipe = pipeline.load_pipeline(teacher)
    assert not pipe.model.training and not any(p.requires_grad for p in pipe.model.parameters())
    assert pipe.sizes == [(16, 16), (24, 16)] and pipe.granularity == 4
    a = pipeline.generate(pipe, PROMPTS, 16, 16, seed=3, batch_size=1, progress=False)
    b = pipeline.generate(pipe, PROMPTS[:2], 16, 16, seed=3, batch_size=2, progress=False)
    assert a.shape == (3, 3, 16, 16) and a.min() >= -1 and a.max() <= 1
    torch.testing.assert_close(a[:2], b, atol=1e-5, rtol=0)


def test_img2img_strength_zero_is_the_vae_round_trip(teacher, tmp_path):
    pipe = pipeline.load_pipeline(teacher)
    image = shapes.render(PROMPTS[0], 16, 16, rng=0)
    images.save_png(image, tmp_path / "in.png")
    loaded = images.load_image(tmp_path / "in.png")
    torch.testing.assert_close(loaded, image, atol=1 / 127.5, rtol=0)  # PNG keeps 8 bits

    with torch.no_grad():
        round_trip = pipe.vae.decode(pipe.vae.encode(loaded[None]))[0]
    got = pipeline.generate(pipe, [PROMPTS[1]], 16, 16, init_image=loaded, strength=0.0, progress=False)
    torch.testing.assert_close(got[0], round_trip, atol=1e-5, rtol=0)
    moved = pipeline.generate(pipe, [PROMPTS[1]], 16, 16, init_image=loaded, strength=0.7, progress=False)
    assert (moved[0] - round_trip).abs().max() > 1e-3

    out = tmp_path / "out"
    main(["--ckpt", teacher, "--prompt", PROMPTS[1], "--init-image", str(tmp_path / "in.png"),
                 "--strength", "0", "--out", str(out), "--quiet"])
    expected = np.asarray(images.to_pil(round_trip)).astype(int)
    assert np.abs(read_png(out / "000.png") - expected).max() <= 1


def test_trajectory_has_a_row_per_sample_and_a_column_per_step(teacher, tmp_path):
    out = tmp_path / "out"
    main(["--ckpt", teacher, "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--steps", "4",
                 "--width", "24", "--height", "16", "--trajectory", "--out", str(out), "--quiet"])
    # 2 rows of 4 images of 24x16, 2 px padding around each
    assert Image.open(out / "trajectory.png").size == (2 + 4 * 26, 2 + 2 * 18)
    pipe = pipeline.load_pipeline(teacher)
    images, frames = pipeline.generate(pipe, PROMPTS[:2], 16, 16, steps=4, progress=False, trajectory=True)
    assert len(frames) == 4 and all(f.shape == images.shape for f in frames)
    torch.testing.assert_close(frames[-1], images)  # the last x0 estimate is the result (euler)


def record_times(monkeypatch):
    """Patch MMDiT.forward to record the t of every call."""
    calls, forward = [], mmdit.MMDiT.forward

    def spy(self, x, t, *args, **kwargs):
        calls.append(t.tolist())
        return forward(self, x, t, *args, **kwargs)
    monkeypatch.setattr(mmdit.MMDiT, "forward", spy)
    return calls


def test_student_times_are_the_default_schedule(student, tmp_path, monkeypatch):
    calls = record_times(monkeypatch)
    main(["--ckpt", student, *P, "--out", str(tmp_path / "a"), "--quiet"])
    assert [c[0] for c in calls] == [1.0, 0.75, 0.5, 0.25]  # cfg 1: one pass per step, all 3 images
    assert all(len(c) == 3 for c in calls)

    for steps, times in [("1", [1.0]), ("2", [1.0, 0.5])]:
        calls.clear()
        main(["--ckpt", student, *P, "--steps", steps, "--out", str(tmp_path / f"b{steps}"), "--quiet"])
        assert [c[0] for c in calls] == times

    calls.clear()  # cfg > 1: cond and uncond in one pass of twice the batch
    main(["--ckpt", student, "--prompt", PROMPTS[0], "--cfg", "2", "--out", str(tmp_path / "c"),
                 "--quiet"])
    assert [len(c) for c in calls] == [2] * 4


def test_teacher_steps_shift_and_cfg_override(teacher):
    pipe = pipeline.load_pipeline(teacher)
    s = pipeline.sampling_settings(pipe)
    assert s["sigmas"] == pytest.approx([1.0, 0.5005, 0.001, 0.0])
    assert s["cfg"] == 3.0 and s["sampler"] == "euler"
    s = pipeline.sampling_settings(pipe, steps=4, shift=3.0, cfg=1.0, sampler="renoise")
    assert s["sigmas"] == pytest.approx([1.0, 0.85769, 0.60215, 0.00893, 0.0], abs=1e-5)
    assert s["cfg"] == 1.0 and s["sampler"] == "renoise"


def test_cond_file_replaces_the_text_encoder(teacher, tmp_path):
    pipe = pipeline.load_pipeline(teacher)
    enc = pipeline.encode(pipe, PROMPTS[:2])
    cond = tmp_path / "cond.safetensors"
    weights.save_file({"context": enc.context, "pooled": enc.pooled, "uncond_context": enc.uncond_context,
                       "uncond_pooled": enc.uncond_pooled}, cond)
    main(["--ckpt", teacher, "--cond", str(cond), "--out", str(tmp_path / "a"), "--quiet"])
    main(["--ckpt", teacher, *P[:4], "--out", str(tmp_path / "b"), "--quiet"])
    for i in range(2):
        a, b = (read_png(tmp_path / d / f"{i:03d}.png") for d in "ab")
        assert np.abs(a - b).max() <= 1


def test_missing_sd3_text_encoders_are_a_clear_error(tmp_path, capsys):
    path = make_checkpoint(str(tmp_path), {"steps": 2, "cfg": 1.0})
    meta = weights.load_metadata(path)
    meta["text_encoder"] = json.dumps({"name": "sd3"})
    weights.save_file(dict(weights.load_file(path)), path + ".sd3", meta)
    expect_error(capsys, ["--ckpt", path + ".sd3", "--prompt", PROMPTS[0], "--out", str(tmp_path / "o")],
                 "holds no SD3 text encoders", "text_encoders.py", "--cond")


def test_missing_vae_names_the_expected_path(tmp_path, capsys):
    path = make_checkpoint(str(tmp_path), {"steps": 2, "cfg": 1.0})
    os.remove(tmp_path / "shapes_vae.safetensors")
    expect_error(capsys, ["--ckpt", path, "--prompt", PROMPTS[0]], str(tmp_path / "shapes_vae.safetensors"))


def test_bad_inputs_are_one_line_errors(teacher, tmp_path, capsys):
    base = ["--ckpt", teacher, "--prompt", PROMPTS[0], "--out", str(tmp_path / "o"), "--quiet"]
    expect_error(capsys, base + ["--stpes", "3"], "--stpes", "--steps")
    expect_error(capsys, base + ["--step", "3"], "--step")                  # no abbreviations
    expect_error(capsys, ["--prompt", PROMPTS[0]], "--ckpt")                 # required
    expect_error(capsys, base + ["--width", "30"], "30x16", "multiples of 4", "28x16 or 32x16")
    expect_error(capsys, base + ["--width", "1024"], "from 4 to 64")        # past the positional grid
    expect_error(capsys, ["--ckpt", str(tmp_path / "nope.safetensors"), "--prompt", PROMPTS[0]],
                 "nope.safetensors", "no such file")
    expect_error(capsys, ["--ckpt", str(tmp_path), "--prompt", PROMPTS[0]], "model.safetensors")
    vae_file = os.path.join(os.path.dirname(teacher), "shapes_vae.safetensors")
    expect_error(capsys, ["--ckpt", vae_file, "--prompt", PROMPTS[0]], "no MMDiT", "VAE")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    expect_error(capsys, base + ["--init-image", str(tmp_path / "bad.png")], "bad.png")
    expect_error(capsys, base + ["--init-image", str(tmp_path / "missing.png")], "missing.png")
    expect_error(capsys, base + ["--strength", "0.5"], "--init-image")
    expect_error(capsys, ["--ckpt", teacher, "--prompt", "a pink hexagon", "--quiet"],
                 "'a pink hexagon'", "not in the shapes grammar", "circle")
    expect_error(capsys, ["--ckpt", teacher, "--quiet"], "no prompts")
    expect_error(capsys, base + ["--sampler", "heun"], "heun")
    expect_error(capsys, base[:-3] + ["--out", teacher], "is a file")
    assert not (tmp_path / "o").exists()  # failed runs write nothing


def expect_nothing_written(capsys, argv, out, *words):
    """expect_error, and --out as it was: its files' bytes unchanged, a fresh --out not made."""
    before = files(out)
    err = expect_error(capsys, [*argv, "--out", str(out), "--quiet"], *words)
    assert files(out) == before
    return err


def test_bad_option_values_fail_before_any_work(teacher, student, tmp_path, capsys, no_loading):
    base = ["--ckpt", teacher, "--prompt", PROMPTS[0]]
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00a red circle\x00\x89PNG")
    (tmp_path / "a_file").write_text("")
    cases = [
        (["--cfg", "nan"], "--cfg nan", "finite number >= 0", "1 = unguided"),
        (["--cfg", "inf"], "--cfg inf", ">= 0"),
        (["--cfg", "-1"], "--cfg -1.0", ">= 0"),
        (["--shift", "nan"], "--shift nan", "finite number > 0"),
        (["--shift", "0"], "--shift 0.0", "> 0"),
        (["--steps", "0"], "--steps 0", "integer >= 1"),
        (["--batch-size", "0"], "--batch-size 0", "integer >= 1"),
        (["--width", "0"], "--width 0", "> 0"),
        (["--height", "-16"], "--height -16", "> 0"),
        (["--init-image", "in.png", "--strength", "1.5"], "--strength 1.5", "[0, 1]"),
        (["--init-image", "in.png", "--strength", "nan"], "--strength nan", "[0, 1]"),
        (["--ckpt", student, "--shift", "3"], "--shift 3.0", student, "student", "trained times",
         "teacher"),
        (["--prompt", str(tmp_path / "binary.txt")], "--prompt", "binary.txt", "UTF-8",
         "one prompt a line"),
    ]
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "000.png").write_bytes(b"an earlier result")
    for out in (tmp_path / "fresh" / "out", existing):
        for extra, *words in cases:
            argv = base + extra if extra[0] != "--prompt" else ["--ckpt", teacher, *extra]
            expect_nothing_written(capsys, argv, out, *words)
    for out in (tmp_path / "a_file" / "out", tmp_path / "a_file"):  # cannot be made
        expect_nothing_written(capsys, base, out, "--out", "a_file")
    assert (tmp_path / "a_file").read_text() == ""


def test_a_size_that_does_not_fit_names_the_valid_ones(teacher, tmp_path, capsys):
    expect_nothing_written(capsys, ["--ckpt", teacher, "--prompt", PROMPTS[0], "--width", "30"],
                           tmp_path / "o", "30x16", "multiples of 4", "28x16 or 32x16",
                           "trained sizes: 16x16, 24x16")


def test_read_only_out_fails_before_sampling(teacher, tmp_path, capsys, no_loading, monkeypatch):
    out = tmp_path / "ro"
    out.mkdir()
    (out / "old.png").write_bytes(b"an earlier result")
    read_only(out, monkeypatch)
    try:
        for where in (out, out / "sub"):
            expect_nothing_written(capsys, ["--ckpt", teacher, "--prompt", PROMPTS[0]], where,
                                   f"--out {where}", "cannot write", "Permission denied")
        assert files(out) == {"old.png": b"an earlier result"}
    finally:
        out.chmod(0o755)


def test_image_helpers(tmp_path):
    img = torch.linspace(-1, 1, 3 * 8 * 12).view(3, 8, 12)
    pil = images.to_pil(img)
    assert pil.size == (12, 8) and pil.getpixel((0, 0)) == (0, 85, 171)  # -1, -1/3, 1/3
    assert images.to_pil(torch.ones(3, 2, 2)).getpixel((1, 1)) == (255, 255, 255)
    images.save_png(img, tmp_path / "a.png")
    torch.testing.assert_close(images.load_image(tmp_path / "a.png"), img, atol=1 / 127.5, rtol=0)
    assert images.load_image(tmp_path / "a.png", 24, 16).shape == (3, 16, 24)
    assert images.load_image(tmp_path / "a.png", width=6).shape == (3, 4, 6)  # keeps the aspect
    images.save_grid([img, torch.zeros(3, 4, 4), img], tmp_path / "g.png", nrow=3, pad=1)  # mixed sizes
    assert Image.open(tmp_path / "g.png").size == (1 + 3 * 13, 1 + 9)
    images.save_strip([[img, img], [img]], tmp_path / "s.png", labels=["first", "second"])
    w, h = Image.open(tmp_path / "s.png").size
    assert h == 2 + 2 * 10 and w > 2 + 2 * 14  # room for the labels
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]
    with pytest.raises(ValueError, match="one image"):
        images.to_pil(img[None])


def test_device_and_dtype_choice():
    assert cli.pick_dtype("auto", "cpu") == torch.float32
    assert cli.pick_dtype("auto", "cuda") == torch.bfloat16
    assert cli.pick_device("cpu").type == "cpu"
    assert cli.pick_device("auto").type in ("cuda", "mps", "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            cli.pick_device("cuda")
    with pytest.raises(ValueError, match="not a device"):
        cli.pick_device("tpu9")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_matches_cpu(teacher, tmp_path):
    cpu = pipeline.load_pipeline(teacher)
    gpu = pipeline.load_pipeline(teacher, cli.pick_device("auto"), cli.pick_dtype("auto", "cuda"))
    assert gpu.device.type == "cuda" and gpu.dtype == torch.bfloat16
    a = pipeline.generate(cpu, PROMPTS, 24, 16, seed=5, progress=False)
    b = pipeline.generate(gpu, PROMPTS, 24, 16, seed=5, batch_size=2, sampler="renoise", progress=False)
    c = pipeline.generate(gpu, PROMPTS, 24, 16, seed=5, batch_size=3, sampler="renoise", progress=False)
    assert b.device.type == "cpu" and b.dtype == torch.float32
    torch.testing.assert_close(b, c, atol=0.02, rtol=0)  # bf16 kernels may differ per batch size
    d = pipeline.generate(gpu, PROMPTS, 24, 16, seed=5, progress=False)
    assert (a - d).abs().mean() < 0.05  # same noise, same model, bf16 vs fp32
    main(["--ckpt", teacher, *P, "--device", "auto", "--trajectory", "--out", str(tmp_path / "o"),
          "--quiet"])
    assert Image.open(tmp_path / "o" / "trajectory.png").size == (2 + 3 * 18, 2 + 3 * 18)
    assert json.loads((tmp_path / "o" / "config.json").read_text())["dtype"] == "bfloat16"
