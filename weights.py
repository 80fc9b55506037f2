"""
Weights on disk: the safetensors format, written from scratch, and the SD3 file layouts.

A safetensors file is three parts:

    [8 bytes: N, little-endian u64] [N bytes: JSON header] [raw little-endian tensor data]

The header maps each tensor name to {"dtype", "shape", "data_offsets": [begin, end]} (offsets
relative to the start of the data part) and may hold "__metadata__": {str: str}. Tensors are
stored back to back with no gaps; nothing in the file is ever executed.

Reading is lazy: the file is memory-mapped and every tensor is a view into the mapping, so a
multi-GB checkpoint costs no RAM until a tensor is used. Anything malformed raises
SafetensorsError naming the file and the problem, before a single tensor is built.

The rest of the file is about SD3: the single-file prefixes (`model.diffusion_model.` ...), the
diffusers folder layout (sharded files with an index JSON), and `load_strict`, the one place that
compares a checkpoint with a model and explains a mismatch.
"""

import hashlib
import json
import math
import os
import tempfile
from dataclasses import dataclass

import numpy as np
import torch

# safetensors dtype name <-> torch dtype (the float8 and unsigned types only where torch has them)
DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
for _name, _attr in [("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"),
                     ("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64")]:
    if hasattr(torch, _attr):
        DTYPES[_name] = getattr(torch, _attr)
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the reference reader's limit; real headers are < 1 MB

# where each component lives inside an SD3 / SD3.5 single-file checkpoint
SD3_PREFIXES = {
    "mmdit": "model.diffusion_model.",
    "vae": "first_stage_model.",
    "clip_l": "text_encoders.clip_l.transformer.",
    "clip_g": "text_encoders.clip_g.transformer.",
    "t5xxl": "text_encoders.t5xxl.transformer.",
}


class SafetensorsError(ValueError):
    """A file that is not a valid safetensors file."""


class WeightsError(ValueError):
    """A valid file whose tensors do not fit the model they are loaded into."""


@dataclass(frozen=True)
class TensorInfo:
    dtype: torch.dtype
    shape: tuple
    begin: int  # byte offsets into the data part
    end: int


# ----------------------------------------------------------------------------------------------
# reading


def _parse_header(raw, path, data_len):
    """Validate a decoded header; return ({name: TensorInfo}, metadata)."""
    def bad(msg):
        return SafetensorsError(f"{path}: not a valid safetensors file: {msg}")

    if not isinstance(raw, dict):
        raise bad("the header is not a JSON object")
    metadata = raw.get("__metadata__") or {}  # the reference writer may store null
    if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise bad("__metadata__ must map strings to strings")
    infos = {}
    for name, entry in raw.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise bad(f"tensor {name!r} needs exactly dtype, shape and data_offsets")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise bad(f"tensor {name!r} has unknown dtype {dtype!r} (known: {', '.join(DTYPES)})")
        if not isinstance(shape, list) or not all(type(d) is int and 0 <= d < 2**63 for d in shape):
            raise bad(f"tensor {name!r} has an invalid shape {shape!r}")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(type(o) is int for o in offsets)
                or not 0 <= offsets[0] <= offsets[1] <= data_len):
            raise bad(f"tensor {name!r} has data_offsets {offsets!r} outside the "
                      f"{data_len}-byte data section (truncated file?)")
        nbytes = math.prod(shape) * DTYPES[dtype].itemsize
        if nbytes != offsets[1] - offsets[0]:
            raise bad(f"tensor {name!r}: shape {shape} of {dtype} needs {nbytes} bytes but "
                      f"its offsets span {offsets[1] - offsets[0]}")
        infos[name] = TensorInfo(DTYPES[dtype], tuple(shape), offsets[0], offsets[1])
    # the data part must be covered exactly, back to back: no overlaps, no holes
    pos = 0
    for name, info in sorted(infos.items(), key=lambda kv: (kv[1].begin, kv[1].end)):
        if info.begin != pos:
            raise bad(f"tensor {name!r} starts at byte {info.begin}, expected {pos} "
                      "(overlapping or non-contiguous tensors)")
        pos = info.end
    if pos != data_len:
        raise bad(f"the tensors cover {pos} bytes but the data section has {data_len}")
    return infos, metadata


def _read_header(path):
    """-> (infos, metadata, data_start). Reads only the header bytes."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        if size < 8:
            raise SafetensorsError(f"{path}: not a valid safetensors file: only {size} bytes")
        n = int.from_bytes(f.read(8), "little")
        if n > MAX_HEADER_BYTES:
            raise SafetensorsError(f"{path}: not a valid safetensors file: header length {n} "
                                   f"is larger than the {MAX_HEADER_BYTES}-byte limit")
        if n > size - 8:
            raise SafetensorsError(f"{path}: not a valid safetensors file: header length {n} "
                                   f"runs past the end of the {size}-byte file (truncated?)")
        text = f.read(n)
    try:
        raw = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise SafetensorsError(f"{path}: not a valid safetensors file: the header is not "
                               f"valid JSON ({type(e).__name__})") from None
    infos, metadata = _parse_header(raw, path, size - 8 - n)
    return infos, metadata, 8 + n


def read_header(path):
    """Names, dtypes and shapes of a file's tensors, and its metadata, without touching data.
    -> ({name: TensorInfo}, {str: str})"""
    infos, metadata, _ = _read_header(path)
    return infos, metadata


def load_file(path, device="cpu"):
    """All tensors of a safetensors file -> {name: Tensor}. On the CPU the tensors are views of a
    copy-on-write memory map: nothing is read until it is used, and writing to one never touches
    the file. On another device each tensor is copied there."""
    infos, _, start = _read_header(path)
    if not infos:
        return {}
    mm = np.memmap(path, dtype=np.uint8, mode="c")  # private mapping: lazy, never writes back
    data = torch.from_numpy(mm[start:])             # [data_len] uint8, shares the mapping
    out = {}
    for name, info in infos.items():
        raw = data[info.begin:info.end]
        if info.begin % info.dtype.itemsize:        # unaligned data (rare writers): copy once
            raw = raw.clone()
        tensor = raw.view(info.dtype).reshape(info.shape)
        out[name] = tensor if str(device) == "cpu" else tensor.to(device)
    return out


def load_metadata(path):
    return read_header(path)[1]


def check_finite(tensors, source):
    """Every floating-point tensor of {name: Tensor} finite, or a WeightsError naming `source`
    and the first bad tensor (in name order): a NaN weight only shows later, as black images."""
    for name in sorted(tensors):
        t = tensors[name]
        if t.is_floating_point() and not torch.isfinite(t).all():
            bad = int((~torch.isfinite(t)).sum())
            raise WeightsError(f"{source}: tensor {name} holds NaN or inf values ({bad} of "
                               f"{t.numel()}); the file is damaged (a diverged run or a broken "
                               "save); pass another checkpoint, e.g. an earlier one of the run")


def tensors_sha256(path):
    """sha256 of a file's tensors: names, dtypes, shapes and bytes, not the metadata (the same
    weights saved with other notes have the same digest). Reads the file once, in chunks."""
    infos, _, start = _read_header(path)
    digest = hashlib.sha256(json.dumps([[n, str(i.dtype), list(i.shape), i.begin, i.end]
                                        for n, i in infos.items()]).encode())
    with open(path, "rb") as f:
        f.seek(start)
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------
# writing


def save_file(tensors, path, metadata=None):
    """Write {name: Tensor} as safetensors, atomically (a temporary file, then a rename), with
    optional {str: str} metadata. Tensors are written contiguous and little-endian, one at a time:
    a tensor on a GPU is copied to the CPU just before it is written, never the whole state."""
    metadata = metadata or {}
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise ValueError("save_file: metadata must map strings to strings (json.dumps values)")
    header, pos = {}, 0
    if metadata:
        header["__metadata__"] = metadata
    for name in sorted(tensors):
        t = tensors[name]
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"save_file: {name!r} is a {type(t).__name__}, not a tensor")
        if t.dtype not in DTYPE_NAMES:
            raise ValueError(f"save_file: {name!r} has dtype {t.dtype}, which safetensors "
                             f"cannot store (supported: {', '.join(DTYPES)})")
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [pos, pos + nbytes]}
        pos += nbytes
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)  # pad so the data part starts 8-byte aligned

    def write(f):
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for name in sorted(tensors):
            f.write(memoryview(raw_bytes(tensors[name])))
    atomic_write(path, write)


def raw_bytes(t):
    """A tensor's bytes on the CPU, contiguous: [numel * element size] uint8 (a copy only when
    it lives elsewhere or is not contiguous)."""
    return t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()


def atomic_write(path, write):
    """Call write(f) on a temporary file beside `path`, then rename it over `path`: a reader sees
    the old file or the new one, never half of one, and a failure leaves nothing behind."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual mode
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


# ----------------------------------------------------------------------------------------------
# SD3 layouts


def strip_prefix(state, prefix):
    """The tensors whose names start with `prefix`, with the prefix removed."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def sd3_component(state, component):
    """One component of an SD3 single file (see SD3_PREFIXES), prefix stripped.
    A file that holds only that component (bare keys) is returned unchanged."""
    if component not in SD3_PREFIXES:
        raise ValueError(f"unknown SD3 component {component!r}; choose from {list(SD3_PREFIXES)}")
    sub = strip_prefix(state, SD3_PREFIXES[component])
    if sub:
        return sub
    if any(k.startswith(p) for k in state for p in SD3_PREFIXES.values()):
        return {}  # a single file without this component
    return dict(state)


def describe_keys(keys):
    """A short guess at what a set of checkpoint keys is, for error messages."""
    keys = list(keys)
    has = lambda s: any(s in k for k in keys)  # noqa: E731
    parts = [name for name, p in SD3_PREFIXES.items() if any(k.startswith(p) for k in keys)]
    if parts:
        return "an SD3 single-file checkpoint with " + ", ".join(parts)
    if has("joint_blocks."):
        depth = len({k.split("joint_blocks.")[1].split(".")[0] for k in keys if "joint_blocks." in k})
        return f"an SD3 MMDiT with {depth} joint blocks"
    if has("transformer_blocks.") and has("context_embedder"):
        return "an SD3 transformer in the diffusers layout"
    if has("encoder.down.") or has("decoder.up.") or has("encoder.down_blocks."):
        return "a VAE"  # before the UNet test: a diffusers VAE has down_blocks and attentions
    if has("input_blocks.") or has("down_blocks.") and has("attentions."):
        return "a UNet (SD 1.x / SDXL style), not an MMDiT"
    if has("text_model.") or has("encoder.block."):
        return "a text encoder"
    return f"an unrecognised checkpoint ({len(keys)} tensors, e.g. {keys[:3]})"


def load_strict(module, state, source, expect):
    """Load `state` into `module` with every key and shape matching, or raise one WeightsError
    that lists the missing, unexpected and mis-shaped keys and says what the file looks like.
    Tensors are assigned, not copied, so a model built on the meta device takes the file's
    memory-mapped tensors as they are."""
    want = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    missing = sorted(set(want) - set(state))
    unexpected = sorted(set(state) - set(want))
    misshaped = sorted(k for k in set(want) & set(state) if tuple(state[k].shape) != want[k])
    if missing or unexpected or misshaped:
        def show(keys, fmt=str, n=8):
            more = f", ... ({len(keys) - n} more)" if len(keys) > n else ""
            return ", ".join(fmt(k) for k in keys[:n]) + more
        lines = [f"{source}: does not fit {expect}; the file looks like {describe_keys(state)}."]
        if missing:
            lines.append(f"  {len(missing)} missing: {show(missing)}")
        if unexpected:
            lines.append(f"  {len(unexpected)} unexpected: {show(unexpected)}")
        if misshaped:
            lines.append(f"  {len(misshaped)} mis-shaped: " + show(
                misshaped, lambda k: f"{k} file {list(state[k].shape)} vs model {list(want[k])}"))
        lines.append("  Pass a checkpoint of this model type (the config is inferred from it).")
        raise WeightsError("\n".join(lines))
    module.load_state_dict(state, strict=True, assign=True)
    return module


def load_diffusers(path, subfolder, name="diffusion_pytorch_model"):
    """Tensors of one component of a diffusers folder (`path/subfolder/name.safetensors`, or the
    sharded `name-0000k-of-0000n.safetensors` files listed in `name.safetensors.index.json`).
    `path` may also be the component folder itself."""
    folder = os.path.join(path, subfolder)
    if not os.path.isdir(folder):
        folder = path
    single = os.path.join(folder, f"{name}.safetensors")
    index = os.path.join(folder, f"{name}.safetensors.index.json")
    if os.path.isfile(single):
        return load_file(single)
    if os.path.isfile(index):
        try:
            with open(index) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            if not all(isinstance(s, str) for s in shards):
                raise TypeError("shard file names must be strings")
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
            raise SafetensorsError(f"{index}: not a valid shard index ({e})") from None
        state = {}
        for shard in shards:
            state.update(load_file(os.path.join(folder, shard)))
        return state
    if folder == path and os.path.isfile(os.path.join(path, "model_index.json")):
        raise FileNotFoundError(f"{path}: a diffusers folder without {subfolder}/; put the "
                                f"release's {subfolder}/ back (with its {name}.safetensors)")
    raise FileNotFoundError(f"{path}: no {name}.safetensors or {name}.safetensors.index.json in "
                            f"{folder} (expected a diffusers '{subfolder}/' folder)")


def diffusers_config(path, subfolder, keys):
    """The config.json of one component of a diffusers folder -> (dict, its path), or ({}, None)
    when there is none. `path`: the diffusers folder, the component folder itself, or a weights
    file inside the component folder (config.json beside it). A config.json holding none of
    `keys` (the component's own fields) is another kind of file (e.g. a run's config) and ignored."""
    path = os.fspath(path)
    if os.path.isdir(path):
        folder = os.path.join(path, subfolder)
        folder = folder if os.path.isdir(folder) else path
    else:
        folder = os.path.dirname(os.path.abspath(path))
    file = os.path.join(folder, "config.json")
    if not os.path.isfile(file):
        return {}, None
    try:
        with open(file) as f:
            config = json.load(f)
    except (ValueError, RecursionError, UnicodeDecodeError) as e:
        raise WeightsError(f"{file}: not valid JSON ({type(e).__name__}); fix it or delete it "
                           "(the shapes of the weights then decide)") from None
    if not isinstance(config, dict) or not any(k in config for k in keys):
        return {}, None
    return config, file


def check_config(file, pairs, what):
    """Each (field, value in config.json, value the weights imply) must agree, or one
    WeightsError naming the field, both values and the fix. Fields absent from the file (None)
    are not checked."""
    for field, said, implied in pairs:
        if said is None:
            continue
        same = (list(said) == list(implied) if isinstance(said, (list, tuple))
                and isinstance(implied, (list, tuple)) else said == implied)
        if not same:
            raise WeightsError(f"{file}: {field} is {said!r} but the {what} weights beside it imply "
                               f"{implied!r}; this config.json does not describe these weights: fix "
                               f"{field} or delete the file (the shapes then decide)")


# ----------------------------------------------------------------------------------------------
# training state: nested dicts / lists of tensors and JSON values, as safetensors + JSON


def _flatten(obj, prefix, tensors):
    """Tensors go to `tensors` under a path-like key; everything else stays as JSON."""
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj
        return {"__tensor__": prefix}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {k: _flatten(v, f"{prefix}/{k}", tensors) for k, v in obj.items()}
        return {"__items__": [[k, _flatten(v, f"{prefix}/{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return [_flatten(v, f"{prefix}/{i}", tensors) for i, v in enumerate(obj)]
    return obj


def _unflatten(obj, tensors):
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__items__" in obj:
            return {k: _unflatten(v, tensors) for k, v in obj["__items__"]}
        return {k: _unflatten(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_unflatten(v, tensors) for v in obj]
    return obj


def save_state(tree, path):
    """Save a nested training state (model/optimizer state dicts, step, RNG states ...): the
    tensors as safetensors, the structure and plain values as JSON in the metadata. Atomic."""
    tensors = {}
    skeleton = _flatten(tree, "", tensors)
    save_file(tensors, path, {"kind": "training_state", "tree": json.dumps(skeleton)})


def load_state(path):
    """The inverse of save_state (tensors are copied out of the file, so it may be replaced)."""
    metadata = load_metadata(path)
    if metadata.get("kind") != "training_state":
        raise SafetensorsError(f"{path}: not a training state written by this project")
    tensors = {k: v.clone() for k, v in load_file(path).items()}
    return _unflatten(json.loads(metadata["tree"]), tensors)
