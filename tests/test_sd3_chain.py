"""The real-SD3 path as a user tries it, on a tiny random SD3 (tests/tiny_sd3.py):

  * the documented chain (docs/sd3.md, the block after its "chain" mark), run as written, one
    subprocess per command: conditioning from prompts, train_ladd.py, sample.py, img2img;
  * a finished run folder moved (teacher left behind; teacher moved with it, as on another
    machine; teacher absent: --text-encoders) samples as before;
  * bad inputs: one-line errors naming the input and the fix, nothing written;
  * the diffusers and single-file layouts give the same models; config.json is read and checked;
  * parity with diffusers' StableDiffusion3Pipeline (requirements-dev; skipped without it) for
    SD3-Medium, SD3.5-Large (qk-norm) and SD3.5-Medium (MMDiT-X), and the intended differences.
"""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import images
import pipeline
import sample
import text_encoders as te
import weights
import tiny_sd3

from conftest import expect_one_line_error, read_png

ONE_THREAD = True
REPO = Path(__file__).parent.parent
DOC = REPO / "docs" / "sd3.md"
MARK = "<!-- chain: tests/test_sd3_chain.py runs the next block -->"
PROMPT = "a red circle on a blue background"


def chain_commands(doc=DOC):
    """The shell commands of the fenced block after MARK in docs/sd3.md, continuation lines
    joined: what a user types, in order."""
    text = doc.read_text()
    assert text.count(MARK) == 1, f"{doc}: the chain mark {MARK!r} must appear once"
    block = text.split(MARK, 1)[1].split("```bash\n", 1)[1].split("\n```", 1)[0]
    return [c.strip() for c in block.replace("\\\n", " ").split("\n") if c.strip()]


def run_as_user(command, cwd):
    """One documented command in `cwd`, through bash, `python X.py` meaning this repository's
    X.py run by this interpreter. -> (CompletedProcess, seconds)."""
    script = f'python() {{ "$LADD_PYTHON" "$LADD_REPO/$1" "${{@:2}}"; }}\n{command}\n'
    env = {**os.environ, "LADD_PYTHON": sys.executable, "LADD_REPO": str(REPO),
           "OMP_NUM_THREADS": "1"}  # one thread: tiny models on a shared 2-core box
    t0 = time.time()
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)
    return done, time.time() - t0


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """The documented chain, run once in a fresh folder -> (folder, [(command, seconds)])."""
    folder = tmp_path_factory.mktemp("user")
    times = []
    for command in chain_commands():
        done, seconds = run_as_user(command, folder)
        assert done.returncode == 0, f"{command}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
        times.append((command, round(seconds, 1)))
    print("\nthe documented chain, seconds per command (2 shared CPU cores):")
    for command, seconds in times:
        print(f"  {seconds:5.1f}  {command[:100]}")
    return folder, times


def test_the_documented_chain_runs_as_written(chain):
    folder, times = chain
    assert [c.split()[1] for c in (c for c, _ in times) if c.startswith("python")] == [
        "tests/tiny_sd3.py", "text_encoders.py", "train_ladd.py", "sample.py", "sample.py"]
    # conditioning: two prompts, SD3's 154 tokens at the tiny T5's width, fp16 shards
    names, cond = te.read_shards(folder / "cond")
    assert names == [PROMPT, "the photo of a cat"]
    assert cond["context"].shape == (2, 154, 192) and cond["pooled"].shape == (2, 128)
    # the student: trained at the run's sizes, not the teacher's default (32x32 here, 1024 for SD3)
    run = folder / "runs" / "tiny-sd3"
    meta = weights.load_metadata(run / "model.safetensors")
    assert json.loads(meta["sizes"]) == [[48, 32], [32, 48]]
    assert json.loads(meta["sampler"])["times"] == [1.0, 0.75, 0.5, 0.25]
    spec = json.loads(meta["text_encoder"])
    assert spec["relative"] == {"file": "../../tiny-sd3"} and os.path.isabs(spec["file"])
    # its grid drawn at the run's first size, 48x32: the same picture size as six 48x32 columns
    probe = folder / "probe.png"
    images.save_strip([[torch.zeros(3, 32, 48)] * 6] * 4, probe,
                      labels=["teacher 28 steps, cfg 7", "teacher 4 steps, cfg 7", "student 4 steps",
                              "student 1 step"])
    assert read_png(run / "grid.png").shape == read_png(probe).shape
    # samples at the student's first size; img2img keeps the input's size
    for out in ("samples/tiny-sd3", "samples/tiny-sd3-img2img"):
        image = read_png(folder / out / "000.png")
        assert image.shape == (32, 48, 3) and image.std() > 0
    config = json.loads((folder / "samples/tiny-sd3-img2img/config.json").read_text())
    assert config["strength"] == 0.5 and len(config["sigmas"]) == 3   # 2 of the 4 student steps


def cli_device():
    import cli
    return cli.pick_device("auto").type


def _sample(ckpt, out, *extra):
    sample.main(["--ckpt", str(ckpt), "--prompt", PROMPT, "--out", str(out), "--device", "cpu",
                 "--quiet", *extra])
    return read_png(Path(out) / "000.png")


def test_a_moved_run_folder_samples_as_before(chain, tmp_path, capsys):
    """The student names its teacher's text encoders by an absolute path and by one relative to
    the run folder: moved alone it finds them by the first, moved with its teacher (another
    machine's layout) by the second; with neither, one line names --text-encoders, which works."""
    folder, _ = chain
    want = _sample(folder / "runs" / "tiny-sd3", tmp_path / "here")
    if cli_device() == "cpu":  # the documented command ran on the CPU too (else: CUDA, bf16)
        assert np.abs(want.astype(int) - read_png(folder / "samples/tiny-sd3/000.png")).max() <= 1
    # 1. the run folder alone, elsewhere on this machine
    alone = tmp_path / "elsewhere" / "my-run"
    shutil.copytree(folder / "runs" / "tiny-sd3", alone)
    assert np.array_equal(_sample(alone, tmp_path / "s1"), want)
    # 2. teacher and run moved together under another root (the absolute path is gone)
    other = tmp_path / "other-machine" / "home" / "me"
    shutil.copytree(folder / "tiny-sd3", other / "tiny-sd3")
    shutil.copytree(folder / "runs" / "tiny-sd3", other / "runs" / "tiny-sd3")
    spec = json.loads(weights.load_metadata(other / "runs/tiny-sd3/model.safetensors")["text_encoder"])
    hide = folder / "tiny-sd3-hidden"
    os.rename(folder / "tiny-sd3", hide)                    # the old absolute path: gone
    try:
        assert not os.path.exists(spec["file"])
        assert np.array_equal(_sample(other / "runs" / "tiny-sd3", tmp_path / "s2"), want)
        # 3. the run alone where neither path holds the encoders: one line, nothing written
        err = expect_one_line_error(sample.main, capsys, [
            "--ckpt", str(alone), "--prompt", PROMPT, "--out", str(tmp_path / "s3"), "--device",
            "cpu"], "--text-encoders", "tiny-sd3", "does not exist")
        assert not os.path.exists(tmp_path / "s3"), err
        # ... --cond needs no encoders, --text-encoders points at them
        assert np.array_equal(_sample(alone, tmp_path / "s4", "--text-encoders",
                                      str(other / "tiny-sd3")), want)
    finally:
        os.rename(hide, folder / "tiny-sd3")


def _without(folder, tmp_path, missing, name=None):
    """A copy of a diffusers folder (links to its parts) without the subfolder `missing`."""
    copy = tmp_path / (name or f"without-{missing}")
    copy.mkdir()
    for part in os.listdir(folder):
        if part != missing:
            os.symlink(folder / part, copy / part)
    return copy


def test_bad_inputs_are_one_line_errors_that_write_nothing(chain, tmp_path, capsys):
    import train_ladd
    folder, _ = chain
    teacher = folder / "tiny-sd3"
    out = tmp_path / "out"
    # a diffusers folder without T5: say how to run without it
    no_t5 = _without(teacher, tmp_path, "text_encoder_3")
    expect_one_line_error(te.main, capsys, ["--ckpt", str(no_t5), "--prompts", PROMPT, "--out",
                                            str(out), "--device", "cpu"],
                          "text_encoder_3/", "--no-t5")
    expect_one_line_error(sample.main, capsys, ["--ckpt", str(no_t5), "--prompt", PROMPT, "--out",
                                                str(out), "--device", "cpu", "--width", "32"],
                          "text_encoder_3/", "--no-t5")
    expect_one_line_error(train_ladd.main, capsys, [
        "--preset", "test", "--teacher", str(no_t5), "--prompts", PROMPT, "--out", str(out),
        "--data-sizes", "48x32,32x48", "--data-dir", str(out / "data"), "--device", "cpu"],
        "text_encoder_3/", "--no-t5", "--cond")
    assert not out.exists()
    te.main(["--ckpt", str(no_t5), "--no-t5", "--prompts", PROMPT, "--out", str(out / "cond"),
             "--device", "cpu", "--quiet"])                     # ... and the fix works
    assert not te.read_shards(out / "cond")[1]["context"][:, 77:].any()
    assert _sample(no_t5, out / "s", "--no-t5", "--width", "32").shape == (32, 32, 3)
    # ... without its MMDiT or its VAE
    for part in ("transformer", "vae"):
        expect_one_line_error(sample.main, capsys, [
            "--ckpt", str(_without(teacher, tmp_path, part)), "--prompt", PROMPT, "--out",
            str(tmp_path / "o1"), "--device", "cpu"], f"a diffusers folder without {part}/",
            "put the release's")
    assert not (tmp_path / "o1").exists()
    # a config.json that disagrees with the weights
    bad = _without(teacher, tmp_path, "transformer", "bad-config")
    shutil.copytree(teacher / "transformer", bad / "transformer", symlinks=True)
    config = json.loads((bad / "transformer" / "config.json").read_text())
    (bad / "transformer" / "config.json").write_text(json.dumps({**config, "num_layers": 3}))
    expect_one_line_error(sample.main, capsys, ["--ckpt", str(bad), "--prompt", PROMPT, "--out",
                                                str(tmp_path / "o2"), "--device", "cpu"],
                          "transformer/config.json", "num_layers is 3", "imply 2", "fix num_layers")
    (bad / "transformer" / "config.json").write_text(json.dumps({**config, "attention_head_dim": 32}))
    expect_one_line_error(sample.main, capsys, ["--ckpt", str(bad), "--prompt", PROMPT, "--out",
                                                str(tmp_path / "o2"), "--device", "cpu"],
                          "num_attention_heads x attention_head_dim is 64", "imply 128")
    assert not (tmp_path / "o2").exists()
    # conditioning made with other text encoders (SD3's real widths) than the teacher's
    other = tmp_path / "other-cond"
    te.save_shard(other / "cond-00000.safetensors", torch.zeros(2, 154, 4096), torch.zeros(2, 2048),
                  torch.zeros(1, 154, 4096), torch.zeros(1, 2048), ["a", "b"])
    run = tmp_path / "run"
    expect_one_line_error(train_ladd.main, capsys, [
        "--preset", "test", "--teacher", str(teacher), "--cond", str(other), "--out", str(run),
        "--data-sizes", "48x32,32x48", "--data-dir", str(tmp_path / "data"), "--device", "cpu"],
        "--cond", "(4096, 2048)", "(192, 128)")
    expect_one_line_error(sample.main, capsys, ["--ckpt", str(teacher), "--cond", str(other),
                                                "--out", str(tmp_path / "o3"), "--device", "cpu"],
                          "--cond", "(4096, 2048)", "(192, 128)", "python text_encoders.py --ckpt")
    assert not run.exists() and not (tmp_path / "data").exists() and not (tmp_path / "o3").exists()
    # --text-encoders that does not exist
    expect_one_line_error(sample.main, capsys, ["--ckpt", str(teacher), "--prompt", PROMPT,
                                                "--text-encoders", str(tmp_path / "nowhere"),
                                                "--out", str(tmp_path / "o4"), "--device", "cpu"],
                          "--text-encoders", "nowhere")
    assert not (tmp_path / "o4").exists()


# ----------------------------------------------------------------------------------------------
# the two layouts and config.json; parity with diffusers

VARIANTS = list(tiny_sd3.VARIANTS)  # sd3-medium, sd3.5-large (qk-norm), sd3.5-medium (MMDiT-X)
PROMPTS = [PROMPT, "the photo of a cat"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """{variant: (diffusers folder, single file)}: the same random weights in both layouts."""
    root = tmp_path_factory.mktemp("tiny")
    out = {}
    for variant in VARIANTS:
        models = tiny_sd3.build_models(variant)
        out[variant] = (tiny_sd3.write_diffusers(root / variant, models),
                        tiny_sd3.write_single(root / f"{variant}-single" / "sd3.safetensors", models))
    return out


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_diffusers_folder_and_the_single_file_are_the_same_model(tiny, variant):
    folder, single = tiny[variant]
    a, b = pipeline.load_pipeline(folder), pipeline.load_pipeline(single)
    assert a.model.config == b.model.config == tiny_sd3.mmdit_config(variant)
    assert a.vae.config == b.vae.config == tiny_sd3.VAE
    assert (a.sizes, b.sizes) == ([(32, 32)], [(1024, 1024)])  # sample_size x 8; a bare file: SD3's
    ca, cb = pipeline.encode(a, PROMPTS), pipeline.encode(b, PROMPTS)
    assert torch.equal(ca.context, cb.context) and torch.equal(ca.pooled, cb.pooled)
    la = pipeline.generate(a, ca, 32, 32, steps=2, progress=False, decode=False)
    lb = pipeline.generate(b, cb, 32, 32, steps=2, progress=False, decode=False)
    assert torch.allclose(la, lb, atol=1e-6, rtol=0)


def test_config_json_gives_the_heads_the_weights_cannot_tell(tiny, tmp_path):
    """Without qk-norm the weights do not say how many heads: the diffusers folder's config.json
    does (4 heads of 32 here, a different model from SD3's rule of 64-dim heads), and for a
    qk-norm model it is checked against the norms' width."""
    import mmdit
    for variant, heads in (("sd3-medium", 4), ("sd3.5-large", 4)):
        folder = Path(tiny[variant][0])
        copy = tmp_path / variant
        shutil.copytree(folder / "transformer", copy)
        config = json.loads((copy / "config.json").read_text())
        (copy / "config.json").write_text(json.dumps(
            {**config, "num_attention_heads": heads, "attention_head_dim": 128 // heads}))
        if variant == "sd3-medium":
            four, two = mmdit.MMDiT.from_pretrained(copy), mmdit.MMDiT.from_pretrained(folder)
            assert (four.config.num_heads, two.config.num_heads) == (4, 2)
            x, t = torch.randn(1, 16, 4, 4), torch.tensor([0.7])
            c, y = torch.randn(1, 154, 192), torch.randn(1, 128)
            with torch.no_grad():
                assert (four(x, t, c, y) - two(x, t, c, y)).abs().max() > 1e-3
        else:
            with pytest.raises(weights.WeightsError, match="attention_head_dim is 32 but the "
                               "transformer weights beside it imply 64"):
                mmdit.MMDiT.from_pretrained(copy)
    # the VAE's and the text encoders' config.json: read (scale, heads) and checked the same way
    import vae as vae_lib
    folder = Path(tiny["sd3-medium"][0])
    for part, change, message in [
            ("vae", {"scaling_factor": 2.0}, None),
            ("vae", {"latent_channels": 4}, "latent_channels is 4 but the VAE weights beside it imply 16"),
            ("text_encoder_2", {"num_attention_heads": 4}, None),
            ("text_encoder_2", {"num_hidden_layers": 3},
             "num_hidden_layers is 3 but the clip_g text encoder weights beside it imply 2")]:
        copy = tmp_path / f"{part}-{next(iter(change))}"
        shutil.copytree(folder / part, copy)
        config = json.loads((copy / "config.json").read_text())
        (copy / "config.json").write_text(json.dumps({**config, **change}))
        if part == "vae":
            load = lambda: vae_lib.VAE.from_pretrained(copy)  # noqa: E731
        else:
            load = lambda: te.load_encoder(weights.load_file(copy / "model.safetensors"), "clip_g",  # noqa: E731
                                           str(copy), te._config_json(copy, "clip_g")[0])
        if message:
            with pytest.raises(weights.WeightsError, match=message):
                if part == "vae":
                    load()
                else:
                    te.SD3TextEncoder.from_pretrained(clip_l=folder / "text_encoder", clip_g=copy,
                                                      use_t5=False)
        elif part == "vae":
            assert load().config.scale == 2.0
        else:
            assert load().config.heads == 4


_LOADED = {}


def _diffusers_pipe(folder):
    """diffusers' StableDiffusion3Pipeline on the folder, float32, quiet (loaded once a folder)."""
    diffusers = pytest.importorskip("diffusers")
    transformers = pytest.importorskip("transformers")
    if str(folder) not in _LOADED:
        for lib in (diffusers, transformers):
            lib.utils.logging.set_verbosity_error()
            lib.utils.logging.disable_progress_bar()
        pipe = diffusers.StableDiffusion3Pipeline.from_pretrained(str(folder), dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)
        _LOADED[str(folder)] = pipe
    return _LOADED[str(folder)]


def _errors(ours, theirs):
    ours, theirs = ours.detach(), theirs.detach()
    d = (ours.double() - theirs.double())
    return float(d.abs().max()), float(d.norm() / theirs.double().norm())


@pytest.mark.parametrize("variant", VARIANTS)
def test_end_to_end_equals_diffusers_stable_diffusion3_pipeline(tiny, variant):
    """The folder through this project and through diffusers' StableDiffusion3Pipeline: prompt
    embeddings (T5 at 77 tokens, as here), then 4 guided steps (cfg 7, shift 3: the folder's
    defaults) from the same noise (this project's seeded noise given to diffusers as `latents`),
    final latents and decoded images: max abs error < 1e-4 each."""
    folder = tiny[variant][0]
    theirs = _diffusers_pipe(folder)
    ours = pipeline.load_pipeline(folder)
    cond = pipeline.encode(ours, PROMPTS)
    context, uncond_context, pooled, uncond_pooled = theirs.encode_prompt(
        prompt=PROMPTS, prompt_2=None, prompt_3=None, negative_prompt="",
        do_classifier_free_guidance=True, max_sequence_length=77)
    report = {"context": _errors(cond.context, context), "pooled": _errors(cond.pooled, pooled),
              "uncond context": _errors(cond.uncond_context, uncond_context[:1]),
              "uncond pooled": _errors(cond.uncond_pooled, uncond_pooled[:1])}
    noise = pipeline.flow.seeded_noise([0, 1], (16, 4, 4), "cpu")         # [2, 16, 4, 4]
    latents = pipeline.generate(ours, cond, 32, 32, steps=4, seed=0, progress=False, decode=False)
    with torch.no_grad():
        want = theirs(prompt=PROMPTS, negative_prompt="", num_inference_steps=4, height=32,
                      width=32, latents=noise.clone(), max_sequence_length=77,
                      output_type="latent").images
        vae = theirs.vae
        image = vae.decode(want / vae.config.scaling_factor + vae.config.shift_factor).sample
    report["latents"] = _errors(latents, want)
    report["images"] = _errors(ours.vae.decode(latents) / 2 + 0.5, (image / 2 + 0.5).clamp(0, 1))
    print(f"\n{variant} vs diffusers (max abs, relative):",
          {k: (f"{a:.1e}", f"{r:.1e}") for k, (a, r) in report.items()})
    assert ours.defaults["shift"] == theirs.scheduler.config.shift == 3.0
    assert latents.abs().max() > 1 and 0 < image.abs().max() < 1    # nothing vanishes or clamps
    for name, (max_abs, _) in report.items():
        assert max_abs < 1e-4, (name, report)


def test_clip_g_differs_from_diffusers_on_a_literal_bang_because_diffusers_tokenizer_2_pads_with_it(tiny):
    """The release's tokenizer_2 has pad_token "!", so transformers splits every literal "!" in
    a prompt out as a pad token (id 0) before BPE; this project tokenizes CLIP-G like CLIP-L, as
    the SD3 reference does. Prompts without "!" agree (the test above)."""
    folder = tiny["sd3-medium"][0]
    theirs = _diffusers_pipe(folder)
    ours = pipeline.load_pipeline(folder)
    prompt = "a red cat!! on a blue background"
    want = theirs.tokenizer_2([prompt], padding="max_length", max_length=77,
                              truncation=True, return_tensors="pt").input_ids
    got = ours.text_encoder.clip_tokenizer([prompt], 0)
    l_ids = theirs.tokenizer([prompt], padding="max_length", max_length=77, truncation=True,
                             return_tensors="pt").input_ids
    assert torch.equal(ours.text_encoder.clip_tokenizer([prompt], 49407), l_ids)  # CLIP-L agrees
    end = int((want[0] == 49407).nonzero()[0])
    assert (want[0, :end] == 0).sum() == 2 and not (got[0, :end] == 0).any()  # "!!": two pads
    context, _, pooled, _ = theirs.encode_prompt(prompt=[prompt], prompt_2=None, prompt_3=None,
                                                 do_classifier_free_guidance=False,
                                                 max_sequence_length=77)
    cond = pipeline.encode(ours, [prompt])
    L, G = tiny_sd3.CLIP_L.width, tiny_sd3.CLIP_G.width
    assert _errors(cond.context[:, :77, :L], context[:, :77, :L])[0] < 1e-4      # CLIP-L rows
    assert _errors(cond.context[:, 77:], context[:, 77:])[0] < 1e-4              # T5 rows
    assert _errors(cond.context[:, :77, L:L + G], context[:, :77, L:L + G])[0] > 1e-2  # CLIP-G
    assert _errors(cond.pooled[:, L:], pooled[:, L:])[0] > 1e-2


def test_t5_gets_77_tokens_as_in_the_sd3_reference_not_diffusers_default_256(tiny):
    """diffusers' default max_sequence_length is 256: a 77 + 256 = 333-token context whose T5
    rows differ too (T5 attends over its padding); this project keeps the reference's 77 (154
    tokens, batches stack). With max_sequence_length=77 the two agree (the parity test)."""
    folder = tiny["sd3-medium"][0]
    theirs = _diffusers_pipe(folder)
    ours = pipeline.load_pipeline(folder)
    context, *_ = theirs.encode_prompt(prompt=[PROMPT], prompt_2=None, prompt_3=None,
                                       do_classifier_free_guidance=False)
    cond = pipeline.encode(ours, [PROMPT])
    assert context.shape == (1, 333, 192) and cond.context.shape == (1, 154, 192)
    assert _errors(cond.context[:, :77], context[:, :77])[0] < 1e-4           # the CLIP rows
    assert _errors(cond.context[:, 77:], context[:, 77:154])[0] > 1e-3        # T5 rows differ


def test_a_clip_l_projection_that_is_not_the_identity_is_noted(tiny, tmp_path, capsys):
    """SD3 uses CLIP-L's pooled output unprojected; diffusers projects it with text_encoder/'s
    text_projection (the identity in the tiny folder, and what diffusers itself puts there for a
    single file). A folder whose projection is something else would make the two differ: said."""
    folder = Path(tiny["sd3-medium"][0])
    te.SD3TextEncoder.from_pretrained(clip_l=folder / "text_encoder", clip_g=folder / "text_encoder_2",
                                      use_t5=False)
    assert "text_projection" not in capsys.readouterr().err
    copy = tmp_path / "text_encoder"
    shutil.copytree(folder / "text_encoder", copy)
    state = dict(weights.load_file(copy / "model.safetensors"))
    state["text_projection.weight"] = 2 * state["text_projection.weight"]
    weights.save_file(state, copy / "model.safetensors")
    te.SD3TextEncoder.from_pretrained(clip_l=copy, clip_g=folder / "text_encoder_2", use_t5=False)
    assert "CLIP-L has a text_projection that is not the identity" in capsys.readouterr().err
