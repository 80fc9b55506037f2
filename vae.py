"""
The SD3 VAE: an LDM-style AutoencoderKL with 16 latent channels, written from scratch.

    image [B,3,H,W] in [-1,1] --encoder--> moments [B,2z,H/f,W/f] = mean || logvar
    vae latent = mean   (or mean + exp(logvar/2) * eps when sampling)
    model-space latent = (vae latent - shift) * scale        (SD3: shift 0.0609, scale 1.5305)
    model-space latent --(/scale + shift)--> decoder --> image [B,3,H,W], clamped to [-1,1]

Module names equal the SD3 checkpoint keys minus `first_stage_model.`,
so loading is a strict state-dict load and saving writes the original names back.

    encoder: conv_in -> down.0 ... down.{n-1} (res blocks, then a stride-2 conv except the last)
             -> mid (res block, global self-attention, res block) -> GroupNorm, SiLU -> conv_out
    decoder: conv_in -> mid -> up.{n-1} ... up.0 (res blocks, then nearest x2 + conv except up.0)
             -> GroupNorm, SiLU -> conv_out

The decoder's levels are stored by level index: up.0 is the highest resolution and applied last.
There are no quant convs. Tiled encode/decode (`tile=`) runs the layers above latent resolution
in overlapping windows, so a 2048x2048 image never holds the whole activation map; GroupNorm
still uses whole-image statistics, so the result equals the untiled one up to tile borders.
"""

import json
import math
import os
import re
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import weights


@dataclass
class VAEConfig:
    ch: int = 128                  # width of level 0 (conv_in's output channels)
    ch_mult: tuple = (1, 2, 4, 4)  # level widths ch * m; x2 down/upsampling between levels
    enc_res_blocks: int = 2        # ResnetBlocks per encoder level
    dec_res_blocks: int = 3        # ResnetBlocks per decoder level
    z_channels: int = 16           # latent channels
    in_channels: int = 3           # image channels into the encoder
    out_channels: int = 3          # image channels out of the decoder
    norm_groups: int = 32          # GroupNorm groups (the weights cannot tell; kept in metadata)
    mid_attention: bool = True     # single-head self-attention between the two mid res blocks
    scale: float = 1.5305          # model-space latent = (vae latent - shift) * scale
    shift: float = 0.0609

    def __post_init__(self):
        self.ch_mult = tuple(self.ch_mult)  # JSON gives a list
        bad = [self.ch * m for m in self.ch_mult if (self.ch * m) % self.norm_groups]
        if bad:
            raise ValueError(f"VAEConfig: norm_groups={self.norm_groups} does not divide the "
                             f"level widths {bad}; pick a divisor of ch={self.ch}")

    @property
    def factor(self):
        """Pixels per latent along each side."""
        return 2 ** (len(self.ch_mult) - 1)

    @classmethod
    def from_state_dict(cls, shapes, metadata=None, source="the state dict"):
        """Infer the architecture from {name: shape} (bare VAE keys; tensors work too).
        norm_groups, scale and shift come from the file's metadata ("config" JSON) when present;
        otherwise 32 groups, and SD3's scale/shift for a 16-channel latent (else 1 and 0)."""
        shapes = {k: tuple(getattr(v, "shape", v)) for k, v in shapes.items()}
        try:
            meta = json.loads((metadata or {}).get("config", "{}"))
        except ValueError:
            raise weights.WeightsError(f"{source}: its 'config' metadata is not JSON") from None
        try:
            ch, in_channels = shapes["encoder.conv_in.weight"][:2]
            levels = sorted({int(m.group(1)) for k in shapes
                             if (m := re.match(r"encoder\.down\.(\d+)\.", k))})
            widths = [shapes[f"encoder.down.{L}.block.0.conv1.weight"][0] for L in levels]
            z = shapes["decoder.conv_in.weight"][1]
            out_channels = shapes["decoder.conv_out.weight"][0]
            moments = shapes["encoder.conv_out.weight"][0]
        except (KeyError, ValueError) as e:
            raise weights.WeightsError(
                f"{source}: not an SD3-style VAE (no {e}); it looks like "
                f"{weights.describe_keys(shapes)}. Pass a VAE file, an SD3 single file with "
                "first_stage_model.* tensors, or a diffusers vae/ folder.") from None
        if levels != list(range(len(levels))) or any(w % ch for w in widths) or moments != 2 * z:
            raise weights.WeightsError(f"{source}: inconsistent VAE shapes (levels {levels}, "
                                       f"widths {widths}, conv_out {moments} vs 2 x z={z})")
        def count(prefix):  # distinct indices after prefix
            return len({k[len(prefix):].split(".")[0] for k in shapes if k.startswith(prefix)})

        sd3 = z == 16
        return cls(ch=ch, ch_mult=tuple(w // ch for w in widths), z_channels=z,
                   enc_res_blocks=count("encoder.down.0.block."),
                   dec_res_blocks=count("decoder.up.0.block."),
                   in_channels=in_channels, out_channels=out_channels,
                   norm_groups=meta.get("norm_groups", 32 if ch % 32 == 0 else math.gcd(32, ch)),
                   mid_attention="encoder.mid.attn_1.q.weight" in shapes,
                   scale=meta.get("scale", 1.5305 if sd3 else 1.0),
                   shift=meta.get("shift", 0.0609 if sd3 else 0.0))


CONFIGS = {
    "sd3": VAEConfig(),  # 83.8M params, x8, 16 latent channels (SD3 / SD3.5)
    "tiny": VAEConfig(ch=32, ch_mult=(1, 2, 2), z_channels=4, norm_groups=8,  # 1.29M, x4
                      scale=1.0, shift=0.0),
    # the shapes world's autoencoder: x4, 4 channels, narrow at full resolution (fast on a CPU);
    # train_teacher.py measures its latent shift and scale and stores them with the weights
    "shapes": VAEConfig(ch=16, ch_mult=(1, 2, 4), enc_res_blocks=1, dec_res_blocks=2,  # 0.68M
                        z_channels=4, norm_groups=8, scale=1.0, shift=0.0),
    "test": VAEConfig(ch=8, ch_mult=(1, 2), enc_res_blocks=1, dec_res_blocks=1,  # 37.7k, x2
                      z_channels=4, norm_groups=4, scale=1.0, shift=0.0),
}


# ----------------------------------------------------------------------------------------------
# building blocks


class Norm(nn.GroupNorm):
    """GroupNorm, eps 1e-6, affine. While tiling, `stats` makes its statistics whole-image."""
    stats = None  # a _TileStats during a tiled run, else None (plain GroupNorm)

    def __init__(self, channels, groups):
        super().__init__(groups, channels, eps=1e-6, affine=True)

    def forward(self, x):
        return super().forward(x) if self.stats is None else self.stats.normalize(self, x)


class ResnetBlock(nn.Module):
    def __init__(self, cin, cout, groups):
        super().__init__()
        self.norm1 = Norm(cin, groups)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = Norm(cout, groups)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x):                                  # [B, cin, H, W]
        h = self.conv1(F.silu(self.norm1(x)))              # [B, cout, H, W]
        h = self.conv2(F.silu(self.norm2(h)))              # [B, cout, H, W]
        return self.nin_shortcut(x) + h                    # [B, cout, H, W]


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions, 1x1 convs as projections."""

    def __init__(self, channels, groups):
        super().__init__()
        self.norm = Norm(channels, groups)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(channels, channels, 1) for _ in range(4))

    def forward(self, x):                                  # [B, C, H, W]
        B, C, H, W = x.shape
        h = self.norm(x)
        # contiguous, or CPU attention falls back to the kernel with O((H*W)^2) memory
        q, k, v = (p(h).flatten(2).transpose(1, 2).contiguous()[:, None]
                   for p in (self.q, self.k, self.v))      # [B, 1, H*W, C] each
        h = F.scaled_dot_product_attention(q, k, v)        # [B, 1, H*W, C], scale 1/sqrt(C)
        h = h[:, 0].transpose(1, 2).reshape(B, C, H, W)    # [B, C, H, W]
        return x + self.proj_out(h)


class Downsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x):                                  # [B, C, H, W]
        return self.conv(F.pad(x, (0, 1, 0, 1)))           # [B, C, H/2, W/2]; pad right/bottom


class Upsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):                                  # [B, C, H, W]
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # [B, C, 2H, 2W]


class Mid(nn.Module):
    def __init__(self, channels, groups, attention):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups)
        self.attn_1 = AttnBlock(channels, groups) if attention else nn.Identity()
        self.block_2 = ResnetBlock(channels, channels, groups)

    def forward(self, x):
        return self.block_2(self.attn_1(self.block_1(x)))


def _level(blocks, resample=None, name=None):
    level = nn.Module()
    level.block = nn.ModuleList(blocks)
    if resample is not None:
        setattr(level, name, resample)
    return level


class Encoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        widths, g, n = [cfg.ch * m for m in cfg.ch_mult], cfg.norm_groups, len(cfg.ch_mult)
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down, cin = nn.ModuleList(), cfg.ch
        for L, w in enumerate(widths):
            blocks = [ResnetBlock(cin if j == 0 else w, w, g) for j in range(cfg.enc_res_blocks)]
            self.down.append(_level(blocks, Downsample(w) if L < n - 1 else None, "downsample"))
            cin = w
        self.mid = Mid(cin, g, cfg.mid_attention)
        self.norm_out = Norm(cin, g)
        self.conv_out = nn.Conv2d(cin, 2 * cfg.z_channels, 3, padding=1)

    def forward(self, x):                                  # [B, 3, H, W] in [-1, 1]
        return self.latent_stage(self.pixel_stage(x))      # [B, 2z, H/f, W/f] mean || logvar

    def pixel_stage(self, x):  # everything above latent resolution (tiled when asked)
        h = self.conv_in(x)                                # [B, ch, H, W]
        for level in self.down[:-1]:
            for block in level.block:
                h = block(h)                               # [B, ch*m, H', W']
            h = level.downsample(h)                        # [B, ch*m, H'/2, W'/2]
        return h                                           # [B, C', H/f, W/f]

    def latent_stage(self, h):  # the lowest level, mid (global attention) and the output
        for block in self.down[-1].block:
            h = block(h)                                   # [B, C, H/f, W/f]
        h = self.mid(h)                                    # [B, C, H/f, W/f]
        return self.conv_out(F.silu(self.norm_out(h)))     # [B, 2z, H/f, W/f]


class Decoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        widths, g, n = [cfg.ch * m for m in cfg.ch_mult], cfg.norm_groups, len(cfg.ch_mult)
        self.conv_in = nn.Conv2d(cfg.z_channels, widths[-1], 3, padding=1)
        self.mid = Mid(widths[-1], g, cfg.mid_attention)
        self.up = nn.ModuleList()  # stored by level index; applied from up.{n-1} down to up.0
        for L, w in enumerate(widths):
            cin = widths[min(L + 1, n - 1)]
            blocks = [ResnetBlock(cin if j == 0 else w, w, g) for j in range(cfg.dec_res_blocks)]
            self.up.append(_level(blocks, Upsample(w) if L > 0 else None, "upsample"))
        self.norm_out = Norm(widths[0], g)
        self.conv_out = nn.Conv2d(widths[0], cfg.out_channels, 3, padding=1)

    def forward(self, z):                                  # [B, z, h, w] (VAE space)
        return self.pixel_stage(self.latent_stage(z))      # [B, 3, h*f, w*f]

    def latent_stage(self, z):  # conv_in, mid (global attention), the lowest level's blocks
        h = self.mid(self.conv_in(z))                      # [B, C, h, w]
        for block in self.up[-1].block:
            h = block(h)                                   # [B, C, h, w]
        return h

    def pixel_stage(self, h):  # everything above latent resolution (tiled when asked)
        for i, level in enumerate(reversed(self.up)):
            for block in level.block if i > 0 else []:
                h = block(h)                               # [B, ch*m, H', W']
            if hasattr(level, "upsample"):
                h = level.upsample(h)                      # [B, ch*m, 2H', 2W']
        return self.conv_out(F.silu(self.norm_out(h)))     # [B, 3, h*f, w*f]


# ----------------------------------------------------------------------------------------------
# tiling
#
# Only the pixel stages (everything above latent resolution, where the big activations are) run
# in tiles; the latent stages, with the global mid attention, see the whole latent. Tiles overlap
# and are blended with weights that are zero over the outer MARGIN of each overlap (spoilt by the
# tile's zero padding) and then ramp linearly up to 1.
# GroupNorm is global as well: a tile normalised by its own statistics gets its own colours and
# contrast (visible seams). Whole-image statistics are a fixed point, found by passes over the
# tiles: every Norm sums each tile's statistics, weighted by the tile's blend share; pass 1
# normalises tiles by their own statistics, pass p by the totals of pass p-1. It stops when no
# statistic moves by more than TILE_TOL. Each pass makes at least one more Norm exact, so it ends
# after at most (number of Norms + 1) passes: 7 for the tests' trained tiny decoder, all 14 for a
# random one (20 for SD3's). The statistics are constants to autograd; tiling is for inference.

MARGIN = 0.25    # share of an overlap that each tile gives up at a seam
TILE_TOL = 1e-3  # passes stop when no GroupNorm mean/std moves by more than this (relative)


class _TileStats:
    """GroupNorm statistics of the whole image, gathered tile by tile."""

    def __init__(self):
        self.total, self.sums, self.center, self.share = {}, {}, {}, None  # share: tile weights

    def normalize(self, gn, x):                            # x [B, C, H, W], one tile
        B, C, H, W = x.shape
        xg = x.float().reshape(B, gn.num_groups, -1, H, W)  # [B, G, C/G, H, W]
        s = self.share[None, None]                         # [1, 1, h', w'] -> this layer's size
        s = (F.interpolate(s, size=(H, W)) if H >= s.shape[-2]
             else F.adaptive_avg_pool2d(s, (H, W)))[0, 0]  # [H, W], still summing to 1 per pixel
        if gn not in self.center:                          # sums around a fixed centre stay exact
            self.center[gn] = xg.detach().mean((2, 3, 4))  # [B, G]
        d = xg.detach() - self.center[gn][..., None, None, None]
        sums = torch.stack([(s.sum() * xg.shape[2]).expand(B, gn.num_groups),
                            (d * s).sum((2, 3, 4)), (d * d * s).sum((2, 3, 4))])  # [3, B, G]
        self.sums[gn] = self.sums.get(gn, 0) + sums
        if gn in self.total:                               # the previous pass's whole image
            mean, std = self.moments(gn, self.total[gn])
        else:                                              # pass 1: the tile's own
            mean, std = xg.mean((2, 3, 4)), (xg.var((2, 3, 4), unbiased=False) + gn.eps).sqrt()
        y = (xg - mean[..., None, None, None]) / std[..., None, None, None]
        return y.reshape(B, C, H, W).to(x.dtype) * gn.weight[:, None, None] + gn.bias[:, None, None]

    def moments(self, gn, sums):                           # -> mean, std  [B, G] each
        n, s1, s2 = sums
        m = s1 / n
        return self.center[gn] + m, (s2 / n - m * m).clamp(min=0).add(gn.eps).sqrt()

    def settled(self):
        """Did this pass measure what the previous pass assumed?"""
        for gn, sums in self.sums.items():
            if gn not in self.total:
                return False
            (m0, s0), (m1, s1) = self.moments(gn, self.total[gn]), self.moments(gn, sums)
            if ((m1 - m0).abs() / s0).max() > TILE_TOL or (s1 / s0 - 1).abs().max() > TILE_TOL:
                return False
        return True


def _ramp(length, overlap, left, right):
    """A tile's 1-D blend weights: on a side that meets another tile, 0 over MARGIN of the
    overlap, then rising linearly to 1."""
    w, m = torch.ones(length), int(overlap * MARGIN)
    r = torch.cat([torch.zeros(m), (torch.arange(overlap - 2 * m) + 0.5) / (overlap - 2 * m)])
    if left and overlap:
        w[:len(r)] = r
    if right and overlap:
        w[length - len(r):] = torch.minimum(w[length - len(r):], r.flip(0))
    return w


def _starts(n, tile, overlap):
    return [0] if n <= tile else list(range(0, n - tile, tile - overlap)) + [n - tile]


def _tiled(module, x, tile, overlap, up, down):
    """module.pixel_stage over overlapping windows of x [B, C, H, W] (tile and overlap in x's
    pixels), blended; a window of n pixels comes out as n * up / down."""
    H, W = x.shape[-2:]
    o = lambda n: n * up // down                           # noqa: E731  input -> output pixels
    tiles = []                                             # (input window, output window, weights)
    for y in _starts(H, tile, overlap):
        for x0 in _starts(W, tile, overlap):
            h, w = min(tile, H), min(tile, W)
            weight = torch.outer(_ramp(o(h), o(overlap), y > 0, y + h < H),
                                 _ramp(o(w), o(overlap), x0 > 0, x0 + w < W))  # [o(h), o(w)]
            tiles.append(((slice(y, y + h), slice(x0, x0 + w)),
                          (slice(o(y), o(y + h)), slice(o(x0), o(x0 + w))), weight.to(x.device)))
    if len(tiles) == 1:
        return module.pixel_stage(x)
    total = torch.zeros(o(H), o(W), device=x.device)
    for _, (ys, xs), weight in tiles:
        total[ys, xs] += weight                            # [o(H), o(W)]
    norms = [m for m in module.modules() if isinstance(m, Norm)]
    stats = _TileStats()
    try:
        for m in norms:
            m.stats = stats
        for _ in range(len(norms) + 1):
            stats.total, stats.sums, out = stats.sums, {}, None
            for (yi, xi), (ys, xs), weight in tiles:
                stats.share = weight / total[ys, xs]       # [o(h), o(w)], shares sum to 1
                y = module.pixel_stage(x[..., yi, xi])     # [B, C', o(h), o(w)]
                if out is None:
                    out = y.new_zeros(*y.shape[:2], o(H), o(W), dtype=torch.float32)
                out[..., ys, xs] += y.float() * stats.share
            if stats.settled():
                break
    finally:
        for m in norms:
            m.stats = None
    return out.to(x.dtype)                                 # [B, C', o(H), o(W)]


def _check_tile(tile, overlap, unit, what):
    if not (isinstance(tile, int) and tile > 0 and tile % unit == 0):
        raise ValueError(f"tile={tile!r} must be a positive multiple of {unit} ({what})")
    overlap = tile // 4 // unit * unit if overlap is None else overlap
    if not (isinstance(overlap, int) and 0 <= overlap <= tile // 2 and overlap % unit == 0):
        raise ValueError(f"overlap={overlap!r} must be a multiple of {unit} between 0 and "
                         f"tile/2={tile // 2} ({what})")
    return overlap


# ----------------------------------------------------------------------------------------------
# the model


class VAE(nn.Module):
    def __init__(self, config="sd3"):
        super().__init__()
        if isinstance(config, str) and config not in CONFIGS:
            raise ValueError(f"unknown VAE config {config!r}; choose from {list(CONFIGS)}")
        self.config = CONFIGS[config] if isinstance(config, str) else config
        self.encoder = Encoder(self.config)
        self.decoder = Decoder(self.config)

    def _check(self, x, channels, name):
        if not torch.is_tensor(x) or x.dim() != 4 or x.shape[1] != channels:
            raise ValueError(f"{name} must be a [B, {channels}, H, W] tensor, got "
                             f"{tuple(x.shape) if torch.is_tensor(x) else type(x).__name__}")
        p = next(self.parameters())
        return x.to(device=p.device, dtype=p.dtype)

    def encode(self, img, generator=None, sample=False, tile=None, overlap=None):
        """img [B, 3, H, W] in [-1, 1] -> model-space latents [B, z, H/f, W/f]. sample=True draws
        mean + exp(logvar/2) * eps with `generator`; else the mean. tile/overlap in pixels."""
        f = self.config.factor
        img = self._check(img, self.config.in_channels, "image")
        H, W = img.shape[-2:]
        if H % f or W % f:
            sizes = sorted({(H // f * f, W // f * f), (-(-H // f) * f, -(-W // f) * f)})
            sizes = " or ".join(f"{h}x{w}" for h, w in sizes if h and w)
            raise ValueError(f"image size {H}x{W} (HxW) is not a multiple of the VAE factor {f}; "
                             f"nearest valid sizes: {sizes} (crop or resize the image)")
        if tile is None:
            moments = self.encoder(img)                    # [B, 2z, h, w]
        else:
            overlap = _check_tile(tile, overlap, f, "pixels, for encode")
            h = _tiled(self.encoder, img, tile, overlap, 1, f)  # [B, C, h, w]
            moments = self.encoder.latent_stage(h)
        mean, logvar = moments.chunk(2, dim=1)             # [B, z, h, w] each
        z = mean
        if sample:
            eps = torch.randn(mean.shape, generator=generator, dtype=mean.dtype,
                              device=generator.device if generator is not None else mean.device)
            z = mean + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * eps.to(mean.device)
        return (z - self.config.shift) * self.config.scale

    def decode(self, latents, tile=None, overlap=None):
        """Model-space latents [B, z, h, w] -> image [B, 3, h*f, w*f] in [-1, 1].
        tile/overlap in latent pixels (tile=64 is 512 px for SD3)."""
        z = self._check(latents, self.config.z_channels, "latents")
        z = z / self.config.scale + self.config.shift      # [B, z, h, w] VAE space
        if tile is None:
            img = self.decoder(z)                          # [B, 3, H, W]
        else:
            overlap = _check_tile(tile, overlap, 1, "latent pixels, for decode")
            h = self.decoder.latent_stage(z)               # [B, C, h, w], whole
            img = _tiled(self.decoder, h, tile, overlap, self.config.factor, 1)
        return img.clamp(-1.0, 1.0)

    # -- files -------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path, device="cpu", dtype=None, config=None):
        """An SD3 single file (first_stage_model.*), a bare VAE file (either naming) or a diffusers
        folder (with or without vae/). The architecture is inferred from the shapes unless
        `config` (a name or VAEConfig) is given. Tensors are memory-mapped, then moved."""
        path, metadata = os.fspath(path), {}
        if os.path.isdir(path):
            state = weights.load_diffusers(path, "vae")
        else:
            metadata = weights.read_header(path)[1]
            state = weights.load_file(path)
        vae_state = weights.sd3_component(state, "vae")
        if not vae_state:
            raise weights.WeightsError(
                f"{path}: no VAE tensors (first_stage_model.*); the file looks like "
                f"{weights.describe_keys(state)}. Pass a file that holds the VAE.")
        diffusers_json = {}, None
        if any(k.startswith(("encoder.down_blocks.", "decoder.up_blocks.")) for k in vae_state):
            vae_state = from_diffusers(vae_state)
            diffusers_json = weights.diffusers_config(path, "vae", ("latent_channels", "block_out_channels"))
        if config is None:
            config = VAEConfig.from_state_dict(vae_state, metadata, source=path)
            if diffusers_json[1]:
                config = config_from_diffusers_json(config, *diffusers_json)
        with torch.device("meta"):
            model = cls(config)
        weights.load_strict(model, vae_state, source=path, expect="an SD3-style VAE")
        return model.to(device=device, dtype=dtype)

    def save_pretrained(self, path, metadata=None):
        """Original (bare) key names; the resolved config as JSON in the metadata."""
        meta = {**(metadata or {}), "kind": "vae", "config": json.dumps(asdict(self.config))}
        weights.save_file(self.state_dict(), path, meta)


def config_from_diffusers_json(inferred, config, file):
    """A diffusers AutoencoderKL config.json: its norm groups and latent scale and shift (which
    the weights cannot tell) taken, the rest checked against what the weights imply."""
    c = inferred
    layers = config.get("layers_per_block")
    weights.check_config(file, [
        ("latent_channels", config.get("latent_channels"), c.z_channels),
        ("in_channels", config.get("in_channels"), c.in_channels),
        ("out_channels", config.get("out_channels"), c.out_channels),
        ("block_out_channels", config.get("block_out_channels"), [c.ch * m for m in c.ch_mult]),
        ("layers_per_block", layers, c.enc_res_blocks),
        ("layers_per_block (+ 1 in the decoder)", None if layers is None else layers + 1,
         c.dec_res_blocks),
        ("mid_block_add_attention", config.get("mid_block_add_attention"), c.mid_attention)], "VAE")
    if config.get("use_quant_conv") or config.get("use_post_quant_conv"):
        raise weights.WeightsError(f"{file}: use_quant_conv / use_post_quant_conv are set: an SD1/SDXL-"
                                   "style VAE; SD3's VAE has neither (pass an SD3 VAE)")
    scale, shift = config.get("scaling_factor"), config.get("shift_factor")
    groups = config.get("norm_num_groups", c.norm_groups)
    return VAEConfig(**{**asdict(c), "norm_groups": groups,
                        "scale": c.scale if scale is None else float(scale),
                        "shift": 0.0 if shift is None and scale is not None else
                        c.shift if shift is None else float(shift)})


# ----------------------------------------------------------------------------------------------
# diffusers naming

# (original, diffusers) name pieces; {L} level, {j} block, {R} decoder level (diffusers: n-1-L)
DIFFUSERS_NAMES = [
    ("encoder.down.{L}.block.{j}.", "encoder.down_blocks.{L}.resnets.{j}."),
    ("encoder.down.{L}.downsample.", "encoder.down_blocks.{L}.downsamplers.0."),
    ("decoder.up.{R}.block.{j}.", "decoder.up_blocks.{R}.resnets.{j}."),
    ("decoder.up.{R}.upsample.", "decoder.up_blocks.{R}.upsamplers.0."),
    ("mid.block_1.", "mid_block.resnets.0."),
    ("mid.block_2.", "mid_block.resnets.1."),
    ("mid.attn_1.norm.", "mid_block.attentions.0.group_norm."),
    ("mid.attn_1.q.", "mid_block.attentions.0.to_q."),
    ("mid.attn_1.k.", "mid_block.attentions.0.to_k."),
    ("mid.attn_1.v.", "mid_block.attentions.0.to_v."),
    ("mid.attn_1.proj_out.", "mid_block.attentions.0.to_out.0."),
    ("nin_shortcut.", "conv_shortcut."),
    ("norm_out.", "conv_norm_out."),
]


def _pattern(piece):  # "a.{L}.b." -> regex matching at a name boundary, numbers captured
    return re.compile(r"(?:^|(?<=\.))" + re.sub(r"\\\{(\w)\\\}", r"(?P<\1>\\d+)", re.escape(piece)))


_RULES = [(_pattern(o), o, _pattern(d), d) for o, d in DIFFUSERS_NAMES]


def _convert(state, to_diffusers):
    n = 1 + max((int(m.group(1)) for k in state
                 if (m := re.match(r"decoder\.up(?:_blocks)?\.(\d+)\.", k))), default=0)
    out = {}
    for key, t in state.items():
        for o_re, o, d_re, d in _RULES:
            src, dst = (o_re, d) if to_diffusers else (d_re, o)
            if m := src.search(key):
                nums = m.groupdict()
                if "R" in nums:
                    nums["R"] = n - 1 - int(nums["R"])
                key = key[:m.start()] + dst.format(**nums) + key[m.end():]
        attn = re.search(r"(attentions\.0\.to_(q|k|v|out\.0)|attn_1\.(q|k|v|proj_out))\.weight$",
                         key)
        if attn and to_diffusers and t.dim() == 4:
            t = t.flatten(1)                               # [C, C, 1, 1] -> [C, C]
        elif attn and not to_diffusers and t.dim() == 2:
            t = t[:, :, None, None]                        # [C, C] -> [C, C, 1, 1]
        out[key] = t
    return out


def to_diffusers(state):
    """Original VAE names (bare) -> diffusers AutoencoderKL names. Pure; tensors are views."""
    return _convert(state, True)


def from_diffusers(state):
    """diffusers AutoencoderKL names -> original VAE names (bare). Pure; tensors are views."""
    return _convert(state, False)
