"""
Images: tensors in [-1, 1] (NCHW, RGB) <-> PNG files through Pillow, masks, and labelled grids.
Every file is written atomically (a temporary file, then a rename), and an output folder never
mixes two runs' files (`check_out`, `clear_out`).
"""

import json
import math
import os
import re

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

import weights


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


def write_outputs(folder, results, strip_rows, config, labels=None):
    """A script's outputs for N images [N, 3, H, W] into `folder`: out.png (the first), with
    several also 000.png, 001.png, ... (one each), strip.png (strip_rows, optional row labels)
    and config.json -> the paths written, in that order."""
    os.makedirs(folder, exist_ok=True)
    paths = [os.path.join(folder, "out.png")]
    save_png(results[0], paths[0])
    if len(results) > 1:
        paths += [os.path.join(folder, f"{i:03d}.png") for i in range(len(results))]
        for im, path in zip(results, paths[1:]):
            save_png(im, path)
    paths.append(os.path.join(folder, "strip.png"))
    save_strip(strip_rows, paths[-1], labels)
    paths.append(os.path.join(folder, "config.json"))
    weights.atomic_write(paths[-1], lambda f: f.write(json.dumps(config, indent=2).encode()))
    return paths


def load_mask(path):
    """A mask image (any mode) -> [1, H, W] in {0, 1}: 1 where its grey value is >= 128. A mask
    that selects nothing is an error (inpainting would return the input unchanged), and so is
    one of 0s and 1s (an array saved as it is), which would select nothing."""
    try:
        with Image.open(path) as im:
            grey = np.asarray(im.convert("L"))                         # [H, W] uint8
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such mask file") from None
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read it as a mask image ({e}); pass a PNG, white = "
                         "repaint") from None
    if grey.max(initial=0) == 1:
        raise ValueError(f"{path}: the mask's values are 0 and 1, not 0 and 255 (white = repaint), "
                         "so it selects nothing; save it scaled: Image.fromarray(mask.astype("
                         "'uint8') * 255)")
    if grey.max(initial=0) < 128:
        raise ValueError(f"{path}: the mask selects nothing: no pixel is >= 128 (white = repaint; "
                         f"its brightest is {grey.max(initial=0)}); paint white what should change")
    return torch.from_numpy(grey >= 128).float()[None]                 # [1, H, W]


# ----------------------------------------------------------------------------------------------
# output folders: one run's files, never mixed with another's


# the files each image-writing script puts in its --out, by name
OUTPUTS = {"sample.py": r"\d{3}\.png|grid\.png|trajectory\.png|prompts\.txt|config\.json",
           "inpaint.py": r"out\.png|\d{3}\.png|strip\.png|config\.json|edits\.json",
           "edit.py": r"out\.png|\d{3}\.png|strip\.png|config\.json|grid\.png|scores\.json",
           "evaluate.py": r"results\.json|results\.md|grid\.png"}
RUN_FILES = ("log.jsonl", "state.safetensors", "model.safetensors")  # a training run's folder


def earlier_outputs(folder):
    """The files in `folder` that sample.py, inpaint.py, edit.py or evaluate.py write (by their names)."""
    if not os.path.isdir(folder):
        return []
    pattern = re.compile("|".join(OUTPUTS.values()))
    return sorted(n for n in os.listdir(folder)
                  if pattern.fullmatch(n) and os.path.isfile(os.path.join(folder, n)))


def check_out(folder, overwrite=False, replaces=(), option="--out"):
    """Refuse an output folder whose earlier files would mix with this run's: always a training
    run's folder; earlier images and results unless `overwrite` (which replaces them: clear_out
    them once the new outputs are made). replaces: the names this run always rewrites, all of
    them (evaluate's), which are no mix. -> the earlier files to clear."""
    run = [n for n in RUN_FILES if os.path.isfile(os.path.join(folder, n))]
    if run:
        raise ValueError(f"{option} {folder} holds a training run ({', '.join(run)}); pass another "
                         f"--out for the images")
    earlier = [n for n in earlier_outputs(folder) if n not in replaces]
    if earlier and not overwrite:
        shown = ", ".join(earlier[:4]) + (f" and {len(earlier) - 4} more" if len(earlier) > 4 else "")
        raise ValueError(f"{option} {folder} holds earlier outputs ({shown}) that would mix with "
                         f"this run's; pass a new {option}, or --overwrite to replace them")
    return earlier


def clear_out(folder, names, quiet=False):
    """Remove the earlier outputs check_out found (--overwrite), and say so."""
    for name in names:
        os.remove(os.path.join(folder, name))
    if names and not quiet:
        print(f"--overwrite: removed {len(names)} earlier file(s) from {folder}/")
