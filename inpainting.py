"""
Inpainting with flow models, in latent space: training-free for any model (a teacher or a
few-step student), or with an inpainting model that reads the mask and the known region.

The mask is white (>= 128) where the image is repainted. The training-free method is RePaint's
blend, adapted to rectified flow (x_s = (1 - s) x0 + s eps):
  1. z0 = VAE(image), encoded once; x starts from the seeded noise of seed + i.
  2. at every step s_i -> s_{i+1}: the guided velocity and the sampler's update (euler or renoise,
     as in flow.sample), then the known region is put back at the new noise level:
         x <- m x + (1 - m) add_noise(z0, fresh eps, s_{i+1})      (exactly z0 at s = 0)
     with m the mask at latent resolution (`latent_mask`).
  3. `resample` extra passes per step (RePaint's "jumps"): re-noise x from s_{i+1} back to s_i
     with the forward jump below and redo the step, which lets the repainted region agree
     with the known one.
  4. decode and composite in pixel space: out = mask decoded + (1 - mask) image, so every
     unmasked pixel is the input, exactly.

Forward jump for rectified flow (s' = s_{i+1} < s = s_i, needs s' < 1): with
x_s' = (1 - s') x0 + s' e1 and a = (1 - s) / (1 - s'),
    x_s = a x_s' + sqrt(s^2 - (a s')^2) e2
has mean (1 - s) x0 and noise std s, the marginal of x_s (s = 1 gives a = 0, pure noise).

Every random draw comes from a per-image CPU generator (seed + i, and seeds derived from it and
the step), so an image does not depend on the batch it is in. With an all-ones mask and no
resampling the result is pipeline.generate's txt2img image for the same seed.

An inpainting model (2 z + 1 input channels: [noisy latent | mask | known latent], made by
train_teacher.py --task inpaint and distilled by train_ladd.py --task inpaint) needs no blend:
it gets the mask and the known latent at every step; step 4 (the composite) is the same.

The command line is inpaint.py; the judge of edits with a known answer is metrics.judge_edits.
"""

import dataclasses
import math

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import flow
import pipeline
import shapes


# noise streams: a fresh draw for (stream, step) of image seed s; stream 0 is flow.sample's renoise
# noise, so an all-ones mask reproduces pipeline.generate exactly
RENOISE, BLEND, JUMP = 0, 1, 2


# ----------------------------------------------------------------------------------------------
# masks


def latent_mask(mask, factor, feather=0):
    """Pixel mask [1 or B, 1, H, W] in {0, 1} (1 = repaint) -> [B, 1, H/f, W/f] in [0, 1].

    A latent pixel is repainted if any of its f x f pixels is. feather = k > 0 adds a soft edge
    *outside* that hard core, so the repainted area is fully regenerated and the seam is blended
    in the kept area: a latent pixel at (chessboard) distance d <= k from the core gets
    1 - d / (k + 1), one farther away 0; the core stays exactly 1."""
    if mask.dim() != 4 or mask.shape[1] != 1:
        raise ValueError(f"mask must be [B, 1, H, W], got {list(mask.shape)}")
    H, W = mask.shape[-2:]
    if H % factor or W % factor:
        raise ValueError(f"mask size {W}x{H} is not a multiple of the VAE factor {factor}")
    if not isinstance(feather, int) or feather < 0:
        raise ValueError(f"feather must be an integer >= 0 (latent pixels), got {feather!r}")
    m = F.max_pool2d(mask.float(), factor)                       # [B, 1, h, w], "any pixel"
    if feather == 0:
        return m
    soft, grown = m, m
    for d in range(1, feather + 1):
        grown = F.max_pool2d(grown, 3, stride=1, padding=1)       # [B, 1, h, w], distance <= d
        soft = torch.maximum(soft, grown * (1 - d / (feather + 1)))
    return soft.clamp(0, 1)


def object_mask(caption, width, height, rng, index):
    """The shapes world: the pixel mask [1, H, W] of object `index`'s box in
    shapes.render(caption, width, height, rng). Pass the same seed (an int) as to render: a
    numpy Generator would have moved on since."""
    scene = shapes.parse_caption(caption)
    if not 0 <= index < len(scene.objects):
        raise ValueError(f"object index {index} out of range: {caption!r} has "
                         f"{len(scene.objects)} object(s)")
    x, y, side = shapes.layout(scene, width, height, rng)[index]
    mask = torch.zeros(1, height, width)
    mask[:, y:y + side, x:x + side] = 1
    return mask                                                  # [1, H, W]


def random_mask(image, rng):
    """A training mask for image [3, H, W] of the shapes world -> [1, H, W] in {0, 1}: half the
    time the box around one of its objects (found in the pixels, grown by 2), else a random box."""
    H, W = image.shape[1:]
    mask = torch.zeros(1, H, W)
    if rng.random() < 0.5:
        classes, _ = shapes.classify_pixels(shapes._to_rgb(image))             # [H, W]
        labels = shapes.connected_components(classes, shapes.border_colour(classes))
        ids, _ = shapes.object_regions(labels)
        if len(ids):
            ys, xs = np.nonzero(labels == labels.flat[ids[rng.integers(len(ids))]])
            mask[:, max(ys.min() - 2, 0):ys.max() + 3, max(xs.min() - 2, 0):xs.max() + 3] = 1
            return mask
    h, w = (int(rng.integers(n // 4, 3 * n // 4 + 1)) for n in (H, W))
    y, x = int(rng.integers(H - h + 1)), int(rng.integers(W - w + 1))
    mask[:, y:y + h, x:x + w] = 1
    return mask


# ----------------------------------------------------------------------------------------------
# inpainting models: the mask and the known latent as extra input channels


def is_inpainting_model(model):
    """An inpainting MMDiT reads [noisy latent | mask | known latent]: 2 z + 1 input channels
    for z output channels (a text-to-image one reads z)."""
    c = model.config
    return c.in_channels == 2 * c.out_channels + 1


def check_task(pipe, task, teacher):
    """LADD's teacher (file name `teacher`) for --task t2i must be a text-to-image model, for
    --task inpaint an inpainting model of the shapes world (where masks and edits are made)."""
    c = pipe.model.config
    if is_inpainting_model(pipe.model):
        if task != "inpaint":
            raise ValueError(f"--teacher {teacher} is an inpainting model (latent, mask and known "
                             "latent in); pass --task inpaint")
        if not pipeline.is_shapes(pipe):
            raise ValueError("--task inpaint makes its data in the shapes world (renders and "
                             "masks); the teacher is not a shapes-world model")
    elif c.in_channels != c.out_channels:
        raise ValueError(f"--teacher {teacher}: a text-to-image MMDiT has as many output as input "
                         f"channels, this one {c.in_channels} -> {c.out_channels}")
    elif task == "inpaint":
        raise ValueError(f"--task inpaint needs an inpainting teacher, and {teacher} is a "
                         "text-to-image one; make one with python train_teacher.py --preset inpaint")


def with_known(x, known):
    """An inpainting model's input: the noisy latent x [B, z, h, w] with the mask and the known
    latent [B, 1 + z, h, w] appended; known None (a text-to-image model): x itself. x's values
    and precision are kept (fp32 x beside fp16 known channels stays fp32), and its graph."""
    return x if known is None else torch.cat([x, known], dim=1)


def known_channels(z0, m):
    """An inpainting model's extra input [B, 1 + z, h, w]: the latent mask m [B, 1, h, w]
    (1 = repaint) and the known latent z0 [B, z, h, w], zeroed where it is repainted. The
    inputs' dtype is kept."""
    return torch.cat([m, z0 * (1 - m)], dim=1)


def conditioned(model, extra):
    """model(x, t, context, pooled) with the extra channels appended to x, e.g. for flow.sample
    (a guided pass doubles the batch: the extra channels are repeated to match)."""
    def run(x, t, context, pooled):
        e = extra.repeat(x.shape[0] // extra.shape[0], 1, 1, 1).to(x.dtype)  # [B', 1 + z, h, w]
        return model(with_known(x, e), t, context, pooled)
    return run


@torch.no_grad()
def inpaint_latents(pipe, z0, m, cond, seeds, steps=None, cfg=None, sampler=None):
    """An inpainting model's completions for a batch: known latents z0 [B, z, h, w], latent masks
    m [B, 1, h, w] (1 = repaint), a Conditioning of B prompts, one noise seed each -> x0 latents
    [B, z, h, w] (the model's own output everywhere; composite in pixels to keep the input)."""
    s = pipeline.sampling_settings(pipe, steps, cfg, None, sampler)
    device = pipe.device
    velocity = conditioned(pipeline.velocity_of(pipe.model), known_channels(z0.to(device), m.to(device)))
    noise = flow.seeded_noise(seeds, z0.shape[1:], device)                     # [B, z, h, w]
    B = len(seeds)
    return flow.sample(velocity, noise, s["sigmas"], cond.context.to(device), cond.pooled.to(device),
                       cond.uncond_context.to(device).expand(B, -1, -1),
                       cond.uncond_pooled.to(device).expand(B, -1), s["cfg"], s["sampler"],
                       seeds=seeds).float().cpu()


# ----------------------------------------------------------------------------------------------
# the method


def _fresh(seeds, stream, step, like):
    """Noise like `like` [B, C, h, w] for (stream, step), one CPU generator per image seed."""
    return flow.seeded_noise([flow.derive_seed(s, step + 1 + stream * 2**32) for s in seeds],
                             like.shape[1:], like.device, like.dtype)


def forward_jump(x, s_from, s_to, eps):
    """Re-noise a rectified-flow state from s_from up to s_to >= s_from (s_from < 1); see the
    module docstring: x_to = a x_from + sqrt(s_to^2 - (a s_from)^2) eps, a = (1-s_to)/(1-s_from)."""
    if not 0 <= s_from <= s_to <= 1 or s_from >= 1:
        raise ValueError(f"forward jump needs 0 <= s_from <= s_to <= 1 and s_from < 1, "
                         f"got {s_from} -> {s_to}")
    a = (1 - s_to) / (1 - s_from)
    return a * x + math.sqrt(max(s_to ** 2 - (a * s_from) ** 2, 0.0)) * eps


def _check_inputs(pipe, image, mask):
    """-> image [1 or N, 3, H, W], mask [1 or N, 1, H, W] in {0, 1}, both float on the CPU."""
    if not torch.is_tensor(image) or image.dim() not in (3, 4) or image.shape[-3] != 3:
        raise ValueError(f"image must be a [3, H, W] (or [N, 3, H, W]) tensor in [-1, 1], got "
                         f"{list(image.shape) if torch.is_tensor(image) else type(image).__name__}")
    image = image[None] if image.dim() == 3 else image
    mask = mask[None] if torch.is_tensor(mask) and mask.dim() == 2 else mask
    mask = mask[None] if torch.is_tensor(mask) and mask.dim() == 3 else mask
    if not torch.is_tensor(mask) or mask.dim() != 4 or mask.shape[1] != 1:
        raise ValueError(f"mask must be [1, H, W] or [H, W] (or [N, 1, H, W]), got "
                         f"{list(mask.shape) if torch.is_tensor(mask) else type(mask).__name__}")
    H, W = image.shape[-2:]
    if tuple(mask.shape[-2:]) != (H, W):
        raise ValueError(f"mask is {mask.shape[-1]}x{mask.shape[-2]} but the image is {W}x{H}; "
                         "they must be the same size")
    if len(mask) != len(image):
        raise ValueError(f"{len(image)} images but {len(mask)} masks; pass one mask per image")
    if not ((mask == 0) | (mask == 1)).all():
        raise ValueError("mask must hold only 0 (keep) and 1 (repaint)")
    pipeline.check_size(pipe, W, H)
    return image.float().cpu(), mask.float().cpu()


@torch.no_grad()
def inpaint(pipe, image, mask, prompts, steps=None, cfg=None, sampler=None, seed=0, resample=0,
            feather=0, progress=False):
    """Repaint image [3, H, W] in [-1, 1] where mask ([1, H, W] or [H, W], 1 = repaint) is set,
    once per prompt -> images [N, 3, H, W] in [-1, 1] on the CPU, equal to `image` wherever the
    mask is 0. Or a batch: images [N, 3, H, W] and masks [N, 1, H, W], a prompt each. steps,
    cfg, sampler: None means the checkpoint's default. Result i depends only on seed + i, not
    on how many prompts there are."""
    image, mask = _check_inputs(pipe, image, mask)
    if not isinstance(resample, int) or resample < 0:
        raise ValueError(f"resample must be an integer >= 0, got {resample!r}")
    s = pipeline.sampling_settings(pipe, steps, cfg, None, sampler)
    if s["sampler"] not in flow.SAMPLERS:
        raise ValueError(f"unknown sampler {s['sampler']!r}; choices: {', '.join(flow.SAMPLERS)}")
    cond = pipeline.encode(pipe, prompts)
    n, sigmas, device = len(cond), s["sigmas"], pipe.device
    if n == 0:
        raise ValueError("no prompts to inpaint with")
    if len(image) not in (1, n):
        raise ValueError(f"{len(image)} images but {n} prompts; pass one image, or a prompt each")
    seeds = [seed + i for i in range(n)]

    z0 = pipe.vae.encode(image.to(device)).float()                   # [1 or N, z, h, w]
    z0 = z0.expand(n, -1, -1, -1)                                      # [N, z, h, w]
    m = latent_mask(mask, pipe.vae.config.factor, feather).to(device)  # [1 or N, 1, h, w]
    context, pooled = cond.context.to(device), cond.pooled.to(device)        # [N, L, Dc], [N, Dp]
    uncond_context = cond.uncond_context.to(device).expand(n, -1, -1)        # [N, L, Dc]
    uncond_pooled = cond.uncond_pooled.to(device).expand(n, -1)              # [N, Dp]
    velocity = pipeline.velocity_of(pipe.model)  # fp32 state, the model in its own dtype

    x = flow.add_noise(z0, flow.seeded_noise(seeds, z0.shape[1:], device), sigmas[0])  # [N, z, h, w]
    if is_inpainting_model(pipe.model):  # it sees the known region itself: no blend, no passes
        if resample or feather:
            raise ValueError("resample and feather belong to training-free inpainting; this "
                             "checkpoint is an inpainting model, which conditions on the mask itself")
        m = latent_mask(mask, pipe.vae.config.factor).to(device)               # [1 or N, 1, h, w]
        velocity = conditioned(velocity, known_channels(z0, m.expand(n, -1, -1, -1)))
        m = torch.ones_like(m)  # the blend below then keeps the model's own update everywhere
    passes = resample + 1
    with tqdm(total=(len(sigmas) - 1) * passes, desc="inpainting", disable=not progress) as bar:
        for i in range(len(sigmas) - 1):
            s_i, s_next = float(sigmas[i]), float(sigmas[i + 1])
            t = torch.full((n,), s_i, device=device)                  # [N]
            for r in range(passes):
                stream = 3 * r  # pass r: its own noise for every draw
                v = flow.cfg_velocity(velocity, x, t, context, pooled, uncond_context,
                                      uncond_pooled, s["cfg"])         # [N, z, h, w]
                eps = _fresh(seeds, stream + RENOISE, i, x) if s["sampler"] == "renoise" else None
                x_next = flow.sampler_step(x, v, s_i, s_next, s["sampler"], eps)
                known = flow.add_noise(z0, _fresh(seeds, stream + BLEND, i, x), s_next)
                x_next = m * x_next + (1 - m) * known                  # the RePaint blend
                if r + 1 < passes:  # back to s_i and do the step again
                    x = forward_jump(x_next, s_next, s_i, _fresh(seeds, stream + JUMP, i, x))
                else:
                    x = x_next
                bar.update()

    decoded = pipe.vae.decode(x).float().cpu()                         # [N, 3, H, W]
    return torch.where(mask > 0, decoded, image)                       # exact outside the mask


# ----------------------------------------------------------------------------------------------
# evaluation: edits with a known answer (the shapes world)


def edit_task(rng, width, height):
    """A random scene with one object replaced by another colour and shape, drawn from numpy
    Generator rng -> (image [3, H, W], mask [1, H, W]: that object's box, new caption)."""
    scene = shapes.parse_caption(shapes.random_caption(rng))
    k = int(rng.integers(len(scene.objects)))
    used = {scene.background, *(o.colour for o in scene.objects)}
    colour = str(rng.choice(sorted(set(shapes.PALETTE) - used)))
    shape = str(rng.choice([s for s in shapes.SHAPES if s != scene.objects[k].shape]))
    objects = list(scene.objects)
    objects[k] = shapes.Obj(colour, shape)
    seed = int(rng.integers(2 ** 31))
    image = shapes.render(scene.caption, width, height, seed)                # [3, H, W]
    mask = object_mask(scene.caption, width, height, seed, k)                # [1, H, W]
    return image, mask, dataclasses.replace(scene, objects=tuple(objects)).caption
