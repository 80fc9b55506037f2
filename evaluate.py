"""
Evaluate text-to-image checkpoints of the shapes world side by side: generate images for random
captions at the world's aspect ratios, score each against its caption with shapes.judge (no
learned model), measure a distribution distance to rendered images, and time the sampling.

    python evaluate.py --ckpt assets/shapes_teacher.safetensors
    python evaluate.py --ckpt runs/teacher --ckpt runs/teacher --ckpt runs/student \
        --steps 28 --steps 4 --steps 1 --n 256 --out eval/

Each --ckpt is one row; --steps, --cfg, --sampler and --shift are given once (for every row) or
once per --ckpt (the i-th for the i-th row), so one checkpoint can be compared with itself at
different settings. Writes into --out: results.json (resolved config and one entry per row),
results.md (a markdown table) and grid.png (a row per configuration: the first 8 captions, the
same noise seeds in every row).

With several sizes a second table gives all-correct / purity at each (`--sizes unseen`: sizes
no shapes-world model trains at, 128x48, 48x128, 96x96 and 80x64).

--edits judges instruction edits instead (editing.evaluate: --n random edits with an exact
answer, the same in every row): an editing model edits (--image-cfg sets its image guidance,
given like --cfg), a text-to-image model draws the target's caption without seeing the source.
Columns: followed, preserved, both; grid.png then has a row per edit: source | each
configuration's output | target.

Columns: the judge's scores (background, colors, shapes, relation, all_correct, purity); fd, a
Fréchet distance to rendered images of the same captions (see `features`); nfe, network
evaluations per image (steps, twice that with classifier-free guidance); images/s and s/image,
timed around generation only (judging and rendering excluded).
"""

import dataclasses
import json
import os
from dataclasses import dataclass, field

import time

import cli
import editing
import flow
import images
import metrics
import pipeline
import weights


@dataclass
class EvalConfig:
    ckpt: list = field(default_factory=list)     # teacher/student file or run folder; repeat for more rows
    steps: list = field(default_factory=list)    # sampling steps: once for all rows or once per --ckpt
    cfg: list = field(default_factory=list)      # guidance scale, given like --steps; none: the ckpt's
    sampler: list = field(default_factory=list)  # euler | renoise, given like --steps; none: the ckpt's
    shift: list = field(default_factory=list)    # SD3 schedule shift, given like --steps; none: the ckpt's
    image_cfg: list = field(default_factory=list)  # --edits: image guidance, given like --steps; none: the ckpt's
    edits: bool = False              # judge instruction edits (editing.py) instead of captions
    n: int = 256                     # captions per row, split evenly over the sizes
    seed: int = 1234                 # draws the captions; image i of size k starts from noise seed + 1000k + i
    sizes: str = None                # e.g. 64x64,96x48 (width x height), or unseen; None: the ckpt's
    out: str = "eval"                # folder for results.json, results.md and grid.png
    overwrite: bool = False          # replace other scripts' outputs in --out (its own results are always replaced)
    device: str = "auto"             # auto (cuda, then mps, then cpu) | cpu | cuda | cuda:N | mps
    dtype: str = "auto"              # auto (bf16 on CUDA, fp32 elsewhere) | fp32 | bf16 | fp16
    quiet: bool = False              # no progress bars and no table on stdout


ITEM_TYPES = {"ckpt": str, "steps": int, "cfg": float, "sampler": str, "shift": float,
              "image_cfg": float}
OVERRIDES = ("steps", "cfg", "sampler", "shift", "image_cfg")
EDIT_SCORES = ("followed", "preserved", "both")
SCORES = ("background", "colors", "shapes", "relation", "all_correct", "purity")
TIMING = ("images_per_second", "seconds_per_image")  # the only numbers that change between runs
GRID_CAPTIONS = 8
MAX_N = 10000  # --n: every image is held for the Fréchet distance (~1 GB at 64x64)


# ----------------------------------------------------------------------------------------------
# command line


def parse_args(argv=None):
    """argv -> EvalConfig; list fields are repeatable options."""
    return cli.parse_config(EvalConfig, argv, "evaluate.py", __doc__, {"sampler": flow.SAMPLERS},
                        ITEM_TYPES)


def configurations(c):
    """EvalConfig -> one (ckpt, overrides) per row; an override is given once or once per --ckpt."""
    if not c.ckpt:
        raise ValueError("no checkpoints: pass --ckpt FILE or --ckpt RUN_FOLDER (repeat it to compare)")
    for name in OVERRIDES:
        values = getattr(c, name)
        if len(values) not in (0, 1, len(c.ckpt)):
            raise ValueError(f"--{name} given {len(values)} times for {len(c.ckpt)} --ckpt; give it once "
                             f"(for every checkpoint) or once per --ckpt")
    rows = []
    for i, ckpt in enumerate(c.ckpt):
        pick = lambda values: values[0] if len(values) == 1 else values[i]  # noqa: E731
        overrides = {k: pick(getattr(c, k)) for k in OVERRIDES if getattr(c, k)}
        pipeline.check_sampling(**{k: v for k, v in overrides.items() if k != "image_cfg"})
        if "image_cfg" in overrides and not c.edits:
            raise ValueError("--image-cfg is an editing model's image guidance; pass --edits with it")
        if not os.path.exists(ckpt):
            raise ValueError(f"--ckpt {ckpt}: no such file or folder")
        rows.append((ckpt, overrides))
    for ckpt, overrides in rows:  # a student takes no --shift: said before any row is run
        if "shift" in overrides and pipeline.is_student(ckpt):
            pipeline.check_sampling(shift=overrides["shift"], student=ckpt)
    return rows


def row_name(ckpt, settings):
    """'runs/teacher steps=28 cfg=7.0 euler shift=3.0': the checkpoint and its resolved settings."""
    shift = "" if settings["shift"] is None else f" shift={settings['shift']}"
    return f"{ckpt} steps={settings['steps']} cfg={settings['cfg']} {settings['sampler']}{shift}"


def edit_table(rows):
    """--edits rows -> a markdown table, one line per row."""
    lines = ["| name | followed | preserved | both | NFE/edit | s/edit |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['name']} | " + " | ".join(f"{r[k]:.4f}" for k in EDIT_SCORES)
              + f" | {r['nfe']} | {r['seconds_per_image']:.4f} |" for r in rows]
    return "\n".join(lines) + "\n"


def edit_row(c, pipe, ckpt, overrides):
    """--edits: one configuration judged on c.n edits -> (result row, its first outputs)."""
    baseline = not editing.is_edit_model(pipe.model)
    if baseline:
        overrides = {k: v for k, v in overrides.items() if k != "image_cfg"}
    settings = {"shift": None, **editing.edit_settings(pipe, **overrides)}
    unguided = settings["cfg"] == 1 and (baseline or settings["image_cfg"] == 1)
    nfe = settings["steps"] * (1 if unguided else 2 if baseline else 3)
    t0 = time.perf_counter()
    scores, kept = editing.evaluate(pipe, c.n, c.seed, not c.quiet, keep=GRID_CAPTIONS, **overrides)
    seconds = time.perf_counter() - t0
    image = "" if baseline else f" image_cfg={settings['image_cfg']}"
    name = row_name(ckpt, settings) + image + (" (draws the target caption)" if baseline else "")
    return ({"name": name, "ckpt": ckpt, "steps": settings["steps"], "cfg": settings["cfg"],
             "image_cfg": None if baseline else settings["image_cfg"], "sampler": settings["sampler"],
             **scores, "nfe": nfe, "seconds_per_image": round(seconds / c.n, 4)}, kept)


def markdown_table(rows):
    """Result rows -> a markdown table, one line per row; with several sizes, a second table of
    all-correct / purity at each size."""
    columns = ["name", *SCORES, "fd", "nfe", "images_per_second", "seconds_per_image"]
    header = ["name", *SCORES, "FD", "NFE/image", "images/s", "s/image"]
    cell = lambda v: "-" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(r.get(k)) for k in columns) + " |" for r in rows]
    sizes = list(dict.fromkeys(size for r in rows for size in r.get("per_size", {})))
    if len(sizes) > 1:
        lines += ["", "all correct / purity at each size:", "",
                  "| name | " + " | ".join(sizes) + " |", "|" + "---|" * (len(sizes) + 1)]
        lines += ["| " + " | ".join([r["name"]] + [
            f"{r['per_size'][s]['all_correct']:.4f} / {r['per_size'][s]['purity']:.4f}"
            if s in r["per_size"] else "-" for s in sizes]) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def run(c):
    """Evaluate every configuration as EvalConfig `c` says and write the files; returns the rows."""
    rows_in = configurations(c)
    sizes = metrics.parse_sizes(c.sizes) if c.sizes else None
    for name in ("sizes", "shift"):
        if c.edits and getattr(c, name):
            raise ValueError(f"--{name} with --edits: edits are judged at the checkpoint's sizes "
                             "and sampling schedule; leave it out")
    if c.n < 2:
        raise ValueError(f"--n {c.n}: need at least 2 captions (the Fréchet distance needs 2 images)")
    if c.n > MAX_N:
        raise ValueError(f"--n {c.n}: at most {MAX_N} captions a row (each image is held for the "
                         f"Fréchet distance; 256 measure a model to a few hundredths)")
    if c.seed < 0:
        raise ValueError(f"--seed {c.seed}: must be an integer >= 0 (it draws the captions)")
    pipeline.check_seed(c.seed, 10 ** 6 + c.n * len(sizes or metrics.SIZE_SETS["many"]))  # noise, layouts
    if os.path.exists(c.out) and not os.path.isdir(c.out):
        raise ValueError(f"--out {c.out} is a file; pass a folder for the results")
    cli.check_out_folder(c.out)
    device = cli.pick_device(c.device)
    dtype = cli.pick_dtype(c.dtype, device)
    rows, grid, labels, pipe, pipe_ckpt = [], [], [], None, None
    for i, (ckpt, overrides) in enumerate(rows_in):
        if ckpt != pipe_ckpt:  # the same checkpoint in consecutive rows loads once
            pipe, pipe_ckpt = pipeline.load_pipeline(ckpt, device, dtype), ckpt
        if i == 0:  # after loading: tests/test_docs.py runs up to it
            earlier = images.check_out(c.out, c.overwrite, replaces=("results.json", "results.md",
                                                                     "grid.png"))
        for w, h in sizes or pipe.sizes:
            pipeline.check_size(pipe, w, h)
        if c.edits:  # instruction edits at the checkpoint's sizes
            if not c.quiet:
                print(f"row {i + 1} of {len(rows_in)}, {ckpt}: {c.n} edits")
            row, kept = edit_row(c, pipe, ckpt, overrides)
            rows.append(row)
            sources, targets = [k[0] for k in kept], [k[2] for k in kept]
            grid.append([k[1] for k in kept])
            continue
        settings = pipeline.sampling_settings(pipe, **overrides)
        if not c.quiet:
            print(f"row {i + 1} of {len(rows_in)}, {row_name(ckpt, settings)}: {c.n} captions at "
                  f"{len(sizes or pipe.sizes)} size(s), {c.n * metrics.nfe_per_image(settings)} "
                  "network evaluations")
        scores, samples = metrics.evaluate_pipeline(pipe, c.n, c.seed, sizes, progress=not c.quiet,
                                                    **overrides)
        rows.append({"name": row_name(ckpt, settings), "ckpt": ckpt, "steps": settings["steps"],
                     "cfg": settings["cfg"], "sampler": settings["sampler"], "shift": settings["shift"],
                     "sizes": [list(s) for s in (sizes or pipe.sizes)], **scores})
        grid.append(samples[:GRID_CAPTIONS])
        labels.append(f"{len(rows) - 1}: " + row_name(os.path.basename(os.path.normpath(ckpt)), settings))

    images.clear_out(c.out, earlier, c.quiet)
    resolved = {**dataclasses.asdict(c), "device": str(device), "dtype": str(dtype).removeprefix("torch.")}
    table = (edit_table if c.edits else markdown_table)(rows)
    if c.edits:  # a row per edit: source | every configuration's output | target
        grid = [[s, *outs, t] for s, *outs, t in zip(sources, *grid, targets)]
        labels = [editing.task_of(c.seed, i, 64, 64).instruction.text for i in range(len(grid))]
    write = lambda name, text: weights.atomic_write(os.path.join(c.out, name),  # noqa: E731
                                                    lambda f: f.write(text.encode()))
    write("results.json", json.dumps({"config": resolved, "results": rows}, indent=2))
    write("results.md", table)
    images.save_strip(grid, os.path.join(c.out, "grid.png"), labels=labels)
    if not c.quiet:
        where = "columns (after the source)" if c.edits else "rows"
        print(table + f"grid.png {where}: " + "; ".join(f"{i}: {r['name']}" for i, r in enumerate(rows)))
        print(f"wrote results.json, results.md and grid.png to {c.out}/")
    return rows


def main(argv=None):
    cli.run_cli(parse_args, run, argv)


if __name__ == "__main__":
    main()
