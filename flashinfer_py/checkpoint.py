"""Read model checkpoints from strangers: uniformly, one tensor at a time, and safely.

``open_checkpoint(path)`` accepts

- a Hugging Face directory: ``config.json`` + ``model.safetensors`` (or shards listed in
  ``model.safetensors.index.json``), read by a small bounds-checked safetensors reader that
  handles bfloat16 without torch;
- a Hugging Face directory with ``pytorch_model.bin`` (or shards + its ``.index.json``),
  read with ``torch.load(weights_only=True, mmap=True)`` only, never a plain unpickle;
- a GGUF file (or a directory holding exactly one ``.gguf`` and no ``config.json``), dequantized
  per tensor with the ``gguf`` package and renamed to Hugging Face names (``llama``, ``qwen2``,
  ``qwen3``, ``phi3``, ``gemma3``).

Every ``Checkpoint`` exposes Hugging Face tensor names and returns float32 numpy arrays. Nothing
holds the whole checkpoint in memory: ``get`` reads exactly one tensor. Every failure a user can
cause (missing, truncated or corrupt files, unsupported formats) raises ``CheckpointError`` with
the file and the fix in its message.
"""
from __future__ import annotations

import json
import os
import pathlib
import pickle
import re
import shutil
import stat
import tempfile
from typing import Any

import numpy as np

from .errors import io_error

__all__ = ["Checkpoint", "CheckpointError", "open_checkpoint"]

# Files that make up a tokenizer in a Hugging Face directory, copied as they are.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
    "chat_template.json",
)
# Files from which transformers can build a tokenizer.json when it is missing.
SLOW_TOKENIZER_FILES = ("tokenizer.model", "vocab.json", "merges.txt", "vocab.txt")


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, unsafe or in a format this reader does not support."""


def _fail(path: os.PathLike | str, problem: str, fix: str) -> CheckpointError:
    return CheckpointError(f"{path}: {problem} {fix}")


# The most bytes a checkpoint's JSON files (config, shard index) and tokenizer files may have:
# far above any real one (Gemma 3's 262k-token tokenizer.json is 33 MB), far below what
# would exhaust memory when read whole.
MAX_JSON_BYTES = 64 << 20
MAX_TOKENIZER_BYTES = 512 << 20


def _check_regular(file: pathlib.Path, what: str, max_bytes: int | None = None) -> None:
    """`file` is a regular file (not a FIFO, device or directory, which a symlink in a
    downloaded directory can point at: reading those hangs or never ends), of at most
    `max_bytes`. A missing file raises FileNotFoundError for the caller to explain."""
    st = os.stat(file)
    if not stat.S_ISREG(st.st_mode):
        kind = ("a FIFO" if stat.S_ISFIFO(st.st_mode) else "a directory" if stat.S_ISDIR(st.st_mode)
                else "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)
                else "not a regular file")
        raise _fail(file, f"is {kind}, not the {what}.", "Replace it with the real file (a "
                    "symlink in the checkpoint may point somewhere unexpected).")
    if max_bytes is not None and st.st_size > max_bytes:
        raise _fail(file, f"is {st.st_size} bytes, more than any {what} ({max_bytes} at most).",
                    "Check that it is the right file.")


# ---------------------------------------------------------------------------------------------
# The common interface
# ---------------------------------------------------------------------------------------------


class Checkpoint:
    """A read-only view of one checkpoint. Use as a context manager or call ``close()``.

    Attributes:
        path: the file or directory that was opened.
        config: a Hugging Face ``config.json``-style dict.
        source_dtype: ``"float32"``, ``"float16"`` or ``"bfloat16"``: the dtype most of the
            floating-point weights are stored in (GGUF: ``"float32"``, since it is dequantized).
    """

    path: pathlib.Path
    config: dict
    source_dtype: str

    def names(self) -> list[str]:
        """Hugging Face tensor names, e.g. ``model.layers.0.mlp.gate_proj.weight``, sorted."""
        return sorted(self._shapes)

    def shape(self, name: str) -> tuple[int, ...]:
        """The shape of tensor ``name`` (Hugging Face layout, rows first)."""
        self._check_name(name)
        return self._shapes[name]

    def get(self, name: str, rows: tuple[int, int] | None = None) -> np.ndarray:
        """Read tensor ``name`` alone and return it as a C-contiguous float32 array.

        ``rows=(start, stop)`` reads only those rows of the first axis (a part of a fused tensor
        such as Phi-3's ``qkv_proj``) without reading the rest where the format allows.
        float16 and bfloat16 are upcast exactly (bfloat16 by a 16-bit shift); float64 is rounded.
        """
        self._check_name(name)
        if rows is not None:
            start, stop = rows
            n = self._shapes[name][0] if self._shapes[name] else 0
            if not 0 <= start <= stop <= n:
                raise ValueError(f"{self.path}: rows {start}:{stop} are outside {name!r}, which "
                                 f"has {n} rows")
        out = self._read(name, rows)
        return np.ascontiguousarray(out, dtype=np.float32)

    def write_tokenizer(self, dst_dir: os.PathLike | str) -> list[str]:
        """Write ``tokenizer.json`` and its companions into ``dst_dir``; return the file names.

        Returns ``[]`` when the checkpoint carries no tokenizer at all.
        """
        raise NotImplementedError

    def stored_type(self, name: str) -> str:
        """How the file stores tensor ``name``: a GGUF tensor type ("Q4_1", "Q6_K", "F32"), or
        for Hugging Face files the checkpoint's dtype."""
        self._check_name(name)
        return self.source_dtype

    def stored_blocks(self, name: str) -> str | None:
        """The block format ("q8_0", "q4_0", "q4_1") whose bytes are exactly how the file
        stores ``name``, so :meth:`get_blocks` can copy them; None otherwise."""
        self._check_name(name)
        return None

    def get_blocks(self, name: str, rows: tuple[int, int] | None = None) -> np.ndarray:
        """Tensor ``name`` (or some rows) as stored: uint8 [rows, row bytes] of blocks along
        each row, in the Hugging Face row order. Only when :meth:`stored_blocks` names one."""
        raise ValueError(f"{self.path}: {name!r} is not stored in a block format")

    def close(self) -> None:
        """Release open files. Safe to call twice."""

    def __contains__(self, name: object) -> bool:
        return name in self._shapes

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({str(self.path)!r}, {len(self._shapes)} tensors, "
                f"{self.source_dtype})")

    # -- for subclasses --------------------------------------------------------------------
    _shapes: dict[str, tuple[int, ...]]

    def _read(self, name: str, rows: tuple[int, int] | None) -> np.ndarray:
        raise NotImplementedError

    def _check_name(self, name: str) -> None:
        if name not in self._shapes:
            raise KeyError(f"{self.path}: no tensor named {name!r} (it has {len(self._shapes)} "
                           f"tensors, e.g. {sorted(self._shapes)[:3]})")


def open_checkpoint(path: os.PathLike | str) -> Checkpoint:
    """Open a Hugging Face directory (safetensors or pytorch_model.bin) or a GGUF file.

    Raises:
        CheckpointError: the path does not hold a checkpoint this reader understands, or the
            checkpoint is incomplete, corrupt or unsafe. The message names the file and the fix.
    """
    path = pathlib.Path(path).expanduser()
    if not path.exists():
        raise _fail(path, "does not exist.", "Pass a Hugging Face model directory (config.json + "
                    "*.safetensors) or a .gguf file.")
    if path.is_file():
        if path.suffix == ".gguf":
            return GGUFCheckpoint(path)
        if path.suffix == ".safetensors" or path.name.startswith("pytorch_model"):
            return open_checkpoint(path.parent)
        raise _fail(path, "is not a checkpoint this reader knows.", "Pass the model directory "
                    "(config.json + *.safetensors or pytorch_model.bin) or a .gguf file.")
    ggufs = sorted(path.glob("*.gguf"))
    if not (path / "config.json").exists():
        if len(ggufs) == 1:
            return GGUFCheckpoint(ggufs[0])
        if len(ggufs) > 1:
            raise _fail(path, f"holds {len(ggufs)} .gguf files "
                        f"({', '.join(g.name for g in ggufs)}).", "Pass the one you mean.")
        raise _fail(path, "has no config.json.", "A Hugging Face checkpoint directory needs the "
                    "config.json that save_pretrained writes; copy it from the model's repository.")
    config = _read_json(path / "config.json", "config.json")
    if not isinstance(config, dict):
        raise _fail(path / "config.json", "is not a JSON object.",
                    "Restore the model's config.json.")
    if (path / "model.safetensors.index.json").exists() or list(path.glob("*.safetensors")):
        return SafetensorsCheckpoint(path, config)
    if (path / "pytorch_model.bin.index.json").exists() or (path / "pytorch_model.bin").exists():
        return TorchCheckpoint(path, config)
    raise _fail(path, "has config.json but no weights (no *.safetensors, no pytorch_model.bin).",
                "Copy the weight files next to config.json.")


def _read_json(file: pathlib.Path, what: str) -> Any:
    try:
        _check_regular(file, what, MAX_JSON_BYTES)
        return json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise _fail(file, f"is missing ({what}).", "Copy it from the model's repository.") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        if isinstance(e, CheckpointError):
            raise
        # ValueError: JSONDecodeError, and integers longer than Python's 4300-digit limit;
        # RecursionError: arrays nested thousands deep
        raise _fail(file, f"is not valid JSON ({type(e).__name__}: {str(e)[:200]}).",
                    f"The {what} is corrupt; download it again.") from None


def _read_index(index_file: pathlib.Path) -> dict[str, str]:
    """The ``weight_map`` of a sharded checkpoint's index; shard names must be plain file names."""
    index = _read_json(index_file, "shard index")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise _fail(index_file, "has no 'weight_map'.", "Download the index again.")
    for fname in set(weight_map.values()):
        if not isinstance(fname, str) or pathlib.PurePath(fname).name != fname or fname in (
                "", ".", ".."):
            raise _fail(index_file, f"names the shard {fname!r}, which is not a file name in "
                        "this directory.", "Shards must sit next to the index; download the "
                        "index again.")
    return weight_map


def _majority_dtype(dtypes: dict[str, int]) -> str:
    """The float dtype that holds the most elements ({dtype name: element count})."""
    floats = {k: v for k, v in dtypes.items() if k in ("float32", "float16", "bfloat16")}
    return max(floats, key=floats.get) if floats else "float32"


# ---------------------------------------------------------------------------------------------
# safetensors (our own bounds-checked reader: the numpy API of `safetensors` has no bfloat16)
# ---------------------------------------------------------------------------------------------

# safetensors dtype -> (numpy dtype of the stored bytes, our dtype name)
_ST_FLOAT = {
    "F32": (np.dtype("<f4"), "float32"),
    "F16": (np.dtype("<f2"), "float16"),
    "BF16": (np.dtype("<u2"), "bfloat16"),
    "F64": (np.dtype("<f8"), "float64"),
}
# Other dtypes the format defines: listed and bounds-checked, but get() refuses them.
_ST_OTHER_SIZES = {"I64": 8, "U64": 8, "I32": 4, "U32": 4, "I16": 2, "U16": 2, "I8": 1, "U8": 1,
                   "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
_MAX_HEADER = 100 * 1024 * 1024  # the format's own limit
_CHUNK = 1 << 22  # elements converted per step when upcasting (16 MiB of float32)


class _SafetensorsFile:
    """One .safetensors file: header parsed and validated on open, tensors read with pread."""

    def __init__(self, file: pathlib.Path):
        self.file = file
        try:
            _check_regular(file, "safetensors file")
            self._fd = os.open(file, os.O_RDONLY)
        except OSError as e:
            raise _fail(file, f"cannot be opened ({e.strerror}).", "Check that the file exists "
                        "and is readable.") from None
        try:
            self.entries = self._parse_header()
        except BaseException:
            os.close(self._fd)
            raise

    def _parse_header(self) -> dict[str, tuple[str, tuple[int, ...], int, int]]:
        size = os.fstat(self._fd).st_size
        broken = "The file is truncated or not a safetensors file; download or convert it again."
        if size < 8:
            raise _fail(self.file, f"is {size} bytes, too short for a safetensors header.", broken)
        n = int.from_bytes(self._pread(8, 0), "little")
        if n < 2 or n > _MAX_HEADER or 8 + n > size:
            raise _fail(self.file, f"declares a {n}-byte header but the file is {size} bytes.",
                        broken)
        try:
            header = json.loads(self._pread(n, 8).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise _fail(self.file, f"has a corrupt JSON header ({e}).", broken) from None
        if not isinstance(header, dict):
            raise _fail(self.file, "has a header that is not a JSON object.", broken)
        header.pop("__metadata__", None)
        data_start = 8 + n
        entries = {}
        for name, info in header.items():
            entries[name] = self._check_entry(name, info, data_start, size, broken)
        return entries

    def _check_entry(self, name, info, data_start, size, broken):
        try:
            dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
            ints = [*shape, begin, end]
            ok = isinstance(dtype, str) and all(type(v) is int and v >= 0 for v in ints)
        except (TypeError, KeyError, ValueError):
            ok = False
        if not ok:
            raise _fail(self.file, f"has a malformed header entry for {name!r}: {info!r}.", broken)
        if dtype in _ST_FLOAT:
            itemsize = _ST_FLOAT[dtype][0].itemsize
        elif dtype in _ST_OTHER_SIZES:
            itemsize = _ST_OTHER_SIZES[dtype]
        else:
            raise _fail(self.file, f"stores {name!r} as {dtype}, which this reader does not "
                        "support (F32, F16, BF16, F64).", "Re-save the model in float16, bfloat16 "
                        "or float32.")
        count = 1
        for d in shape:
            count *= d
        if end - begin != count * itemsize:
            raise _fail(self.file, f"gives {name!r} {end - begin} bytes but {dtype}{list(shape)} "
                        f"needs {count * itemsize}.", broken)
        if data_start + end > size:
            raise _fail(self.file, f"places {name!r} at bytes {data_start + begin}.."
                        f"{data_start + end} beyond the end of the {size}-byte file.", broken)
        return dtype, tuple(shape), data_start + begin, count

    def read(self, name: str, rows: tuple[int, int] | None = None) -> np.ndarray:
        """Tensor ``name`` (or rows start:stop of it) as float32; peak memory is the result
        plus one small chunk."""
        dtype, shape, offset, count = self.entries[name]
        if dtype not in _ST_FLOAT:
            raise _fail(self.file, f"stores {name!r} as {dtype}, not a floating-point type.",
                        "Only float tensors are model weights; skip this one.")
        raw_dtype = _ST_FLOAT[dtype][0]
        if rows is not None:  # rows are contiguous: move the start, shorten the count
            per_row = count // shape[0] if shape[0] else 0
            offset += rows[0] * per_row * raw_dtype.itemsize
            count = (rows[1] - rows[0]) * per_row
            shape = (rows[1] - rows[0], *shape[1:])
        out = np.empty(count, dtype=np.float32)
        if dtype == "F32":
            self._pread_into(out, offset, name)
            return out.reshape(shape)
        buf = np.empty(min(count, _CHUNK), dtype=raw_dtype)
        for start in range(0, count, _CHUNK):
            n = min(_CHUNK, count - start)
            self._pread_into(buf[:n], offset + start * raw_dtype.itemsize, name)
            if dtype == "BF16":  # bfloat16 is the top half of a float32: exact upcast by shifting
                dst = out[start:start + n].view(np.uint32)
                dst[:] = buf[:n]
                dst <<= 16
            else:
                out[start:start + n] = buf[:n]
        return out.reshape(shape)

    _RAW = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"),
            "U16": np.dtype("<u2"), "U8": np.dtype("u1")}

    def read_raw(self, name: str) -> np.ndarray:
        """Tensor ``name`` in its stored dtype (bfloat16 and U16 as uint16, U8 as uint8: rows of
        blocks), read with pread into one fresh array: no memory map, so loading never holds
        the file's pages and a copy."""
        dtype, shape, offset, count = self.entries[name]
        if dtype not in self._RAW:
            raise _fail(self.file, f"stores {name!r} as {dtype}.", "Re-create the file.")
        out = np.empty(count, dtype=self._RAW[dtype])
        self._pread_into(out, offset, name)
        return out.reshape(shape)

    def _pread(self, n: int, offset: int) -> bytes:
        try:
            return os.pread(self._fd, n, offset)
        except OSError as e:  # a failing disk: say which file and where
            raise io_error(e, "reading", self.file, offset) from None

    def _pread_into(self, arr: np.ndarray, offset: int, name: str) -> None:
        view, done = memoryview(arr).cast("B"), 0
        while done < len(view):  # pread may return short counts
            try:
                got = os.preadv(self._fd, [view[done:]], offset + done)
            except OSError as e:
                raise io_error(e, f"reading {name!r} from", self.file, offset + done) from None
            if got == 0:
                raise _fail(self.file, f"ended while reading {name!r}.", "The file was truncated "
                            "after it was opened; download it again.")
            done += got

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class SafetensorsCheckpoint(Checkpoint):
    """A Hugging Face directory with ``*.safetensors`` weights (single file or sharded)."""

    def __init__(self, path: pathlib.Path, config: dict):
        self.path, self.config = path, config
        self._files: list[_SafetensorsFile] = []
        self._where: dict[str, _SafetensorsFile] = {}
        try:
            self._open_files()
        except BaseException:
            self.close()
            raise
        self._shapes = {k: f.entries[k][1] for k, f in self._where.items()}
        counts: dict[str, int] = {}
        for k, f in self._where.items():
            dname = _ST_FLOAT.get(f.entries[k][0], (None, "other"))[1]
            counts[dname] = counts.get(dname, 0) + f.entries[k][3]
        self.source_dtype = _majority_dtype(counts)

    def _open_files(self) -> None:
        index_file = self.path / "model.safetensors.index.json"
        if index_file.exists():
            weight_map = _read_index(index_file)
            files = sorted(set(weight_map.values()))
        elif (self.path / "model.safetensors").exists():
            weight_map, files = None, ["model.safetensors"]
        else:
            weight_map, files = None, sorted(p.name for p in self.path.glob("*.safetensors"))
        by_name = {}
        for fname in files:
            file = self.path / fname
            if not file.exists():
                listed = f" (listed in {index_file.name})" if weight_map else ""
                raise _fail(file, f"is missing{listed}.", "Download all the shards of the model.")
            st = _SafetensorsFile(file)
            self._files.append(st)
            by_name[fname] = st
            for name in st.entries:
                if name in self._where and weight_map is None:
                    first = self._where[name].file.name
                    raise _fail(file, f"repeats tensor {name!r} from {first}.",
                                "Keep one copy of the weights in the directory.")
                self._where.setdefault(name, st)
        if weight_map is not None:
            self._where = {}
            for name, fname in weight_map.items():
                if name not in by_name[fname].entries:
                    raise _fail(self.path / fname, f"does not contain {name!r}, which "
                                f"{index_file.name} says it holds.", "The shards and the index "
                                "disagree; download the model again.")
                self._where[name] = by_name[fname]

    def _read(self, name: str, rows: tuple[int, int] | None) -> np.ndarray:
        return self._where[name].read(name, rows)

    def write_tokenizer(self, dst_dir: os.PathLike | str) -> list[str]:
        return _copy_hf_tokenizer(self.path, pathlib.Path(dst_dir))

    def close(self) -> None:
        for f in self._files:
            f.close()


# ---------------------------------------------------------------------------------------------
# pytorch_model.bin, through torch's weights_only unpickler only
# ---------------------------------------------------------------------------------------------


class TorchCheckpoint(Checkpoint):
    """A Hugging Face directory with ``pytorch_model.bin`` weights (single file or sharded).

    Shards are memory-mapped one at a time; tensors are copied out one by one.
    """

    def __init__(self, path: pathlib.Path, config: dict):
        try:
            import torch
        except ImportError:
            raise _fail(path, "holds pytorch_model.bin weights, which need torch to read.",
                        'Run `pip install "flashinfer_py[train]"`, or convert the checkpoint to '
                        "safetensors.") from None
        self._torch = torch
        self.path, self.config = path, config
        index_file = path / "pytorch_model.bin.index.json"
        if index_file.exists():
            weight_map = _read_index(index_file)
            files = sorted(set(weight_map.values()))
        else:
            weight_map, files = None, ["pytorch_model.bin"]
        self._file_of: dict[str, str] = {}
        self._shapes, counts = {}, {}
        self._loaded: tuple[str, dict] | None = None
        for fname in files:
            sd = self._load(fname)
            for name, t in sd.items():
                self._file_of[name] = fname
                if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                    continue  # integer buffers and non-tensors are not weights
                self._shapes[name] = tuple(t.shape)
                dname = str(t.dtype).removeprefix("torch.")
                counts[dname] = counts.get(dname, 0) + t.numel()
        for name, fname in (weight_map or {}).items():
            if self._file_of.get(name) != fname:
                raise _fail(path / fname, f"does not contain {name!r}, which {index_file.name} "
                            "says it holds.", "The shards and the index disagree; download the "
                            "model again.")
        self.source_dtype = _majority_dtype(counts)

    def _load(self, fname: str) -> dict:
        if self._loaded and self._loaded[0] == fname:
            return self._loaded[1]
        file = self.path / fname
        if not file.exists():
            raise _fail(file, "is missing.", "Download all the shards of the model.")
        torch = self._torch
        _check_regular(file, "PyTorch checkpoint")
        try:
            try:
                sd = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:  # legacy (pre-zip) format cannot be memory-mapped
                if "mmap" not in str(e):
                    raise
                sd = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - a stranger's file can fail anywhere in torch
            if isinstance(e, pickle.UnpicklingError) or "weights_only" in str(e):
                raise _fail(file, "contains pickled code that is not plain tensors; refused to "
                            "unpickle arbitrary code (it could run anything on this machine).",
                            "Only load it if you trust its author: convert it to safetensors "
                            "yourself, or ask for a safetensors release.") from None
            raise _fail(file, f"cannot be read by torch.load ({type(e).__name__}: {e}).",
                        "The file is truncated or not a PyTorch checkpoint; download it "
                        "again.") from None
        if not isinstance(sd, dict):
            raise _fail(file, f"holds a {type(sd).__name__}, not a state dict.",
                        "Save the model with save_pretrained.")
        self._loaded = (fname, sd)
        return sd

    def _read(self, name: str, rows: tuple[int, int] | None) -> np.ndarray:
        t = self._load(self._file_of[name])[name]
        if rows is not None:
            t = t[rows[0]:rows[1]]
        return t.detach().to(self._torch.float32).numpy().copy()

    def write_tokenizer(self, dst_dir: os.PathLike | str) -> list[str]:
        return _copy_hf_tokenizer(self.path, pathlib.Path(dst_dir))

    def close(self) -> None:
        self._loaded = None


def _copy_hf_tokenizer(src: pathlib.Path, dst: pathlib.Path) -> list[str]:
    """Copy tokenizer files; build tokenizer.json with transformers when only slow files exist."""
    dst.mkdir(parents=True, exist_ok=True)
    if not (src / "tokenizer.json").exists() and any((src / f).exists()
                                                     for f in SLOW_TOKENIZER_FILES):
        return _save_with_transformers(src, dst, {}, src)
    written = []
    for fname in TOKENIZER_FILES:
        if (src / fname).exists():
            _check_regular(src / fname, "tokenizer file", MAX_TOKENIZER_BYTES)
            shutil.copyfile(src / fname, dst / fname)
            written.append(fname)
    return written


def _save_with_transformers(src: pathlib.Path, dst: pathlib.Path, kwargs: dict,
                            shown: pathlib.Path) -> list[str]:
    """AutoTokenizer.from_pretrained(src, **kwargs).save_pretrained, keeping tokenizer files."""
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise _fail(shown, "has no tokenizer.json, and building one needs transformers.",
                    'Run `pip install "flashinfer_py[gguf]"` (or `pip install transformers`), or '
                    "put a tokenizer.json next to the weights.") from None
    try:
        # never the checkpoint's own Python (an auto_map in tokenizer_config.json)
        tok = AutoTokenizer.from_pretrained(str(src), trust_remote_code=False, **kwargs)
    except Exception as e:  # noqa: BLE001 - transformers raises many types here
        detail = " ".join(str(e).split())[:300]
        fix = "Put a tokenizer.json next to the weights."
        if (src / "tokenizer.model").exists():
            fix = ("tokenizer.model is a SentencePiece model: run `pip install sentencepiece "
                   "protobuf` and try again, or put a tokenizer.json next to the weights.")
        raise _fail(shown, f"has a tokenizer transformers cannot load ({type(e).__name__}: "
                    f"{detail}).", fix) from None
    if not getattr(tok, "is_fast", False):
        raise _fail(shown, "has a tokenizer that transformers cannot turn into tokenizer.json.",
                    "Install sentencepiece and protobuf, or put a tokenizer.json next to the "
                    "weights.")
    with tempfile.TemporaryDirectory() as tmp:
        tok.save_pretrained(tmp)
        written = []
        for fname in TOKENIZER_FILES:
            if (pathlib.Path(tmp) / fname).exists():
                shutil.copyfile(pathlib.Path(tmp) / fname, dst / fname)
                written.append(fname)
    for fname in ("generation_config.json",):
        if (src / fname).exists() and fname not in written:
            _check_regular(src / fname, "generation config", MAX_JSON_BYTES)
            shutil.copyfile(src / fname, dst / fname)
            written.append(fname)
    return written


# ---------------------------------------------------------------------------------------------
# GGUF (llama.cpp): dequantized per tensor, renamed to Hugging Face names
# ---------------------------------------------------------------------------------------------

_GGUF_GLOBAL = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# blk.N.<key> -> model.layers.N.<module>, per GGUF architecture (llama.cpp's names, as in
# gguf-py's tensor map; a test checks these tables against it).
_GGUF_BLOCK = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
_GGUF_QK_NORM = {"attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}
_GGUF_BLOCKS = {
    "llama": _GGUF_BLOCK,
    "qwen2": _GGUF_BLOCK,
    "qwen3": {**_GGUF_BLOCK, **_GGUF_QK_NORM},
    # Phi-3 keeps its fused projections: ffn_up holds gate then up (2 * n_ff rows)
    "phi3": {"attn_qkv": "self_attn.qkv_proj", "attn_output": "self_attn.o_proj",
             "ffn_up": "mlp.gate_up_proj", "ffn_down": "mlp.down_proj",
             "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"},
    # Gemma's ffn_norm is the norm *before* the FFN; its post-sublayer norms have their own names
    "gemma3": {**_GGUF_BLOCK, **_GGUF_QK_NORM, "ffn_norm": "pre_feedforward_layernorm",
               "post_attention_norm": "post_attention_layernorm",
               "post_ffw_norm": "post_feedforward_layernorm"},
}
_GGUF_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
GGUF_ARCHITECTURES = tuple(_GGUF_BLOCKS)
# Hugging Face config fields read from "<arch>.<key>" metadata (llama.cpp's key names).
_GGUF_CONFIG_KEYS = {
    "hidden_size": "embedding_length", "intermediate_size": "feed_forward_length",
    "num_hidden_layers": "block_count", "num_attention_heads": "attention.head_count",
}
_GGUF_MODEL = {  # arch -> (model_type, architecture class, hidden_act)
    "llama": ("llama", "LlamaForCausalLM", "silu"),
    "qwen2": ("qwen2", "Qwen2ForCausalLM", "silu"),
    "qwen3": ("qwen3", "Qwen3ForCausalLM", "silu"),
    "phi3": ("phi3", "Phi3ForCausalLM", "silu"),
    "gemma3": ("gemma3_text", "Gemma3ForCausalLM", "gelu_pytorch_tanh"),
}


def _gguf_hf_name(arch: str, name: str) -> str | None:
    if name in _GGUF_GLOBAL:
        return _GGUF_GLOBAL[name]
    m = _GGUF_BLOCK_RE.fullmatch(name)
    block = _GGUF_BLOCKS[arch]
    if m and m.group(2) in block:
        return f"model.layers.{m.group(1)}.{block[m.group(2)]}.{m.group(3)}"
    return None


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's rotary row permutation of a q_proj/k_proj weight [n_head*head_dim, d]."""
    rows = w.shape[0]
    return (w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


# GGUF metadata value types (gguf-py's GGUFValueType): fixed sizes; 8 = string, 9 = array
_GGUF_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def _check_gguf_counts(path: pathlib.Path) -> None:
    """Walk a GGUF's header and metadata with every count checked against the bytes left.

    gguf's reader builds one view per array element before it checks anything, so a 100-byte
    file whose header declares an array of 2^60 strings keeps it busy for ever (the fuzzer
    found it). Here each count must fit the file first; a real file passes in milliseconds.
    """
    data = np.memmap(path, dtype=np.uint8, mode="r") if path.stat().st_size else np.zeros(0, np.uint8)
    end, pos = len(data), 0

    def bad(detail: str, fix: str = "The file is truncated or corrupt; download it again."):
        return _fail(path, f"is not a readable GGUF file ({detail}).", fix)

    def take(n: int) -> int:
        nonlocal pos
        if n < 0 or pos + n > end:
            raise bad(f"it declares more data than its {end} bytes hold, at byte {pos}")
        pos += n
        return pos - n

    def u(n: int) -> int:
        at = take(n)
        return int.from_bytes(data[at:at + n].tobytes(), "little")

    def value(kind: int, depth: int = 0) -> None:
        if kind in _GGUF_SIZES:
            take(_GGUF_SIZES[kind])
        elif kind == 8:  # a string: u64 length, bytes
            take(u(8))
        elif kind == 9 and depth < 4:  # an array: u32 element type, u64 count, elements
            elem, count = u(4), u(8)
            if elem in _GGUF_SIZES:
                take(_GGUF_SIZES[elem] * count)
                return
            least = 8 if elem == 8 else 12  # a string's length; a nested array's type, count
            if count * least > end - pos:
                take(count * least)  # raises, naming the file
            for _ in range(count):
                value(elem, depth + 1)
        else:
            raise bad(f"a metadata value of unknown type {kind} at byte {pos}", "The file is "
                      "corrupt or from a newer GGUF version; download or convert it again.")

    if u(4) != 0x46554747:  # "GGUF"
        raise bad("no GGUF magic", "Pass a .gguf file.")
    version = u(4)
    if version not in (2, 3):
        raise bad(f"GGUF version {version}; this reader knows 2 and 3",
                  "Convert it again with a recent llama.cpp.")
    n_tensors, n_kv = u(8), u(8)
    if n_kv * 13 > end - pos or n_tensors * 28 > end - pos:  # the least each can take
        raise bad(f"{n_kv} metadata entries and {n_tensors} tensors declared, more than its "
                  f"{end} bytes can hold")
    for _ in range(n_kv):
        take(u(8))  # key
        value(u(4))


class GGUFCheckpoint(Checkpoint):
    """A llama.cpp GGUF file. Tensors are dequantized to float32 when read and given the
    Hugging Face names and layout that transformers' own GGUF loader gives them: llama's q/k
    rows un-permuted, Gemma's norm weights without the 1 that llama.cpp adds to them."""

    def __init__(self, path: pathlib.Path):
        try:
            import gguf
        except ImportError:
            raise _fail(path, "is a GGUF file, which needs the gguf package to read.",
                        'Run `pip install "flashinfer_py[gguf]"`.') from None
        self.path, self.source_dtype = path, "float32"
        self._dequantize = gguf.quants.dequantize
        _check_regular(path, "GGUF file")
        try:
            _check_gguf_counts(path)
            self._reader = gguf.GGUFReader(path, "r")
        except CheckpointError:
            raise
        except Exception as e:  # noqa: BLE001 - the gguf parser raises many types
            raise _fail(path, f"is not a readable GGUF file ({type(e).__name__}: {e}).",
                        "The file is truncated or corrupt; download it again.") from None
        self.arch = arch = self._field("general.architecture")
        if arch not in GGUF_ARCHITECTURES:
            raise _fail(path, f"has GGUF architecture {arch!r}; supported: "
                        f"{', '.join(GGUF_ARCHITECTURES)}.", "Use the Hugging Face (safetensors) "
                        "release of this model instead.")
        self._tensors, unknown = {}, []
        for t in self._reader.tensors:
            hf = _gguf_hf_name(arch, t.name)
            if hf is None:
                unknown.append(t.name)
            self._tensors[hf] = t
        if any(n.startswith("rope_factors") for n in unknown):
            raise _fail(path, "carries LongRoPE factors (rope_factors_long/short: a Phi-3 "
                        "128k-context model), which this GGUF reader does not apply (llama.cpp "
                        "and transformers pick the factors differently).", "Convert the model's "
                        "Hugging Face release, where LongRoPE is supported.")
        if unknown:
            raise _fail(path, f"has tensors this reader cannot map: {unknown[:5]}.",
                        f"This {arch} variant is not supported; use its Hugging Face release.")
        self._shapes = {k: tuple(int(d) for d in reversed(t.shape)) for k, t in
                        self._tensors.items()}
        try:
            self.config = self._make_config()
        except CheckpointError:
            raise
        except (TypeError, ValueError, ArithmeticError) as e:  # a count of 0, a string, ...
            raise _fail(path, f"has metadata this reader cannot use ({type(e).__name__}: {e}).",
                        "The file is damaged; download it or export it with llama.cpp again.") from None

    def _field(self, key: str, default: Any = None) -> Any:
        field = self._reader.fields.get(key)
        if field is None:
            return default
        try:
            return field.contents()
        except (UnicodeDecodeError, ValueError, IndexError, TypeError) as e:  # the fuzzer's
            raise _fail(self.path, f"has an unreadable metadata value {key!r} "
                        f"({type(e).__name__}: {e}).", "The file is corrupt; download it "
                        "again.") from None

    def _arch_field(self, key: str, default: Any = None, required: bool = True) -> Any:
        value = self._field(f"{self.arch}.{key}", default)
        if value is None and required:
            raise _fail(self.path, f"lacks the GGUF metadata key '{self.arch}.{key}'.", "The file "
                        "is incomplete; re-export it with llama.cpp's convert_hf_to_gguf.py.")
        return value

    def _make_config(self) -> dict:
        """A Hugging Face config.json dict for the file, as transformers' GGUF loader builds it
        (where it loses information llama.cpp keeps, llama.cpp's reading wins: see below)."""
        f = self._arch_field
        model_type, cls, act = _GGUF_MODEL[self.arch]
        config = {"model_type": model_type, "architectures": [cls], "hidden_act": act}
        config.update({hf: int(f(key)) for hf, key in _GGUF_CONFIG_KEYS.items()})
        for hf, key in _GGUF_CONFIG_KEYS.items():
            if config[hf] <= 0:
                raise _fail(self.path, f"has '{self.arch}.{key}' = {config[hf]}, which must be "
                            "positive.", "The file is damaged; download or export it again.")
        n_head, hidden = config["num_attention_heads"], config["hidden_size"]
        head_dim = int(f("attention.key_length", hidden // n_head))
        theta = float(f("rope.freq_base", 10000.0))
        tokens = self._reader.fields.get("tokenizer.ggml.tokens")
        embed = self._shapes.get("model.embed_tokens.weight", (0,))
        vocab = f("vocab_size", len(tokens.data) if tokens is not None else embed[0])
        n_kv = int(f("attention.head_count_kv", n_head))
        if n_kv <= 0 or n_head % n_kv or head_dim <= 0:
            raise _fail(self.path, f"has {n_kv} key-value heads and key length {head_dim} for "
                        f"{n_head} attention heads: the key-value heads must divide the heads, "
                        "and both be positive.", "The file is damaged; download or export it "
                        "again.")
        config.update({
            "num_key_value_heads": n_kv,
            "head_dim": head_dim,
            "rms_norm_eps": float(f("attention.layer_norm_rms_epsilon", 1e-5)),
            "rope_theta": theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": theta},
            "max_position_embeddings": int(f("context_length", 2048)),
            "vocab_size": int(vocab),
            "tie_word_embeddings": "lm_head.weight" not in self._tensors,
            "attention_bias": "model.layers.0.self_attn.q_proj.bias" in self._tensors,
            "mlp_bias": False,
        })
        config.update(getattr(self, f"_config_{self.arch}")(config))
        for key in ("bos", "eos", "padding", "unknown"):
            tid = self._field(f"tokenizer.ggml.{key}_token_id")
            if tid is not None:
                short = {"padding": "pad", "unknown": "unk"}.get(key, key)
                config[f"{short}_token_id"] = int(tid)
        return config

    def _no_rope_scaling(self) -> None:
        scaling = self._arch_field("rope.scaling.type", "none", required=False)
        if scaling != "none":
            raise _fail(self.path, f"uses rope scaling {scaling!r}, which is not supported yet "
                        f"for {self.arch}.", "Use a model without rope scaling, or its Hugging "
                        "Face release.")

    def _config_llama(self, c: dict) -> dict:
        self._no_rope_scaling()
        dim = self._arch_field("rope.dimension_count", c["head_dim"])
        return {"head_dim": int(self._arch_field("attention.key_length", dim))}

    def _config_qwen2(self, c: dict) -> dict:
        self._no_rope_scaling()
        return {"use_sliding_window": False}

    def _config_qwen3(self, c: dict) -> dict:
        self._no_rope_scaling()
        return {"use_sliding_window": False}

    def _config_phi3(self, c: dict) -> dict:
        self._no_rope_scaling()
        # transformers drops these two; llama.cpp applies them, as the HF config.json does
        rotary = int(self._arch_field("rope.dimension_count", c["head_dim"]))
        window = self._arch_field("attention.sliding_window", None, required=False)
        return {"partial_rotary_factor": rotary / c["head_dim"],
                "rope_parameters": {**c["rope_parameters"],
                                    "partial_rotary_factor": rotary / c["head_dim"]},
                "sliding_window": int(window) if window else None}

    def _config_gemma3(self, c: dict) -> dict:
        # llama.cpp's reading of a gemma3 file: five sliding-window layers then one global
        # layer, repeated (pattern 6); local RoPE base 10000, global rope.freq_base (linearly
        # scaled in the 4B-27B models); queries scaled by head_dim, except in the 27B (62
        # layers) where Google's config says hidden_size / heads. transformers' GGUF loader
        # takes the same pattern and bases but always 256 for the query scale and ignores the
        # rope scaling; every released size but the 27B has head_dim 256.
        n_layers, hidden, n_head = (c["num_hidden_layers"], c["hidden_size"],
                                    c["num_attention_heads"])
        full = {"rope_type": "default", "rope_theta": c["rope_theta"]}
        if self._arch_field("rope.scaling.type", "none", required=False) == "linear":
            full = {**full, "rope_type": "linear",
                    "factor": float(self._arch_field("rope.scaling.factor"))}
        else:
            self._no_rope_scaling()
        return {
            "hidden_activation": "gelu_pytorch_tanh",
            "rms_norm_eps": float(self._arch_field("attention.layer_norm_rms_epsilon", 1e-6)),
            "query_pre_attn_scalar": hidden // n_head if n_layers == 62 else c["head_dim"],
            "sliding_window": int(self._arch_field("attention.sliding_window", 4096)),
            "sliding_window_pattern": 6,
            "rope_parameters": {"full_attention": full, "sliding_attention": {
                "rope_type": "default", "rope_theta": 10000.0}},
            "final_logit_softcapping": self._arch_field("final_logit_softcapping", None,
                                                        required=False),
        }

    def _read(self, name: str, rows: tuple[int, int] | None) -> np.ndarray:
        t = self._tensors[name]
        heads = self._permuted_heads(name)
        data = t.data if rows is None or heads else t.data[rows[0]:rows[1]]  # whole quant rows
        try:
            w = np.asarray(self._dequantize(data, t.tensor_type), dtype=np.float32)
        except (NotImplementedError, ValueError) as e:
            raise _fail(self.path, f"stores {t.name} as {t.tensor_type.name}, which this gguf "
                        f"package cannot dequantize ({e}).", 'Upgrade it (`pip install -U gguf`) '
                        "or use a GGUF with another quantization.") from None
        shape = self._shapes[name]
        if rows is not None and not heads:
            shape = (rows[1] - rows[0], *shape[1:])
        w = w.reshape(shape)
        if heads:
            if heads <= 0 or shape[0] % (2 * heads):
                raise _fail(self.path, f"stores {t.name} with {shape[0]} rows, which "
                            f"{heads} attention heads of an even head size cannot make.",
                            "The metadata's head counts and the tensors disagree: the file is "
                            "damaged; download or convert it again.")
            w = unpermute_qk(w, heads)
            if rows is not None:
                w = w[rows[0]:rows[1]]
        if self.arch == "gemma3" and name.endswith("norm.weight"):
            w = w - np.float32(1.0)  # llama.cpp stores Gemma's (1 + w); transformers wants w
        if not w.flags.writeable or np.may_share_memory(w, t.data):  # a view of the mmap
            w = w.copy()
        return np.ascontiguousarray(w, dtype=np.float32)

    _BLOCKS = {"Q8_0": "q8_0", "Q4_0": "q4_0", "Q4_1": "q4_1"}

    def stored_type(self, name: str) -> str:
        self._check_name(name)
        return self._tensors[name].tensor_type.name

    def stored_blocks(self, name: str) -> str | None:
        return self._BLOCKS.get(self.stored_type(name))

    def get_blocks(self, name: str, rows: tuple[int, int] | None = None) -> np.ndarray:
        """The blocks of a Q8_0/Q4_0/Q4_1 tensor, bit for bit. llama's q/k rows are moved back
        to the Hugging Face order whole: the permutation is over rows and blocks run along a
        row, so no value changes."""
        if self.stored_blocks(name) is None:
            return super().get_blocks(name, rows)
        t = self._tensors[name]
        n_rows = self._shapes[name][0]
        data = np.asarray(t.data, np.uint8).reshape(n_rows, -1)
        heads = self._permuted_heads(name)
        if heads:
            data = unpermute_qk(data, heads)
        if rows is not None:
            data = data[rows[0]:rows[1]]
        return np.array(data, np.uint8, copy=True, order="C")  # off the memory map

    def _permuted_heads(self, name: str) -> int:
        """Heads of a q/k tensor llama.cpp permuted for its rotary layout (llama only), or 0."""
        if self.arch != "llama":
            return 0
        if ".self_attn.q_proj." in name:
            return self.config["num_attention_heads"]
        if ".self_attn.k_proj." in name:
            return self.config["num_key_value_heads"]
        return 0

    def write_tokenizer(self, dst_dir: os.PathLike | str) -> list[str]:
        """Build tokenizer.json from the GGUF metadata with transformers (convert time only);
        ``[]`` when the file carries no vocabulary."""
        dst = pathlib.Path(dst_dir)
        dst.mkdir(parents=True, exist_ok=True)
        if "tokenizer.ggml.tokens" not in self._reader.fields:
            return []
        written = _save_with_transformers(self.path.parent, dst, {"gguf_file": self.path.name},
                                          self.path)
        template = self._field("tokenizer.chat_template")
        if template and "chat_template.jinja" not in written and not _has_template(dst):
            (dst / "chat_template.jinja").write_text(template, encoding="utf-8")
            written.append("chat_template.jinja")
        ids = {k: v for k, v in self.config.items() if k in ("bos_token_id", "eos_token_id",
                                                             "pad_token_id")}
        if ids and "generation_config.json" not in written:
            (dst / "generation_config.json").write_text(json.dumps(ids, indent=2) + "\n")
            written.append("generation_config.json")
        return written

    def close(self) -> None:
        self._tensors = {}
        self._reader = None


def _has_template(dst: pathlib.Path) -> bool:
    cfg = dst / "tokenizer_config.json"
    if not cfg.exists():
        return False
    obj = _read_json(cfg, "tokenizer configuration")
    return isinstance(obj, dict) and "chat_template" in obj
