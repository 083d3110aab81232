"""Checkpoint -> flash model directory.

Streams tensor by tensor (peak DRAM: one layer's FFN in float32 plus one resident tensor), writes
into a temporary directory next to the destination and renames it into place at the end, and
never replaces an existing directory unless ``force=True`` (and even then only after the new one
is complete).

Storage formats (``flashinfer_py.dtypes``): ``dtype`` for the FFN records, ``resident_dtype``
for the resident matrices (embeddings, attention, LM head); norms and biases stay float32. A
GGUF tensor already stored in the block format it is to be stored in (Q8_0, Q4_0, Q4_1) is
copied bit for bit; any other quantized GGUF tensor (K-quants) is dequantized and quantized
again, with a warning. GGUF quantizes down_proj along d_ff, so a neuron's down column has no
blocks of its own: its codes go into the record and the blocks' scales stay resident
(``down_layout`` "codes", ``csrc/bundle_format.h``), which keeps the file's weights exactly.
"""
from __future__ import annotations

import errno
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Optional

import numpy as np

from . import __version__
from .config import ModelArgs
from .dtypes import (DOWN_LAYOUTS, FORMATS, RecordLayout, StorageFormat, storage_format,
                     to_storage)
from .errors import ConvertError, UnsupportedModelError
from .format import (BUNDLE_FILE, DENSE_FILE, FORMAT_NAME, FORMAT_VERSION,
                     SafetensorsStreamWriter, dense_names, file_digest, write_manifest)

# Our resident-tensor name -> Hugging Face name (with {i} for the layer), per architecture.
_LLAMA = {
    "tok_embeddings": "model.embed_tokens.weight",
    "norm": "model.norm.weight",
    "lm_head": "lm_head.weight",
    "wq": "model.layers.{i}.self_attn.q_proj.weight",
    "wk": "model.layers.{i}.self_attn.k_proj.weight",
    "wv": "model.layers.{i}.self_attn.v_proj.weight",
    "wo": "model.layers.{i}.self_attn.o_proj.weight",
    "bq": "model.layers.{i}.self_attn.q_proj.bias",
    "bk": "model.layers.{i}.self_attn.k_proj.bias",
    "bv": "model.layers.{i}.self_attn.v_proj.bias",
    "bo": "model.layers.{i}.self_attn.o_proj.bias",
    "attn_norm": "model.layers.{i}.input_layernorm.weight",
    "ffn_norm": "model.layers.{i}.post_attention_layernorm.weight",
    "q_norm": "model.layers.{i}.self_attn.q_norm.weight",
    "k_norm": "model.layers.{i}.self_attn.k_norm.weight",
    "up": "model.layers.{i}.mlp.up_proj.weight",
    "gate": "model.layers.{i}.mlp.gate_proj.weight",
    "down": "model.layers.{i}.mlp.down_proj.weight",
}
_GEMMA3 = {
    **_LLAMA,
    "ffn_norm": "model.layers.{i}.pre_feedforward_layernorm.weight",
    "attn_post_norm": "model.layers.{i}.post_attention_layernorm.weight",
    "ffn_post_norm": "model.layers.{i}.post_feedforward_layernorm.weight",
}
# Phi-3's fused projections: (tensor, part); the part's rows are cut out at conversion.
_PHI3 = {
    **_LLAMA,
    **{w: ("model.layers.{i}.self_attn.qkv_proj.weight", w) for w in ("wq", "wk", "wv")},
    **{p: ("model.layers.{i}.mlp.gate_up_proj.weight", p) for p in ("gate", "up")},
}
_OPT = {
    "tok_embeddings": "model.decoder.embed_tokens.weight",
    "pos_embeddings": "model.decoder.embed_positions.weight",
    "project_in": "model.decoder.project_in.weight",
    "project_out": "model.decoder.project_out.weight",
    "norm": "model.decoder.final_layer_norm.weight",
    "norm_bias": "model.decoder.final_layer_norm.bias",
    "lm_head": "lm_head.weight",
    **{w: f"model.decoder.layers.{{i}}.self_attn.{p}_proj.weight"
       for w, p in (("wq", "q"), ("wk", "k"), ("wv", "v"), ("wo", "out"))},
    **{b: f"model.decoder.layers.{{i}}.self_attn.{p}_proj.bias"
       for b, p in (("bq", "q"), ("bk", "k"), ("bv", "v"), ("bo", "out"))},
    "attn_norm": "model.decoder.layers.{i}.self_attn_layer_norm.weight",
    "attn_norm_bias": "model.decoder.layers.{i}.self_attn_layer_norm.bias",
    "ffn_norm": "model.decoder.layers.{i}.final_layer_norm.weight",
    "ffn_norm_bias": "model.decoder.layers.{i}.final_layer_norm.bias",
    "up": "model.decoder.layers.{i}.fc1.weight",
    "ffn_up_bias": "model.decoder.layers.{i}.fc1.bias",
    "down": "model.decoder.layers.{i}.fc2.weight",
    "ffn_down_bias": "model.decoder.layers.{i}.fc2.bias",
}
_TABLES = {"llama": _LLAMA, "qwen2": _LLAMA, "qwen3": _LLAMA, "phi3": _PHI3, "gemma3": _GEMMA3,
           "opt": _OPT}
# Where a multimodal checkpoint keeps its text model (Gemma 3: transformers 5, then 4.x).
_TEXT_MODEL_PREFIXES = ("model.language_model.", "language_model.model.")


class _Names:
    """Resolve our tensor names to the checkpoint's (tolerating a missing 'model.' prefix or a
    multimodal wrapper) and read them in our layout: fused tensors cut into their parts,
    Gemma's norm weights stored as the factor 1 + w."""

    def __init__(self, args: ModelArgs, ckpt):
        self.args, self.ckpt = args, ckpt
        self.table = _TABLES[args.arch]
        self.available = set(ckpt.names())
        self.norm_offset = 1.0 if args.arch == "gemma3" else 0.0

    def hf(self, ours: str) -> str:
        return self.locate(ours)[0]

    def locate(self, ours: str) -> tuple[str, Optional[tuple[int, int]]]:
        """(checkpoint tensor name, rows of it that hold `ours` or None for all of it)."""
        layer, short = None, ours
        if ours.startswith("layers."):
            _, layer, short = ours.split(".", 2)
        entry = self.table[short]
        pattern, part = entry if isinstance(entry, tuple) else (entry, None)
        name = pattern.format(i=layer) if layer is not None else pattern
        for cand in self._candidates(name):
            if cand in self.available:
                return cand, (self._rows(cand, part) if part else None)
        raise ConvertError(f"{self.ckpt.path}: tensor {name!r} is missing from the checkpoint; the "
                           "checkpoint is incomplete or not the architecture its config.json says.")

    @staticmethod
    def _candidates(name: str) -> list[str]:
        bare = name.removeprefix("model.")
        return [name, bare, *(p + bare for p in _TEXT_MODEL_PREFIXES),
                *(["language_model.lm_head.weight"] if name == "lm_head.weight" else [])]

    def _rows(self, hf: str, part: str) -> tuple[int, int]:
        a = self.args
        sizes = ({"wq": a.q_dim, "wk": a.kv_dim, "wv": a.kv_dim} if part[0] == "w"
                 else {"gate": a.intermediate_size, "up": a.intermediate_size})
        rows = self.ckpt.shape(hf)[0]
        if rows != sum(sizes.values()):
            raise ConvertError(f"{self.ckpt.path}: {hf} has {rows} rows but config.json implies "
                               f"{' + '.join(map(str, sizes.values()))} ({', '.join(sizes)}); the "
                               "checkpoint and its config.json disagree.")
        start = 0
        for name, n in sizes.items():  # fused in this order: q, k, v / gate, up
            if name == part:
                return start, start + n
            start += n
        raise AssertionError(part)

    def shape(self, ours: str) -> tuple[int, ...]:
        hf, rows = self.locate(ours)
        shape = tuple(self.ckpt.shape(hf))
        return shape if rows is None else (rows[1] - rows[0], *shape[1:])

    def read(self, ours: str) -> np.ndarray:
        """Tensor `ours` as float32, in our layout."""
        hf, rows = self.locate(ours)
        x = self.ckpt.get(hf, rows=rows)
        if self.norm_offset and ours.endswith("norm"):
            x += np.float32(self.norm_offset)
        return x

    def stored(self, ours: str) -> tuple[str, Optional[str]]:
        """(how the checkpoint stores `ours`, e.g. "Q4_1", and our block format with exactly
        those bytes, or None)."""
        hf, _ = self.locate(ours)
        return self.ckpt.stored_type(hf), self.ckpt.stored_blocks(hf)

    def blocks(self, ours: str) -> np.ndarray:
        """Tensor `ours` as the checkpoint stores its blocks (uint8 rows), in our layout."""
        hf, rows = self.locate(ours)
        return self.ckpt.get_blocks(hf, rows=rows)


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                disable=not enabled, leave=False)


def convert(src, dst, *, dtype: Optional[str] = None, resident_dtype: Optional[str] = None,
            force: bool = False, progress: bool = True, alignment: int = 4096,
            down_layout: str = "auto") -> Path:
    """Convert a checkpoint (Hugging Face directory or GGUF file) into a flash model directory.

    Args:
        src: a Hugging Face checkpoint directory (config.json + *.safetensors or
            pytorch_model.bin, sharded or not) or a ``.gguf`` file.
        dst: the flash directory to create.
        dtype: storage format of the FFN records: "float32", "float16", "bfloat16", "q8_0",
            "q4_0" or "q4_1"; default: the checkpoint's own (float16 for GGUF).
        resident_dtype: storage format of the resident matrices (embeddings, attention, LM
            head), or "auto" (default): the same as `dtype`, except that with a block format
            a GGUF's matrices already in a block format keep theirs, bit for bit.
        force: replace ``dst`` if it exists (only after the new directory is complete).
        progress: show progress bars.
        alignment: bundle record alignment in bytes (4096 suits every SSD).
        down_layout: how a block format stores the down projection. "blocks": each neuron's
            down column quantized along d_model, a record of its own (nothing resident).
            "codes": down_proj quantized along d_ff as llama.cpp does, each neuron's codes in
            its record and the blocks' scales resident (2 or 4 bytes per 32 neurons and
            d_model value); a dense model then runs each FFN layer as two products on
            interleaved matrices (a 1B q4_1 decode 1.5x faster, RESULTS.md section 13), at
            that much more resident memory under a budget. "auto" (default): "codes" when the
            checkpoint's down_proj is already in the chosen blocks (a GGUF: kept exactly),
            else "blocks".

    Returns:
        The path of the new directory.
    """
    from .checkpoint import open_checkpoint  # the checkpoint readers pull optional dependencies

    dst = Path(dst).expanduser().absolute()
    choices = ", ".join(FORMATS)
    if dtype is not None and dtype not in FORMATS:
        raise ConvertError(f"--dtype {dtype!r} is not supported; choose one of {choices}.")
    if resident_dtype not in (None, "auto") and resident_dtype not in FORMATS:
        raise ConvertError(f"--resident-dtype {resident_dtype!r} is not supported; choose auto "
                           f"or one of {choices}.")
    if (isinstance(alignment, bool) or not isinstance(alignment, int) or alignment < 512
            or alignment > (1 << 20) or alignment & (alignment - 1)):
        raise ConvertError(f"--alignment {alignment!r} must be a power of two from 512 to "
                           "1048576 bytes; 4096 (the default) suits every SSD and O_DIRECT.")
    if down_layout not in DOWN_LAYOUTS:
        raise ConvertError(f"--down-layout {down_layout!r} is not supported; choose one of "
                           f"{', '.join(DOWN_LAYOUTS)}.")
    if dst.exists() and not force:
        raise ConvertError(f"{dst} already exists; choose another destination or pass --force "
                           "(force=True) to replace it once the new conversion is complete.")
    dst.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(dst)
    tmp = dst.parent / f".{dst.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        with open_checkpoint(src) as ckpt:
            _convert_into(ckpt, tmp, dtype, resident_dtype or "auto", progress, alignment,
                          down_layout)
        _move_into_place(tmp, dst, force)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):  # FlashIOError carries errno too
            raise ConvertError(f"{dst.parent}: no space left on the device while converting {src}. "
                               "Free space or pick a destination on another disk; nothing was changed "
                               "at the destination.") from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def _move_into_place(tmp: Path, dst: Path, force: bool) -> None:
    """Rename the finished directory to dst. Replacing one is a single atomic exchange where
    the kernel has it (Linux renameat2), so a kill at any moment leaves dst complete, old or
    new; elsewhere dst is missing for the moment between two renames."""
    if not dst.exists():
        os.replace(tmp, dst)
        return
    if not force:  # appeared while we were converting
        raise ConvertError(f"{dst} appeared during conversion; not replacing it without --force.")
    if _exchange(tmp, dst):
        shutil.rmtree(tmp, ignore_errors=True)  # now the old directory
        return
    old = dst.parent / f".{dst.name}.old-{os.getpid()}"
    os.replace(dst, old)
    os.replace(tmp, dst)
    shutil.rmtree(old, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (renameat2 RENAME_EXCHANGE); False where unsupported."""
    import ctypes

    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # the file system cannot
        return False
    raise OSError(err, f"exchanging {a} and {b}: {os.strerror(err)}")


def _remove_stale(dst: Path) -> None:
    """Remove what killed conversions to dst left beside it (.dst.tmp-PID, .dst.old-PID of
    processes that no longer run); never a directory `load` accepts, which needs dst's name."""
    for p in dst.parent.glob(f".{dst.name}.*-*"):
        kind, _, pid = p.name[len(dst.name) + 2:].partition("-")
        if kind in ("tmp", "old") and pid.isdigit() and not _running(int(pid)):
            shutil.rmtree(p, ignore_errors=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _Notes:
    """What the conversion did with each quantized source tensor (kept or requantized)."""

    def __init__(self):
        self.kept: dict[str, int] = {}          # GGUF type -> tensors copied bit for bit
        self.requantized: dict[str, int] = {}   # "Q6_K -> q4_1" -> tensors

    def add(self, stored: str, kept: bool, target: StorageFormat) -> None:
        if kept:
            self.kept[stored] = self.kept.get(stored, 0) + 1
        elif target.quantized and stored.upper() not in ("F32", "F16", "BF16", "F64",
                                                         "FLOAT32", "FLOAT16", "BFLOAT16"):
            key = f"{stored} -> {target.name}"
            self.requantized[key] = self.requantized.get(key, 0) + 1

    def as_dict(self) -> dict:
        return {"kept_bit_for_bit": self.kept, "requantized": self.requantized}

    def warn(self, path) -> None:
        if self.requantized:
            what = ", ".join(f"{n} tensors {k}" for k, n in sorted(self.requantized.items()))
            warnings.warn(f"{path}: requantized {what}: these were dequantized and quantized "
                          "again, a second rounding (only tensors already stored in the chosen "
                          "block format are kept bit for bit; K-quants never are).",
                          stacklevel=4)


def _convert_into(ckpt, out: Path, dtype: Optional[str], resident_dtype: str, progress: bool,
                  alignment: int, down_layout: str = "auto") -> None:
    from .bundles import BundleWriter

    try:
        args = ModelArgs.from_hf_config(ckpt.config)
    except UnsupportedModelError as e:
        raise UnsupportedModelError(f"{ckpt.path}: {e}") from None
    except (KeyError, TypeError, ValueError, ArithmeticError) as e:  # a field missing or absurd
        from .checkpoint import CheckpointError

        where = ckpt.path if _is_gguf(ckpt) else Path(str(ckpt.path)) / "config.json"
        raise CheckpointError(f"{where}: the model configuration is incomplete or damaged "
                              f"({type(e).__name__}: {e}). Restore the model's config.json, or "
                              "download the model again.") from None
    dtype = dtype or ("float16" if ckpt.source_dtype == "float32" and _is_gguf(ckpt) else ckpt.source_dtype)
    fmt = storage_format(dtype)
    names = _Names(args, ckpt)
    notes = _Notes()
    t0 = time.perf_counter()
    parts = args.ffn_parts
    d, f = args.hidden_size, args.intermediate_size
    down_layout = _down_layout(args, names, fmt, down_layout, ckpt.path)
    layout = RecordLayout.build(fmt, parts, d, down_layout, alignment=alignment)

    # ---- resident tensors: header planned from shapes, then streamed one by one
    plan, formats = [], {}
    for ours, kind in dense_names(args, down_scales=layout.codes):
        if kind == "scales":  # written with their layer's FFN below
            nb, sr = f // 32, 2 if fmt.name == "q4_1" else 1
            plan.append((ours, None, np.dtype(np.float16), (nb, sr, d), None))
            continue
        shape = names.shape(ours)
        mfmt = _resident_format(names, ours, resident_dtype, fmt) if kind == "matrix" else None
        if mfmt is not None:
            formats[ours] = mfmt.name
            stored_shape = (*shape[:-1], mfmt.row_elems(shape[-1]))
            plan.append((ours, names.hf(ours), mfmt.numpy, stored_shape, mfmt))
        else:
            plan.append((ours, names.hf(ours), np.dtype(np.float32), shape, None))
    _check_shapes(args, [(o, hf, dt, names.shape(o)) for o, hf, dt, _, m in plan if hf], ckpt)
    total = sum(int(np.prod(s)) * dt.itemsize for _, _, dt, s, _ in plan)
    writer = SafetensorsStreamWriter(out / DENSE_FILE, [(o, dt, s) for o, _, dt, s, _ in plan],
                                     {"format": FORMAT_NAME, "dtype": dtype})
    with _progress(total, "resident tensors", progress) as bar:
        for ours, hf, dt, shape, mfmt in plan:
            if hf is None:
                continue
            x = (_matrix(names, ours, mfmt, notes) if mfmt is not None
                 else np.asarray(names.read(ours), np.float32))
            writer.write(ours, x)
            bar.update(x.nbytes)

    # ---- FFN bundles: one layer at a time (the codes layout's scales go to dense.safetensors)
    bw = BundleWriter(str(out / BUNDLE_FILE), args.num_hidden_layers, d, f, fmt.name, parts,
                      alignment=alignment, down_layout=down_layout)
    with _progress(args.num_hidden_layers, "FFN bundles (layers)", progress) as bar:
        for i in range(args.num_hidden_layers):
            mats = []
            for part in parts:
                name = f"layers.{i}.{part}"
                if part == "down" and layout.codes:
                    codes, scales = _down_codes(names, name, fmt, d, f, notes)
                    mats.append(codes)
                    writer.write(f"layers.{i}.ffn_down_scales", scales)
                else:
                    mats.append(_ffn_part(names, name, part, fmt, d, f, notes, ckpt.path, i))
            bw.write_layer(i, mats)
            bar.update(1)
    bw.finish()
    writer.close()
    notes.warn(ckpt.path)

    tok_files = ckpt.write_tokenizer(out)
    if "tokenizer.json" not in tok_files:
        warnings.warn(f"{ckpt.path}: no tokenizer.json could be produced; the flash directory can "
                      "compute logits but `generate` needs a tokenizer.json copied into it.")

    files = [DENSE_FILE, BUNDLE_FILE] + sorted(tok_files)
    sizes = sum((out / n).stat().st_size for n in files)
    with _progress(sizes, "checksums", progress) as bar:
        checksums = {n: file_digest(out / n, bar) for n in files}
    from .bundles import read_header

    hdr = read_header(str(out / BUNDLE_FILE))
    write_manifest(out, {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "created_by": f"flashinfer_py {__version__}",
        "source": {"name": Path(str(ckpt.path)).name, "kind": type(ckpt).__name__,
                   "source_dtype": ckpt.source_dtype},
        "model": args.to_dict(),
        "hf_config": ckpt.config,
        "dtype": fmt.name,
        "resident_dtype": resident_dtype,
        "resident_formats": formats,
        "conversion": notes.as_dict(),
        "files": {"dense": DENSE_FILE, "bundles": BUNDLE_FILE,
                  "tokenizer": "tokenizer.json" if "tokenizer.json" in tok_files else None},
        "bundle": {"parts": parts, "d_model": d, "d_ff": f, "n_layers": args.num_hidden_layers,
                   "record_bytes": int(hdr["record_bytes"]), "alignment": int(hdr["alignment"]),
                   "data_offset": int(hdr["data_offset"]), "down_layout": hdr["down_layout"],
                   "part_bytes": [int(b) for b in hdr["part_bytes"]],
                   "payload_bytes": int(hdr["payload_bytes"]),
                   "up_bias": "dense.safetensors" if args.ffn_bias else None},
        "checksums": checksums,
        "convert_seconds": round(time.perf_counter() - t0, 2),
    })


def _resident_format(names: _Names, ours: str, resident_dtype: str,
                     ffn: StorageFormat) -> StorageFormat:
    """The format a resident matrix is stored in (see convert's `resident_dtype`)."""
    if resident_dtype != "auto":
        return storage_format(resident_dtype)
    if ffn.quantized:
        _, blocks = names.stored(ours)
        if blocks is not None:
            return storage_format(blocks)
    return ffn


def _matrix(names: _Names, ours: str, fmt: StorageFormat, notes: _Notes) -> np.ndarray:
    """A resident matrix in `fmt`: its blocks as stored when they are already in it."""
    stored, blocks = names.stored(ours)
    kept = blocks == fmt.name
    notes.add(stored, kept, fmt)
    return names.blocks(ours) if kept else to_storage(names.read(ours), fmt)


def _down_layout(args: ModelArgs, names: _Names, fmt: StorageFormat, want: str = "auto",
                 path=None) -> str:
    """The records' down layout (convert's down_layout). "auto": "codes" when some layer's
    down_proj is stored in `fmt`'s blocks along d_ff (a GGUF): keeping those exactly needs the
    codes layout; "blocks" otherwise."""
    if want == "codes":
        if not fmt.quantized:
            raise ConvertError(f"--down-layout codes needs a block --dtype (q8_0, q4_0, q4_1), "
                               f"not {fmt.name}: float records hold down columns as they are.")
        if args.intermediate_size % 32:
            raise ConvertError(f"{path}: --down-layout codes quantizes down_proj in blocks of 32 "
                               f"neurons, but this model's intermediate_size "
                               f"{args.intermediate_size} is not a multiple of 32; use "
                               "--down-layout blocks.")
        return "codes"
    if not fmt.quantized or args.intermediate_size % 32:
        return "blocks"
    if want == "blocks":  # a GGUF's down_proj then quantized again along d_model (warned)
        return "blocks"
    held = [names.stored(f"layers.{i}.down")[1] for i in range(args.num_hidden_layers)]
    return "codes" if fmt.name in held else "blocks"


def _ffn_part(names: _Names, name: str, part: str, fmt: StorageFormat, d: int, f: int,
              notes: _Notes, path, layer: int) -> np.ndarray:
    """One part of every neuron of a layer, [d_ff, part elements] in `fmt`: up and gate rows
    as the checkpoint stores them when their blocks are already `fmt` (blocks run along d_model
    there too), else quantized from float32; down columns always from float32."""
    stored, blocks = names.stored(name)
    if part != "down" and blocks == fmt.name:
        w = names.blocks(name)
        notes.add(stored, True, fmt)
        want = (f, fmt.row_elems(d))
    else:
        w = names.read(name)
        if part == "down":
            w = w.T  # down_proj.weight is [d, f]: neuron i's column becomes a row
        want = (f, d)
        notes.add(stored, False, fmt)
    if w.shape != want:
        raise ConvertError(f"{path}: layer {layer} {part} weight has shape {w.shape}, "
                           f"expected {want} from config.json.")
    return w if w.dtype == np.uint8 else to_storage(w, fmt)


def _down_codes(names: _Names, name: str, fmt: StorageFormat, d: int, f: int,
                notes: _Notes) -> tuple[np.ndarray, np.ndarray]:
    """A layer's down_proj [d, f] in the codes layout: (codes [f, code bytes] uint8, scales
    float16 [f / 32, 1 or 2, d]). Blocks already in `fmt` are split exactly; others are
    quantized along d_ff first, as the GGUF stores them."""
    stored, blocks = names.stored(name)
    kept = blocks == fmt.name
    notes.add(stored, kept, fmt)
    raw = names.blocks(name) if kept else to_storage(names.read(name), fmt)  # [d, f/32 blocks]
    if raw.shape != (d, fmt.row_bytes(f)):
        raise ConvertError(f"{names.ckpt.path}: {name} has {raw.shape} bytes of blocks, expected "
                           f"{(d, fmt.row_bytes(f))} from config.json.")
    return split_down_blocks(raw, fmt, d, f)


def split_down_blocks(raw: np.ndarray, fmt, d: int, f: int) -> tuple[np.ndarray, np.ndarray]:
    """down_proj's blocks along d_ff, raw uint8 [d, f / 32 * block bytes], -> (each neuron's
    codes packed per 32 values of d like a block's quants [f, code bytes], the blocks' scales
    (and q4_1 minimums) float16 [f / 32, 1 or 2, d]). No value changes."""
    fmt = storage_format(fmt)
    nb, bb = f // 32, fmt.block_bytes
    b = raw.reshape(d, nb, bb)
    qbytes = 32 * fmt.code_bits // 8
    n_s = (bb - qbytes) // 2                                  # fp16 fields before the quants
    scales = np.stack([b[:, :, 2 * k:2 * k + 2].copy().view(np.float16).reshape(d, nb).T
                       for k in range(n_s)], axis=1)           # [nb, n_s, d]
    qs = b[:, :, bb - qbytes:]
    if fmt.code_bits == 8:
        col = qs.reshape(d, f).T                               # [f, d] int8 bytes
    else:  # byte i of a block: value i (low nibble), value i + 16 (high)
        col = np.concatenate([qs & 0xF, qs >> 4], axis=2).reshape(d, f).T
    padded = np.zeros((f, -(-d // 32) * 32), np.uint8)
    padded[:, :d] = col
    if fmt.code_bits == 4:
        g = padded.reshape(f, -1, 32)
        padded = g[:, :, :16] | (g[:, :, 16:] << 4)
    return np.ascontiguousarray(padded.reshape(f, -1)), np.ascontiguousarray(scales)


def join_down_blocks(codes: np.ndarray, scales: np.ndarray, fmt, d: int, f: int) -> np.ndarray:
    """split_down_blocks' inverse: each neuron's codes [f, code bytes] and the blocks' scales
    [f / 32, 1 or 2, d] -> down_proj's blocks along d_ff, uint8 [d, f / 32 * block bytes]
    (the dense FFN's interleaved down matrix is made from them). No value changes."""
    fmt = storage_format(fmt)
    nb, bb = f // 32, fmt.block_bytes
    c = np.ascontiguousarray(codes, np.uint8)
    if fmt.code_bits == 8:
        qs = c[:, :d].T.reshape(d, nb, 32)
    else:
        g = c.reshape(f, -1, 16)
        q = np.concatenate([g & 0xF, g >> 4], axis=2).reshape(f, -1)[:, :d]  # [f, d] codes
        qt = q.T.reshape(d, nb, 32)
        qs = (qt[:, :, :16] | (qt[:, :, 16:] << 4)).astype(np.uint8)
    sc = [np.ascontiguousarray(np.asarray(scales, np.float16)[:, k, :].T).view(np.uint8)
          .reshape(d, nb, 2) for k in range(scales.shape[1])]
    return np.ascontiguousarray(np.concatenate(sc + [qs], axis=2).reshape(d, nb * bb))


def _is_gguf(ckpt) -> bool:
    return str(ckpt.path).endswith(".gguf") or "gguf" in type(ckpt).__name__.lower()


def _check_shapes(args: ModelArgs, plan, ckpt) -> None:
    """The config and the tensors must agree before anything big is written."""
    d, qd, kvd, e = args.hidden_size, args.q_dim, args.kv_dim, args.embed_dim
    hd = args.head_dim
    expect = {"wq": (qd, d), "wk": (kvd, d), "wv": (kvd, d), "wo": (d, qd),
              "tok_embeddings": (args.vocab_size, e), "lm_head": (args.vocab_size, e),
              "project_in": (d, e), "project_out": (e, d), "q_norm": (hd,), "k_norm": (hd,)}
    for ours, hf, _, shape in plan:
        short = ours.split(".")[-1]
        if short in expect and tuple(shape) != expect[short]:
            raise ConvertError(f"{ckpt.path}: {hf} has shape {tuple(shape)} but config.json implies "
                               f"{expect[short]}; the checkpoint and its config.json disagree.")
