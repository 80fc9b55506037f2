"""
SD3's three text encoders, from scratch: CLIP-L, CLIP-G and T5-XXL.

    python text_encoders.py --ckpt sd3_medium_incl_clips_t5xxlfp16.safetensors \
        --t5-vocab tokenizer_3/spiece.model --prompts prompts.txt --out cond/
    python sample.py --ckpt sd3_medium.safetensors --cond cond/cond-00000.safetensors

What SD3 takes from each encoder (the reference's assembly, which diffusers and ComfyUI share):

    CLIP-L, CLIP-G:  the penultimate layer's hidden states, without the final LayerNorm [B, 77, D]
                     pooled = the final-LayerNorm output at the first end-of-text token; CLIP-L's
                     is used as it is (768), CLIP-G's goes through text_projection (1280)
    T5-XXL:          the last hidden states after the final RMS norm [B, 77, 4096]
    context = cat(pad_to_4096(cat(L, G)), T5) along the sequence: [B, 154, 4096], CLIP first
    pooled  = cat(L pooled, G pooled): [B, 2048]

Module attribute names equal the keys of the single-file checkpoints after
`text_encoders.{clip_l,clip_g,t5xxl}.transformer.` (and the diffusers text_encoder*/ folders),
so real files load with a strict key and shape check, tensors memory-mapped. The architecture of
each encoder is inferred from the tensor shapes.

The tokenizers live in text_tokenizers.py: CLIP's byte-level BPE (used by both CLIPs; L pads
with end-of-text, G with 0) and T5's SentencePiece unigram model. CLIP's merges ship in assets/
(MIT, see assets/clip_bpe_merges.LICENSE.txt); T5's vocabulary must come from the user's SD3
files: `tokenizer_3/spiece.model` or `tokenizer_3/tokenizer.json` of the diffusers-format release.

Choices where the published implementations differ (sd3_spec.md 3.4-3.5):
  * Prompts longer than 75 CLIP tokens are cut at 75 (diffusers; the reference also keeps only
    its first 77-token chunk, but ends it before a word that would straddle the boundary). T5
    gets 77 tokens, cut and padded (the reference's length for prompts up to 76 T5 tokens;
    diffusers uses 256), so every context is 154 tokens and batches stack.
  * Without T5 (--no-t5, or a file without it) the T5 part is 77 rows of zeros, keeping the
    154-token layout (A1111's choice; ComfyUI drops the rows, diffusers appends 256 zero rows).
    Zero rows still matter: the MMDiT's context_embedder has a bias.
  * CLIP-G is CLIP-L's tokenizer padded with 0, as in the reference. diffusers' tokenizer_2
    also treats a literal "!" in the prompt as its pad token, which changes the ids of prompts
    with "!" in them; this project does not copy that.
  * The unconditional input is the encoded empty prompt "", as in the reference.
"""

import json
import math
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

import cli
import weights
from text_tokenizers import T5_HELP, CLIPTokenizer, T5Tokenizer

COMPONENTS = ("clip_l", "clip_g", "t5xxl")
DIFFUSERS_FOLDERS = {"clip_l": "text_encoder", "clip_g": "text_encoder_2", "t5xxl": "text_encoder_3"}


# ----------------------------------------------------------------------------------------------
# configs

ACTIVATIONS = {
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),   # CLIP-L (OpenAI)
    "gelu": F.gelu,                                         # CLIP-G (OpenCLIP), exact erf GELU
}


@dataclass
class CLIPConfig:
    vocab_size: int = 49408       # token embedding rows: 49,406 BPE tokens + start + end
    max_positions: int = 77       # learned positions, = the context length
    width: int = 768              # D
    layers: int = 12              # transformer layers
    heads: int = 12               # attention heads (64 dims each in CLIP-L and CLIP-G)
    mlp_dim: int = 3072           # MLP hidden width
    act: str = "quick_gelu"       # quick_gelu x*sigmoid(1.702x) (CLIP-L) | gelu, exact (CLIP-G)
    projection_dim: int = 0       # text_projection output width; 0: the file has none (SD3 CLIP-L)
    eps: float = 1e-5             # LayerNorm epsilon

    def __post_init__(self):
        if self.act not in ACTIVATIONS:
            raise ValueError(f"CLIP act {self.act!r} is not one of {list(ACTIVATIONS)}")
        if self.heads < 1 or self.width % self.heads:
            raise ValueError(f"CLIP width {self.width} is not divisible by heads {self.heads}")

    @classmethod
    def from_state_dict(cls, shapes, source="the state dict", **overrides):
        """Infer the architecture from {key: shape} of a CLIP text model (prefix stripped).
        The activation is not in the shapes: pass act= (the SD3 loader does, per encoder)."""
        def shape(key):
            if key not in shapes:
                raise weights.WeightsError(
                    f"{source}: not a CLIP text model: {key!r} is missing; the tensors look like "
                    f"{weights.describe_keys(shapes)}")
            return tuple(shapes[key])
        vocab, D = shape("text_model.embeddings.token_embedding.weight")
        layers = 1 + max((int(k.split(".")[3]) for k in shapes
                          if k.startswith("text_model.encoder.layers.")), default=-1)
        if layers < 1:
            raise weights.WeightsError(f"{source}: a CLIP text model without layers")
        proj = shape("text_projection.weight")[0] if "text_projection.weight" in shapes else 0
        kw = dict(vocab_size=vocab, width=D, layers=layers, heads=max(D // 64, 1),
                  max_positions=shape("text_model.embeddings.position_embedding.weight")[0],
                  mlp_dim=shape("text_model.encoder.layers.0.mlp.fc1.weight")[0],
                  projection_dim=proj)
        kw.update(overrides)
        return cls(**kw)


@dataclass
class T5Config:
    vocab_size: int = 32128       # embedding rows (32,100 ids used, padded to a multiple of 128)
    d_model: int = 4096           # D
    layers: int = 24              # encoder blocks
    heads: int = 64               # attention heads
    d_kv: int = 64                # per-head width; attention inner width = heads * d_kv
    d_ff: int = 10240             # gated-GELU hidden width
    num_buckets: int = 32         # relative-position buckets (half per direction)
    max_distance: int = 128       # distances from here on share the last bucket
    eps: float = 1e-6             # RMS norm epsilon

    @classmethod
    def from_state_dict(cls, shapes, source="the state dict", **overrides):
        """Infer the architecture from {key: shape} of a T5 encoder (prefix stripped)."""
        def shape(key):
            if key not in shapes:
                raise weights.WeightsError(
                    f"{source}: not a T5 v1.1 encoder: {key!r} is missing; the tensors look like "
                    f"{weights.describe_keys(shapes)}")
            return tuple(shapes[key])
        if "encoder.block.0.layer.1.DenseReluDense.wi.weight" in shapes:
            raise weights.WeightsError(f"{source}: a T5 v1.0 encoder (ReLU 'wi'); SD3 uses T5 v1.1 "
                                       "(gated GELU, 'wi_0' and 'wi_1')")
        vocab, D = shape("encoder.embed_tokens.weight")
        buckets, heads = shape("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
        layers = 1 + max(int(k.split(".")[2]) for k in shapes if k.startswith("encoder.block."))
        kw = dict(vocab_size=vocab, d_model=D, layers=layers, heads=heads, num_buckets=buckets,
                  d_kv=shape("encoder.block.0.layer.0.SelfAttention.q.weight")[0] // heads,
                  d_ff=shape("encoder.block.0.layer.1.DenseReluDense.wi_0.weight")[0])
        kw.update(overrides)
        return cls(**kw)


CONFIGS = {
    "clip-l": CLIPConfig(),                                                       # 123.1 M params
    "clip-g": CLIPConfig(width=1280, layers=32, heads=20, mlp_dim=5120, act="gelu",
                         projection_dim=1280),                                    # 694.7 M
    "t5-xxl": T5Config(),                                                         # 4.76 B (+ tied embedding)
    # tests: every feature at a few thousand parameters plus the vocabulary's embedding rows
    "test-clip-l": CLIPConfig(width=16, layers=2, heads=2, mlp_dim=32),
    "test-clip-g": CLIPConfig(width=24, layers=3, heads=3, mlp_dim=40, act="gelu",
                              projection_dim=16),
    "test-t5": T5Config(vocab_size=64, d_model=48, layers=2, heads=4, d_kv=6, d_ff=40,
                        num_buckets=8, max_distance=20),
}


# ----------------------------------------------------------------------------------------------
# CLIP text transformer (pre-norm, causal, learned positions)

class CLIPAttention(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(width, width)
                                                                for _ in range(4))

    def forward(self, x):
        B, L, D = x.shape
        q, k, v = (p(x).view(B, L, self.heads, -1).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))          # [B, H, L, hd]
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)           # [B, H, L, hd], 1/sqrt(hd)
        return self.out_proj(a.transpose(1, 2).reshape(B, L, D))              # [B, L, D]


class CLIPMLP(nn.Module):
    def __init__(self, width, hidden, act):
        super().__init__()
        self.fc1, self.fc2, self.act = nn.Linear(width, hidden), nn.Linear(hidden, width), act

    def forward(self, x):
        return self.fc2(ACTIVATIONS[self.act](self.fc1(x)))


class CLIPLayer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.self_attn = CLIPAttention(cfg.width, cfg.heads)
        self.layer_norm2 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.mlp = CLIPMLP(cfg.width, cfg.mlp_dim, cfg.act)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))    # [B, L, D]
        return x + self.mlp(self.layer_norm2(x))       # [B, L, D]


class CLIPEmbeddings(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.position_embedding = nn.Embedding(cfg.max_positions, cfg.width)

    def forward(self, ids):
        return self.token_embedding(ids) + self.position_embedding.weight[:ids.shape[1]]  # [B, L, D]


class CLIPEncoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.layers = nn.ModuleList(CLIPLayer(cfg) for _ in range(cfg.layers))


class CLIPTransformer(nn.Module):
    """The `text_model.` part of a checkpoint."""
    def __init__(self, cfg):
        super().__init__()
        self.embeddings = CLIPEmbeddings(cfg)
        self.encoder = CLIPEncoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.width, eps=cfg.eps)


class CLIPTextEncoder(nn.Module):
    """CLIP's text tower. forward(ids, eos_id) -> (penultimate hidden states [B, L, D] without
    the final norm, pooled [B, D] = final-norm output at the first eos_id, projected pooled
    [B, P] or None when the file has no text_projection)."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.text_model = CLIPTransformer(config)
        if config.projection_dim:
            self.text_projection = nn.Linear(config.width, config.projection_dim, bias=False)

    def forward(self, ids, eos_id=49407):
        tm = self.text_model
        x = tm.embeddings(ids)                                       # [B, L, D]
        for layer in tm.encoder.layers[:-1]:
            x = layer(x)
        penultimate = x                                              # [B, L, D]
        x = tm.final_layer_norm(tm.encoder.layers[-1](x))            # [B, L, D]
        first_eos = (ids == eos_id).int().argmax(dim=1)              # [B] (0 if there is none)
        pooled = x[torch.arange(len(ids), device=ids.device), first_eos]  # [B, D]
        projected = self.text_projection(pooled) if self.config.projection_dim else None  # [B, P]
        return penultimate, pooled, projected


# ----------------------------------------------------------------------------------------------
# T5 v1.1 encoder (pre-norm RMS, relative position bias from block 0 shared by all, no 1/sqrt(d))


class T5LayerNorm(nn.Module):
    """RMS norm: no mean, no bias; the mean square is taken in float32."""
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        ms = x.float().pow(2).mean(-1, keepdim=True)                 # [B, L, 1]
        return self.weight * (x * torch.rsqrt(ms + self.eps)).to(self.weight.dtype)


def relative_position_bucket(rel, num_buckets=32, max_distance=128):
    """T5's bidirectional bucket of each relative position rel = key - query (any int tensor):
    half the buckets per direction; within a half, distances below a quarter of the buckets each
    get their own, larger ones share logarithmically wider buckets up to max_distance."""
    half = num_buckets // 2
    exact = half // 2
    dist = rel.abs()
    log_bucket = exact + (torch.log(dist.clamp(min=1).float() / exact)
                          / math.log(max_distance / exact) * (half - exact)).long()
    log_bucket = log_bucket.clamp(max=half - 1)
    return (rel > 0).long() * half + torch.where(dist < exact, dist, log_bucket)


class T5Attention(nn.Module):
    def __init__(self, cfg, has_bias):
        super().__init__()
        self.heads = cfg.heads
        inner = cfg.heads * cfg.d_kv
        self.q, self.k, self.v = (nn.Linear(cfg.d_model, inner, bias=False) for _ in range(3))
        self.o = nn.Linear(inner, cfg.d_model, bias=False)
        if has_bias:
            self.relative_attention_bias = nn.Embedding(cfg.num_buckets, cfg.heads)

    def forward(self, x, bias):
        B, L, _ = x.shape
        q, k, v = (p(x).view(B, L, self.heads, -1).transpose(1, 2)
                   for p in (self.q, self.k, self.v))                          # [B, H, L, dk]
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype),
                                           scale=1.0)                         # [B, H, L, dk]
        return self.o(a.transpose(1, 2).reshape(B, L, -1))                    # [B, L, D]


class T5LayerSelfAttention(nn.Module):
    def __init__(self, cfg, has_bias):
        super().__init__()
        self.SelfAttention = T5Attention(cfg, has_bias)
        self.layer_norm = T5LayerNorm(cfg.d_model, cfg.eps)


class T5DenseGatedGelu(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.wi_0 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wi_1 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wo = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x):
        return self.wo(F.gelu(self.wi_0(x), approximate="tanh") * self.wi_1(x))  # [B, L, D]


class T5LayerFF(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.DenseReluDense = T5DenseGatedGelu(cfg)
        self.layer_norm = T5LayerNorm(cfg.d_model, cfg.eps)


def _fp16_safe(x):
    """In fp16, T5-XXL's residual stream can overflow: keep it finite (as transformers does)."""
    if x.dtype != torch.float16:
        return x
    limit = torch.finfo(torch.float16).max - 1000
    return x.clamp(-limit, limit)


class T5Block(nn.Module):
    def __init__(self, cfg, index):
        super().__init__()
        self.layer = nn.ModuleList([T5LayerSelfAttention(cfg, has_bias=index == 0), T5LayerFF(cfg)])

    def forward(self, x, bias):
        attn, ff = self.layer
        x = _fp16_safe(x + attn.SelfAttention(attn.layer_norm(x), bias))   # [B, L, D]
        return _fp16_safe(x + ff.DenseReluDense(ff.layer_norm(x)))           # [B, L, D]


class T5Stack(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.block = nn.ModuleList(T5Block(cfg, i) for i in range(cfg.layers))
        self.final_layer_norm = T5LayerNorm(cfg.d_model, cfg.eps)


class T5Encoder(nn.Module):
    """The T5 v1.1 encoder. `shared` and `encoder.embed_tokens` are one module (tied), so the
    state dict has both keys, as the checkpoints do. forward(ids) -> [B, L, D], final-normed.
    Like the reference, no padding mask: every token attends to the padding too."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.shared = nn.Embedding(config.vocab_size, config.d_model)
        self.encoder = T5Stack(config)
        self.encoder.embed_tokens = self.shared

    def position_bias(self, L, device):
        """[1, H, L, L] additive attention bias, computed once from block 0's table."""
        pos = torch.arange(L, device=device)
        buckets = relative_position_bucket(pos[None, :] - pos[:, None], self.config.num_buckets,
                                           self.config.max_distance)          # [L, L] (query, key)
        table = self.encoder.block[0].layer[0].SelfAttention.relative_attention_bias
        return table(buckets).permute(2, 0, 1)[None]                          # [1, H, L, L]

    def forward(self, ids):
        x = self.encoder.embed_tokens(ids)                                    # [B, L, D]
        bias = self.position_bias(ids.shape[1], ids.device)                   # [1, H, L, L]
        for block in self.encoder.block:
            x = block(x, bias)                                                # [B, L, D]
        return self.encoder.final_layer_norm(x)                               # [B, L, D]


# ----------------------------------------------------------------------------------------------
# loading encoders from checkpoints

IGNORED_KEYS = ("text_model.embeddings.position_ids", "logit_scale")  # in some files, never used


def clean_component(state, name):
    """One encoder's tensors (prefix stripped) -> the names this project's modules use: drop
    unused buffers, accept CLIP files without `text_model.` (newer transformers) and T5 files with
    only one of the two tied embedding keys (or a decoder, which SD3 does not use)."""
    state = {k: v for k, v in state.items() if k not in IGNORED_KEYS}
    if name.startswith("clip") and any(k.startswith(("embeddings.", "encoder.layers.")) for k in state):
        state = {(k if k == "text_projection.weight" else "text_model." + k): v
                 for k, v in state.items()}
    if name == "t5xxl":
        state = {k: v for k, v in state.items() if not k.startswith(("decoder.", "lm_head."))}
        embedding = state.get("encoder.embed_tokens.weight", state.get("shared.weight"))
        if embedding is not None:
            state["shared.weight"] = state["encoder.embed_tokens.weight"] = embedding
    return state


# config fields the tensor shapes do not tell: taken from a file's metadata or the caller
NOT_IN_SHAPES = {"clip_l": ("heads", "act", "eps"), "clip_g": ("heads", "act", "eps"),
                 "t5xxl": ("max_distance", "eps")}


def load_encoder(state, name, source, overrides=None):
    """Build encoder `name` (clip_l, clip_g, t5xxl) on the meta device and load `state` into it
    strictly; the tensors are taken as they are (memory-mapped, file dtype). `overrides` may
    set the fields in NOT_IN_SHAPES (the others come from the shapes)."""
    state = clean_component(state, name)
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    where = f"{source} ({name})"
    overrides = {k: v for k, v in (overrides or {}).items() if k in NOT_IN_SHAPES[name]}
    if name == "clip_g" and state and "text_projection.weight" not in state:
        raise weights.WeightsError(f"{where}: CLIP-G needs its text_projection.weight (SD3 uses "
                                   "the projected pooled output); the file has none")
    if name == "t5xxl":
        config = T5Config.from_state_dict(shapes, where, **overrides)
        cls, what = T5Encoder, f"a T5 v1.1 encoder ({config.layers} blocks, d_model {config.d_model})"
    else:
        overrides.setdefault("act", "quick_gelu" if name == "clip_l" else "gelu")
        config = CLIPConfig.from_state_dict(shapes, where, **overrides)
        cls, what = CLIPTextEncoder, f"a CLIP text model ({config.layers} layers, width {config.width})"
    with torch.device("meta"):
        model = cls(config)
    weights.load_strict(model, state, where, what)  # the tied embedding is one module: one tensor
    return model.eval().requires_grad_(False)


# transformers' config.json fields -> this project's config fields, per encoder kind
_CLIP_JSON = {"vocab_size": "vocab_size", "hidden_size": "width", "intermediate_size": "mlp_dim",
              "num_hidden_layers": "layers", "num_attention_heads": "heads",
              "max_position_embeddings": "max_positions", "hidden_act": "act", "layer_norm_eps": "eps"}
_T5_JSON = {"vocab_size": "vocab_size", "d_model": "d_model", "d_kv": "d_kv", "d_ff": "d_ff",
            "num_layers": "layers", "num_heads": "heads", "relative_attention_num_buckets": "num_buckets",
            "relative_attention_max_distance": "max_distance", "layer_norm_epsilon": "eps"}


def _config_json(source, name):
    """A diffusers text_encoder*/config.json (transformers' format) for encoder `name` ->
    ({field: value} in this project's names, the file), or ({}, None) when there is none."""
    config, file = weights.diffusers_config(source, DIFFUSERS_FOLDERS[name],
                                            ("hidden_size", "d_model", "model_type"))
    if file is None:
        return {}, None
    table = _T5_JSON if name == "t5xxl" else _CLIP_JSON
    if name == "t5xxl" and config.get("feed_forward_proj", "gated-gelu") != "gated-gelu":
        raise weights.WeightsError(f"{file}: feed_forward_proj is {config['feed_forward_proj']!r}; "
                                   "SD3 uses T5 v1.1 (gated-gelu): pass SD3's text_encoder_3")
    return {ours: config[theirs] for theirs, ours in table.items() if theirs in config}, file


def _check_config_json(model, fields, file, name):
    """config.json's fields that the shapes also tell must agree with the loaded weights."""
    theirs = {ours: json_name for json_name, ours in (_T5_JSON if name == "t5xxl" else _CLIP_JSON).items()}
    weights.check_config(file, [(theirs[f], v, getattr(model.config, f)) for f, v in fields.items()
                                if f not in NOT_IN_SHAPES[name]], f"{name} text encoder")


def _read(path, name, bare=False):
    """The tensors of component `name` (prefix stripped) in an SD3 single file, a diffusers
    folder (its text_encoder*/ subfolder) or a component folder itself; {} when it has none.
    bare=True: a file of this one encoder without the SD3 prefix is accepted too."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        state = weights.load_file(path)
        return weights.sd3_component(state, name) if bare else weights.strip_prefix(
            state, weights.SD3_PREFIXES[name])
    here = [os.path.join(path, f"model.safetensors{x}") for x in ("", ".index.json")]
    if os.path.isdir(os.path.join(path, DIFFUSERS_FOLDERS[name])) or any(map(os.path.isfile, here)):
        return weights.load_diffusers(path, DIFFUSERS_FOLDERS[name], "model")
    return {}


class MissingT5Error(weights.WeightsError):
    """A diffusers folder without text_encoder_3/ (T5-XXL), T5 asked for."""


def _is_diffusers(path):
    path = os.fspath(path)
    return os.path.isdir(path) and any(os.path.isdir(os.path.join(path, sub))
                                       for sub in ("transformer", "text_encoder", "vae"))


def has_text_encoders(path):
    """Whether an SD3 single file or diffusers folder holds (at least CLIP-L's) text encoder."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return os.path.isdir(os.path.join(path, DIFFUSERS_FOLDERS["clip_l"]))
    return any(k.startswith(weights.SD3_PREFIXES["clip_l"]) for k in weights.read_header(path)[0])


def _file_hints(path):
    """What an SD3 file's metadata says about its encoders: ({name: config fields the shapes do
    not tell} from 'text_encoders', {t5_vocab, clip_vocab: paths} from 'text_encoder', resolved
    against the file's folder). ({}, {}) for a folder or None."""
    if path is None or not os.path.isfile(path):
        return {}, {}
    header = weights.read_header(path)[1]
    try:
        configs = json.loads(header.get("text_encoders", "{}"))
        spec = json.loads(header.get("text_encoder", "{}"))
    except ValueError:
        raise ValueError(f"{path}: its 'text_encoders' / 'text_encoder' metadata is not JSON") from None
    here = os.path.dirname(os.path.abspath(path))
    vocabs = {k: os.path.join(here, v) for k, v in (spec if isinstance(spec, dict) else {}).items()
              if k in ("t5_vocab", "clip_vocab") and isinstance(v, str)}
    return (configs if isinstance(configs, dict) else {}), vocabs


def _find_t5_vocab(places):
    """The first spiece.model / tokenizer.json in `places` (folders), or None."""
    for folder in places:
        for sub in ("", "tokenizer_3"):
            for name in ("spiece.model", "tokenizer.json"):
                candidate = os.path.join(folder, sub, name)
                if os.path.isfile(candidate):
                    return candidate
    return None


# ----------------------------------------------------------------------------------------------
# SD3's conditioning


def auto_dtype(name, device):
    """Per encoder on CUDA: fp16 for the CLIPs, bf16 for T5 (fp16 overflows in T5-XXL);
    fp32 on the CPU and MPS."""
    if torch.device(device).type != "cuda":
        return torch.float32
    return torch.bfloat16 if name == "t5xxl" else torch.float16


@contextmanager
def placed(module, device, dtype, keep):
    """Run `module` on device/dtype. keep=False (offload): the weights are copied there for the
    duration and the originals (e.g. memory-mapped on the CPU) put back after, so the device
    holds them only while encoding; keep=True: converted once and left there."""
    params = list(module.parameters())
    device = torch.device(device)
    if all(p.device == device and p.dtype == dtype for p in params):
        yield module
        return
    saved = [p.data for p in params]
    for p in params:
        p.data = p.data.to(device=device, dtype=dtype)
    try:
        yield module
    finally:
        if not keep:
            for p, data in zip(params, saved):
                p.data = data


class SD3TextEncoder:
    """CLIP-L + CLIP-G (+ T5-XXL) as SD3 uses them. encode(prompts) -> (context [B, 154, Dc],
    pooled [B, Dl + Pg]) float32 on the CPU (module docstring: the assembly). T5 is optional:
    without it the T5 rows are zeros.

    Placement: each encoder runs on self.devices[name] in self.dtypes[name] (None: auto_dtype).
    With offload=True (default) the weights stay where they were loaded (memory-mapped on the
    CPU) and an encoder is copied to its device only while it encodes, one at a time, so a
    24 GB GPU holds SD3-Medium plus at most T5-XXL's 9.5 GB; offload=False (and any encoder on
    the CPU) converts and moves the weights once, on first use."""

    def __init__(self, clip_l, clip_g, t5=None, clip_tokenizer=None, t5_vocab=None,
                 context_dim=None, t5_length=77, offload=True, source="SD3 text encoders"):
        self.encoders = {"clip_l": clip_l, "clip_g": clip_g, "t5xxl": t5}
        self.clip_tokenizer = clip_tokenizer or CLIPTokenizer.from_files()
        self.t5_vocab, self._t5_tokenizer = t5_vocab, None
        self.t5_length, self.offload, self.source = t5_length, offload, source
        lg = clip_l.config.width + clip_g.config.width
        self.context_dim = context_dim or (t5.config.d_model if t5 is not None else 4096)
        self.pooled_dim = clip_l.config.width + clip_g.config.projection_dim
        if lg > self.context_dim:
            raise ValueError(f"{source}: CLIP-L + CLIP-G widths {lg} exceed the context width "
                             f"{self.context_dim}")
        if t5 is not None and t5.config.d_model != self.context_dim:
            raise ValueError(f"{source}: T5's width {t5.config.d_model} is not the context width "
                             f"{self.context_dim}")
        if t5_length < 2:
            raise ValueError(f"t5_length must be >= 2 (tokens and </s>), got {t5_length}")
        self.devices = {n: torch.device("cpu") for n in COMPONENTS}
        self.dtypes = {n: None for n in COMPONENTS}

    # -- loading

    @classmethod
    def from_pretrained(cls, ckpt=None, clip_l=None, clip_g=None, t5=None, t5_vocab=None,
                        clip_vocab=None, use_t5=True, context_dim=None, t5_length=77,
                        offload=True, configs=None):
        """Encoders from an SD3 single file (`text_encoders.*`), a diffusers folder
        (text_encoder*/, tokenizer*/), and/or separate files per encoder (clip_l, clip_g, t5:
        bare or prefixed keys, e.g. the SD3 release's text_encoders/*.safetensors). The T5
        vocabulary, when not given: the one the file's 'text_encoder' metadata names (t5_vocab,
        relative to the file), the folder's tokenizer_3/, or spiece.model / tokenizer.json beside
        the checkpoint or T5 file; it is read on the first encode.
        `configs` {name: {field: value}} overrides inferred config fields (e.g. heads); files
        saved by save_pretrained carry them in their 'text_encoders' metadata."""
        given = {"clip_l": clip_l, "clip_g": clip_g, "t5xxl": t5 if use_t5 else None}
        hints, vocabs = _file_hints(ckpt)
        hints.update(configs or {})
        t5_vocab, clip_vocab = t5_vocab or vocabs.get("t5_vocab"), clip_vocab or vocabs.get("clip_vocab")
        models = {}
        for name in COMPONENTS:
            source = given[name] if given[name] is not None else ckpt
            if (name == "t5xxl" and not use_t5) or source is None:
                continue
            state = _read(source, name, bare=given[name] is not None)
            if state:
                fields, file = _config_json(source, name)  # a diffusers folder's config.json
                overrides = {**(hints.get(name) or {}), **fields}
                models[name] = load_encoder(state, name, source, overrides)
                if file:
                    _check_config_json(models[name], fields, file, name)
            elif name == "t5xxl" and given[name] is None and _is_diffusers(source):
                raise MissingT5Error(
                    f"{source}: this diffusers folder has no {DIFFUSERS_FOLDERS[name]}/ (T5-XXL); to "
                    "run without T5 pass --no-t5 to text_encoders.py or sample.py (its 77 context "
                    "rows become zeros; train_ladd.py: --cond with conditioning made so), or put "
                    f"the release's {DIFFUSERS_FOLDERS[name]}/ back")
        proj = getattr(models.get("clip_l"), "text_projection", None)
        if proj is not None and not torch.equal(proj.weight.float(), torch.eye(*proj.weight.shape)):
            print(f"note: {ckpt or clip_l}: CLIP-L has a text_projection that is not the identity; "
                  "SD3 uses CLIP-L's pooled output unprojected (the reference, and diffusers for "
                  "single files), as this project does, while diffusers' pipeline would project it "
                  "with this folder", file=sys.stderr)
        for name, flag in (("clip_l", "--clip-l"), ("clip_g", "--clip-g")):
            if name not in models:
                raise weights.WeightsError(
                    f"{given[name] or ckpt or 'no checkpoint'}: no {name} text encoder "
                    f"({weights.SD3_PREFIXES[name]}* tensors); pass an SD3 file that includes them "
                    f"(sd3_medium_incl_clips*.safetensors), a diffusers folder, or {flag} FILE "
                    f"(the SD3 release's text_encoders/{name}.safetensors)")
        if context_dim is None and not use_t5:  # T5 left out: keep its width, the MMDiT's context
            t5_file = t5 if t5 is not None else ckpt
            state = {} if t5_file is None else clean_component(
                _read(t5_file, "t5xxl", bare=t5 is not None), "t5xxl")
            context_dim = state["shared.weight"].shape[1] if "shared.weight" in state else None
        diffusers = ckpt if ckpt is not None and os.path.isdir(ckpt) else None
        if clip_vocab is None and diffusers and os.path.isdir(os.path.join(diffusers, "tokenizer")):
            clip_vocab = os.path.join(diffusers, "tokenizer")
        if t5_vocab is None and "t5xxl" in models:
            places = [os.fspath(p) if os.path.isdir(p) else os.path.dirname(os.path.abspath(p))
                      for p in (ckpt, given["t5xxl"]) if p is not None]
            t5_vocab = _find_t5_vocab(places)
        return cls(models["clip_l"], models["clip_g"], models.get("t5xxl"),
                   CLIPTokenizer.from_files(clip_vocab), t5_vocab, context_dim, t5_length,
                   offload, source=os.fspath(ckpt or clip_l))

    def state_dict(self):
        """All encoders' tensors under their SD3 single-file names."""
        return {weights.SD3_PREFIXES[n] + k: v for n, m in self.encoders.items() if m is not None
                for k, v in m.state_dict().items()}

    def metadata(self):
        """{'text_encoders': JSON of the configs}, so a file keeps non-inferable fields (heads)."""
        return {"text_encoders": json.dumps({n: asdict(m.config)
                                             for n, m in self.encoders.items() if m is not None})}

    def save_pretrained(self, path, metadata=None):
        weights.save_file(self.state_dict(), path, {**self.metadata(), **(metadata or {})})

    # -- placement

    def to(self, device=None, dtype=None, **per_encoder):
        """Device (and dtype) for every encoder; per_encoder: name=(device, dtype) for one of
        them, e.g. t5xxl=("cpu", torch.bfloat16). Nothing moves until an encoder is first used
        (so a pipeline that never encodes never converts T5-XXL)."""
        for name in COMPONENTS:
            dev, dt = per_encoder.get(name, (device, dtype))
            if dev is not None:
                self.devices[name] = torch.device(dev)
            if dt is not None:
                self.dtypes[name] = dt
        return self

    def _dtype(self, name):
        return self.dtypes[name] or auto_dtype(name, self.devices[name])

    def _keep(self, name):
        return not self.offload or self.devices[name].type == "cpu"

    # -- encoding

    @property
    def t5_tokenizer(self):
        if self._t5_tokenizer is None:
            if self.t5_vocab is None:
                raise FileNotFoundError(f"{self.source}: has T5-XXL weights but no T5 vocabulary "
                                        f"was found; {T5_HELP}")
            self._t5_tokenizer = T5Tokenizer.from_files(self.t5_vocab)
        return self._t5_tokenizer

    def _run(self, name, ids, batch_size):
        """ids [B, L] through encoder `name` in batches -> its outputs, float32 on the CPU."""
        model, device = self.encoders[name], self.devices[name]
        if torch.is_tensor(ids) and int(ids.max()) >= (model.config.vocab_size):
            raise ValueError(f"{self.source}: {name} has {model.config.vocab_size} token rows but "
                             f"the tokenizer gave id {int(ids.max())}; wrong vocabulary file?")
        outs = []
        with placed(model, device, self._dtype(name), keep=self._keep(name)):
            for i in range(0, len(ids), batch_size):
                out = model(ids[i:i + batch_size].to(device), **(
                    {"eos_id": self.clip_tokenizer.end_id} if name != "t5xxl" else {}))
                outs.append([o.float().cpu() if o is not None else None
                             for o in (out if isinstance(out, tuple) else (out,))])
        return [torch.cat(col) if col[0] is not None else None for col in zip(*outs)]

    @torch.no_grad()
    def encode(self, prompts, batch_size=16):
        """list of prompts -> (context [B, 77 + t5_length, Dc], pooled [B, Dp]), float32, CPU."""
        if isinstance(prompts, str):
            raise ValueError(f"encode takes a list of prompts, got the string {prompts!r}; pass [prompt]")
        prompts = list(prompts)
        if not all(isinstance(p, str) for p in prompts):
            raise ValueError("encode: every prompt must be a string")
        B, Dc = len(prompts), self.context_dim
        t5_ids = self.t5_tokenizer(prompts, self.t5_length) if self.encoders["t5xxl"] is not None else None
        tok = self.clip_tokenizer
        hidden_l, pooled_l, _ = self._run("clip_l", tok(prompts, tok.end_id), batch_size)  # [B, 77, Dl], [B, Dl]
        hidden_g, _, pooled_g = self._run("clip_g", tok(prompts, 0), batch_size)           # [B, 77, Dg], [B, Pg]
        lg = torch.cat([hidden_l, hidden_g], dim=-1)                                       # [B, 77, Dl + Dg]
        lg = F.pad(lg, (0, Dc - lg.shape[-1]))                                             # [B, 77, Dc]
        if t5_ids is not None:
            t5 = self._run("t5xxl", t5_ids, batch_size)[0]                                 # [B, T, Dc]
        else:
            t5 = torch.zeros(B, self.t5_length, Dc)                                        # [B, T, Dc]
        context = torch.cat([lg, t5], dim=1)                                               # [B, 77 + T, Dc]
        pooled = torch.cat([pooled_l, pooled_g], dim=-1)                                   # [B, Dl + Pg]
        return context, pooled

    def __call__(self, prompts):
        return self.encode(prompts)


def for_checkpoint(path, spec=None, context_dim=None):
    """The SD3TextEncoder that goes with an MMDiT checkpoint (pipeline.py), or None when it has
    none: the file's own text_encoders.* tensors or diffusers text_encoder*/ folders, or a file
    named in its 'text_encoder' metadata ({"name": "sd3", "file": ..., "t5_vocab": ...,
    "clip_vocab": ..., "t5": false}; paths relative to the checkpoint's folder)."""
    spec = spec if isinstance(spec, dict) else {}
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    relative = spec.get("relative") if isinstance(spec.get("relative"), dict) else {}

    def find(key):  # the path as written (absolute, or relative to the checkpoint), else "relative"'s
        if not spec.get(key):
            return None
        places = [os.path.join(folder, spec[key])]
        if isinstance(relative.get(key), str):
            places.append(os.path.normpath(os.path.join(folder, relative[key])))
        return next((p for p in places if os.path.exists(p)), places)

    source = find("file") or path
    if isinstance(source, list):
        tried = " or ".join(dict.fromkeys(source))
        raise FileNotFoundError(
            f"{path}: its text encoders should be at {tried} (metadata text_encoder.file) but that "
            "file does not exist (a run folder moved to another machine?); pass --text-encoders "
            "PATH (the SD3 file or diffusers folder holding CLIP-L, CLIP-G and T5), or --cond "
            "with precomputed conditioning")
    vocab = {}
    for key in ("t5_vocab", "clip_vocab"):
        found = find(key)
        vocab[key] = found[0] if isinstance(found, list) else found  # missing: its own error later
    if not has_text_encoders(source):
        return None
    return SD3TextEncoder.from_pretrained(source, t5_vocab=vocab["t5_vocab"],
                                          clip_vocab=vocab["clip_vocab"],
                                          use_t5=spec.get("t5", True), context_dim=context_dim)


# ----------------------------------------------------------------------------------------------
# precomputed conditioning shards (the format sample.py --cond reads)


def save_shard(path, context, pooled, uncond_context, uncond_pooled, prompts, metadata=None,
               dtype=torch.float16):
    """One shard: context [N, L, Dc], pooled [N, Dp], uncond_context [1, L, Dc], uncond_pooled
    [1, Dp] in `dtype`, the prompts (JSON list) and any extra metadata in the header."""
    tensors = {"context": context, "pooled": pooled, "uncond_context": uncond_context,
               "uncond_pooled": uncond_pooled}
    meta = {"kind": "sd3_conditioning", "prompts": json.dumps(list(prompts)), **(metadata or {})}
    weights.save_file({k: v.to(dtype).contiguous() for k, v in tensors.items()}, path, meta)


def read_shards(path):
    """A shard file or a folder of them -> (prompts, {name: tensor}), concatenated in order."""
    files = ([os.path.join(path, f) for f in sorted(os.listdir(path))
              if f.startswith("cond-") and f.endswith(".safetensors")]
             if os.path.isdir(path) else [path])
    if not files:
        raise FileNotFoundError(f"{path}: no cond-*.safetensors shards")
    prompts, parts = [], []
    for f in files:
        meta = weights.load_metadata(f)
        if meta.get("kind") != "sd3_conditioning":
            raise ValueError(f"{f}: not a conditioning shard written by text_encoders.py")
        prompts += json.loads(meta["prompts"])
        parts.append(weights.load_file(f))
    tensors = {"context": torch.cat([p["context"] for p in parts]),
               "pooled": torch.cat([p["pooled"] for p in parts]),
               "uncond_context": parts[0]["uncond_context"], "uncond_pooled": parts[0]["uncond_pooled"]}
    return prompts, tensors


# ----------------------------------------------------------------------------------------------
# command line: precompute conditioning shards


@dataclass
class PrecomputeConfig:
    ckpt: str = None             # SD3 file with text_encoders.* (incl_clips...) or a diffusers folder
    prompts: list = field(default_factory=list)  # a prompt (repeat for more) or a .txt, one a line
    out: str = "cond"            # folder for cond-00000.safetensors ... and config.json
    clip_l: str = None           # a separate CLIP-L file (the release's text_encoders/clip_l.safetensors)
    clip_g: str = None           # a separate CLIP-G file (text_encoders/clip_g.safetensors)
    t5: str = None               # a separate T5-XXL file (text_encoders/t5xxl_fp16.safetensors)
    t5_vocab: str = None         # T5's spiece.model or tokenizer.json (diffusers folder: tokenizer_3/)
    clip_vocab: str = None       # folder with CLIP's vocab.json + merges.txt; default: assets/
    no_t5: bool = False          # leave T5 out: its 77 context rows are zeros
    t5_length: int = 77          # T5 tokens per prompt (the reference: 77; diffusers: 256)
    shard_size: int = 256        # prompts per shard file (fp16: 1.3 MB per prompt at 154 x 4096)
    batch_size: int = 16         # prompts per encoder pass
    save_dtype: str = "fp16"     # dtype of the saved tensors: fp16 | bf16 | fp32
    device: str = "auto"         # auto (cuda, then mps, then cpu) | cpu | cuda | cuda:N | mps
    dtype: str = "auto"          # auto (CUDA: fp16 CLIPs, bf16 T5; else fp32) | fp32 | bf16 | fp16
    t5_device: str = None        # run T5 elsewhere (e.g. cpu for a small GPU); None: --device
    offload: bool = False        # copy each encoder to the device only while it encodes a shard
    quiet: bool = False          # no progress messages


def parse_args(argv=None):
    return cli.parse_config(PrecomputeConfig, argv, "text_encoders.py", __doc__,
                            {"save_dtype": tuple(cli.DTYPES), "dtype": ("auto", *cli.DTYPES)})


def run(c):
    """Encode the prompts shard by shard into c.out; an existing shard with the same prompts
    and settings is kept (resume). Returns the shard paths."""
    prompts = cli.read_prompts(c.prompts, "--prompts")
    if not prompts:
        raise ValueError('no prompts: pass --prompts FILE.txt (one a line) or --prompts "a photo of a cat"')
    if not (c.ckpt or c.clip_l):
        raise ValueError("pass --ckpt (an SD3 file with text encoders, or a diffusers folder) or "
                         "--clip-l/--clip-g/--t5 files")
    if c.shard_size < 1 or c.batch_size < 1:
        raise ValueError("--shard-size and --batch-size must be >= 1")
    if os.path.exists(c.out) and not os.path.isdir(c.out):
        raise ValueError(f"--out {c.out} is a file; pass a folder")
    device = cli.pick_device(c.device)
    dtype = None if c.dtype == "auto" else cli.pick_dtype(c.dtype, device)
    enc = SD3TextEncoder.from_pretrained(c.ckpt, c.clip_l, c.clip_g, c.t5, c.t5_vocab, c.clip_vocab,
                                         use_t5=not c.no_t5, t5_length=c.t5_length, offload=c.offload)
    if enc.encoders["t5xxl"] is not None:
        enc.t5_tokenizer  # a missing vocabulary is an error now, not after the CLIPs ran
    t5_device = cli.pick_device(c.t5_device) if c.t5_device else device
    enc.to(device, dtype, t5xxl=(t5_device, dtype))
    settings = {"ckpt": c.ckpt, "clip_l": c.clip_l, "clip_g": c.clip_g, "t5": c.t5,
                "t5_used": enc.encoders["t5xxl"] is not None, "t5_length": c.t5_length,
                "save_dtype": c.save_dtype}
    meta = {"settings": json.dumps(settings, sort_keys=True)}
    uncond = None
    paths, t0 = [], time.time()
    for k, first in enumerate(range(0, len(prompts), c.shard_size)):
        chunk = prompts[first:first + c.shard_size]
        path = os.path.join(c.out, f"cond-{k:05d}.safetensors")
        paths.append(path)
        if _shard_done(path, chunk, meta["settings"]):
            continue
        context, pooled = enc.encode(chunk + ([""] if uncond is None else []), c.batch_size)
        if uncond is None:
            uncond, context, pooled = (context[-1:], pooled[-1:]), context[:-1], pooled[:-1]
        save_shard(path, context, pooled, *uncond, chunk, {**meta, "first": str(first)},
                   cli.DTYPES[c.save_dtype])
        if not c.quiet:
            done = min(first + c.shard_size, len(prompts))
            print(f"{path}: prompts {first}..{done - 1} of {len(prompts)} "
                  f"({time.time() - t0:.1f} s)", flush=True)
    resolved = {**asdict(c), **settings, "prompts": len(prompts), "shards": len(paths),
                "context": [77 + c.t5_length, enc.context_dim], "pooled": enc.pooled_dim}
    weights.atomic_write(os.path.join(c.out, "config.json"),
                         lambda f: f.write(json.dumps(resolved, indent=2).encode()))
    return paths


def _shard_done(path, prompts, settings):
    if not os.path.isfile(path):
        return False
    try:
        meta = weights.load_metadata(path)
    except (ValueError, OSError):
        return False
    return meta.get("prompts") == json.dumps(prompts) and meta.get("settings") == settings


def main(argv=None):
    cli.run_cli(parse_args, run, argv)


if __name__ == "__main__":
    main()
