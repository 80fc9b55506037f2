"""
A tiny random SD3, written the way the real releases are, for trying the real-SD3 path on a CPU.

    python tests/tiny_sd3.py --out tiny-sd3                      # the diffusers layout (a folder)
    python tests/tiny_sd3.py --out tiny-sd3.safetensors --layout single   # the ..._incl_clips file
    python tests/tiny_sd3.py --out tiny-sd35m --variant sd3.5-medium
    python tests/tiny_sd3.py --out tiny-sd3-edit --edit         # an instruction-editing variant

The diffusers layout is what `StableDiffusion3Pipeline.from_pretrained` reads: model_index.json,
transformer/, vae/, text_encoder/ (CLIP-L), text_encoder_2/ (CLIP-G), text_encoder_3/ (T5),
tokenizer/, tokenizer_2/, tokenizer_3/ and scheduler/, each with the config.json the release
has. The single-file layout is `sd3_medium_incl_clips_t5xxlfp16.safetensors`'s: every component
under its prefix (model.diffusion_model., first_stage_model., text_encoders.*.transformer.), no
metadata, the T5 vocabulary beside it as the release's tokenizer_3/spiece.model.

Variants: sd3-medium (plain attention), sd3.5-large (qk-norm), sd3.5-medium (qk-norm and MMDiT-X:
a second image-only attention in block 0). The weights are random (seeded) and every size is
small: 2 joint blocks of width 128 (2 heads of 64, SD3's rule D = 64 x depth), a 4-level VAE of
width 32 with SD3's 16 latent channels and x8 factor, CLIP-L and CLIP-G of widths 64 and 128 over
CLIP's real vocabulary (their BPE ships in assets/), a 2-block T5 of width 192 over a hand-made
57-piece SentencePiece vocabulary. Default size 32x32 (transformer sample_size 4), at most
128x128 (pos_embed_max_size 8). Building one takes about a second.

--edit writes the instruction-editing variant (editing.py): the same model whose patch embedding
reads 2 x 16 = 32 channels, [noisy latent | source latent], 16 out (transformer/config.json
in_channels 32, out_channels 16). Its first 16 input channels are the plain model's weights
(seed for seed); the 16 new ones are random rather than zero (train_teacher.widen_input's start),
so that the source matters. No SD3 editing weights are public: this is a shape, not a model.

Nothing here imports pytest: the docs' commands run this file as a script.
"""

import argparse
import dataclasses
import gzip
import json
import os
import struct
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import mmdit  # noqa: E402
import text_encoders as te  # noqa: E402
import vae as vae_lib  # noqa: E402
import weights  # noqa: E402
from text_tokenizers import CLIP_MERGES_ASSET, bytes_to_unicode  # noqa: E402

VARIANTS = {
    "sd3-medium": dict(qk_norm=False, dual_attention_layers=()),
    "sd3.5-large": dict(qk_norm=True, dual_attention_layers=()),
    "sd3.5-medium": dict(qk_norm=True, dual_attention_layers=(0,)),
}
SAMPLE_SIZE = 4        # latent pixels: the default image is 32x32
CLIP_L = te.CLIPConfig(width=64, layers=2, heads=1, mlp_dim=128, act="quick_gelu")
CLIP_G = te.CLIPConfig(width=128, layers=2, heads=2, mlp_dim=256, act="gelu", projection_dim=64)
T5 = te.T5Config(vocab_size=64, d_model=192, layers=2, heads=3, d_kv=64, d_ff=128)
VAE = vae_lib.VAEConfig(ch=32, ch_mult=(1, 1, 1, 1), enc_res_blocks=1, dec_res_blocks=2)  # SD3's scale, shift

# a hand-made T5 unigram vocabulary: the specials, '▁', letters, digits, a few words
T5_PIECES = ([("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)]
             + [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789,.!"]
             + [("▁a", -1.0), ("▁red", -2.0), ("▁circle", -2.0), ("▁on", -2.0), ("▁blue", -2.0),
                ("▁background", -2.0), ("▁cat", -2.0), ("▁photo", -2.0), ("▁of", -2.0),
                ("▁the", -2.0), ("ing", -2.0), ("▁ca", -3.0), ("ts", -1.0)])


def mmdit_config(variant, edit=False):
    """The tiny MMDiT; edit: the editing variant, [latent | source latent] in (2 x 16 channels)."""
    return mmdit.MMDiTConfig(depth=2, hidden_size=128, num_heads=2, patch_size=2,
                             in_channels=32 if edit else 16, out_channels=16, pos_embed_max_size=8,
                             pooled_dim=CLIP_L.width + CLIP_G.projection_dim,
                             context_dim=T5.d_model, **VARIANTS[variant])


def _randomize(module, seed):
    """Seeded random weights that keep activations O(1): matrices ~ N(0, 1/fan_in), norm scales
    ~ 1 + N(0, 0.1), other vectors ~ N(0, 0.02). Fixed buffers (MMDiT's pos_embed) are kept."""
    g = torch.Generator().manual_seed(seed)
    tables = {f"{n}.weight" for n, m in module.named_modules() if isinstance(m, torch.nn.Embedding)}
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() >= 2:
                fan_in = 1 if name in tables else p[0].numel()  # lookup tables: N(0, 1)
                p.copy_(torch.randn(p.shape, generator=g) / fan_in ** 0.5)
            elif "norm" in name or name.endswith(("ln_q.weight", "ln_k.weight", "layer_norm.weight")):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
    return module


def build_models(variant="sd3-medium", seed=0, edit=False):
    """{"mmdit", "vae", "clip_l", "clip_g", "t5xxl"}: this project's modules, random, float32.
    edit: the MMDiT as an editing model (widen_to_edit), everything else the same."""
    if variant not in VARIANTS:
        raise ValueError(f"variant {variant!r}: choose one of {', '.join(VARIANTS)}")
    models = {"mmdit": mmdit.MMDiT(mmdit_config(variant)), "vae": vae_lib.VAE(VAE),
              "clip_l": te.CLIPTextEncoder(CLIP_L), "clip_g": te.CLIPTextEncoder(CLIP_G),
              "t5xxl": te.T5Encoder(T5)}
    for i, m in enumerate(models.values()):
        _randomize(m, 1000 * seed + i)
    with torch.no_grad():  # images mostly inside [-1, 1], not clamped (comparisons then mean something)
        models["vae"].decoder.conv_out.weight.mul_(0.1)
    if edit:
        models["mmdit"] = widen_to_edit(models["mmdit"], 1000 * seed + len(models))
    return models


def widen_to_edit(model, seed):
    """An MMDiT -> its editing variant, reading [latent | source latent] (2 z channels in, z
    out): the patch embedding's old channels keep their weights, the new ones are random
    (seeded, the old ones' scale), not zero as train_teacher.widen_input starts them."""
    c = model.config
    wide = mmdit.MMDiT(dataclasses.replace(c, in_channels=2 * c.out_channels))
    state = dict(model.state_dict())
    w = state["x_embedder.proj.weight"]                                   # [D, z, p, p]
    g = torch.Generator().manual_seed(seed)
    new = torch.randn(w.shape, generator=g) / w[0].numel() ** 0.5         # [D, z, p, p]
    state["x_embedder.proj.weight"] = torch.cat([w, new], dim=1)          # [D, 2z, p, p]
    wide.load_state_dict(state)
    return wide


# ----------------------------------------------------------------------------------------------
# tokenizer files


def clip_vocab():
    """(vocab {token: id}, merges ['a b', ...]) of CLIP's BPE, from the merges in assets/."""
    with gzip.open(CLIP_MERGES_ASSET, "rt", encoding="utf-8") as f:
        merges = [line for line in f.read().split("\n")[1:] if line]
    symbols = list(bytes_to_unicode().values())
    symbols += [s + "</w>" for s in symbols] + [m.replace(" ", "") for m in merges]
    symbols += ["<|startoftext|>", "<|endoftext|>"]
    return {s: i for i, s in enumerate(symbols)}, merges


def write_clip_tokenizer(folder, pad):
    """vocab.json, merges.txt and the configs of the release's tokenizer/ (pad '<|endoftext|>')
    or tokenizer_2/ (pad '!')."""
    os.makedirs(folder, exist_ok=True)
    vocab, merges = clip_vocab()
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    specials = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>", "pad_token": pad}
    _json(os.path.join(folder, "special_tokens_map.json"), specials)
    _json(os.path.join(folder, "tokenizer_config.json"),
          {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True,
           **specials})


def _varint(n):
    out = b""
    while True:
        out += bytes([(n & 0x7F) | (0x80 if n > 0x7F else 0)])
        n >>= 7
        if not n:
            return out


def _field(no, wire, payload):
    key = _varint(no << 3 | wire)
    return key + (_varint(len(payload)) + payload if wire == 2 else payload)


def spiece_model(pieces=T5_PIECES, unk_id=2, charsmap=b""):
    """A SentencePiece ModelProto (unigram) written by hand: pieces (field 1: piece, score, type),
    trainer spec (2: unigram, unk id), normalizer spec (3: its rules, `charsmap`, if any)."""
    msg = b""
    for i, (p, s) in enumerate(pieces):
        kind = 2 if i == unk_id else 3 if p in ("<pad>", "</s>") else 1
        body = _field(1, 2, p.encode()) + _field(2, 5, struct.pack("<f", s)) + _field(3, 0, _varint(kind))
        msg += _field(1, 2, body)
    msg += _field(2, 2, _field(3, 0, _varint(1)) + _field(40, 0, _varint(unk_id))
                  + _field(41, 0, _varint(0)) + _field(42, 0, _varint(1)) + _field(43, 0, _varint(2**64 - 1)))
    return msg + _field(3, 2, _field(1, 2, b"identity") + (_field(2, 2, charsmap) if charsmap else b""))


def write_t5_tokenizer(folder):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "spiece.model"), "wb") as f:
        f.write(spiece_model())
    specials = {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
    _json(os.path.join(folder, "special_tokens_map.json"), specials)
    _json(os.path.join(folder, "tokenizer_config.json"),
          {"tokenizer_class": "T5Tokenizer", "model_max_length": 512, "extra_ids": 0,
           "legacy": True, "add_prefix_space": True, **specials})


# ----------------------------------------------------------------------------------------------
# the two layouts


def _json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)


def transformer_config_json(config):
    """diffusers' SD3Transformer2DModel config.json for an MMDiTConfig."""
    return {"_class_name": "SD3Transformer2DModel", "sample_size": SAMPLE_SIZE,
            "patch_size": config.patch_size, "in_channels": config.in_channels,
            "num_layers": config.depth, "attention_head_dim": config.head_dim,
            "num_attention_heads": config.num_heads, "joint_attention_dim": config.context_dim,
            "caption_projection_dim": config.hidden_size, "pooled_projection_dim": config.pooled_dim,
            "out_channels": config.out_channels, "pos_embed_max_size": config.pos_embed_max_size,
            "dual_attention_layers": list(config.dual_attention_layers),
            "qk_norm": "rms_norm" if config.qk_norm else None}


def vae_config_json(c):
    n = len(c.ch_mult)
    return {"_class_name": "AutoencoderKL", "in_channels": c.in_channels,
            "out_channels": c.out_channels, "down_block_types": ["DownEncoderBlock2D"] * n,
            "up_block_types": ["UpDecoderBlock2D"] * n,
            "block_out_channels": [c.ch * m for m in c.ch_mult],
            "layers_per_block": c.enc_res_blocks, "act_fn": "silu", "latent_channels": c.z_channels,
            "norm_num_groups": c.norm_groups, "sample_size": SAMPLE_SIZE * c.factor,
            "scaling_factor": c.scale, "shift_factor": c.shift, "use_quant_conv": False,
            "use_post_quant_conv": False, "mid_block_add_attention": c.mid_attention,
            "force_upcast": True}


def clip_config_json(c, with_projection):
    return {"architectures": ["CLIPTextModelWithProjection"], "model_type": "clip_text_model",
            "vocab_size": c.vocab_size, "hidden_size": c.width, "intermediate_size": c.mlp_dim,
            "num_hidden_layers": c.layers, "num_attention_heads": c.heads,
            "max_position_embeddings": c.max_positions, "hidden_act": c.act,
            "layer_norm_eps": c.eps, "projection_dim": c.projection_dim or c.width,
            "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 1,
            "torch_dtype": "float32"}


def t5_config_json(c):
    return {"architectures": ["T5EncoderModel"], "model_type": "t5", "vocab_size": c.vocab_size,
            "d_model": c.d_model, "d_kv": c.d_kv, "d_ff": c.d_ff, "num_layers": c.layers,
            "num_heads": c.heads, "relative_attention_num_buckets": c.num_buckets,
            "relative_attention_max_distance": c.max_distance, "layer_norm_epsilon": c.eps,
            "feed_forward_proj": "gated-gelu", "dense_act_fn": "gelu_new", "is_gated_act": True,
            "dropout_rate": 0.0, "tie_word_embeddings": False, "is_encoder_decoder": True,
            "pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0,
            "torch_dtype": "float32"}


def write_diffusers(folder, models, dtype=torch.float32):
    """The diffusers layout of `models` (build_models) in `folder`."""
    cast = lambda state: {k: v.detach().to(dtype).contiguous() for k, v in state.items()}  # noqa: E731
    parts = {
        "transformer": ("diffusion_pytorch_model", mmdit.to_diffusers(models["mmdit"].state_dict()),
                        transformer_config_json(models["mmdit"].config)),
        "vae": ("diffusion_pytorch_model", vae_lib.to_diffusers(models["vae"].state_dict()),
                vae_config_json(models["vae"].config)),
    }
    clip_l = dict(models["clip_l"].state_dict())  # diffusers' CLIP-L has a projection: identity
    clip_l["text_projection.weight"] = torch.eye(CLIP_L.width)
    parts["text_encoder"] = ("model", clip_l, clip_config_json(CLIP_L, True))
    parts["text_encoder_2"] = ("model", models["clip_g"].state_dict(), clip_config_json(CLIP_G, True))
    t5 = {k: v for k, v in models["t5xxl"].state_dict().items()}
    parts["text_encoder_3"] = ("model", t5, t5_config_json(T5))
    for sub, (name, state, config) in parts.items():
        os.makedirs(os.path.join(folder, sub), exist_ok=True)
        weights.save_file(cast(state), os.path.join(folder, sub, f"{name}.safetensors"))
        _json(os.path.join(folder, sub, "config.json"), config)
    write_clip_tokenizer(os.path.join(folder, "tokenizer"), "<|endoftext|>")
    write_clip_tokenizer(os.path.join(folder, "tokenizer_2"), "!")
    write_t5_tokenizer(os.path.join(folder, "tokenizer_3"))
    os.makedirs(os.path.join(folder, "scheduler"), exist_ok=True)
    _json(os.path.join(folder, "scheduler", "scheduler_config.json"),
          {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000,
           "shift": 3.0})
    _json(os.path.join(folder, "model_index.json"), {
        "_class_name": "StableDiffusion3Pipeline", "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "text_encoder_3": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "tokenizer_3": ["transformers", "T5TokenizerFast"],
        "transformer": ["diffusers", "SD3Transformer2DModel"], "vae": ["diffusers", "AutoencoderKL"]})
    return folder


def write_single(path, models, dtype=torch.float32):
    """The ..._incl_clips_t5xxl single file of `models`, no metadata, and tokenizer_3/spiece.model
    beside it (where the loaders look for T5's vocabulary)."""
    state = {}
    for name, prefix in weights.SD3_PREFIXES.items():
        model = models["t5xxl" if name == "t5xxl" else name]
        state.update({prefix + k: v.detach().to(dtype) for k, v in model.state_dict().items()})
    weights.save_file(state, path)
    write_t5_tokenizer(os.path.join(os.path.dirname(os.path.abspath(path)), "tokenizer_3"))
    return path


def build(out, variant="sd3-medium", layout="diffusers", seed=0, dtype=torch.float32, edit=False):
    """A tiny random SD3 at `out` (a folder for the diffusers layout, a .safetensors file for the
    single-file one) -> out. The same variant and seed give the same weights in both layouts.
    edit: the instruction-editing variant (32 input channels)."""
    models = build_models(variant, seed, edit)
    if layout == "diffusers":
        return write_diffusers(os.fspath(out), models, dtype)
    if layout == "single":
        return write_single(os.fspath(out), models, dtype)
    raise ValueError(f"layout {layout!r}: choose diffusers or single")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="a folder (diffusers) or a .safetensors file (single)")
    p.add_argument("--variant", default="sd3-medium", choices=list(VARIANTS),
                   help="sd3-medium | sd3.5-large (qk-norm) | sd3.5-medium (qk-norm, MMDiT-X)")
    p.add_argument("--layout", default="diffusers", choices=["diffusers", "single"],
                   help="a diffusers folder, or one ..._incl_clips file with every component")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    p.add_argument("--edit", action="store_true",
                   help="the instruction-editing variant: the MMDiT reads [latent | source latent], "
                        "32 channels in, 16 out (edit.py)")
    a = p.parse_args(argv)
    if os.path.exists(a.out) and (os.path.isfile(a.out) or os.listdir(a.out)):
        sys.exit(f"error: --out {a.out} exists; pass a new path")
    build(a.out, a.variant, a.layout, a.seed, edit=a.edit)
    kind = " editing" if a.edit else ""
    print(f"wrote a tiny random{kind} {a.variant} ({a.layout} layout) to {a.out}")


if __name__ == "__main__":
    main()
