"""
The LADD discriminator: small trainable heads on the frozen teacher's own features.

LADD does not judge pixels. A latent (real: teacher-generated; fake: the student's x̂0) is
re-noised to a level t̂ and passed through the frozen teacher MMDiT; after each selected joint
block the image tokens are reshaped back to a 2-D map [B, D, h, w] (`MMDiT.features`), and one
head per block says real or fake. Being convolutional, a head reads a token grid of any shape, so
multi-aspect-ratio training needs nothing extra. t̂ chooses what is judged (high: layout and
composition, low: texture), so every head is told t̂ and the prompt (pooled text vector):

    c      = SiLU(t_embedder(sincos(1000 t̂)) + y_embedder(pooled))              [B, hidden]
    h      = x_in(F)                                     1x1 conv D -> hidden    [B, hidden, h, w]
    h      = h + conv3x3(SiLU(FiLM_c(GroupNorm(h))))     two residual blocks
    h      = SiLU(GroupNorm(h))
    logit  = mean_space(logit_out(h)) + <mean_space(h), proj_embed(c)> / sqrt(hidden)      [B]

The last line is a projection discriminator (Miyato & Koyama 2018): the second term asks whether
these features fit this t̂ and this prompt. `logit_out` and `proj_embed` start at zero, so every
head starts at logit 0: each hinge term starts at exactly 1 (the D loss at 2 per head) and the G
loss at 0. GroupNorm, not BatchNorm: real and fake batches are judged separately, and batch
statistics would leak between samples (and break at batch size 1).

Width: `hidden` = 48 by default. For the shapes teacher (depth 4, D 256, 8.99 M parameters) the
four heads hold 4 x 86.2 k = 0.34 M parameters, 3.8 % of the teacher, about the few per cent the
method describes. The width is fixed, not scaled with D: on SD3-size teachers the heads are then
well under 1 %; pass a larger `hidden` there if they prove too weak.

Losses are plain functions over lists of per-head logits (hinge, summed over heads), plus an
optional finite-difference stand-in for the R1 penalty. LADD reports no R1 (ADD used gamma 1e-5),
so the training script gives it weight 0 by default.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from mmdit import Embedder, timestep_embedding

GROUPS = 8  # GroupNorm groups; hidden must be a multiple of this


class ResBlock(nn.Module):
    """GroupNorm -> FiLM(c) -> SiLU -> 3x3 conv, added back to the input."""
    def __init__(self, hidden):
        super().__init__()
        self.norm = nn.GroupNorm(GROUPS, hidden)
        self.film = nn.Linear(hidden, 2 * hidden)
        self.conv = nn.Conv2d(hidden, hidden, 3, padding=1)

    def forward(self, h, c):
        shift, scale = self.film(c)[:, :, None, None].chunk(2, dim=1)  # [B, hidden, 1, 1] each
        return h + self.conv(F.silu(self.norm(h) * (1 + scale) + shift))  # [B, hidden, h, w]


class DiscriminatorHead(nn.Module):
    """Reads one teacher block's image-token map [B, D, h, w] -> logits [B] (positive = real)."""
    def __init__(self, feature_dim, pooled_dim, hidden=48):
        super().__init__()
        if hidden % GROUPS:
            raise ValueError(f"hidden={hidden} must be a multiple of {GROUPS} (GroupNorm groups)")
        self.feature_dim, self.pooled_dim, self.hidden = feature_dim, pooled_dim, hidden
        self.t_embedder = Embedder(256, hidden)
        self.y_embedder = Embedder(pooled_dim, hidden)
        self.x_in = nn.Conv2d(feature_dim, hidden, 1)
        self.res_blocks = nn.ModuleList([ResBlock(hidden), ResBlock(hidden)])
        self.norm_out = nn.GroupNorm(GROUPS, hidden)
        self.logit_out = nn.Conv2d(hidden, 1, 1)
        self.proj_embed = nn.Linear(hidden, hidden)
        for layer in (self.logit_out, self.proj_embed):  # start at logit 0
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def check_inputs(self, x, t_hat, pooled, name="features"):
        if x.ndim != 4 or x.shape[1] != self.feature_dim:
            raise ValueError(f"{name} must be [B, {self.feature_dim}, h, w], got "
                             f"{list(x.shape)}")
        B = x.shape[0]
        if t_hat.shape != (B,):
            raise ValueError(f"t_hat must be [{B}] (one noise level per sample), got "
                             f"{list(t_hat.shape)}")
        if pooled.shape != (B, self.pooled_dim):
            raise ValueError(f"pooled must be [{B}, {self.pooled_dim}], got {list(pooled.shape)}")

    def forward(self, x, t_hat, pooled):
        """features x [B, D, h, w], noise levels t_hat [B], pooled text [B, Dp] -> logits [B]
        (check_inputs first). Any B >= 1 and any h, w; differentiable in x: the student's
        gradient comes back through it."""
        self.check_inputs(x, t_hat, pooled)
        c = F.silu(self.t_embedder(timestep_embedding(1000 * t_hat).to(x.dtype))
                   + self.y_embedder(pooled))                        # [B, hidden]
        h = self.x_in(x)                                             # [B, hidden, h, w]
        for block in self.res_blocks:
            h = block(h, c)                                          # [B, hidden, h, w]
        h = F.silu(self.norm_out(h))                                 # [B, hidden, h, w]
        local = self.logit_out(h).mean(dim=(1, 2, 3))                # [B]
        proj = (h.mean(dim=(2, 3)) * self.proj_embed(c)).sum(1)      # [B]
        return local + proj / math.sqrt(self.hidden)                 # [B]


class Discriminator(nn.Module):
    """One head per selected teacher block. `blocks` are kept in ascending order, the order in
    which `MMDiT.features(..., blocks=disc.blocks)` returns its maps."""
    def __init__(self, feature_dim, pooled_dim, blocks, hidden=48):
        super().__init__()
        blocks = [int(b) for b in blocks]
        if not blocks or len(set(blocks)) != len(blocks) or min(blocks) < 0:
            raise ValueError(f"blocks must be distinct non-negative block indices, got {blocks}")
        self.blocks = sorted(blocks)
        self.config = dict(feature_dim=feature_dim, pooled_dim=pooled_dim,
                           blocks=self.blocks, hidden=hidden)  # Discriminator(**config) rebuilds
        self.heads = nn.ModuleDict({str(b): DiscriminatorHead(feature_dim, pooled_dim, hidden)
                                    for b in self.blocks})

    @classmethod
    def for_teacher(cls, teacher_config, blocks=None, hidden=48):
        """Heads for an MMDiTConfig; blocks: None (all), a spec string or a list of indices."""
        depth = teacher_config.depth
        if blocks is None or isinstance(blocks, str):
            blocks = parse_blocks("all" if blocks is None else blocks, depth)
        elif bad := [b for b in blocks if not 0 <= b < depth]:
            raise ValueError(f"blocks {bad} outside the teacher's blocks 0..{depth - 1}")
        return cls(teacher_config.hidden_size, teacher_config.pooled_dim, blocks, hidden)

    def forward(self, features, t_hat, pooled):
        """features: list of [B, D, h, w], one per head in the order of `blocks` -> list of [B]."""
        if len(features) != len(self.heads):
            raise ValueError(f"got {len(features)} feature maps for {len(self.heads)} heads "
                             f"(blocks {self.blocks})")
        logits = []
        for b, x in zip(self.blocks, features):
            head = self.heads[str(b)]
            head.check_inputs(x, t_hat, pooled, name=f"feature map of block {b}")
            logits.append(head(x, t_hat, pooled))                    # [B]
        return logits


def parse_blocks(spec, depth):
    """'all' | 'lastN' | comma-separated indices ('0,2,3') -> sorted block indices in 0..depth-1."""
    text = str(spec).strip().lower()
    if text == "all":
        return list(range(depth))
    if text.startswith("last"):
        if not text[4:].isdigit() or not 1 <= int(text[4:]) <= depth:
            raise ValueError(f"blocks {spec!r}: lastN needs N in 1..{depth} for a teacher of "
                             f"depth {depth}")
        return list(range(depth - int(text[4:]), depth))
    parts = [part.strip() for part in text.split(",")]
    if not all(part.removeprefix("-").isdigit() for part in parts):
        raise ValueError(f"cannot parse blocks {spec!r}: use 'all', 'lastN' or comma-separated "
                         "indices such as '0,2,3'")
    blocks = [int(part) for part in parts]
    if bad := [b for b in blocks if not 0 <= b < depth]:
        raise ValueError(f"blocks {bad} in {spec!r} outside the teacher's blocks 0..{depth - 1}")
    if len(set(blocks)) != len(blocks):
        raise ValueError(f"blocks {spec!r} lists a block twice")
    return sorted(blocks)


# ----------------------------------------------------------------------------------------------
# losses: lists of per-head logits [B] in, a scalar out, summed over heads


def hinge_heads_loss(real_logits, fake_logits):
    """sum_k mean(relu(1 - real_k)) + mean(relu(1 + fake_k)) over EVERY head k; 0 once real >= 1
    and fake <= -1. Lists of logits [B_k] (batch sizes may differ) -> a 0-dim tensor with the
    autograd graph. ValueError for empty lists or unequal numbers of real and fake heads."""
    if not real_logits or len(real_logits) != len(fake_logits):
        raise ValueError(f"need the same non-zero number of real and fake logits, got "
                         f"{len(real_logits)} and {len(fake_logits)}")
    return sum(F.relu(1 - r).mean() + F.relu(1 + f).mean()
               for r, f in zip(real_logits, fake_logits))


def hinge_student_loss(fake_logits):
    """-sum_k mean(fake_k) over every head k: the student raises the heads' logits on its
    samples. A 0-dim tensor with the autograd graph; ValueError for an empty list."""
    if not fake_logits:
        raise ValueError("need at least one head's fake logits")
    return -sum(f.mean() for f in fake_logits)


def approx_r1(disc, features, t_hat, pooled, sigma=0.01, generator=None):
    """sum_k mean((D_k(F_k + sigma eps) - D_k(F_k))^2) / sigma^2, eps ~ N(0, I).

    A finite-difference estimate of the R1 penalty |grad_F D_k(F)|^2 on real features: for small
    sigma the difference is sigma <grad, eps>, whose square has expectation sigma^2 |grad|^2. Two
    forward passes and no double backward. Multiply by gamma / 2 for R1 with weight gamma.
    The noise is drawn on the generator's device (training's step generator lives on the CPU)
    and moved to the features'."""
    if sigma <= 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    home = generator.device if generator is not None else features[0].device
    noisy = [x + sigma * torch.randn(x.shape, generator=generator, device=home,
                                     dtype=x.dtype).to(x.device) for x in features]  # [B, D, h, w] each
    clean_logits = disc(features, t_hat, pooled)
    noisy_logits = disc(noisy, t_hat, pooled)
    return sum(((n - c) ** 2).mean() for n, c in zip(noisy_logits, clean_logits)) / sigma ** 2


if __name__ == "__main__":  # head sizes next to each named teacher
    import mmdit
    for name, cfg in mmdit.CONFIGS.items():
        with torch.device("meta"):
            teacher, disc = mmdit.MMDiT(cfg), Discriminator.for_teacher(cfg)
        t, d = mmdit.count_params(teacher), mmdit.count_params(disc)
        print(f"{name:14s} teacher {t / 1e6:9.2f} M   {len(disc.blocks):2d} heads "
              f"{d / 1e6:7.3f} M ({100 * d / t:.1f} %)")
