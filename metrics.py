"""
How good a shapes-world model is, measured without any learned network: the world's exact judge
(shapes.judge) over generated images, a Fréchet distance on fixed features, and edits with a
known answer for inpainting. evaluate.py is the command line; the training scripts judge their
models at the end with the same functions.
"""

import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import inpainting
import pipeline
import shapes


# ----------------------------------------------------------------------------------------------
# Fréchet distance on fixed features (no download, no learned network)


def features(images):
    """[B, 3, H, W] in [-1, 1], any size -> [B, 57] float64 features: the share of pixels nearest
    each of the 8 palette colours (9th: no palette colour near) and the image average-pooled to
    4x4 RGB. Chosen over a random conv net because every number means something here: the
    histogram sees wrong, missing or impure colours (blur and off-palette mush land in the 9th
    bin), the 4x4 pooling sees coarse layout and object size, and both are exactly deterministic
    and independent of the image size, so all aspect buckets share one feature space."""
    rows = []
    for image in images:
        rgb = ((image.float().clamp(-1, 1) + 1) * 127.5).permute(1, 2, 0).numpy()  # [H, W, 3] 0..255
        classes, _ = shapes.classify_pixels(rgb)                                 # [H, W], -1 unknown
        hist = np.bincount(classes.ravel() + 1, minlength=9)[[*range(1, 9), 0]] / classes.size  # [9]
        pooled = F.adaptive_avg_pool2d(image[None].float(), 4).flatten().numpy()  # [48]
        rows.append(np.concatenate([hist, pooled]))
    return np.stack(rows).astype(np.float64)                                      # [B, 57]


def _sqrt_psd(m):
    """Square root of a symmetric positive semi-definite matrix, by eigendecomposition."""
    values, vectors = np.linalg.eigh((m + m.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def frechet_distance(a, b):
    """Fréchet distance between Gaussians fitted to features a [N, D] and b [M, D] (N, M >= 2):
    |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^1/2), with tr (S_a S_b)^1/2 computed as the
    trace of the root of the symmetric PSD matrix S_a^1/2 S_b S_a^1/2 (float64, stable)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"the Fréchet distance needs at least 2 images a side, got {len(a)} and {len(b)}")
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root_a = _sqrt_psd(cov_a)
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(root_a @ cov_b @ root_a), 0, None)).sum()
    fd = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * cross
    return float(max(fd, 0.0))


# ----------------------------------------------------------------------------------------------
# evaluating one pipeline


def nfe_per_image(settings):
    """Network evaluations per image: one per step, two with guidance (flow.cfg_velocity runs
    cond and uncond whenever the scale is not 0 or 1)."""
    guided = settings["cfg"] not in (None, 0, 1)
    return settings["steps"] * (2 if guided else 1)


def evaluate_pipeline(pipe, n=256, seed=1234, sizes=None, progress=False, **overrides):
    """(scores, images): the judge's mean scores, fd, nfe and timings for `n` captions drawn from
    `seed`, caption j at size j % len(sizes) (default sizes: the checkpoint's), and the judge's
    scores at each size ("per_size": {"WxH": scores}); images in caption order. Reference images
    for fd: the same captions rendered with layout seeds seed + 10^6 + j."""
    sizes = [tuple(s) for s in (sizes or pipe.sizes)]
    settings = pipeline.sampling_settings(pipe, **overrides)
    rng = np.random.default_rng(seed)
    captions = [shapes.random_caption(rng) for _ in range(n)]
    images, references, totals, seconds, per_size = [None] * n, [None] * n, {}, 0.0, {}
    for k, (w, h) in enumerate(sizes):
        index = list(range(k, n, len(sizes)))
        if not index:
            continue
        part = [captions[j] for j in index]
        t0 = time.perf_counter()
        generated = pipeline.generate(pipe, part, w, h, seed=seed + 1000 * k, batch_size=64,
                                      progress=progress, **overrides)
        seconds += time.perf_counter() - t0
        pipeline.check_finite_output(generated, settings["cfg"], pipe.dtype)
        rendered = shapes.render_batch(part, w, h, seed=seed + 10 ** 6 + k * n)
        judged = shapes.judge_batch(generated, part)
        per_size[f"{w}x{h}"] = {key: round(value, 4) for key, value in judged.items()}
        for key, value in judged.items():
            totals[key] = totals.get(key, 0.0) + value * len(part)
        for i, j in enumerate(index):
            images[j], references[j] = generated[i], rendered[i]
    scores = {k: round(v / n, 4) for k, v in totals.items()}
    scores["fd"] = round(frechet_distance(features(images), features(references)), 4) if n >= 2 else None
    scores["nfe"] = nfe_per_image(settings)
    scores["images_per_second"] = round(n / seconds, 4)
    scores["seconds_per_image"] = round(seconds / n, 4)
    scores["per_size"] = per_size
    return scores, images


SIZE_SETS = {"unseen": shapes.UNSEEN, "many": shapes.MANY}


def parse_sizes(text, option="--sizes"):
    """'64x64,unseen' -> [(64, 64), *shapes.UNSEEN]: WIDTHxHEIGHT items, or a named set: `unseen`
    (sizes no shapes-world model trains at), `many` (eight training buckets, none of them unseen).
    Whether a size fits a model is pipeline.check_size's."""
    sizes = []
    for item in str(text).lower().split(","):
        if item in SIZE_SETS:
            sizes += SIZE_SETS[item]
            continue
        try:
            w, h = (int(v) for v in item.split("x"))
        except ValueError:
            sets = "; ".join(f"{k} ({', '.join(f'{w}x{h}' for w, h in v)})" for k, v in SIZE_SETS.items())
            raise ValueError(f"{option} {text!r}: want WIDTHxHEIGHT items or a named set: {sets}; "
                             "e.g. 64x64,96x48") from None
        sizes.append((w, h))
    return sizes


def judge_pipeline(pipe, n=256, seed=1234, sizes=None, progress=False, **overrides):
    """The scores of evaluate_pipeline without the images (what the trainers log at the end)."""
    return evaluate_pipeline(pipe, n, seed, sizes, progress, **overrides)[0]


# ----------------------------------------------------------------------------------------------
# inpainting: edits with a known answer


def judge_edits(pipe, n=256, seed=0, progress=False, batch_size=64, **settings):
    """The judge on n edits (inpainting.edit_task; a block of them at each of the checkpoint's sizes), each
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
            edits = [inpainting.edit_task(np.random.default_rng([seed, i]), *size_of[i]) for i in index]
            images = torch.stack([e[0] for e in edits])                         # [b, 3, H, W]
            masks = torch.stack([e[1] for e in edits])                          # [b, 1, H, W]
            outs = inpainting.inpaint(pipe, images, masks, [e[2] for e in edits], seed=seed + index[0],
                           **settings)                                           # [b, 3, H, W]
            pipeline.check_finite_output(outs, settings.get("cfg"), pipe.dtype)
            for (image, mask, caption), out in zip(edits, outs):
                scores = shapes.judge(out, caption)
                keep = mask.expand(3, -1, -1) == 0
                scores["kept"] = float((out[keep] == image[keep]).float().mean())
                rows.append(scores)
            bar.update(len(index))
    return {k: round(float(np.mean([r[k] for r in rows])), 4) for k in rows[0]}
