"""Warm dense decode speed per storage format: SmolLM2-135M and a 1B Llama shape, everything in
DRAM, our runtime side by side with llama.cpp on the same weights when llama-cpp-python is
installed (``pip install llama-cpp-python==0.3.36``: it builds llama.cpp, ~12 minutes).

    python benchmarks/dense_decode.py build [--models smollm2,llama1b]   # once, ~6 GB disk
    python benchmarks/dense_decode.py run [--tokens 64] [--rounds 3] [--models ...]
                                          [--formats float16,q8_0,q4_1] [--no-llama]

``build`` writes under ``${FLASHINFER_PY_CACHE:-~/.cache/flashinfer_py}/bench/dense-decode``:

- SmolLM2-135M-Instruct from its Q4_1 GGUF (the demo model, ``default_gguf_path()``),
  converted to ``float16`` (its blocks dequantized: the weights llama.cpp's F16 GGUF of this
  model holds), ``q8_0`` (requantized) and ``q4_1`` (its blocks kept bit for bit: exactly the
  model llama.cpp runs, Q8_0 tied embeddings / LM head included).
- ``llama1b``: TinyLlama-1.1B's shape (hidden 2048, FFN 5632 SwiGLU, 22 layers, 32 heads, 4
  key/value heads, vocabulary 32000, untied LM head) with synthetic float16 weights, written
  as an F16 GGUF by ``llamacpp_compare.build_gguf`` and converted to each format.
- With llama-cpp-python: llama.cpp's own GGUFs of the same weights (F16 of the dequantized
  SmolLM2, the 1B's F16 and its Q8_0/Q4_1 quantized by llama.cpp; SmolLM2's Q4_1 is the
  original file), and ``llama1b-q4_1-gguf``: llama.cpp's Q4_1 file of the 1B converted by us
  with its blocks kept (exactly the model llama.cpp runs; its dense FFN layers then run
  interleaved, as SmolLM2's q4_1 does).

``run --before`` adds every format of ours run as before commit 668f321 (no interleaved
4-bit matrices, the dense FFN fused per neuron rather than two products), in a process of its
own, in the same rounds.

``run --baseline DIR`` adds every format of ours run by another build of flashinfer_py (a
directory holding a ``flashinfer_py`` package with its compiled modules, e.g. ``pip install
--no-deps --target DIR .`` at an older commit), in a process of its own, in the same rounds:
the before/after of a kernel change.

``run`` starts one measuring process per tool (llama.cpp's without our OMP_WAIT_POLICY, see
``serve``), which loads every model once (dense: ``fi.load(dir)``; llama.cpp: n_threads=2,
mmap, no repacking); then per round, in shuffled order, each model decodes: a 16-token
prompt, 8 warm-up tokens, then ``--tokens`` greedy tokens one by one, each timed. Per (model, format,
tool) the median ms/token of each round, and over rounds the median; tokens/s = 1000 /
that. Synthetic weights give meaningless text; the bytes and the compute are real.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import git_commit, machine, use_baseline  # noqa: E402

FORMATS = ("float16", "q8_0", "q4_1", "q4_1-gguf")
LLAMA_GGUF = {"float16": "F16", "q8_0": "Q8_0", "q4_1": "Q4_1", "q4_1-gguf": "Q4_1"}
PROMPT, WARMUP = 16, 8


def workdir() -> Path:
    from flashinfer_py.default_model import cache_root

    return cache_root() / "bench" / "dense-decode"


def shape_1b():
    from llamacpp_compare import Shape

    return Shape(name="synthetic-llama-1b-shape", layers=22, d=2048, ffn=5632, heads=32,
                 kv_heads=4, vocab=32000, ctx=2048)


# ---- build --------------------------------------------------------------------------------

def _convert(src: Path, dst: Path, dtype: str) -> None:
    import warnings

    from flashinfer_py import checkpoint
    from flashinfer_py.convert import convert

    if (dst / "manifest.json").exists():
        return
    # the synthetic vocabulary has no real tokenizer: the benchmark feeds token ids
    checkpoint.GGUFCheckpoint.write_tokenizer = lambda self, dst: []
    t0 = time.time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        convert(src, dst, dtype=dtype, progress=False)
    print(f"{dst}: {time.time() - t0:.0f} s", file=sys.stderr)


def _llama_quantize(src: Path, dst: Path, kind: str) -> None:
    """llama.cpp's own quantizer (llama-cpp-python's binding of llama_model_quantize)."""
    import llama_cpp

    if dst.exists():
        return
    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{kind}")
    p.allow_requantize = True
    p.nthread = 2
    tmp = dst.with_suffix(".partial")
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), p)
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize {src} -> {kind} failed ({rc})")
    os.replace(tmp, dst)


def have_llama() -> bool:
    try:
        import llama_cpp  # noqa: F401
        return True
    except ImportError:
        return False


def cmd_build(a) -> None:
    from flashinfer_py.default_model import default_gguf_path

    wd = workdir()
    wd.mkdir(parents=True, exist_ok=True)
    models = a.models.split(",")
    if "smollm2" in models:
        g = default_gguf_path()
        for f in FORMATS[:3]:
            _convert(g, wd / f"smollm2-{f}", f)
        if have_llama():
            _llama_quantize(g, wd / "smollm2-F16.gguf", "F16")
    if "llama1b" in models:
        from llamacpp_compare import build_gguf

        g = wd / "llama1b-F16.gguf"
        if not g.exists():
            build_gguf(g, shape_1b())
        for f in FORMATS[:3]:
            _convert(g, wd / f"llama1b-{f}", f)
        if have_llama():
            for f in ("q8_0", "q4_1"):
                _llama_quantize(g, wd / f"llama1b-{LLAMA_GGUF[f]}.gguf", LLAMA_GGUF[f])
            # llama.cpp's Q4_1 file converted with its blocks kept: exactly llama.cpp's model
            _convert(wd / "llama1b-Q4_1.gguf", wd / "llama1b-q4_1-gguf", "q4_1")


# ---- run ----------------------------------------------------------------------------------

class Ours:
    def __init__(self, path: Path, new: bool = True):
        import flashinfer_py as fi

        if not new:  # as before: row-major 4-bit matrices, the dense FFN fused per neuron
            from flashinfer_py.ffn import ResidentFFN

            fi.kernels.interleaves = lambda fmt: False
            ResidentFFN._two_products = lambda self, layer: False
        self.m = fi.load(path)
        self.vocab = self.m.args.vocab_size

    def decode(self, prompt: list, n: int) -> list:
        cache = self.m.new_cache()
        tok = int(np.argmax(self.m.forward(prompt, cache, last_only=True)[-1]))
        out = []
        for _ in range(n):
            t0 = time.perf_counter()
            tok = int(np.argmax(self.m.forward([tok], cache, last_only=True)[-1]))
            out.append(time.perf_counter() - t0)
        return out


class LlamaCpp:
    def __init__(self, path: Path):
        import llama_cpp
        import llama_cpp.llama_cpp as low

        defaults = low.llama_model_default_params

        def no_repack():  # weights stay in the mmap, as in llamacpp_compare.py
            p = defaults()
            p.use_extra_bufts = False
            return p

        low.llama_model_default_params = no_repack
        self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=512, n_batch=64, n_threads=2,
                                   n_threads_batch=2, use_mmap=True, verbose=False)
        low.llama_model_default_params = defaults
        self.vocab = self.llm.n_vocab()

    def _next(self) -> int:
        # the last token's logits (Llama.scores keeps them only with logits_all)
        logits = np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(self.vocab,))
        return int(np.argmax(logits))

    def decode(self, prompt: list, n: int) -> list:
        llm = self.llm
        llm.reset()
        llm.eval(prompt)
        tok = self._next()
        out = []
        for _ in range(n):
            t0 = time.perf_counter()
            llm.eval([tok])
            tok = self._next()
            out.append(time.perf_counter() - t0)
        return out


def serve(tool: str) -> None:
    """A measuring process for one tool: reads "load KEY PATH" and "decode KEY N" lines on
    stdin, answers one JSON line each. llama.cpp gets a process of its own: importing
    flashinfer_py sets OMP_WAIT_POLICY=passive, which would put llama.cpp's OpenMP threads to
    sleep between its ops (measured: SmolLM2 F16 29 ms a token in our process, 10.5 alone)."""
    runners = {}
    if tool == "ours-baseline":
        use_baseline(os.environ["FLASHINFER_BASELINE"])
        import flashinfer_py

        print(f"baseline: {Path(flashinfer_py.__file__).parent}", file=sys.stderr, flush=True)
    for line in sys.stdin:
        cmd, key, arg = line.split()
        if cmd == "load":
            runners[key] = (LlamaCpp(Path(arg)) if tool == "llama.cpp"
                            else Ours(Path(arg), new=tool != "ours-before"))
            out = {"vocab": runners[key].vocab}
        else:
            run = runners[key]
            rng = random.Random(0)
            prompt = [1] + [rng.randrange(100, 30000) % run.vocab for _ in range(PROMPT - 1)]
            run.decode(prompt, WARMUP)
            out = {"s": run.decode(prompt, int(arg))}
        print(json.dumps(out), flush=True)


def cmd_run(a) -> None:
    import subprocess

    from flashinfer_py import kernels
    from flashinfer_py.default_model import default_gguf_path

    wd = workdir()
    paths = {}  # (model, format, tool) -> the directory or GGUF it loads
    for model in a.models.split(","):
        for f in a.formats.split(","):
            d = wd / f"{model}-{f}"
            if (d / "manifest.json").exists():
                paths[(model, f, "ours")] = d
                if a.before:
                    paths[(model, f, "ours-before")] = d
                if a.baseline:
                    paths[(model, f, "ours-baseline")] = d
            if a.llama and have_llama():
                g = wd / f"{model}-{LLAMA_GGUF[f]}.gguf"
                if model == "smollm2" and f == "q4_1":  # the original file
                    g = default_gguf_path()
                if g.exists():
                    paths[(model, f, "llama.cpp")] = g
    procs = {}
    for tool in sorted({k[2] for k in paths}):
        env = dict(os.environ)
        env.pop("OMP_WAIT_POLICY", None)  # each tool's own default
        if a.baseline:
            env["FLASHINFER_BASELINE"] = a.baseline
        procs[tool] = subprocess.Popen([sys.executable, __file__, "serve", tool], env=env,
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def ask(tool: str, line: str) -> dict:
        p = procs[tool]
        p.stdin.write(line + "\n")
        p.stdin.flush()
        return json.loads(p.stdout.readline())

    for k, path in paths.items():
        ask(k[2], f"load {'|'.join(k)} {path}")
    rng = random.Random(0)
    ms: dict = {k: [] for k in paths}
    keys = list(paths)
    load0 = os.getloadavg()[0]
    for r in range(a.rounds):
        rng.shuffle(keys)
        for k in keys:
            ts = ask(k[2], f"decode {'|'.join(k)} {a.tokens}")["s"]
            ms[k].append(1e3 * statistics.median(ts))
            print(f"round {r} {k}: {ms[k][-1]:.2f} ms/token", file=sys.stderr, flush=True)
    load1 = os.getloadavg()[0]
    for p in procs.values():
        p.stdin.close()
        p.wait()
    print(f"# {machine()}; isa={kernels.kernel_isa()}; commit {git_commit()}; load average "
          f"{load0:.2f} -> {load1:.2f}; {a.rounds} rounds x {a.tokens} tokens, each tool in its "
          "own process")
    print("| model | format | tool | ms/token (median of rounds; each round) | tokens/s |"
          " vs our float16 | vs llama.cpp |")
    print("|---|---|---|---|---|---|---|")
    res = {k: statistics.median(v) for k, v in ms.items()}
    for k in sorted(res):
        model, f, tool = k
        ours = tool.startswith("ours")
        base = res.get((model, "float16", tool if ours else "ours"))  # each build's own float16
        other = res.get((model, f, "llama.cpp" if ours else "ours"))
        vs16 = f"{base / res[k]:.2f}x" if base and ours else ""
        vsl = f"{other / res[k]:.2f}x" if other and ours else ""
        each = ", ".join(f"{v:.1f}" for v in ms[k])
        print(f"| {model} | {f} | {tool} | {res[k]:.2f} ({each}) | {1e3 / res[k]:.1f} | {vs16} |"
              f" {vsl} |")
    if a.json:
        Path(a.json).write_text(json.dumps({"|".join(k): v for k, v in ms.items()}, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("--models", default="smollm2,llama1b")
    r = sub.add_parser("run")
    r.add_argument("--models", default="smollm2,llama1b")
    r.add_argument("--formats", default=",".join(FORMATS))
    r.add_argument("--tokens", type=int, default=64)
    r.add_argument("--rounds", type=int, default=3)
    r.add_argument("--no-llama", dest="llama", action="store_false",
                   help="only our runtime, even when llama-cpp-python is installed")
    r.add_argument("--json", default="", help="write every round's ms/token here")
    r.add_argument("--before", action="store_true",
                   help="also run ours as before the two-product FFN and the interleaved 4-bit "
                        "matrices, in a process of its own")
    r.add_argument("--baseline", default="", metavar="DIR",
                   help="also run ours from another build: DIR holds a flashinfer_py package "
                        "(pip install --no-deps --target DIR . at the commit to compare)")
    sv = sub.add_parser("serve", help="internal: one tool's measuring process")
    sv.add_argument("tool", choices=["ours", "ours-before", "ours-baseline", "llama.cpp"])
    a = ap.parse_args()
    if a.cmd == "serve":
        serve(a.tool)
    else:
        {"build": cmd_build, "run": cmd_run}[a.cmd](a)


if __name__ == "__main__":
    main()
