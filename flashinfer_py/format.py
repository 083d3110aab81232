"""The flash model directory: manifest, resident-tensor file, and validation on open.

A flash directory holds:

=====================  ==================================================================
``manifest.json``      format version, ModelArgs, storage formats, bundle layout, checksums
``dense.safetensors``  DRAM-resident tensors: embeddings, attention, norms, biases, LM head
``ffn_bundles.bin``    FFN neurons, one 4096-aligned record per neuron (csrc/bundle_format.h)
``tokenizer.json``     the tokenizer (plus tokenizer_config.json etc. when the source had them)
``predictors.npz``     optional: trained activation predictors
=====================  ==================================================================

bfloat16 tensors are stored with safetensors dtype U16 (numpy has no bfloat16), block formats
(q8_0, q4_0, q4_1) as U8 rows of blocks; the manifest's ``dtype`` (FFN records) and
``resident_formats`` (each resident matrix) say how to read them. Norms and biases are float32.

Format versions: 1 (float storage only; every resident matrix in ``dtype``) still opens;
2 added the block formats, ``resident_formats`` and the bundle's ``down_layout``.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Iterable, Optional

import numpy as np

from . import dtypes
from .config import ModelArgs
from .errors import FlashFormatError

FORMAT_NAME = "flashinfer_py"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
MANIFEST = "manifest.json"
DENSE_FILE = "dense.safetensors"
BUNDLE_FILE = "ffn_bundles.bin"
TOKENIZER_FILE = "tokenizer.json"
_HINT = "re-run `flashinfer-py convert` to rebuild the directory"


# --------------------------------------------------------------------------- dense tensors
def dense_names(args: ModelArgs, down_scales: bool = False) -> list[tuple[str, str]]:
    """(name, kind) of every resident tensor; kind 'matrix' is stored in a storage format,
    'vector' (norms, biases) in float32, 'scales' (the codes layout's down scales, with
    `down_scales`) in float16. Norm weights are stored as the factor the model multiplies by
    (Gemma's ``1 + w`` is added at conversion)."""
    names = [("tok_embeddings", "matrix")]
    if not args.uses_rope:
        names.append(("pos_embeddings", "matrix"))
    if args.projects_embeddings:
        names += [("project_in", "matrix"), ("project_out", "matrix")]
    for i in range(args.num_hidden_layers):
        names += _layer_names(args, f"layers.{i}.")
    if args.pre_norm:  # post-LayerNorm OPT (opt-350m) has no final norm
        names.append(("norm", "vector"))
        if args.norm == "layernorm":
            names.append(("norm_bias", "vector"))
    if not args.tie_word_embeddings:
        names.append(("lm_head", "matrix"))
    if down_scales:
        names += [(f"layers.{i}.ffn_down_scales", "scales") for i in range(args.num_hidden_layers)]
    return names


def _layer_names(args: ModelArgs, p: str) -> list[tuple[str, str]]:
    names = [(p + n, "matrix") for n in ("wq", "wk", "wv", "wo")]
    if args.attention_bias:
        names += [(p + n, "vector") for n in ("bq", "bk", "bv")]
    if args.attention_out_bias:
        names.append((p + "bo", "vector"))
    norms = ["attn_norm", "ffn_norm"]
    if args.qk_norm:
        norms += ["q_norm", "k_norm"]
    if args.post_norms:
        norms += ["attn_post_norm", "ffn_post_norm"]
    names += [(p + n, "vector") for n in norms]
    if args.norm == "layernorm":
        names += [(p + "attn_norm_bias", "vector"), (p + "ffn_norm_bias", "vector")]
    if args.ffn_bias:
        names += [(p + "ffn_up_bias", "vector"), (p + "ffn_down_bias", "vector")]
    return names


class SafetensorsStreamWriter:
    """Write a safetensors file one tensor at a time, so conversion never holds all of it.

    The header (names, dtypes, shapes, offsets) is fixed up front from the planned specs;
    tensors must then be written in the same order.
    """

    _DT = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(np.uint16): "U16",
           np.dtype(np.uint8): "U8"}

    def __init__(self, path: Path, specs: list[tuple[str, np.dtype, tuple]], metadata: dict):
        self.path = Path(path)
        self._specs = [(n, np.dtype(d), tuple(int(x) for x in s)) for n, d, s in specs]
        header: dict = {"__metadata__": {k: str(v) for k, v in metadata.items()}}
        off = 0
        for name, dt, shape in self._specs:
            nbytes = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
            header[name] = {"dtype": self._DT[dt], "shape": list(shape), "data_offsets": [off, off + nbytes]}
            off += nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # keep the data section 8-byte aligned
        self._f = open(self.path, "wb")
        self._f.write(struct.pack("<Q", len(blob)) + blob)
        self._next = 0

    def write(self, name: str, array: np.ndarray) -> None:
        exp_name, dt, shape = self._specs[self._next]
        if name != exp_name or array.dtype != dt or tuple(array.shape) != shape:
            raise ValueError(f"expected tensor {exp_name} {dt} {shape}, got {name} {array.dtype} {array.shape}")
        self._f.write(np.ascontiguousarray(array).tobytes())
        self._next += 1

    def close(self) -> None:
        if self._next != len(self._specs):
            missing = [n for n, _, _ in self._specs[self._next:]]
            raise ValueError(f"{self.path}: tensors never written: {missing[:5]}")
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()


# --------------------------------------------------------------------------- manifest
def file_digest(path: Path, progress=None) -> dict:
    """sha256 and size of a file, streamed in 8 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
            if progress is not None:
                progress.update(len(chunk))
    return {"sha256": h.hexdigest(), "bytes": os.path.getsize(path)}


def write_manifest(directory: Path, manifest: dict) -> None:
    path = Path(directory) / MANIFEST
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def read_manifest(directory: Path) -> dict:
    """Read and validate ``manifest.json``; raises FlashFormatError naming the path."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not directory.is_dir():
        raise FlashFormatError(f"{directory}: not a directory. Pass a flash model directory made by "
                               "`flashinfer-py convert SRC DST`.")
    if not path.is_file():
        raise FlashFormatError(f"{path}: missing. {directory} is not a flash model directory; "
                               "convert a checkpoint first with `flashinfer-py convert SRC DST`.")
    try:
        m = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FlashFormatError(f"{path}: not valid JSON ({e}); {_HINT}.") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT_NAME:
        raise FlashFormatError(f"{path}: not a {FORMAT_NAME} manifest; {_HINT}.")
    ver = m.get("format_version")
    if ver not in READABLE_VERSIONS:
        raise FlashFormatError(f"{path}: format_version {ver!r}, this flashinfer_py reads versions "
                               f"{', '.join(map(str, READABLE_VERSIONS))}; {_HINT} with this "
                               "version.")
    for key, kind in (("model", dict), ("dtype", str), ("files", dict), ("bundle", dict),
                      ("checksums", dict)):
        if not isinstance(m.get(key), kind):
            raise FlashFormatError(f"{path}: field {key!r} missing or not a {kind.__name__}; "
                                   f"{_HINT}.")
    for name, meta in m["checksums"].items():
        if (Path(name).name != name or not isinstance(meta, dict)
                or not isinstance(meta.get("bytes"), int) or not isinstance(meta.get("sha256"), str)):
            raise FlashFormatError(f"{path}: checksums entry {name!r} is not a file name with "
                                   f"bytes and sha256; {_HINT}.")
    files = m["files"]
    for key in ("dense", "bundles"):
        if not isinstance(files.get(key), str) or files[key] not in m["checksums"]:
            raise FlashFormatError(f"{path}: files.{key} must name a file listed in checksums; "
                                   f"{_HINT}.")
    if not isinstance(m.get("resident_formats", {}), dict):
        raise FlashFormatError(f"{path}: resident_formats is not an object; {_HINT}.")
    fmts = [m["dtype"], *m.get("resident_formats", {}).values()]
    bad = [f for f in fmts if not isinstance(f, str) or f not in dtypes.FORMATS
           or (ver == 1 and dtypes.FORMATS[f].quantized)]
    if bad:
        raise FlashFormatError(f"{path}: unknown storage format {bad[0]!r}; {_HINT}.")
    return m


def resident_formats(manifest: dict) -> dict:
    """Storage format of every resident matrix: the manifest's ``resident_formats`` (version
    2), or its one ``dtype`` (version 1)."""
    if "resident_formats" in manifest:
        return dict(manifest["resident_formats"])
    from .config import ModelArgs

    args = ModelArgs.from_dict(manifest["model"])
    return {n: manifest["dtype"] for n, kind in dense_names(args) if kind == "matrix"}


def check_files(directory: Path, manifest: dict, verify: bool = False, progress_factory=None) -> None:
    """Sizes of every listed file must match the manifest; with verify=True, also sha256."""
    directory = Path(directory)
    for name, meta in manifest["checksums"].items():
        p = directory / name
        if not p.is_file():
            raise FlashFormatError(f"{p}: missing (listed in {directory / MANIFEST}); {_HINT}.")
        size = p.stat().st_size
        if size != meta["bytes"]:
            raise FlashFormatError(f"{p}: {size} bytes, manifest says {meta['bytes']}: the file is "
                                   f"truncated or was modified; {_HINT}.")
        if verify:
            bar = progress_factory(size, f"verify {name}") if progress_factory else None
            digest = file_digest(p, bar)
            if bar is not None:
                bar.close()
            if digest["sha256"] != meta["sha256"]:
                raise FlashFormatError(f"{p}: sha256 mismatch (file corrupted); {_HINT}.")


def load_dense(directory: Path, manifest: dict, names: Optional[Iterable[str]] = None) -> dict:
    """Load resident tensors (storage dtype kept; vectors float32) with plain reads into fresh
    arrays: a memory map would briefly count the file's pages on top of the copies."""
    from .checkpoint import CheckpointError, _SafetensorsFile

    path = Path(directory) / manifest["files"]["dense"]
    try:
        f = _SafetensorsFile(path)
    except CheckpointError as e:
        raise FlashFormatError(f"{e} ({_HINT})") from None
    try:
        keys = list(names) if names is not None else list(f.entries)
        missing = [k for k in keys if k not in f.entries]
        if missing:
            raise FlashFormatError(f"{path}: tensors {missing[:3]} missing; {_HINT}.")
        return {k: f.read_raw(k) for k in keys}
    except CheckpointError as e:
        raise FlashFormatError(f"{e} ({_HINT})") from None
    finally:
        f.close()
