"""
Images: tensors in [-1, 1] (NCHW, RGB) <-> PNG files through Pillow, masks, and labelled grids.
Every file is written atomically (a temporary file, then a rename).
"""

import math

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


def load_mask(path):
    """A mask image (any mode) -> [1, H, W] in {0, 1}: 1 where its grey value is >= 128."""
    try:
        with Image.open(path) as im:
            grey = np.asarray(im.convert("L"))                         # [H, W] uint8
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such mask file") from None
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read it as a mask image ({e}); pass a PNG, white = "
                         "repaint") from None
    return torch.from_numpy(grey >= 128).float()[None]                 # [1, H, W]
