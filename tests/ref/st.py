"""st.py — a tiny safetensors reader/writer on numpy (no torch, no safetensors package).

read_header(path) -> (header dict without __metadata__, data start offset)
load(path, names=None) -> {name: np.ndarray float32}   (F32, F16, BF16 converted to float32)
load_model_dir(dir) -> {name: np.ndarray float32}       (model.safetensors or sharded + index)
tensor_dtype(dir, name) -> "F32", "BF16", ... as stored, or None when absent
bf16_round(a) -> a rounded to bf16 (nearest even) and widened back to float32
save(path, {name: np.ndarray}, dtype="F32"|"F16"|"BF16") writes a file (bf16 by round-to-nearest-even)
"""
import json
import os
import struct

import numpy as np

_NP = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"),
       "F64": np.dtype("<f8"), "I64": np.dtype("<i8"), "I32": np.dtype("<i4")}


def read_header(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        hdr = json.loads(f.read(n).decode("utf-8"))
    hdr.pop("__metadata__", None)
    return hdr, 8 + n


def _to_f32(raw, dtype):
    if dtype == "BF16":
        return (raw.astype(np.uint32) << 16).view(np.float32)
    return raw.astype(np.float32)


def load(path, names=None):
    hdr, start = read_header(path)
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    out = {}
    for name, info in hdr.items():
        if names is not None and name not in names:
            continue
        dt = info["dtype"]
        if dt not in _NP:
            raise ValueError("%s: tensor %s: unsupported dtype %s" % (path, name, dt))
        a, b = info["data_offsets"]
        raw = np.frombuffer(mm[start + a:start + b].tobytes(), dtype=_NP[dt])
        shape = tuple(info["shape"])
        if raw.size != int(np.prod(shape, dtype=np.int64)):
            raise ValueError("%s: tensor %s: %d elements for shape %s" % (path, name, raw.size, shape))
        out[name] = _to_f32(raw, dt).reshape(shape)
    return out


def model_files(d):
    """The safetensors files of a model directory, in a stable order."""
    idx = os.path.join(d, "model.safetensors.index.json")
    if os.path.exists(idx):
        with open(idx) as f:
            wm = json.load(f)["weight_map"]
        return sorted(set(wm.values()))
    return ["model.safetensors"]


def load_model_dir(d):
    out = {}
    for fn in model_files(d):
        t = load(os.path.join(d, fn))
        dup = set(t) & set(out)
        if dup:
            raise ValueError("%s: tensors repeated across shards: %s" % (fn, sorted(dup)[:3]))
        out.update(t)
    return out


def tensor_dtype(d, name):
    for fn in model_files(d):
        hdr, _ = read_header(os.path.join(d, fn))
        if name in hdr:
            return hdr[name]["dtype"]
    return None


def bf16_round(a):
    return (f32_to_bf16_bits(a).astype(np.uint32) << 16).view(np.float32).reshape(np.shape(a))


def f32_to_bf16_bits(a):
    x = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
    x = (x + 0x7FFF + ((x >> 16) & 1)) >> 16
    return x.astype(np.uint16)


def save(path, tensors, dtype="F32"):
    hdr = {"__metadata__": {"format": "pt"}}
    blobs = []
    off = 0
    for name in sorted(tensors):
        a = np.asarray(tensors[name], dtype=np.float32)
        if dtype == "F32":
            b = a.astype("<f4").tobytes()
        elif dtype == "F16":
            b = a.astype("<f2").tobytes()
        elif dtype == "BF16":
            b = f32_to_bf16_bits(a).astype("<u2").tobytes()
        else:
            raise ValueError("dtype " + dtype)
        hdr[name] = {"dtype": dtype, "shape": list(a.shape), "data_offsets": [off, off + len(b)]}
        off += len(b)
        blobs.append(b)
    h = json.dumps(hdr, separators=(",", ":"), sort_keys=True).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)
