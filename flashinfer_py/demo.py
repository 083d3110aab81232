"""`flashinfer-py demo`: the embedded SmolLM2 run dense, then streamed from flash under a DRAM
budget smaller than the model, with per-token statistics. What `make demo` runs.

SmolLM2-135M-Instruct is an instruct model: the question goes through its own chat template
(`generate --chat`), as a user of a chat model would ask it."""
from __future__ import annotations

import shlex
import subprocess
import sys

from .config import format_bytes


def _say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def run(prompt: str, max_tokens: int, budget_fraction: float = 0.95,
        quality_tokens: int = 128) -> int:
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

    _say("dense (everything in DRAM), the question in SmolLM2's chat template")
    from .chat import ChatTemplate, stream

    template = ChatTemplate.from_dir(directory)
    ids = template.encode(dense.tokenizer, [{"role": "user", "content": prompt}])
    print(f"user: {prompt}\nassistant: ", end="", flush=True)
    for d in stream(dense, ids, max_tokens, stop_ids=template.stop_token_ids(dense.tokenizer)):
        print(d.text, end="", flush=True)
    print(f"\n[{d.completion_tokens} tokens, {d.completion_tokens / d.seconds:.1f} tokens/s]")
    dense_manifest, dense_args = dense.manifest, dense.args
    del dense

    if not _has_sketch(directory, dense_manifest):
        _say("preparing sparse inference once (calibration on Shakespeare's plays, the 4-bit "
             "sketch; about a minute)")
        from .corpora import calibration_text
        from .train import format_report, train_predictors

        model = load(directory)
        ids = model.tokenizer.encode(calibration_text()[:50_000])
        print(format_report(train_predictors(model, ids)).splitlines()[0])
        del model

    from .config import RuntimeConfig
    from .loader import plan_directory

    # Budget: 95% of the model's size on flash, for the whole process (weights, sketch, KV
    # cache, interpreter). What is left after the resident part goes to the FFN's two tiers.
    budget = int(budget_fraction * model_bytes)
    rt = RuntimeConfig(dram_budget=budget, max_context=128)
    rt, plan = plan_directory(directory, rt)
    ffn = plan.ffn_dram_bytes  # the FFN as the cache holds it
    ffn_flash = dense_args.num_hidden_layers * dense_args.intermediate_size * plan.record_bytes
    _say(f"sparse under a DRAM budget of {format_bytes(budget)} for the whole process "
         f"({100 * budget_fraction:.0f}% of the model's {format_bytes(model_bytes)}), in a fresh "
         f"process: the FFN gets {100 * (plan.cache_bytes + plan.sketch_bytes) / ffn:.0f}% of "
         f"its size in DRAM, a neuron cache of {plan.cache_line()} plus 4-bit sketches of the "
         "others; per token, the uncached neurons the sketch ranks highest replace the cached "
         f"ones that matter least, up to {100 * rt.read_limit:.0f}% of a layer")
    base = [sys.executable, "-m", "flashinfer_py", "generate", str(directory), "--chat",
            "--prompt", prompt,
            "-n", str(max_tokens), "--max-context", "128", "--dram-budget", str(budget)]
    rc = _run(base)
    _say("what that budget costs in quality: perplexity on held-out Wikipedia text "
         f"({quality_tokens} tokens, decoded token by token), dense vs this budget")
    from .corpora import wikipedia_excerpt
    from .evaluate import perplexity, stepwise

    tok = load(directory).tokenizer
    ids = tok.encode(wikipedia_excerpt()[-20_000:])[-quality_tokens:]
    p_dense = perplexity(stepwise(load(directory)), ids, quality_tokens).perplexity
    sparse = load(directory, rt.replace(prefill_chunk=1))
    p_sparse = perplexity(stepwise(sparse), ids, quality_tokens).perplexity
    read = sparse.ffn.total.bytes_read / len(ids)
    print(f"dense {p_dense:.2f}, under the budget {p_sparse:.2f} ({100 * (p_sparse / p_dense - 1):+.1f}%), "
          f"reading {format_bytes(read)} per token ({100 * read / ffn_flash:.1f}% of the FFN). "
          "Full tables: benchmarks/RESULTS_sparse.md")
    return rc


def _has_sketch(directory, manifest) -> bool:
    from .errors import FlashFormatError
    from .predictor import Predictors

    try:
        return "sketch" in Predictors.load(directory, manifest).kinds
    except FlashFormatError:  # none yet, or stale after a re-conversion
        return False


def _run(cmd: list) -> int:
    print("$ flashinfer-py " + shlex.join(cmd[3:] + ["--summary"]), flush=True)
    return subprocess.run(cmd + ["--summary"]).returncode
