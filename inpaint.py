"""
Inpainting with flow models, in latent space: training-free for any model (a teacher or a
few-step student), or with an inpainting model that reads the mask and the known region.

    python inpaint.py --ckpt assets/shapes_teacher.safetensors --image docs/inpaint_in.png \\
        --mask docs/inpaint_mask.png --prompt "a red circle to the left of a green triangle on a yellow background"
    python inpaint.py --ckpt assets/shapes_inpaint_teacher.safetensors --eval 256   # judge edits

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
resampling the result is sample.generate's txt2img image for the same seed.

An inpainting model (2 z + 1 input channels: [noisy latent | mask | known latent], made by
train_teacher.py --task inpaint and distilled by train_ladd.py --task inpaint) needs no blend:
it gets the mask and the known latent at every step; step 4 (the composite) is the same.

Writes out.png (the first result; with several prompts also 000.png, 001.png, ...), strip.png
(input | mask | output, a row per prompt) and the resolved config.json into --out. --eval N
instead judges N shapes-world edits with a known answer (edit_task) and writes edits.json.
"""

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

import flow
import sample
import shapes
import weights


@dataclass
class InpaintConfig:
    ckpt: str                        # a checkpoint file, or a run folder with model.safetensors
    image: str = ""                  # the image to edit (its size must be a valid model size)
    mask: str = ""                   # same size as the image; white (>= 128) = repaint
    prompt: list = field(default_factory=list)  # what the result shows (repeat for more)
    steps: int = None                # sampling steps; None: the checkpoint's (a student: its times)
    cfg: float = None                # guidance scale, 1 = unguided; None: the checkpoint's
    sampler: str = None              # euler | renoise; None: the checkpoint's
    seed: int = 0                    # result i starts from the noise of seed + i
    resample: int = 0                # RePaint passes per step: re-noise to the step's start, redo
    feather: int = 0                 # soft mask edge outside the repainted area, latent pixels
    out: str = "inpaint"             # folder for out.png, strip.png, config.json
    device: str = "auto"             # auto (cuda, then mps, then cpu) | cpu | cuda | cuda:N | mps
    dtype: str = "auto"              # auto (bf16 on CUDA, fp32 elsewhere) | fp32 | bf16 | fp16
    quiet: bool = False              # no progress bar and no messages
    eval: int = 0                    # instead: judge this many shapes-world edits (no --image)


# noise streams: a fresh draw for (stream, step) of image seed s; stream 0 is flow.sample's renoise
# noise, so an all-ones mask reproduces sample.generate exactly
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


def known_channels(z0, m):
    """An inpainting model's extra input [B, 1 + z, h, w]: the latent mask m [B, 1, h, w]
    (1 = repaint) and the known latent z0 [B, z, h, w], zeroed where it is repainted."""
    return torch.cat([m, z0 * (1 - m)], dim=1)


def conditioned(model, extra):
    """model(x, t, context, pooled) with the extra channels appended to x, e.g. for flow.sample
    (a guided pass doubles the batch: the extra channels are repeated to match)."""
    def run(x, t, context, pooled):
        e = extra.repeat(x.shape[0] // extra.shape[0], 1, 1, 1).to(x.dtype)  # [B', 1 + z, h, w]
        return model(torch.cat([x, e], dim=1), t, context, pooled)
    return run


@torch.no_grad()
def inpaint_latents(pipe, z0, m, cond, seeds, steps=None, cfg=None, sampler=None):
    """An inpainting model's completions for a batch: known latents z0 [B, z, h, w], latent masks
    m [B, 1, h, w] (1 = repaint), a Conditioning of B prompts, one noise seed each -> x0 latents
    [B, z, h, w] (the model's own output everywhere; composite in pixels to keep the input)."""
    s = sample.sampling_settings(pipe, steps, cfg, None, sampler)
    device = pipe.device
    velocity = conditioned(sample._velocity(pipe.model), known_channels(z0.to(device), m.to(device)))
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
    return flow.seeded_noise([s * 1000003 + step + 1 + stream * 2**32 for s in seeds],
                             like.shape[1:], like.device, like.dtype)


def _update(x, v, s, s_next, sampler, eps):
    """One sampler step from s to s_next (flow.sample's two rules)."""
    if sampler == "euler":
        return x + (s_next - s) * v
    x0_hat = x - s * v
    return (1 - s_next) * x0_hat + (s_next * eps if s_next > 0 else 0.0)


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
    sample.check_size(pipe, W, H)
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
    s = sample.sampling_settings(pipe, steps, cfg, None, sampler)
    if s["sampler"] not in flow.SAMPLERS:
        raise ValueError(f"unknown sampler {s['sampler']!r}; choices: {', '.join(flow.SAMPLERS)}")
    cond = sample.encode(pipe, prompts)
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
    velocity = sample._velocity(pipe.model)  # fp32 state, the model in its own dtype

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
                x_next = _update(x, v, s_i, s_next, s["sampler"], eps)
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


def evaluate_edits(pipe, n=256, seed=0, progress=False, batch_size=64, **settings):
    """The judge on n edits (edit_task; a block of them at each of the checkpoint's sizes), each
    result scored against its new caption -> mean scores, plus `kept`: the share of unmasked
    pixels equal to the input (always 1.0). Edit i starts from the noise of seed + i.
    settings: inpaint's steps, cfg, sampler, resample, feather."""
    size_of = [tuple(pipe.sizes[i * len(pipe.sizes) // n]) for i in range(n)]
    blocks = {}                                          # size -> its edits, consecutive
    for i, size in enumerate(size_of):
        blocks.setdefault(size, []).append(i)
    batches = [index[c:c + batch_size] for index in blocks.values()
               for c in range(0, len(index), batch_size)]
    rows = []
    with tqdm(total=n, desc="edits", disable=not progress) as bar:
        for index in batches:
            edits = [edit_task(np.random.default_rng([seed, i]), *size_of[i]) for i in index]
            images = torch.stack([e[0] for e in edits])                         # [b, 3, H, W]
            masks = torch.stack([e[1] for e in edits])                          # [b, 1, H, W]
            outs = inpaint(pipe, images, masks, [e[2] for e in edits], seed=seed + index[0],
                           **settings)                                           # [b, 3, H, W]
            for (image, mask, caption), out in zip(edits, outs):
                scores = shapes.judge(out, caption)
                keep = mask.expand(3, -1, -1) == 0
                scores["kept"] = float((out[keep] == image[keep]).float().mean())
                rows.append(scores)
            bar.update(len(index))
    return {k: round(float(np.mean([r[k] for r in rows])), 4) for k in rows[0]}


# ----------------------------------------------------------------------------------------------
# files and command line


def load_mask(path):
    """A mask image (any mode) -> [1, H, W] in {0, 1}: 1 where its grey value is >= 128."""
    try:
        with Image.open(path) as im:
            grey = np.asarray(im.convert("L"))                         # [H, W] uint8
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such mask file") from None
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read it as a mask image ({e}); pass a PNG, white = "
                         "repaint") from None
    return torch.from_numpy(grey >= 128).float()[None]                 # [1, H, W]


def parse_args(argv=None):
    """argv -> InpaintConfig (the CLI is generated from the dataclass, as in sample.py)."""
    return sample.parse_config(InpaintConfig, argv, "inpaint.py", __doc__, sample.CHOICES)


def run_eval(c):
    """--eval N: judge N edits, print the scores and write them to --out/edits.json."""
    if c.image or c.mask or c.prompt:
        raise ValueError("--eval makes its own images, masks and captions; drop --image, --mask "
                         "and --prompt")
    device = sample.pick_device(c.device)
    pipe = sample.load_pipeline(c.ckpt, device, sample.pick_dtype(c.dtype, device))
    if not isinstance(pipe.text_encoder, shapes.ShapesTextEncoder):
        raise ValueError(f"--eval needs a shapes-world checkpoint; {c.ckpt} is not one")
    settings = dict(steps=c.steps, cfg=c.cfg, sampler=c.sampler, resample=c.resample,
                    feather=c.feather)
    scores = evaluate_edits(pipe, c.eval, c.seed, progress=not c.quiet, **settings)
    resolved = {**dataclasses.asdict(c), **sample.sampling_settings(pipe, c.steps, c.cfg, None,
                                                                    c.sampler), "scores": scores}
    resolved.pop("sigmas", None)
    os.makedirs(c.out, exist_ok=True)
    path = os.path.join(c.out, "edits.json")
    weights.atomic_write(path, lambda f: f.write(json.dumps(resolved, indent=2).encode()))
    print(f"edits judged: {json.dumps(scores)} -> {path}")
    return scores


def run(c):
    """Inpaint as InpaintConfig `c` says and write the files; returns the output paths."""
    if c.eval:
        return run_eval(c)
    if not c.image or not c.mask:
        raise ValueError("pass --image IN.png and --mask MASK.png (white = repaint), or --eval N")
    prompts = sample.read_prompts(c.prompt)
    if not prompts:
        raise ValueError('no prompts: pass --prompt "what the repainted image shows"')
    if os.path.exists(c.out) and not os.path.isdir(c.out):
        raise ValueError(f"--out {c.out} is a file; pass a folder for the images")
    image, mask = sample.load_image(c.image), load_mask(c.mask)       # [3, H, W], [1, H, W]
    if mask.shape[1:] != image.shape[1:]:
        raise ValueError(f"--mask {c.mask} is {mask.shape[2]}x{mask.shape[1]} but --image {c.image} "
                         f"is {image.shape[2]}x{image.shape[1]}; they must be the same size")
    device = sample.pick_device(c.device)
    dtype = sample.pick_dtype(c.dtype, device)
    pipe = sample.load_pipeline(c.ckpt, device, dtype)
    sample.check_size(pipe, image.shape[2], image.shape[1])
    images = inpaint(pipe, image, mask, prompts, steps=c.steps, cfg=c.cfg, sampler=c.sampler,
                     seed=c.seed, resample=c.resample, feather=c.feather, progress=not c.quiet)

    paths = [os.path.join(c.out, "out.png")]
    sample.save_png(images[0], paths[0])
    if len(images) > 1:
        paths += [os.path.join(c.out, f"{i:03d}.png") for i in range(len(images))]
        for im, path in zip(images, paths[1:]):
            sample.save_png(im, path)
    shown = mask.expand(3, -1, -1) * 2 - 1                             # [3, H, W]: white = repaint
    paths.append(os.path.join(c.out, "strip.png"))
    sample.save_strip([[image, shown, im] for im in images], paths[-1])
    s = sample.sampling_settings(pipe, c.steps, c.cfg, None, c.sampler)
    resolved = {**dataclasses.asdict(c), **s, "width": image.shape[2], "height": image.shape[1],
                "device": str(device), "dtype": str(dtype).removeprefix("torch.")}
    paths.append(os.path.join(c.out, "config.json"))
    weights.atomic_write(paths[-1], lambda f: f.write(json.dumps(resolved, indent=2).encode()))
    if not c.quiet:
        print(f"wrote {len(images)} inpainted image(s) to {c.out}/: "
              + ", ".join(os.path.basename(p) for p in paths))
    return paths


def main(argv=None):
    sample.run_cli(parse_args, run, argv)


if __name__ == "__main__":
    main()
