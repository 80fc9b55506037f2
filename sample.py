"""
Text-to-image (and img2img) from a teacher or a student checkpoint.

    python sample.py --ckpt runs/teacher --prompt "a red circle on a blue background"
    python sample.py --ckpt runs/student --steps 1 --prompt prompts.txt --out samples/student
    python sample.py --ckpt runs/teacher --init-image in.png --strength 0.6 --prompt "..."
    python sample.py --ckpt sd3_medium.safetensors --cond cond.safetensors   # precomputed text

Writes one PNG per prompt ({i:03d}.png), grid.png, prompts.txt and the resolved config.json into
--out, and with --trajectory a trajectory.png (a row per sample: its x0 estimate at every step).

A checkpoint describes itself in its safetensors metadata (written by train_teacher.py and
train_ladd.py): the MMDiT config, the text encoder and VAE that go with it ("text_encoder",
"vae"), its sampling defaults ("sampler") and the sizes it was trained at ("sizes").
`load_pipeline` turns that into a Pipeline and `generate` turns prompts into images; both are
reused by train_ladd.py, evaluate.py and inpaint.py, as are the image helpers at the bottom
(to_pil, load_image, save_grid, save_strip).
"""

import argparse
import dataclasses
import difflib
import inspect
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field

import torch
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

import flow
import shapes
import text_encoders
import weights
from mmdit import MMDiT
from vae import VAE


@dataclass
class SampleConfig:
    ckpt: str                        # a checkpoint file, or a run folder with model.safetensors
    prompt: list = field(default_factory=list)  # a prompt (repeat for more) or a .txt, one a line
    steps: int = None                # sampling steps; None: the checkpoint's (a student: its times)
    cfg: float = None                # guidance scale, 1 = unguided; None: the checkpoint's
    shift: float = None              # SD3 schedule shift (not for a student's times); None: ckpt's
    sampler: str = None              # euler | renoise; None: the checkpoint's
    width: int = None                # pixels; None: the init image's, else the checkpoint's first
    height: int = None               # pixels; None: as for width
    seed: int = 0                    # image i starts from the noise of seed + i, any batch size
    batch_size: int = 8              # images per model pass
    init_image: str = None           # img2img: start from this image instead of pure noise
    strength: float = None           # img2img: share of the steps run (0 = keep input); None: 0.6
    out: str = "samples"             # folder for 000.png ..., grid.png, prompts.txt, config.json
    trajectory: bool = False         # also trajectory.png: each sample's x0 estimate at every step
    cond: str = None                 # context, pooled (uncond_*) file or shard folder, not prompts
    device: str = "auto"             # auto (cuda, then mps, then cpu) | cpu | cuda | cuda:N | mps
    dtype: str = "auto"              # auto (bf16 on CUDA, fp32 elsewhere) | fp32 | bf16 | fp16
    quiet: bool = False              # no progress bar and no messages


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CHOICES = {"sampler": flow.SAMPLERS, "dtype": ("auto", *DTYPES)}
DEFAULTS = {"steps": 28, "cfg": 7.0, "shift": 3.0, "sampler": "euler"}  # SD3's, when a file has no "sampler"
DEFAULT_SIZES = [[1024, 1024]]                                          # SD3's, when a file has no "sizes"
USER_ERRORS = (ValueError, OSError, NotImplementedError)  # reported as one line by main, no traceback


# ----------------------------------------------------------------------------------------------
# device and dtype, chosen once


def pick_device(name="auto"):
    """'auto': cuda, then mps, then cpu. Anything else must exist on this machine."""
    mps = getattr(torch.backends, "mps", None)
    has_mps = mps is not None and mps.is_available()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if has_mps else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine; use auto or cpu")
    if device.type == "mps" and not has_mps:
        raise ValueError(f"--device {name}: MPS is not available on this machine; use auto or cpu")
    return device


def pick_dtype(name, device):
    """'auto': bf16 on CUDA, fp32 elsewhere."""
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"--dtype {name!r} is not one of auto, {', '.join(DTYPES)}")
    return DTYPES[name]


# ----------------------------------------------------------------------------------------------
# the pipeline: MMDiT + text encoder + VAE + defaults, from one self-describing checkpoint


@dataclass
class Pipeline:
    model: MMDiT          # eval mode, frozen
    text_encoder: object  # .encode(prompts) -> (context [B, L, Dc], pooled [B, Dp])
    vae: VAE              # eval mode, frozen
    defaults: dict        # sampling defaults: steps, cfg, shift, sampler (and times for a student)
    sizes: list           # [(width, height), ...] the model was trained at; the first is the default
    path: str             # the MMDiT file (or diffusers folder)
    metadata: dict = field(default_factory=dict)  # the file's raw string metadata

    @property
    def device(self):
        return next(self.model.parameters()).device

    @property
    def dtype(self):
        return next(self.model.parameters()).dtype

    @property
    def granularity(self):
        """Width and height must be multiples of this many pixels."""
        return self.vae.config.factor * self.model.config.patch_size


@dataclass
class Conditioning:
    context: torch.Tensor         # [N, L, Dc]
    pooled: torch.Tensor          # [N, Dp]
    uncond_context: torch.Tensor  # [1, L, Dc], the empty prompt's (the CFG baseline)
    uncond_pooled: torch.Tensor   # [1, Dp]

    def __len__(self):
        return len(self.context)


class UnavailableTextEncoder:
    """Stands in for text encoders a checkpoint does not have; encode() says what to do."""

    def __init__(self, name, path):
        self.name, self.path = name, path

    def to(self, *args, **kwargs):
        return self

    def encode(self, prompts):
        if self.name == "sd3":
            raise NotImplementedError(
                f"{self.path}: holds no SD3 text encoders (no text_encoders.* tensors, no "
                "text_encoder/ folder, no 'file' in its 'text_encoder' metadata); precompute the "
                "conditioning with `python text_encoders.py --ckpt SD3_FILE_WITH_ENCODERS --prompts "
                "PROMPTS.txt --out cond/` and pass --cond cond/cond-00000.safetensors")
        raise NotImplementedError(
            f"{self.path}: wants the {self.name!r} text encoder, which is not implemented; pass "
            "--cond FILE instead, a safetensors with 'context' [N, L, Dc] and 'pooled' [N, Dp] "
            "(optionally 'uncond_context' [1, L, Dc] and 'uncond_pooled' [1, Dp]; zeros otherwise)")


def _meta_json(meta, key, path, default):
    if key not in meta:
        return default
    try:
        return json.loads(meta[key])
    except ValueError:
        raise ValueError(f"{path}: the {key!r} metadata is not valid JSON: {meta[key][:80]!r}") from None


def _checkpoint_file(ckpt):
    """A file stays a file; a run folder means <folder>/model.safetensors; a diffusers folder
    (with transformer/) is passed through whole."""
    ckpt = os.fspath(ckpt)
    if not os.path.isdir(ckpt):
        return ckpt
    inside = os.path.join(ckpt, "model.safetensors")
    if os.path.isfile(inside) or not os.path.isdir(os.path.join(ckpt, "transformer")):
        return inside  # a missing file gives weights' "no such file" error, naming it
    return ckpt


def _vae_file(path, meta):
    where = meta.get("vae", "self")
    if where != "self":
        file = os.path.join(os.path.dirname(os.path.abspath(path)), where)
        if not os.path.isfile(file):
            raise FileNotFoundError(f"{path}: its VAE should be at {file} (metadata vae={where!r}) "
                                    "but that file does not exist; put the VAE there")
        return file
    if os.path.isdir(path):  # diffusers folder: vae/ inside it
        return path
    if not any(k.startswith(weights.SD3_PREFIXES["vae"]) for k in weights.read_header(path)[0]):
        raise ValueError(f"{path}: no VAE: the file names none in its metadata ('vae') and holds no "
                         "first_stage_model.* tensors; save it with metadata vae=<VAE file name>")
    return path


def _text_encoder(path, meta, model):
    spec = _meta_json(meta, "text_encoder", path, {"name": "sd3"})
    name = spec.get("name") if isinstance(spec, dict) else None
    if name == "sd3":  # CLIP-L, CLIP-G (and T5-XXL) from the checkpoint or a file its metadata names
        encoder = text_encoders.for_checkpoint(path, spec, context_dim=model.config.context_dim)
        if encoder is not None and encoder.pooled_dim != model.config.pooled_dim:
            raise ValueError(f"{path}: its text encoders give pooled vectors of {encoder.pooled_dim} "
                             f"but the MMDiT takes {model.config.pooled_dim}")
        return encoder or UnavailableTextEncoder(name, path)
    if name != "shapes":
        return UnavailableTextEncoder(name, path)
    encoder = shapes.ShapesTextEncoder(dim=spec.get("dim", 64), pooled_dim=spec.get("pooled_dim", 64),
                                       seed=spec.get("seed", 0))
    got, want = (encoder.context_dim, encoder.pooled_dim), (model.config.context_dim, model.config.pooled_dim)
    if got != want:
        raise ValueError(f"{path}: its text encoder gives (context, pooled) widths {got} but the "
                         f"MMDiT takes {want}; the 'text_encoder' metadata is wrong")
    return encoder


def load_pipeline(ckpt, device="cpu", dtype=torch.float32):
    """Everything needed to sample from one checkpoint (see the module docstring for the
    metadata it reads). Model and VAE are in eval mode with requires_grad False."""
    path = _checkpoint_file(ckpt)
    model = MMDiT.from_pretrained(path, device, dtype)  # one-line error for a wrong or missing file
    meta = model.metadata
    vae = VAE.from_pretrained(_vae_file(path, meta), device, dtype)
    text_encoder = _text_encoder(path, meta, model).to(device)
    defaults = {**DEFAULTS, **_meta_json(meta, "sampler", path, {})}
    if "times" in defaults:  # a few-step student: its training times are its schedule
        defaults["times"] = flow.student_sigmas(defaults["times"])[:-1]
        defaults["steps"] = len(defaults["times"])
    sizes = _meta_json(meta, "sizes", path, DEFAULT_SIZES)
    if not sizes or not all(isinstance(s, list) and len(s) == 2 and all(type(v) is int for v in s)
                            for s in sizes):
        raise ValueError(f"{path}: the 'sizes' metadata must be a list of [width, height], got {sizes!r}")
    for m in (model, vae):
        m.eval().requires_grad_(False)
    return Pipeline(model, text_encoder, vae, defaults, [tuple(s) for s in sizes], path, dict(meta))


# ----------------------------------------------------------------------------------------------
# conditioning, schedule, sizes


def encode(pipe, prompts):
    """Prompts -> Conditioning, one encoder call; the empty prompt "" is the unconditional input."""
    if isinstance(prompts, str):
        raise ValueError(f"prompts must be a list of strings, got the single string {prompts!r}")
    context, pooled = pipe.text_encoder.encode(list(prompts) + [""])
    return Conditioning(context[:-1], pooled[:-1], context[-1:], pooled[-1:])


def load_cond(path):
    """A --cond file (or a folder of text_encoders.py shards) -> Conditioning. Tensors: context
    [N, L, Dc], pooled [N, Dp], and optionally uncond_context [1, L, Dc], uncond_pooled [1, Dp]
    (zeros when absent)."""
    t = text_encoders.read_shards(path)[1] if os.path.isdir(path) else weights.load_file(path)
    if "context" not in t or "pooled" not in t:
        raise ValueError(f"{path}: a --cond file needs tensors 'context' [N, L, Dc] and 'pooled' "
                         f"[N, Dp]; it has {sorted(t) or 'none'}")
    context, pooled = t["context"].float(), t["pooled"].float()
    uc = t.get("uncond_context", torch.zeros_like(context[:1])).float()
    up = t.get("uncond_pooled", torch.zeros_like(pooled[:1])).float()
    if (context.dim() != 3 or pooled.dim() != 2 or len(pooled) != len(context)
            or uc.shape != (1, *context.shape[1:]) or up.shape != (1, pooled.shape[1])):
        raise ValueError(f"{path}: --cond shapes do not fit together: context {list(context.shape)}, "
                         f"pooled {list(pooled.shape)}, uncond_context {list(uc.shape)}, uncond_pooled "
                         f"{list(up.shape)}; want [N, L, Dc], [N, Dp], [1, L, Dc], [1, Dp]")
    return Conditioning(context, pooled, uc, up)


def sampling_settings(pipe, steps=None, cfg=None, shift=None, sampler=None):
    """The checkpoint's defaults with any overrides -> {steps, shift, sigmas, cfg, sampler}. A student with
    "times" samples at those times; `steps` N then means N times evenly spaced from 1
    (1 -> [1], 2 -> [1, .5], 4 -> [1, .75, .5, .25]) and `shift` is not used."""
    d = pipe.defaults
    if steps is not None and (not isinstance(steps, int) or steps < 1):
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if "times" in d:
        times = d["times"] if steps is None else [1 - k / steps for k in range(steps)]
        sigmas, shift = flow.student_sigmas(times), None
    else:
        shift = d["shift"] if shift is None else shift
        sigmas = flow.sd3_sigmas(d["steps"] if steps is None else steps, shift)
    return {"steps": len(sigmas) - 1, "shift": shift, "sigmas": sigmas,
            "cfg": d["cfg"] if cfg is None else cfg, "sampler": d["sampler"] if sampler is None else sampler}


def check_size(pipe, width, height):
    """width x height must be multiples of the granularity and fit the positional grid."""
    g, f, p = pipe.granularity, pipe.vae.config.factor, pipe.model.config.patch_size
    biggest = g * pipe.model.config.pos_embed_max_size
    ok = lambda n: isinstance(n, int) and g <= n <= biggest and n % g == 0  # noqa: E731
    if ok(width) and ok(height):
        return
    clip = lambda n: min(max(g, n), biggest)  # noqa: E731
    near = lambda n: sorted({clip(int(n) // g * g), clip(-(-int(n) // g) * g)})  # noqa: E731
    sizes = " or ".join(f"{w}x{h}" for w in near(width) for h in near(height))
    raise ValueError(f"size {width}x{height} (width x height) does not fit this model: both must be "
                     f"multiples of {g} (VAE factor {f} x patch size {p}) from {g} to {biggest}; "
                     f"nearest valid sizes: {sizes}")


# ----------------------------------------------------------------------------------------------
# generation


def _velocity(model):
    """The model as flow.sample wants it: the latent state stays fp32, the model runs in its dtype."""
    dtype = next(model.parameters()).dtype

    def velocity(x, t, context, pooled):
        return model(x.to(dtype), t, context.to(dtype), pooled.to(dtype)).float()
    return velocity


def _decode(pipe, latents):
    return pipe.vae.decode(latents).float().cpu()  # [B, 3, H, W] in [-1, 1]


def _init_latents(pipe, image, n, width, height):
    """img2img start: one image [3, H, W] (or [1, 3, H, W]) for all, or one per prompt [N, 3, H, W]."""
    image = image[None] if image.dim() == 3 else image
    if image.dim() != 4 or image.shape[1] != 3 or len(image) not in (1, n):
        raise ValueError(f"init image must be [3, H, W] or [{n}, 3, H, W], got {list(image.shape)}")
    if tuple(image.shape[-2:]) != (height, width):
        raise ValueError(f"init image is {image.shape[-1]}x{image.shape[-2]} but the sample size is "
                         f"{width}x{height}; resize it (load_image(path, width, height))")
    latents = pipe.vae.encode(image.to(pipe.device)).float()  # [1 or N, z, h, w]
    return latents.expand(n, -1, -1, -1)


@torch.no_grad()
def generate(pipe, prompts, width, height, steps=None, cfg=None, shift=None, sampler=None, seed=0,
             batch_size=8, init_image=None, strength=1.0, progress=True, trajectory=False,
             decode=True):
    """prompts (list of str, or a Conditioning) -> images [N, 3, H, W] in [-1, 1] on the CPU, and
    with trajectory=True also the decoded x0 estimate after every step, a list of [N, 3, H, W].
    decode=False returns the final latents [N, z, h, w] (fp32, CPU) instead of images.

    Image i starts from the noise of seed + i, so it does not depend on batch_size. steps, cfg,
    shift, sampler: None means the checkpoint's default. img2img: init_image [3, H, W] in
    [-1, 1] is encoded and noised to the first kept step; strength is the share of steps run
    (0 returns the VAE round trip of the input)."""
    check_size(pipe, width, height)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch size must be an integer >= 1, got {batch_size!r}")
    c = pipe.model.config
    if c.in_channels != c.out_channels:
        raise ValueError(f"{pipe.path} is an inpainting model ({c.in_channels} input channels: "
                         "latent, mask, known latent); use inpaint.py with an image and a mask")
    cond = prompts if isinstance(prompts, Conditioning) else encode(pipe, prompts)
    got = (cond.context.shape[-1], cond.pooled.shape[-1])
    want = (pipe.model.config.context_dim, pipe.model.config.pooled_dim)
    if got != want:
        raise ValueError(f"conditioning has (context, pooled) widths {got} but the model takes {want}")
    s = sampling_settings(pipe, steps, cfg, shift, sampler)
    sigmas, n = s["sigmas"], len(cond)
    if n == 0:
        raise ValueError("no prompts to sample")
    x_init = None
    if init_image is not None:
        x_init = _init_latents(pipe, init_image, n, width, height)  # [N, z, h, w]
        sigmas = flow.img2img_sigmas(sigmas, strength)
    elif strength != 1.0:
        raise ValueError(f"strength {strength} needs an init image (img2img)")

    device, f = pipe.device, pipe.vae.config.factor
    latent_shape = (pipe.vae.config.z_channels, height // f, width // f)
    velocity = _velocity(pipe.model)
    images, frames = [], [[] for _ in sigmas[:-1]]  # frames[step]: decoded x0 estimates
    with tqdm(total=math.ceil(n / batch_size) * (len(sigmas) - 1), desc="sampling", unit="step",
              disable=not progress) as bar:

        def after_step(i, x0_hat):
            bar.update()
            if trajectory:
                frames[i].append(_decode(pipe, x0_hat))

        for start in range(0, n, batch_size):
            rows = slice(start, min(start + batch_size, n))
            seeds = [seed + i for i in range(rows.start, rows.stop)]
            b = len(seeds)
            latents = flow.sample(
                velocity, flow.seeded_noise(seeds, latent_shape, device), sigmas,  # [b, z, h, w]
                cond.context[rows].to(device), cond.pooled[rows].to(device),       # [b, L, Dc], [b, Dp]
                cond.uncond_context.to(device).expand(b, -1, -1),                  # [b, L, Dc]
                cond.uncond_pooled.to(device).expand(b, -1),                       # [b, Dp]
                cfg=s["cfg"], sampler=s["sampler"], seeds=seeds,
                x_init=None if x_init is None else x_init[rows], callback=after_step)
            images.append(_decode(pipe, latents) if decode else latents.float().cpu())
    images = torch.cat(images)                                      # [N, 3, H, W] or [N, z, h, w]
    return (images, [torch.cat(step) for step in frames]) if trajectory else images


# ----------------------------------------------------------------------------------------------
# images: tensors in [-1, 1] <-> PIL, grids, atomic PNG writes


def to_pil(img):
    """[3, H, W] in [-1, 1] -> an RGB PIL image."""
    if not torch.is_tensor(img) or img.dim() != 3 or img.shape[0] != 3:
        raise ValueError(f"to_pil wants one image [3, H, W], got "
                         f"{list(img.shape) if torch.is_tensor(img) else type(img).__name__}")
    arr = ((img.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return Image.fromarray(arr.permute(1, 2, 0).cpu().numpy())


def load_image(path, width=None, height=None):
    """An image file -> [3, H, W] in [-1, 1], resized to width x height when given (one of them
    alone keeps the aspect ratio)."""
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such image file") from None
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read it as an image ({e}); pass a PNG or JPEG file") from None
    if width or height:
        width = width or round(im.width * height / im.height)
        height = height or round(im.height * width / im.width)
        if (width, height) != im.size:
            im = im.resize((width, height), Image.LANCZOS)
    arr = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(im.height, im.width, 3)
    return arr.permute(2, 0, 1).float() / 127.5 - 1  # [3, H, W]


def save_png(image, path):
    """One image ([3, H, W] in [-1, 1], or PIL) -> a PNG file, atomically."""
    im = image if isinstance(image, Image.Image) else to_pil(image)
    weights.atomic_write(path, lambda f: im.save(f, format="PNG"))


def _compose(rows, pad=2, labels=None):
    """Rows of images (tensors or PIL, any sizes) -> one PIL canvas; each cell as large as the
    largest image, images centred, an optional text label left of each row."""
    rows = [[im if isinstance(im, Image.Image) else to_pil(im) for im in row] for row in rows]
    if not rows or not any(rows):
        raise ValueError("nothing to draw: no images")
    cw = max(im.width for row in rows for im in row)
    ch = max(im.height for row in rows for im in row)
    font = ImageFont.load_default(size=11)  # a scalable font: the bitmap default drops spaces
    lw = pad + max(math.ceil(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(str(s), font=font))
                   for s in labels) if labels else 0
    canvas = Image.new("RGB", (lw + pad + max(map(len, rows)) * (cw + pad), pad + len(rows) * (ch + pad)),
                       (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for r, row in enumerate(rows):
        y = pad + r * (ch + pad)
        for c, im in enumerate(row):
            canvas.paste(im, (lw + pad + c * (cw + pad) + (cw - im.width) // 2, y + (ch - im.height) // 2))
        if labels:
            draw.text((pad, y), str(labels[r]), fill=(0, 0, 0), font=font)
    return canvas


def save_grid(images, path, nrow=None, pad=2):
    """Images (a list, possibly of mixed sizes, or a tensor [N, 3, H, W]) -> one PNG, `nrow`
    images per row (default: a square-ish grid), `pad` white pixels between them."""
    images = list(images)
    nrow = nrow or max(1, math.ceil(math.sqrt(len(images))))
    save_png(_compose([images[i:i + nrow] for i in range(0, len(images), nrow)], pad), path)


def save_strip(rows, path, labels=None, pad=2):
    """Rows of images (e.g. one sample's trajectory per row) -> one PNG, optional row labels."""
    if labels is not None and len(labels) != len(rows):
        raise ValueError(f"save_strip got {len(labels)} labels for {len(rows)} rows")
    save_png(_compose([list(r) for r in rows], pad, labels), path)


# ----------------------------------------------------------------------------------------------
# command line: generated from SampleConfig


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not the usage block
        self.exit(2, f"error: {message} (see --help)\n")


def _field_help(cls):
    """Field name -> its comment in the class source: the --help text."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    return dict(re.findall(r"^\s+(\w+):[^#\n]*#\s*(.+)$", source, re.M))


def parse_config(cls, argv, prog, doc, choices=None, item_types=None):
    """A script's CLI, generated from its config dataclass: one --option per field with the
    field's comment as help; list fields repeat (items of type item_types[name], default str).
    Unknown or abbreviated options are a one-line error with a suggestion, exit code 2."""
    parser = _Parser(prog=prog, description=" ".join(doc.split("\n\n")[0].split()),
                     allow_abbrev=False)
    helps, choices, item_types = _field_help(cls), choices or {}, item_types or {}
    for f in dataclasses.fields(cls):
        kw = {"help": helps.get(f.name, "")}
        if f.type is bool:
            kw["action"] = "store_true"
        elif f.type is list:
            kw.update(action="append", default=[], type=item_types.get(f.name, str),
                      choices=choices.get(f.name))
        else:
            kw.update(type=f.type, choices=choices.get(f.name))
            if f.default is dataclasses.MISSING:
                kw["required"] = True
            else:
                kw["default"] = f.default
        parser.add_argument("--" + f.name.replace("_", "-"), **kw)
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        flag = unknown[0].split("=")[0]
        if not flag.startswith("-"):
            hint = "; prompts go after --prompt" if "prompt" in vars(args) else ""
            parser.error(f"unexpected argument {flag!r}{hint}")
        options = [o for a in parser._actions for o in a.option_strings]
        close = difflib.get_close_matches(flag, options, n=1)
        parser.error(f"unknown option {flag}" + (f"; did you mean {close[0]}?" if close else ""))
    return cls(**vars(args))


def parse_args(argv=None):
    """argv -> SampleConfig."""
    return parse_config(SampleConfig, argv, "sample.py", __doc__, CHOICES)


def read_prompts(items):
    """--prompt values -> prompts; a value ending in .txt is a file with one prompt per line."""
    prompts = []
    for item in items:
        if not item.endswith(".txt"):
            prompts.append(item)
            continue
        try:
            with open(item, encoding="utf-8") as f:
                prompts += [line.strip() for line in f if line.strip()]
        except OSError as e:
            raise ValueError(f"--prompt {item}: cannot read the prompt file ({e.strerror})") from None
    return prompts


def run(c):
    """Sample as SampleConfig `c` says and write the files; returns the output paths."""
    prompts = read_prompts(c.prompt)
    if c.cond and prompts:
        raise ValueError("--cond replaces --prompt; pass one or the other")
    if not c.cond and not prompts:
        raise ValueError('no prompts: pass --prompt "a red circle on a blue background" '
                         "(repeat it for more) or --prompt FILE.txt")
    if c.strength is not None and not c.init_image:
        raise ValueError("--strength needs --init-image (it is the share of img2img steps run)")
    if os.path.exists(c.out) and not os.path.isdir(c.out):
        raise ValueError(f"--out {c.out} is a file; pass a folder for the images")
    device = pick_device(c.device)
    dtype = pick_dtype(c.dtype, device)
    pipe = load_pipeline(c.ckpt, device, dtype)
    init = load_image(c.init_image) if c.init_image else None
    width = c.width or (init.shape[2] if init is not None else pipe.sizes[0][0])
    height = c.height or (init.shape[1] if init is not None else pipe.sizes[0][1])
    check_size(pipe, width, height)
    if init is not None and tuple(init.shape[1:]) != (height, width):
        init = load_image(c.init_image, width, height)
    strength = (0.6 if c.strength is None else c.strength) if init is not None else 1.0
    cond = load_cond(c.cond) if c.cond else prompts
    out = generate(pipe, cond, width, height, steps=c.steps, cfg=c.cfg, shift=c.shift, sampler=c.sampler,
                   seed=c.seed, batch_size=c.batch_size, init_image=init, strength=strength,
                   progress=not c.quiet, trajectory=c.trajectory)
    images, frames = out if c.trajectory else (out, None)

    paths = [os.path.join(c.out, f"{i:03d}.png") for i in range(len(images))]
    for image, path in zip(images, paths):
        save_png(image, path)
    paths.append(os.path.join(c.out, "grid.png"))
    save_grid(images, paths[-1])
    if frames:  # one row per sample: its x0 estimate after each step
        paths.append(os.path.join(c.out, "trajectory.png"))
        save_strip([[f[i] for f in frames] for i in range(len(images))], paths[-1])
    labels = prompts or [f"cond {i}" for i in range(len(images))]
    weights.atomic_write(os.path.join(c.out, "prompts.txt"), lambda f: f.write(
        "".join(f"{i:03d}.png\t{p}\n" for i, p in enumerate(labels)).encode()))
    s = sampling_settings(pipe, c.steps, c.cfg, c.shift, c.sampler)
    if init is not None:  # the sigmas actually run
        s["sigmas"] = flow.img2img_sigmas(s["sigmas"], strength)
    resolved = {**dataclasses.asdict(c), **s, "width": width, "height": height, "strength": strength,
                "device": str(device), "dtype": str(dtype).removeprefix("torch.")}
    weights.atomic_write(os.path.join(c.out, "config.json"),
                  lambda f: f.write(json.dumps(resolved, indent=2).encode()))
    if not c.quiet:
        names = ", ".join(["000.png" + (f" ... {len(images) - 1:03d}.png" if len(images) > 1 else ""),
                           "grid.png", *(["trajectory.png"] if frames else []), "prompts.txt", "config.json"])
        print(f"wrote {len(images)} image(s) of {width}x{height} to {c.out}/: {names}")
    return paths


def one_line(message):
    """A multi-line error message -> one line (list items joined by '; ')."""
    message = re.sub(r":\s*\n\s*", ": ", str(message).strip())
    return re.sub(r"\s*\n\s*", "; ", message)


def run_cli(parse, run, argv=None):
    """A script's main: parse (argparse exits 2 with one line for a bad flag), run, and report
    a problem with the user's input as one line `error: ...` with exit code 2."""
    config = parse(argv)
    try:
        return run(config)
    except USER_ERRORS as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        raise SystemExit(2) from None


def main(argv=None):
    run_cli(parse_args, run, argv)


if __name__ == "__main__":
    main()
