"""Tests for evaluate.py: the real CLI on a tiny self-describing checkpoint (rows, columns, NFE,
determinism, files), the Fréchet distance on its own, and one-line errors."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate
import metrics
import pipeline
import shapes
from conftest import expect_one_line_error, files, make_checkpoint, read_only

ONE_THREAD = True

COLUMNS = {"background", "colors", "shapes", "relation", "all_correct", "purity", "fd", "nfe",
           "images_per_second", "seconds_per_image"}


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return make_checkpoint(str(tmp_path_factory.mktemp("teacher")),
                           {"steps": 2, "cfg": 3.0, "shift": 1.0, "sampler": "euler"})


def run(ckpt, out, *extra):
    """evaluate.main on the CPU, 6 captions, the same checkpoint at 2 steps (cfg 3) and 1 step (cfg 1)."""
    evaluate.main(["--ckpt", ckpt, "--ckpt", ckpt, "--steps", "2", "--steps", "1", "--cfg", "3",
                   "--cfg", "1", "--n", "6", "--seed", "5", "--device", "cpu", "--out", str(out),
                   "--quiet", *extra])
    return json.loads((out / "results.json").read_text())


def without_timing(results):
    return [{k: v for k, v in row.items() if k not in evaluate.TIMING} for row in results["results"]]


def expect_error(capsys, argv, *words):
    return expect_one_line_error(evaluate.main, capsys, argv, *words)


# ----------------------------------------------------------------------------------------------


def test_main_writes_a_row_per_configuration_and_is_deterministic(teacher, tmp_path):
    first = run(teacher, tmp_path / "a")
    rows = first["results"]
    assert len(rows) == 2 and all(COLUMNS <= set(r) for r in rows)
    assert [(r["steps"], r["cfg"], r["nfe"]) for r in rows] == [(2, 3.0, 4), (1, 1.0, 1)]  # cfg: 2 passes
    assert "steps=2" in rows[0]["name"] and "steps=1" in rows[1]["name"]
    assert all(0 <= r["all_correct"] <= 1 and r["fd"] >= 0 and r["images_per_second"] > 0 for r in rows)
    assert rows[0]["sizes"] == [[16, 16], [24, 16]] and first["config"]["n"] == 6

    table = (tmp_path / "a" / "results.md").read_text().splitlines()
    assert table.index("") == 2 + 2 and "FD" in table[0] and "NFE/image" in table[0] and "s/image" in table[0]
    assert rows[1]["name"] in table[3]
    # 2 rows of the first 6 captions (fewer than 8), cells as large as the largest (24x16), labels left
    w, h = Image.open(tmp_path / "a" / "grid.png").size
    assert h == 2 + 2 * 18 and w > 2 + 6 * 26

    second = run(teacher, tmp_path / "b")
    assert without_timing(first) == without_timing(second)
    other = run(teacher, tmp_path / "c", "--sizes", "16x16")
    assert other["results"][0]["sizes"] == [[16, 16]]


def test_frechet_distance_separates_rendered_from_noise():
    rng = np.random.default_rng(0)
    captions = [shapes.random_caption(rng) for _ in range(64)]
    a = metrics.features(shapes.render_batch(captions, 32, 32, seed=0))
    b = metrics.features(shapes.render_batch(captions, 32, 32, seed=1000))  # other layouts
    noise = metrics.features(torch.rand(64, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    assert a.shape == (64, 57) and np.allclose(a[:, :9].sum(1), 1)
    assert metrics.frechet_distance(a, a) == pytest.approx(0, abs=1e-6)
    same, far = metrics.frechet_distance(a, b), metrics.frechet_distance(a, noise)
    assert same < 0.1 * far, (same, far)
    assert far == pytest.approx(metrics.frechet_distance(noise, a), rel=1e-6)  # symmetric
    shifted = a + 1.0  # a pure mean shift of 1 in each of 57 dims, same covariance
    assert metrics.frechet_distance(a, shifted) == pytest.approx(57, rel=1e-6)


def test_judge_pipeline_keeps_its_keys(teacher):
    pipe = pipeline.load_pipeline(teacher)
    scores = metrics.judge_pipeline(pipe, 3, seed=1, steps=1)
    assert COLUMNS <= set(scores) and scores["nfe"] == 2  # the checkpoint's cfg 3.0
    assert metrics.judge_pipeline(pipe, 1, seed=1, steps=1, cfg=1.0)["fd"] is None  # too few images


def test_bad_inputs_are_one_line_errors(teacher, tmp_path, capsys):
    out = ["--out", str(tmp_path / "o"), "--device", "cpu", "--n", "4", "--quiet"]
    expect_error(capsys, ["--ckpt", str(tmp_path / "nope.safetensors"), *out], "nope.safetensors")
    expect_error(capsys, out, "no checkpoints", "--ckpt")
    expect_error(capsys, ["--ckpt", teacher, "--ckpt", teacher, "--steps", "1", "--steps", "2",
                          "--steps", "3", *out], "--steps given 3 times for 2 --ckpt")
    expect_error(capsys, ["--ckpt", teacher, "--sizes", "16by16", *out], "--sizes", "16by16")
    expect_error(capsys, ["--ckpt", teacher, "--sizes", "30x16", *out], "30x16", "multiples of 4")
    expect_error(capsys, ["--ckpt", teacher, "--stpes", "3", *out], "--stpes")
    expect_error(capsys, ["--ckpt", teacher, "--sampler", "heun", *out], "heun")
    expect_error(capsys, ["--ckpt", teacher, "--n", "1", *out[:-3]], "--n 1")
    assert not (tmp_path / "o").exists()  # failed runs write nothing


def test_bad_option_values_fail_before_any_work(teacher, tmp_path, capsys, no_loading):
    student = make_checkpoint(str(tmp_path / "student_run"), {"times": [1.0, 0.5], "cfg": 1.0})
    two = ["--ckpt", teacher, "--ckpt", teacher]
    cases = [
        (["--ckpt", teacher, "--cfg", "nan"], "--cfg nan", "finite number >= 0", "1 = unguided"),
        ([*two, "--cfg", "3", "--cfg", "nan"], "--cfg nan"),               # the second row's
        (["--ckpt", teacher, "--cfg", "-2"], "--cfg -2.0", ">= 0"),
        (["--ckpt", teacher, "--steps", "0"], "--steps 0", "integer >= 1"),
        (["--ckpt", teacher, "--shift", "inf"], "--shift inf", "finite number > 0"),
        (["--ckpt", teacher, "--shift", "-1"], "--shift -1.0", "> 0"),
        (["--ckpt", teacher, "--n", "0"], "--n 0", "at least 2"),
        (["--ckpt", teacher, "--seed", "-1"], "--seed -1", ">= 0"),
        (["--ckpt", teacher, "--ckpt", student, "--shift", "3"], "--shift 3.0", student, "student",
         "trained times", "teacher"),
    ]
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "results.md").write_bytes(b"an earlier result")
    for out in (tmp_path / "fresh" / "out", existing):
        for argv, *words in cases:
            before = files(out)
            expect_error(capsys, ["--n", "4", *argv, "--device", "cpu", "--out", str(out), "--quiet"],
                         *words)
            assert files(out) == before
    (tmp_path / "a_file").write_text("")
    expect_error(capsys, ["--ckpt", teacher, "--out", str(tmp_path / "a_file" / "out")],
                 "--out", "a_file", "cannot write")
    assert (tmp_path / "a_file").read_text() == ""


def test_read_only_out_fails_before_evaluating(teacher, tmp_path, capsys, no_loading, monkeypatch):
    out = tmp_path / "ro"
    out.mkdir()
    (out / "results.md").write_bytes(b"an earlier result")
    read_only(out, monkeypatch)
    try:
        expect_error(capsys, ["--ckpt", teacher, "--n", "4", "--out", str(out), "--quiet"],
                     f"--out {out}", "cannot write", "Permission denied")
        assert files(out) == {"results.md": b"an earlier result"}
    finally:
        out.chmod(0o755)


# ----------------------------------------------------------------------------------------------
# sizes no model was trained at


def test_sizes_outside_the_training_buckets_are_judged_per_size(teacher, tmp_path):
    results = run(teacher, tmp_path / "o", "--sizes", "32x16,16x32,24x24")  # trained: 16x16, 24x16
    for row in results["results"]:
        assert list(row["per_size"]) == ["32x16", "16x32", "24x24"]
        assert row["sizes"] == [[32, 16], [16, 32], [24, 24]]
        per_size = [row["per_size"][s]["all_correct"] for s in row["per_size"]]
        assert row["all_correct"] == pytest.approx(sum(per_size) / 3, abs=1e-3)  # 2 captions each
    table = (tmp_path / "o" / "results.md").read_text()
    assert "all correct / purity at each size" in table and "| 32x16 | 16x32 | 24x24 |" in table
    assert metrics.parse_sizes("64x64,unseen") == [(64, 64), *shapes.UNSEEN]


@pytest.mark.parametrize("size, words", [
    ("0x16", ["0x16", "multiples of 4", "from 4 to 64", "trained sizes: 16x16, 24x16"]),
    ("18x16", ["18x16", "nearest valid sizes: 16x16 or 20x16"]),
    ("128x16", ["128x16", "from 4 to 64"]),       # beyond the positional grid (16 x 4 pixels)
    ("unseen", ["128x48", "from 4 to 64"]),       # the shapes world's unseen sizes: too big here
    ("big", ["--sizes 'big'", "WIDTHxHEIGHT", "unseen"]),
])
def test_a_size_that_does_not_fit_names_the_allowed_ones(teacher, tmp_path, capsys, size, words):
    expect_error(capsys, ["--ckpt", teacher, "--sizes", size, "--n", "4", "--out", str(tmp_path / "o"),
                          "--device", "cpu", "--quiet"], *words)
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------------------------
# --edits: instruction edits judged exactly


def test_edits_rows_are_editing_evaluate_s_numbers_and_the_grid_a_row_per_edit(tmp_path, capsys):
    import editing
    from conftest import LADD_SAMPLER, make_edit_checkpoint
    edit = make_edit_checkpoint(str(tmp_path), LADD_SAMPLER)
    t2i = str(tmp_path / "model.safetensors")
    evaluate.main(["--edits", "--ckpt", edit, "--ckpt", edit, "--ckpt", t2i, "--steps", "2",
                   "--steps", "1", "--steps", "1", "--image-cfg", "1", "--n", "3", "--seed", "4",
                   "--device", "cpu", "--out", str(tmp_path / "ev"), "--quiet"])
    rows = json.loads((tmp_path / "ev" / "results.json").read_text())["results"]
    pipe = pipeline.load_pipeline(edit)
    want = editing.evaluate(pipe, 3, 4, steps=2, image_cfg=1)[0]
    assert {k: rows[0][k] for k in want} == want
    assert [(r["steps"], r["image_cfg"], r["nfe"]) for r in rows] == [(2, 1.0, 6), (1, 1.0, 3), (1, None, 2)]
    assert "draws the target caption" in rows[2]["name"]
    table = (tmp_path / "ev" / "results.md").read_text().splitlines()
    assert "followed" in table[0] and len(table) == 2 + 3
    w, h = Image.open(tmp_path / "ev" / "grid.png").size   # 3 edits: source | 3 rows | target
    assert h == 2 + 3 * (16 + 2) and w > 5 * (24 + 2)
    expect_error(capsys, ["--ckpt", edit, "--image-cfg", "2", "--out", str(tmp_path / "x")],
                 "--image-cfg", "--edits")
    expect_error(capsys, ["--edits", "--ckpt", edit, "--sizes", "unseen", "--out", str(tmp_path / "x")],
                 "--sizes", "checkpoint's sizes")
    assert not (tmp_path / "x").exists()
