"""`flashinfer-py demo`: the embedded SmolLM2 run dense, then streamed from flash under a DRAM
budget smaller than the model, with per-token statistics. What `make demo` runs."""
from __future__ import annotations

import subprocess
import sys
import time

from .config import format_bytes


def _say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def run(prompt: str, max_tokens: int, cache_fraction: float = 0.25) -> int:
    from .default_model import default_model_dir
    from .runtime import load

    directory = default_model_dir()
    _say(f"SmolLM2-135M-Instruct, converted to a flash directory: {directory}")
    dense = load(directory)
    model_bytes = sum(v["bytes"] for k, v in dense.manifest["checksums"].items()
                      if k.endswith((".bin", ".safetensors")))
    print(f"model on flash: {format_bytes(model_bytes)} "
          f"(resident part {format_bytes(dense.info()['resident_bytes'])}, "
          f"FFN {format_bytes(model_bytes - dense.info()['resident_bytes'])})")

    _say("dense (everything in DRAM)")
    t0 = time.perf_counter()
    print(prompt + "".join(dense.generate(prompt, max_new_tokens=max_tokens)), flush=True)
    print(f"[{max_tokens / (time.perf_counter() - t0):.1f} tokens/s]")
    del dense

    if not (directory / "predictors.npz").is_file():
        _say("training the activation predictors (once; about a minute)")
        try:
            from .train import format_report, train_predictors
        except ImportError as e:
            print(f"cannot train predictors: {e}", file=sys.stderr)
            return 1
        from .corpora import wikipedia_excerpt

        model = load(directory)
        ids = model.tokenizer.encode(wikipedia_excerpt()[:200_000])
        print(format_report(train_predictors(model, ids)).splitlines()[-1])
        del model

    from .config import ModelArgs, RuntimeConfig
    from .format import read_manifest
    from .loader import plan_memory

    m = read_manifest(directory)
    rt = RuntimeConfig(sparse=True, max_context=256)
    pred_bytes = (directory / "predictors.npz").stat().st_size
    base = [sys.executable, "-m", "flashinfer_py", "generate", str(directory), "--prompt", prompt,
            "-n", str(max_tokens), "--max-context", "256"]

    _say("sparse, in a fresh process: FFN streamed from flash through the neuron cache; the "
         "cache keeps the neurons of the last 4 tokens (the sliding window), so each token "
         "reads only the few it lacks")
    rc = _run(base + ["--sparse"])

    # Budget: 95% of the model's size on flash, for the whole process (weights, predictors,
    # KV cache, interpreter). What is left after the resident part becomes the neuron cache.
    budget = int(0.95 * model_bytes)
    plan = plan_memory(ModelArgs.from_dict(m["model"]), m, rt.replace(dram_budget=budget), pred_bytes)
    _say(f"sparse under a DRAM budget of {format_bytes(budget)} for the whole process (95% of the "
         f"model's {format_bytes(model_bytes)}): the neuron cache holds "
         f"{100 * plan.cache_capacity[0] / plan.d_ff:.0f}% of each layer")
    print("SmolLM2 uses SiLU, not ReLU: about half its neurons matter for each token and the "
          "low-rank predictors find them only roughly, so quality drops once the cache holds "
          "less than the window needs (benchmarks/RESULTS_sparse.md). ReLU models (OPT, "
          "ReluLLaMA, ProSparse) are what this method is built for.")
    return _run(base + ["--dram-budget", str(budget)]) or rc


def _run(cmd: list) -> int:
    print("$ flashinfer-py " + " ".join(cmd[3:]) + " --stats", flush=True)
    return subprocess.run(cmd + ["--stats"]).returncode
