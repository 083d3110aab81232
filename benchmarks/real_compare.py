"""Real models side by side with llama.cpp under memory caps: tokens/s, time to first token,
bytes read, peak memory and perplexity, each tool on the same weights (issue 15).

    python benchmarks/real_compare.py build [--models smollm2,gemma3] [--formats float16,q4_1]
    python benchmarks/real_compare.py run [--tokens 256] [--runs 3] [--caps warm,0.5,0.3]
        [--tools llama,ours,paged,transformers] [--json F] [--plot F]     # root: cgroup v1

``build`` writes under ``${FLASHINFER_PY_CACHE:-~/.cache/flashinfer_py}/bench/real-compare``,
per model and storage format, one GGUF that llama.cpp runs and our flash directory converted
*from that same GGUF* (``--dtype`` the format, resident tensors "auto": every block already in
the format, or float16, is copied bit for bit):

- SmolLM2-135M-Instruct: ``q4_1`` is the embedded Q4_1 GGUF itself (Q8_0 tied embeddings);
  ``float16`` is llama.cpp's F16 of it (``llama_model_quantize``: its blocks dequantized).
- Gemma-3-270M: the embedded GGUF is Q4_K_M; ``float16`` is llama.cpp's F16 of it and
  ``q4_1`` llama.cpp's Q4_1 quantization of that F16 (llama.cpp keeps some tensors in other
  types; our converter re-quantizes K-quant tensors to Q4_1 and says so: the two tools' weights
  then differ in those tensors, and the perplexity column shows what that costs).

Each flash directory gets ``train-predictors``' default (the 4-bit sketch, calibrated on
Shakespeare), so sparse mode runs as a user would run it.

``run`` measures, per model and format, in this order:

1. **Fixed overhead** of each tool: one uncapped run each; its peak RSS (VmHWM) minus the weight
   bytes it holds at the end (llama.cpp: the resident pages of its GGUF mapping, from
   ``/proc/self/smaps``; ours: the memory plan's resident tensors, sketch or predictors and
   cached rows). That is the interpreter, libraries, buffers and KV cache
   (``max_context`` = prompt + tokens, rounded up to 64). These runs also warm the page cache.
2. **Conditions** (``--caps``): ``warm`` (no cap, page cache warm; ours runs dense with every
   weight in DRAM), then for each fraction f a cold run under a cgroup v1 memory cap of
   *that tool's own overhead + f x the GGUF's weight bytes*, after dropping the page cache.
   The cap counts page cache. Tools: ``llama`` (llama-cpp-python 0.3.36, mmap, no repacking,
   2 threads); ``ours`` (warm: dense; capped: sparse with ``dram_budget`` = the cap, the
   runtime's defaults: ranking with the sketch, O_DIRECT); ``paged`` (ours, dense through the
   page cache: the naive ablation with ``use_direct_io=False``: every weight read per token
   through one layer buffer, so the kernel's page cache decides what stays, as llama.cpp's
   mmap does); ``transformers`` (warm only: it holds the whole model in float32);
   ``ours-needed`` (capped only: ours sparse with ``stream_resident="needed"``, the rule
   before 2026-11-30: resident matrices left on flash only when the resident part does not
   fit beside a cache; the default, "auto", shares the budget between them and the cache at
   any size). In the records of the run of 2026-11-30 07:38 (real_compare_share.jsonl) the
   default was still "needed": there "sparse" is that rule and "sparse-share" today's.
   Each run: one process; a 64-token prompt from the Wikipedia excerpt (time to first token =
   prompt + first token, after loading; load time apart), then ``--tokens`` greedy tokens
   timed one by one, bytes from ``/proc/self/io`` read_bytes. Runs are interleaved tool by
   tool, ``--runs`` rounds; the table gives min / median / max tokens/s over rounds.
3. **Perplexity** per configuration on held-out text (the last 2 x 256 tokens of the
   excerpt's first 120k characters; windows from an empty context): llama.cpp from its
   logits; ours dense and paged over each window; ours sparse decoded token by token with the
   same ``dram_budget`` as under the cap (the cap does not change the arithmetic, only where
   bytes come from); transformers from the same GGUF.

Prints markdown; ``--json`` appends every run's record; ``--plot`` draws tokens/s against the
cap per tool and format, perplexity beside each point.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import git_commit, machine, save_figure  # noqa: E402
from llamacpp_compare import read_bytes  # noqa: E402
from long_run import status_kib  # noqa: E402

MODELS = ("smollm2", "gemma3")
FORMATS = ("float16", "q4_1")
PROMPT_TOKENS = 64
PPL_WINDOWS, PPL_WINDOW = 2, 256
BIG = 1 << 40  # "no cap": a cgroup still measures the peak


def workdir() -> Path:
    from flashinfer_py.default_model import cache_root

    return cache_root() / "bench" / "real-compare"


def paths(model: str, fmt: str) -> tuple[Path, Path]:
    """(the GGUF llama.cpp runs, our flash directory made from it)."""
    from flashinfer_py.default_model import default_gguf_path

    wd = workdir()
    if model == "smollm2" and fmt == "q4_1":
        g = default_gguf_path()
    else:
        g = wd / f"{model}-{fmt}.gguf"
    return g, wd / f"{model}-{fmt}"


def gguf_weight_bytes(path: Path) -> int:
    import gguf

    return int(sum(int(t.n_bytes) for t in gguf.GGUFReader(str(path)).tensors))


# ---- build --------------------------------------------------------------------------------

def cmd_build(a) -> None:
    import flashinfer_py as fi
    from dense_decode import _llama_quantize  # llama.cpp's own quantizer
    from flashinfer_py.default_model import default_gguf_path, gemma3_gguf_path
    from long_run import ensure_predictors

    wd = workdir()
    wd.mkdir(parents=True, exist_ok=True)
    for model in a.models.split(","):
        src = default_gguf_path() if model == "smollm2" else gemma3_gguf_path()
        for fmt in a.formats.split(","):
            g, d = paths(model, fmt)
            if not g.exists():
                if fmt == "float16":
                    _llama_quantize(src, g, "F16")
                else:  # from the F16, as a llama.cpp user quantizes
                    f16, _ = paths(model, "float16")
                    _llama_quantize(src, f16, "F16")
                    _llama_quantize(f16, g, fmt.upper())
            if not (d / "manifest.json").exists():
                t0 = time.time()
                fi.convert(g, d, dtype=fmt, resident_dtype="auto", force=d.exists(),
                           progress=False)
                print(f"{d.name}: converted in {time.time() - t0:.0f} s", file=sys.stderr)
            ensure_predictors(d)
            print(f"{model} {fmt}: {g.name} {gguf_weight_bytes(g) / 1e6:.1f} MB of weights; "
                  f"{d}", file=sys.stderr)


# ---- the measured processes ---------------------------------------------------------------

def mapped_rss(path: Path) -> int:
    """Resident bytes of every mapping of `path` in this process (/proc/self/smaps)."""
    target, total, inside = str(path.resolve()), 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            first = line.split(None, 1)[0]
            if "-" in first and not first.endswith(":"):
                inside = line.rstrip().endswith(target)
            elif inside and first == "Rss:":
                total += int(line.split()[1]) * 1024
    return total


def decode_loop(first, step, prompt: list, tokens: int, deadline: float) -> dict:
    """first(prompt) -> token; step(token) -> token. Times the prompt (to the first token) and
    each decode token, with the bytes read from storage."""
    rb0, t0 = read_bytes(), time.perf_counter()
    tok = first(prompt)
    ttft = {"s": time.perf_counter() - t0, "bytes": read_bytes() - rb0}
    per, out = [], [tok]
    for _ in range(tokens):
        if time.perf_counter() > deadline:
            break
        rb0, t0 = read_bytes(), time.perf_counter()
        tok = step(tok)
        per.append((time.perf_counter() - t0, read_bytes() - rb0))
        out.append(tok)
    return {"ttft": ttft, "s": [p[0] for p in per], "bytes": [p[1] for p in per],
            "generated": out}


class LlamaTool:
    def __init__(self, gguf_path: Path, n_ctx: int, logits_all: bool = False):
        import llama_cpp
        import llama_cpp.llama_cpp as low

        defaults = low.llama_model_default_params

        def no_repack():  # weights stay in the mmap (as in llamacpp_compare.py)
            p = defaults()
            p.use_extra_bufts = False
            return p

        low.llama_model_default_params = no_repack
        self.llm = llama_cpp.Llama(model_path=str(gguf_path), n_ctx=n_ctx, n_batch=64,
                                   n_threads=2, n_threads_batch=2, use_mmap=True,
                                   logits_all=logits_all, verbose=False)
        low.llama_model_default_params = defaults
        self.vocab = self.llm.n_vocab()
        self.path = gguf_path

    def _last(self) -> int:
        logits = np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(self.vocab,))
        return int(np.argmax(logits))

    def first(self, prompt):
        self.llm.reset()
        self.llm.eval(prompt)
        return self._last()

    def step(self, tok):
        self.llm.eval([tok])
        return self._last()

    def weights_held(self) -> int:
        return mapped_rss(self.path)

    def window_logits(self, ids) -> np.ndarray:
        self.llm.reset()
        self.llm.eval(ids)
        return np.array(self.llm.scores[:len(ids)], dtype=np.float32)


# our sparse tools: the children's --tool, and "sparse-share", a label in the records of the
# run of 2026-11-30 07:38 (that rule is today's "sparse")
SPARSE = ("sparse", "sparse-needed", "sparse-share")
CAPPED = {"ours": "sparse", "ours-needed": "sparse-needed"}  # --tools -> child under a cap


class OursTool:
    def __init__(self, directory: Path, mode: str, budget: int | None, max_context: int):
        import flashinfer_py as fi

        kw = dict(max_context=max_context, threads=2)
        if mode in SPARSE:
            kw["dram_budget"] = budget
            if mode == "sparse-needed":  # resident matrices streamed only when they must be
                kw["stream_resident"] = "needed"
        elif mode == "paged":
            kw.update(ablation="naive", use_direct_io=False)
        self.m = fi.load(directory, **kw)
        self.cache = None

    def first(self, prompt):
        self.m.reset()
        self.cache = self.m.new_cache()
        return int(np.argmax(self.m.forward(prompt, self.cache, last_only=True)[-1]))

    def step(self, tok):
        return int(np.argmax(self.m.forward([tok], self.cache, last_only=True)[-1]))

    def weights_held(self) -> int:
        p = getattr(self.m, "plan", None)
        if p is None:  # dense: the resident file's tensors and every FFN row, in DRAM
            dense = self.m.directory / self.m.manifest["files"]["dense"]
            return dense.stat().st_size + self.m.ffn.nbytes
        return p.resident + p.predictors + p.sketch_bytes + p.cache_bytes

    def describe(self) -> dict:
        p, rt = getattr(self.m, "plan", None), self.m.runtime
        out = {"selection": rt.selection, "eviction": rt.eviction, "sparse": rt.sparse}
        if p is not None:
            out.update(plan_total=p.total, plan_overhead=p.overhead, plan_kv=p.kv_cache,
                       cache_share=(p.cache_bytes - p.layer_buffer) / p.ffn_dram_bytes,
                       stream_bytes=p.stream_bytes, streamed=len(p.streamed))
        return out


class TransformersTool:
    def __init__(self, gguf_path: Path):
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(2)
        self.torch = torch
        self.m = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent),
                                                      gguf_file=gguf_path.name)
        self.m.eval()
        self.past = None

    def first(self, prompt):
        with self.torch.inference_mode():
            out = self.m(self.torch.tensor([prompt]), use_cache=True)
        self.past = out.past_key_values
        return int(out.logits[0, -1].argmax())

    def step(self, tok):
        with self.torch.inference_mode():
            out = self.m(self.torch.tensor([[tok]]), past_key_values=self.past, use_cache=True)
        self.past = out.past_key_values
        return int(out.logits[0, -1].argmax())

    def weights_held(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.m.parameters())

    def window_logits(self, ids) -> np.ndarray:
        with self.torch.inference_mode():
            return self.m(self.torch.tensor([ids])).logits[0].float().numpy()


def make_tool(a):
    g, d = Path(a.gguf), Path(a.dir)  # from the parent: importing flashinfer_py here would
    # set OMP_WAIT_POLICY=passive for llama.cpp's and torch's OpenMP threads too (see
    # dense_decode.serve: that made llama.cpp 2.8x slower on SmolLM2)
    if a.tool == "llama":
        return LlamaTool(g, a.max_context, logits_all=a.what == "ppl")
    if a.tool == "transformers":
        return TransformersTool(g)
    return OursTool(d, a.tool, a.budget, a.max_context)


def cmd_child(a) -> None:
    """One measured process: prints one JSON line."""
    texts = json.loads(Path(a.texts).read_text())
    t0, rb0 = time.perf_counter(), read_bytes()
    try:
        tool = make_tool(a)
    except ValueError as e:  # the memory plan's "budget too small"
        print(json.dumps({"error": str(e)}), flush=True)
        return
    out = {"load_s": time.perf_counter() - t0, "load_bytes": read_bytes() - rb0}
    if isinstance(tool, OursTool):
        out.update(tool.describe())
    if a.what == "ppl":
        if isinstance(tool, OursTool):
            from flashinfer_py.evaluate import stepwise

            fn = stepwise(tool.m) if a.tool in SPARSE else tool.m.logits
        else:
            fn = tool.window_logits
        nll, n = 0.0, 0
        for w in texts["ppl"]:
            lg = np.asarray(fn(w), np.float64)
            m = lg.max(axis=1, keepdims=True)
            logp = lg - m - np.log(np.exp(lg - m).sum(axis=1, keepdims=True))
            nll -= float(sum(logp[t, w[t + 1]] for t in range(len(w) - 1)))
            n += len(w) - 1
        out.update(perplexity=float(np.exp(nll / n)), ppl_tokens=n)
    else:
        out.update(decode_loop(tool.first, tool.step, texts["prompt"], a.tokens,
                               time.perf_counter() + a.time_limit))
        held = tool.weights_held()
        hwm, rss = status_kib("VmHWM") * 1024, status_kib("VmRSS") * 1024
        out.update(weights_held=held, vm_hwm=hwm, vm_rss=rss, overhead=hwm - held)
    out.update(omp_wait_policy=os.environ.get("OMP_WAIT_POLICY"),
               imported_flashinfer_py="flashinfer_py" in sys.modules)
    print(json.dumps(out), flush=True)


# ---- the orchestrator ---------------------------------------------------------------------

def run_in_cgroup(argv: list, cap: int, cold: bool, timeout: float) -> dict:
    from llamacpp_compare import run_in_memcg

    env = dict(os.environ)
    env.pop("OMP_WAIT_POLICY", None)  # each tool's own default (see dense_decode.serve)
    res = run_in_memcg(argv, cap, timeout, cold=cold, env=env)
    res["cgroup_peak"] = res.pop("max_usage")
    err = res.pop("stderr")
    if res["rc"] != 0:  # kept for the failures only, without this machine's directories
        res["stderr_tail"] = re.sub(r"/(root|work|home|Users)/[^\s'\"]*/", ".../", err[-800:])
    return res


def prepare_texts(model: str, fmt: str) -> Path:
    """The prompt and the perplexity windows (quant_quality's: the last windows of the
    excerpt's first 120k characters, BOS first where the tokenizer adds one), as our tokenizer
    (the GGUF's) encodes them."""
    import flashinfer_py as fi
    from flashinfer_py.corpora import wikipedia_excerpt
    from quant_quality import eval_ids

    # named by what made them, so a change of lengths or of this function makes new ones
    # (version 2: Gemma's prompt had two BOS, one added here and one by its tokenizer)
    key = hashlib.sha256(json.dumps([2, PROMPT_TOKENS, PPL_WINDOWS, PPL_WINDOW]).encode())
    out = workdir() / f"texts-{model}-{key.hexdigest()[:8]}.json"
    if out.exists():
        return out
    _, d = paths(model, fmt)
    m = fi.load(d)
    ppl = eval_ids(m, PPL_WINDOWS, PPL_WINDOW)
    prompt = m.tokenizer.encode(wikipedia_excerpt()[:4000])[:PROMPT_TOKENS]  # BOS included
    # where the tokenizer adds it (one, as in every perplexity window)
    out.write_text(json.dumps({"prompt": prompt, "ppl": ppl}))
    return out


def spread(v: list) -> str:
    v = [x for x in v if x == x]
    if not v:
        return "-"
    return f"{min(v):.1f} / {statistics.median(v):.1f} / {max(v):.1f}"


def cmd_run(a) -> None:
    me = [sys.executable, str(Path(__file__).resolve()), "child"]
    if not a.json:
        a.json = str(HERE / "results" / f"real_compare_{time.strftime('%Y%m%d_%H%M%S')}.jsonl")
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    log = open(a.json, "a")
    # one context for the perplexity and the decode children: under a budget the KV cache's
    # size moves the neuron cache's, so both must run the same plan
    max_ctx = max(-(-(PROMPT_TOKENS + a.tokens + 1) // 64) * 64, -(-PPL_WINDOW // 64) * 64)
    ppl_ctx = max_ctx
    tools = a.tools.split(",")
    conds = a.caps.split(",")
    log.write(json.dumps({"what": "meta", "machine": machine(), "commit": git_commit(),
                          "load_before": os.getloadavg()[0], "tokens": a.tokens, "runs": a.runs,
                          "max_context": max_ctx, "time_limit": a.time_limit,
                          "read_ahead_kb": read_ahead_kb()}) + "\n")

    def child(rec: dict, tokens=None) -> dict:
        what, tool = rec["what"], rec["tool"]
        g, d = paths(rec["model"], rec["format"])
        argv = me + ["--gguf", str(g), "--dir", str(d), "--tool", tool,
                     "--what", "ppl" if what == "ppl" else "decode", "--texts", str(texts),
                     "--max-context", str(ppl_ctx if what == "ppl" else max_ctx),
                     "--tokens", str(tokens if tokens is not None else a.tokens),
                     "--time-limit", str(a.time_limit)]
        if rec.get("budget"):
            argv += ["--budget", str(rec["budget"])]
        cold = rec.get("cond", "warm") != "warm" and what == "decode"
        r = run_in_cgroup(argv, rec.get("cap", BIG), cold, a.time_limit + 900)
        r.update(rec)
        log.write(json.dumps(r) + "\n")
        log.flush()
        if "error" in r or r["rc"] != 0:
            print(f"    rc={r['rc']} {r.get('error', '')[:200]} {r.get('stderr_tail', '')[-300:]}",
                  file=sys.stderr, flush=True)
        return r

    ppl_done: set = set()  # (model, format, tool, sparse budget): the arithmetic measured
    probe_tool = {"llama": "llama", "ours": "dense", "paged": "paged",
                  "transformers": "transformers", "ours-needed": None}
    for model in a.models.split(","):
        for fmt in a.formats.split(","):
            g, d = paths(model, fmt)
            if not g.exists() or not (d / "manifest.json").exists():
                raise SystemExit(f"{g} or {d} missing: run `python {__file__} build` first")
            texts = prepare_texts(model, fmt)
            W = gguf_weight_bytes(g)
            base = {"model": model, "format": fmt, "W": W}
            print(f"== {model} {fmt}: {W / 1e6:.1f} MB of weights", file=sys.stderr, flush=True)
            # 1. fixed overheads (uncapped; these runs also warm the page cache)
            over, plan = {}, {}
            kinds = [probe_tool[t] for t in tools if probe_tool[t]] + (
                ["sparse"] if {"ours", "ours-needed"} & set(tools) else [])
            for k in kinds:
                r = child(dict(base, what="probe", tool=k,
                               budget=4 * W + (1 << 30) if k == "sparse" else None), tokens=8)
                over[k] = r.get("overhead", 0)
                plan[k] = r
                print(f"  overhead {k}: {over[k] / 2**20:.0f} MiB", file=sys.stderr, flush=True)
            over["sparse-needed"], plan["sparse-needed"] = over.get("sparse"), plan.get("sparse")
            # 2. conditions, tools interleaved per round
            for cond in conds:
                recs = []
                for t in tools:
                    if (cond != "warm" and t == "transformers") or (
                            cond == "warm" and t == "ours-needed"):
                        continue
                    k = probe_tool[t] if cond == "warm" else CAPPED.get(t, probe_tool[t])
                    rec = dict(base, what="decode", cond=cond, tool=k, overhead=over[k])
                    if cond != "warm":
                        share = int(float(cond) * W)
                        rec["cap"] = over[k] + share
                        if k in SPARSE:  # the plan's own allowances + the same weight bytes
                            rec["budget"] = share + plan[k].get("plan_overhead", 0) + \
                                plan[k].get("plan_kv", 0)
                    recs.append(rec)
                fits = {}
                for r_i in range(a.runs):
                    for rec in recs:
                        if fits.get(rec["tool"]) is False:
                            continue  # does not fit: once is enough
                        print(f"  {cond} {rec['tool']} round {r_i + 1}/{a.runs} cap "
                              f"{rec.get('cap', BIG) / 2**20:.0f} MiB ...", file=sys.stderr,
                              flush=True)
                        r = child(dict(rec, round=r_i))
                        fits[rec["tool"]] = "error" not in r
                        if r.get("s"):
                            print(f"    {len(r['s']) / sum(r['s']):.2f} tok/s, ttft "
                                  f"{r['ttft']['s']:.2f} s, {np.mean(r['bytes']) / 1e6:.1f} "
                                  f"MB/token, peak {r['cgroup_peak'] / 2**20:.0f} MiB",
                                  file=sys.stderr, flush=True)
                # 3. perplexity per configuration (uncapped: the cap does not change the
                # arithmetic); the same for every cap except our sparse budget
                for rec in recs:
                    key = (model, fmt, rec["tool"], rec.get("budget"))
                    if not a.ppl or fits.get(rec["tool"]) is False or key in ppl_done:
                        continue
                    ppl_done.add(key)
                    r = child(dict(rec, what="ppl", cap=BIG))
                    print(f"  perplexity {rec['tool']} ({cond}): {r.get('perplexity')}",
                          file=sys.stderr, flush=True)
    log.write(json.dumps({"what": "meta_end", "load_after": os.getloadavg()[0]}) + "\n")
    log.close()
    report(a.json, a.plot)


def read_ahead_kb() -> int | None:
    try:
        dev = os.stat(workdir()).st_dev
        p = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}")
        for q in (p / "queue/read_ahead_kb", p / "../queue/read_ahead_kb"):
            if q.exists():
                return int(q.read_text())
    except OSError:
        pass
    return None


def summarize(runs: list) -> dict:
    ok = [r for r in runs if r.get("s")]
    return {"tps": [len(r["s"]) / sum(r["s"]) for r in ok], "n": [len(r["s"]) for r in ok],
            "ttft": [r["ttft"]["s"] for r in ok], "load": [r["load_s"] for r in ok],
            "bytes": [float(np.mean(r["bytes"])) for r in ok],
            "peak": [r["cgroup_peak"] for r in ok], "hwm": [r["vm_hwm"] for r in ok],
            "rc": sorted({str(r["rc"]) for r in runs}),
            "error": next((r["error"] for r in runs if "error" in r), None),
            "share": next((r.get("cache_share") for r in ok), None)}


NAMES = {"llama": "llama.cpp (mmap)", "dense": "ours, dense (all in DRAM)",
         "sparse": "ours, sparse (ranking + sketch)", "paged": "ours, dense via page cache",
         "sparse-needed": "ours, sparse, stream_resident=needed",
         "sparse-share": "ours, sparse, resident and cache shared (now the default)",
         "transformers": "transformers (float32)"}


def load_log(path) -> tuple[dict, dict, dict]:
    """(meta, {(model, format, cond, tool): [decode runs]}, {(model, format, tool, budget):
    perplexity})"""
    meta, runs, ppl = {}, {}, {}
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            if r.get("what", "").startswith("meta"):
                meta.update({k: v for k, v in r.items() if k != "what"})
            elif r.get("what") == "decode":
                runs.setdefault((r["model"], r["format"], r["cond"], r["tool"]), []).append(r)
            elif r.get("what") == "ppl" and r.get("perplexity"):
                ppl[(r["model"], r["format"], r["tool"], r.get("budget"))] = r["perplexity"]
    return meta, runs, ppl


def report(path, plot_path=None) -> None:
    meta, runs, ppl = load_log(path)
    print(f"# {meta.get('machine')}; commit {meta.get('commit')}; load average "
          f"{meta.get('load_before', 0):.2f} -> {meta.get('load_after', float('nan')):.2f}; "
          f"{meta.get('runs')} rounds x {meta.get('tokens')} tokens (prompt {PROMPT_TOKENS}, "
          f"max_context {meta.get('max_context')}, at most {meta.get('time_limit')} s of "
          f"decoding a run); read-ahead {meta.get('read_ahead_kb')} KiB; perplexity on "
          f"{PPL_WINDOWS} x {PPL_WINDOW} held-out Wikipedia tokens; raw records: {path}\n")
    points = []
    for model, fmt in dict.fromkeys((k[0], k[1]) for k in runs):
        keys = [k for k in runs if k[:2] == (model, fmt)]
        W = runs[keys[0]][0]["W"]
        print(f"#### {model}, {fmt} ({W / 1e6:.1f} MB of weights)\n")
        print("| memory | tool | cap MiB (overhead + weights) | tokens/s min / median / max |"
              " time to first token s | load s | MB read / token | peak cgroup MiB |"
              " peak RSS MiB | perplexity | notes |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for k in keys:
            rs = runs[k]
            r0, s = rs[0], summarize(rs)
            cond = "warm, no cap" if k[2] == "warm" else f"cold, overhead + {float(k[2]):.0%}"
            cap = r0.get("cap")
            capt = "-" if not cap else \
                f"{cap / 2**20:.0f} ({r0['overhead'] / 2**20:.0f} + {(cap - r0['overhead']) / 2**20:.0f})"
            notes = []
            if s["error"]:
                need = re.search(r"Give at least ([0-9.]+ \w+)", s["error"])
                alone = re.search(r"alone needs ([0-9.]+ \w+) \(tensors ([0-9.]+ \w+)",
                                  s["error"])
                notes.append("does not fit: the plan needs a budget of at least "
                             f"{need.group(1)} (resident tensors {alone.group(2)})"
                             if need and alone else "does not fit: " + s["error"][:200])
            if s["share"] is not None and k[3] in SPARSE:
                notes.append(f"budget {r0['budget'] / 2**20:.0f} MiB, cache "
                             f"{s['share']:.0%} of the FFN")
                if r0.get("stream_bytes"):  # resident matrices left on flash (stream_resident)
                    notes.append(f"{r0['stream_bytes'] / 1e6:.0f} MB of resident matrices "
                                 "read a token")
            if s["rc"] == ["-9"]:
                notes.append("killed at the cap every round (SIGKILL from the cgroup: what "
                             "this mode holds in anonymous memory does not fit)")
            elif s["rc"] != ["0"] and not s["error"]:
                notes.append(f"exit {','.join(s['rc'])}")
            if s["n"] and min(s["n"]) < meta.get("tokens", 0):
                notes.append(f"{min(s['n'])}-{max(s['n'])} tokens in the time limit")
            p = ppl.get((model, fmt, k[3], r0.get("budget")))
            print(f"| {cond} | {NAMES[k[3]]} | {capt} | {spread(s['tps'])} | "
                  f"{spread(s['ttft'])} | {spread(s['load'])} | "
                  f"{spread([b / 1e6 for b in s['bytes']])} | "
                  f"{spread([x / 2**20 for x in s['peak']])} | "
                  f"{spread([x / 2**20 for x in s['hwm']])} | "
                  f"{f'{p:.2f}' if p else '-'} | {'; '.join(notes)} |")
            if s["tps"]:
                points.append({"model": model, "format": fmt, "tool": k[3],
                               "x": (max(s["hwm"]) if not cap else cap) / 2**20,
                               "warm": not cap, "tps": statistics.median(s["tps"]), "ppl": p})
        print()
    if plot_path:
        plot(points, Path(plot_path))


def plot(points: list, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(p["model"] for p in points))
    fig, axes = plt.subplots(1, len(models), figsize=(6.5 * len(models), 4.8), squeeze=False)
    for ax, model in zip(axes[0], models):
        series: dict = {}
        for p in points:
            if p["model"] == model:
                tool = "ours (dense warm, sparse capped)" if p["tool"] in ("dense", "sparse") \
                    else NAMES[p["tool"]]
                series.setdefault((tool, p["format"]), []).append(p)
        for (tool, fmt), pts in sorted(series.items()):
            pts.sort(key=lambda p: p["x"])
            line, = ax.plot([p["x"] for p in pts], [p["tps"] for p in pts], marker="o",
                            label=f"{tool}, {fmt}")
            warm = [p for p in pts if p["warm"]]
            ax.plot([p["x"] for p in warm], [p["tps"] for p in warm], marker="*", ms=13,
                    ls="none", color=line.get_color())
            for p in pts:
                if p["ppl"]:
                    ax.annotate(f"{p['ppl']:.1f}" + (" warm" if p["warm"] else ""),
                                (p["x"], p["tps"]), fontsize=7, textcoords="offset points",
                                xytext=(3, 3), color=line.get_color())
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("memory cap, MiB (stars: warm, no cap, at the run's peak RSS)")
        ax.set_ylabel("tokens/s (median of rounds)")
        ax.set_title(f"{model}: tokens/s vs memory cap (labels: perplexity)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    save_figure(fig, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="the GGUFs and flash directories, once")
    b.add_argument("--models", default=",".join(MODELS))
    b.add_argument("--formats", default=",".join(FORMATS))
    r = sub.add_parser("run", help="measure (root: cgroup v1, drop_caches)")
    r.add_argument("--models", default=",".join(MODELS))
    r.add_argument("--formats", default=",".join(FORMATS))
    r.add_argument("--tokens", type=int, default=256, help="decode tokens per run")
    r.add_argument("--runs", type=int, default=3, help="rounds (tools interleaved)")
    r.add_argument("--caps", default="warm,0.7,0.5,0.3",
                   help="'warm' and fractions of the weights added to each tool's overhead")
    r.add_argument("--tools", default="llama,ours,paged,transformers")
    r.add_argument("--time-limit", type=float, default=45.0,
                   help="seconds of decoding per run; tokens done by then are reported")
    r.add_argument("--no-ppl", dest="ppl", action="store_false")
    r.add_argument("--json", default=None,
                   help="append every run's record here (JSON lines; default: a new file in "
                        "benchmarks/results/)")
    r.add_argument("--plot", default=None, help="write the tokens/s vs cap figure here")
    rp = sub.add_parser("report", help="the tables (and figure) again from a run's JSON lines")
    rp.add_argument("json")
    rp.add_argument("--plot", default=None)
    c = sub.add_parser("child", help="internal: one measured process")
    c.add_argument("--gguf", required=True, help="the GGUF llama.cpp and transformers read")
    c.add_argument("--dir", required=True, help="our flash directory")
    c.add_argument("--tool", required=True,
                   choices=("llama", "dense", "sparse", "sparse-needed", "paged", "transformers"))
    c.add_argument("--what", default="decode", choices=("decode", "ppl"))
    c.add_argument("--texts", required=True)
    c.add_argument("--budget", type=int, default=None)
    c.add_argument("--max-context", type=int, default=512)
    c.add_argument("--tokens", type=int, default=256)
    c.add_argument("--time-limit", type=float, default=300.0)
    a = ap.parse_args()
    if a.cmd == "report":
        report(a.json, a.plot)
    else:
        {"build": cmd_build, "run": cmd_run, "child": cmd_child}[a.cmd](a)


if __name__ == "__main__":
    main()
