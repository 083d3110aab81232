"""A long run on a real model (issue 14): SmolLM2-135M generating 10,000 tokens under a DRAM
budget in a fresh process, as a server generates them.

    nice -n 10 python benchmarks/long_run.py [--tokens 10000] [--budget 340MB]
        [--max-context 2048] [--json benchmarks/results/long_run.jsonl]

One model, one prompt cache (the server's), chat conversations one after another through the
model's own template: each user turn hands the model a Wikipedia paragraph; an answer runs to
its end-of-turn token or 512 tokens (sampled, temperature 0.8, top-p 0.95, a seed per turn);
a conversation that would outgrow `--max-context` ends and the next one starts. A new
conversation keeps the system prompt's keys and values (the longest shared prefix, as
`serve` keeps it), so the KV cache starts again and the neuron cache does not: it serves the
whole run, which is what the run is about.

Reported (stdout, and one JSON line with `--json`): per 500 generated tokens, tokens/s (wall
time, prompts included), bytes read from flash per token, the neuron cache's hit rate and the
process's RSS; at the end peak RSS (VmHWM) against the budget and the memory plan, and the
neuron cache's consistency: unique ids in range, the slot map agreeing with them, every cached
row byte for byte its record in ffn_bundles.bin (tests/test_long_run.py checks the same on a
tiny model). The run is a child process started after the predictors are ready, so its peak
RSS is the run's alone. Predictors: `train-predictors`' sketch, trained here once when the
directory has none (about a minute).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import git_commit, machine  # noqa: E402

SYSTEM = "You are a helpful assistant. Answer in plain prose."
ASKS = ("Summarize this passage in a few sentences.",
        "What are the main facts in this passage? Explain them.",
        "Continue this text in the same style.",
        "Write three questions this passage answers, and answer them.")
TURN_TOKENS = 512   # most tokens one answer may take
WINDOW = 500        # generated tokens per reported row


def ensure_predictors(directory: Path) -> None:
    """`train-predictors`' default output (the sketch), made once if the directory lacks it."""
    import flashinfer_py as fi
    from flashinfer_py.corpora import calibration_text
    from flashinfer_py.predictor import Predictors
    from flashinfer_py.train import TrainConfig, ids_digest, train_predictors

    model = fi.load(directory)
    cfg = TrainConfig()
    ids = model.tokenizer.encode(calibration_text()[: cfg.max_tokens * 12])
    try:  # reused only if calibrated on these very ids (predictors made before they said: no)
        p = Predictors.load(directory, model.manifest)
        if p.meta.get("calibration_ids_sha256") == ids_digest(ids):
            return
    except fi.FlashFormatError:
        pass
    print("training the predictors (train-predictors' defaults, Shakespeare) ...", flush=True)
    train_predictors(model, ids, cfg, progress=False)


def paragraphs(n: int = 64, min_chars: int = 400, max_chars: int = 1500) -> list:
    """The first `n` long paragraphs of the Wikipedia excerpt, the user turns' material."""
    from flashinfer_py.corpora import wikipedia_excerpt

    out = [p.strip()[:max_chars] for p in wikipedia_excerpt().split("\n")
           if len(p.strip()) >= min_chars]
    return out[:n]


def status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) for ln in f if ln.startswith(key + ":"))


def child(a) -> dict:
    """The run itself (a fresh process)."""
    import flashinfer_py as fi
    from flashinfer_py.chat import ChatTemplate
    from flashinfer_py.default_model import default_model_dir

    t_load = time.perf_counter()
    directory = default_model_dir()
    m = fi.load(directory, dram_budget=a.budget, max_context=a.max_context,
                **json.loads(a.runtime))
    template = ChatTemplate.from_dir(directory)
    tok = m.tokenizer
    texts = json.loads(Path(a.texts).read_text())  # the parent's pick: the corpus stays out
    pc = m.new_prompt_cache()
    load_s = time.perf_counter() - t_load
    print(f"loaded in {load_s:.1f} s; {m.runtime.selection} + {m.runtime.eviction}; plan "
          f"{m.plan.total / 2**20:.0f} MiB of a {m.runtime.dram_budget / 2**20:.0f} MiB budget; cache "
          f"{sum(m.plan.cache_capacity)} of {m.args.num_hidden_layers * m.args.intermediate_size}"
          f" neurons", flush=True)

    rows, win = [], None
    generated = turn = conversations = prompt_tokens = cached_tokens = 0
    messages: list = []

    def new_window():
        return {"t0": time.perf_counter(), "tokens": 0, "prompt_run": 0, "bytes_read": 0,
                "reads": 0, "io_ns": 0, "hits": 0, "needed": 0, "loaded": 0, "stream_bytes": 0}

    win, t_start = new_window(), time.perf_counter()
    while generated < a.tokens:
        user = {"role": "user", "content": f"{ASKS[turn % len(ASKS)]}\n\n{texts[turn % len(texts)]}"}
        ids = template.encode(tok, messages + [user]) if messages else []
        if not messages or len(ids) + 64 > a.max_context:  # a new conversation
            messages = [{"role": "system", "content": SYSTEM}]
            ids = template.encode(tok, messages + [user])
            conversations += 1
        n = min(TURN_TOKENS, a.max_context - len(ids), a.tokens - generated)
        out = []
        for step in m.generate_step(ids, n, temperature=0.8, top_p=0.95, seed=turn,
                                    prompt_cache=pc):
            out.append(step.token)
            s = step.stats
            if len(out) == 1:
                win["prompt_run"] += step.prompt_tokens - step.cached_tokens
                prompt_tokens += step.prompt_tokens
                cached_tokens += step.cached_tokens
            for k in ("bytes_read", "reads", "io_ns", "hits", "needed", "loaded"):
                win[k] += s[k]
            win["stream_bytes"] += s.get("stream_bytes", 0)  # resident matrices on flash
            win["tokens"] += 1
            generated += 1
            if win["tokens"] == WINDOW or generated == a.tokens:
                sec = time.perf_counter() - win["t0"]
                row = {"tokens_total": generated, "tokens": win["tokens"], "seconds": sec,
                       "tokens_per_s": win["tokens"] / sec,
                       "bytes_per_token": win["bytes_read"] / win["tokens"],
                       "stream_bytes_per_token": win["stream_bytes"] / win["tokens"],
                       "reads_per_token": win["reads"] / win["tokens"],
                       "io_ms_per_token": win["io_ns"] / win["tokens"] / 1e6,
                       "hit_rate": win["hits"] / max(win["needed"], 1),
                       "loaded_per_token": win["loaded"] / win["tokens"],
                       "prompt_tokens_run": win["prompt_run"], "context": len(pc.tokens),
                       "conversation": conversations, "rss": status_kib("VmRSS") * 1024,
                       "peak_rss": status_kib("VmHWM") * 1024}
                rows.append(row)
                print(f"{generated:6d} tokens  {row['tokens_per_s']:5.2f} tok/s  "
                      f"{row['bytes_per_token'] / 1e6:6.2f} MB/token  hit {row['hit_rate']:.3f}  "
                      f"RSS {row['rss'] / 2**20:.0f} MiB  context {row['context']}  "
                      f"conversation {conversations}", flush=True)
                win = new_window()
        messages += [user, {"role": "assistant", "content": tok.decode(out)}]
        turn += 1
    total_s = time.perf_counter() - t_start
    peak_generating = status_kib("VmHWM") * 1024
    t_check = time.perf_counter()
    problems = m.ffn.cache.problems()
    return {"tokens": generated, "seconds": total_s, "tokens_per_s": generated / total_s,
            "turns": turn, "conversations": conversations, "prompt_tokens": prompt_tokens,
            "cached_prompt_tokens": cached_tokens, "load_s": load_s,
            "peak_rss": status_kib("VmHWM") * 1024, "peak_rss_generating": peak_generating,
            "budget": m.runtime.dram_budget,
            "plan": m.plan.total, "kv_cache": m.plan.kv_cache, "cache_bytes": m.plan.cache_bytes,
            "streamed": list(m.plan.streamed),
            "cached_neurons": sum(m.plan.cache_capacity),
            "ffn_neurons": m.args.num_hidden_layers * m.args.intermediate_size,
            "selection": m.runtime.selection, "eviction": m.runtime.eviction,
            "direct": bool(m.ffn.reader.is_direct), "engine": m.ffn.reader.engine,
            "check_s": time.perf_counter() - t_check, "problems": problems, "rows": rows}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=10_000, help="generated tokens in all")
    ap.add_argument("--budget", default="340MB", help="DRAM budget (default %(default)s, as in "
                    "RESULTS.md section 14)")
    ap.add_argument("--max-context", type=int, default=2048,
                    help="tokens a conversation may reach (the KV cache's size)")
    ap.add_argument("--json", type=Path, default=None, help="append the result as a JSON line")
    ap.add_argument("--runtime", default="{}",
                    help='more RuntimeConfig fields as JSON, e.g. \'{"coalesce_gap_bytes": null}\'')
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--texts", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print("RESULT " + json.dumps(child(a)), flush=True)
        return 0

    from flashinfer_py.default_model import default_model_dir

    ensure_predictors(default_model_dir())
    tmp = tempfile.TemporaryDirectory()
    texts = Path(tmp.name) / "texts.json"
    texts.write_text(json.dumps(paragraphs()))  # the corpus (2 MB) stays out of the run's RSS
    load0, date = os.getloadavg(), time.strftime("%Y-%m-%d %H:%M")
    cmd = [sys.executable, __file__, "--child", "--tokens", str(a.tokens), "--budget", a.budget,
           "--max-context", str(a.max_context), "--texts", str(texts), "--runtime", a.runtime]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    result = None
    for line in p.stdout:
        if line.startswith("RESULT "):
            result = json.loads(line[7:])
        else:
            print(line, end="", flush=True)
    if p.wait() != 0 or result is None:
        print(f"the run failed (exit {p.returncode})", file=sys.stderr)
        return 1
    load1 = os.getloadavg()
    r = result
    print(f"\n{date}, commit {git_commit()}, {machine()}; load average {load0[0]:.2f} -> "
          f"{load1[0]:.2f}")
    print(f"{r['tokens']} tokens in {r['seconds'] / 60:.1f} min ({r['tokens_per_s']:.2f} tok/s "
          f"with prompts), {r['conversations']} conversations, {r['turns']} turns; prompts "
          f"{r['prompt_tokens']} tokens of which {r['cached_prompt_tokens']} from the cache")
    print(f"peak RSS {r['peak_rss'] / 2**20:.1f} MiB ({r['peak_rss_generating'] / 2**20:.1f} MiB "
          f"before the final check); budget {r['budget'] / 2**20:.1f} MiB, "
          f"plan {r['plan'] / 2**20:.1f} MiB: generation "
          f"{'within' if r['peak_rss_generating'] <= r['budget'] else 'OVER'} the budget (the "
          "check's own buffers come after)")
    print(f"neuron cache at the end: {'consistent' if not r['problems'] else r['problems']} "
          f"(checked in {r['check_s']:.1f} s)")
    if a.json:
        with open(a.json, "a") as f:
            f.write(json.dumps({"date": date, "commit": git_commit(), "machine": machine(),
                                "load": [load0, load1], "budget_arg": a.budget,
                                "max_context": a.max_context, **r}) + "\n")
    return 0 if not r["problems"] and r["peak_rss_generating"] <= r["budget"] else 2


if __name__ == "__main__":
    sys.exit(main())
