"""Issue #30, the sampling side: nothing the image-writing scripts (sample.py, inpaint.py,
evaluate.py) do is silently wrong. Non-finite outputs, damaged checkpoints, output folders mixing
runs, adapters on the wrong base, unbounded work, masks that select nothing, seeds out of range."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate
import images
import inpaint
import lora
import mmdit
import pipeline
import sample
import weights
from conftest import PROMPTS, expect_one_line_error, files, make_checkpoint, read_png

ONE_THREAD = True
TEACHER = {"steps": 2, "cfg": 3.0, "shift": 1.0, "sampler": "euler"}
STUDENT = {"times": [1.0, 0.5], "cfg": 1.0, "sampler": "euler"}


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return make_checkpoint(str(tmp_path_factory.mktemp("teacher")), TEACHER)


@pytest.fixture(scope="module")
def lora_run(teacher, tmp_path_factory):
    """A LoRA run folder as train_ladd.py --lora writes it: adapters.safetensors (trained: B not
    zero) and model.safetensors (the teacher with them merged), beside its VAE."""
    folder = tmp_path_factory.mktemp("lora_run")
    base = mmdit.MMDiT.from_pretrained(teacher)
    torch.manual_seed(1)
    student = lora.add_adapters(base, rank=4)
    with torch.no_grad():
        for _, m in lora.layers(student):
            m.lora_B.copy_(0.1 * torch.randn_like(m.lora_B))
    meta = {**{k: v for k, v in base.metadata.items() if k not in ("kind", "config")},
            "vae": "vae.safetensors", "sampler": json.dumps(STUDENT),
            "train_config": json.dumps({"lora": 4}), "teacher": os.path.abspath(teacher)}
    os.link(os.path.join(os.path.dirname(teacher), "shapes_vae.safetensors"), folder / "vae.safetensors")
    student.save_pretrained(str(folder / "model.safetensors"), meta, lora.merged_state(student))
    lora.save_adapters(student, str(folder / "adapters.safetensors"), meta)
    return folder


def sample_main(argv):
    return sample.main([*argv, "--device", "cpu"])


def sample_error(capsys, argv, *words):
    return expect_one_line_error(sample.main, capsys, [*argv, "--device", "cpu", "--quiet"], *words)


def with_tensor(src, dst, name, value):
    """A copy of checkpoint `src` at `dst` with tensor `name`'s first element set to `value`."""
    state = {k: v.clone() for k, v in weights.load_file(src).items()}
    state[name].view(-1)[0] = value
    weights.save_file(state, dst, weights.load_metadata(src))
    return dst


def copy_checkpoint(teacher, folder):
    """The teacher file and its VAE in another folder (so tensors can be changed there)."""
    folder.mkdir(exist_ok=True)
    src = os.path.dirname(teacher)
    for name in ("model.safetensors", "shapes_vae.safetensors"):
        (folder / name).write_bytes(open(os.path.join(src, name), "rb").read())
    return folder / "model.safetensors"


# ----------------------------------------------------------------------------------------------
# 1. non-finite outputs are refused, nothing is written


def test_non_finite_samples_are_an_error_naming_the_guidance_and_nothing_is_written(
        teacher, tmp_path, capsys):
    out = tmp_path / "s"
    sample_error(capsys, ["--ckpt", teacher, "--prompt", PROMPTS[0], "--cfg", "1e308", "--out",
                          str(out)], "not finite", "--cfg 1e+308")
    assert files(out) in (None, {})
    images.save_png(torch.zeros(3, 16, 16), tmp_path / "in.png")  # img2img
    sample_error(capsys, ["--ckpt", teacher, "--prompt", PROMPTS[0], "--cfg", "1e308", "--init-image",
                          str(tmp_path / "in.png"), "--strength", "1", "--out", str(out)],
                 "not finite", "--cfg")
    assert files(out) in (None, {})


def test_inpaint_and_evaluate_refuse_non_finite_outputs(teacher, tmp_path, capsys):
    images.save_png(torch.zeros(3, 16, 16), tmp_path / "in.png")
    images.save_png(torch.ones(3, 16, 16), tmp_path / "mask.png")
    out = tmp_path / "o"
    expect_one_line_error(inpaint.main, capsys, [
        "--ckpt", teacher, "--image", str(tmp_path / "in.png"), "--mask", str(tmp_path / "mask.png"),
        "--prompt", PROMPTS[0], "--cfg", "1e308", "--out", str(out), "--device", "cpu", "--quiet"],
        "not finite", "--cfg")
    expect_one_line_error(evaluate.main, capsys, [
        "--ckpt", teacher, "--n", "2", "--cfg", "1e308", "--out", str(out), "--device", "cpu",
        "--quiet"], "not finite", "--cfg")
    assert files(out) in (None, {})


# ----------------------------------------------------------------------------------------------
# 2. a checkpoint with a non-finite tensor is refused at loading


@pytest.mark.parametrize("file, tensor", [("model.safetensors", "joint_blocks.1.x_block.attn.qkv.weight"),
                                          ("shapes_vae.safetensors", None)])
def test_a_checkpoint_with_a_nan_tensor_names_the_file_and_the_tensor(teacher, tmp_path, capsys,
                                                                      file, tensor):
    path = copy_checkpoint(teacher, tmp_path / "ckpt")
    damaged = tmp_path / "ckpt" / file
    tensor = tensor or sorted(weights.load_file(damaged))[3]
    with_tensor(damaged, damaged, tensor, float("nan"))
    argv = ["--ckpt", str(path), "--prompt", PROMPTS[0], "--out", str(tmp_path / "s")]
    sample_error(capsys, argv, str(damaged), tensor, "NaN or inf")
    expect_one_line_error(evaluate.main, capsys, ["--ckpt", str(path), "--n", "2", "--device", "cpu",
                                                  "--out", str(tmp_path / "e")], str(damaged), tensor)
    assert not (tmp_path / "s").exists() and not (tmp_path / "e").exists()


def test_adapters_with_a_nan_tensor_are_refused(teacher, lora_run, tmp_path, capsys):
    name = sorted(weights.load_file(lora_run / "adapters.safetensors"))[0]
    bad = with_tensor(lora_run / "adapters.safetensors", tmp_path / "bad.safetensors", name, float("inf"))
    sample_error(capsys, ["--ckpt", teacher, "--lora", str(bad), "--prompt", PROMPTS[0],
                          "--out", str(tmp_path / "s")], str(bad), name)


def test_a_cond_file_with_a_nan_tensor_is_refused(teacher, tmp_path, capsys):
    cond = {"context": torch.randn(1, 5, 64), "pooled": torch.randn(1, 64)}
    cond["pooled"][0, 3] = float("nan")
    weights.save_file(cond, tmp_path / "cond.safetensors")
    sample_error(capsys, ["--ckpt", teacher, "--cond", str(tmp_path / "cond.safetensors"),
                          "--out", str(tmp_path / "s")], "cond.safetensors", "pooled", "NaN or inf")


# ----------------------------------------------------------------------------------------------
# 3. an output folder never mixes two runs' images


def test_a_folder_with_earlier_samples_is_refused_unless_overwrite(teacher, tmp_path, capsys):
    out = tmp_path / "s"
    three = ["--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--prompt", PROMPTS[2]]
    sample_main(["--ckpt", teacher, *three, "--out", str(out), "--quiet"])
    (out / "notes.txt").write_text("mine")
    before = files(out)
    sample_error(capsys, ["--ckpt", teacher, "--prompt", PROMPTS[0], "--out", str(out)],
                 f"--out {out}", "earlier", "000.png", "--overwrite")
    assert files(out) == before
    sample_main(["--ckpt", teacher, "--prompt", PROMPTS[1], "--out", str(out), "--overwrite"])
    assert "removed" in capsys.readouterr().out
    assert sorted(os.listdir(out)) == ["000.png", "config.json", "grid.png", "notes.txt", "prompts.txt"]
    assert (out / "prompts.txt").read_text() == f"000.png\t{PROMPTS[1]}\n"


def test_a_training_run_folder_is_never_an_output_folder(teacher, lora_run, tmp_path, capsys):
    before = files(lora_run)
    for extra in ([], ["--overwrite"]):
        sample_error(capsys, ["--ckpt", teacher, "--prompt", PROMPTS[0], "--out", str(lora_run), *extra],
                     f"--out {lora_run}", "training run", "another --out")
    assert files(lora_run) == before


def test_inpaint_refuses_earlier_results_and_evaluate_refuses_samples(teacher, tmp_path, capsys):
    images.save_png(torch.zeros(3, 16, 16), tmp_path / "in.png")
    images.save_png(torch.ones(3, 16, 16), tmp_path / "mask.png")
    out = tmp_path / "o"
    argv = ["--ckpt", teacher, "--image", str(tmp_path / "in.png"), "--mask", str(tmp_path / "mask.png"),
            "--out", str(out), "--device", "cpu", "--quiet"]
    inpaint.main([*argv, "--prompt", PROMPTS[0], "--prompt", PROMPTS[1]])
    before = files(out)
    expect_one_line_error(inpaint.main, capsys, [*argv, "--prompt", PROMPTS[0]], "earlier",
                          "--overwrite")
    assert files(out) == before
    inpaint.main([*argv, "--prompt", PROMPTS[0], "--overwrite"])
    assert sorted(os.listdir(out)) == ["config.json", "out.png", "strip.png"]

    samples = tmp_path / "samples"
    sample_main(["--ckpt", teacher, "--prompt", PROMPTS[0], "--out", str(samples), "--quiet"])
    before = files(samples)
    expect_one_line_error(evaluate.main, capsys, ["--ckpt", teacher, "--n", "2", "--out", str(samples),
                                                  "--device", "cpu", "--quiet"], "earlier", "--overwrite")
    assert files(samples) == before
    evaluate.main(["--ckpt", teacher, "--n", "2", "--out", str(tmp_path / "e"), "--device", "cpu", "--quiet"])
    evaluate.main(["--ckpt", teacher, "--n", "2", "--out", str(tmp_path / "e"), "--device", "cpu", "--quiet"])
    assert sorted(os.listdir(tmp_path / "e")) == ["grid.png", "results.json", "results.md"]


# ----------------------------------------------------------------------------------------------
# 4, 5. adapters: never twice, never on another base


def test_adapters_on_their_merged_model_are_refused(lora_run, tmp_path, capsys):
    sample_error(capsys, ["--ckpt", str(lora_run), "--lora", str(lora_run / "adapters.safetensors"),
                          "--prompt", PROMPTS[0], "--out", str(tmp_path / "s")],
                 "already", "merged", f"--ckpt {lora_run}")
    assert not (tmp_path / "s").exists()


def test_adapters_on_another_base_are_refused_naming_their_base(teacher, lora_run, tmp_path, capsys):
    other = copy_checkpoint(teacher, tmp_path / "other")
    name = "joint_blocks.0.x_block.attn.proj.weight"
    with_tensor(other, other, name, 3.0)  # the same architecture, another base
    sample_error(capsys, ["--ckpt", str(other), "--lora", str(lora_run / "adapters.safetensors"),
                          "--prompt", PROMPTS[0], "--out", str(tmp_path / "s")],
                 "another base", os.path.abspath(teacher))
    sample_main(["--ckpt", teacher, "--lora", str(lora_run), "--prompt", PROMPTS[0],  # a run folder
                 "--out", str(tmp_path / "a"), "--quiet"])
    sample_main(["--ckpt", str(lora_run), "--prompt", PROMPTS[0], "--out", str(tmp_path / "m"), "--quiet"])
    assert np.abs(read_png(tmp_path / "a" / "000.png") - read_png(tmp_path / "m" / "000.png")).max() <= 1


def test_the_fingerprint_is_cheap_deterministic_and_dtype_free(teacher):
    model = mmdit.MMDiT.from_pretrained(teacher)
    a = lora.fingerprint(model)
    assert a == lora.fingerprint(mmdit.MMDiT.from_pretrained(teacher, dtype=torch.bfloat16))
    assert a == lora.fingerprint(lora.add_adapters(model, rank=2))  # the base under adapters
    with torch.no_grad():
        model.joint_blocks[0].x_block.attn.qkv.weight.mul_(1.5)
    assert lora.fingerprint(model) != a


def test_older_adapter_files_without_a_fingerprint_load_with_a_warning(teacher, lora_run, tmp_path, capsys):
    meta = {k: v for k, v in weights.load_metadata(lora_run / "adapters.safetensors").items()
            if not k.endswith("fingerprint")}
    old = tmp_path / "old.safetensors"
    weights.save_file(weights.load_file(lora_run / "adapters.safetensors"), old, meta)
    sample_main(["--ckpt", teacher, "--lora", str(old), "--prompt", PROMPTS[0], "--out", str(tmp_path / "s"),
                 "--quiet"])
    err = capsys.readouterr().err
    assert "warning:" in err and "fingerprint" in err and str(old) in err


def test_lora_option_errors_name_the_option(teacher, tmp_path, capsys):
    base = ["--ckpt", teacher, "--prompt", PROMPTS[0], "--out", str(tmp_path / "s")]
    sample_error(capsys, [*base, "--lora", "-1"], "--lora -1", "no such file", "adapters.safetensors")
    sample_error(capsys, [*base, "--lora", str(tmp_path)], f"--lora {tmp_path}", "adapters.safetensors")


def test_the_lora_rank_is_bounded_by_the_layer_widths(teacher):
    model = mmdit.MMDiT.from_pretrained(teacher)  # hidden size 32
    lora.add_adapters(model, rank=32)
    with pytest.raises(ValueError, match=r"--lora 33: .*at most 32"):
        lora.add_adapters(model, rank=33)
    with pytest.raises(ValueError, match=r"--lora 100000: .*at most 32"):
        lora.check_rank(100000, model.config, "attn,mlp")


# ----------------------------------------------------------------------------------------------
# 7. unbounded work: checked up front


def test_huge_counts_are_refused_up_front(teacher, tmp_path, capsys, no_loading):
    expect_one_line_error(evaluate.main, capsys, ["--ckpt", teacher, "--n", "100000000000",
                                                  "--out", str(tmp_path / "e")], "--n 100000000000", "at most")
    expect_one_line_error(inpaint.main, capsys, ["--ckpt", teacher, "--eval", "100000000000",
                                                 "--out", str(tmp_path / "i")], "--eval 100000000000", "at most")


def test_evaluate_says_what_each_row_costs(teacher, tmp_path, capsys):
    evaluate.main(["--ckpt", teacher, "--n", "2", "--out", str(tmp_path / "e"), "--device", "cpu"])
    captured = capsys.readouterr()
    assert "2 captions" in captured.out and "network evaluations" in captured.out
    assert "sampling" in captured.err  # the progress bar


# ----------------------------------------------------------------------------------------------
# 8. masks that select nothing


def test_masks_that_select_nothing_are_errors(teacher, tmp_path, capsys):
    images.save_png(torch.zeros(3, 16, 16), tmp_path / "in.png")
    ones = np.zeros((16, 16), np.uint8)
    ones[4:12, 4:12] = 1
    Image.fromarray(ones).save(tmp_path / "ones.png")                    # a 0/1 numpy export
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(tmp_path / "black.png")
    argv = ["--ckpt", teacher, "--image", str(tmp_path / "in.png"), "--prompt", PROMPTS[0],
            "--out", str(tmp_path / "o"), "--device", "cpu", "--quiet"]
    expect_one_line_error(inpaint.main, capsys, [*argv, "--mask", str(tmp_path / "black.png")],
                          "black.png", "selects nothing", "white = repaint")
    expect_one_line_error(inpaint.main, capsys, [*argv, "--mask", str(tmp_path / "ones.png")],
                          "ones.png", "0 and 1", "255")
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------------------------
# weak spots


@pytest.mark.parametrize("seed", ["-1", str(2 ** 63), "100000000000000000000000"])
def test_seeds_out_of_range_name_the_option(teacher, tmp_path, capsys, no_loading, seed):
    sample_error(capsys, ["--ckpt", teacher, "--prompt", PROMPTS[0], "--seed", seed,
                          "--out", str(tmp_path / "s")], f"--seed {seed}", "2**63")
    expect_one_line_error(evaluate.main, capsys, ["--ckpt", teacher, "--seed", seed,
                                                  "--out", str(tmp_path / "e")], f"--seed {seed}")
    images.save_png(torch.zeros(3, 16, 16), tmp_path / "in.png")
    expect_one_line_error(inpaint.main, capsys, ["--ckpt", teacher, "--image", str(tmp_path / "in.png"),
                                                 "--mask", str(tmp_path / "in.png"), "--prompt", PROMPTS[0],
                                                 "--seed", seed, "--out", str(tmp_path / "i")],
                          f"--seed {seed}")


def test_a_training_state_file_as_ckpt_says_which_file_to_pass(lora_run, tmp_path, capsys):
    weights.save_state({"step": 3, "ema": {"w": torch.zeros(2)}}, lora_run / "state.safetensors")
    try:
        err = sample_error(capsys, ["--ckpt", str(lora_run / "state.safetensors"), "--prompt", PROMPTS[0],
                                    "--out", str(tmp_path / "s")],
                           "training state", "model.safetensors", str(lora_run))
        assert "looks like" not in err
        sample_error(capsys, ["--ckpt", str(lora_run / "adapters.safetensors"), "--prompt", PROMPTS[0],
                              "--out", str(tmp_path / "s")], "adapter file", "--lora")
    finally:
        os.remove(lora_run / "state.safetensors")


def test_a_prompt_file_with_a_byte_order_mark_is_read(teacher, tmp_path):
    (tmp_path / "p.txt").write_bytes(("\ufeff" + PROMPTS[0] + "\n").encode("utf-8"))
    sample_main(["--ckpt", teacher, "--prompt", str(tmp_path / "p.txt"), "--out", str(tmp_path / "s"),
                 "--quiet"])
    assert (tmp_path / "s" / "prompts.txt").read_text() == f"000.png\t{PROMPTS[0]}\n"


@pytest.mark.parametrize("script", [sample, inpaint, evaluate])
def test_every_option_has_a_description(script, capsys):
    with pytest.raises(SystemExit):
        script.main(["--help"])
    text = capsys.readouterr().out
    parser_help = text.split("options:")[1]
    import re
    entries = re.split(r"\n  (?=-)", parser_help)
    bare = [e.split()[0] for e in entries if e.strip() and len(e.split()) <= 2]
    assert not bare, bare
