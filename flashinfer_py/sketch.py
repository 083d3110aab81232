"""The 4-bit sketch: a low-bit copy of every neuron's up (and gate) row that ranks the neurons
the neuron cache does not hold.

Under a DRAM budget the cache holds only part of each layer's FFN. To decide which uncached
neurons are worth reading for the current token, the runtime estimates each one's activation
|act(gate.x) * up.x| (times the norm of its down column) from a 4-bit copy of its gate and up
rows (``csrc/kernels_q4.h``: blocks of 32 with an fp16 scale, llama.cpp's Q4_0 layout). No
training: the estimate ranks neurons almost as well as the exact activation
(benchmarks/RESULTS_sparse.md).

Two tiers, every neuron in exactly one: the neuron cache holds full records (exact, and the
neurons that are computed), the sketch store holds the 4-bit copies of the others. When a
neuron enters the cache its sketch slot is given to the neuron that leaves, whose record is
quantized into it from the cache row (the same kernel that built the file, so bit for bit the
file's sketch). DRAM per neuron: a full record when cached, 648 bytes instead of 4096 for
SmolLM2 when not.

``ffn_sketch.bin``: the sketches of every neuron, layer-major, ``record_bytes`` each, no header
(its shape, record size and sha256 are in ``predictors.npz``, which `train-predictors` writes
with it).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import numpy as np

from . import kernels
from .config import ModelArgs
from .dtypes import RecordLayout, SplitRows
from .errors import FlashFormatError

SKETCH_FILE = "ffn_sketch.bin"
SKETCH_BITS = 4
_BLOCK, _BLOCK_BYTES = 32, 18


# "auto" picks the gate sketch where the full one would take more than this share of a cached
# neuron's bytes (RuntimeConfig.sketch; 4-bit records: 64%, q8_0 35%, float16 19%).
GATE_SKETCH_SHARE = 0.4


def sketch_parts(args: ModelArgs, kind: str = "full") -> list[str]:
    """The record parts a sketch holds: up, then gate for gated FFNs ("full"); the gate alone
    ("gate", gated FFNs only)."""
    if kind == "gate":
        if not args.gated:
            raise ValueError("sketch='gate' is for gated FFNs (SwiGLU, GeGLU); this model's FFN "
                             "has no gate: use sketch='full'")
        return ["gate"]
    return ["up", "gate"] if args.gated else ["up"]


def sketch_record_bytes(args: ModelArgs, kind: str = "full") -> int:
    """Bytes of one neuron's sketch: per part, ceil(d / 32) blocks of 18 bytes."""
    return len(sketch_parts(args, kind)) * -(-args.hidden_size // _BLOCK) * _BLOCK_BYTES


def resolve_sketch(kind: str, args: ModelArgs, row_bytes: int, calibration) -> str:
    """RuntimeConfig.sketch made concrete ("full" or "gate") for a model whose cached neuron
    takes `row_bytes` of DRAM; "gate" needs the calibration's mean |up.x| (ValueError when an
    explicit "gate" cannot be had)."""
    has_means = calibration is not None and calibration.up_mean is not None
    if kind == "gate":
        sketch_parts(args, "gate")  # a model without a gate: the error says so
        if not has_means:
            raise ValueError("sketch='gate' scores the gate with each neuron's mean |up.x| "
                             "from calibration, which this predictors.npz predates: run "
                             "`flashinfer-py train-predictors DIR` again")
        return "gate"
    if kind == "auto":
        big = sketch_record_bytes(args) > GATE_SKETCH_SHARE * row_bytes
        return "gate" if (args.gated and has_means and big) else "full"
    return "full"


def score_scale(kind: str, down_norm: np.ndarray, up_mean: Optional[np.ndarray] = None) -> np.ndarray:
    """The per-neuron factor of a sketch score (any shape, float32): ||down||, times the
    calibration's mean |up.x| for the gate sketch."""
    if kind != "gate":
        return np.ascontiguousarray(down_norm, np.float32)
    if up_mean is None:
        raise ValueError("the gate sketch needs the calibration's mean |up.x|")
    return np.ascontiguousarray(np.asarray(down_norm, np.float32) * np.asarray(up_mean, np.float32))


def sketch_scores(args: ModelArgs, kind: str, x: np.ndarray, sketches: np.ndarray,
                  scale: np.ndarray, threads: int = 0) -> np.ndarray:
    """max_t |h~_t| * scale of every sketch record: h~ = act(gate~.x) * (up~.x) for a full
    sketch of a gated FFN, act(up~.x) without a gate, act(gate~.x) for the gate sketch (one
    part: the kernel's ungated form)."""
    return kernels.q4_scores(x, sketches, args.hidden_size, args.gated and kind != "gate",
                             args.hidden_act, args.act_param, scale=scale, threads=threads)


def quantize_rows(args: ModelArgs, layout: RecordLayout, rows: np.ndarray, src_rows,
                  out: np.ndarray, dst_rows, kind: str = "full") -> None:
    """Sketch records of bundle records rows[src_rows] (in `layout`: any storage format; block
    formats are expanded to float32 first) into out[dst_rows] (uint8)."""
    off = layout.offsets
    kernels.quantize_q4(rows, [off[p] for p in sketch_parts(args, kind)], args.hidden_size,
                        src_rows, out, dst_rows, fmt=layout.fmt.name)


def write_sketch(args: ModelArgs, layout: RecordLayout, rows_by_layer, path: Path) -> None:
    """Write ``ffn_sketch.bin`` from every layer's bundle records (a dense model's rows)."""
    rec, f = sketch_record_bytes(args), args.intermediate_size
    ids = np.arange(f, dtype=np.int64)
    tmp = Path(str(path) + ".tmp")
    with open(tmp, "wb") as fh:
        for rows in rows_by_layer:
            out = np.empty((f, rec), np.uint8)
            quantize_rows(args, layout, rows, ids, out, ids)
            fh.write(out.tobytes())
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def read_sketch_layer(path: Path, args: ModelArgs, layer: int, ids: np.ndarray,
                      kind: str = "full") -> np.ndarray:
    """The sketch records of neurons `ids` of `layer` (uint8 [len(ids), record_bytes]); the
    file holds full sketches (up, gate): kind "gate" keeps their gate halves."""
    rec, f = sketch_record_bytes(args), args.intermediate_size
    want = args.num_hidden_layers * f * rec
    size = os.path.getsize(path)
    if size != want:
        raise FlashFormatError(f"{path}: {size} bytes, but {args.num_hidden_layers} layers x "
                               f"{f} neurons x {rec} bytes need {want}; rebuild it with "
                               "`flashinfer-py train-predictors`.")
    block = np.fromfile(path, dtype=np.uint8, count=f * rec, offset=layer * f * rec)
    if kind == "gate":  # the records' second part
        return block.reshape(f, rec)[ids, rec - sketch_record_bytes(args, "gate"):]
    return block.reshape(f, rec)[ids]


class SketchStore:
    """The second tier: per layer, the 4-bit sketches of the neurons the cache does not hold.

    Per layer (allocated once): ``data`` (d_ff - capacity, record_bytes) uint8 sketches,
    ``slot_id`` the neuron in each slot, ``id_slot`` (d_ff,) each neuron's slot or -1 (cached),
    ``scale`` each slot's neuron's score factor (``factor`` [L, d_ff], from score_scale: the
    down-column norm, scores |h~| * ||down||).

    kind "gate" (RuntimeConfig.sketch): the sketches hold the gate rows only and score
    |act(gate~.x)| * ||down|| * mean|up.x|, `up_mean` [L, d_ff] the calibration's means.
    """

    def __init__(self, path: Path, args: ModelArgs, cached_ids: list, down_norm: np.ndarray,
                 layout: RecordLayout, threads: int = 0, kind: str = "full",
                 up_mean: Optional[np.ndarray] = None):
        kind = "gate" if kind == "gate" else "full"  # RuntimeConfig.sketch, resolved
        self.args, self.f, self.layout, self.kind = args, args.intermediate_size, layout, kind
        self.threads = threads  # compute threads of the scoring kernel (0: every core)
        self.rec = sketch_record_bytes(args, kind)
        self.factor = score_scale(kind, down_norm, up_mean)  # [L, d_ff] each neuron's score factor
        self.data, self.slot_id, self.id_slot, self.scale = [], [], [], []
        for layer, cached in enumerate(cached_ids):
            held = np.zeros(self.f, bool)
            held[np.asarray(cached, np.int64)] = True
            ids = np.flatnonzero(~held).astype(np.int64)
            self.data.append(np.ascontiguousarray(read_sketch_layer(path, args, layer, ids, kind)))
            self.slot_id.append(ids)
            slots = np.full(self.f, -1, np.int64)
            slots[ids] = np.arange(ids.size)
            self.id_slot.append(slots)
            self.scale.append(np.ascontiguousarray(self.factor[layer][ids]))

    def scores(self, layer: int, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(ids, estimated |activation| x ||down||, max over the rows of x) of every neuron
        in the store for `layer`."""
        return self.slot_id[layer], sketch_scores(self.args, self.kind, x, self.data[layer],
                                                  self.scale[layer], self.threads)

    def swap(self, layer: int, entering: np.ndarray, leaving: np.ndarray, rows: np.ndarray,
             leaving_rows: np.ndarray) -> None:
        """Neurons `entering` go to the cache and `leaving` (their cache rows: rows[leaving_rows])
        come here: each leaving neuron is quantized into the slot an entering one frees."""
        if len(entering) != len(leaving):
            raise ValueError(f"layer {layer}: {len(entering)} neurons enter the cache but "
                             f"{len(leaving)} leave; the two tiers trade slots one for one")
        slots = self.id_slot[layer][entering]
        if (slots < 0).any():
            raise ValueError(f"layer {layer}: neurons {entering[slots < 0][:5]} are not in the "
                             "sketch store (already cached?)")
        if isinstance(rows, SplitRows):  # a split cache: up (and gate) sit in rows.up
            rows = rows.up
        quantize_rows(self.args, self.layout, rows, np.asarray(leaving_rows, np.int64),
                      self.data[layer], slots, self.kind)
        self.slot_id[layer][slots] = leaving
        self.id_slot[layer][leaving] = slots
        self.id_slot[layer][entering] = -1
        self.scale[layer][slots] = self.factor[layer][leaving]

    @property
    def nbytes(self) -> int:
        return sum(d.nbytes + s.nbytes + i.nbytes + c.nbytes for d, s, i, c in
                   zip(self.data, self.slot_id, self.id_slot, self.scale)) + self.factor.nbytes


def down_norms(kernel, rows_by_layer) -> np.ndarray:
    """||down_j|| of every neuron: [L, d_ff] float32 (kernel: the ffn.FfnOnRows that reads
    these records; rows_by_layer: every neuron's record, in id order)."""
    return np.stack([np.linalg.norm(kernel.part_f32(i, r, "down"), axis=1)
                     for i, r in enumerate(rows_by_layer)]).astype(np.float32)


def check_sketch(path: Path, args: ModelArgs, meta: Optional[dict]) -> None:
    """The sketch file exists and has the size its metadata promises."""
    if meta is None:
        return
    if not path.is_file():
        raise FlashFormatError(f"{path}: missing, but predictors.npz lists it; rebuild it with "
                               "`flashinfer-py train-predictors`.")
    want = args.num_hidden_layers * args.intermediate_size * sketch_record_bytes(args)
    if path.stat().st_size != want or meta.get("record_bytes") != sketch_record_bytes(args):
        raise FlashFormatError(f"{path}: does not match this model ({want} bytes expected); "
                               "rebuild it with `flashinfer-py train-predictors`.")
