"""
Instruction editing: a source image and an instruction in, the edited image out, with an editing
model (it reads the source's latent beside the noisy one; editing.py).

    python edit.py --ckpt assets/shapes_edit_teacher.safetensors --image docs/inpaint_in.png \\
        --instruction "make the red circle green" --out edited.png
    python edit.py --ckpt runs/ladd_edit --image in.png --instruction "remove the green triangle" \\
        --instruction "make the background white" --out edits     # a student: its few steps
    python edit.py --ckpt assets/shapes_edit_teacher.safetensors --eval 256 --out eval/edit
    python edit.py --ckpt tiny-sd3-edit --image photo.png --instruction "make it winter"  # SD3

--out FILE.png writes that one edited image. A folder --out gets out.png (the first edit; with
several instructions also 000.png, 001.png, ..., one per instruction, as inpaint.py), strip.png
(source | output, a row per instruction) and the resolved config.json. --eval N instead judges
N random shapes-world edits with an exact answer (followed, preserved, both:
editing.judge_edit; drawn from --seed, 1234 by default, which LADD's data do not use), prints
them as one JSON line with the settings used and writes grid.png (source | output | target, the
first edits) and scores.json; a text-to-image model is judged drawing the target captions. A folder holding earlier outputs is refused (--overwrite replaces them), and so are
outputs that are not finite.

A teacher edits guided by two scales, --cfg for the instruction and --image-cfg for the source
(InstructPix2Pix's; 1 = unguided), in its many steps; a LADD student of it unguided, in its own
few. A shapes-world model takes its grammar's instructions (an error lists the forms); an
SD3-architecture model takes free text (docs/sd3.md, "Editing with an SD3-architecture model").
"""

import dataclasses
import json
import math
import os
import sys
from dataclasses import dataclass, field

import cli
import editing
import flow
import images
import pipeline
import shapes
import weights


@dataclass
class EditConfig:
    ckpt: str                        # an editing model: a file, a run folder or a diffusers folder
    image: str = ""                  # the source image to edit (its size must be one the model takes)
    instruction: list = field(default_factory=list)  # what to change; repeat (one output each) or a .txt
    steps: int = None                # sampling steps; None: the checkpoint's (a student: its times)
    cfg: float = None                # text guidance (the instruction), 1 = unguided; None: the checkpoint's
    image_cfg: float = None          # image guidance (the source), 1 = unguided; None: the checkpoint's
    sampler: str = None              # euler | renoise; None: the checkpoint's
    seed: int = None                 # edit i starts from the noise of seed + i; None: 0 (--eval: 1234)
    out: str = "edit"                # FILE.png: the one edit | a folder: out.png, 000.png ... (one per instruction), strip.png
    overwrite: bool = False          # replace the earlier outputs in --out (else such a folder is refused)
    text_encoders: str = None        # SD3: the file or diffusers folder with CLIP-L, CLIP-G, T5; None: the ckpt's
    no_t5: bool = False              # SD3: encode without T5 (its context rows are zeros)
    device: str = "auto"             # auto (cuda, then mps, then cpu) | cpu | cuda | cuda:N | mps
    dtype: str = "auto"              # auto (bf16 on CUDA, fp32 elsewhere) | fp32 | bf16 | fp16
    quiet: bool = False              # no progress bar and no messages
    eval: int = 0                    # instead: judge this many shapes-world edits; -> grid.png, scores.json


CHOICES = {"sampler": flow.SAMPLERS, "dtype": ("auto", *cli.DTYPES)}
MAX_EDITS = 10000  # --eval: 256 measure a model to a few hundredths; 10000 are hours of work
GRID_ROWS = 8      # --eval: the first edits drawn in grid.png


def parse_args(argv=None):
    """argv -> EditConfig (the CLI is generated from the dataclass, as in sample.py)."""
    return cli.parse_config(EditConfig, argv, "edit.py", __doc__, CHOICES)


def check_options(c):
    """The options' own checks, before anything is loaded or written. -> c with its seed: --eval
    draws its edits from it too, by default editing.EVAL_SEED (not LADD's data, seed 0's)."""
    c = dataclasses.replace(c, seed=(editing.EVAL_SEED if c.eval else 0) if c.seed is None else c.seed)
    pipeline.check_sampling(c.steps, c.cfg, None, c.sampler)
    if c.image_cfg is not None and not (math.isfinite(c.image_cfg) and c.image_cfg >= 0):
        raise ValueError(f"--image-cfg {c.image_cfg}: must be a finite number >= 0 (1 = unguided)")
    if c.eval < 0:
        raise ValueError(f"--eval {c.eval}: must be an integer >= 0 (edits to judge; 0: edit --image)")
    if c.eval > MAX_EDITS:
        raise ValueError(f"--eval {c.eval}: at most {MAX_EDITS} edits (256 measure a model to a "
                         f"few hundredths; {MAX_EDITS} already take hours on a CPU)")
    if c.eval and c.seed < 0:
        raise ValueError(f"--seed {c.seed}: must be an integer >= 0 with --eval (it draws the edits)")
    pipeline.check_seed(c.seed, max(1, c.eval, len(c.instruction)))
    if c.eval and (c.image or c.instruction):
        raise ValueError("--eval makes its own sources and instructions; drop --image and "
                         "--instruction, or drop --eval to edit --image")
    if not c.eval and not c.image:
        raise ValueError('pass --image SOURCE.png and --instruction "make the red circle blue", '
                         "or --eval N to judge N random edits")
    if c.text_encoders and not os.path.exists(c.text_encoders):
        raise FileNotFoundError(f"--text-encoders {c.text_encoders}: no such file or folder; pass "
                                "the SD3 file or diffusers folder that holds CLIP-L, CLIP-G and T5")
    if is_file_out(c):
        if c.eval or len(c.instruction) != 1:
            raise ValueError(f"--out {c.out} is one image: it takes exactly one --instruction; pass a "
                             "folder for several instructions or for --eval")
        if os.path.exists(c.out) and not c.overwrite:
            raise ValueError(f"--out {c.out} exists; pass another file name, or --overwrite to replace it")
        cli.check_out_folder(os.path.dirname(c.out) or ".")
        return c
    if os.path.exists(c.out) and not os.path.isdir(c.out):
        raise ValueError(f"--out {c.out} is a file; pass a folder for the outputs")
    cli.check_out_folder(c.out)
    return c


def is_file_out(c):
    return c.out.lower().endswith((".png", ".jpg", ".jpeg"))


# ----------------------------------------------------------------------------------------------
# the checkpoint: an editing model, read from its header before it is loaded where possible


def header_facts(ckpt):
    """(input channels, output channels, shapes world?) of a checkpoint file or run folder, from
    its header alone; None where the header cannot tell (a diffusers folder, a missing or damaged
    file: loading it then says why)."""
    path = os.path.join(ckpt, "model.safetensors") if os.path.isdir(ckpt) else ckpt
    try:
        infos, meta = weights.read_header(path)
    except (OSError, ValueError):
        return None
    shape = {k: tuple(v.shape) for k, v in infos.items()}
    for embed, final in (("x_embedder.proj.weight", "final_layer.linear.weight"),  # this project's
                         ("model.diffusion_model.x_embedder.proj.weight",          # an SD3 file
                          "model.diffusion_model.final_layer.linear.weight"),
                         ("pos_embed.proj.weight", "proj_out.weight")):            # diffusers' keys
        if len(shape.get(embed, ())) == 4 and final in shape:
            _, cin, p, q = shape[embed]                                # [D, C, p, p]
            try:
                shapes_world = json.loads(meta.get("text_encoder", "{}")).get("name") == "shapes"
            except (ValueError, AttributeError):
                return None
            return cin, shape[final][0] // (p * q), shapes_world
    return None


def check_kind(ckpt, cin, cout, shapes_world):
    """An editing model reads [latent | source latent]: 2 z input channels for z out."""
    if cin == 2 * cout:
        return
    kind = ("a text-to-image model" if cin == cout else
            "an inpainting model (latent, mask and known latent in: inpaint.py runs it)"
            if cin == 2 * cout + 1 else f"a model of {cin} input channels for {cout} out")
    make = ("python train_teacher.py --preset edit" if shapes_world else
            'an SD3 transformer with a 2 x 16-channel patch embedding fine-tuned on edit pairs '
            '(docs/sd3.md, "Editing with an SD3-architecture model")')
    raise ValueError(f"{ckpt} is {kind}; edit.py needs an instruction-editing model, which reads "
                     f"{2 * cout} input channels (latent and source latent): {make}")


def check_instructions(instructions):
    """A shapes-world model knows its grammar's instructions only (the error lists its forms)."""
    for text in instructions:
        shapes.parse_instruction(text)


def load(c, instructions=(), shapes_only=False):
    """The editing pipeline of --ckpt, its kind (and a shapes-world model's instructions; with
    shapes_only, that it is one) checked from the header first where it tells, then from the
    loaded model."""
    def check(cin, cout, shapes_world):
        if not (shapes_only and cin == cout):  # --eval judges a t2i model on the target captions
            check_kind(c.ckpt, cin, cout, shapes_world)
        if shapes_only and not shapes_world:
            raise ValueError(f"--eval needs a shapes-world editing model (its edits have an exact "
                             f"answer); {c.ckpt} is not one")
        if shapes_world:
            check_instructions(instructions)
    facts = header_facts(c.ckpt)
    if facts:
        check(*facts)
    device = cli.pick_device(c.device)
    pipe = pipeline.load_pipeline(c.ckpt, device, cli.pick_dtype(c.dtype, device),
                                  text_encoders_path=c.text_encoders, no_t5=c.no_t5)
    check(pipe.model.config.in_channels, pipe.model.config.out_channels, pipeline.is_shapes(pipe))
    return pipe


def resolved(c, pipe, settings, **extra):
    """The config as run: the options, the settings they resolved to, the device and dtype."""
    return {**dataclasses.asdict(c), **settings, **extra, "device": str(pipe.device),
            "dtype": str(pipe.dtype).removeprefix("torch.")}


# ----------------------------------------------------------------------------------------------
# the two modes


def run_eval(c):
    """--eval N: judge N random edits, print the scores as one JSON line, write grid.png and
    scores.json into --out."""
    pipe = load(c, shapes_only=True)
    earlier = images.check_out(c.out, c.overwrite)
    baseline = not editing.is_edit_model(pipe.model)
    if baseline and c.image_cfg is not None:
        raise ValueError(f"--image-cfg {c.image_cfg}: {c.ckpt} is a text-to-image model, which "
                         "never sees the source; leave --image-cfg out")
    s = editing.edit_settings(pipe, c.steps, c.cfg, c.image_cfg, c.sampler)
    if not c.quiet:
        nfe = s["steps"] * (1 if s["cfg"] == 1 and s["image_cfg"] == 1 else 2 if baseline else 3)
        print(f"judging {c.eval} edits: {c.eval * nfe} network evaluations ({nfe} an edit)"
              + (" of a text-to-image model, drawing the target captions: it never sees the source"
                 if baseline else ""), file=sys.stderr)
    scores, rows = editing.evaluate(pipe, c.eval, c.seed, progress=not c.quiet,
                                    keep=min(c.eval, GRID_ROWS), steps=c.steps, cfg=c.cfg,
                                    image_cfg=c.image_cfg, sampler=c.sampler)
    images.clear_out(c.out, earlier, quiet=True)
    os.makedirs(c.out, exist_ok=True)
    # an edit's instruction does not depend on its size (editing.random_task)
    labels = [editing.task_of(c.seed, i, *pipe.sizes[0]).instruction.text for i in range(len(rows))]
    images.save_strip([list(r) for r in rows], os.path.join(c.out, "grid.png"), labels)
    used = {"steps": s["steps"], "cfg": s["cfg"], "image_cfg": None if baseline else s["image_cfg"]}
    report = resolved(c, pipe, {k: v for k, v in s.items() if k != "sigmas"}, scores=scores)
    weights.atomic_write(os.path.join(c.out, "scores.json"),
                         lambda f: f.write(json.dumps(report, indent=2).encode()))
    if not c.quiet:
        removed = f"; --overwrite: removed {len(earlier)} earlier file(s)" if earlier else ""
        print(f"wrote {c.out}/grid.png (source | output | target) and scores.json{removed}",
              file=sys.stderr)
    print(json.dumps({**scores, **used}))
    return scores


def run(c):
    """Edit as EditConfig `c` says and write the files; returns the output paths (--eval: the
    scores)."""
    c = check_options(c)
    if c.eval:
        return run_eval(c)
    instructions = cli.read_prompts(c.instruction, "--instruction")
    if not instructions:
        raise ValueError('no instructions: pass --instruction "make the red circle blue" (repeat '
                         "it for more, one output each) or --instruction FILE.txt")
    pipeline.check_seed(c.seed, len(instructions))
    if is_file_out(c) and len(instructions) != 1:
        raise ValueError(f"--out {c.out} is one image, and --instruction {c.instruction[0]} holds "
                         f"{len(instructions)} instructions; pass a folder as --out")
    try:
        source = images.load_image(c.image)                            # [3, H, W]
    except FileNotFoundError:
        raise FileNotFoundError(f"--image {c.image}: no such image file; pass the PNG or JPEG to "
                                "edit") from None
    H, W = source.shape[1:]
    pipe = load(c, instructions)
    pipeline.check_size(pipe, W, H)
    # after loading: tests/test_docs.py runs up to it
    earlier = [] if is_file_out(c) else images.check_out(c.out, c.overwrite)
    s = editing.edit_settings(pipe, c.steps, c.cfg, c.image_cfg, c.sampler)
    results = editing.edit(pipe, source, instructions, steps=c.steps, cfg=c.cfg,
                           image_cfg=c.image_cfg, sampler=c.sampler, seed=c.seed)  # [N, 3, H, W], finite
    if is_file_out(c):
        images.save_png(results[0], c.out)
        if not c.quiet:
            print(f"wrote {c.out} ({W}x{H})")
        return [c.out]
    images.clear_out(c.out, earlier, c.quiet)

    config = resolved(c, pipe, s, instruction=instructions, width=W, height=H)
    paths = images.write_outputs(c.out, results, [[source, im] for im in results], config,
                                 instructions)
    if not c.quiet:
        print(f"wrote {len(results)} edited image(s) of {W}x{H} to {c.out}/: "
              + ", ".join(os.path.basename(p) for p in paths))
    return paths


def main(argv=None):
    cli.run_cli(parse_args, run, argv)


if __name__ == "__main__":
    main()
