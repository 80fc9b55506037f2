"""The shapes world: grammar, layout rules, renderer, text encoder, batches and the judge."""

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import shapes
from shapes import PALETTE, SHAPES, SIZES, Obj, Scene

BUCKETS = list(SIZES.values())  # (width, height): square, landscape, portrait
LEFT = "a red circle to the left of a blue square on a yellow background"
LEFT_SWAPPED = "a blue square to the left of a red circle on a yellow background"


def every_caption():
    """All captions of the grammar (a few thousand), for exhaustive grammar checks."""
    for (bg, c1), s1 in itertools.product(itertools.permutations(PALETTE, 2), SHAPES):
        yield f"a {c1} {s1} on a {bg} background"
    for (bg, c1, c2), s1, s2 in itertools.product(itertools.permutations(PALETTE, 3), SHAPES, SHAPES):
        yield f"a {c1} {s1} to the left of a {c2} {s2} on a {bg} background"
        yield f"a {c1} {s1} above a {c2} {s2} on a {bg} background"


def gauss_blur(image, sigma):
    """Separable gaussian blur of [3, H, W] with replicated borders."""
    r = int(3 * sigma)
    k = torch.exp(-torch.arange(-r, r + 1.0) ** 2 / (2 * sigma ** 2))
    k = (k / k.sum()).view(1, 1, 1, -1).repeat(3, 1, 1, 1)             # [3, 1, 1, 2r+1]
    x = F.pad(image[None], (r, r, r, r), mode="replicate")              # [1, 3, H+2r, W+2r]
    x = F.conv2d(F.conv2d(x, k, groups=3), k.transpose(2, 3), groups=3)  # [1, 3, H, W]
    return x[0]


@pytest.fixture(scope="module")
def clean_set():
    """~200 random captions rendered over the three aspect buckets."""
    rng = np.random.default_rng(0)
    out = []
    for k, (w, h) in enumerate(BUCKETS):
        captions = [shapes.random_caption(rng) for _ in range(66)]
        out.append((captions, shapes.render_batch(captions, w, h, seed=100 * k)))
    return out

# -----------------------------------------------------------------------------
# grammar


def test_every_caption_parses_and_round_trips():
    captions = list(every_caption())
    assert len(set(captions)) == len(captions) > 2000
    for caption in captions:
        assert shapes.parse_caption(caption).caption == caption


def test_parse_fields_and_normalisation():
    scene = shapes.parse_caption("  A Red CIRCLE   above a green triangle on a  black background ")
    assert scene == Scene("black", (Obj("red", "circle"), Obj("green", "triangle")), "above")
    assert shapes.parse_caption("a white square on a purple background") == \
        Scene("purple", (Obj("white", "square"),), None)


@pytest.mark.parametrize("bad", [
    "", "a red circle", "a pink circle on a blue background", "a red hexagon on a blue background",
    "a red circle below a blue square on a green background", "a red circle on a blue background please",
    "red circle on a blue background", "a red circle to the right of a blue square on a green background",
])
def test_bad_captions_list_the_vocabulary(bad):
    with pytest.raises(ValueError) as err:
        shapes.parse_caption(bad)
    message = str(err.value)
    assert repr(bad) in message
    for word in [*PALETTE, *SHAPES, *shapes.FORMS]:
        assert word in message


@pytest.mark.parametrize("bad", ["a red circle on a red background",
                                 "a red circle above a red square on a blue background"])
def test_repeated_colours_are_rejected(bad):
    with pytest.raises(ValueError, match="repeats a colour"):
        shapes.parse_caption(bad)


def test_random_caption_parses_and_covers_the_grammar():
    rng = np.random.default_rng(0)
    scenes = [shapes.parse_caption(shapes.random_caption(rng)) for _ in range(2000)]
    share = {form: np.mean([s.relation == form for s in scenes]) for form in (None, *shapes.RELATIONS)}
    assert 0.45 < share[None] < 0.55  # one object half the time ...
    assert all(0.2 < share[r] < 0.3 for r in shapes.RELATIONS)  # ... each relation a quarter
    assert {o.shape for s in scenes for o in s.objects} == set(SHAPES)
    assert {o.colour for s in scenes for o in s.objects} == {s.background for s in scenes} == set(PALETTE)
    assert shapes.random_caption(7) == shapes.random_caption(np.random.default_rng(7))

# -----------------------------------------------------------------------------
# layout and renderer


@pytest.mark.parametrize("width,height", BUCKETS + [(16, 16), (16, 40), (40, 16)])
def test_layout_rules(width, height):
    rng = np.random.default_rng(1)
    short = min(width, height)
    for _ in range(300):
        scene = shapes.parse_caption(shapes.random_caption(rng))
        boxes = shapes.layout(scene, width, height, rng)
        assert len(boxes) == len(scene.objects)
        for x, y, side in boxes:
            assert 0 <= x and x + side <= width and 0 <= y and y + side <= height
            assert 0.30 * short <= side <= 0.45 * short
        if len(boxes) == 2:
            (x1, y1, s1), (x2, y2, s2) = boxes
            overlap_x = x1 < x2 + s2 and x2 < x1 + s1
            overlap_y = y1 < y2 + s2 and y2 < y1 + s1
            assert not (overlap_x and overlap_y)
            cx1, cy1, cx2, cy2 = x1 + s1 / 2, y1 + s1 / 2, x2 + s2 / 2, y2 + s2 / 2
            if scene.relation == "to the left of":
                assert cx1 < cx2 and abs(cy2 - cy1) < cx2 - cx1
            else:
                assert cy1 < cy2 and abs(cx2 - cx1) < cy2 - cy1


@pytest.mark.parametrize("width,height", BUCKETS)
def test_render_uses_pure_distinct_palette_colours(width, height):
    rng = np.random.default_rng(2)
    for _ in range(20):
        caption = shapes.random_caption(rng)
        scene = shapes.parse_caption(caption)
        image = shapes.render(caption, width, height, rng)
        assert image.shape == (3, height, width) and image.dtype == torch.float32
        assert image.min() >= -1 and image.max() <= 1
        rgb = ((image + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).reshape(-1, 3)
        found = {tuple(c) for c in rgb.unique(dim=0).tolist()}
        want = {PALETTE[scene.background], *(PALETTE[o.colour] for o in scene.objects)}
        assert found == want


def test_render_is_deterministic_under_a_seed():
    a = shapes.render(LEFT, 64, 64, np.random.default_rng(5))
    assert torch.equal(a, shapes.render(LEFT, 64, 64, 5))
    assert not torch.equal(a, shapes.render(LEFT, 64, 64, 6))
    batch = shapes.render_batch([LEFT, LEFT_SWAPPED], 96, 48, seed=10)
    assert batch.shape == (2, 3, 48, 96)
    assert torch.equal(batch[1], shapes.render(LEFT_SWAPPED, 96, 48, 11))  # image i uses seed + i


def test_render_errors():
    with pytest.raises(ValueError, match="at least 16"):
        shapes.render(LEFT, 15, 64, 0)
    with pytest.raises(ValueError, match="integer width and height"):
        shapes.render(LEFT, 64.0, 64, 0)
    assert shapes.render(LEFT, np.int64(32), 32, 0).shape == (3, 32, 32)
    with pytest.raises(ValueError, match="not in the shapes grammar"):
        shapes.render("a cat", 64, 64, 0)


def test_batches_are_deterministic_and_one_size_each():
    first = list(itertools.islice(shapes.batches(4, seed=3), 12))
    again = list(itertools.islice(shapes.batches(4, seed=3, start_step=7), 5))
    for (img_a, cap_a, size_a), (img_b, cap_b, size_b) in zip(first[7:], again):  # resume mid-stream
        assert torch.equal(img_a, img_b) and cap_a == cap_b and size_a == size_b
    assert {size for _, _, size in first} == set(BUCKETS)
    for images, captions, (w, h) in first:
        assert images.shape == (4, 3, h, w) and len(captions) == 4
    other = next(shapes.batches(4, seed=4))
    assert other[1] != first[0][1]
    only = next(shapes.batches(2, sizes=[(32, 48)], seed=0))
    assert only[0].shape == (2, 3, 48, 32) and only[2] == (32, 48)

# -----------------------------------------------------------------------------
# text encoder


def test_text_encoder_shapes_and_order_sensitivity():
    enc = shapes.ShapesTextEncoder(dim=64)
    assert enc.max_length == len(LEFT.split()) == 14  # the longest form: "to the left of" 
    assert sum(p.numel() for p in enc.parameters()) == 0 and len(enc.state_dict()) == 0
    context, pooled = enc.encode([LEFT, LEFT_SWAPPED, LEFT, "", "a red circle on a blue background"])
    assert context.shape == (5, 14, 64) and pooled.shape == (5, 64)
    assert context.dtype == pooled.dtype == torch.float32
    assert not torch.allclose(context[0], context[1]) and not torch.allclose(pooled[0], pooled[1])
    assert torch.equal(context[0], context[2]) and torch.equal(pooled[0], pooled[2])
    assert not context[3].any() and not pooled[3].any()  # "" = unconditional
    assert context[4, :7].abs().sum(-1).min() > 0 and not context[4, 7:].any()  # 7 words, then padding
    # case and spacing do not matter; a second encoder with the same seed gives the same numbers
    c2, p2 = shapes.ShapesTextEncoder(dim=64).encode(["  " + LEFT.upper()])
    assert torch.equal(c2[0], context[0]) and torch.equal(p2[0], pooled[0])


def test_text_encoder_errors_and_device():
    enc = shapes.ShapesTextEncoder(dim=32, pooled_dim=16).to("cpu")
    with pytest.raises(ValueError, match="colours: red"):
        enc.encode(["a red cat on a blue background"])
    with pytest.raises(ValueError, match="list of prompts"):
        enc.encode(LEFT)
    with pytest.raises(ValueError, match="even dim"):
        shapes.ShapesTextEncoder(dim=7)
    context, pooled = enc.encode([LEFT])
    assert context.shape == (1, 14, 32) and pooled.shape == (1, 16)

# -----------------------------------------------------------------------------
# judge


def test_judge_clean_renders(clean_set):
    scores = [shapes.judge(image, c) for captions, images in clean_set for image, c in zip(images, captions)]
    assert np.mean([s["all_correct"] for s in scores]) >= 0.98
    assert min(s["purity"] for s in scores) > 0.999
    assert set(scores[0]) == {"background", "colors", "shapes", "relation", "count", "all_correct", "purity"}
    captions, images = clean_set[0]
    assert shapes.judge(images[0].numpy(), captions[0]) == scores[0]  # numpy input works too


def test_judge_blur_lowers_purity(clean_set):
    for captions, images in clean_set:
        blurred = torch.stack([gauss_blur(x, 1.5) for x in images])
        assert shapes.judge_batch(blurred, captions)["purity"] < 0.96
        heavy = torch.stack([gauss_blur(x, 3.0) for x in images])
        scores = shapes.judge_batch(heavy, captions)
        assert scores["purity"] < 0.9 and scores["all_correct"] < 0.8


def test_judge_colour_shift_breaks_colours(clean_set):
    captions, images = clean_set[0]
    scores = shapes.judge_batch((images + 0.4).clamp(-1, 1), captions)
    assert scores["background"] < 0.3 and scores["colors"] < 0.3 and scores["purity"] < 0.1
    swapped = images[:, [2, 0, 1]]  # hue rotation by a channel swap
    assert shapes.judge_batch(swapped, captions)["all_correct"] < 0.2


def test_judge_relation_and_shape_mistakes():
    image = shapes.render(LEFT, 64, 64, 0)
    assert shapes.judge(image, LEFT)["all_correct"]
    wrong = shapes.judge(image, LEFT_SWAPPED)  # same objects, opposite order
    assert not wrong["relation"] and wrong["colors"] and wrong["shapes"] and not wrong["all_correct"]
    above = shapes.judge(image, "a red circle above a blue square on a yellow background")
    assert not above["relation"]  # a side-by-side pair is not stacked
    other = shapes.judge(image, "a red triangle to the left of a blue square on a yellow background")
    assert not other["shapes"] and other["relation"]
    missing = shapes.judge(image, "a red circle on a yellow background")
    assert not missing["count"] and not missing["all_correct"] and missing["shapes"]


def test_judge_each_shape_alone():
    for shape, (w, h) in itertools.product(SHAPES, BUCKETS):
        for seed in range(5):
            caption = f"a white {shape} on a black background"
            assert shapes.judge(shapes.render(caption, w, h, seed), caption)["all_correct"]
            wrong = SHAPES[(SHAPES.index(shape) + 1) % 3]
            assert not shapes.judge(shapes.render(caption, w, h, seed), caption.replace(shape, wrong))["shapes"]


def test_judge_ignores_specks_and_tolerates_noise():
    caption = "a green triangle above a purple circle on a white background"
    image = shapes.render(caption, 48, 96, 3)
    noisy = (image + 0.08 * torch.randn(image.shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
    noisy[:, 2:4, 2:4] = torch.tensor([220, 40, 40]).view(3, 1, 1) / 127.5 - 1  # a red 2x2 speck
    result = shapes.judge(noisy, caption)
    assert result["all_correct"] and result["purity"] < 1


def test_judge_errors():
    with pytest.raises(ValueError, match=r"\[3, H, W\]"):
        shapes.judge(torch.zeros(1, 3, 8, 8), LEFT)
    with pytest.raises(ValueError, match="one caption per image"):
        shapes.judge_batch(torch.zeros(2, 3, 16, 16), [LEFT])
