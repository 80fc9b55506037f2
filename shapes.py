"""The shapes world: a tiny text-to-image world that is known exactly.

A scene is a background colour plus one or two flat shapes (circle, square, upright triangle) in
palette colours, described by a caption from a three-form grammar:

    a red circle on a blue background
    a red circle to the left of a green square on a blue background
    a red circle above a green triangle on a blue background

Because the world is known, everything a text-to-image pipeline needs can be built here without
any download, and quality can be measured without any learned model:

    parse_caption, random_caption    the grammar (caption <-> Scene)
    parse_instruction, apply         edit instructions ("make the red circle blue") and their exact result
    layout, render, render_batch     draw a caption as an image in [-1, 1] (hard edges, pure colours)
    batches                          endless multi-aspect training batches, resumable at any step
    ShapesTextEncoder                a frozen, order-aware encoder: encode(prompts) -> (context, pooled)
    judge, judge_batch               score an image against its caption: colours, shapes, relation

Randomness always comes from an explicit numpy Generator (or anything np.random.default_rng
accepts, e.g. an int seed), so a scene depends only on its seed.
"""

import itertools
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

# -----------------------------------------------------------------------------
# the world, exactly; evaluation (the judge) depends on these values

PALETTE = {
    "red": (220, 40, 40), "orange": (245, 140, 30), "yellow": (240, 210, 40), "green": (40, 170, 70),
    "blue": (40, 90, 220), "purple": (140, 60, 190), "white": (240, 240, 240), "black": (25, 25, 25),
}
SHAPES = ("circle", "square", "triangle")
RELATIONS = ("to the left of", "above")  # first object's centre is left of / higher than the second's
FORMS = (
    "a {colour} {shape} on a {colour} background",
    "a {colour} {shape} to the left of a {colour} {shape} on a {colour} background",
    "a {colour} {shape} above a {colour} {shape} on a {colour} background",
)
SIZES = {"square": (64, 64), "landscape": (96, 48), "portrait": (48, 96)}  # aspect buckets, (width, height)
UNSEEN = [(128, 48), (48, 128), (96, 96), (80, 64)]  # no model trains at these: wider, taller, larger
MANY = [(64, 64), (72, 72), (96, 48), (48, 96), (80, 56), (56, 80), (112, 48), (48, 112)]  # none unseen
MIN_SIDE, MAX_SIDE = 0.30, 0.45  # object box side as a fraction of the image's shorter side
GAP = 0.05                       # minimum gap between two objects, fraction of the shorter side
MIN_CANVAS = 16                  # smallest width or height we draw

# judge thresholds. Distances are RGB on the 0..255 scale; the closest palette pair (orange, yellow)
# is 71 apart, so both radii keep the colours distinguishable.
PURE_RADIUS = 24   # a pixel this close to a palette colour counts as pure (for `purity`)
MATCH_RADIUS = 48  # a pixel this close to its nearest palette colour takes that colour, else unknown
MIN_AREA = 0.01    # regions below this * shorter_side**2 are specks (the smallest object is 0.045)
MIN_CORE = 0.005   # ... and so are regions whose eroded area (_core) is below this: blur fringes
MAX_ASPECT = 1.5   # an object's bounding box must be squarish: 1/1.5 <= width/height <= 1.5
# shape prototypes in (fill, drop): fill = area / bounding box area; drop = depth of the centroid in
# the box, 0.5 for symmetric shapes and 2/3 for an upright triangle (its mass sits low)
SHAPE_PROTOTYPES = {"square": (1.0, 0.5), "circle": (math.pi / 4, 0.5), "triangle": (0.5, 2 / 3)}

# -----------------------------------------------------------------------------
# grammar


@dataclass(frozen=True)
class Obj:
    colour: str
    shape: str


@dataclass(frozen=True)
class Scene:
    background: str
    objects: tuple               # one or two Obj, in caption order
    relation: str | None = None  # one of RELATIONS when there are two objects

    @property
    def caption(self) -> str:
        first = f"a {self.objects[0].colour} {self.objects[0].shape}"
        if len(self.objects) == 1:
            return f"{first} on a {self.background} background"
        second = f"a {self.objects[1].colour} {self.objects[1].shape}"
        return f"{first} {self.relation} {second} on a {self.background} background"


def _grammar_help(forms=FORMS) -> str:
    forms = "\n".join(f"  {form}" for form in forms)
    return f"Use exactly one of:\n{forms}\ncolours: {', '.join(PALETTE)}\nshapes: {', '.join(SHAPES)}"


def _slots(words, form):
    """The colour and shape words of `words` if they fit `form` word for word, else None."""
    template = form.split()
    if len(words) != len(template):
        return None
    slots = []
    for want, word in zip(template, words):
        if (want == "{colour}" and word in PALETTE) or (want == "{shape}" and word in SHAPES):
            slots.append(word)
        elif want != word:
            return None
    return slots


def parse_caption(caption: str) -> Scene:
    """Caption -> Scene. Case and extra whitespace are normalised; anything else must match."""
    if not isinstance(caption, str):
        raise ValueError(f"caption must be a string, got {type(caption).__name__}. {_grammar_help()}")
    words = caption.lower().split()
    for form, relation in zip(FORMS, (None, *RELATIONS)):
        slots = _slots(words, form)
        if slots is not None:
            *pairs, background = slots
            objects = tuple(Obj(c, s) for c, s in zip(pairs[0::2], pairs[1::2]))
            colours = [o.colour for o in objects] + [background]
            if len(set(colours)) != len(colours):
                raise ValueError(f"caption {caption!r} repeats a colour: object colours must differ "
                                 "from the background and from each other")
            return Scene(background, objects, relation)
    raise ValueError(f"caption {caption!r} is not in the shapes grammar. {_grammar_help()}")


def random_caption(rng) -> str:
    """A random caption: 1 or 2 objects (even odds), then a relation (even odds), then distinct
    colours for background and objects and a shape per object, each uniform."""
    rng = np.random.default_rng(rng)
    n = 1 + int(rng.integers(2))
    names = list(PALETTE)
    background, *colours = [names[i] for i in rng.choice(len(names), size=n + 1, replace=False)]
    objects = tuple(Obj(c, SHAPES[rng.integers(len(SHAPES))]) for c in colours)
    relation = RELATIONS[rng.integers(len(RELATIONS))] if n == 2 else None
    return Scene(background, objects, relation).caption

# -----------------------------------------------------------------------------
# edit instructions: what changes in a scene, and the scene it makes (editing.py uses them)

INSTRUCTIONS = {  # kind -> form; an instruction names its object by colour and shape
    "recolour": "make the {colour} {shape} {colour}",
    "reshape": "turn the {colour} {shape} into a {shape}",
    "background": "make the background {colour}",
    "remove": "remove the {colour} {shape}",
}


@dataclass(frozen=True)
class Instruction:
    kind: str                # one of INSTRUCTIONS
    target: Obj | None       # the object it names (None: the background)
    value: str | None        # the new colour (recolour, background) or shape (reshape)

    @property
    def text(self) -> str:
        slots = [*(() if self.target is None else (self.target.colour, self.target.shape)),
                 *(() if self.value is None else (self.value,))]
        return INSTRUCTIONS[self.kind].replace("{colour}", "{}").replace("{shape}", "{}").format(*slots)


def parse_instruction(text: str) -> Instruction:
    """Instruction text -> Instruction. Case and extra whitespace are normalised."""
    if not isinstance(text, str):
        raise ValueError(f"instruction must be a string, got {type(text).__name__}. "
                         f"{_grammar_help(INSTRUCTIONS.values())}")
    words = text.lower().split()
    for kind, form in INSTRUCTIONS.items():
        slots = _slots(words, form)
        if slots is not None:
            target = None if kind == "background" else Obj(*slots[:2])
            return Instruction(kind, target, None if kind == "remove" else slots[-1])
    raise ValueError(f"instruction {text!r} is not in the shapes world's edit grammar. "
                     f"{_grammar_help(INSTRUCTIONS.values())}")


def apply(scene: Scene, instruction: Instruction) -> Scene:
    """The scene an instruction makes of `scene`: the same objects in the same places (rendered
    with the source's boxes), one thing changed. An instruction that does not apply (its object
    is not in the scene, nothing would change, or a colour would repeat) is a ValueError."""
    i, caption = instruction, scene.caption
    if i.kind == "background":
        if i.value == scene.background or i.value in {o.colour for o in scene.objects}:
            raise ValueError(f"{i.text!r} does not apply to {caption!r}: the background must change "
                             "to a colour no object has")
        return Scene(i.value, scene.objects, scene.relation)
    if i.target not in scene.objects:
        raise ValueError(f"{i.text!r} does not apply to {caption!r}: it has no "
                         f"{i.target.colour} {i.target.shape}")
    k = scene.objects.index(i.target)
    if i.kind == "remove":
        if len(scene.objects) < 2:
            raise ValueError(f"{i.text!r} does not apply to {caption!r}: removing its only object "
                             "leaves no caption; remove one of two")
        return Scene(scene.background, scene.objects[1 - k:2 - k])
    if i.kind == "reshape":
        if i.value == i.target.shape:
            raise ValueError(f"{i.text!r} does not apply to {caption!r}: it is a {i.value} already")
        new = Obj(i.target.colour, i.value)
    else:  # recolour
        if i.value in {scene.background, *(o.colour for o in scene.objects)}:
            raise ValueError(f"{i.text!r} does not apply to {caption!r}: {i.value} is taken; the new "
                             "colour must differ from the background and every object")
        new = Obj(i.value, i.target.shape)
    return Scene(scene.background, scene.objects[:k] + (new,) + scene.objects[k + 1:], scene.relation)


def random_instruction(scene: Scene, rng) -> Instruction:
    """An instruction that applies to `scene`: a kind (remove only with two objects), then the
    object and the new value, each uniform among those that apply."""
    rng = np.random.default_rng(rng)
    kinds = [k for k in INSTRUCTIONS if k != "remove" or len(scene.objects) == 2]
    kind = kinds[rng.integers(len(kinds))]
    taken = {scene.background, *(o.colour for o in scene.objects)}
    free = [c for c in PALETTE if c not in taken]
    if kind == "background":
        return Instruction(kind, None, free[rng.integers(len(free))])
    target = scene.objects[rng.integers(len(scene.objects))]
    if kind == "remove":
        return Instruction(kind, target, None)
    if kind == "reshape":
        other = [s for s in SHAPES if s != target.shape]
        return Instruction(kind, target, other[rng.integers(len(other))])
    return Instruction(kind, target, free[rng.integers(len(free))])

# -----------------------------------------------------------------------------
# renderer


def _check_canvas(width, height):
    integers = all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in (width, height))
    if not integers or min(width, height) < MIN_CANVAS:
        raise ValueError(f"image size {width}x{height} is too small or not integer: the shapes world "
                         f"needs integer width and height of at least {MIN_CANVAS} pixels")


def _in_a_row(sides, length, gap, rng):
    """Positions of two boxes one after the other along an axis of `length` pixels."""
    free = length - sides[0] - sides[1] - gap
    if free < 0:  # cannot happen for canvases >= MIN_CANVAS, kept as a guard
        raise ValueError(f"no room for two objects of {sides} pixels in {length} pixels")
    a, b = sorted(int(v) for v in rng.integers(0, free + 1, size=2))  # split the free space in three
    return a, a + sides[0] + gap + (b - a)


def _aligned(sides, length, rng):
    """Positions of two boxes across the relation axis: centres at most min(side)/2 apart, so the
    boxes overlap in this direction and the relation axis clearly dominates."""
    first = int(rng.integers(0, length - sides[0] + 1))
    centre, reach = first + sides[0] / 2, min(sides) / 2
    lo = max(0, math.ceil(centre - reach - sides[1] / 2))
    hi = min(length - sides[1], math.floor(centre + reach - sides[1] / 2))
    return first, int(rng.integers(lo, hi + 1))


def layout(scene: Scene, width: int, height: int, rng) -> list:
    """Boxes (x, y, side) in pixels, top-left corner, one per object in caption order."""
    _check_canvas(width, height)
    rng = np.random.default_rng(rng)
    short = min(width, height)
    sides = [int(rng.integers(math.ceil(MIN_SIDE * short), math.floor(MAX_SIDE * short) + 1))
             for _ in scene.objects]
    if len(sides) == 1:
        side = sides[0]
        return [(int(rng.integers(0, width - side + 1)), int(rng.integers(0, height - side + 1)), side)]
    gap = max(1, round(GAP * short))
    if scene.relation == "to the left of":
        xs, ys = _in_a_row(sides, width, gap, rng), _aligned(sides, height, rng)
    else:  # "above"
        ys, xs = _in_a_row(sides, height, gap, rng), _aligned(sides, width, rng)
    return [(x, y, s) for x, y, s in zip(xs, ys, sides)]


def shape_mask(shape: str, side: int) -> np.ndarray:
    """Hard-edged boolean mask [side, side] of a shape filling its box (pixel centres tested)."""
    centres = np.arange(side) + 0.5
    y, x, half = centres[:, None], centres[None, :], side / 2
    if shape == "square":
        return np.ones((side, side), dtype=bool)
    if shape == "circle":
        return (x - half) ** 2 + (y - half) ** 2 <= half ** 2
    if shape == "triangle":  # apex at top centre, half-width grows linearly to side/2 at the base
        return np.abs(x - half) <= y / 2
    raise ValueError(f"unknown shape {shape!r}; shapes: {', '.join(SHAPES)}")


def draw(scene: Scene, boxes, width: int, height: int) -> torch.Tensor:
    """A scene with its objects in the given boxes (layout's (x, y, side), one per object):
    float tensor [3, H, W] in [-1, 1], every pixel a pure palette colour."""
    canvas = np.empty((height, width, 3), dtype=np.uint8)  # [H, W, 3]
    canvas[:] = PALETTE[scene.background]
    for obj, (x, y, side) in zip(scene.objects, boxes):
        canvas[y:y + side, x:x + side][shape_mask(obj.shape, side)] = PALETTE[obj.colour]
    return torch.from_numpy(canvas).permute(2, 0, 1).float() / 127.5 - 1  # [3, H, W]


def render(caption: str, width: int, height: int, rng) -> torch.Tensor:
    """Draw a caption: float tensor [3, H, W] in [-1, 1], every pixel a pure palette colour."""
    scene = parse_caption(caption)
    return draw(scene, layout(scene, width, height, rng), width, height)  # layout checks the size


def render_batch(captions, width: int, height: int, seed: int = 0) -> torch.Tensor:
    """[B, 3, H, W]; image i uses seed + i, so it does not depend on the batch it is in."""
    images = [render(c, width, height, np.random.default_rng(seed + i)) for i, c in enumerate(captions)]
    return torch.stack(images)  # [B, 3, H, W]


def batches(batch_size: int, sizes=SIZES, seed: int = 0, start_step: int = 0, stride: int = 1):
    """Endless (images [B, 3, H, W], captions, (width, height)), one aspect bucket per batch.
    Step k is a pure function of (seed, k), so training resumes mid-stream with start_step=k,
    and n data workers can share the stream: worker i renders steps i, i + n, ... (stride=n)."""
    buckets = [tuple(s) for s in (sizes.values() if isinstance(sizes, dict) else sizes)]
    if batch_size < 1 or not buckets:
        raise ValueError(f"batches needs batch_size >= 1 and at least one (width, height) size, "
                         f"got batch_size={batch_size}, sizes={sizes!r}")
    for step in itertools.count(start_step, stride):
        rng = np.random.default_rng([seed, step])
        width, height = buckets[rng.integers(len(buckets))]
        captions = [random_caption(rng) for _ in range(batch_size)]
        images = torch.stack([render(c, width, height, rng) for c in captions])  # [B, 3, H, W]
        yield images, captions, (width, height)

# -----------------------------------------------------------------------------
# text encoder

VOCAB = sorted({w for form in FORMS for w in form.split() if "{" not in w} | set(PALETTE) | set(SHAPES))
MAX_WORDS = max(len(form.split()) for form in FORMS)  # 14: the "to the left of" form
# the instructions' words that captions do not have, appended after VOCAB with their own draws so
# that no caption word's embedding changes (the shipped teachers' inputs stay bit-identical)
EDIT_WORDS = sorted({w for form in INSTRUCTIONS.values() for w in form.split() if "{" not in w} - set(VOCAB))


def sinusoidal_positions(length: int, dim: int) -> torch.Tensor:
    """Transformer position code [length, dim]: sin/cos pairs at geometric frequencies."""
    pos = torch.arange(length, dtype=torch.float32)[:, None]                   # [L, 1]
    freqs = torch.exp(-math.log(100.0) * torch.arange(0, dim, 2) / dim)        # [dim/2]
    return torch.cat([torch.sin(pos * freqs), torch.cos(pos * freqs)], dim=1)  # [L, dim]


class ShapesTextEncoder(nn.Module):
    """A frozen, deterministic text encoder for the shapes world (stands in for CLIP/T5).

    context[b, i] = word_embedding[word_i] + position_code[i] for the caption's words, zero after
    the end. Captions that differ only in word order ("a red circle to the left of a blue square"
    vs the swap) get different contexts because positions are added. pooled = a fixed random linear
    map of the whole flattened context (like a frozen projection head): it sees every word at its
    position, so it is order-aware too (a mean of word embeddings would not be). The map is
    precomputed as one pooled contribution per (position, word), so a prompt's pooled vector is a
    sum of table rows: exact, and independent of the batch it is in. The empty prompt is the
    unconditional input: zero context and zero pooled. All tables are non-persistent buffers made
    from `seed`, so nothing is trained or saved, and .to(device) moves them.
    """

    def __init__(self, dim: int = 64, pooled_dim: int = 64, seed: int = 0):
        super().__init__()
        if dim < 2 or dim % 2 or pooled_dim < 1:
            raise ValueError(f"ShapesTextEncoder needs an even dim >= 2 and pooled_dim >= 1, "
                             f"got dim={dim}, pooled_dim={pooled_dim}")
        self.context_dim, self.pooled_dim, self.max_length = dim, pooled_dim, MAX_WORDS
        self.word_index = {w: i for i, w in enumerate(VOCAB + EDIT_WORDS)}
        g = torch.Generator().manual_seed(seed)
        words = torch.randn(len(VOCAB), dim, generator=g)                                # [V, Dc]
        positions = sinusoidal_positions(MAX_WORDS, dim)                                 # [L, Dc]
        projection = torch.randn(MAX_WORDS, dim, pooled_dim, generator=g) / math.sqrt(MAX_WORDS * dim)
        edit_words = torch.randn(len(EDIT_WORDS), dim, generator=g)                      # [E, Dc], drawn last
        tables = [torch.einsum("lvc,lcp->lvp", w[None] + positions[:, None], projection)  # [L, V or E, Dp]
                  for w in (words, edit_words)]
        self.register_buffer("word_embedding", torch.cat([words, edit_words]), persistent=False)
        self.register_buffer("position_code", positions, persistent=False)
        self.register_buffer("pooled_table", torch.cat(tables, dim=1), persistent=False)

    @torch.no_grad()
    def encode(self, prompts):
        """prompts: list[str] -> (context [B, L, Dc], pooled [B, Dp]), float32 on this module's device."""
        if isinstance(prompts, str):
            raise ValueError(f"encode takes a list of prompts, got the string {prompts!r}; pass [prompt]")
        ids = torch.full((len(prompts), self.max_length), -1, dtype=torch.long)  # [B, L], -1 = padding
        for b, prompt in enumerate(prompts):
            empty = isinstance(prompt, str) and not prompt.strip()  # "" is the unconditional prompt
            words = [] if empty else prompt_words(prompt)
            ids[b, :len(words)] = torch.tensor([self.word_index[w] for w in words], dtype=torch.long)
        ids = ids.to(self.word_embedding.device)
        real = (ids >= 0).unsqueeze(-1)                                                       # [B, L, 1]
        context = (self.word_embedding[ids.clamp(min=0)] + self.position_code) * real         # [B, L, Dc]
        slots = torch.arange(self.max_length, device=ids.device)                              # [L]
        pooled = (self.pooled_table[slots, ids.clamp(min=0)] * real).sum(1)                   # [B, Dp]
        return context.float(), pooled.float()

    def forward(self, prompts):
        return self.encode(prompts)


def prompt_words(prompt: str) -> list:
    """A caption's or an edit instruction's words, normalised; anything else is a ValueError."""
    try:
        return parse_caption(prompt).caption.split()
    except ValueError as caption_error:
        try:
            return parse_instruction(prompt).text.split()
        except ValueError:
            raise ValueError(f"{caption_error}\n(or an edit instruction, for an editing model: "
                             f"{', '.join(repr(f) for f in INSTRUCTIONS.values())})") from None

# -----------------------------------------------------------------------------
# judge: score an image against its caption, no learned model


_NAMES = list(PALETTE)
_RGB = np.array([PALETTE[n] for n in _NAMES], dtype=np.float32)  # [8, 3]


def _to_rgb(image) -> np.ndarray:
    """[3, H, W] in [-1, 1] (torch or numpy) -> [H, W, 3] float32 on the 0..255 scale."""
    if isinstance(image, torch.Tensor):
        image = image.detach().float().cpu().numpy()
    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"judge expects one image [3, H, W] in [-1, 1], got shape {tuple(image.shape)}")
    return (np.clip(image, -1, 1).transpose(1, 2, 0) + 1) * 127.5


def classify_pixels(rgb: np.ndarray):
    """Nearest palette colour per pixel: (classes [H, W] with -1 = unknown, distance [H, W])."""
    dist = np.linalg.norm(rgb[:, :, None, :] - _RGB, axis=-1)  # [H, W, 8]
    nearest, closest = dist.argmin(-1), dist.min(-1)          # [H, W], [H, W]
    return np.where(closest <= MATCH_RADIUS, nearest, -1), closest


def border_colour(classes: np.ndarray) -> int:
    """Most frequent known colour on the image border (-1 if none): the background."""
    border = np.concatenate([classes[0], classes[-1], classes[1:-1, 0], classes[1:-1, -1]])
    border = border[border >= 0]
    return int(np.bincount(border, minlength=len(_NAMES)).argmax()) if border.size else -1


def connected_components(classes: np.ndarray, background: int) -> np.ndarray:
    """4-connected regions of one known, non-background colour, by min-label propagation: every pixel
    starts with its own flat index and repeatedly takes the smallest label of a same-colour
    neighbour. Returns labels [H, W] (-1 outside objects); a label is a pixel of its region."""
    h, w = classes.shape
    fg = (classes >= 0) & (classes != background)
    labels = np.where(fg, np.arange(h * w).reshape(h, w), h * w)
    join_v = fg[1:] & fg[:-1] & (classes[1:] == classes[:-1])        # [H-1, W] pixel joins the one above
    join_h = fg[:, 1:] & fg[:, :-1] & (classes[:, 1:] == classes[:, :-1])  # [H, W-1] ... the one to the left
    while True:
        old = labels.copy()
        labels[1:] = np.where(join_v, np.minimum(labels[1:], labels[:-1]), labels[1:])
        labels[:-1] = np.where(join_v, np.minimum(labels[:-1], labels[1:]), labels[:-1])
        labels[:, 1:] = np.where(join_h, np.minimum(labels[:, 1:], labels[:, :-1]), labels[:, 1:])
        labels[:, :-1] = np.where(join_h, np.minimum(labels[:, :-1], labels[:, 1:]), labels[:, :-1])
        if np.array_equal(old, labels):
            return np.where(fg, labels, -1)


def _core(labels: np.ndarray) -> np.ndarray:
    """Region pixels whose 4 neighbours (inside the image) are in the same region: one erosion, which
    removes the 1-2 pixel fringes that blur leaves where two colours mix into a third."""
    core = labels >= 0
    core[1:] &= labels[1:] == labels[:-1]
    core[:-1] &= labels[:-1] == labels[1:]
    core[:, 1:] &= labels[:, 1:] == labels[:, :-1]
    core[:, :-1] &= labels[:, :-1] == labels[:, 1:]
    return core


def object_regions(labels: np.ndarray):
    """(ids, areas) of the regions that count as objects: big enough, and not a thin fringe."""
    ids, areas = np.unique(labels[labels >= 0], return_counts=True)
    core_ids, core_areas = np.unique(labels[_core(labels)], return_counts=True)
    cores = np.zeros_like(areas)
    cores[np.searchsorted(ids, core_ids)] = core_areas
    side = min(labels.shape)
    keep = (areas >= MIN_AREA * side ** 2) & (cores >= MIN_CORE * side ** 2)
    return ids[keep], areas[keep]


def classify_shape(mask: np.ndarray):
    """Nearest shape prototype in (fill, drop), or None when the region is not squarish."""
    ys, xs = np.nonzero(mask)
    h, w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    if not 1 / MAX_ASPECT <= w / h <= MAX_ASPECT:
        return None
    fill = len(ys) / (h * w)
    drop = (ys.mean() - ys.min() + 0.5) / h
    return min(SHAPE_PROTOTYPES, key=lambda s: math.dist((fill, drop), SHAPE_PROTOTYPES[s]))


def _relation_holds(first: np.ndarray, second: np.ndarray, relation: str) -> bool:
    """Centroid test; the relation's axis must dominate, so a diagonal pair is neither relation."""
    (y1, x1), (y2, x2) = np.argwhere(first).mean(0), np.argwhere(second).mean(0)
    dx, dy = x2 - x1, y2 - y1
    return bool(dx > abs(dy)) if relation == "to the left of" else bool(dy > abs(dx))


def judge(image, caption: str) -> dict:
    """Score one image against its caption. Keys: background, colors (each object colour present as
    an object), shapes (each object's shape), relation (vacuously True for one-object captions),
    count (exactly the caption's number of objects, specks ignored), all_correct, purity (share of
    pixels within PURE_RADIUS of a palette colour). Each caption object is matched to the largest
    region of its colour."""
    scene = parse_caption(caption)
    rgb = _to_rgb(image)                                   # [H, W, 3]
    classes, dist = classify_pixels(rgb)                   # [H, W], [H, W]
    background = border_colour(classes)
    labels = connected_components(classes, background)     # [H, W]
    ids, areas = object_regions(labels)
    colour_of = classes.flat[ids]                          # a label is a pixel of its own region
    regions = []
    for obj in scene.objects:
        mine = colour_of == _NAMES.index(obj.colour)
        regions.append(labels == ids[mine][areas[mine].argmax()] if mine.any() else None)
    colors = all(r is not None for r in regions)
    shapes = all(r is not None and classify_shape(r) == o.shape for r, o in zip(regions, scene.objects))
    relation = len(regions) == 1 or (colors and _relation_holds(regions[0], regions[1], scene.relation))
    result = dict(background=background == _NAMES.index(scene.background), colors=colors, shapes=shapes,
                  relation=relation, count=len(ids) == len(scene.objects))
    result["all_correct"] = all(result.values())
    result["purity"] = float((dist <= PURE_RADIUS).mean())
    return result


def judge_batch(images, captions) -> dict:
    """Mean of every judge key over a batch [B, 3, H, W] with B captions (floats in [0, 1])."""
    if len(images) != len(captions):
        raise ValueError(f"judge_batch got {len(images)} images but {len(captions)} captions; "
                         "pass one caption per image")
    scores = [judge(image, caption) for image, caption in zip(images, captions)]
    return {k: float(np.mean([s[k] for s in scores])) for k in scores[0]} if scores else {}
