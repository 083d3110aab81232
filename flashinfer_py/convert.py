"""Checkpoint -> flash model directory.

Streams tensor by tensor (peak DRAM: one layer's FFN in float32 plus one resident tensor), writes
into a temporary directory next to the destination and renames it into place at the end, and
never replaces an existing directory unless ``force=True`` (and even then only after the new one
is complete).
"""
from __future__ import annotations

import errno
import os
import shutil
import time
from pathlib import Path
from typing import Optional

import numpy as np

from . import __version__
from .config import ModelArgs
from .errors import ConvertError, UnsupportedModelError
from .format import (BUNDLE_FILE, DENSE_FILE, FORMAT_NAME, FORMAT_VERSION, STORAGE_DTYPES,
                     SafetensorsStreamWriter, dense_names, file_digest, numpy_storage_dtype,
                     to_storage, write_manifest)

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


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                disable=not enabled, leave=False)


def convert(src, dst, *, dtype: Optional[str] = None, force: bool = False,
            progress: bool = True, alignment: int = 4096) -> Path:
    """Convert a checkpoint (Hugging Face directory or GGUF file) into a flash model directory.

    Args:
        src: a Hugging Face checkpoint directory (config.json + *.safetensors or
            pytorch_model.bin, sharded or not) or a ``.gguf`` file.
        dst: the flash directory to create.
        dtype: storage dtype, "float16", "bfloat16" or "float32"; default: the checkpoint's own
            (float16 for GGUF, whose quantized weights are dequantized).
        force: replace ``dst`` if it exists (only after the new directory is complete).
        progress: show progress bars.
        alignment: bundle record alignment in bytes (4096 suits every SSD).

    Returns:
        The path of the new directory.
    """
    from .checkpoint import open_checkpoint  # the checkpoint readers pull optional dependencies

    dst = Path(dst).expanduser().absolute()
    if dtype is not None and dtype not in STORAGE_DTYPES:
        raise ConvertError(f"--dtype {dtype!r} is not supported; choose one of {', '.join(STORAGE_DTYPES)}.")
    if dst.exists() and not force:
        raise ConvertError(f"{dst} already exists; choose another destination or pass --force "
                           "(force=True) to replace it once the new conversion is complete.")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        with open_checkpoint(src) as ckpt:
            _convert_into(ckpt, tmp, dtype, progress, alignment)
        _move_into_place(tmp, dst, force)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno == errno.ENOSPC or "No space left" in str(e):
            raise ConvertError(f"{dst.parent}: no space left on the device while converting {src}. "
                               "Free space or pick a destination on another disk; nothing was changed "
                               "at the destination.") from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def _move_into_place(tmp: Path, dst: Path, force: bool) -> None:
    if dst.exists():
        if not force:  # appeared while we were converting
            raise ConvertError(f"{dst} appeared during conversion; not replacing it without --force.")
        old = dst.parent / f".{dst.name}.old-{os.getpid()}"
        os.replace(dst, old)
        os.replace(tmp, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, dst)


def _convert_into(ckpt, out: Path, dtype: Optional[str], progress: bool, alignment: int) -> None:
    from .bundles import BundleWriter

    try:
        args = ModelArgs.from_hf_config(ckpt.config)
    except UnsupportedModelError as e:
        raise UnsupportedModelError(f"{ckpt.path}: {e}") from None
    dtype = dtype or ("float16" if ckpt.source_dtype == "float32" and _is_gguf(ckpt) else ckpt.source_dtype)
    names = _Names(args, ckpt)
    t0 = time.perf_counter()

    # ---- resident tensors: header planned from shapes, then streamed one by one
    plan = []
    for ours, kind in dense_names(args):
        dt = numpy_storage_dtype(dtype) if kind == "matrix" else np.dtype(np.float32)
        plan.append((ours, names.hf(ours), dt, names.shape(ours)))
    _check_shapes(args, plan, ckpt)
    total = sum(int(np.prod(s)) * dt.itemsize for _, _, dt, s in plan)
    writer = SafetensorsStreamWriter(out / DENSE_FILE, [(o, dt, s) for o, _, dt, s in plan],
                                     {"format": FORMAT_NAME, "dtype": dtype})
    with _progress(total, "resident tensors", progress) as bar:
        for ours, hf, dt, shape in plan:
            x = names.read(ours)
            x = to_storage(x, dtype) if dt != np.float32 else np.asarray(x, np.float32)
            writer.write(ours, x)
            bar.update(x.nbytes)
    writer.close()

    # ---- FFN bundles: one layer at a time
    parts = args.ffn_parts
    bw = BundleWriter(str(out / BUNDLE_FILE), args.num_hidden_layers, args.hidden_size,
                      args.intermediate_size, dtype, parts, alignment=alignment)
    d, f = args.hidden_size, args.intermediate_size
    with _progress(args.num_hidden_layers, "FFN bundles (layers)", progress) as bar:
        for i in range(args.num_hidden_layers):
            mats = []
            for part in parts:
                w = names.read(f"layers.{i}.{part}")
                if part == "down":
                    w = w.T  # down_proj.weight is [d, f]: neuron i's column becomes a row
                if w.shape != (f, d):
                    raise ConvertError(f"{ckpt.path}: layer {i} {part} weight has shape {w.shape}, "
                                       f"expected {(f, d)} from config.json.")
                mats.append(to_storage(w, dtype))
            bw.write_layer(i, mats)
            bar.update(1)
    bw.finish()

    tok_files = ckpt.write_tokenizer(out)
    if "tokenizer.json" not in tok_files:
        import warnings

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
        "dtype": dtype,
        "files": {"dense": DENSE_FILE, "bundles": BUNDLE_FILE,
                  "tokenizer": "tokenizer.json" if "tokenizer.json" in tok_files else None},
        "bundle": {"parts": parts, "d_model": d, "d_ff": f, "n_layers": args.num_hidden_layers,
                   "record_bytes": int(hdr["record_bytes"]), "alignment": int(hdr["alignment"]),
                   "data_offset": int(hdr["data_offset"]), "up_bias": "dense.safetensors" if args.ffn_bias else None},
        "checksums": checksums,
        "convert_seconds": round(time.perf_counter() - t0, 2),
    })


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
