"""
Instruction editing: an image and an instruction in, the edited image out ("make the red circle
blue"), with a model that reads the source image as extra input channels.

An editing MMDiT reads [noisy latent | source latent] (2 z input channels for z output channels).
It is made from a text-to-image one by widening its patch embedding with zero weights for the
new channels (train_teacher.py --preset edit), so it starts as its parent and learns to use the
source from edit pairs. Its conditioning is dropped in training (the instruction: the empty
prompt; the source: a zero latent), so it has two guidance scales at sampling, as in
InstructPix2Pix (`guided` below):

    v = v(-, -) + image_cfg (v(image, -) - v(-, -)) + cfg (v(image, text) - v(image, -))

with v(source, instruction) the velocity and "-" a dropped condition. A LADD student of it
(train_ladd.py --task edit) is unguided: one pass per step.

The shapes world makes edits with an exact answer: a random scene, an instruction that applies
to it (shapes.random_instruction), and the target rendered by the world in the same boxes.
`judge_edit` scores a result: followed (the shapes judge against the target's caption),
preserved (everything the instruction does not name keeps its colour, shape, position and size)
and both. edit.py is the command line.
"""

import math
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

import flow
import pipeline
import shapes

# ----------------------------------------------------------------------------------------------
# edit tasks with an exact answer


@dataclass(frozen=True)
class EditTask:
    source: shapes.Scene
    instruction: shapes.Instruction
    boxes: tuple               # the source's objects' (x, y, side), caption order
    width: int
    height: int

    @property
    def target(self) -> shapes.Scene:
        return shapes.apply(self.source, self.instruction)

    @property
    def target_boxes(self) -> tuple:
        if self.instruction.kind != "remove":
            return self.boxes
        return tuple(b for o, b in zip(self.source.objects, self.boxes) if o != self.instruction.target)

    def render(self):
        """-> (source, target) images [3, H, W] in [-1, 1], drawn in the same boxes."""
        return (shapes.draw(self.source, self.boxes, self.width, self.height),
                shapes.draw(self.target, self.target_boxes, self.width, self.height))


def make_task(caption, instruction, width, height, seed):
    """An edit of a given scene: the caption drawn as shapes.render(caption, width, height, seed)
    draws it. An instruction outside the grammar, or one that does not apply, is a ValueError."""
    scene = shapes.parse_caption(caption)
    i = shapes.parse_instruction(instruction) if isinstance(instruction, str) else instruction
    shapes.apply(scene, i)  # raises when it does not apply
    return EditTask(scene, i, tuple(shapes.layout(scene, width, height, seed)), width, height)


def random_task(rng, width, height):
    """A random scene (shapes.random_caption), an instruction that applies to it, and its boxes,
    all drawn from rng in that order (so the instruction does not depend on the size)."""
    rng = np.random.default_rng(rng)
    scene = shapes.parse_caption(shapes.random_caption(rng))
    instruction = shapes.random_instruction(scene, rng)
    return EditTask(scene, instruction, tuple(shapes.layout(scene, width, height, rng)), width, height)


def task_of(seed, index, width, height):
    """Edit `index` of the stream `seed`: a pure function of both (datasets, evaluation)."""
    return random_task(np.random.default_rng([seed, index]), width, height)


def batches(batch_size, sizes=shapes.SIZES, seed=0, start_step=0, stride=1):
    """Endless (targets [B, 3, H, W], instructions, sources [B, 3, H, W], (width, height)), one
    aspect bucket per batch; step k is a pure function of (seed, k), like shapes.batches."""
    buckets = [tuple(s) for s in (sizes.values() if isinstance(sizes, dict) else sizes)]
    step = start_step
    while True:
        rng = np.random.default_rng([seed, step])
        width, height = buckets[rng.integers(len(buckets))]
        tasks = [random_task(rng, width, height) for _ in range(batch_size)]
        pairs = [t.render() for t in tasks]
        yield (torch.stack([p[1] for p in pairs]), [t.instruction.text for t in tasks],
               torch.stack([p[0] for p in pairs]), (width, height))
        step += stride

# ----------------------------------------------------------------------------------------------
# the edit judge

# An object counts as kept in place when its bounding box's centre is within POSITION_TOL and its
# side within SIZE_TOL of the source's, both as a share of the image's shorter side. Measured on
# 300 VAE round trips of exact targets (tests/test_editing.py): at most 0.033 and 0.063.
POSITION_TOL = 0.08
SIZE_TOL = 0.1


def _box_of(region):
    """A region mask [H, W] -> (centre x, centre y, side) of its bounding box."""
    ys, xs = np.nonzero(region)
    h, w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    return (xs.min() + w / 2, ys.min() + h / 2, max(h, w))


def _regions(image):
    """(largest region of each palette colour, background colour index) of an image [3, H, W]."""
    classes, _ = shapes.classify_pixels(shapes._to_rgb(image))         # [H, W]
    background = shapes.border_colour(classes)
    labels = shapes.connected_components(classes, background)          # [H, W]
    ids, areas = shapes.object_regions(labels)
    colour_of = classes.flat[ids]
    largest = {}
    for colour in np.unique(colour_of):
        mine = colour_of == colour
        largest[shapes._NAMES[colour]] = labels == ids[mine][areas[mine].argmax()]
    return largest, background


def judge_edit(image, task: EditTask) -> dict:
    """Score an edited image [3, H, W] -> {followed, preserved, both} (bools).
    followed: shapes.judge(image, target caption)["all_correct"].
    preserved: the background keeps its colour (unless the instruction changes it), and every
    source object keeps what the instruction does not change: an object it does not name keeps
    colour, shape, position and size; the recoloured one keeps shape, position and size (found
    by its new colour, else its old one); the reshaped one position and size. A named object
    that is gone is followed's failure, not preserved's; a removed one is not looked for."""
    followed = shapes.judge(image, task.target.caption)["all_correct"]
    regions, background = _regions(image)
    i, short = task.instruction, min(task.width, task.height)
    kept = i.kind == "background" or background == shapes._NAMES.index(task.source.background)
    for obj, (x, y, side) in zip(task.source.objects, task.boxes):
        named = obj == i.target
        if named and i.kind == "remove":
            continue
        colours = [i.value, obj.colour] if named and i.kind == "recolour" else [obj.colour]
        region = next((regions[c] for c in colours if c in regions), None)
        if region is None:
            kept &= named  # an unnamed object must be there
            continue
        cx, cy, s = _box_of(region)
        kept &= math.dist((cx, cy), (x + side / 2, y + side / 2)) <= POSITION_TOL * short
        kept &= abs(s - side) <= SIZE_TOL * short
        if not (named and i.kind == "reshape"):
            kept &= shapes.classify_shape(region) == obj.shape
    return {"followed": bool(followed), "preserved": bool(kept), "both": bool(followed and kept)}

# ----------------------------------------------------------------------------------------------
# editing models: the source latent as extra input channels


def is_edit_model(model):
    """An editing MMDiT reads [noisy latent | source latent]: 2 z input channels for z out."""
    c = model.config
    return c.in_channels == 2 * c.out_channels


def guided(velocity, source, uncond_context, uncond_pooled, cfg=1.0, image_cfg=1.0):
    """velocity(x, t, context, pooled) of an editing model with the source latent [B, z, h, w]
    appended, guided by two scales (InstructPix2Pix's, 1 = unguided; the module docstring's
    formula), where "-" is the dropped condition: the empty prompt (uncond_context [1 or B, L, Dc],
    uncond_pooled [1 or B, Dp]) and the zero latent. Both scales 1: one pass, no guidance."""
    def run(x, t, context, pooled):
        src = source.to(x.dtype)                                       # [B, z, h, w]
        if cfg == 1 and image_cfg == 1:
            return velocity(torch.cat([x, src], 1), t, context, pooled)
        B = len(x)
        uc, up = uncond_context.expand(B, -1, -1), uncond_pooled.expand(B, -1)
        xs = torch.cat([torch.cat([x, src], 1), torch.cat([x, src], 1),
                        torch.cat([x, torch.zeros_like(src)], 1)])     # [3B, 2z, h, w]
        v = velocity(xs, t.repeat(3), torch.cat([context, uc, uc]), torch.cat([pooled, up, up]))
        full, image, none = v.chunk(3)                                 # [B, z, h, w] each
        return none + image_cfg * (image - none) + cfg * (full - image)
    return run


def edit_settings(pipe, steps=None, cfg=None, image_cfg=None, sampler=None):
    """pipeline.sampling_settings plus image_cfg (the checkpoint's, 1 for a student)."""
    s = pipeline.sampling_settings(pipe, steps, cfg, None, sampler)
    image_cfg = pipe.defaults.get("image_cfg", 1.0) if image_cfg is None else image_cfg
    if not (isinstance(image_cfg, (int, float)) and math.isfinite(image_cfg) and image_cfg >= 0):
        raise ValueError(f"--image-cfg {image_cfg}: must be a finite number >= 0 (1 = unguided)")
    return {**s, "image_cfg": float(image_cfg)}


@torch.no_grad()
def edit_latents(pipe, source, cond, seeds, steps=None, cfg=None, image_cfg=None, sampler=None):
    """An editing model's edits: source latents [B, z, h, w], a Conditioning of B instructions,
    one noise seed each -> edited latents [B, z, h, w] (fp32, CPU). None: the checkpoint's."""
    s = edit_settings(pipe, steps, cfg, image_cfg, sampler)
    device = pipe.device
    velocity = guided(pipeline.velocity_of(pipe.model), source.to(device),
                      cond.uncond_context.to(device), cond.uncond_pooled.to(device), s["cfg"],
                      s["image_cfg"])
    noise = flow.seeded_noise(seeds, source.shape[1:], device)                # [B, z, h, w]
    return flow.sample(velocity, noise, s["sigmas"], cond.context.to(device), cond.pooled.to(device),
                       sampler=s["sampler"], seeds=seeds).float().cpu()


def check_edit_model(pipe):
    if not is_edit_model(pipe.model):
        c = pipe.model.config
        raise ValueError(f"{pipe.path} is not an editing model: it reads {c.in_channels} input "
                         f"channels for {c.out_channels} latent channels, and an editing model "
                         f"reads {2 * c.out_channels} (latent and source); make one with python "
                         "train_teacher.py --preset edit")


@torch.no_grad()
def edit(pipe, images, instructions, steps=None, cfg=None, image_cfg=None, sampler=None, seed=0):
    """Edit images [N, 3, H, W] (or one [3, H, W] for every instruction) in [-1, 1], one
    instruction each -> edited images [N, 3, H, W] in [-1, 1] on the CPU. Edit i starts from the
    noise of seed + i. steps, cfg, image_cfg, sampler: None means the checkpoint's."""
    check_edit_model(pipe)
    guidance = edit_settings(pipe, steps, cfg, image_cfg, sampler)["cfg"]  # checks them, before any work
    images = images[None] if images.dim() == 3 else images
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [N, 3, H, W] in [-1, 1], got {list(images.shape)}")
    H, W = images.shape[-2:]
    pipeline.check_size(pipe, W, H)
    cond = pipeline.encode(pipe, list(instructions))
    n = len(cond)
    if n == 0 or len(images) not in (1, n):
        raise ValueError(f"{len(images)} images and {n} instructions: pass one instruction per "
                         "image, or one image for every instruction")
    source = pipe.vae.encode(images.to(pipe.device)).float().expand(n, -1, -1, -1)  # [N, z, h, w]
    latents = edit_latents(pipe, source, cond, [seed + k for k in range(n)], steps, cfg, image_cfg,
                           sampler)
    out = pipe.vae.decode(latents.to(pipe.device)).float().cpu()                  # [N, 3, H, W]
    pipeline.check_finite_output(out, guidance, pipe.dtype)
    return out


EVAL_SEED = 1234  # evaluate's edits by default: not LADD's data, which are task_of(0, i) (--seed 0)


def evaluate(pipe, n=256, seed=EVAL_SEED, progress=False, batch_size=64, keep=0, **settings):
    """The edit judge on n random edits (task_of(seed, i); a block of them at each of the
    checkpoint's sizes), edit i from the noise of seed + i -> (mean followed, preserved and
    both, [(source, output, target) images of the first `keep` edits]). settings: edit's.
    A text-to-image model draws the target's caption instead: the baseline that never sees the
    source (settings: pipeline.generate's, image_cfg left out)."""
    size_of = [tuple(pipe.sizes[i * len(pipe.sizes) // n]) for i in range(n)]
    blocks = {}
    for i, size in enumerate(size_of):
        blocks.setdefault(size, []).append(i)
    rows, kept = [], []
    with tqdm(total=n, desc="edits", disable=not progress) as bar:
        for index in (ix[c:c + batch_size] for ix in blocks.values() for c in range(0, len(ix), batch_size)):
            tasks = [task_of(seed, i, *size_of[i]) for i in index]
            pairs = [t.render() for t in tasks]
            sources = torch.stack([p[0] for p in pairs])                        # [b, 3, H, W]
            if is_edit_model(pipe.model):
                outs = edit(pipe, sources, [t.instruction.text for t in tasks], seed=seed + index[0],
                            **settings)                                         # [b, 3, H, W]
            else:
                settings.pop("image_cfg", None)
                outs = pipeline.generate(pipe, [t.target.caption for t in tasks], *size_of[index[0]],
                                         seed=seed + index[0], progress=False, **settings)
            rows += [judge_edit(out, t) for out, t in zip(outs, tasks)]
            kept += [(p[0], out, p[1]) for p, out in zip(pairs, outs)][:max(0, keep - len(kept))]
            bar.update(len(index))
    scores = {k: round(float(np.mean([r[k] for r in rows])), 4) for k in ("followed", "preserved", "both")}
    return scores, kept
