"""Tests for weights.py: the from-scratch safetensors reader/writer (round trips, compatibility with
the public format, laziness, atomic writes, hostile files, fuzzing) and the SD3 layout helpers."""
import json
import os
import random
import struct
import sys
import time
import tracemalloc

import pytest
import torch
from torch import nn

import weights
from weights import SafetensorsError, WeightsError

try:
    import resource
except ImportError:  # Windows
    resource = None

HAS_PROC = os.path.exists("/proc/self/status") and os.path.exists("/proc/self/maps")


# ----------------------------------------------------------------------------------------------
# helpers


def raw_bytes(t):
    """The little-endian bytes of a tensor, in row-major order (works for every dtype and 0-d)."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def sample(dtype, shape, seed=0):
    """A deterministic tensor of `dtype` with varied values (negatives for signed types)."""
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=g) * 3).to(dtype)
    if dtype == torch.uint8:
        return torch.randint(0, 256, shape, generator=g).to(dtype)
    if dtype in (torch.uint16, torch.uint32, torch.uint64):
        return torch.randint(0, 2**15, shape, generator=g).to(dtype)
    return torch.randint(-100, 100, shape, generator=g).to(dtype)


def write_raw(path, header, data=b"", length=None):
    """A file with a hand-made header: `header` is a JSON-able object or raw bytes; `length`
    overrides the 8-byte length prefix."""
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(text) if length is None else length
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", n) + text + data)
    return path


def assert_same(a, b):
    assert a.dtype == b.dtype
    assert tuple(a.shape) == tuple(b.shape)
    assert raw_bytes(a) == raw_bytes(b)


def peak_rss_bytes():
    if resource is None:
        return 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def rss_bytes():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


# ----------------------------------------------------------------------------------------------
# 1. round trips


@pytest.mark.parametrize("name", list(weights.DTYPES))
def test_round_trip_every_dtype(tmp_path, name):
    dtype = weights.DTYPES[name]
    base = sample(dtype, (4, 6), seed=1)
    tensors = {
        "matrix": sample(dtype, (3, 5), seed=2),
        "scalar": sample(dtype, (), seed=3),
        "empty": sample(dtype, (0, 4), seed=4),
        "transposed": base.t(),             # a non-contiguous view
        "strided": base[1:, ::2],           # a view with a storage offset and strides
        "vector": sample(dtype, (7,), seed=5),
    }
    assert not tensors["transposed"].is_contiguous()
    meta = {"config": json.dumps({"depth": 2, "name": name}), "note": "ünïcødé ☃", "empty": ""}
    path = tmp_path / f"{name}.safetensors"
    weights.save_file(tensors, path, metadata=meta)

    loaded = weights.load_file(path)
    assert set(loaded) == set(tensors)
    for k, t in tensors.items():
        assert_same(loaded[k], t)
    assert loaded["scalar"].dim() == 0
    assert loaded["empty"].shape == (0, 4)
    assert loaded["transposed"].shape == (6, 4)

    infos, got_meta = weights.read_header(path)
    assert got_meta == meta
    assert weights.load_metadata(path) == meta
    assert set(infos) == set(tensors)
    for k, t in tensors.items():
        info = infos[k]
        assert info.dtype == dtype
        assert info.shape == tuple(t.shape)
        assert info.end - info.begin == t.numel() * t.element_size()


def test_round_trip_all_dtypes_in_one_file(tmp_path):
    tensors = {f"t_{n}": sample(d, (3, 2), seed=i)
               for i, (n, d) in enumerate(weights.DTYPES.items())}
    tensors.update({f"s_{n}": sample(d, (), seed=50 + i)
                    for i, (n, d) in enumerate(weights.DTYPES.items())})
    path = tmp_path / "mixed.safetensors"
    weights.save_file(tensors, path)
    loaded = weights.load_file(path)
    assert set(loaded) == set(tensors)
    for k, t in tensors.items():
        assert_same(loaded[k], t)
    assert weights.read_header(path)[1] == {}


def test_round_trip_edge_files(tmp_path):
    # no tensors at all, with and without metadata
    p = tmp_path / "none.safetensors"
    weights.save_file({}, p)
    assert weights.load_file(p) == {}
    assert weights.read_header(p) == ({}, {})
    weights.save_file({}, p, metadata={"a": "b"})
    assert weights.load_file(p) == {}
    assert weights.read_header(p)[1] == {"a": "b"}
    # only empty tensors: the data section is 0 bytes long
    p2 = tmp_path / "empties.safetensors"
    weights.save_file({"a": torch.zeros(0), "b": torch.zeros(3, 0, dtype=torch.int64)}, p2)
    got = weights.load_file(p2)
    assert got["a"].shape == (0,) and got["b"].shape == (3, 0) and got["b"].dtype == torch.int64
    # requires_grad tensors and str paths are fine; data ends 8-byte aligned after the header
    w = torch.randn(3, requires_grad=True)
    weights.save_file({"w": w}, str(p2))
    assert torch.equal(weights.load_file(str(p2))["w"], w.detach())
    n = int.from_bytes(p2.read_bytes()[:8], "little")
    assert n % 8 == 0


def test_save_file_writes_what_header_claims(tmp_path):
    """The file layout itself: prefix, JSON header with back-to-back offsets, then raw bytes."""
    a = torch.arange(6, dtype=torch.int32).reshape(2, 3)
    b = torch.tensor([1.5, -2.0], dtype=torch.float64)
    path = tmp_path / "layout.safetensors"
    weights.save_file({"a": a, "b": b}, path, metadata={"k": "v"})
    blob = path.read_bytes()
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8:8 + n])
    assert header["__metadata__"] == {"k": "v"}
    data = blob[8 + n:]
    assert len(data) == 24 + 16
    for name, t in (("a", a), ("b", b)):
        lo, hi = header[name]["data_offsets"]
        assert data[lo:hi] == raw_bytes(t)
        assert header[name]["dtype"] == weights.DTYPE_NAMES[t.dtype]
        assert header[name]["shape"] == list(t.shape)
    assert data[header["a"]["data_offsets"][0]:][:4] == struct.pack("<i", 0)  # little-endian


def test_read_header_does_not_touch_data(tmp_path, monkeypatch):
    path = tmp_path / "h.safetensors"
    weights.save_file({"x": torch.randn(10, 3), "y": torch.zeros(2, dtype=torch.bfloat16)}, path,
                      metadata={"m": "1"})

    def no_memmap(*a, **k):
        raise AssertionError("read_header mapped the data")
    monkeypatch.setattr(weights.np, "memmap", no_memmap)
    monkeypatch.setattr(weights.torch, "from_numpy", no_memmap)
    infos, meta = weights.read_header(path)
    assert meta == {"m": "1"}
    assert {k: (v.dtype, v.shape) for k, v in infos.items()} == {
        "x": (torch.float32, (10, 3)), "y": (torch.bfloat16, (2,))}


def test_read_header_on_huge_sparse_file_is_instant(tmp_path):
    """1 GiB of data behind the header: read_header reads only the header."""
    path = tmp_path / "huge.safetensors"
    size = 1 << 30
    header = json.dumps({"big": {"dtype": "U8", "shape": [size],
                                 "data_offsets": [0, size]}}).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        f.truncate(8 + len(header) + size)
    t0 = time.perf_counter()
    infos, _ = weights.read_header(path)
    assert time.perf_counter() - t0 < 1.0
    assert infos["big"].shape == (size,)


def test_unaligned_offsets_are_loaded_correctly(tmp_path):
    """A writer that does not align tensors (odd header length, an F32 at byte offset 3)."""
    a = torch.tensor([1, 2, 3], dtype=torch.uint8)
    b = torch.tensor([1.25, -7.5], dtype=torch.float32)
    header = {"a": {"dtype": "U8", "shape": [3], "data_offsets": [0, 3]},
              "b": {"dtype": "F32", "shape": [2], "data_offsets": [3, 11]}}
    text = json.dumps(header).encode()
    if len(text) % 2 == 0:
        text += b" "
    path = write_raw(tmp_path / "u.safetensors", text, raw_bytes(a) + raw_bytes(b))
    got = weights.load_file(path)
    assert torch.equal(got["a"], a) and torch.equal(got["b"], b)


def test_save_file_rejects_bad_input(tmp_path):
    p = tmp_path / "bad.safetensors"
    with pytest.raises(ValueError, match="metadata"):
        weights.save_file({"a": torch.zeros(1)}, p, metadata={"a": 1})
    with pytest.raises(ValueError, match="'a'"):
        weights.save_file({"a": [1, 2]}, p)
    with pytest.raises(ValueError, match="complex64"):
        weights.save_file({"z": torch.zeros(2, dtype=torch.complex64)}, p)
    assert not p.exists()
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------------------------
# 2. byte compatibility with the public safetensors package


def test_files_we_write_load_in_safetensors(tmp_path):
    st = pytest.importorskip("safetensors")
    import safetensors.torch as stt
    tensors = {}
    for i, (n, d) in enumerate(weights.DTYPES.items()):
        tensors[f"{n}.m"] = sample(d, (3, 4), seed=i)
        tensors[f"{n}.s"] = sample(d, (), seed=100 + i)
        tensors[f"{n}.e"] = sample(d, (2, 0), seed=200 + i)
        tensors[f"{n}.t"] = sample(d, (5, 2), seed=300 + i).t()
    meta = {"config": json.dumps({"a": [1, 2]}), "unicode": "☃ é"}
    path = tmp_path / "ours.safetensors"
    weights.save_file(tensors, path, metadata=meta)
    theirs = stt.load_file(str(path))
    assert set(theirs) == set(tensors)
    for k, t in tensors.items():
        assert_same(theirs[k], t)
    with st.safe_open(str(path), framework="pt") as f:
        assert f.metadata() == meta
        assert set(f.keys()) == set(tensors)
    # and their lazy reader agrees on a single tensor slice
    with st.safe_open(str(path), framework="pt") as f:
        assert_same(f.get_tensor("F32.m"), tensors["F32.m"])


def test_files_safetensors_writes_load_here(tmp_path):
    pytest.importorskip("safetensors")
    import safetensors.torch as stt
    tensors = {}
    for i, (n, d) in enumerate(weights.DTYPES.items()):
        tensors[f"{n}.m"] = sample(d, (3, 4), seed=i)
        tensors[f"{n}.s"] = sample(d, (), seed=100 + i)
        tensors[f"{n}.e"] = sample(d, (0,), seed=200 + i)
        tensors[f"{n}.v"] = sample(d, (5,), seed=300 + i)
    meta = {"format": "pt", "config": "{\"x\": 1}"}
    path = tmp_path / "theirs.safetensors"
    stt.save_file(tensors, str(path), metadata=meta)
    ours = weights.load_file(path)
    assert set(ours) == set(tensors)
    for k, t in tensors.items():
        assert_same(ours[k], t)
    infos, got_meta = weights.read_header(path)
    assert got_meta == meta
    assert {k: (i.dtype, i.shape) for k, i in infos.items()} == {
        k: (t.dtype, tuple(t.shape)) for k, t in tensors.items()}
    # without metadata too
    stt.save_file({"a": torch.ones(2)}, str(path))
    assert weights.read_header(path)[1] == {}
    assert torch.equal(weights.load_file(path)["a"], torch.ones(2))


# ----------------------------------------------------------------------------------------------
# 3. laziness and copy-on-write


@pytest.mark.skipif(not HAS_PROC, reason="needs /proc (Linux) to read RSS and memory maps")
def test_load_is_lazy_memory_mapped(tmp_path):
    """A 200 MB file loads in milliseconds without its size showing up in RSS, and the tensor's
    memory lies inside a mapping of the file."""
    path = tmp_path / "zeros.safetensors"
    nbytes = 200 * 1024 * 1024
    header = {"z": {"dtype": "F32", "shape": [nbytes // 4], "data_offsets": [0, nbytes]},
              "__metadata__": {"kind": "sparse"}}
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:                      # a sparse file: no data written at all
        f.write(struct.pack("<Q", len(text)) + text)
        f.truncate(8 + len(text) + nbytes)

    rss0 = rss_bytes()
    t0 = time.perf_counter()
    state = weights.load_file(path)
    elapsed = time.perf_counter() - t0
    grown = rss_bytes() - rss0
    z = state["z"]
    assert elapsed < 0.5, elapsed
    assert grown < 50 * 1024 * 1024, grown
    assert z.shape == (nbytes // 4,) and z.dtype == torch.float32

    # the tensor's data lies in a mapping of this file
    ptr, real = z.data_ptr(), os.path.realpath(path)
    found = False
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            if len(parts) >= 6 and parts[5] == real and lo <= ptr < hi:
                found = True
    assert found, "the tensor is not a view of a memory map of the file"

    # touching a few values reads them (zeros) without pulling in the whole file
    assert z[0].item() == 0.0 and z[-1].item() == 0.0 and z[12345:12400].abs().sum().item() == 0
    assert rss_bytes() - rss0 < 50 * 1024 * 1024


def test_writing_a_loaded_tensor_never_changes_the_file(tmp_path):
    path = tmp_path / "cow.safetensors"
    w = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    weights.save_file({"w": w, "b": torch.ones(4, dtype=torch.int16)}, path)
    before = path.read_bytes()
    mtime = os.stat(path).st_mtime_ns

    state = weights.load_file(path)
    state["w"].add_(100)
    state["w"][0, 0] = -1
    state["b"].zero_()
    assert state["w"][0, 0].item() == -1                 # the write is visible in memory
    del state
    assert path.read_bytes() == before                   # ... but never reaches the file
    assert os.stat(path).st_mtime_ns == mtime
    fresh = weights.load_file(path)
    assert torch.equal(fresh["w"], w)
    assert torch.equal(fresh["b"], torch.ones(4, dtype=torch.int16))

    # two loads are independent private mappings
    s1, s2 = weights.load_file(path), weights.load_file(path)
    s1["w"].fill_(7)
    assert torch.equal(s2["w"], w)


# ----------------------------------------------------------------------------------------------
# 4. atomic writes


def _old_file(tmp_path):
    path = tmp_path / "model.safetensors"
    weights.save_file({"old": torch.full((5,), 3.0)}, path, metadata={"v": "old"})
    return path, path.read_bytes()


def test_atomic_unsupported_dtype_after_valid_ones(tmp_path):
    path, old = _old_file(tmp_path)
    tensors = {"a": torch.randn(100), "b": torch.ones(3, dtype=torch.int64),
               "zz_complex": torch.zeros(4, dtype=torch.complex64)}  # sorted last
    with pytest.raises(ValueError, match="complex64"):
        weights.save_file(tensors, path)
    assert path.read_bytes() == old
    assert sorted(os.listdir(tmp_path)) == ["model.safetensors"]
    # same for a new destination: nothing appears
    with pytest.raises(ValueError):
        weights.save_file(tensors, tmp_path / "new.safetensors")
    assert sorted(os.listdir(tmp_path)) == ["model.safetensors"]


@pytest.mark.parametrize("fail_at", ["replace", "fsync", "write"])
def test_atomic_failure_midway_leaves_old_file_and_no_temp(tmp_path, monkeypatch, fail_at):
    path, old = _old_file(tmp_path)

    def boom(*a, **k):
        raise OSError(f"simulated failure in {fail_at}")
    if fail_at == "replace":
        monkeypatch.setattr(weights.os, "replace", boom)
    elif fail_at == "fsync":
        monkeypatch.setattr(weights.os, "fsync", boom)
    else:  # the third data write fails (disk full in the middle of the tensors)
        real_fdopen, calls = os.fdopen, {"n": 0}

        class Flaky:
            def __init__(self, f):
                self.f = f

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.f.close()

            def write(self, b):
                calls["n"] += 1
                if calls["n"] == 4:
                    raise OSError("No space left on device")
                return self.f.write(b)

            def __getattr__(self, k):
                return getattr(self.f, k)
        monkeypatch.setattr(weights.os, "fdopen", lambda *a, **k: Flaky(real_fdopen(*a, **k)))

    new = {"a": torch.randn(1000), "b": torch.randn(1000), "c": torch.randn(10)}
    with pytest.raises(OSError, match="simulated|No space"):
        weights.save_file(new, path, metadata={"v": "new"})
    assert path.read_bytes() == old
    assert sorted(os.listdir(tmp_path)) == ["model.safetensors"]
    monkeypatch.undo()
    assert weights.read_header(path)[1] == {"v": "old"}
    # and a successful save replaces it completely, leaving no temporary file
    weights.save_file(new, path, metadata={"v": "new"})
    assert sorted(os.listdir(tmp_path)) == ["model.safetensors"]
    assert weights.read_header(path)[1] == {"v": "new"}
    assert torch.equal(weights.load_file(path)["a"], new["a"])


def test_atomic_interrupt_cleans_up(tmp_path, monkeypatch):
    """Even a KeyboardInterrupt during the write removes the temporary file."""
    path, old = _old_file(tmp_path)

    def interrupt(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(weights.os, "fsync", interrupt)
    with pytest.raises(KeyboardInterrupt):
        weights.save_file({"a": torch.ones(3)}, path)
    assert path.read_bytes() == old
    assert sorted(os.listdir(tmp_path)) == ["model.safetensors"]


# ----------------------------------------------------------------------------------------------
# 5. hostile and broken files

F32x2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


def _entry(**kw):
    e = dict(F32x2)
    e.update(kw)
    return e


HOSTILE = {
    "empty_file": lambda p: p.write_bytes(b""),
    "shorter_than_8": lambda p: p.write_bytes(b"\x05\x00\x00"),
    "exactly_8_zero_header": lambda p: p.write_bytes(struct.pack("<Q", 0)),
    "length_beyond_file": lambda p: write_raw(p, b"{}", length=100),
    "length_one_past_file": lambda p: write_raw(p, b"{}", length=3),
    "absurd_length_2_62": lambda p: write_raw(p, b"{}", length=2**62),
    "absurd_length_max": lambda p: write_raw(p, b"{}", length=2**64 - 1),
    "length_over_limit": lambda p: write_raw(p, b"{}", length=weights.MAX_HEADER_BYTES + 1),
    "invalid_json": lambda p: write_raw(p, b"{not json"),
    "truncated_json": lambda p: write_raw(p, json.dumps({"a": F32x2}).encode()[:-3], bytes(8)),
    "invalid_utf8": lambda p: write_raw(p, b'{"\xff\xfe": 1}'),
    "nul_bytes": lambda p: write_raw(p, b"\x00" * 16),
    "header_is_list": lambda p: write_raw(p, [1, 2]),
    "header_is_string": lambda p: write_raw(p, "hello"),
    "header_is_null": lambda p: write_raw(p, None),
    "header_is_number": lambda p: write_raw(p, 42),
    "unknown_dtype": lambda p: write_raw(p, {"a": _entry(dtype="C64")}, bytes(8)),
    "lowercase_dtype": lambda p: write_raw(p, {"a": _entry(dtype="f32")}, bytes(8)),
    "dtype_not_string": lambda p: write_raw(p, {"a": _entry(dtype=4)}, bytes(8)),
    "dtype_is_list": lambda p: write_raw(p, {"a": _entry(dtype=["F32"])}, bytes(8)),
    "dtype_is_object": lambda p: write_raw(p, {"a": _entry(dtype={"F32": 1})}, bytes(8)),
    "entry_not_object": lambda p: write_raw(p, {"a": [0, 8]}, bytes(8)),
    "entry_missing_field": lambda p: write_raw(p, {"a": {"dtype": "F32", "shape": [2]}}, bytes(8)),
    "entry_extra_field": lambda p: write_raw(p, {"a": _entry(extra=1)}, bytes(8)),
    "shape_offset_mismatch": lambda p: write_raw(p, {"a": _entry(shape=[3])}, bytes(8)),
    "dtype_offset_mismatch": lambda p: write_raw(p, {"a": _entry(dtype="F64")}, bytes(8)),
    "overlapping_offsets": lambda p: write_raw(
        p, {"a": _entry(), "b": _entry(data_offsets=[4, 12])}, bytes(12)),
    "same_offsets_twice": lambda p: write_raw(p, {"a": _entry(), "b": _entry()}, bytes(8)),
    "offsets_past_data": lambda p: write_raw(p, {"a": _entry(data_offsets=[0, 8])}, bytes(4)),
    "offsets_far_out": lambda p: write_raw(
        p, {"a": _entry(data_offsets=[2**64, 2**64 + 8])}, bytes(8)),
    "negative_offsets": lambda p: write_raw(p, {"a": _entry(data_offsets=[-8, 0])}, bytes(8)),
    "reversed_offsets": lambda p: write_raw(
        p, {"a": _entry(shape=[0], data_offsets=[8, 0])}, bytes(8)),
    "float_offsets": lambda p: write_raw(p, {"a": _entry(data_offsets=[0.0, 8.0])}, bytes(8)),
    "bool_offsets": lambda p: write_raw(
        p, {"a": _entry(dtype="U8", shape=[1], data_offsets=[False, True])}, bytes(1)),
    "three_offsets": lambda p: write_raw(p, {"a": _entry(data_offsets=[0, 4, 8])}, bytes(8)),
    "offsets_not_list": lambda p: write_raw(p, {"a": _entry(data_offsets="0,8")}, bytes(8)),
    "hole_between_tensors": lambda p: write_raw(
        p, {"a": _entry(), "b": _entry(data_offsets=[12, 20])}, bytes(20)),
    "hole_at_start": lambda p: write_raw(p, {"a": _entry(data_offsets=[4, 12])}, bytes(12)),
    "trailing_bytes": lambda p: write_raw(p, {"a": _entry()}, bytes(8) + b"junk"),
    "data_but_no_tensors": lambda p: write_raw(p, {}, bytes(8)),
    "negative_shape": lambda p: write_raw(p, {"a": _entry(shape=[-2, -1])}, bytes(8)),
    "float_shape": lambda p: write_raw(p, {"a": _entry(shape=[2.0])}, bytes(8)),
    "bool_shape": lambda p: write_raw(
        p, {"a": _entry(dtype="U8", shape=[True], data_offsets=[0, 1])}, bytes(1)),
    "string_shape": lambda p: write_raw(p, {"a": _entry(shape=["2"])}, bytes(8)),
    "nested_shape": lambda p: write_raw(p, {"a": _entry(shape=[[2]])}, bytes(8)),
    "shape_not_list": lambda p: write_raw(p, {"a": _entry(shape=2)}, bytes(8)),
    "nan_shape": lambda p: write_raw(
        p, b'{"a": {"dtype": "F32", "shape": [NaN], "data_offsets": [0, 8]}}', bytes(8)),
    "huge_dim_with_zero": lambda p: write_raw(
        p, {"a": _entry(shape=[0, 2**63], data_offsets=[0, 0])}),
    "huge_dim_2_64_with_zero": lambda p: write_raw(
        p, {"a": _entry(shape=[2**64, 0], data_offsets=[0, 0])}),
    "huge_int_digits": lambda p: write_raw(
        p, b'{"a": {"dtype": "F32", "shape": [' + b"9" * 5000 + b'], "data_offsets": [0, 8]}}',
        bytes(8)),
    "metadata_int_value": lambda p: write_raw(p, {"__metadata__": {"a": 1}}),
    "metadata_null_value": lambda p: write_raw(p, {"__metadata__": {"a": None}}),
    "metadata_nested_value": lambda p: write_raw(p, {"__metadata__": {"a": {"b": "c"}}}),
    "metadata_is_list": lambda p: write_raw(p, {"__metadata__": ["a", "b"]}),
    "metadata_is_string": lambda p: write_raw(p, {"__metadata__": "a=b"}),
    "deeply_nested_list": lambda p: write_raw(p, b"[" * 100000),
    "deeply_nested_closed": lambda p: write_raw(p, b"[" * 100000 + b"]" * 100000),
    "deeply_nested_object": lambda p: write_raw(p, b'{"a":' * 100000),
    "deeply_nested_in_metadata": lambda p: write_raw(
        p, b'{"__metadata__": {"a": ' + b"[" * 50000 + b"]" * 50000 + b"}}"),
    "lone_surrogate_dtype": lambda p: write_raw(
        p, b'{"a": {"dtype": "\\ud800", "shape": [2], "data_offsets": [0, 8]}}', bytes(8)),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_file_raises_safetensors_error_naming_the_path(tmp_path, case):
    path = tmp_path / f"hostile_{case}.safetensors"
    HOSTILE[case](path)
    t0 = time.perf_counter()
    for fn in (weights.load_file, weights.read_header, weights.load_metadata):
        with pytest.raises(SafetensorsError) as e:   # any other exception type fails the test
            fn(path)
        assert isinstance(e.value, ValueError)
        assert str(path) in str(e.value)
    assert time.perf_counter() - t0 < 5.0


def test_missing_file_is_file_not_found_naming_the_path(tmp_path):
    path = tmp_path / "nope" / "missing.safetensors"
    for fn in (weights.load_file, weights.read_header):
        with pytest.raises(FileNotFoundError) as e:
            fn(path)
        assert str(path) in str(e.value)
    assert not isinstance(FileNotFoundError(), ValueError)  # distinct from a broken file


def test_huge_claimed_tensor_fails_fast_without_allocating(tmp_path):
    """Headers claiming ~2**40 elements are rejected by validation, before any allocation."""
    cases = [
        ({"a": {"dtype": "F32", "shape": [2**40], "data_offsets": [0, 4 * 2**40]}}, bytes(16)),
        ({"a": {"dtype": "F32", "shape": [2**20, 2**20], "data_offsets": [0, 16]}}, bytes(16)),
        ({"a": {"dtype": "U8", "shape": [2**40], "data_offsets": [0, 2**40]}}, b""),
    ]
    tracemalloc.start()
    try:
        for i, (header, data) in enumerate(cases):
            path = write_raw(tmp_path / f"huge{i}.safetensors", header, data)
            t0 = time.perf_counter()
            with pytest.raises(SafetensorsError, match=str(i) + ".safetensors"):
                weights.load_file(path)
            assert time.perf_counter() - t0 < 0.5
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * 1024 * 1024, peak


# ----------------------------------------------------------------------------------------------
# 6. fuzzing


def _base_file(path):
    tensors = {
        "w": sample(torch.float32, (3, 4), seed=1),
        "b": sample(torch.float16, (5,), seed=2),
        "idx": sample(torch.int64, (2, 2), seed=3),
        "mask": sample(torch.bool, (7,), seed=4),
        "s": sample(torch.bfloat16, (), seed=5),
        "e": sample(torch.uint8, (0, 3), seed=6),
        "q": sample(torch.int8, (3,), seed=7),
    }
    weights.save_file(tensors, path, metadata={"config": json.dumps({"depth": 2}), "name": "fz"})
    return path.read_bytes()


JSON_FRAGMENTS = [b"{", b"}", b"[", b"]", b'"', b",", b":", b"null", b"true", b"false", b"1e999",
                  b"-1", b"NaN", b"Infinity", b'"\\ud800"', b"\xff", b"\x00", b" ", b"\\",
                  b'{"dtype":"F32"}', b"[" * 64, b"{" * 64, b'"__metadata__":{}', b'"x":1,',
                  b'"data_offsets":[0,4]', b'"shape":[-1]', b"18446744073709551616", b"9" * 30]
BAD_DIMS = [0, 1, 2, 3, -1, 2**31, 2**40, 2**62, 2**63, 2**64, 1.5, True, "3", None, [2]]
BAD_DTYPES = list(weights.DTYPES) + ["F128", "", "c64", 5, None, ["F32"], {"F32": 1}]
BAD_OFFSETS = [[0], [0, 1, 2], "0,4", None, [0.0, 4.0], [True, 4], [-4, 0], [2**64, 2**64 + 4],
               [0, 0], {}, [4, 0]]
BAD_META = [1, None, [1], {"a": 1}, {"a": None}, "x", {"a": "b"}, {}]


def _mutate_structure(header, rng):
    """1-3 random edits to a parsed header (some keep it valid, most do not)."""
    for _ in range(rng.randint(1, 3)):
        try:
            _mutate_once(header, rng)
        except (KeyError, TypeError, IndexError, AttributeError):
            pass  # an earlier edit removed what this one needed: skip it
    return header


def _mutate_once(header, rng):
    names = [k for k in header if k != "__metadata__"] or ["absent"]
    op = rng.randrange(15)
    a, b = rng.choice(names), rng.choice(names)
    if op == 0:      # swap offsets
        header[a]["data_offsets"], header[b]["data_offsets"] = (
            header[b]["data_offsets"], header[a]["data_offsets"])
    elif op == 1:    # duplicate offsets
        header[a]["data_offsets"] = list(header[b]["data_offsets"])
    elif op == 2:    # shuffle all offsets
        offs = [header[n]["data_offsets"] for n in names]
        rng.shuffle(offs)
        for n, o in zip(names, offs):
            header[n]["data_offsets"] = o
    elif op == 3:    # shift one offset
        o = list(header[a]["data_offsets"])
        o[rng.randrange(2)] += rng.choice([-9, -4, -1, 1, 2, 4, 8])
        header[a]["data_offsets"] = o
    elif op == 4:    # one dim
        shape = list(header[a]["shape"]) or [1]
        shape[rng.randrange(len(shape))] = rng.choice(BAD_DIMS)
        header[a]["shape"] = shape
    elif op == 5:    # add or drop a dim
        shape = list(header[a]["shape"])
        if shape and rng.random() < 0.5:
            shape.pop(rng.randrange(len(shape)))
        else:
            shape.insert(rng.randrange(len(shape) + 1), rng.choice([1, 1, 0, 2, 2**63]))
        header[a]["shape"] = shape
    elif op == 6:
        header[a]["dtype"] = rng.choice(BAD_DTYPES)
    elif op == 7:
        header[a]["data_offsets"] = rng.choice(BAD_OFFSETS)
    elif op == 8:    # delete a tensor
        del header[a]
    elif op == 9:    # drop or add a field
        if rng.random() < 0.5:
            del header[a][rng.choice(["dtype", "shape", "data_offsets"])]
        else:
            header[a]["extra"] = rng.choice([1, "x", None])
    elif op == 10:   # entry of the wrong type
        header[a] = rng.choice([[], "F32", 3, None, [header[a]]])
    elif op == 11:   # metadata
        header["__metadata__"] = rng.choice(BAD_META)
    elif op == 12:   # rename (keeps the file valid)
        header[a + rng.choice(["_x", ".weight", "ü"])] = header.pop(a)
    elif op == 13:   # reinterpret a tensor consistently as bytes (keeps the file valid)
        lo, hi = header[a]["data_offsets"]
        header[a]["dtype"], header[a]["shape"] = "U8", [hi - lo]
    else:            # add a tensor with random fields
        header[f"new{rng.randrange(100)}"] = {
            "dtype": rng.choice(BAD_DTYPES), "shape": [rng.choice(BAD_DIMS)],
            "data_offsets": rng.choice(BAD_OFFSETS + [[0, 4], [40, 44]])}


def _variants(base, n_per_kind, seed):
    rng = random.Random(seed)
    n = int.from_bytes(base[:8], "little")
    header = json.loads(base[8:8 + n])
    size = len(base)
    for i in range(n_per_kind):
        b = bytearray(base)                          # flip bytes in the header
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(8, 8 + n)] ^= rng.randrange(1, 256)
        yield "header_flip", bytes(b)

        b = bytearray(base)                          # flip bytes in the data
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(8 + n, size)] ^= rng.randrange(1, 256)
        yield "data_flip", bytes(b)

        yield "truncate", base[:rng.randrange(0, size)]

        new_n = rng.choice([rng.getrandbits(64), rng.getrandbits(32), rng.randrange(0, size + 16),
                            n + rng.choice([-9, -8, -1, 1, 7, 8, 64]), 2**62, 2**63 + 5,
                            weights.MAX_HEADER_BYTES + 1, 0])
        yield "length", struct.pack("<Q", new_n % 2**64) + base[8:]

        text = base[8:8 + n]                          # splice JSON fragments
        for _ in range(rng.randint(1, 3)):
            pos = rng.randrange(0, len(text) + 1)
            cut = rng.choice([0, 0, 1, 3, 10])
            text = text[:pos] + rng.choice(JSON_FRAGMENTS) + text[pos + cut:]
        prefix = len(text) if rng.random() < 0.75 else n
        yield "splice", struct.pack("<Q", prefix) + text + base[8 + n:]

        h = _mutate_structure(json.loads(json.dumps(header)), rng)   # edit and re-serialise
        t = json.dumps(h, indent=rng.choice([None, None, 1])).encode()
        t += b" " * rng.choice([0, 0, 1, 3, -len(t) % 8])
        data = base[8 + n:]
        r = rng.random()
        if r < 0.1:
            data = data + bytes(rng.randint(1, 8))
        elif r < 0.2:
            data = data[:-rng.randint(1, 8)]
        yield "structure", struct.pack("<Q", len(t)) + t + data


def test_fuzz_every_variant_loads_consistently_or_raises_safetensors_error(tmp_path):
    base = _base_file(tmp_path / "base.safetensors")
    loaded = raised = 0
    by_kind = {}
    rss0 = peak_rss_bytes()
    slowest = 0.0
    tracemalloc.start()
    try:
        for i, (kind, blob) in enumerate(_variants(base, n_per_kind=160, seed=1234)):
            path = tmp_path / f"v{i:04d}.safetensors"
            path.write_bytes(blob)
            t0 = time.perf_counter()
            try:
                state = weights.load_file(path)
            except SafetensorsError as e:
                assert str(path) in str(e), (kind, i, str(e))
                assert isinstance(e, ValueError)
                raised += 1
                by_kind.setdefault(kind, [0, 0])[1] += 1
                continue
            except Exception as e:  # noqa: BLE001 - anything else is a bug in the reader
                pytest.fail(f"variant {i} ({kind}) raised {type(e).__name__}: {e}")
            finally:
                slowest = max(slowest, time.perf_counter() - t0)
            # it loaded: every tensor must be exactly what the header says, bytes from the file
            infos, _ = weights.read_header(path)
            n = int.from_bytes(blob[:8], "little")
            data = blob[8 + n:]
            assert set(state) == set(infos), (kind, i)
            for name, t in state.items():
                info = infos[name]
                assert t.dtype == info.dtype and tuple(t.shape) == info.shape, (kind, i, name)
                assert t.numel() * t.element_size() == info.end - info.begin, (kind, i, name)
                assert raw_bytes(t) == data[info.begin:info.end], (kind, i, name)
            del state
            loaded += 1
            by_kind.setdefault(kind, [0, 0])[0] += 1
            path.unlink()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    grown = peak_rss_bytes() - rss0
    print(f"\nfuzz: {loaded + raised} variants, {loaded} loaded, {raised} raised; "
          f"per kind [loaded, raised]: {by_kind}; slowest {slowest * 1e3:.1f} ms; "
          f"traced peak {peak / 1e6:.2f} MB")
    assert loaded + raised >= 500
    assert by_kind["data_flip"] == [160, 0]          # data corruption is not detectable
    assert by_kind["truncate"][0] == 0               # every truncation is detected
    assert loaded > 160 and raised > 400             # both outcomes exercised beyond data flips
    assert slowest < 2.0
    assert peak < 8 * 1024 * 1024, peak              # no variant made the reader allocate much
    assert grown < 100 * 1024 * 1024, grown


# ----------------------------------------------------------------------------------------------
# 7. SD3 helpers


def _sd3_single_file():
    return {
        "model.diffusion_model.x_embedder.proj.weight": torch.randn(4, 2),
        "model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": torch.randn(3),
        "first_stage_model.decoder.conv_in.weight": torch.randn(2),
        "first_stage_model.encoder.down.0.block.0.conv1.weight": torch.randn(2),
        "text_encoders.clip_l.transformer.text_model.embeddings.token_embedding.weight":
            torch.randn(5),
        "text_encoders.clip_l.transformer.text_projection.weight": torch.randn(2),
    }


def test_sd3_component_strips_each_prefix():
    state = _sd3_single_file()
    mmdit = weights.sd3_component(state, "mmdit")
    assert set(mmdit) == {"x_embedder.proj.weight", "joint_blocks.0.x_block.attn.qkv.weight"}
    assert mmdit["x_embedder.proj.weight"] is state["model.diffusion_model.x_embedder.proj.weight"]
    vae = weights.sd3_component(state, "vae")
    assert set(vae) == {"decoder.conv_in.weight", "encoder.down.0.block.0.conv1.weight"}
    clip_l = weights.sd3_component(state, "clip_l")
    assert set(clip_l) == {"text_model.embeddings.token_embedding.weight",
                           "text_projection.weight"}
    # a single file that lacks a component: empty, not the whole file
    assert weights.sd3_component(state, "clip_g") == {}
    assert weights.sd3_component(state, "t5xxl") == {}
    # a bare file (one component, no prefixes) is returned unchanged
    bare = {"x_embedder.proj.weight": torch.randn(2), "final_layer.linear.bias": torch.randn(1)}
    got = weights.sd3_component(bare, "mmdit")
    assert got == bare and got is not bare
    assert all(got[k] is bare[k] for k in bare)
    with pytest.raises(ValueError, match="unet"):
        weights.sd3_component(state, "unet")
    assert weights.strip_prefix(state, "nothing.") == {}
    assert set(weights.strip_prefix(state, "text_encoders.")) == {
        "clip_l.transformer.text_model.embeddings.token_embedding.weight",
        "clip_l.transformer.text_projection.weight"}


def test_sd3_component_on_a_loaded_file(tmp_path):
    path = tmp_path / "sd3.safetensors"
    weights.save_file(_sd3_single_file(), path)
    state = weights.load_file(path)
    assert set(weights.sd3_component(state, "vae")) == {"decoder.conv_in.weight",
                                                         "encoder.down.0.block.0.conv1.weight"}


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(3, 4)
        self.norm = nn.LayerNorm(4)
        self.register_buffer("scale", torch.ones(2))


def test_load_strict_assigns_the_files_tensors(tmp_path):
    ref = Tiny()
    path = tmp_path / "tiny.safetensors"
    weights.save_file(ref.state_dict(), path)
    state = weights.load_file(path)
    model = Tiny()
    out = weights.load_strict(model, state, source=str(path), expect="Tiny")
    assert out is model
    for k, v in model.state_dict().items():
        assert v.data_ptr() == state[k].data_ptr(), k        # same storage: assigned, not copied
        assert torch.equal(v, ref.state_dict()[k])
    assert isinstance(model.proj.weight, nn.Parameter) and model.proj.weight.requires_grad
    # a model built on the meta device takes the tensors as they are
    with torch.device("meta"):
        meta_model = Tiny()
    weights.load_strict(meta_model, state, source=str(path), expect="Tiny")
    assert meta_model.proj.weight.device.type == "cpu"
    x = torch.randn(2, 3)
    assert torch.allclose(meta_model.proj(x), ref.proj(x))


def test_load_strict_lists_every_problem_in_one_error():
    model = Tiny()
    before = {k: v.data_ptr() for k, v in model.state_dict().items()}
    state = dict(Tiny().state_dict())
    del state["norm.bias"]                                  # missing
    state["proj.weight"] = torch.zeros(4, 5)                # mis-shaped
    state["joint_blocks.0.extra"] = torch.zeros(1)          # unexpected
    with pytest.raises(WeightsError) as e:
        weights.load_strict(model, state, source="ckpt/model.safetensors", expect="the tiny net")
    msg = str(e.value)
    assert isinstance(e.value, ValueError)
    assert "ckpt/model.safetensors" in msg and "the tiny net" in msg
    assert "1 missing: norm.bias" in msg
    assert "1 unexpected: joint_blocks.0.extra" in msg
    assert "1 mis-shaped: proj.weight file [4, 5] vs model [4, 3]" in msg
    assert "1 joint blocks" in msg                          # what the file looks like
    # nothing was loaded
    assert {k: v.data_ptr() for k, v in model.state_dict().items()} == before


def test_load_strict_long_lists_are_shortened():
    model = Tiny()
    state = dict(model.state_dict())
    state.update({f"junk.{i:02d}": torch.zeros(1) for i in range(20)})
    with pytest.raises(WeightsError, match=r"20 unexpected: junk\.00, .*\(12 more\)"):
        weights.load_strict(model, state, source="src.safetensors", expect="Tiny")


@pytest.mark.parametrize("keys, expected", [
    (["joint_blocks.0.x_block.attn.qkv.weight", "joint_blocks.0.context_block.mlp.fc1.weight",
      "joint_blocks.1.x_block.attn.qkv.weight", "joint_blocks.23.x_block.attn.qkv.weight",
      "x_embedder.proj.weight"], "an SD3 MMDiT with 3 joint blocks"),
    (["model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight",
      "first_stage_model.decoder.conv_in.weight"],
     "an SD3 single-file checkpoint with mmdit, vae"),
    (["transformer_blocks.0.attn.to_q.weight", "context_embedder.weight"],
     "an SD3 transformer in the diffusers layout"),
    (["input_blocks.0.0.weight", "middle_block.1.norm.weight", "output_blocks.0.0.weight"],
     "UNet"),
    (["down_blocks.0.attentions.0.proj_in.weight", "down_blocks.0.resnets.0.conv1.weight",
      "time_embedding.linear_1.weight"], "UNet"),
    (["encoder.down.0.block.0.conv1.weight", "decoder.up.0.block.0.conv1.weight"], "a VAE"),
    (["encoder.down_blocks.0.resnets.0.conv1.weight", "encoder.mid_block.attentions.0.to_q.weight",
      "decoder.up_blocks.0.resnets.0.conv1.weight"], "a VAE"),
    (["text_model.encoder.layers.0.mlp.fc1.weight"], "a text encoder"),
    (["encoder.block.0.layer.0.SelfAttention.q.weight", "shared.weight"], "a text encoder"),
    (["foo", "bar"], "an unrecognised checkpoint (2 tensors"),
])
def test_describe_keys(keys, expected):
    assert expected in weights.describe_keys(keys)
    assert expected in weights.describe_keys(iter(keys))   # any iterable of keys


def _diffusers_folder(tmp_path, sharded):
    comp = tmp_path / "sd3" / "transformer"
    comp.mkdir(parents=True)
    a = {"pos_embed.proj.weight": torch.randn(2, 3),
         "transformer_blocks.0.norm.weight": torch.randn(4)}
    b = {"context_embedder.weight": torch.randn(3, 3), "proj_out.bias": torch.randn(2)}
    if not sharded:
        weights.save_file({**a, **b}, comp / "diffusion_pytorch_model.safetensors")
    else:
        names = ["diffusion_pytorch_model-00001-of-00002.safetensors",
                 "diffusion_pytorch_model-00002-of-00002.safetensors"]
        weights.save_file(a, comp / names[0])
        weights.save_file(b, comp / names[1])
        index = {"metadata": {"total_size": 0},
                 "weight_map": {**{k: names[0] for k in a}, **{k: names[1] for k in b}}}
        (comp / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    return tmp_path / "sd3", {**a, **b}


@pytest.mark.parametrize("sharded", [False, True])
def test_load_diffusers(tmp_path, sharded):
    root, expected = _diffusers_folder(tmp_path, sharded)
    for got in (weights.load_diffusers(root, "transformer"),
                weights.load_diffusers(root / "transformer", "transformer"),  # component folder
                weights.load_diffusers(str(root), "transformer")):
        assert set(got) == set(expected)
        for k, v in expected.items():
            assert torch.equal(got[k], v)


@pytest.mark.parametrize("index_text", [
    "{not json", "[]", '"x"', "{}", '{"weight_map": 3}', '{"weight_map": ["a", "b"]}',
    '{"weight_map": {"a": 1}}', '{"weight_map": {"a": ["x"]}}', '{"weight_map": {"a": null}}',
    "[" * 100000,
], ids=["invalid_json", "list", "string", "no_weight_map", "map_is_int", "map_is_list",
        "shard_is_int", "shard_is_list", "shard_is_null", "deeply_nested"])
def test_load_diffusers_broken_index(tmp_path, index_text):
    comp = tmp_path / "sd3" / "transformer"
    comp.mkdir(parents=True)
    index = comp / "diffusion_pytorch_model.safetensors.index.json"
    index.write_text(index_text)
    with pytest.raises(SafetensorsError) as e:
        weights.load_diffusers(tmp_path / "sd3", "transformer")
    assert str(index) in str(e.value)


def test_load_diffusers_missing_shard_and_folder(tmp_path):
    root, _ = _diffusers_folder(tmp_path, sharded=True)
    shard = root / "transformer" / "diffusion_pytorch_model-00002-of-00002.safetensors"
    shard.unlink()
    with pytest.raises(FileNotFoundError, match="00002-of-00002"):
        weights.load_diffusers(root, "transformer")
    missing = tmp_path / "no_such_model"
    with pytest.raises(FileNotFoundError) as e:
        weights.load_diffusers(missing, "transformer")
    assert str(missing) in str(e.value) and "transformer" in str(e.value)
    # a folder without the component's files
    empty = tmp_path / "empty"
    (empty / "vae").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model"):
        weights.load_diffusers(empty, "vae")
