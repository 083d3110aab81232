"""Side by side with llama.cpp: a 7B-class Llama model under a DRAM cap, same weights.

    python benchmarks/llamacpp_compare.py build            # once: GGUF + flash dir (~27 GB disk)
    python benchmarks/llamacpp_compare.py compare [--tokens 3] [--llama-timeout 240]
        [--read-ahead 128,machine] [--tools llama,ours,naive]   # root: cgroup v1, drop_caches
        [--caps 0.5,0.3] [--trace synthetic|smollm2] [--json runs.jsonl]
    python benchmarks/llamacpp_compare.py report runs.jsonl [--min-tokens 256]  # min/median/max

What it does:

1. ``build`` writes, once, under ``${FLASHINFER_PY_CACHE:-~/.cache/flashinfer_py}/bench/
   llama-7b-shape``: ``model-f16.gguf``, a Llama-architecture model of the Llama-2-7B shape
   (hidden 4096, FFN 11008 SwiGLU, 32 layers, 32 heads, vocab 32000, float16; 13.5 GB) with
   synthetic weights (one random 64 MiB float16 block, rolled to a different offset for every
   tensor), streamed tensor by tensor through ``gguf.GGUFWriter`` (peak DRAM: one tensor), with
   a 32000-entry SentencePiece-style vocabulary so llama.cpp loads it; then ``flash/``, made from
   that same GGUF by our converter (``flashinfer_py.convert``), so both tools read the same
   weights. No tokenizer.json is made for the flash dir (the benchmark feeds token ids).
2. ``compare`` runs, for each read-ahead setting (128 KiB, then the machine's own, 8 MiB here;
   restored afterwards) and interleaved: llama.cpp (llama-cpp-python, default mmap loading,
   ``use_extra_bufts=False`` so nothing is repacked into anonymous memory, n_threads=2,
   n_ctx = the decoded tokens + 8, at least 64, as our ``max_context``) and our runtime
   (RuntimeConfig(dram_budget=cap - 256 MiB), sparse, window 5,
   bundled, O_DIRECT) each in its own process inside a fresh cgroup v1 memory cgroup limited to
   a fraction of the GGUF's size (``--caps``, default half; the process's interpreter,
   libraries, resident tensors and page cache all count), after dropping the page cache. Below
   ~36% our resident tensors no longer fit beside a cache and the runtime reads the ones it
   cannot keep from flash every token (``RuntimeConfig.stream_resident="auto"``). Each process evaluates one prompt token (warm-up,
   timed separately) and then ``--tokens`` (llama.cpp) or
   ``--our-tokens`` (ours) decode tokens one by one, timing each and taking the
   bytes it read from storage from ``/proc/self/io`` read_bytes (mmap faults and read-ahead
   included), and prints one JSON line.
   - llama.cpp: greedy decode (argmax of its logits fed back), a wall-clock limit per run
     (``--llama-timeout``); tokens finished before the limit are reported.
   - ours: the trained predictor is replaced by a trace of predicted active sets: with the
     paper's statistics (``--trace synthetic``: ``paper_table.make_trace`` at this FFN width:
     ~10% of the FFN predicted per token, half of it carried over from the previous token,
     Zipf-popular neurons; the reuse is a chosen input), or the sets SmolLM2-135M needs on real
     text mapped to this shape (``--trace smollm2``: benchmarks/recorded_trace.py), injected
     by replacing ``Predictors.load`` in this process only; the rest is the real model
     (attention over the resident tensors, the SwiGLU kernel over the predicted rows, the LM
     head). Outputs are meaningless (synthetic weights); I/O and compute are real.
   - ours, naive (``--tools ...,naive``): ``RuntimeConfig(ablation="naive")`` under the same cap:
     every neuron of every layer read per token through one layer buffer, and the resident file
     re-read per token with O_DIRECT (the paper's naive row).
Prints a markdown table with tokens/s, bytes/token and the ratios.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import git_commit, save_figure  # noqa: E402  (stdlib only: safe in the llama.cpp child)

L, D, F, H, VOCAB, CTX = 32, 4096, 11008, 32, 32000, 2048


@dataclass(frozen=True)
class Shape:
    """A Llama-architecture shape for the synthetic GGUF (the default: Llama-2-7B's)."""

    name: str = "synthetic-llama-7b-shape"
    layers: int = L
    d: int = D
    ffn: int = F
    heads: int = H
    kv_heads: int = H
    vocab: int = VOCAB
    ctx: int = CTX


SHAPE_7B = Shape()
NAME_GGUF, NAME_FLASH = "model-f16.gguf", "flash"
MARGIN = 256 << 20        # our dram_budget = cap - MARGIN (page cache of reads, numpy temporaries)
RA_PATH = "/sys/block/vda/queue/read_ahead_kb"


def workdir() -> Path:
    from flashinfer_py.default_model import cache_root

    return cache_root() / "bench" / "llama-7b-shape"


def read_bytes() -> int:
    for line in open("/proc/self/io"):
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    return 0


# ---- build --------------------------------------------------------------------------------

def tensor_plan(sh: Shape = SHAPE_7B):
    """(name, numpy shape, dtype) in file order, llama.cpp's names."""
    kv = sh.d // sh.heads * sh.kv_heads
    out = [("token_embd.weight", (sh.vocab, sh.d), np.float16)]
    for i in range(sh.layers):
        out += [(f"blk.{i}.attn_norm.weight", (sh.d,), np.float32),
                (f"blk.{i}.attn_q.weight", (sh.d, sh.d), np.float16),
                (f"blk.{i}.attn_k.weight", (kv, sh.d), np.float16),
                (f"blk.{i}.attn_v.weight", (kv, sh.d), np.float16)]
        out += [(f"blk.{i}.attn_output.weight", (sh.d, sh.d), np.float16),
                (f"blk.{i}.ffn_norm.weight", (sh.d,), np.float32),
                (f"blk.{i}.ffn_gate.weight", (sh.ffn, sh.d), np.float16),
                (f"blk.{i}.ffn_up.weight", (sh.ffn, sh.d), np.float16),
                (f"blk.{i}.ffn_down.weight", (sh.d, sh.ffn), np.float16)]
    out += [("output_norm.weight", (sh.d,), np.float32),
            ("output.weight", (sh.vocab, sh.d), np.float16)]
    return out


def build_gguf(path: Path, sh: Shape = SHAPE_7B) -> None:
    import gguf

    tmp = path.with_suffix(".partial")
    w = gguf.GGUFWriter(str(tmp), "llama")
    w.add_name(sh.name)
    w.add_context_length(sh.ctx)
    w.add_embedding_length(sh.d)
    w.add_feed_forward_length(sh.ffn)
    w.add_block_count(sh.layers)
    w.add_head_count(sh.heads)
    w.add_head_count_kv(sh.kv_heads)
    w.add_rope_dimension_count(sh.d // sh.heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    w.add_vocab_size(sh.vocab)
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    tokens += [f"\u2581t{i}" for i in range(sh.vocab - len(tokens))]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    types += [gguf.TokenType.BYTE] * 256 + [gguf.TokenType.NORMAL] * (sh.vocab - 259)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([-float(i) for i in range(sh.vocab)])
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    plan = tensor_plan(sh)
    for name, shape, dt in plan:
        w.add_tensor_info(name, shape, np.dtype(dt), int(np.prod(shape)) * np.dtype(dt).itemsize)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    rng = np.random.default_rng(0)
    m = 32 << 20
    base = (rng.standard_normal(m, dtype=np.float32) * 0.02).astype(np.float16)
    t0 = time.time()
    for k, (name, shape, dt) in enumerate(plan):
        n = int(np.prod(shape))
        if dt == np.float32:
            arr = np.ones(n, np.float32)
        else:
            arr = np.empty(n, np.float16)
            o = (k * 1_000_003 + 17) % m
            src = np.concatenate([base[o:], base[:o]])
            for s in range(0, n, m):
                e = min(n, s + m)
                arr[s:e] = src[:e - s]
        w.write_tensor_data(arr.reshape(shape))
        print(f"\rwriting {path.name}: {k + 1}/{len(plan)} ({time.time() - t0:.0f} s)", end="",
              file=sys.stderr)
    w.close()
    os.replace(tmp, path)
    print(file=sys.stderr)


def cmd_build(a) -> None:
    wd = workdir()
    wd.mkdir(parents=True, exist_ok=True)
    g, fl = wd / NAME_GGUF, wd / NAME_FLASH
    if not g.exists():
        build_gguf(g)
    print(f"{g}: {g.stat().st_size / 1e9:.2f} GB", file=sys.stderr)
    if not (fl / "manifest.json").exists():
        from flashinfer_py import checkpoint
        from flashinfer_py.convert import convert

        # The synthetic vocabulary has no real tokenizer; the benchmark feeds token ids.
        checkpoint.GGUFCheckpoint.write_tokenizer = lambda self, dst: []
        t0 = time.time()
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            convert(g, fl, dtype="float16", progress=False)
        print(f"converted to {fl} in {time.time() - t0:.0f} s", file=sys.stderr)


# ---- one measured process (runs inside the cgroup) ----------------------------------------

def peak_rss() -> int:
    """The process's peak resident set in bytes (VmHWM: anonymous memory and mapped file pages
    it touched; the cgroup's max_usage also counts the page cache of its reads)."""
    from long_run import status_kib  # imports no flashinfer_py: safe in the llama.cpp child

    return status_kib("VmHWM") * 1024


def _tok_loop(step, first_tok: int, tokens: int, deadline: float) -> dict:
    """step(tok) -> next tok. One warm-up (prompt) token, then `tokens` timed ones."""
    rb0, t0 = read_bytes(), time.perf_counter()
    tok = step(first_tok)
    warm = {"s": time.perf_counter() - t0, "bytes": read_bytes() - rb0}
    per = []
    for _ in range(tokens):
        if time.perf_counter() > deadline:
            break
        rb0, t0 = read_bytes(), time.perf_counter()
        tok = step(tok)
        per.append({"s": time.perf_counter() - t0, "bytes": read_bytes() - rb0})
    return {"warmup": warm, "tokens": per}


def cmd_run_llama(a) -> None:
    import llama_cpp

    t0, rb0 = time.perf_counter(), read_bytes()
    kw = dict(model_path=str(workdir() / NAME_GGUF), n_ctx=context_for(a.tokens), n_batch=64,
              n_threads=2, n_threads_batch=2, use_mmap=True, use_mlock=False, verbose=False)
    # Llama() has no use_extra_bufts argument in 0.3.36: turn the CPU repack ("extra buffer
    # types") off in the default model params it starts from, so weights stay in the mmap.
    import llama_cpp.llama_cpp as low

    defaults = low.llama_model_default_params

    def no_repack():
        p = defaults()
        p.use_extra_bufts = False
        return p

    low.llama_model_default_params = no_repack
    llm = llama_cpp.Llama(**kw)
    assert not llm.model_params.use_extra_bufts and llm.model_params.load_mode == low.LLAMA_LOAD_MODE_MMAP
    load = {"s": time.perf_counter() - t0, "bytes": read_bytes() - rb0}
    deadline = time.perf_counter() + a.time_limit

    vocab = llm.n_vocab()

    def step(tok):
        llm.eval([tok])
        # the last token's logits: Llama.scores is filled only with logits_all (0.3.36), so
        # reading it, as this did until 2026-11-30, fed argmax of an unset buffer
        return int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(vocab,))))

    out = _tok_loop(step, 1, a.tokens, deadline)
    out.update(tool="llama.cpp", load=load, llama_cpp_version=llama_cpp.__version__,
               peak_rss=peak_rss())
    print(json.dumps(out), flush=True)


class _CostlyLayer:
    def __init__(self, owner, layer, a, b):
        self.owner, self.layer, self.a, self.b = owner, layer, a, b

    def predict(self, x, threshold, cap):
        from flashinfer_py import kernels

        h = kernels.linear(np.ascontiguousarray(x, np.float32), self.a, threads=2)
        kernels.linear(h, self.b, threads=2)
        ids = self.owner.pred[self.layer][self.owner.token]
        if ids.size > cap:  # as the real predictor does (max_active=cap): keep `cap` of them
            self.owner.truncated[0] += 1
            self.owner.truncated[1] += ids.size - cap
            ids = np.sort(self.owner.rng.choice(ids, cap, replace=False))
        return ids


class CostlyTrace:
    """The trace, plus the cost of real low-rank predictors: rank 128 (1024 in the last 4
    layers, as the paper's OPT predictors), float16 weights held in DRAM (counted in the memory
    plan through ``nbytes``) and their two matvecs run per layer. A predicted set larger than
    the layer's cache is cut to the cache's size, as ``LayerPredictor.predict`` does."""

    kinds = ["lowrank"]  # what the runtime resolves its selection from (Predictors.kinds)
    calibration = sketch = None

    def __init__(self, pred, rng):
        self.pred, self.token, self.rng, self.truncated = pred, 0, rng, [0, 0]
        blk = (rng.standard_normal(1 << 22, dtype=np.float32) * 0.02).astype(np.float16)
        self.layers = []
        for layer in range(L):
            r = 1024 if layer >= L - 4 else 128
            a = _tiled(np.roll(blk, layer), (r, D))
            b = _tiled(np.roll(blk, 7 * layer + 1), (F, r))
            self.layers.append(_CostlyLayer(self, layer, a, b))
        self.nbytes = sum(p.a.nbytes + p.b.nbytes for p in self.layers)
        _malloc_trim()


def _tiled(blk: np.ndarray, shape) -> np.ndarray:
    """`blk` repeated into a new array of `shape`, copied in place: np.resize's concatenated
    temporaries left ~0.4 GiB of freed heap in the process (glibc keeps it), over the memory
    the plan counts, and the cgroup killed the 50% run."""
    out = np.empty(int(np.prod(shape)), blk.dtype)
    for off in range(0, out.size, blk.size):
        k = min(blk.size, out.size - off)
        out[off:off + k] = blk[:k]
    return out.reshape(shape)


def _malloc_trim() -> None:
    """Give freed heap back to the OS (glibc), so that RSS is what the process holds."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def cmd_run_ours(a) -> None:
    import paper_table as pt

    from flashinfer_py import predictor as predmod
    from flashinfer_py.config import RuntimeConfig
    from flashinfer_py.runtime import FlashModel

    pt.L, pt.F = L, F  # make_trace / active_fractions / get_trace read the module's shape
    pred, _, note, _ = pt.get_trace(a.trace, a.tokens + 1)
    trace = pt.TracePredictor(pred)
    if a.predictor_cost:
        trace = CostlyTrace(pred, np.random.default_rng(5))
    predmod.Predictors.load = classmethod(lambda cls, d, m: trace)
    ablation = None if a.mode == "sparse" else a.mode
    rt = RuntimeConfig(dram_budget=a.budget, selection="predictor", window=pt.WINDOW,
                       max_context=context_for(a.tokens), threads=2, ablation=ablation)
    t0, rb0 = time.perf_counter(), read_bytes()
    model = FlashModel(workdir() / NAME_FLASH, rt)
    cache = model.new_cache()
    load = {"s": time.perf_counter() - t0, "bytes": read_bytes() - rb0,
            "plan": model.plan.describe()}
    deadline = time.perf_counter() + a.time_limit
    stats = []

    def step(tok):
        trace.token = len(stats)
        logits = model.forward([tok], cache, last_only=True)
        stats.append(model.last_stats)
        return int(np.argmax(logits[-1]))

    out = _tok_loop(step, 1, a.tokens, deadline)
    for rec, st in zip([out["warmup"]] + out["tokens"], stats):
        rec.update(ffn_bytes=st["bytes_read"], io_s=st["io_ns"] / 1e9, mm_s=st["mm_ns"] / 1e9,
                   loaded=st["loaded"], needed=st["needed"], hit_rate=st["hit_rate"],
                   direct=st["direct"], stream_bytes=st.get("stream_bytes", 0),
                   stream_wait_s=st.get("stream_wait_ns", 0) / 1e9)
    name = a.mode + (", predictor cost" if a.predictor_cost else "")
    out.update(tool=f"ours ({name})", load=load, predictor_bytes=trace.nbytes,
               truncated=getattr(trace, "truncated", [0, 0]), trace=a.trace, trace_note=note,
               streamed=list(model.plan.streamed), cache_fraction=model.plan.cache_fraction,
               peak_rss=peak_rss())
    print(json.dumps(out), flush=True)


# ---- the orchestrator ---------------------------------------------------------------------

def memcg_root() -> Path:
    for line in open("/proc/self/cgroup"):
        _, ctrl, path = line.strip().split(":", 2)
        if "memory" in ctrl.split(","):
            return Path("/sys/fs/cgroup/memory" + path)
    raise SystemExit("no cgroup v1 memory controller here")


def drop_caches() -> None:
    subprocess.run(["sync"], check=True)
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def run_in_memcg(argv: list, cap: int, timeout: float, cold: bool = True,
                 env: dict | None = None) -> dict:
    """Run `argv` in a fresh cgroup v1 memory cgroup limited to `cap` bytes (page cache counts;
    over it the process is killed), after dropping the page cache when `cold`. Returns the
    last JSON line the process printed, with rc ("timeout" past `timeout` s), wall_s,
    load_before (after the drop), max_usage and failcnt of the cgroup, and its whole stderr."""
    cg = memcg_root() / f"flashcap_{os.getpid()}"
    cg.mkdir()
    try:
        (cg / "memory.limit_in_bytes").write_text(str(cap))
        if cold:
            drop_caches()
        load = os.getloadavg()
        t0 = time.time()
        cmd = ["sh", "-c", f'echo $$ > {cg}/cgroup.procs; exec "$@"', "sh"] + argv
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
            rc, out, err = p.returncode, p.stdout, p.stderr
        except subprocess.TimeoutExpired as e:
            rc = "timeout"
            out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            err = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
        res = {}
        for line in out.splitlines():
            if line.startswith("{"):
                res = json.loads(line)
        res.update(rc=rc, wall_s=time.time() - t0, load_before=load,
                   max_usage=int((cg / "memory.max_usage_in_bytes").read_text()),
                   failcnt=int((cg / "memory.failcnt").read_text()), stderr=err)
        return res
    finally:
        for _ in range(50):
            try:
                cg.rmdir()
                break
            except OSError:
                time.sleep(0.2)


def run_capped(argv: list, cap: int, timeout: float) -> dict:
    res = run_in_memcg(argv, cap, timeout)
    res.update(load_after=os.getloadavg(), stderr_tail=res.pop("stderr")[-600:])
    return res


def context_for(tokens: int) -> int:
    """The KV cache both tools size for a run: the one-token prompt and the decoded tokens,
    at least 64 (the first runs' size, so their rows keep their plans)."""
    return max(64, tokens + 8)


def summarize(r: dict) -> dict:
    toks = r.get("tokens", [])
    if not toks:
        return {"tps": 0.0, "s_tok": float("nan"), "bytes": float("nan"), "n": 0}
    s = np.array([t["s"] for t in toks])
    b = np.array([t["bytes"] for t in toks])
    return {"tps": len(s) / s.sum(), "s_tok": float(s.mean()), "s_sd": float(s.std()),
            "bytes": float(b.mean()), "n": len(s)}


TOOL_NAMES = {"llama": "llama.cpp (mmap)", "ours": "ours (sparse)",
              "ours+pred": "ours (sparse, predictor cost)", "naive": "ours (naive)"}


def report_rows(records: list, min_tokens: int) -> tuple[list, list]:
    """Group finished runs (rc 0, at least `min_tokens` timed tokens) by cap, read-ahead and
    tool: each group's runs, and min / median / max of their tokens/s. Returns (groups,
    ratios): ratios compare each of our tools with llama.cpp at the same cap and read-ahead,
    as the ratio of the medians and the range (our slowest run over llama.cpp's fastest, our
    fastest over its slowest)."""
    groups: dict = {}
    for r in records:
        sm = summarize(r)
        if r.get("rc") != 0 or sm["n"] < min_tokens:
            continue
        key = (r["cap_fraction"], r["read_ahead_kb"], r["tool_arg"])
        groups.setdefault(key, []).append((r, sm))
    out = []
    for key in sorted(groups, key=lambda k: (-k[0], k[1], k[2] != "llama", k[2])):
        runs = groups[key]
        tps = np.array([sm["tps"] for _, sm in runs])
        s_med = [float(np.median([t["s"] for t in r["tokens"]])) for r, _ in runs]
        out.append({"cap": key[0], "read_ahead_kb": key[1], "tool": key[2], "runs": len(runs),
                    "tps": (float(tps.min()), float(np.median(tps)), float(tps.max())),
                    "tps_each": [float(x) for x in tps],
                    "s_median": float(np.median(s_med)),
                    "bytes": float(np.median([sm["bytes"] for _, sm in runs])),
                    "tokens": min(sm["n"] for _, sm in runs),
                    "peak_rss": max(r.get("peak_rss", 0) for r, _ in runs),
                    "started": [r.get("started") for r, _ in runs],
                    "commit": sorted({str(r.get("commit")) for r, _ in runs})})
    ratios = []
    by = {(g["cap"], g["read_ahead_kb"], g["tool"]): g for g in out}
    for (cap, ra, tool), g in by.items():
        ll = by.get((cap, ra, "llama"))
        if tool == "llama" or ll is None:
            continue
        ratios.append({"cap": cap, "read_ahead_kb": ra, "tool": tool,
                       "runs": (g["runs"], ll["runs"]),
                       "median": g["tps"][1] / ll["tps"][1],
                       "range": (g["tps"][0] / ll["tps"][2], g["tps"][2] / ll["tps"][0]),
                       "bytes": ll["bytes"] / g["bytes"]})
    return out, ratios


def cmd_report(a) -> None:
    records = []
    for f in a.files:
        p = Path(f)
        if not p.is_file():
            sys.exit(f"report: {f}: no such file (the --json file of a compare run)")
        for i, line in enumerate(p.read_text().splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    sys.exit(f"report: {f}:{i}: not a JSON line ({e})")
    groups, ratios = report_rows(records, a.min_tokens)
    if not groups:
        sys.exit(f"report: no finished run with at least {a.min_tokens} tokens in "
                 + ", ".join(a.files))
    print(f"runs with rc 0 and at least {a.min_tokens} timed tokens; tokens/s of a run = its "
          "tokens / their summed seconds\n")
    print("| cap | read-ahead | tool | runs x tokens | tokens/s min / median / max | each run "
          "| s/token (median) | bytes read/token | peak RSS | started (UTC) | commit |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for g in groups:
        lo, med, hi = g["tps"]
        started = ", ".join(s[11:16] if s else "-" for s in g["started"])
        print(f"| {g['cap']:.0%} | {g['read_ahead_kb']} KiB | "
              f"{TOOL_NAMES.get(g['tool'], g['tool'])} | {g['runs']} x {g['tokens']} | "
              f"{lo:.3f} / {med:.3f} / {hi:.3f} | "
              f"{', '.join(f'{x:.3f}' for x in g['tps_each'])} | {g['s_median']:.2f} | "
              f"{g['bytes'] / 1e9:.2f} GB | {g['peak_rss'] / 1e9:.2f} GB | {started} | "
              f"{', '.join(c for c in g['commit'] if c != 'None') or '-'} |")
    print()
    for q in ratios:
        print(f"cap {q['cap']:.0%}, read-ahead {q['read_ahead_kb']} KiB: "
              f"{TOOL_NAMES.get(q['tool'], q['tool'])} / llama.cpp tokens/s = "
              f"{q['median']:.1f}x (medians; {q['range'][0]:.1f}-{q['range'][1]:.1f}x over "
              f"the runs; {q['runs'][0]} runs against {q['runs'][1]}); bytes a token "
              f"llama.cpp / ours = {q['bytes']:.1f}x")
    if a.plot:
        plot(groups, Path(a.plot))


def plot(groups: list, path: Path) -> None:
    """tokens/s against the cgroup cap, a line per tool and read-ahead: the median run, bars
    from the slowest to the fastest. No perplexity: the weights are synthetic."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.8))
    series: dict = {}
    for g in groups:
        series.setdefault((g["tool"], g["read_ahead_kb"]), []).append(g)
    for (tool, ra), gs in sorted(series.items()):
        gs.sort(key=lambda g: g["cap"])
        x = [100 * g["cap"] for g in gs]
        med = np.array([g["tps"][1] for g in gs])
        err = [med - [g["tps"][0] for g in gs], [g["tps"][2] for g in gs] - med]
        line = ax.errorbar(x, med, yerr=err, marker="o", capsize=3,
                           label=f"{TOOL_NAMES.get(tool, tool)}, read-ahead {ra} KiB")
        for g, y in zip(gs, med):
            ax.annotate(f"{y:.3f} ({g['runs']} x {g['tokens']})", (100 * g["cap"], y),
                        fontsize=7, textcoords="offset points", xytext=(4, 4),
                        color=line[0].get_color())
    ax.set_yscale("log")
    ax.set_xlabel("cgroup memory cap, % of the GGUF's 13.5 GB")
    ax.set_ylabel("tokens/s (median run; bars: slowest to fastest)")
    ax.set_title("7B-shaped Llama (synthetic weights: no perplexity)\n"
                 "our side driven by a recorded trace of SmolLM2's sets", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    save_figure(fig, path)


def cmd_compare(a) -> None:
    wd = workdir()
    size = (wd / NAME_GGUF).stat().st_size
    fracs = [float(c) for c in a.caps.split(",")]
    orig_ra = int(Path(RA_PATH).read_text())
    settings = []
    for s in a.read_ahead.split(","):
        settings.append(orig_ra if s == "machine" else int(s))
    me = [sys.executable, str(Path(__file__).resolve())]
    rows = []
    log = open(a.json, "a") if a.json else None
    try:
        for ra, frac in [(ra, f) for ra in settings for f in fracs]:
            Path(RA_PATH).write_text(f"{ra}\n")
            cap = int(size * frac)
            for tool in a.tools.split(","):
                if tool == "llama":
                    argv = me + ["run-llama", "--tokens", str(a.tokens), "--time-limit",
                                 str(a.llama_timeout)]
                    timeout = a.llama_timeout + 600
                else:
                    mode = "naive" if tool == "naive" else "sparse"
                    argv = me + ["run-ours", "--mode", mode, "--tokens", str(a.our_tokens),
                                 "--budget", str(cap - MARGIN), "--time-limit",
                                 str(a.our_timeout), "--trace", a.trace]
                    if tool == "ours+pred":
                        argv.append("--predictor-cost")
                    timeout = a.our_timeout + 300
                # when and what ran: taken before the run (a commit made during a long run
                # must not be credited with it)
                started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
                # the runs' own results file changes as they run: not a change to what runs
                commit = git_commit(".", ":(exclude)benchmarks/results")
                print(f"read-ahead {ra} KiB, cap {frac:.0%}: {tool} ...", file=sys.stderr,
                      flush=True)
                r = run_capped(argv, cap, timeout)
                r.update(read_ahead_kb=ra, tool_arg=tool, cap=cap, cap_fraction=frac,
                         started=started, commit=commit)
                sm = summarize(r)
                print(f"  rc={r['rc']} {sm} max_usage={r['max_usage'] / 1e9:.2f} GB "
                      f"load={r['load_before']}", file=sys.stderr, flush=True)
                if r["rc"] not in (0,):
                    print(r["stderr_tail"], file=sys.stderr)
                rows.append((r, sm))
                if log:
                    log.write(json.dumps(r) + "\n")
                    log.flush()
    finally:
        Path(RA_PATH).write_text(f"{orig_ra}\n")
    print(f"\nmodel {size / 1e9:.2f} GB (GGUF); caps (cgroup v1 memory limit): "
          + ", ".join(f"{f:.0%} = {size * f / 1e9:.2f} GB" for f in fracs)
          + f"; our side driven by the {a.trace} trace\n")
    print("| cap | read-ahead | tool | tokens timed | s/token | tokens/s | bytes read/token | "
          "warm-up token s | peak cgroup memory | rc | load (1 min) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r, sm in rows:
        w = r.get("warmup", {})
        print(f"| {r['cap_fraction']:.0%} | {r['read_ahead_kb']} KiB | "
              f"{r.get('tool', r['tool_arg'])} | {sm['n']} | "
              f"{sm['s_tok']:.2f} | {sm['tps']:.3f} | {sm['bytes'] / 1e9:.2f} GB | "
              f"{w.get('s', float('nan')):.1f} | {r['max_usage'] / 1e9:.2f} GB | {r['rc']} | "
              f"{r['load_before'][0]:.2f} |")
    print()
    for ra, frac in [(ra, f) for ra in settings for f in fracs]:
        by = {r["tool_arg"]: sm for r, sm in rows
              if r["read_ahead_kb"] == ra and r["cap_fraction"] == frac}
        for ours in ("ours", "ours+pred", "naive"):
            if "llama" in by and ours in by and by["llama"]["tps"] > 0 and by[ours]["n"]:
                print(f"read-ahead {ra} KiB, cap {frac:.0%}: {ours} / llama.cpp tokens/s = "
                      f"{by[ours]['tps'] / by['llama']['tps']:.1f}x; bytes/token llama.cpp / "
                      f"{ours} = {by['llama']['bytes'] / by[ours]['bytes']:.1f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("build")
    c = sub.add_parser("compare")
    c.add_argument("--tokens", type=int, default=3)
    c.add_argument("--our-tokens", type=int, default=10,
                   help="decode tokens for our runtime (the mean includes the window filling)")
    c.add_argument("--llama-timeout", type=float, default=240.0)
    c.add_argument("--our-timeout", type=float, default=600.0,
                   help="seconds our runtime may decode before the tokens so far are reported")
    c.add_argument("--read-ahead", default="128,machine")
    c.add_argument("--tools", default="llama,ours,ours+pred",
                   help="comma list of llama, ours, ours+pred (ours with predictor cost), "
                        "naive (our naive mode: the whole model read per token)")
    c.add_argument("--json", default=None, help="append raw per-run records here (JSON lines)")
    c.add_argument("--caps", default="0.5",
                   help="comma list of cgroup caps as fractions of the GGUF's size (default "
                        "%(default)s; below ~0.36 our resident part no longer fits and is read "
                        "from flash each token: RuntimeConfig.stream_resident 'auto')")
    c.add_argument("--trace", default="synthetic", choices=("synthetic", "smollm2"),
                   help="what drives our side: the paper's statistics (synthetic) or the sets "
                        "recorded from SmolLM2-135M on real text (benchmarks/recorded_trace.py)")
    rp = sub.add_parser("report", help="re-print the runs of --json files: min / median / "
                        "max tokens/s per cap and tool, and the ratios")
    rp.add_argument("files", nargs="+", help="JSON-lines files written by compare --json")
    rp.add_argument("--min-tokens", type=int, default=1,
                    help="leave out runs with fewer timed tokens (e.g. 256: issue 15's length)")
    rp.add_argument("--plot", default=None, metavar="PNG",
                    help="also draw tokens/s against the cap (matplotlib)")
    r1 = sub.add_parser("run-llama")
    r1.add_argument("--tokens", type=int, default=3)
    r1.add_argument("--time-limit", type=float, default=240.0)
    r2 = sub.add_parser("run-ours")
    r2.add_argument("--tokens", type=int, default=3)
    r2.add_argument("--budget", type=int, required=True)
    r2.add_argument("--mode", default="sparse", choices=("sparse", "naive"))
    r2.add_argument("--time-limit", type=float, default=600.0)
    r2.add_argument("--trace", default="synthetic", choices=("synthetic", "smollm2"))
    r2.add_argument("--predictor-cost", action="store_true",
                    help="hold and run rank-128/1024 float16 predictors beside the trace")
    a = ap.parse_args()
    {"build": cmd_build, "compare": cmd_compare, "report": cmd_report,
     "run-llama": cmd_run_llama, "run-ours": cmd_run_ours}[a.cmd](a)


if __name__ == "__main__":
    main()
