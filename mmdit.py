"""
The MMDiT of Stable Diffusion 3 / 3.5 ("Multimodal Diffusion Transformer"), from scratch.

Text tokens and image tokens live in two streams with separate weights; in every joint block both
streams are modulated by the conditioning vector c (timestep + pooled text), projected to q, k, v,
concatenated along the sequence (text first) and attend to each other in one attention; each
stream then gets its own output projection and MLP. SD3.5 adds RMS qk-norm, and SD3.5-Medium
("MMDiT-X") a second, image-only self-attention in its first 13 blocks.

Module attribute names equal the SD3 checkpoint keys (without `model.diffusion_model.`), so a
real checkpoint loads with a strict load_state_dict and `save_pretrained` writes the same names
back. The same code at a tiny size is the teacher of the built-in shapes world.

Conventions: x [B, C, H, W] latents; t [B] in [0, 1] (1 = pure noise; the timestep embedder sees
1000·t, as SD3 does); context [B, L, Dc]; pooled y [B, Dp]; the output is the velocity
v = noise - x0, same shape as x.
"""

import dataclasses
import json
import math
import os
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import weights


@dataclass
class MMDiTConfig:
    depth: int = 24                 # joint blocks
    hidden_size: int = 1536         # D; SD3 uses 64 * depth
    num_heads: int = 24             # SD3 uses depth heads of 64 dims
    patch_size: int = 2             # latent pixels per token side
    in_channels: int = 16           # latent channels in
    out_channels: int = 16          # velocity channels out
    pos_embed_max_size: int = 192   # M: a stored M x M grid of positions, cropped per image
    pooled_dim: int = 2048          # pooled text vector y (SD3: CLIP-L 768 + CLIP-G 1280)
    context_dim: int = 4096         # text token width (SD3: T5-XXL 4096)
    mlp_ratio: float = 4.0          # MLP hidden = mlp_ratio * D
    qk_norm: bool = False           # RMSNorm on q and k per head (SD3.5)
    dual_attention_layers: tuple = ()  # blocks with an extra image-only attention (MMDiT-X)

    def __post_init__(self):
        self.dual_attention_layers = tuple(self.dual_attention_layers)
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads "
                             f"{self.num_heads}")
        if bad := [i for i in self.dual_attention_layers if not 0 <= i < self.depth - 1]:
            raise ValueError(f"dual_attention_layers {bad} outside blocks 0..{self.depth - 2}")

    @property
    def head_dim(self):
        return self.hidden_size // self.num_heads

    @classmethod
    def from_state_dict(cls, shapes, **overrides):
        """Infer the architecture from {key: shape} of an MMDiT state dict (prefix stripped)."""
        def shape(key):
            if key not in shapes:
                raise weights.WeightsError(
                    f"cannot infer an MMDiT config: key {key!r} is missing; the tensors look like "
                    f"{weights.describe_keys(shapes)}")
            return tuple(shapes[key])
        D, C, p, _ = shape("x_embedder.proj.weight")
        M = math.isqrt(shape("pos_embed")[1])
        depth = 1 + max(int(k.split(".")[1]) for k in shapes if k.startswith("joint_blocks."))
        qk_norm = "joint_blocks.0.x_block.attn.ln_q.weight" in shapes
        heads = D // shape("joint_blocks.0.x_block.attn.ln_q.weight")[0] if qk_norm else D // 64
        dual = sorted({int(k.split(".")[1]) for k in shapes if ".x_block.attn2." in k})
        kw = dict(depth=depth, hidden_size=D, num_heads=max(heads, 1), patch_size=p,
                  in_channels=C, out_channels=shape("final_layer.linear.weight")[0] // (p * p),
                  pos_embed_max_size=M, pooled_dim=shape("y_embedder.mlp.0.weight")[1],
                  context_dim=shape("context_embedder.weight")[1],
                  mlp_ratio=shape("joint_blocks.0.x_block.mlp.fc1.weight")[0] / D,
                  qk_norm=qk_norm, dual_attention_layers=tuple(dual))
        kw.update(overrides)
        return cls(**kw)


def sd3(depth, **kw):
    """SD3's family rule: D = 64 * depth, depth heads of 64."""
    return MMDiTConfig(depth=depth, hidden_size=64 * depth, num_heads=depth, **kw)


CONFIGS = {
    "sd3-medium": sd3(24, pos_embed_max_size=192),                     # 2.03 B params
    "sd3.5-medium": sd3(24, pos_embed_max_size=384, qk_norm=True,
                        dual_attention_layers=tuple(range(13))),        # 2.24 B
    "sd3.5-large": sd3(38, pos_embed_max_size=192, qk_norm=True),       # 8.06 B
    # the built-in shapes world: 4-channel latents of a x4 VAE, a 64-dim text encoder
    "shapes": MMDiTConfig(depth=4, hidden_size=256, num_heads=4, patch_size=2, in_channels=4,
                          out_channels=4, pos_embed_max_size=32, pooled_dim=64,
                          context_dim=64, qk_norm=True),                # 8.99 M
    "shapes-small": MMDiTConfig(depth=2, hidden_size=256, num_heads=4, patch_size=2, in_channels=4,
                                out_channels=4, pos_embed_max_size=32, pooled_dim=64,
                                context_dim=64, qk_norm=True),          # 4.25 M, a smaller student
    # tests: every architecture feature, 0.12 M parameters
    "test": MMDiTConfig(depth=3, hidden_size=32, num_heads=2, patch_size=2, in_channels=4,
                        out_channels=4, pos_embed_max_size=8, pooled_dim=12, context_dim=10,
                        qk_norm=True, dual_attention_layers=(0,)),
}


# ----------------------------------------------------------------------------------------------
# building blocks


def modulate(x, shift, scale):
    return torch.addcmul(shift.unsqueeze(1), x, 1 + scale.unsqueeze(1))  # [B, L, D]: x (1 + scale) + shift


def attention(q, k, v):
    """q, k, v [B, L, H, hd] -> [B, L, H*hd] (flash / memory-efficient kernels where available)."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                         v.transpose(1, 2))  # [B, H, L, hd]
    return out.transpose(1, 2).flatten(2)                    # [B, L, D]


def timestep_embedding(t, dim=256, max_period=10000.0):
    """Sinusoidal features of (already x1000) timesteps t [B], any dtype -> float32 [B, dim]:
    for half = dim // 2 frequencies exp(-ln(max_period) k / half), k = 0..half-1, the cosines of
    t * frequency first, then the sines (the order SD3's weights expect)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]                          # [B, half]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)     # [B, dim]


def sincos_pos_embed(dim, grid):
    """A [grid*grid, dim] 2-D sin-cos table (first half encodes the column, second the row);
    the initial value of `pos_embed` for models trained here (SD3 checkpoints bring their own)."""
    pos = torch.arange(grid, dtype=torch.float64)
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    def enc(p):                                            # [N] -> [N, dim/2]
        a = p[:, None] * omega[None]
        return torch.cat([torch.sin(a), torch.cos(a)], dim=1)
    rows, cols = torch.meshgrid(pos, pos, indexing="ij")   # row-major grid
    return torch.cat([enc(cols.flatten()), enc(rows.flatten())], dim=1).float()


class MLP(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class Embedder(nn.Module):
    """Linear -> SiLU -> Linear (the t_embedder and y_embedder; keys mlp.0 and mlp.2)."""
    def __init__(self, dim_in, dim):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim_in, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, x):
        return self.mlp(x)


class PatchEmbed(nn.Module):
    def __init__(self, patch, in_channels, dim):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, patch, stride=patch)

    def forward(self, x):
        # [B, C, H, W] -> [B, h*w, D], row-major; contiguous, or every later op inherits the
        # transposed layout and each norm and matmul copies it again
        return self.proj(x).flatten(2).transpose(1, 2).contiguous()


class Attention(nn.Module):
    """The q/k/v projection of one stream (with optional per-head RMS qk-norm) and its output
    projection; the attention itself happens in JointBlock, across streams."""
    def __init__(self, dim, heads, qk_norm, pre_only=False):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        if qk_norm:
            self.ln_q = nn.RMSNorm(dim // heads, eps=1e-6)
            self.ln_k = nn.RMSNorm(dim // heads, eps=1e-6)
        if not pre_only:
            self.proj = nn.Linear(dim, dim)

    def qkv_heads(self, x):
        B, L, _ = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.heads, -1).unbind(2)   # [B, L, H, hd] each
        if hasattr(self, "ln_q"):
            q, k = self.ln_q(q), self.ln_k(k)
        return q, k, v


class StreamBlock(nn.Module):
    """One stream's half of a joint block (SD3's `context_block` or `x_block`). Its modulation
    (adaLN_modulation(c), chunked in the order of MODULATION) shifts, scales and gates the
    attention input and output, the MLP, and for MMDiT-X the second, image-only attention; a
    pre-only block (the last block's text stream) only shifts and scales its attention input."""
    MODULATION = ("shift_msa", "scale_msa", "gate_msa", "shift_mlp", "scale_mlp", "gate_mlp",
                  "shift_msa2", "scale_msa2", "gate_msa2")  # SD3's order, 9 chunks of D

    def __init__(self, dim, heads, mlp_ratio, qk_norm, pre_only=False, dual=False):
        super().__init__()
        self.pre_only, self.dual = pre_only, dual
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, heads, qk_norm, pre_only)
        if dual:
            self.attn2 = Attention(dim, heads, qk_norm)
        if not pre_only:
            self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
            self.mlp = MLP(dim, int(dim * mlp_ratio))
        self.chunks = self.MODULATION[:2 if pre_only else 9 if dual else 6]
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, len(self.chunks) * dim))

    def pre_attention(self, h, c):
        """-> ((q, k, v) of this stream, each [B, L, H, hd]; the state post_attention needs)."""
        m = dict(zip(self.chunks, self.adaLN_modulation(c).chunk(len(self.chunks), dim=1)))  # [B, D] each
        hn = self.norm1(h)                                      # [B, L, D]
        return self.attn.qkv_heads(modulate(hn, m["shift_msa"], m["scale_msa"])), (hn, m)

    def post_attention(self, h, a, state):
        hn, m = state
        h = h + m["gate_msa"].unsqueeze(1) * self.attn.proj(a)  # [B, L, D]
        if self.dual:                                           # MMDiT-X: image-only attention
            q, k, v = self.attn2.qkv_heads(modulate(hn, m["shift_msa2"], m["scale_msa2"]))
            h = h + m["gate_msa2"].unsqueeze(1) * self.attn2.proj(attention(q, k, v))
        mlp_in = modulate(self.norm2(h), m["shift_mlp"], m["scale_mlp"])
        return h + m["gate_mlp"].unsqueeze(1) * self.mlp(mlp_in)  # [B, L, D]


class JointBlock(nn.Module):
    def __init__(self, cfg, index):
        super().__init__()
        args = (cfg.hidden_size, cfg.num_heads, cfg.mlp_ratio, cfg.qk_norm)
        self.context_block = StreamBlock(*args, pre_only=index == cfg.depth - 1)
        self.x_block = StreamBlock(*args, dual=index in cfg.dual_attention_layers)

    def forward(self, ctx, x, c):
        """text tokens ctx [B, L, D], image tokens x [B, N, D], conditioning c [B, D] -> (ctx, x)
        after the block, text first (the last block returns None for the text). One attention
        over the L + N tokens, text first; every sample on its own."""
        L = ctx.shape[1]
        (qc, kc, vc), ctx_state = self.context_block.pre_attention(ctx, c)  # [B, L, H, hd] each
        (qx, kx, vx), x_state = self.x_block.pre_attention(x, c)            # [B, N, H, hd] each
        a = attention(torch.cat([qc, qx], 1), torch.cat([kc, kx], 1),
                      torch.cat([vc, vx], 1))                               # [B, L+N, D], text first
        x = self.x_block.post_attention(x, a[:, L:], x_state)               # [B, N, D]
        if self.context_block.pre_only:  # last block: text only lends its keys and values
            return None, x
        return self.context_block.post_attention(ctx, a[:, :L], ctx_state), x


class FinalLayer(nn.Module):
    def __init__(self, dim, patch, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch * patch * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)  # shift first, then scale
        return self.linear(modulate(self.norm_final(x), shift, scale))  # [B, N, p*p*C]


# ----------------------------------------------------------------------------------------------
# the model


class MMDiT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = cfg = config
        D = cfg.hidden_size
        self.x_embedder = PatchEmbed(cfg.patch_size, cfg.in_channels, D)
        self.t_embedder = Embedder(256, D)
        self.y_embedder = Embedder(cfg.pooled_dim, D)
        self.context_embedder = nn.Linear(cfg.context_dim, D)
        self.register_buffer("pos_embed", torch.zeros(1, cfg.pos_embed_max_size ** 2, D))
        self.joint_blocks = nn.ModuleList(JointBlock(cfg, i) for i in range(cfg.depth))
        self.final_layer = FinalLayer(D, cfg.patch_size, cfg.out_channels)
        self.gradient_checkpointing = False
        if self.pos_embed.device.type != "meta":
            self.initialize_weights()

    def initialize_weights(self):
        """Initialisation for training from scratch (DiT style): Xavier linears, sin-cos
        positions, and zeroed modulation and output so every block starts as the identity."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        for emb in (self.t_embedder, self.y_embedder):
            nn.init.normal_(emb.mlp[0].weight, std=0.02)
            nn.init.normal_(emb.mlp[2].weight, std=0.02)
        for m in self.modules():
            if isinstance(m, (StreamBlock, FinalLayer)):
                nn.init.zeros_(m.adaLN_modulation[1].weight)
                nn.init.zeros_(m.adaLN_modulation[1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        with torch.no_grad():
            self.pos_embed.copy_(sincos_pos_embed(self.config.hidden_size,
                                                  self.config.pos_embed_max_size)[None])

    def token_grid(self, H, W):
        """Latent H x W -> token grid (h, w), or a clear error naming valid sizes."""
        p, M = self.config.patch_size, self.config.pos_embed_max_size
        if H % p or W % p:
            near = lambda n: sorted({max(p, n // p * p), (n + p - 1) // p * p})  # noqa: E731
            raise ValueError(f"latent size {H}x{W} is not a multiple of the patch size {p}; "
                             f"use heights {near(H)} and widths {near(W)} (in latent pixels)")
        if H // p > M or W // p > M:
            raise ValueError(f"latent size {H}x{W} is too large: the positional grid serves at "
                             f"most {M * p}x{M * p} latent pixels")
        return H // p, W // p

    def cropped_pos_embed(self, h, w):
        M = self.config.pos_embed_max_size
        top, left = (M - h) // 2, (M - w) // 2              # the centred crop of the M x M grid
        grid = self.pos_embed.view(M, M, -1)                # row-major: index = row * M + col
        return grid[top:top + h, left:left + w].reshape(1, h * w, -1)  # [1, h*w, D]

    def unpatchify(self, x, h, w):
        p, C = self.config.patch_size, self.config.out_channels
        x = x.view(x.shape[0], h, w, p, p, C)               # [B, h, w, py, px, C]
        return x.permute(0, 5, 1, 3, 2, 4).reshape(x.shape[0], C, h * p, w * p)  # [B, C, H, W]

    def embed(self, x, t, context, y):
        """-> image tokens [B, N, D] with their positions, the conditioning vector c [B, D]
        (timestep + pooled text), text tokens [B, L, D], and the token grid (h, w)."""
        h, w = self.token_grid(*x.shape[-2:])
        tok = self.x_embedder(x) + self.cropped_pos_embed(h, w).to(x.dtype)  # [B, N, D]
        c = (self.t_embedder(timestep_embedding(1000 * t).to(x.dtype))
             + self.y_embedder(y))                                          # [B, D]
        return tok, c, self.context_embedder(context), (h, w)              # ..., [B, L, D]

    def run_block(self, i, ctx, tok, c):
        """Joint block i (with gradient checkpointing when it is on and autograd records)."""
        block = self.joint_blocks[i]
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, ctx, tok, c, use_reentrant=False)
        return block(ctx, tok, c)

    def forward(self, x, t, context, y):
        """-> the velocity v [B, C, H, W]."""
        tok, c, ctx, (h, w) = self.embed(x, t, context, y)
        for i in range(self.config.depth):
            ctx, tok = self.run_block(i, ctx, tok, c)
        return self.unpatchify(self.final_layer(tok, c), h, w)

    def features(self, x, t, context, y, blocks=None):
        """The image tokens after each joint block in `blocks` (default: all), as 2-D maps
        [B, D, h, w] in ascending block order (what the discriminator heads read); stops after
        the last block needed."""
        blocks = sorted(set(range(self.config.depth) if blocks is None else blocks))
        tok, c, ctx, (h, w) = self.embed(x, t, context, y)
        maps = []
        for i in range(blocks[-1] + 1):
            ctx, tok = self.run_block(i, ctx, tok, c)
            if i in blocks:
                maps.append(tok.transpose(1, 2).reshape(len(x), -1, h, w))  # [B, D, h, w]
        return maps

    def compile_blocks(self, **options):
        """torch.compile every joint block in place: the same weights and key names, fused
        kernels after a slow first call per input shape (so once per aspect-ratio bucket)."""
        for block in self.joint_blocks:
            block.compile(**options)
        return self

    # ------------------------------------------------------------------------------------------
    # files

    @classmethod
    def from_pretrained(cls, path, device="cpu", dtype=None):
        """An SD3 / SD3.5 single file (`model.diffusion_model.` keys), a bare MMDiT file (as
        written by save_pretrained), or a diffusers folder (`transformer/` inside it)."""
        path = os.fspath(path)
        metadata, diffusers_json = {}, ({}, None)
        if os.path.isdir(path):
            state = from_diffusers(weights.load_diffusers(path, "transformer"))
            diffusers_json = weights.diffusers_config(path, "transformer", DIFFUSERS_JSON_KEYS)
        else:
            state = weights.load_file(path)
            metadata = weights.load_metadata(path)
            if any(k.startswith("transformer_blocks.") for k in state):
                state = from_diffusers(state)
                diffusers_json = weights.diffusers_config(path, "transformer", DIFFUSERS_JSON_KEYS)
            else:
                state = weights.sd3_component(state, "mmdit")
        if "x_embedder.proj.weight" not in state:
            raise weights.WeightsError(
                f"{path}: no MMDiT inside; the file looks like {weights.describe_keys(state)}. "
                "Pass an SD3 checkpoint, a diffusers folder, or a file saved by this project.")
        saved = json.loads(metadata["config"]) if "config" in metadata else {}
        heads = {"num_heads": saved["num_heads"]} if "num_heads" in saved else {}
        config = MMDiTConfig.from_state_dict({k: v.shape for k, v in state.items()}, **heads)
        if diffusers_json[1]:  # a diffusers config.json: its head count, checked against the weights
            config = config_from_diffusers_json(config, *diffusers_json)
        with torch.device("meta"):
            model = cls(config)
        weights.load_strict(model, state, path, f"an MMDiT ({config.depth} blocks)")
        model.metadata = metadata
        return model.to(device=device, dtype=dtype)

    def save_pretrained(self, path, metadata=None, state=None):
        """The original SD3 layout (bare keys) with the config (and any extra string
        metadata, e.g. sampler defaults) in the header. state: the weights to write instead of
        this model's own (e.g. gathered from the shards of a sharded copy)."""
        meta = {"kind": "mmdit", "config": json.dumps(asdict(self.config))}
        meta.update(metadata or {})
        weights.save_file(self.state_dict() if state is None else state, path, meta)


# ----------------------------------------------------------------------------------------------
# the diffusers layout


# (stream, original name) -> diffusers names inside transformer_blocks.{i}; qkv splits in three
_BLOCK_NAMES = {
    ("x_block", "attn.qkv"): ("attn.to_q", "attn.to_k", "attn.to_v"),
    ("x_block", "attn.proj"): ("attn.to_out.0",),
    ("x_block", "attn.ln_q"): ("attn.norm_q",),
    ("x_block", "attn.ln_k"): ("attn.norm_k",),
    ("x_block", "attn2.qkv"): ("attn2.to_q", "attn2.to_k", "attn2.to_v"),
    ("x_block", "attn2.proj"): ("attn2.to_out.0",),
    ("x_block", "attn2.ln_q"): ("attn2.norm_q",),
    ("x_block", "attn2.ln_k"): ("attn2.norm_k",),
    ("x_block", "adaLN_modulation.1"): ("norm1.linear",),
    ("x_block", "mlp.fc1"): ("ff.net.0.proj",),
    ("x_block", "mlp.fc2"): ("ff.net.2",),
    ("context_block", "attn.qkv"): ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    ("context_block", "attn.proj"): ("attn.to_add_out",),
    ("context_block", "attn.ln_q"): ("attn.norm_added_q",),
    ("context_block", "attn.ln_k"): ("attn.norm_added_k",),
    ("context_block", "adaLN_modulation.1"): ("norm1_context.linear",),
    ("context_block", "mlp.fc1"): ("ff_context.net.0.proj",),
    ("context_block", "mlp.fc2"): ("ff_context.net.2",),
}
_TOP_NAMES = {
    "pos_embed": "pos_embed.pos_embed",
    "x_embedder.proj": "pos_embed.proj",
    "t_embedder.mlp.0": "time_text_embed.timestep_embedder.linear_1",
    "t_embedder.mlp.2": "time_text_embed.timestep_embedder.linear_2",
    "y_embedder.mlp.0": "time_text_embed.text_embedder.linear_1",
    "y_embedder.mlp.2": "time_text_embed.text_embedder.linear_2",
    "context_embedder": "context_embedder",
    "final_layer.linear": "proj_out",
    "final_layer.adaLN_modulation.1": "norm_out.linear",
}


DIFFUSERS_JSON_KEYS = ("num_layers", "num_attention_heads", "joint_attention_dim")


def config_from_diffusers_json(inferred, config, file):
    """The MMDiTConfig of a diffusers transformer: `inferred` from the weights' shapes, with the
    head count of its config.json (`config`, read from `file`); every field of the file checked
    against what the weights imply (a WeightsError naming the field otherwise). The weights
    cannot tell the heads of a model without qk-norm: only config.json can (SD3's rule, heads of
    64, is what is inferred without one)."""
    c = inferred
    heads, head_dim = config.get("num_attention_heads"), config.get("attention_head_dim")
    qk = config.get("qk_norm", "absent")
    pairs = [("num_layers", config.get("num_layers"), c.depth),
             ("patch_size", config.get("patch_size"), c.patch_size),
             ("in_channels", config.get("in_channels"), c.in_channels),
             ("out_channels", config.get("out_channels"), c.out_channels),
             ("pos_embed_max_size", config.get("pos_embed_max_size"), c.pos_embed_max_size),
             ("joint_attention_dim", config.get("joint_attention_dim"), c.context_dim),
             ("pooled_projection_dim", config.get("pooled_projection_dim"), c.pooled_dim),
             ("caption_projection_dim", config.get("caption_projection_dim"), c.hidden_size),
             ("dual_attention_layers", config.get("dual_attention_layers"), list(c.dual_attention_layers)),
             ("qk_norm", None if qk == "absent" else qk or "null", "rms_norm" if c.qk_norm else "null")]
    if heads is not None and head_dim is not None:
        pairs.append(("num_attention_heads x attention_head_dim", heads * head_dim, c.hidden_size))
    if c.qk_norm and head_dim is not None:
        pairs.append(("attention_head_dim", head_dim, c.head_dim))
    weights.check_config(file, pairs, "transformer")
    if heads is not None:
        if not isinstance(heads, int) or heads < 1 or c.hidden_size % heads:
            raise weights.WeightsError(f"{file}: num_attention_heads {heads!r} does not divide the "
                                       f"width {c.hidden_size} of the weights; fix it or delete the file")
        c = dataclasses.replace(c, num_heads=heads)
    return c


def _swap_halves(v):
    """(shift, scale) <-> (scale, shift) for the two 2-chunk modulations; self-inverse."""
    return torch.cat(v.chunk(2, dim=0)[::-1], dim=0)


def _split_key(key):
    """'a.b.weight' -> ('a.b', 'weight'); 'pos_embed' -> ('pos_embed', '')."""
    name, _, param = key.rpartition(".")
    return (name, param) if param in ("weight", "bias") else (key, "")


def _join(name, param):
    return f"{name}.{param}" if param else name


def to_diffusers(state):
    """Original SD3 MMDiT keys -> diffusers SD3Transformer2DModel keys."""
    D = state["x_embedder.proj.weight"].shape[0]
    out = {}
    for key, v in state.items():
        name, param = _split_key(key)
        if name.startswith("joint_blocks."):
            _, i, stream, local = name.split(".", 3)
            targets = [f"transformer_blocks.{i}.{n}" for n in _BLOCK_NAMES[(stream, local)]]
        else:
            targets = [_TOP_NAMES[name]]
        if "adaLN_modulation" in name and v.shape[0] == 2 * D:
            v = _swap_halves(v)
        for target, part in zip(targets, v.chunk(len(targets), dim=0)):
            out[_join(target, param)] = part
    return out


def from_diffusers(state):
    """diffusers SD3Transformer2DModel keys -> original SD3 MMDiT keys (qkv re-concatenated,
    the two 2-chunk modulations swapped back)."""
    D = state["pos_embed.proj.weight"].shape[0]
    top = {v: k for k, v in _TOP_NAMES.items()}
    block = {n: (stream, local, j, len(names))
             for (stream, local), names in _BLOCK_NAMES.items() for j, n in enumerate(names)}
    parts = {}  # original key -> {part index: tensor}
    for key, v in state.items():
        name, param = _split_key(key)
        if name.startswith("transformer_blocks."):
            _, i, local = name.split(".", 2)
            if local not in block:
                raise weights.WeightsError(f"unknown diffusers transformer key {key!r}")
            stream, orig, j, n = block[local]
            target = f"joint_blocks.{i}.{stream}.{orig}"
        elif name in top:
            target, j, n = top[name], 0, 1
        else:
            raise weights.WeightsError(f"unknown diffusers transformer key {key!r}")
        parts.setdefault(_join(target, param), {})[j] = (v, n)
    out = {}
    for key, p in parts.items():
        n = next(iter(p.values()))[1]
        if sorted(p) != list(range(n)):
            raise weights.WeightsError(f"diffusers checkpoint: {key!r} is missing some of its "
                                       f"{n} q/k/v parts")
        v = torch.cat([p[j][0] for j in range(n)], dim=0) if n > 1 else p[0][0]
        if "adaLN_modulation" in key and v.shape[0] == 2 * D:
            v = _swap_halves(v)
        out[key] = v
    return out


def init_from(student, teacher):
    """Initialise an MMDiT from another (a LADD student from its teacher): copy every tensor whose
    shape fits, student block j from teacher block round(j (T - 1) / (S - 1)), so a shallower
    student keeps the first and the last block (as in layer dropping). -> tensors copied."""
    S, T = student.config.depth, teacher.config.depth
    source = {j: round(j * (T - 1) / max(S - 1, 1)) for j in range(S)}
    theirs, copied = teacher.state_dict(), 0
    mine = student.state_dict()
    for key in mine:
        name = key
        if key.startswith("joint_blocks."):
            _, j, rest = key.split(".", 2)
            name = f"joint_blocks.{source[int(j)]}.{rest}"
        if name in theirs and theirs[name].shape == mine[key].shape:
            mine[key] = theirs[name].float()
            copied += 1
    student.load_state_dict(mine)
    return copied


def count_params(model):
    return sum(p.numel() for p in model.parameters())
