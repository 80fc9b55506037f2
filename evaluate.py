"""
Judge a text-to-image model of the shapes world: generate images for random captions at the
world's aspect ratios and score each against its caption with shapes.judge (no learned model).

    python evaluate.py --ckpt assets/shapes_teacher.safetensors
    python evaluate.py --ckpt assets/shapes_teacher.safetensors --steps 4 --n 256
"""

import argparse
import json
import sys
import time

import numpy as np

import shapes
from sample import generate, load_pipeline, pick_device, pick_dtype


def judge_pipeline(pipe, n=256, seed=1234, sizes=None, progress=False, **overrides):
    """Mean judge scores of `n` captions (drawn from `seed`) split evenly over `sizes` (default:
    the checkpoint's sizes). `overrides`: steps, cfg, shift, sampler for generate()."""
    sizes = [tuple(s) for s in (sizes or pipe.sizes)]
    rng = np.random.default_rng(seed)
    captions = [shapes.random_caption(rng) for _ in range(n)]
    totals, t0 = {}, time.time()
    for k, (w, h) in enumerate(sizes):
        part = captions[k::len(sizes)]
        images = generate(pipe, part, w, h, seed=seed + 1000 * k, progress=progress, **overrides)
        for key, value in shapes.judge_batch(images, part).items():
            totals[key] = totals.get(key, 0.0) + value * len(part)
    scores = {k: round(v / n, 4) for k, v in totals.items()}
    scores["seconds_per_image"] = round((time.time() - t0) / n, 4)
    return scores


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="an MMDiT checkpoint or run folder")
    p.add_argument("--n", type=int, default=256, help="captions to judge")
    p.add_argument("--seed", type=int, default=1234, help="draws the captions and the noise")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--cfg", type=float, default=None)
    p.add_argument("--shift", type=float, default=None)
    p.add_argument("--sampler", default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    args = p.parse_args(argv)
    try:
        device = pick_device(args.device)
        pipe = load_pipeline(args.ckpt, device, pick_dtype(args.dtype, device))
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    overrides = {k: getattr(args, k) for k in ("steps", "cfg", "shift", "sampler")
                 if getattr(args, k) is not None}
    scores = judge_pipeline(pipe, args.n, args.seed, progress=True, **overrides)
    print(json.dumps({"ckpt": args.ckpt, **overrides, **scores}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
