"""
A checkpoint as a pipeline: the MMDiT, its text encoder and VAE, its sampling defaults and
sizes, loaded from one self-describing file; prompts in, latents or images out.

A checkpoint describes itself in its safetensors metadata (written by train_teacher.py and
train_ladd.py): the MMDiT config, the text encoder and VAE that go with it ("text_encoder",
"vae"), its sampling defaults ("sampler") and the sizes it was trained at ("sizes").
`load_pipeline` turns that into a Pipeline and `generate` turns prompts into images, for a
guided many-step teacher and a few-step student alike (the schedule is in the file).
"""

import json
import math
import os
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

import flow
import lora
import shapes
import text_encoders
import weights
from mmdit import MMDiT
from vae import VAE

DEFAULTS = {"steps": 28, "cfg": 7.0, "shift": 3.0, "sampler": "euler"}  # SD3's, when a file has no "sampler"
DEFAULT_SIZES = [[1024, 1024]]                                          # SD3's, when a file has no "sizes"


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
    if os.path.isfile(inside) or os.path.isdir(os.path.join(ckpt, "transformer")):
        return inside if os.path.isfile(inside) else ckpt
    if text_encoders._is_diffusers(ckpt) or os.path.isfile(os.path.join(ckpt, "model_index.json")):
        raise FileNotFoundError(f"{ckpt}: a diffusers folder without transformer/ (the MMDiT); put "
                                "the release's transformer/ back, or pass a run folder or an SD3 file")
    return inside  # a missing file gives weights' "no such file" error, naming it


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


class MissingTextEncoder(UnavailableTextEncoder):
    """Stands in for SD3 text encoders that could not be loaded (moved, or a folder without T5):
    a checkpoint sampled from --cond needs none, encode() raises the reason, one line."""

    def __init__(self, error):
        self.error = error

    def encode(self, prompts):
        raise self.error


def _text_encoder(path, meta, model, text_encoder_path=None, no_t5=False):
    spec = _meta_json(meta, "text_encoder", path, {"name": "sd3"})
    name = spec.get("name") if isinstance(spec, dict) else None
    if name == "sd3" and text_encoder_path:  # --text-encoders: the given file or folder instead
        spec = {"name": "sd3", "file": os.path.abspath(text_encoder_path), "given": True}
    if name == "sd3" and no_t5:
        spec = {**spec, "t5": False}
    if name == "sd3":  # CLIP-L, CLIP-G (and T5-XXL) from the checkpoint or a file its metadata names
        try:
            encoder = text_encoders.for_checkpoint(path, spec, context_dim=model.config.context_dim)
        except (FileNotFoundError, text_encoders.MissingT5Error) as e:
            if spec.get("given"):
                raise
            return MissingTextEncoder(type(e)(*e.args))
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


ENCODER_PATHS = ("file", "t5_vocab", "clip_vocab")  # the paths an SD3 text_encoder spec holds


def text_encoder_spec(pipe, out=None):
    """The pipeline's text encoder as metadata for a checkpoint derived from it (a student in
    another folder): the shapes encoder as it is; SD3 encoders by the absolute paths of the
    files that hold them and, with `out` (the folder the checkpoint goes to), the same paths
    relative to it under "relative": a run folder moved together with its teacher (another
    machine, another root) finds them there, one moved alone by the absolute paths."""
    spec = json.loads(pipe.metadata.get("text_encoder", '{"name": "sd3"}'))
    if spec.get("name") != "sd3" or isinstance(pipe.text_encoder, UnavailableTextEncoder):
        return spec
    spec.pop("relative", None)
    path = os.path.abspath(pipe.path)
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    for key in ENCODER_PATHS:
        if spec.get(key):
            spec[key] = os.path.join(folder, spec[key])
    spec = {**spec, "file": spec.get("file", path)}
    if out is not None:
        here = os.path.abspath(out)
        try:
            spec["relative"] = {k: os.path.relpath(spec[k], here) for k in ENCODER_PATHS if spec.get(k)}
        except ValueError:  # another drive (Windows): no relative path exists
            pass
    return spec


def _check_model_file(path):
    """A file of this project that holds no model (a run's training state, LoRA adapters) is
    named as what it is, with the file to pass instead."""
    if not os.path.isfile(path):
        return
    kind = weights.load_metadata(path).get("kind")
    folder = os.path.dirname(path) or "."
    if kind == "training_state":
        raise ValueError(f"{path} is a training state file (what --resume reads), not a model; "
                         f"pass the run folder {folder} or its model.safetensors")
    if kind == "lora":
        raise ValueError(f"{path} is a LoRA adapter file, not a model; pass the run folder "
                         f"{folder} (the adapters merged) or --ckpt BASE --lora {path}")


def adapter_file(adapters):
    """--lora: an adapter file, or a LoRA run folder (its adapters.safetensors)."""
    adapters = os.fspath(adapters)
    return os.path.join(adapters, "adapters.safetensors") if os.path.isdir(adapters) else adapters


def _check_adapter_file(adapters):
    if os.path.isfile(adapter_file(adapters)):
        return
    if os.path.isdir(adapters):
        raise FileNotFoundError(f"--lora {adapters}: no adapters.safetensors in this folder; pass a "
                                "train_ladd.py --lora run folder or an adapter file")
    raise FileNotFoundError(f"--lora {adapters}: no such file; pass LoRA adapters (a train_ladd.py "
                            "--lora run folder, or its adapters.safetensors)")


def _diffusers_defaults(path, vae):
    """A diffusers folder's own sampling facts: its default size (transformer/config.json's
    sample_size x the VAE factor, as diffusers' pipeline) and the scheduler's shift
    (scheduler/scheduler_config.json) -> ({"shift": ...} or {}, [[w, h]] or None)."""
    if not os.path.isdir(path):
        return {}, None
    config, _ = weights.diffusers_config(path, "transformer", ("sample_size",))
    n = config.get("sample_size")
    sizes = [[n * vae.config.factor] * 2] if isinstance(n, int) and n > 0 else None
    sched = os.path.join(path, "scheduler", "scheduler_config.json")
    defaults = {}
    if os.path.isfile(sched):
        try:
            with open(sched) as f:
                shift = json.load(f).get("shift")
        except (ValueError, AttributeError):
            raise ValueError(f"{sched}: not a JSON object; fix it or delete it") from None
        if shift is not None:
            defaults["shift"] = float(shift)
    return defaults, sizes


def load_pipeline(ckpt, device="cpu", dtype=torch.float32, adapters=None, text_encoders_path=None,
                  no_t5=False):
    """Everything needed to sample from one checkpoint (see the module docstring for the
    metadata it reads). Model and VAE are in eval mode with requires_grad False. adapters: a LoRA
    adapter file or run folder (train_ladd.py --lora) merged into the checkpoint's weights (which
    must be the base they were trained on); its sampling defaults (a student's) replace the
    checkpoint's. A tensor that is not finite, in any file read, is an error naming it.
    text_encoders_path: an SD3 file or diffusers folder holding the text encoders, instead of
    those the checkpoint names (sample.py --text-encoders); no_t5: leave T5 out (zero rows).
    SD3 text encoders that cannot be found are an error when prompts are encoded, not before
    (precomputed --cond conditioning needs none)."""
    path = _checkpoint_file(ckpt)
    _check_model_file(path)
    if adapters:
        _check_adapter_file(adapters)
    model = MMDiT.from_pretrained(path, device, dtype)  # one-line error for a wrong or missing file
    weights.check_finite(model.state_dict(), path)
    meta = model.metadata
    if adapters:
        base = MMDiT.from_pretrained(path) if dtype == torch.float16 else None  # fingerprints: fp32/bf16
        sampler = lora.merge_file(model, adapter_file(adapters), os.fspath(ckpt), base).get("sampler")
        meta = {**meta, **({"sampler": sampler} if sampler else {})}
    vae_path = _vae_file(path, meta)
    vae = VAE.from_pretrained(vae_path, device, dtype)
    weights.check_finite(vae.state_dict(), vae_path)
    text_encoder = _text_encoder(path, meta, model, text_encoders_path, no_t5).to(device)
    folder_defaults, folder_sizes = _diffusers_defaults(path, vae)
    defaults = {**DEFAULTS, **folder_defaults, **_meta_json(meta, "sampler", path, {})}
    if "times" in defaults:  # a few-step student: its training times are its schedule
        defaults["times"] = flow.student_sigmas(defaults["times"])[:-1]
        defaults["steps"] = len(defaults["times"])
    sizes = _meta_json(meta, "sizes", path, folder_sizes or DEFAULT_SIZES)
    if not sizes or not all(isinstance(s, list) and len(s) == 2 and all(type(v) is int for v in s)
                            for s in sizes):
        raise ValueError(f"{path}: the 'sizes' metadata must be a list of [width, height], got {sizes!r}")
    for m in (model, vae):
        m.eval().requires_grad_(False)
    return Pipeline(model, text_encoder, vae, defaults, [tuple(s) for s in sizes], path, dict(meta))


# ----------------------------------------------------------------------------------------------
# conditioning, schedule, sizes


def is_shapes(pipe):
    """Whether the pipeline belongs to the built-in shapes world (its captions can be judged)."""
    return isinstance(pipe.text_encoder, shapes.ShapesTextEncoder)


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
    weights.check_finite(t, path)
    context, pooled = t["context"].float(), t["pooled"].float()
    uc = t.get("uncond_context", torch.zeros_like(context[:1])).float()
    up = t.get("uncond_pooled", torch.zeros_like(pooled[:1])).float()
    if (context.dim() != 3 or pooled.dim() != 2 or len(pooled) != len(context)
            or uc.shape != (1, *context.shape[1:]) or up.shape != (1, pooled.shape[1])):
        raise ValueError(f"{path}: --cond shapes do not fit together: context {list(context.shape)}, "
                         f"pooled {list(pooled.shape)}, uncond_context {list(uc.shape)}, uncond_pooled "
                         f"{list(up.shape)}; want [N, L, Dc], [N, Dp], [1, L, Dc], [1, Dp]")
    return Conditioning(context, pooled, uc, up)


def is_student(ckpt):
    """Whether a checkpoint (a file or run folder, read from its header alone) is a few-step
    student: it samples at its trained "times", not a shifted sigma schedule."""
    path = _checkpoint_file(ckpt)
    if not os.path.isfile(path):  # a diffusers folder (no "sampler"); a missing file fails at loading
        return False
    return "times" in _meta_json(weights.load_metadata(path), "sampler", path, {})


SEEDS = 2 ** 63  # seeds are 0 ... 2**63 - 1: torch's generators take them modulo 2**63


def check_seed(seed, count=1, option="--seed"):
    """A seed for `count` images (seed, seed + 1, ...), each below 2**63, or a one-line error."""
    if not 0 <= seed or seed + count > SEEDS:
        below = "2**63" if count == 1 else f"2**63 - {count - 1} (the images' seeds count up from it)"
        raise ValueError(f"{option} {seed}: must be an integer >= 0 and below {below}; e.g. {option} 0")


def check_finite_output(images, cfg=None, dtype=None):
    """Sampled images (or latents) must be finite: a NaN or inf would be saved as a black image.
    The error names the likely cause."""
    if torch.isfinite(images).all():
        return
    if cfg is not None and abs(cfg) > 100:
        cause = (f"the guidance scale --cfg {cfg}, far above the usual 1 to 10: the guided "
                 "velocity overflows; pass a smaller --cfg")
    elif dtype == torch.float16:
        cause = "--dtype fp16, whose range the model overflows; pass --dtype bf16 or fp32"
    else:
        cause = ("the checkpoint: its tensors are finite but the model's outputs overflow "
                 "(a diverged run?); try an earlier checkpoint")
    raise ValueError(f"the outputs are not finite (NaN or inf: black images); nothing was written. "
                     f"Likely cause: {cause}")


def check_sampling(steps=None, cfg=None, shift=None, sampler=None, student=None):
    """The sampling options as given (None: the checkpoint's), checked before any work, each error
    naming its option. student: the path of a student checkpoint, which takes no shift."""
    def number(x, above):  # finite and >= 0 (> 0 with above=True)
        try:
            return math.isfinite(x) and (x > 0 if above else x >= 0)
        except TypeError:
            return False
    if steps is not None and (not isinstance(steps, int) or steps < 1):
        raise ValueError(f"--steps {steps}: must be an integer >= 1")
    if cfg is not None and not number(cfg, False):
        raise ValueError(f"--cfg {cfg}: must be a finite number >= 0 (1 = unguided)")
    if shift is not None and not number(shift, True):
        raise ValueError(f"--shift {shift}: must be a finite number > 0 (1 = no shift)")
    if shift is not None and student:
        raise ValueError(f"--shift {shift}: {student} is a student, which samples at its trained "
                         "times; --shift applies to a teacher's sigma schedule")
    if sampler is not None and sampler not in flow.SAMPLERS:
        raise ValueError(f"--sampler {sampler}: choose one of {', '.join(flow.SAMPLERS)}")


def sampling_settings(pipe, steps=None, cfg=None, shift=None, sampler=None):
    """The checkpoint's defaults with any overrides -> {steps, shift, sigmas, cfg, sampler}. A student with
    "times" samples at those times; `steps` N then means N times evenly spaced from 1
    (1 -> [1], 2 -> [1, .5], 4 -> [1, .75, .5, .25]) and a `shift` is an error."""
    d = pipe.defaults
    check_sampling(steps, cfg, shift, sampler, pipe.path if "times" in d else None)
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
                     f"nearest valid sizes: {sizes}; its trained sizes: "
                     + ", ".join(f"{w}x{h}" for w, h in pipe.sizes))


# ----------------------------------------------------------------------------------------------
# generation


def velocity_of(model):
    """The model as flow.sample wants it: the latent state stays fp32, the model runs in its dtype.
    An input of other than the model's channel count (a script that cannot run this kind of
    model) is a one-line error naming the kind and the script that runs it."""
    dtype = next(model.parameters()).dtype
    c = model.config

    def velocity(x, t, context, pooled):
        if x.shape[1] != c.in_channels:
            raise ValueError(wrong_kind(c, "this checkpoint", x.shape[1]))
        return model(x.to(dtype), t, context.to(dtype), pooled.to(dtype)).float()
    return velocity


def wrong_kind(config, name, given=None):
    """Why a script cannot run an MMDiT (`name`: the checkpoint) that reads other input than it
    gives (`given` channels; None: a text-to-image model's), and which script can."""
    cin, z = config.in_channels, config.out_channels
    got = "" if given is None else f"; it was given {given}"
    if cin == 2 * z:
        return (f"{name} is an instruction-editing model (it reads {cin} input channels: latent and "
                f"source latent{got}); use edit.py: python edit.py --ckpt CKPT --image SOURCE.png "
                f'--instruction "make the red circle blue"')
    if cin == 2 * z + 1:
        return (f"{name} is an inpainting model ({cin} input channels: latent, mask, known "
                f"latent{got}); use inpaint.py with an image and a mask")
    return (f"{name} reads {cin} input channels for {z} latent channels{got}: a text-to-image "
            f"model reads {z}, an inpainting one {2 * z + 1}, an editing one {2 * z}")


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
        raise ValueError(f"--batch-size {batch_size}: must be an integer >= 1")
    c = pipe.model.config
    if c.in_channels != c.out_channels:  # an inpainting or an editing model: say which script
        raise ValueError(wrong_kind(c, pipe.path))
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
    velocity = velocity_of(pipe.model)
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
