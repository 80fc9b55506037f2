"""Instruction editing in the shapes world: the grammar, the exact targets, the edit judge, the
text encoder's new words, and the editing model (its two guidance scales, its zero-initialised
source channels, its teacher training)."""
import dataclasses
import json
import math

import numpy as np
import pytest
import torch

import editing
import mmdit
import shapes
import train_teacher
import weights
from conftest import LADD_SAMPLER, make_checkpoint
from pipeline import load_pipeline
from vae import VAE

ONE_THREAD = True
SIZES = list(shapes.SIZES.values())
SCENE = shapes.parse_caption("a red circle to the left of a green square on a blue background")


def tasks(n, seed=0):
    return [editing.task_of(seed, i, *SIZES[i % len(SIZES)]) for i in range(n)]


# ----------------------------------------------------------------------------------------------
# the grammar


def test_every_instruction_form_parses_back_to_its_text():
    seen = set()
    for task in tasks(200):
        text = task.instruction.text
        assert shapes.parse_instruction(text) == task.instruction
        assert shapes.parse_instruction("  " + text.upper().replace(" ", "   ") + " ") == task.instruction
        seen.add(task.instruction.kind)
    assert seen == set(shapes.INSTRUCTIONS)


@pytest.mark.parametrize("text", ["make the circle blue", "paint the red circle blue",
                                  "make the red hexagon blue", "remove the red", "make it pop", "",
                                  "a red circle on a blue background"])
def test_instructions_outside_the_grammar_are_refused_with_the_forms(text):
    with pytest.raises(ValueError, match="edit grammar") as e:
        shapes.parse_instruction(text)
    assert all(form in str(e.value) for form in shapes.INSTRUCTIONS.values())


@pytest.mark.parametrize("text, why", [
    ("make the red square blue", "has no red square"),
    ("make the red circle green", "green is taken"),
    ("make the red circle blue", "blue is taken"),
    ("turn the red circle into a circle", "a circle already"),
    ("make the background blue", "no object has"),
    ("make the background red", "no object has"),
    ("remove the yellow circle", "has no yellow circle"),
])
def test_instructions_that_do_not_apply_to_the_scene_are_refused(text, why):
    with pytest.raises(ValueError, match=why):
        shapes.apply(SCENE, shapes.parse_instruction(text))
    with pytest.raises(ValueError, match="does not apply"):
        editing.make_task(SCENE.caption, text, 64, 64, 0)


def test_removing_the_only_object_is_refused():
    one = shapes.parse_caption("a red circle on a blue background")
    with pytest.raises(ValueError, match="only object"):
        shapes.apply(one, shapes.parse_instruction("remove the red circle"))
    assert all(shapes.random_instruction(one, s).kind != "remove" for s in range(100))


def test_each_kind_changes_exactly_one_thing_in_the_caption():
    cases = {"make the red circle yellow": "a yellow circle to the left of a green square on a blue background",
             "turn the green square into a triangle": "a red circle to the left of a green triangle on a blue background",
             "make the background white": "a red circle to the left of a green square on a white background",
             "remove the red circle": "a green square on a blue background",
             "remove the green square": "a red circle on a blue background"}
    for text, caption in cases.items():
        assert shapes.apply(SCENE, shapes.parse_instruction(text)).caption == caption


# ----------------------------------------------------------------------------------------------
# exact targets


def test_targets_are_the_source_with_only_the_edit_applied():
    """Pixels change only where the edit says: inside the named object's box, or (a new
    background) exactly on the source's background pixels, which all take the new colour."""
    for task in tasks(120):
        source, target = task.render()
        changed = (source != target).any(0)                                   # [H, W]
        assert changed.any(), task.instruction.text
        i = task.instruction
        if i.kind == "background":
            background = torch.tensor(shapes.PALETTE[task.source.background]) / 127.5 - 1
            on_background = (source == background[:, None, None]).all(0)
            assert torch.equal(changed, on_background)
            new = torch.tensor(shapes.PALETTE[i.value]) / 127.5 - 1
            assert (target[:, changed] == new[:, None]).all()
        else:
            x, y, side = task.boxes[task.source.objects.index(i.target)]
            box = torch.zeros_like(changed)
            box[y:y + side, x:x + side] = True
            assert not changed[~box].any(), i.text
        # the target is the target caption's scene in the source's boxes
        assert torch.equal(target, shapes.draw(task.target, task.target_boxes, task.width, task.height))


def test_tasks_are_a_pure_function_of_seed_and_index_and_the_instruction_ignores_the_size():
    a, b = editing.task_of(3, 17, 64, 64), editing.task_of(3, 17, 96, 48)
    assert a.instruction == b.instruction and a.source == b.source
    assert editing.task_of(3, 17, 64, 64) == a
    assert torch.equal(a.render()[1], editing.task_of(3, 17, 64, 64).render()[1])


def test_edit_batches_resume_and_share_the_stream_like_the_world_s():
    whole = editing.batches(3, seed=4)
    steps = [next(whole) for _ in range(4)]
    again = next(editing.batches(3, seed=4, start_step=2))
    second = editing.batches(3, seed=4, start_step=1, stride=2)
    for got, want in ((again, steps[2]), (next(second), steps[1]), (next(second), steps[3])):
        assert torch.equal(got[0], want[0]) and got[1] == want[1] and torch.equal(got[2], want[2])
    targets, instructions, sources, (w, h) = steps[0]
    assert targets.shape == sources.shape == (3, 3, h, w) and len(instructions) == 3


# ----------------------------------------------------------------------------------------------
# the judge


def test_exact_targets_score_one_one_and_unedited_sources_zero_one():
    for task in tasks(150, seed=5):
        source, target = task.render()
        assert editing.judge_edit(target, task) == {"followed": True, "preserved": True, "both": True}
        assert editing.judge_edit(source, task) == {"followed": False, "preserved": True, "both": False}


def test_a_fresh_layout_of_the_target_caption_follows_but_does_not_preserve():
    """What a text-to-image model gives for the target caption: right content, new places."""
    scores = []
    for task in tasks(150, seed=6):
        fresh = shapes.render(task.target.caption, task.width, task.height, 12345)
        scores.append(editing.judge_edit(fresh, task))
    followed = np.mean([s["followed"] for s in scores])
    preserved = np.mean([s["preserved"] for s in scores])
    assert followed == 1.0 and preserved < 0.25


def _moved(task, index, dx):
    boxes = list(task.target_boxes)
    x, y, side = boxes[index]
    boxes[index] = (min(max(x + dx, 0), task.width - side), y, side)
    return shapes.draw(task.target, boxes, task.width, task.height)


def test_the_judge_catches_an_untouched_object_moved_resized_recoloured_or_a_new_background():
    task = editing.make_task(SCENE.caption, "make the red circle yellow", 96, 48, 0)
    short = 48
    assert editing.judge_edit(_moved(task, 1, 1), task)["preserved"]          # 1 pixel: kept
    far = math.ceil(editing.POSITION_TOL * short) + 2
    for dx in (far, -far):
        moved = _moved(task, 1, dx)
        if not torch.equal(moved, task.render()[1]):
            assert not editing.judge_edit(moved, task)["preserved"]
    boxes = list(task.target_boxes)
    x, y, side = boxes[1]
    grow = math.ceil(editing.SIZE_TOL * short) + 2
    boxes[1] = (max(x - grow, 0), max(y - grow, 0), side + grow)
    assert not editing.judge_edit(shapes.draw(task.target, boxes, 96, 48), task)["preserved"]
    other = dataclasses.replace(task.target, objects=(task.target.objects[0], shapes.Obj("white", "square")))
    assert not editing.judge_edit(shapes.draw(other, task.target_boxes, 96, 48), task)["preserved"]
    turned = dataclasses.replace(task.target, objects=(shapes.Obj("yellow", "square"), task.target.objects[1]))
    assert not editing.judge_edit(shapes.draw(turned, task.target_boxes, 96, 48), task)["preserved"]
    night = dataclasses.replace(task.target, background="black")
    assert not editing.judge_edit(shapes.draw(night, task.target_boxes, 96, 48), task)["preserved"]


def test_a_removal_that_leaves_the_object_is_not_followed_and_one_that_takes_both_not_preserved():
    task = editing.make_task(SCENE.caption, "remove the green square", 64, 64, 3)
    source, target = task.render()
    assert editing.judge_edit(target, task)["both"]
    assert editing.judge_edit(source, task) == {"followed": False, "preserved": True, "both": False}
    empty = shapes.draw(dataclasses.replace(task.target, objects=()), (), 64, 64)
    assert not editing.judge_edit(empty, task)["preserved"]


def test_the_tolerances_hold_on_vae_round_trips_of_exact_targets():
    """POSITION_TOL and SIZE_TOL sit above what the shipped VAE's round trips move an object."""
    vae = VAE.from_pretrained("assets/shapes_vae.safetensors")
    worst, scores = np.zeros(2), []
    for k, size in enumerate(SIZES):
        batch = [editing.task_of(7, i, *size) for i in range(24)]
        with torch.no_grad():
            targets = torch.stack([t.render()[1] for t in batch])
            rebuilt = vae.decode(vae.encode(targets)).float()
        for image, task in zip(rebuilt, batch):
            scores.append(editing.judge_edit(image, task)["both"])
            regions, _ = editing._regions(image)
            for obj, (x, y, side) in zip(task.target.objects, task.target_boxes):
                if obj.colour in regions:
                    cx, cy, s = editing._box_of(regions[obj.colour])
                    short = min(task.width, task.height)
                    worst = np.maximum(worst, [math.dist((cx, cy), (x + side / 2, y + side / 2)) / short,
                                               abs(s - side) / short])
    assert worst[0] < editing.POSITION_TOL and worst[1] < editing.SIZE_TOL, worst
    assert np.mean(scores) >= 0.95


# ----------------------------------------------------------------------------------------------
# the text encoder's new words


def test_the_new_words_leave_every_caption_s_encoding_bit_identical():
    """The tables as they were before the instructions' words existed, rebuilt from the same
    seed: every caption word's embedding and pooled rows are unchanged, so the shipped
    teachers read exactly what they were trained on."""
    enc = shapes.ShapesTextEncoder()
    g = torch.Generator().manual_seed(0)
    words = torch.randn(len(shapes.VOCAB), 64, generator=g)
    projection = torch.randn(shapes.MAX_WORDS, 64, 64, generator=g) / math.sqrt(shapes.MAX_WORDS * 64)
    table = torch.einsum("lvc,lcp->lvp", words[None] + shapes.sinusoidal_positions(shapes.MAX_WORDS, 64)[:, None],
                         projection)
    V = len(shapes.VOCAB)
    assert torch.equal(enc.word_embedding[:V], words) and torch.equal(enc.pooled_table[:, :V], table)
    assert [enc.word_index[w] for w in shapes.VOCAB] == list(range(V))
    assert set(shapes.EDIT_WORDS) == {"make", "turn", "into", "remove"}
    captions = [shapes.random_caption(np.random.default_rng(i)) for i in range(50)]
    context, pooled = enc.encode(captions)
    for b, caption in enumerate(captions):
        ids = [shapes.VOCAB.index(w) for w in caption.split()]
        assert torch.equal(context[b, :len(ids)], words[ids] + enc.position_code[:len(ids)])
        torch.testing.assert_close(pooled[b], table[torch.arange(len(ids)), ids].sum(0))


def test_instructions_are_encoded_with_their_own_words_and_order():
    enc = shapes.ShapesTextEncoder()
    a, b = (enc.encode([t])[0] for t in ("make the red circle blue", "make the blue circle red"))
    assert not torch.equal(a, b)
    assert torch.equal(enc.encode(["MAKE  the red circle blue"])[0], a)
    with pytest.raises(ValueError, match="edit instruction"):
        enc.encode(["make the red circle"])


# ----------------------------------------------------------------------------------------------
# the editing model


def test_guidance_combines_three_passes_and_unit_scales_take_one():
    calls = []

    def velocity(x, t, context, pooled):  # a velocity linear in its inputs, the source counted twice
        calls.append(len(x))
        z = x.shape[1] // 2
        return x[:, :z] + 2 * x[:, z:] + context.sum((1, 2))[:, None, None, None] + pooled.sum(1)[:, None, None, None]

    B, z = 2, 3
    x, source = torch.randn(B, z, 4, 4), torch.randn(B, z, 4, 4)
    context, pooled = torch.randn(B, 5, 6), torch.randn(B, 7)
    uc, up = torch.zeros(1, 5, 6), torch.zeros(1, 7)
    t = torch.rand(B)
    full = velocity(torch.cat([x, source], 1), t, context, pooled)
    image = velocity(torch.cat([x, source], 1), t, uc.expand(B, -1, -1), up.expand(B, -1))
    none = velocity(torch.cat([x, 0 * source], 1), t, uc.expand(B, -1, -1), up.expand(B, -1))
    calls.clear()
    assert torch.equal(editing.guided(velocity, source, uc, up)(x, t, context, pooled), full)
    assert calls == [B]
    got = editing.guided(velocity, source, uc, up, cfg=4.0, image_cfg=1.5)(x, t, context, pooled)
    assert calls[-1] == 3 * B
    torch.testing.assert_close(got, none + 1.5 * (image - none) + 4.0 * (full - image))


def test_a_fresh_editing_model_equals_its_text_to_image_parent(tmp_path):
    """Zero weights for the source channels: whatever the source, the t2i model's velocity."""
    t2i = mmdit.MMDiT.from_pretrained(make_checkpoint(str(tmp_path), LADD_SAMPLER))
    z = t2i.config.out_channels
    edit = mmdit.MMDiT(dataclasses.replace(t2i.config, in_channels=2 * z))
    edit.load_state_dict(train_teacher.widen_input(t2i.state_dict(), 2 * z))
    assert editing.is_edit_model(edit) and not editing.is_edit_model(t2i)
    g = torch.Generator().manual_seed(0)
    x, source = torch.randn(2, z, 8, 8, generator=g), 10 * torch.randn(2, z, 8, 8, generator=g)
    t, context, pooled = torch.rand(2, generator=g), torch.randn(2, 3, 64, generator=g), torch.randn(2, 64, generator=g)
    with torch.no_grad():
        want = t2i(x, t, context, pooled)
        got = edit(torch.cat([x, source], 1), t, context, pooled)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


FAST = ["--preset", "test", "--judge-n", "0", "--device", "cpu"]


@pytest.fixture(scope="module")
def parent(tmp_path_factory):
    out = tmp_path_factory.mktemp("t2i")
    train_teacher.main(FAST + ["--out", str(out)])
    return out


def edit_argv(parent, out, *extra):
    return FAST + ["--task", "edit", "--init", str(parent / "model.safetensors"),
                   "--vae", str(parent / "vae.safetensors"), "--out", str(out), *extra]


def test_the_editing_teacher_starts_as_its_parent_trains_and_is_judged_on_edits(parent, tmp_path):
    train_teacher.main(edit_argv(parent, tmp_path / "zero", "--steps", "0"))
    t2i, wide = (weights.load_file(p / "model.safetensors") for p in (parent, tmp_path / "zero"))
    z = t2i["x_embedder.proj.weight"].shape[1]
    w = wide["x_embedder.proj.weight"]
    assert w.shape[1] == 2 * z and torch.equal(w[:, :z], t2i["x_embedder.proj.weight"]) and not w[:, z:].any()
    train_teacher.main(edit_argv(parent, tmp_path / "edit", "--judge-n", "3", "--sample-image-cfg", "2"))
    pipe = load_pipeline(str(tmp_path / "edit"))
    assert editing.is_edit_model(pipe.model) and pipe.defaults["image_cfg"] == 2.0
    assert set(json.loads(pipe.metadata["judge"])) == {"followed", "preserved", "both"}
    assert not torch.equal(pipe.model.x_embedder.proj.weight[:, z:], torch.zeros_like(w[:, z:]))


def test_the_editing_teacher_resumes_exactly(parent, tmp_path):
    whole, part = tmp_path / "whole", tmp_path / "part"
    train_teacher.main(edit_argv(parent, whole, "--steps", "4"))
    train_teacher.main(edit_argv(parent, part, "--steps", "2"))
    train_teacher.main(["--resume", str(part), "--steps", "4"])
    a, b = (weights.load_state(p / "state.safetensors") for p in (whole, part))
    assert a["step"] == b["step"] == 4
    for key in ("model", "ema"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key


def test_image_dropout_is_a_share(parent, tmp_path, capsys):
    with pytest.raises(SystemExit):
        train_teacher.main(edit_argv(parent, tmp_path / "bad", "--image-dropout", "1.5"))
    assert "--image-dropout" in capsys.readouterr().err
