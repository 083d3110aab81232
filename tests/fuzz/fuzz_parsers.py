"""Coverage-guided fuzzers (atheris, libFuzzer) for every reader of an untrusted file.

Targets, each fed one mutated file per run; the only outcomes allowed are success or one of
the documented errors (ALLOWED): no other exception, no crash, no hang (libFuzzer's -timeout),
no unbounded allocation (-rss_limit_mb).

  manifest     manifest.json of a converted tiny model, opened with fi.load (dense)
  bundle       the header of ffn_bundles.bin (and the file's length), read_header + BundleReader
  predictors   predictors.npz of the tiny model, Predictors.load
  safetensors  model.safetensors of a Hugging Face directory, open_checkpoint + every tensor
  gguf         a .gguf file, open_checkpoint + config + every tensor

Run one (the corpus folder starts with the seeds the script writes there):

  python tests/fuzz/fuzz_parsers.py gguf -runs=200000 -max_len=16384 -rss_limit_mb=2048 \\
      -timeout=10 /tmp/fuzz-gguf

A finding is saved by libFuzzer as crash-<sha1> in the current folder; rerun it with
`python tests/fuzz/fuzz_parsers.py TARGET crash-<sha1>`.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/, for numpy_llama
from numpy_llama import llama_config, llama_weights, write_llama  # noqa: E402

D, F, LAYERS, HEADS, VOCAB = 32, 48, 1, 2, 24  # small enough that a seed is a few KB
# scratch files of every run (a RAM disk where there is one); FLASHINFER_FUZZ_WORK moves it
SCRATCH = Path("/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir())
WORK = Path(os.environ.get("FLASHINFER_FUZZ_WORK") or SCRATCH / f"flashinfer-fuzz-{os.getpid()}")


# ------------------------------------------------------------------------------------------
# seeds: a tiny Llama in every input format, made with numpy (no torch, no model hub)
# ------------------------------------------------------------------------------------------


def _config() -> dict:
    return llama_config(D, F, LAYERS, HEADS, 1, VOCAB, 256)


def _weights() -> dict:
    return llama_weights(_config())


def _hf_dir(root: Path) -> Path:
    d = root / "hf"
    return d if d.exists() else write_llama(d, _config())


def _flash_dir(root: Path) -> Path:
    import flashinfer_py as fi

    d = root / "flash"
    if not d.exists():
        fi.convert(_hf_dir(root), d, progress=False)
        from flashinfer_py.train import TrainConfig, train_predictors

        ids = np.random.default_rng(1).integers(3, VOCAB, 256).tolist()
        train_predictors(fi.load(d), ids, TrainConfig(max_tokens=256, methods=("sketch",)),
                         progress=False)
    return d


def _gguf_file(root: Path) -> Path:
    import gguf

    path = root / "tiny.gguf"
    if path.exists():
        return path
    root.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(256)
    w.add_embedding_length(D)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(F)
    w.add_head_count(HEADS)
    w.add_head_count_kv(1)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(VOCAB)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight":
             "output_norm.weight", "lm_head.weight": "output.weight"}
    parts = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj":
             "attn_v", "self_attn.o_proj": "attn_output", "input_layernorm": "attn_norm",
             "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate",
             "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for name, x in _weights().items():
        if name in names:
            w.add_tensor(names[name], x if x.ndim == 2 else x.astype(np.float32))
            continue
        i, rest = name.split(".")[2], ".".join(name.split(".")[3:-1])
        t = x if x.ndim == 2 else x.astype(np.float32)  # llama.cpp keeps norms in float32
        w.add_tensor(f"blk.{i}.{parts[rest]}.weight", t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def write_seeds(target: str, corpus: Path) -> None:
    """The valid file of `target` (and a truncated copy) as the corpus' first inputs."""
    corpus.mkdir(parents=True, exist_ok=True)
    root = WORK / "seeds"
    source = {"manifest": lambda: _flash_dir(root) / "manifest.json",
              "bundle": lambda: _flash_dir(root) / "ffn_bundles.bin",
              "predictors": lambda: _flash_dir(root) / "predictors.npz",
              "safetensors": lambda: _hf_dir(root) / "model.safetensors",
              "gguf": lambda: _gguf_file(root)}[target]()
    data = source.read_bytes()
    if target == "bundle":
        data = data[:4096]  # the header; the file is padded to the length it declares
    (corpus / "seed").write_bytes(data)
    (corpus / "seed-half").write_bytes(data[:len(data) // 2])


# ------------------------------------------------------------------------------------------
# targets
# ------------------------------------------------------------------------------------------


def _allowed():
    from flashinfer_py.checkpoint import CheckpointError
    from flashinfer_py.errors import (ConvertError, FlashFormatError, FlashIOError,
                                      UnsupportedModelError)

    return (FlashFormatError, FlashIOError, CheckpointError, UnsupportedModelError, ConvertError)


def _fresh(name: str) -> Path:
    d = WORK / name
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir()
    return d


def run_manifest(data: bytes) -> None:
    import flashinfer_py as fi

    src = _flash_dir(WORK / "seeds")
    d = _fresh("manifest")
    for f in src.iterdir():
        if f.name != "manifest.json":
            os.symlink(f, d / f.name)
    (d / "manifest.json").write_bytes(data)
    fi.load(d)


def run_bundle(data: bytes) -> None:
    from flashinfer_py import _core

    d = _fresh("bundle")
    path = d / "ffn_bundles.bin"
    with open(path, "wb") as f:
        f.write(data)
        if len(data) >= 4096:  # the length the header declares, capped: the header is fuzzed
            declared = int.from_bytes(data[76:84], "little")  # file_bytes
            f.truncate(max(len(data), min(declared, 1 << 22)))
    hdr = _core.read_header(str(path))
    r = _core.BundleReader(str(path), _core.ReaderParams(use_direct_io=False, queue_depth=2))
    if hdr["n_layers"] and hdr["d_ff"]:
        out = np.empty((1, r.record_bytes), np.uint8)
        r.read(0, [0], out)


def run_predictors(data: bytes) -> None:
    from flashinfer_py.format import read_manifest
    from flashinfer_py.predictor import Predictors

    src = _flash_dir(WORK / "seeds")
    d = _fresh("predictors")
    (d / "predictors.npz").write_bytes(data)
    Predictors.load(d, read_manifest(src))


def run_safetensors(data: bytes) -> None:
    from flashinfer_py.checkpoint import open_checkpoint

    d = _fresh("safetensors")
    (d / "config.json").write_text(json.dumps(_config()))
    (d / "model.safetensors").write_bytes(data)
    with open_checkpoint(d) as ckpt:
        for name in ckpt.names():
            ckpt.get(name)


def run_gguf(data: bytes) -> None:
    from flashinfer_py.checkpoint import open_checkpoint

    d = _fresh("gguf")
    (d / "m.gguf").write_bytes(data)
    with open_checkpoint(d / "m.gguf") as ckpt:
        _ = ckpt.config
        for name in ckpt.names():
            ckpt.get(name)


def _instrument(atheris, packages) -> None:
    """Coverage for the functions of `packages`, patched in place. (instrument_imports misses
    modules an editable install's finder loads; instrument_all takes half a minute.)"""
    import inspect

    seen = set()

    def visit(obj):
        for v in vars(obj).values():
            f = getattr(v, "__func__", v)
            if inspect.isfunction(f) and id(f) not in seen and f.__module__.split(".")[0] in packages:
                seen.add(id(f))
                atheris.instrument_func(f)
            elif inspect.isclass(v) and v.__module__.split(".")[0] in packages and id(v) not in seen:
                seen.add(id(v))
                visit(v)

    for name, mod in list(sys.modules.items()):
        if mod is not None and name.split(".")[0] in packages:
            visit(mod)


TARGETS = {"manifest": run_manifest, "bundle": run_bundle, "predictors": run_predictors,
           "safetensors": run_safetensors, "gguf": run_gguf}


def main(argv: list) -> None:
    import atheris

    if len(argv) < 2 or argv[1] not in TARGETS:
        sys.exit(f"usage: {argv[0]} {{{','.join(TARGETS)}}} [libFuzzer flags] [CORPUS]")
    target = argv[1]
    if "FLASHINFER_FUZZ_WORK" not in os.environ:  # libFuzzer exits without clean-up code:
        for old in SCRATCH.glob("flashinfer-fuzz-*"):  # remove what finished runs left
            pid = old.name.rsplit("-", 1)[-1]
            if pid.isdigit() and not Path(f"/proc/{pid}").exists():
                shutil.rmtree(old, ignore_errors=True)
    WORK.mkdir(parents=True, exist_ok=True)
    import flashinfer_py.checkpoint  # noqa: F401
    import flashinfer_py.predictor  # noqa: F401
    import gguf  # noqa: F401

    _instrument(atheris, ("flashinfer_py", "gguf", "safetensors"))
    allowed = _allowed()
    corpora = [a for a in argv[2:] if not a.startswith("-")]
    for c in corpora:
        if Path(c).is_dir() and not any(Path(c).iterdir()):
            write_seeds(target, Path(c))
    fn = TARGETS[target]
    for c in corpora:  # the valid file must pass: a reader that refuses everything is no pass
        if (Path(c) / "seed").is_file():
            fn((Path(c) / "seed").read_bytes())

    def one(data: bytes) -> None:
        try:
            fn(data)
        except allowed:
            pass

    atheris.Setup([argv[0], *argv[2:]], one)
    atheris.Fuzz()


if __name__ == "__main__":
    import warnings

    warnings.simplefilter("ignore")  # the converter warns about the odd files it is given
    main(sys.argv)
