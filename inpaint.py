"""
Inpainting with flow models, in latent space: training-free for any model (a teacher or a
few-step student), or with an inpainting model that reads the mask and the known region.

    python inpaint.py --ckpt assets/shapes_teacher.safetensors --image docs/inpaint_in.png \\
        --mask docs/inpaint_mask.png --prompt "a red circle to the left of a green triangle on a yellow background"
    python inpaint.py --ckpt assets/shapes_inpaint_teacher.safetensors --eval 256   # judge edits

Writes out.png (the first result; with several prompts also 000.png, 001.png, ...), strip.png
(input | mask | output, a row per prompt) and the resolved config.json into --out. --eval N
instead judges N shapes-world edits with a known answer and writes edits.json. A folder holding
earlier outputs is refused (--overwrite replaces them), and so are outputs that are not finite.
The method (and how an inpainting model reads the mask) is in inpainting.py.
"""

import dataclasses
import json
import os
from dataclasses import dataclass, field

import cli
import flow
import images
import inpainting
import metrics
import pipeline
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
    overwrite: bool = False          # replace the earlier outputs in --out (else such a folder is refused)
    device: str = "auto"             # auto (cuda, then mps, then cpu) | cpu | cuda | cuda:N | mps
    dtype: str = "auto"              # auto (bf16 on CUDA, fp32 elsewhere) | fp32 | bf16 | fp16
    quiet: bool = False              # no progress bar and no messages
    eval: int = 0                    # instead: judge this many shapes-world edits (no --image)


CHOICES = {"sampler": flow.SAMPLERS, "dtype": ("auto", *cli.DTYPES)}
MAX_EDITS = 10000  # --eval: 256 measure a model to a few hundredths; 10000 are hours of work


def parse_args(argv=None):
    """argv -> InpaintConfig (the CLI is generated from the dataclass, as in sample.py)."""
    return cli.parse_config(InpaintConfig, argv, "inpaint.py", __doc__, CHOICES)


def check_options(c):
    """The options' own checks, before anything is loaded or written."""
    pipeline.check_sampling(c.steps, c.cfg, None, c.sampler)
    for name, what in (("resample", "RePaint passes per step"), ("feather", "latent pixels"),
                       ("eval", "edits to judge; 0: inpaint --image")):
        if getattr(c, name) < 0:
            raise ValueError(f"--{name} {getattr(c, name)}: must be an integer >= 0 ({what})")
    if c.eval > MAX_EDITS:
        raise ValueError(f"--eval {c.eval}: at most {MAX_EDITS} edits (256 measure a model to a "
                         f"few hundredths; {MAX_EDITS} already take hours on a CPU)")
    if c.eval and c.seed < 0:
        raise ValueError(f"--seed {c.seed}: must be an integer >= 0 with --eval (it draws the edits)")
    pipeline.check_seed(c.seed, max(1, c.eval, len(c.prompt)))


def check_model(c, pipe):
    """--resample and --feather are for training-free inpainting, not an inpainting model."""
    if inpainting.is_inpainting_model(pipe.model):
        for name in ("resample", "feather"):
            if getattr(c, name):
                raise ValueError(f"--{name} {getattr(c, name)}: for training-free inpainting only; "
                                 f"{c.ckpt} is an inpainting model, which reads the mask itself")


def run_eval(c):
    """--eval N: judge N edits, print the scores and write them to --out/edits.json."""
    if c.image or c.mask or c.prompt:
        raise ValueError("--eval makes its own images, masks and captions; drop --image, --mask "
                         "and --prompt")
    if os.path.exists(c.out) and not os.path.isdir(c.out):
        raise ValueError(f"--out {c.out} is a file; pass a folder for edits.json")
    cli.check_out_folder(c.out)
    device = cli.pick_device(c.device)
    pipe = pipeline.load_pipeline(c.ckpt, device, cli.pick_dtype(c.dtype, device))
    if not pipeline.is_shapes(pipe):
        raise ValueError(f"--eval needs a shapes-world checkpoint; {c.ckpt} is not one")
    check_model(c, pipe)
    earlier = images.check_out(c.out, c.overwrite, replaces=("edits.json",))
    settings = pipeline.sampling_settings(pipe, c.steps, c.cfg, None, c.sampler)
    if not c.quiet:
        nfe = metrics.nfe_per_image(settings) * (1 + c.resample)
        print(f"judging {c.eval} edits: {c.eval * nfe} network evaluations ({nfe} an edit)")
    scores = metrics.judge_edits(pipe, c.eval, c.seed, progress=not c.quiet, steps=c.steps,
                                 cfg=c.cfg, sampler=c.sampler, resample=c.resample,
                                 feather=c.feather)
    images.clear_out(c.out, earlier, c.quiet)
    resolved = {**dataclasses.asdict(c), **settings, "scores": scores}
    resolved.pop("sigmas", None)
    os.makedirs(c.out, exist_ok=True)
    path = os.path.join(c.out, "edits.json")
    weights.atomic_write(path, lambda f: f.write(json.dumps(resolved, indent=2).encode()))
    print(f"edits judged: {json.dumps(scores)} -> {path}")
    return scores


def run(c):
    """Inpaint as InpaintConfig `c` says and write the files; returns the output paths."""
    check_options(c)
    if c.eval:
        return run_eval(c)
    if not c.image or not c.mask:
        raise ValueError("pass --image IN.png and --mask MASK.png (white = repaint), or --eval N")
    prompts = cli.read_prompts(c.prompt)
    if not prompts:
        raise ValueError('no prompts: pass --prompt "what the repainted image shows"')
    if os.path.exists(c.out) and not os.path.isdir(c.out):
        raise ValueError(f"--out {c.out} is a file; pass a folder for the images")
    cli.check_out_folder(c.out)
    image, mask = images.load_image(c.image), images.load_mask(c.mask)  # [3, H, W], [1, H, W]
    if mask.shape[1:] != image.shape[1:]:
        raise ValueError(f"--mask {c.mask} is {mask.shape[2]}x{mask.shape[1]} but --image {c.image} "
                         f"is {image.shape[2]}x{image.shape[1]}; they must be the same size")
    device = cli.pick_device(c.device)
    dtype = cli.pick_dtype(c.dtype, device)
    pipe = pipeline.load_pipeline(c.ckpt, device, dtype)
    pipeline.check_size(pipe, image.shape[2], image.shape[1])
    check_model(c, pipe)
    earlier = images.check_out(c.out, c.overwrite)  # after loading: tests/test_docs.py runs up to it
    results = inpainting.inpaint(pipe, image, mask, prompts, steps=c.steps, cfg=c.cfg,
                                 sampler=c.sampler, seed=c.seed, resample=c.resample,
                                 feather=c.feather, progress=not c.quiet)
    s = pipeline.sampling_settings(pipe, c.steps, c.cfg, None, c.sampler)
    pipeline.check_finite_output(results, s["cfg"], dtype)
    images.clear_out(c.out, earlier, c.quiet)

    shown = mask.expand(3, -1, -1) * 2 - 1                             # [3, H, W]: white = repaint
    resolved = {**dataclasses.asdict(c), **s, "width": image.shape[2], "height": image.shape[1],
                "device": str(device), "dtype": str(dtype).removeprefix("torch.")}
    paths = images.write_outputs(c.out, results, [[image, shown, im] for im in results], resolved)
    if not c.quiet:
        print(f"wrote {len(results)} inpainted image(s) to {c.out}/: "
              + ", ".join(os.path.basename(p) for p in paths))
    return paths


def main(argv=None):
    cli.run_cli(parse_args, run, argv)


if __name__ == "__main__":
    main()
