"""Storage formats: the one table the converter, the reader, the runtime and the kernels ask.

Sizes come from the native core (``csrc/bundle_format.h``, where the block layouts are defined
once); this module adds what Python needs: the numpy dtype an array of the format is held in,
the GGUF tensor type with the same bytes, and a line for ``--help``.

=========  =====================================  =============  ============  ============
format     a block of 32 values                   bits / weight  numpy array   GGUF type
=========  =====================================  =============  ============  ============
float32    (no blocks)                            32             float32       F32
float16    (no blocks)                            16             float16       F16
bfloat16   (no blocks)                            16             uint16 bits   BF16
q8_0       fp16 d, 32 x int8 q; d * q             8.5            uint8 rows    Q8_0
q4_0       fp16 d, 16 B nibbles; d * (q - 8)      4.5            uint8 rows    Q4_0
q4_1       fp16 d, fp16 m, 16 B nibbles; d*q + m  5.0            uint8 rows    Q4_1
=========  =====================================  =============  ============  ============

A row of ``n`` values in a block format is ``ceil(n / 32)`` blocks, the last zero padded.
:class:`RecordLayout` says where each part of a neuron's bundle record lies.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from . import kernels
from ._core import storage_formats as _storage_formats

__all__ = ["FLOAT_FORMATS", "FORMATS", "QUANTIZED_FORMATS", "RecordLayout", "StorageFormat",
           "storage_format", "to_float32", "to_storage"]


@dataclass(frozen=True)
class StorageFormat:
    """One storage format (a row of the table above)."""

    name: str
    code: int             # DType in csrc/bundle_format.h (the bundle header's dtype field)
    block: int            # values per block (1: a float format)
    block_bytes: int
    elem_bytes: int       # bytes of one element of the numpy array that holds it
    code_bits: int        # bits of one quantized value (0: a float format)
    quantized: bool
    numpy: np.dtype       # numpy dtype of arrays in this format (uint8 rows for blocks)
    gguf_type: str        # the GGUF tensor type whose bytes are exactly these
    summary: str          # for --help

    def row_bytes(self, n: int) -> int:
        """Bytes of a row of n values."""
        return -(-int(n) // self.block) * self.block_bytes

    def row_elems(self, n: int) -> int:
        """Elements of the numpy array holding a row of n values."""
        return self.row_bytes(n) // self.elem_bytes

    def code_bytes(self, n: int) -> int:
        """Bytes of the codes of n values without their scales (the "codes" down layout)."""
        return -(-int(n) // 32) * 32 * self.code_bits // 8

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.block_bytes / self.block


_EXTRA = {  # name -> (numpy dtype, GGUF type, --help line)
    "float32": (np.float32, "F32", "32 bits, exact"),
    "float16": (np.float16, "F16", "16 bits"),
    "bfloat16": (np.uint16, "BF16", "16 bits, float32's range"),
    "q8_0": (np.uint8, "Q8_0", "8.5 bits a weight, near float16 quality"),
    "q4_0": (np.uint8, "Q4_0", "4.5 bits, the fewest bytes"),
    "q4_1": (np.uint8, "Q4_1", "5 bits, a per-block minimum: less error than q4_0"),
}

FORMATS: dict[str, StorageFormat] = {}
for _f in _storage_formats():
    _np, _gguf, _summary = _EXTRA[_f["name"]]
    FORMATS[_f["name"]] = StorageFormat(
        _f["name"], _f["code"], _f["block_elems"], _f["block_bytes"], _f["elem_bytes"],
        _f["code_bits"], _f["quantized"], np.dtype(_np), _gguf, _summary)
FLOAT_FORMATS = tuple(n for n, f in FORMATS.items() if not f.quantized)
QUANTIZED_FORMATS = tuple(n for n, f in FORMATS.items() if f.quantized)


def storage_format(name, what: str = "dtype") -> StorageFormat:
    """The format called `name`; a ValueError naming `what` and the choices otherwise."""
    if isinstance(name, StorageFormat):
        return name
    try:
        return FORMATS[name]
    except (KeyError, TypeError):
        raise ValueError(f"{what} must be one of {', '.join(FORMATS)}, not {name!r}") from None


def to_storage(a: np.ndarray, fmt) -> np.ndarray:
    """float32 values [..., n] in format `fmt`: float formats round to nearest even; block
    formats quantize each row (llama.cpp's reference rounding) into uint8 rows of blocks."""
    f = storage_format(fmt)
    a = np.ascontiguousarray(a, dtype=np.float32)
    if not f.quantized:
        return kernels.from_float32(a, f.name)
    rows = a.reshape(-1, a.shape[-1])
    return kernels.quantize(rows, f.name).reshape(*a.shape[:-1], -1)


def to_float32(a: np.ndarray, fmt, length: Optional[int] = None) -> np.ndarray:
    """Stored values back to float32 (exact for float formats); block formats need the row
    length `length` (values per row; the bytes of a row may hold a padded tail)."""
    f = storage_format(fmt)
    if not f.quantized:
        return kernels.to_float32(np.ascontiguousarray(a, dtype=f.numpy))
    if length is None:
        raise ValueError(f"dequantizing {f.name} rows needs their length in values")
    rows = np.ascontiguousarray(a, np.uint8).reshape(-1, a.shape[-1])
    return kernels.dequantize(rows, f.name, length).reshape(*a.shape[:-1], length)


# ------------------------------------------------------------------------------ records
# What convert's down_layout may ask for ("blocks" or "codes": RecordLayout.down_layout).
DOWN_LAYOUTS = ("auto", "blocks", "codes")


class SplitRows:
    """The rows of a split neuron cache (``cache.NeuronCache(split=True)``): ``up`` holds each
    record's parts before its down part (up, and gate) at their record offsets, ``down`` the
    down parts at offset 0, row i of both the same neuron; ``split`` is the record offset (in
    elements) where ``down``'s rows begin, so that ``kernels.ffn_rows`` takes record offsets
    for either. Indexing (``rows[-k:]``, ``rows[sel]``) indexes both; ``shape`` and ``len`` are
    the up matrix's."""

    __slots__ = ("up", "down", "split")

    def __init__(self, up: np.ndarray, down: np.ndarray, split: int):
        if len(up) != len(down):
            raise ValueError(f"split rows: {len(up)} up rows but {len(down)} down rows")
        self.up, self.down, self.split = up, down, int(split)

    def __getitem__(self, k) -> "SplitRows":
        if isinstance(k, tuple) or np.isscalar(k):
            raise TypeError("SplitRows index rows only (a slice, a mask or an index array); "
                            "take columns from .up or .down, or use RecordLayout.part_view")
        return SplitRows(self.up[k], self.down[k], self.split)

    def __len__(self) -> int:
        return len(self.up)

    @property
    def shape(self) -> tuple:
        return self.up.shape


@dataclass(frozen=True)
class RecordLayout:
    """Where the parts of one neuron's bundle record are (``csrc/bundle_format.h``).

    ``down_layout`` is ``"blocks"`` (the down column is a row of blocks like the other parts)
    or ``"codes"`` (a GGUF's down_proj kept exactly: the record holds the column's codes, the
    scales are resident as ``layers.{i}.ffn_down_scales``).
    """

    fmt: StorageFormat
    parts: tuple
    d_model: int
    part_bytes: tuple
    part_offsets: tuple    # bytes from the start of the record
    down_layout: str
    record_bytes: int

    @classmethod
    def build(cls, fmt, parts, d_model: int, down_layout: str = "blocks",
              record_bytes: int = 0, alignment: int = 4096) -> "RecordLayout":
        """The layout the bundle writer makes for this shape (bundle_format.cpp's make_header)."""
        f = storage_format(fmt)
        sizes = tuple(f.code_bytes(d_model) if p == "down" and down_layout == "codes"
                      else f.row_bytes(d_model) for p in parts)
        offs = tuple(int(sum(sizes[:i])) for i in range(len(sizes)))
        rec = record_bytes or -(-sum(sizes) // alignment) * alignment
        return cls(f, tuple(parts), int(d_model), sizes, offs, down_layout, int(rec))

    @classmethod
    def from_manifest(cls, manifest: dict) -> "RecordLayout":
        """From a flash directory's manifest (version 1 manifests: float parts of d_model)."""
        b = manifest["bundle"]
        return cls.build(manifest["dtype"], b["parts"], b["d_model"],
                         b.get("down_layout", "blocks"), int(b["record_bytes"]))

    @property
    def payload_bytes(self) -> int:
        """The parts' bytes: one record without its padding."""
        return int(sum(self.part_bytes))

    @property
    def offsets(self) -> dict:
        """Offset of each part in elements of the record's numpy array (bytes for blocks)."""
        return {p: o // self.fmt.elem_bytes for p, o in zip(self.parts, self.part_offsets)}

    @property
    def codes(self) -> bool:
        return self.down_layout == "codes"

    @property
    def split_at(self) -> int:
        """Where a split neuron cache cuts a record (bytes): the down part's offset for FFNs
        without a gate, whose sparse FFN reads every cached up part and few down parts (one
        stream of up parts instead of up parts a record apart); 0 (whole rows) for gated FFNs,
        whose fused kernel reads each record whole."""
        return 0 if "gate" in self.parts else self.part_offsets[self.parts.index("down")]

    @property
    def cache_row_bytes(self) -> int:
        """DRAM bytes of one cached neuron: its parts rounded up to 64 (a packed neuron cache,
        split or not: split, the up rows take split_at bytes and the down rows the rest)."""
        return min(-(-self.payload_bytes // 64) * 64, self.record_bytes)

    def part_view(self, rows: np.ndarray, part: str) -> np.ndarray:
        """One part of records `rows` (their numpy array: elements, or bytes for blocks), as a
        view: writing to it writes the records."""
        i = self.parts.index(part)
        e = self.fmt.elem_bytes
        if isinstance(rows, SplitRows):  # the down parts at the start of their own rows
            if part == "down":
                return rows.down[:, :self.part_bytes[i] // e]
            rows = rows.up
        return rows[:, self.part_offsets[i] // e:(self.part_offsets[i] + self.part_bytes[i]) // e]

    def part_f32(self, rows: np.ndarray, part: str, down_scales: Optional[np.ndarray] = None,
                 ids: Optional[np.ndarray] = None) -> np.ndarray:
        """float32 [n, d_model] values of one part of records `rows` (the codes layout's down
        part needs the layer's `down_scales` and the rows' neuron `ids`, default 0..n-1)."""
        raw = np.ascontiguousarray(self.part_view(rows, part))
        if not (part == "down" and self.codes):
            return to_float32(raw, self.fmt, self.d_model)
        if down_scales is None:
            raise ValueError("the codes layout's down part needs the layer's down_scales")
        ids = np.arange(len(rows)) if ids is None else np.asarray(ids, np.int64)
        return codes_to_float32(raw, self.fmt, self.d_model, down_scales, ids)


def codes_to_float32(codes: np.ndarray, fmt, d_model: int, scales: np.ndarray,
                     ids: np.ndarray) -> np.ndarray:
    """Values of down columns in the codes layout: codes [n, code bytes] uint8 of neurons
    `ids`, scales float16 [d_ff / 32, 1 or 2, d_model] -> float32 [n, d_model]."""
    f = storage_format(fmt)
    c = np.ascontiguousarray(codes, np.uint8)
    if f.code_bits == 8:
        q = c.view(np.int8).astype(np.float32)
    else:  # 16 bytes per 32 values: byte i = value i (low nibble) | value i + 16 (high)
        g = c.reshape(len(c), -1, 16)
        q = np.concatenate([g & 0xF, g >> 4], axis=2).reshape(len(c), -1).astype(np.float32)
    q = q[:, :d_model]
    sc = np.asarray(scales)[np.asarray(ids) // 32].astype(np.float32)  # [n, 1|2, d_model]
    d = sc[:, 0]
    if f.name == "q4_1":
        return d * q + sc[:, 1]
    if f.name == "q4_0":
        return d * (q - 8)
    return d * q
