"""Tests for vae.py: the SD3 key layout, equivalence with diffusers' AutoencoderKL, a short
training run, tiled encode/decode, and loading from every file layout (and failing clearly)."""
import json
import os

import pytest
import torch

import vae
import weights
from weights import SafetensorsError, WeightsError

MANIFEST = os.path.join(os.path.dirname(__file__), "manifests", "sd3_vae_keys.json")


def rectangles(n, size, generator):
    """[n, 3, size, size] in [-1, 1]: a flat background and two flat rectangles."""
    img = (torch.rand(n, 3, 1, 1, generator=generator) * 2 - 1).expand(n, 3, size, size).clone()
    for i in range(n):
        for _ in range(2):
            y, x = torch.randint(0, size - size // 4, (2,), generator=generator).tolist()
            h, w = torch.randint(size // 4, size // 2, (2,), generator=generator).tolist()
            img[i, :, y:y + h, x:x + w] = torch.rand(3, 1, 1, generator=generator) * 2 - 1
    return img


def random_vae(config, seed=0):
    """A VAE whose every parameter (norm affines and biases too) is random."""
    torch.manual_seed(seed)
    model = vae.VAE(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.fixture(scope="module")
def trained():
    """The tiny VAE after 100 Adam steps on 8 rectangle images (16x16): (model, images, MSE at
    init, MSE after). One thread: these convs are too small to gain from two, and lose a lot
    when other processes share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        g = torch.Generator().manual_seed(0)
        model, images = vae.VAE("tiny"), rectangles(8, 16, g)

        def mse():
            with torch.no_grad():
                return ((model.decode(model.encode(images)) - images) ** 2).mean().item()

        before = mse()
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        for _ in range(100):
            moments = model.encoder(images)
            loss = ((model.decoder(moments[:, :4]) - images) ** 2).mean()  # the mean as latent
            opt.zero_grad()
            loss.backward()
            opt.step()
        yield model.eval().requires_grad_(False), images, before, mse()
    finally:
        torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------------------
# layout and architecture


def test_sd3_keys_and_shapes_equal_the_manifest():
    with open(MANIFEST) as f:
        manifest = {k: tuple(v) for k, v in json.load(f).items()}
    with torch.device("meta"):
        model = vae.VAE("sd3")
    ours = {"first_stage_model." + k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == manifest
    assert len(ours) == 244
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 1) == 83.8
    bare = weights.strip_prefix(manifest, "first_stage_model.")
    assert vae.VAEConfig.from_state_dict(bare) == vae.CONFIGS["sd3"]
    assert vae.CONFIGS["sd3"].factor == 8 and vae.CONFIGS["tiny"].factor == 4


@pytest.mark.parametrize("name", ["tiny", "test"])
def test_from_state_dict_gives_back_the_architecture(name):
    cfg = vae.CONFIGS[name]
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in vae.VAE(cfg).state_dict().items()}
    meta = {"config": json.dumps({k: getattr(cfg, k) for k in ("norm_groups", "scale", "shift")})}
    assert vae.VAEConfig.from_state_dict(shapes, meta) == cfg


def test_from_state_dict_rejects_what_is_not_a_vae():
    mmdit = {"joint_blocks.0.x_block.attn.qkv.weight": (96, 32),
             "x_embedder.proj.weight": (32, 16, 2, 2)}
    with pytest.raises(WeightsError, match="not an SD3-style VAE.*MMDiT with 1 joint blocks"):
        vae.VAEConfig.from_state_dict(mmdit, source="mmdit.safetensors")


def test_diffusers_layout_round_trip_is_identity():
    state = random_vae("tiny").state_dict()
    diff = vae.to_diffusers(state)
    assert diff["decoder.up_blocks.2.resnets.0.conv_shortcut.weight"] is not None  # up.0 is last
    assert diff["encoder.mid_block.attentions.0.to_out.0.weight"].shape == (64, 64)
    assert "encoder.conv_norm_out.weight" in diff
    assert "decoder.up_blocks.0.upsamplers.0.conv.bias" in diff
    back = vae.from_diffusers(diff)
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], state[k]) and back[k].shape == state[k].shape for k in state)
    with torch.device("meta"):
        sd3 = vae.to_diffusers(vae.VAE("sd3").state_dict())
    assert sd3["decoder.up_blocks.3.resnets.0.conv_shortcut.weight"].shape == (128, 256, 1, 1)
    assert sd3["decoder.up_blocks.0.upsamplers.0.conv.weight"].shape == (512, 512, 3, 3)


def test_matches_diffusers_autoencoderkl():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    ref = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(32, 64, 64),
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=2, norm_num_groups=8, use_quant_conv=False,
        use_post_quant_conv=False).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    state = vae.from_diffusers(ref.state_dict())
    meta = {"config": json.dumps({"norm_groups": 8})}
    model = vae.VAE(vae.VAEConfig.from_state_dict(state, meta))
    weights.load_strict(model, state, "diffusers AutoencoderKL", "an SD3-style VAE")
    assert vae.to_diffusers(model.state_dict()).keys() == ref.state_dict().keys()
    x, z = torch.rand(2, 3, 32, 24) * 2 - 1, torch.randn(2, 16, 8, 6)
    rel = lambda a, b: ((a - b).abs().max() / b.abs().max()).item()  # noqa: E731
    with torch.no_grad():
        assert rel(model.encoder(x), ref.encoder(x)) <= 1e-5
        assert rel(model.decoder(z), ref.decoder(z)) <= 1e-5
        latent = model.encode(x) / model.config.scale + model.config.shift
        assert rel(latent, ref.encode(x).latent_dist.mean) <= 1e-5


# ----------------------------------------------------------------------------------------------
# behaviour


def test_training_lowers_the_reconstruction_error(trained):
    _, _, before, after = trained
    assert after <= before / 2, (before, after)


def test_encode_decode_conventions():
    model = random_vae("test").requires_grad_(False)
    cfg = model.config = vae.VAEConfig(**{**vae.asdict(model.config), "scale": 1.5, "shift": 0.1})
    img = torch.rand(2, 3, 8, 6) * 2 - 1
    moments = model.encoder(img)                           # [2, 8, 4, 3]
    assert moments.shape == (2, 2 * cfg.z_channels, 4, 3)
    mean, logvar = moments.chunk(2, dim=1)
    assert torch.allclose(model.encode(img), (mean - 0.1) * 1.5)
    a = model.encode(img, generator=torch.Generator().manual_seed(1), sample=True)
    b = model.encode(img, generator=torch.Generator().manual_seed(1), sample=True)
    eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert torch.allclose(a, (mean + torch.exp(0.5 * logvar) * eps - 0.1) * 1.5, atol=1e-6)
    out = model.decode(a * 20)
    assert out.shape == img.shape and out.min() >= -1 and out.max() <= 1
    assert torch.allclose(out, model.decoder(a * 20 / 1.5 + 0.1).clamp(-1, 1))


def test_image_size_must_be_a_multiple_of_the_factor():
    model = vae.VAE("tiny")
    with pytest.raises(ValueError, match=r"30x32 .* factor 4.* 28x32 or 32x32"):
        model.encode(torch.zeros(1, 3, 30, 32))
    with pytest.raises(ValueError, match=r"image must be a \[B, 3, H, W\]"):
        model.encode(torch.zeros(3, 32, 32))
    with pytest.raises(ValueError, match=r"latents must be a \[B, 4, H, W\]"):
        model.decode(torch.zeros(1, 16, 8, 8))
    with pytest.raises(ValueError, match="overlap"):
        model.decode(torch.zeros(1, 4, 8, 8), tile=8, overlap=5)
    with pytest.raises(ValueError, match="multiple of 4"):
        model.encode(torch.zeros(1, 3, 32, 32), tile=30)


def test_tiled_decode_and_encode_match_untiled(trained):
    """A 96x96 image: decode in 3x3 tiles of 12 latents (overlap 6), encode in 2x2 tiles of 64 px
    (overlap 32). Measured max error 1.4e-3 (decode, images in [-1, 1]) and 6.1e-3 (encode,
    latents of std 2.8); what is left comes from the zero padding at tile borders. Normalising
    each tile by its own GroupNorm statistics instead gives 0.91 and 4.1."""
    model = trained[0]
    img = rectangles(2, 96, torch.Generator().manual_seed(1))
    with torch.no_grad():
        z = model.encode(img)                              # [2, 4, 24, 24]
        full = model.decode(z)
        assert torch.equal(model.decode(z, tile=24), full)  # one tile: the untiled path
        assert (model.decode(z, tile=12, overlap=6) - full).abs().max() < 1e-2
        assert (model.encode(img, tile=64, overlap=32) - z).abs().max() < 1e-2 * z.std()


# ----------------------------------------------------------------------------------------------
# files


def test_save_pretrained_from_pretrained_round_trip(tmp_path, trained):
    model, images = trained[:2]
    path = tmp_path / "tiny_vae.safetensors"
    model.save_pretrained(path, metadata={"note": "test"})
    infos, meta = weights.read_header(path)
    assert meta["kind"] == "vae" and meta["note"] == "test"
    assert set(infos) == set(model.state_dict())           # original names, no prefix
    loaded = vae.VAE.from_pretrained(path)
    assert loaded.config == model.config                   # norm_groups=8 from the metadata
    with torch.no_grad():
        assert torch.equal(loaded.decode(loaded.encode(images)), model.decode(model.encode(images)))
    half = vae.VAE.from_pretrained(path, dtype=torch.bfloat16)
    assert next(half.parameters()).dtype == torch.bfloat16
    assert half.encode(images).dtype == torch.bfloat16


def test_loads_sd3_single_file_and_diffusers_folder(tmp_path):
    # groups 32 and 16 latent channels: what a bare file implies, so nothing needs metadata
    cfg = vae.VAEConfig(ch=32, ch_mult=(1, 2), enc_res_blocks=1, dec_res_blocks=1)
    model = random_vae(cfg).requires_grad_(False)
    x = torch.rand(1, 3, 8, 8) * 2 - 1
    expected = model.decode(model.encode(x))
    single = {"first_stage_model." + k: v for k, v in model.state_dict().items()}
    single["model.diffusion_model.x_embedder.proj.weight"] = torch.zeros(64, 16, 2, 2)
    single["text_encoders.clip_l.transformer.text_model.final_layer_norm.weight"] = torch.ones(8)
    weights.save_file(single, tmp_path / "sd3.safetensors")
    os.makedirs(tmp_path / "pipe" / "vae")
    weights.save_file(vae.to_diffusers(model.state_dict()),
                      tmp_path / "pipe" / "vae" / "diffusion_pytorch_model.safetensors")
    for path in (tmp_path / "sd3.safetensors", tmp_path / "pipe", tmp_path / "pipe" / "vae"):
        loaded = vae.VAE.from_pretrained(path)
        assert loaded.config == cfg
        assert torch.equal(loaded.decode(loaded.encode(x)), expected)


def test_wrong_files_fail_clearly(tmp_path):
    mmdit = tmp_path / "mmdit.safetensors"
    weights.save_file({"joint_blocks.0.x_block.attn.qkv.weight": torch.zeros(96, 32),
                       "x_embedder.proj.weight": torch.zeros(32, 16, 2, 2)}, mmdit)
    with pytest.raises(WeightsError, match=f"{mmdit}.*not an SD3-style VAE.*MMDiT"):
        vae.VAE.from_pretrained(mmdit)
    no_vae = tmp_path / "sd3_without_vae.safetensors"
    weights.save_file({"model.diffusion_model.x_embedder.proj.weight": torch.zeros(4, 16, 2, 2)},
                      no_vae)
    with pytest.raises(WeightsError, match=f"{no_vae}: no VAE tensors"):
        vae.VAE.from_pretrained(no_vae)
    small = tmp_path / "test_vae.safetensors"
    vae.VAE("test").save_pretrained(small)
    fits = f"(?s){small}: does not fit an SD3-style VAE.*mis-shaped"
    with pytest.raises(WeightsError, match=fits):
        vae.VAE.from_pretrained(small, config="tiny")      # a different width
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(small.read_bytes()[:-100])
    with pytest.raises(SafetensorsError, match=str(truncated)):
        vae.VAE.from_pretrained(truncated)
