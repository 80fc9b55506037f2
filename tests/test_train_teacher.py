import json

import pytest
import torch

import mmdit
import train_teacher
import weights
from conftest import expect_one_line_error
from pipeline import load_pipeline

FAST = ["--preset", "test", "--judge-n", "0", "--device", "cpu"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    train_teacher.main(FAST + ["--out", str(out), "--judge-n", "3"])
    return out


def test_one_command_makes_a_sampleable_teacher(run):
    for name in ("vae.safetensors", "model.safetensors", "state.safetensors", "log.jsonl",
                 "config.json", "samples_final.png"):
        assert (run / name).is_file(), name
    pipe = load_pipeline(str(run), torch.device("cpu"), torch.float32)
    meta = pipe.metadata
    assert json.loads(meta["sampler"])["steps"] == 2 and json.loads(meta["text_encoder"])["name"] == "shapes"
    assert set(json.loads(meta["judge"])) >= {"all_correct", "purity", "shapes"}
    vae_meta = json.loads(weights.load_metadata(run / "vae.safetensors")["config"])
    assert vae_meta["scale"] != 1.0 and vae_meta["shift"] != 0.0   # measured, not the defaults
    logs = [json.loads(line) for line in open(run / "log.jsonl")]
    assert {r["phase"] for r in logs} == {"vae", "vae_judge", "teacher", "judge"}


def test_resume_matches_an_uninterrupted_run(tmp_path):
    whole, part = tmp_path / "whole", tmp_path / "part"
    train_teacher.main(FAST + ["--out", str(whole), "--steps", "4"])
    train_teacher.main(FAST + ["--out", str(part), "--steps", "2"])
    assert weights.load_state(part / "state.safetensors")["step"] == 2
    train_teacher.main(["--resume", str(part), "--steps", "4"])
    a, b = (weights.load_state(p / "state.safetensors") for p in (whole, part))
    assert a["step"] == b["step"] == 4
    for key in ("model", "ema"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key


def test_training_lowers_the_flow_loss():
    """The tiny teacher, trained for a few dozen steps on fixed latents, beats its own init."""
    torch.manual_seed(0)
    cfg = mmdit.CONFIGS["test"]
    model = mmdit.MMDiT(cfg)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(16, cfg.in_channels, 4, 4, generator=g).sign()       # a few sharp "latents"
    ctx, pooled = torch.randn(16, 3, cfg.context_dim), torch.randn(16, cfg.pooled_dim)

    def loss():
        return train_teacher.flow_loss(model, x0, ctx, pooled, torch.Generator().manual_seed(1), 0.0, 1.0)

    with torch.no_grad():
        before = loss().item()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(60):
        opt.zero_grad()
        train_teacher.flow_loss(model, x0, ctx, pooled, torch.Generator().manual_seed(step + 2),
                                0.0, 1.0).backward()
        opt.step()
    with torch.no_grad():
        assert loss().item() < 0.8 * before


def test_bad_options_fail_before_training(tmp_path, capsys):
    expect_one_line_error(train_teacher.main, capsys, ["--stepz", "3"], "--stepz", "--steps")
    expect_one_line_error(train_teacher.main, capsys, ["--preset", "huge"], "'huge'", "quick")
    expect_one_line_error(train_teacher.main, capsys, ["--resume", str(tmp_path / "nothing")],
                          "no config.json")


def test_data_workers_share_the_stream_in_step_order():
    """Two worker processes give exactly the batches of one process, each rendered once."""
    one = train_teacher.scene_loader(2, 5, 3, workers=0)
    two = train_teacher.scene_loader(2, 5, 3, workers=2)
    for _ in range(4):
        (a, ca), (b, cb) = next(one), next(two)
        assert ca == cb and torch.equal(a, b)


def test_inpainting_teacher_starts_from_a_text_to_image_one(run, tmp_path, capsys):
    """--task inpaint --init: the t2i teacher's weights, its patch embedding widened by zeros for
    the mask and the known latent; training then runs and is judged on edits."""
    init = ["--task", "inpaint", "--init", str(run / "model.safetensors"),
            "--vae", str(run / "vae.safetensors")]
    train_teacher.main(FAST + init + ["--out", str(tmp_path / "zero"), "--steps", "0"])
    t2i, wide = (weights.load_file(p / "model.safetensors") for p in (run, tmp_path / "zero"))
    z = t2i["x_embedder.proj.weight"].shape[1]
    w = wide["x_embedder.proj.weight"]
    assert w.shape[1] == 2 * z + 1 and torch.equal(w[:, :z], t2i["x_embedder.proj.weight"])
    assert not w[:, z:].any() and all(torch.equal(wide[k], t2i[k]) for k in t2i if "x_embedder.proj.w" not in k)
    train_teacher.main(FAST + init + ["--out", str(tmp_path / "inp"), "--judge-n", "2"])
    pipe = load_pipeline(str(tmp_path / "inp"))
    assert pipe.model.config.in_channels == 2 * z + 1
    assert json.loads(pipe.metadata["judge"])["kept"] == 1.0           # edits, exact outside
    capsys.readouterr()
    with pytest.raises(SystemExit):
        train_teacher.main(FAST + ["--task", "paint", "--out", str(tmp_path / "bad")])
    assert "--task 'paint'" in capsys.readouterr().err
