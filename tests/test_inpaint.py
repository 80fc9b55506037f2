"""Tests for inpaint.py: unmasked pixels are the input exactly, masks at latent resolution, seeds
independent of the batch, the RePaint forward jump, the CLI and its one-line errors, and (with
the shipped teacher) a recolouring edit in the shapes world; inpainting models (channel layout,
the widened start, conditioning on the known region) and the edit evaluation."""
import dataclasses
import os

import numpy as np
import pytest
import torch
from PIL import Image

import flow
import images
import inpaint
import inpainting
import metrics
import pipeline
import shapes
from conftest import (expect_one_line_error, make_checkpoint, make_inpainting_checkpoint,  # tiny checkpoints
                      files, read_only, read_png, PROMPTS)

ONE_THREAD = True

TEACHER = os.path.join(os.path.dirname(__file__), "..", "assets", "shapes_teacher.safetensors")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(str(tmp_path_factory.mktemp("teacher")),
                           {"steps": 3, "cfg": 3.0, "shift": 1.0, "sampler": "euler"})


@pytest.fixture(scope="module")
def pipe(ckpt):
    return pipeline.load_pipeline(ckpt)


def box(h, w, top, left, bottom, right):
    mask = torch.zeros(1, h, w)
    mask[:, top:bottom, left:right] = 1
    return mask  # [1, H, W]


def image(w=24, h=16):
    return shapes.render(PROMPTS[1], w, h, rng=0)  # [3, H, W], pure palette colours


def expect_error(capsys, argv, *words):
    return expect_one_line_error(inpaint.main, capsys, argv, *words)


# ----------------------------------------------------------------------------------------------


MASKS = {
    "box": box(16, 24, 3, 5, 11, 14),
    "odd box": box(16, 24, 1, 1, 4, 23),  # edges not on the VAE's 2-pixel grid
    "speckle": (torch.rand(1, 16, 24, generator=torch.Generator().manual_seed(0)) < 0.2).float(),
}


@pytest.mark.parametrize("sampler", ["euler", "renoise"])
@pytest.mark.parametrize("name", list(MASKS))
def test_unmasked_pixels_are_the_input_exactly(pipe, name, sampler):
    img, mask = image(), MASKS[name]
    for seed in (0, 5):
        out = inpainting.inpaint(pipe, img, mask[0], PROMPTS[:2], seed=seed, sampler=sampler)  # [H, W] mask
        assert out.shape == (2, 3, 16, 24) and out.min() >= -1 and out.max() <= 1
        keep = (mask == 0).expand(3, -1, -1)
        for o in out:
            assert torch.equal(o[keep], img[keep])
            assert (o[~keep] - img[~keep]).abs().max() > 0.05  # the masked part was repainted


def test_all_zero_mask_returns_the_input(pipe):
    img = image()
    out = inpainting.inpaint(pipe, img, torch.zeros(1, 16, 24), PROMPTS, seed=2, resample=1, feather=1)
    assert torch.equal(out, img.expand(3, -1, -1, -1))


@pytest.mark.parametrize("sampler", ["euler", "renoise"])
def test_all_ones_mask_is_txt2img(pipe, sampler):
    """Nothing to keep: the blend is a no-op and the noise streams are flow.sample's."""
    got = inpainting.inpaint(pipe, image(), torch.ones(16, 24), PROMPTS[:2], seed=4, sampler=sampler)
    want = pipeline.generate(pipe, PROMPTS[:2], 24, 16, seed=4, sampler=sampler, progress=False)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_seed_gives_same_image_whatever_the_batch(pipe):
    img, mask = image(), MASKS["box"]
    for kw in ({"sampler": "renoise"}, {"resample": 1, "feather": 1}):
        two = inpainting.inpaint(pipe, img, mask, PROMPTS[:2], seed=3, **kw)
        one = inpainting.inpaint(pipe, img, mask, PROMPTS[:1], seed=3, **kw)
        second = inpainting.inpaint(pipe, img, mask, PROMPTS[1:2], seed=4, **kw)  # seed + 1
        torch.testing.assert_close(two, torch.cat([one, second]), atol=1e-5, rtol=0)
    other = inpainting.inpaint(pipe, img, mask, PROMPTS[:1], seed=9)
    assert (other - one).abs().max() > 1e-3


def test_resample_runs_and_still_composites_exactly(pipe, monkeypatch):
    img, mask = image(), MASKS["box"]
    calls, forward = [], pipe.model.forward
    monkeypatch.setattr(pipe.model, "forward", lambda x, t, *a: calls.append(t[0].item()) or forward(x, t, *a))
    out = inpainting.inpaint(pipe, img, mask, PROMPTS[:1], seed=1, resample=1)
    assert calls == pytest.approx([1.0, 1.0, 0.5005, 0.5005, 0.001, 0.001])  # every step twice
    keep = (mask == 0).expand(3, -1, -1)
    assert torch.equal(out[0][keep], img[keep])
    plain = inpainting.inpaint(pipe, img, mask, PROMPTS[:1], seed=1)
    assert (out - plain).abs().max() > 1e-3


def test_latent_mask_any_pixel_rule_and_feathering():
    mask = torch.zeros(2, 1, 8, 12)
    mask[0, 0, 3, 5] = 1                       # one pixel -> its latent pixel (1, 2)
    mask[1, 0, 4:8, 0:4] = 1
    m = inpainting.latent_mask(mask, 2)
    assert m.shape == (2, 1, 4, 6)
    assert m[0, 0, 1, 2] == 1 and m[0].sum() == 1
    assert m[1, 0, 2:, :2].eq(1).all() and m[1].sum() == 4
    assert inpainting.latent_mask(mask[:1], 4).shape == (1, 1, 2, 3)

    big = torch.zeros(1, 1, 32, 32)
    big[..., 8:24, 8:24] = 1
    hard = inpainting.latent_mask(big, 2)         # [1, 1, 16, 16], core 4:12
    soft = inpainting.latent_mask(big, 2, feather=2)
    assert soft.shape == hard.shape and soft.min() >= 0 and soft.max() <= 1
    assert soft[hard == 1].eq(1).all()         # the hard core stays 1
    ring = soft[(hard == 0) & (soft > 0)]
    assert len(ring) and (ring < 1).all()      # a soft edge outside it ...
    assert soft[0, 0, 8, :4].tolist() == pytest.approx([0, 0, 1 / 3, 2 / 3])  # ... a linear ramp
    assert soft[0, 0, 1, 1] == 0 and soft[0, 0, 2, 2] == pytest.approx(1 / 3)  # chessboard distance
    with pytest.raises(ValueError, match="multiple of the VAE factor"):
        inpainting.latent_mask(torch.zeros(1, 1, 7, 8), 2)


def test_forward_jump_gives_the_marginal():
    """x_s' = (1 - s') x0 + s' e1, jumped to s: mean (1 - s) x0 and std s."""
    g = torch.Generator().manual_seed(0)
    x0, s_from, s_to = 0.7, 0.3, 0.8
    x = flow.add_noise(torch.full((200_000,), x0), torch.randn(200_000, generator=g), s_from)
    y = inpainting.forward_jump(x, s_from, s_to, torch.randn(200_000, generator=g))
    assert abs(y.mean().item() - (1 - s_to) * x0) < 0.01 and abs(y.std().item() - s_to) < 0.01
    torch.testing.assert_close(inpainting.forward_jump(x, s_from, 1.0, x), x)  # s = 1: the noise


def test_object_mask_is_the_objects_box():
    caption = "a red circle to the left of a blue square on a yellow background"
    img = shapes.render(caption, 64, 64, 3)
    for index, colour in enumerate(["red", "blue"]):
        mask = inpainting.object_mask(caption, 64, 64, 3, index)[0] > 0   # [H, W]
        rgb = torch.tensor(shapes.PALETTE[colour]).float().view(3, 1, 1) / 127.5 - 1
        drawn = (img - rgb).abs().sum(0) < 1e-3                       # the object's pixels
        assert drawn.any() and not (drawn & ~mask).any()
        ys, xs = mask.nonzero().T
        assert mask.sum() == (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)  # a box
    with pytest.raises(ValueError, match="out of range"):
        inpainting.object_mask(caption, 64, 64, 3, 2)


def test_cli_writes_results_and_strip(ckpt, tmp_path, capsys):
    img, mask = image(), MASKS["box"]
    images.save_png(img, tmp_path / "in.png")
    Image.fromarray((mask[0].numpy() * 200).astype(np.uint8)).convert("RGBA").save(tmp_path / "m.png")
    out = tmp_path / "out"
    inpaint.main(["--ckpt", ckpt, "--image", str(tmp_path / "in.png"), "--mask", str(tmp_path / "m.png"),
                  "--prompt", PROMPTS[0], "--prompt", PROMPTS[2], "--seed", "6", "--out", str(out),
                  "--device", "cpu"])
    assert "out.png" in capsys.readouterr().out
    assert sorted(os.listdir(out)) == ["000.png", "001.png", "config.json", "out.png", "strip.png"]
    got, given = read_png(out / "out.png"), read_png(tmp_path / "in.png")
    keep = mask[0].numpy() == 0
    assert (got[keep] == given[keep]).all() and (got[~keep] != given[~keep]).any()
    assert (got == read_png(out / "000.png")).all()
    want = inpainting.inpaint(pipeline.load_pipeline(ckpt), img, mask, [PROMPTS[2]], seed=7)[0]
    assert np.abs(read_png(out / "001.png") - np.asarray(images.to_pil(want)).astype(int)).max() <= 1
    assert Image.open(out / "strip.png").size == (2 + 3 * 26, 2 + 2 * 18)  # 2 rows: in | mask | out


def test_bad_inputs_are_one_line_errors(ckpt, tmp_path, capsys):
    images.save_png(image(), tmp_path / "in.png")
    images.save_png(image(24, 18), tmp_path / "odd.png")
    images.save_png(torch.ones(3, 16, 16), tmp_path / "small_mask.png")
    images.save_png(torch.ones(3, 18, 24), tmp_path / "odd_mask.png")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    base = ["--ckpt", ckpt, "--prompt", PROMPTS[0], "--out", str(tmp_path / "o"), "--quiet"]
    expect_error(capsys, base + ["--image", str(tmp_path / "in.png"), "--mask", str(tmp_path / "small_mask.png")],
                 "small_mask.png", "16x16", "24x16", "same size")
    expect_error(capsys, base + ["--image", str(tmp_path / "in.png"), "--mask", str(tmp_path / "bad.png")],
                 "bad.png")
    expect_error(capsys, base + ["--image", str(tmp_path / "in.png"), "--mask", str(tmp_path / "nope.png")],
                 "nope.png", "no such")
    expect_error(capsys, base + ["--image", str(tmp_path / "odd.png"), "--mask", str(tmp_path / "odd_mask.png")],
                 "24x18", "multiples of 4")
    expect_error(capsys, base + ["--image", str(tmp_path / "in.png"), "--mask", str(tmp_path / "odd_mask.png"),
                                 "--resampel", "1"], "--resample")
    assert not (tmp_path / "o").exists()  # failed runs write nothing


def test_bad_option_values_fail_before_any_work(ckpt, tmp_path, capsys, no_loading):
    images.save_png(image(), tmp_path / "in.png")
    images.save_png(torch.ones(3, 16, 24), tmp_path / "m.png")
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00a red circle\x00\x89PNG")
    inputs = ["--ckpt", ckpt, "--image", str(tmp_path / "in.png"), "--mask", str(tmp_path / "m.png")]
    base = [*inputs, "--prompt", PROMPTS[0]]
    cases = [
        ([*base, "--cfg", "nan"], "--cfg nan", "finite number >= 0", "1 = unguided"),
        ([*base, "--cfg", "-1"], "--cfg -1.0", ">= 0"),
        ([*base, "--steps", "0"], "--steps 0", "integer >= 1"),
        ([*base, "--resample", "-1"], "--resample -1", ">= 0"),
        ([*base, "--feather", "-2"], "--feather -2", ">= 0"),
        ([*inputs, "--prompt", str(tmp_path / "binary.txt")], "--prompt", "binary.txt", "UTF-8",
         "one prompt a line"),
        (["--ckpt", ckpt, "--eval", "-1"], "--eval -1", ">= 0"),
        (["--ckpt", ckpt, "--eval", "2", "--seed", "-1"], "--seed -1", ">= 0", "--eval"),
        (["--ckpt", ckpt, "--eval", "2", "--cfg", "inf"], "--cfg inf"),
    ]
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "out.png").write_bytes(b"an earlier result")
    for out in (tmp_path / "fresh" / "out", existing):
        for argv, *words in cases:
            before = files(out)
            expect_error(capsys, [*argv, "--out", str(out), "--quiet"], *words)
            assert files(out) == before
    (tmp_path / "a_file").write_text("")
    for argv in (base, ["--ckpt", ckpt, "--eval", "2"]):
        expect_error(capsys, [*argv, "--out", str(tmp_path / "a_file" / "out")], "--out", "a_file",
                     "cannot write")
        expect_error(capsys, [*argv, "--out", str(tmp_path / "a_file")], "--out", "is a file")
    assert (tmp_path / "a_file").read_text() == ""


def test_read_only_out_fails_before_inpainting(ckpt, tmp_path, capsys, no_loading, monkeypatch):
    images.save_png(image(), tmp_path / "in.png")
    images.save_png(torch.ones(3, 16, 24), tmp_path / "m.png")
    out = tmp_path / "ro"
    out.mkdir()
    (out / "out.png").write_bytes(b"an earlier result")
    read_only(out, monkeypatch)
    try:
        for argv in (["--image", str(tmp_path / "in.png"), "--mask", str(tmp_path / "m.png"),
                      "--prompt", PROMPTS[0]], ["--eval", "2"]):
            expect_error(capsys, ["--ckpt", ckpt, *argv, "--out", str(out), "--quiet"],
                         f"--out {out}", "cannot write", "Permission denied")
        assert files(out) == {"out.png": b"an earlier result"}
    finally:
        out.chmod(0o755)


@pytest.mark.skipif(not os.path.isfile(TEACHER), reason="needs assets/shapes_teacher.safetensors")
def test_shipped_teacher_repaints_an_object():
    """Mask the square's box, ask for a green triangle there: the blue is gone, green appears
    inside the box, everything else is untouched (4 layouts, ~2 s on one thread)."""
    old = "a red circle to the left of a blue square on a yellow background"
    new = "a red circle to the left of a green triangle on a yellow background"
    pipe = pipeline.load_pipeline(TEACHER)
    green = torch.tensor(shapes.PALETTE["green"]).float().view(3, 1, 1) / 127.5 - 1
    for seed in range(4):
        img, mask = shapes.render(old, 64, 64, seed), inpainting.object_mask(old, 64, 64, seed, 1)
        out = inpainting.inpaint(pipe, img, mask, [new], steps=10, resample=1, seed=seed)[0]
        judged = shapes.judge(out, new)
        assert judged["colors"] and judged["background"], (seed, judged)
        inside = (out - green).abs().sum(0) < 0.3                  # near-green pixels [H, W]
        assert inside.sum() >= 20 and not (inside & (mask[0] == 0)).any(), seed


# ----------------------------------------------------------------------------------------------
# inpainting models (latent, mask and known latent in) and the edit evaluation


@pytest.fixture(scope="module")
def inpainter(tmp_path_factory):
    path = make_inpainting_checkpoint(str(tmp_path_factory.mktemp("inpainter")),
                                      {"steps": 3, "cfg": 3.0, "shift": 1.0, "sampler": "euler"})
    return pipeline.load_pipeline(path)


def test_channel_layout_of_the_inpainting_model(inpainter):
    z = inpainter.vae.config.z_channels
    assert inpainting.is_inpainting_model(inpainter.model) and inpainter.model.config.in_channels == 2 * z + 1
    z0, m = torch.randn(2, z, 4, 6), (torch.rand(2, 1, 4, 6) < 0.5).float()
    extra = inpainting.known_channels(z0, m)                                # [B, 1 + z, h, w]
    assert torch.equal(extra[:, :1], m) and torch.equal(extra[:, 1:], z0 * (1 - m))
    seen = []
    run = inpainting.conditioned(lambda x, *a: seen.append(x) or x[:, :z], extra)
    run(torch.zeros(4, z, 4, 6), None, None, None)                       # a guided pass: 2B
    assert torch.equal(seen[0][:, z:], torch.cat([extra, extra]))        # [x | mask | known]


def test_widened_model_starts_as_the_text_to_image_model(pipe):
    from train_teacher import widen_input
    t2i = pipe.model
    z = t2i.config.out_channels
    wide = type(t2i)(dataclasses.replace(t2i.config, in_channels=2 * z + 1))
    wide.load_state_dict(widen_input(t2i.state_dict(), 2 * z + 1))
    x, t = torch.randn(2, z, 8, 8), torch.rand(2)
    ctx, pooled = torch.randn(2, 5, t2i.config.context_dim), torch.randn(2, t2i.config.pooled_dim)
    extra = torch.randn(2, z + 1, 8, 8)
    assert torch.allclose(wide(torch.cat([x, extra], 1), t, ctx, pooled), t2i(x, t, ctx, pooled), atol=1e-6)


def test_inpainting_model_reads_the_known_region_and_composites_exactly(inpainter):
    img, mask = image(), MASKS["box"]
    out = inpainting.inpaint(inpainter, img, mask, [PROMPTS[0]], steps=2)[0]
    keep = mask.expand(3, -1, -1) == 0
    assert torch.equal(out[keep], img[keep]) and not torch.equal(out, img)
    other = img.clone()
    other[:, 12:, 16:] = -img[:, 12:, 16:]      # change the known region only (outside the box)
    out2 = inpainting.inpaint(inpainter, other, mask, [PROMPTS[0]], steps=2)[0]
    assert not torch.equal(out2[~keep], out[~keep])  # the repainted pixels depend on it
    with pytest.raises(ValueError, match="inpainting model"):
        inpainting.inpaint(inpainter, img, mask, [PROMPTS[0]], resample=1)
    with pytest.raises(ValueError, match="inpaint.py"):
        pipeline.generate(inpainter, [PROMPTS[0]], 24, 16)


def test_random_training_masks_are_boxes_inside_the_image():
    rng = np.random.default_rng(0)
    for i in range(40):
        img = shapes.render(shapes.random_caption(np.random.default_rng(i)), 64, 64, rng=i)
        m = inpainting.random_mask(img, rng)[0]                              # [H, W]
        ys, xs = torch.nonzero(m, as_tuple=True)
        assert len(ys) and set(m.unique().tolist()) <= {0.0, 1.0}
        assert m[ys.min():ys.max() + 1, xs.min():xs.max() + 1].all()     # one filled box


def test_edit_tasks_change_one_object_inside_its_box():
    for i in range(20):
        img, mask, new = inpainting.edit_task(np.random.default_rng([7, i]), 96, 48)
        after = shapes.parse_caption(new)
        assert img.shape == (3, 48, 96) and mask.shape == (1, 48, 96) and mask.sum() > 0
        # what is outside the box is the old scene: it must not show the new object's colour
        new_colours = {o.colour for o in after.objects}
        outside = img[:, mask[0] == 0]
        kept = {c for c in shapes.PALETTE
                if ((outside - torch.tensor(shapes.PALETTE[c]).view(3, 1) / 127.5 + 1).abs().sum(0) < 0.05).any()}
        assert len(new_colours - kept) == 1, (new, kept)


def test_edit_evaluation_and_its_cli(inpainter, ckpt, tmp_path, capsys):
    scores = metrics.judge_edits(inpainter, n=3, steps=2)
    assert scores["kept"] == 1.0 and 0 <= scores["all_correct"] <= 1
    inpaint.main(["--ckpt", ckpt, "--eval", "2", "--steps", "2", "--out", str(tmp_path / "e"), "--quiet"])
    assert '"kept": 1.0' in capsys.readouterr().out and (tmp_path / "e" / "edits.json").is_file()
    expect_error(capsys, ["--ckpt", ckpt, "--eval", "2", "--image", "x.png"], "--eval", "--image")
    expect_error(capsys, ["--ckpt", ckpt], "--image", "--eval")
    out = tmp_path / "never"
    expect_error(capsys, ["--ckpt", inpainter.path, "--eval", "2", "--resample", "1", "--out", str(out)],
                 "--resample 1", "training-free", "inpainting model")
    assert not out.exists()
