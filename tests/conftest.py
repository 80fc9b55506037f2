"""Shared test helpers: a tiny self-describing checkpoint and a one-thread fixture."""
import json
import os
import tempfile

import numpy as np
import pytest
import torch
from PIL import Image

import mmdit
import vae as vae_lib
import weights

PROMPTS = ["a red circle on a blue background",
           "a green square to the left of a yellow triangle on a white background",
           "a purple triangle above a orange circle on a black background"]


LADD_SAMPLER = {"steps": 2, "cfg": 2.0, "shift": 1.0, "sampler": "euler"}  # a fast tiny teacher's


def ladd_argv(teacher, out, *extra):
    """train_ladd.py's test preset on a tiny teacher; its data cached beside it (made once)."""
    data = os.path.join(os.path.dirname(teacher), "data")
    return ["--preset", "test", "--teacher", teacher, "--out", str(out), "--data-dir", data,
            "--device", "cpu", "--judge-n", "0", *extra]


def make_checkpoint(folder, sampler, name="model.safetensors"):
    """A tiny MMDiT (random, non-zero weights so it does something) + the test VAE, with the
    metadata train_teacher.py / train_ladd.py write."""
    torch.manual_seed(0)
    z = vae_lib.CONFIGS["test"].z_channels
    config = mmdit.MMDiTConfig(depth=2, hidden_size=32, num_heads=2, patch_size=2, in_channels=z,
                               out_channels=z, pos_embed_max_size=16, pooled_dim=64, context_dim=64,
                               qk_norm=True)
    model = mmdit.MMDiT(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    vae_lib.VAE("test").save_pretrained(os.path.join(folder, "shapes_vae.safetensors"))
    path = os.path.join(folder, name)
    model.save_pretrained(path, {
        "text_encoder": json.dumps({"name": "shapes", "dim": 64, "pooled_dim": 64, "seed": 0}),
        "vae": "shapes_vae.safetensors",
        "sampler": json.dumps(sampler),
        "sizes": json.dumps([[16, 16], [24, 16]]),
    })
    return path


def make_inpainting_checkpoint(folder, sampler, name="inpaint.safetensors"):
    """make_checkpoint's model as an inpainting model (latent, mask, known latent in), its new
    input channels random rather than zero so that they matter, next to the t2i file."""
    import dataclasses
    from train_teacher import widen_input
    t2i = mmdit.MMDiT.from_pretrained(make_checkpoint(folder, sampler))
    z = t2i.config.out_channels
    model = mmdit.MMDiT(dataclasses.replace(t2i.config, in_channels=2 * z + 1))
    model.load_state_dict(widen_input(t2i.state_dict(), 2 * z + 1))
    with torch.no_grad():
        model.x_embedder.proj.weight[:, z:] += 0.05 * torch.randn_like(model.x_embedder.proj.weight[:, z:])
    meta = {k: v for k, v in weights.load_metadata(os.path.join(folder, "model.safetensors")).items()
            if k not in ("kind", "config")}
    path = os.path.join(folder, name)
    model.save_pretrained(path, meta)
    return path


def make_edit_checkpoint(folder, sampler, name="edit.safetensors"):
    """make_checkpoint's model as an editing model (latent and source latent in), its new input
    channels random rather than zero so that they matter, next to the t2i file. Its sampling
    defaults get image_cfg 1.5 unless `sampler` has one."""
    import dataclasses
    from train_teacher import widen_input
    t2i = mmdit.MMDiT.from_pretrained(make_checkpoint(folder, sampler))
    z = t2i.config.out_channels
    model = mmdit.MMDiT(dataclasses.replace(t2i.config, in_channels=2 * z))
    model.load_state_dict(widen_input(t2i.state_dict(), 2 * z))
    with torch.no_grad():
        model.x_embedder.proj.weight[:, z:] += 0.05 * torch.randn_like(model.x_embedder.proj.weight[:, z:])
    meta = {k: v for k, v in weights.load_metadata(os.path.join(folder, "model.safetensors")).items()
            if k not in ("kind", "config")}
    meta["sampler"] = json.dumps({"image_cfg": 1.5, **sampler})
    path = os.path.join(folder, name)
    model.save_pretrained(path, meta)
    return path


@pytest.fixture(autouse=True, scope="module")
def one_thread(request):
    """Models this small gain nothing from threads; one thread keeps a busy 2-core box fast.
    Applies to the modules that set ONE_THREAD = True."""
    if not getattr(request.module, "ONE_THREAD", False):
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def read_png(path):
    return np.asarray(Image.open(path).convert("RGB")).astype(int)


def expect_one_line_error(main, capsys, argv, *words):
    """main(argv) must exit 2 with exactly one line on stderr, starting 'error:' and naming words."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and "Traceback" not in err, err
    for w in words:
        assert w in err, err
    return err


def read_only(folder, monkeypatch):
    """Make `folder` read-only (mode 555). Root writes anywhere, so for root the creation of a
    file in it (or below it) is refused the way the system refuses anyone else."""
    folder.chmod(0o555)
    try:
        (folder / ".probe").write_bytes(b"")
    except PermissionError:
        return
    os.remove(folder / ".probe")
    real = tempfile.mkstemp

    def refuse(*args, dir=None, **kwargs):
        if dir is not None and os.path.abspath(dir).startswith(os.path.abspath(folder)):
            raise PermissionError(13, "Permission denied", dir)
        return real(*args, dir=dir, **kwargs)
    monkeypatch.setattr(tempfile, "mkstemp", refuse)


def files(folder):
    """Every file under `folder` -> its bytes (a file: its bytes; nothing there: None): what a
    "nothing was written" check compares before and after."""
    if not os.path.exists(folder):
        return None
    if os.path.isfile(folder):
        return open(folder, "rb").read()
    return {os.path.relpath(os.path.join(d, f), folder): open(os.path.join(d, f), "rb").read()
            for d, _, names in os.walk(folder) for f in names}


@pytest.fixture
def no_loading(monkeypatch):
    """A model loaded or run fails the test: the checks must come first."""
    import pipeline

    def fail(*args, **kwargs):
        raise AssertionError("a model was loaded or run before the options were checked")
    for name in ("load_pipeline", "generate"):
        monkeypatch.setattr(pipeline, name, fail)
