"""
Text-to-image (and img2img) from a teacher or a student checkpoint.

    python sample.py --ckpt runs/teacher --prompt "a red circle on a blue background"
    python sample.py --ckpt runs/student --steps 1 --prompt prompts.txt --out samples/student
    python sample.py --ckpt runs/teacher --init-image in.png --strength 0.6 --prompt "..."
    python sample.py --ckpt sd3_medium.safetensors --cond cond.safetensors   # precomputed text
    python sample.py --ckpt runs/sd3 --text-encoders sd3-diffusers/ --prompt "..."  # moved run
    python sample.py --ckpt assets/shapes_teacher.safetensors --lora runs/lora/adapters.safetensors \
        --prompt "..."                                   # a teacher plus a LoRA student's adapters

Writes one PNG per prompt ({i:03d}.png), grid.png, prompts.txt and the resolved config.json into
--out, and with --trajectory a trajectory.png (a row per sample: its x0 estimate at every step).
A folder holding earlier outputs is refused (--overwrite replaces them), and so are outputs that
are not finite (nothing is written).

A checkpoint describes itself (its text encoder, VAE, sampler and sizes are in its metadata), so
a teacher samples guided in many steps and a student unguided in its few, with the same command.
The work happens in pipeline.py (`load_pipeline`, `generate`); this file is the command line.
"""

import dataclasses
import json
import os
from dataclasses import dataclass, field

import cli
import flow
import images
import pipeline
import weights


@dataclass
class SampleConfig:
    ckpt: str                        # a checkpoint file, or a run folder with model.safetensors
    lora: str = None                 # LoRA adapters (a --lora run folder or its adapters.safetensors); --ckpt: their base
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
    overwrite: bool = False          # replace the earlier outputs in --out (else such a folder is refused)
    trajectory: bool = False         # also trajectory.png: each sample's x0 estimate at every step
    cond: str = None                 # context, pooled (uncond_*) file or shard folder, not prompts
    text_encoders: str = None        # SD3: the file or diffusers folder with CLIP-L, CLIP-G, T5; None: the ckpt's
    no_t5: bool = False              # SD3: encode without T5 (its context rows are zeros)
    device: str = "auto"             # auto (cuda, then mps, then cpu) | cpu | cuda | cuda:N | mps
    dtype: str = "auto"              # auto (bf16 on CUDA, fp32 elsewhere) | fp32 | bf16 | fp16
    quiet: bool = False              # no progress bar and no messages


CHOICES = {"sampler": flow.SAMPLERS, "dtype": ("auto", *cli.DTYPES)}


def parse_args(argv=None):
    """argv -> SampleConfig."""
    return cli.parse_config(SampleConfig, argv, "sample.py", __doc__, CHOICES)


def run(c):
    """Sample as SampleConfig `c` says and write the files; returns the output paths."""
    prompts = cli.read_prompts(c.prompt)
    if c.cond and prompts:
        raise ValueError("--cond replaces --prompt; pass one or the other")
    if not c.cond and not prompts:
        raise ValueError('no prompts: pass --prompt "a red circle on a blue background" '
                         "(repeat it for more) or --prompt FILE.txt")
    if c.strength is not None and not c.init_image:
        raise ValueError("--strength needs --init-image (it is the share of img2img steps run)")
    pipeline.check_sampling(c.steps, c.cfg, c.shift, c.sampler)
    pipeline.check_seed(c.seed, max(1, len(prompts)))
    lora_file = c.lora and pipeline.adapter_file(c.lora)
    if c.shift is not None and pipeline.is_student(lora_file or c.ckpt):  # the file's header
        pipeline.check_sampling(shift=c.shift, student=lora_file or c.ckpt)
    for name, value in (("width", c.width), ("height", c.height)):
        if value is not None and value < 1:
            raise ValueError(f"--{name} {value}: must be > 0 (pixels); leave it out for the "
                             "default size")
    if c.batch_size < 1:
        raise ValueError(f"--batch-size {c.batch_size}: must be an integer >= 1")
    if c.strength is not None and not 0 <= c.strength <= 1:
        raise ValueError(f"--strength {c.strength}: must be a number in [0, 1] (the share of the "
                         "steps run)")
    if os.path.exists(c.out) and not os.path.isdir(c.out):
        raise ValueError(f"--out {c.out} is a file; pass a folder for the images")
    cli.check_out_folder(c.out)
    init = images.load_image(c.init_image) if c.init_image else None
    device = cli.pick_device(c.device)
    dtype = cli.pick_dtype(c.dtype, device)
    if c.text_encoders and not os.path.exists(c.text_encoders):
        raise FileNotFoundError(f"--text-encoders {c.text_encoders}: no such file or folder; pass "
                                "the SD3 file or diffusers folder that holds CLIP-L, CLIP-G and T5")
    pipe = pipeline.load_pipeline(c.ckpt, device, dtype, adapters=c.lora,
                                  text_encoders_path=c.text_encoders, no_t5=c.no_t5)
    width = c.width or (init.shape[2] if init is not None else pipe.sizes[0][0])
    height = c.height or (init.shape[1] if init is not None else pipe.sizes[0][1])
    pipeline.check_size(pipe, width, height)
    if init is not None and tuple(init.shape[1:]) != (height, width):
        init = images.load_image(c.init_image, width, height)
    strength = (0.6 if c.strength is None else c.strength) if init is not None else 1.0
    cond = pipeline.load_cond(c.cond) if c.cond else pipeline.encode(pipe, prompts)
    got = (cond.context.shape[-1], cond.pooled.shape[-1])
    want = (pipe.model.config.context_dim, pipe.model.config.pooled_dim)
    if c.cond and got != want:
        raise ValueError(f"--cond {c.cond}: (context, pooled) widths {got} but {c.ckpt} takes {want}: "
                         "it was made with other text encoders than this model's; make it with "
                         f"python text_encoders.py --ckpt <this model's SD3 file or folder> ...")
    earlier = images.check_out(c.out, c.overwrite)  # after loading: tests/test_docs.py runs up to it
    pipeline.check_seed(c.seed, len(cond))
    out = pipeline.generate(pipe, cond, width, height, steps=c.steps, cfg=c.cfg, shift=c.shift,
                            sampler=c.sampler, seed=c.seed, batch_size=c.batch_size,
                            init_image=init, strength=strength, progress=not c.quiet,
                            trajectory=c.trajectory)
    samples, frames = out if c.trajectory else (out, None)
    s = pipeline.sampling_settings(pipe, c.steps, c.cfg, c.shift, c.sampler)
    pipeline.check_finite_output(samples, s["cfg"], dtype)
    images.clear_out(c.out, earlier, c.quiet)

    paths = [os.path.join(c.out, f"{i:03d}.png") for i in range(len(samples))]
    for image, path in zip(samples, paths):
        images.save_png(image, path)
    paths.append(os.path.join(c.out, "grid.png"))
    images.save_grid(samples, paths[-1])
    if frames:  # one row per sample: its x0 estimate after each step
        paths.append(os.path.join(c.out, "trajectory.png"))
        images.save_strip([[f[i] for f in frames] for i in range(len(samples))], paths[-1])
    labels = prompts or [f"cond {i}" for i in range(len(samples))]
    weights.atomic_write(os.path.join(c.out, "prompts.txt"), lambda f: f.write(
        "".join(f"{i:03d}.png\t{p}\n" for i, p in enumerate(labels)).encode()))
    if init is not None:  # the sigmas actually run
        s["sigmas"] = flow.img2img_sigmas(s["sigmas"], strength)
    resolved = {**dataclasses.asdict(c), **s, "width": width, "height": height, "strength": strength,
                "device": str(device), "dtype": str(dtype).removeprefix("torch.")}
    weights.atomic_write(os.path.join(c.out, "config.json"),
                         lambda f: f.write(json.dumps(resolved, indent=2).encode()))
    if not c.quiet:
        names = ", ".join(["000.png" + (f" ... {len(samples) - 1:03d}.png" if len(samples) > 1 else ""),
                           "grid.png", *(["trajectory.png"] if frames else []), "prompts.txt", "config.json"])
        print(f"wrote {len(samples)} image(s) of {width}x{height} to {c.out}/: {names}")
    return paths


def main(argv=None):
    cli.run_cli(parse_args, run, argv)


if __name__ == "__main__":
    main()
