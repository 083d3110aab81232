"""The `flashinfer-py` command: convert, generate, info, train-predictors, bench-disk."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Optional

EPILOG = """examples:
  flashinfer-py generate --prompt "The capital of France is"      # embedded SmolLM2-135M
  flashinfer-py generate --chat --prompt "What is the capital of France?"
  flashinfer-py chat                                               # talk to it
  flashinfer-py serve --port 8000                                  # OpenAI-compatible API
  flashinfer-py train-predictors                                   # for the embedded model
  flashinfer-py generate --dram-budget 300MB --stats               # FFN streamed from flash
  flashinfer-py convert ./Llama-2-7b-hf ./llama2.flash --dtype float16
  flashinfer-py convert ./Llama-2-7b-hf ./llama2-q4.flash --dtype q4_0 --resident-dtype q8_0
  flashinfer-py train-predictors ./llama2-q4.flash     # once (runs the model dense: RAM)
  flashinfer-py generate ./llama2-q4.flash --dram-budget 4GB --max-context 1024 --stats
  flashinfer-py info ./llama2-q4.flash --dram-budget 4GB --max-context 1024   # the plan
  flashinfer-py info ./llama2.flash --verify
  flashinfer-py bench-disk /mnt/ssd --plot disk.png               # the paper's Figure 2b
"""


# RuntimeConfig field -> the flag that sets it, so an error about a field names the flag too
_FLAG_OF: dict = {}


def _with_flags(message: str) -> str:
    """`message` with the flag of each RuntimeConfig field it names, where the flag's name
    differs from the field's: "predictor_threshold must be ..." gets "(predictor_threshold
    is --threshold)"."""
    import re

    named = [f"{field} is {flag}" for field, flag in _FLAG_OF.items()
             if flag.lstrip("-").replace("-", "_") != field
             and re.search(rf"(?<![\w'\"-]){re.escape(field)}(?![\w'\"-])", message)]
    return f"{message} ({'; '.join(named)})" if named else message


def _add_runtime_args(p: argparse.ArgumentParser) -> None:
    """The RuntimeConfig flags. Each sets the field it is named after (dest): defaults and
    choices come from the dataclass, so the CLI never restates them (`_runtime` builds the
    config from the fields it finds)."""
    from .backends import BACKENDS, COMPUTE_DTYPES
    from .config import EVICTIONS, OVERLAPS, SELECTIONS, SKETCHES, STREAM_RESIDENT, RuntimeConfig

    d = RuntimeConfig()

    def flag(group, name, field, help, **kw):
        if kw.get("action") in ("store_true", "store_false"):
            kw["default"] = getattr(d, field)
        else:
            kw.setdefault("default", getattr(d, field))
            if kw["default"] is not None:
                help += " (default: %(default)s)"
        group.add_argument(name, dest=field, help=help, **kw)
        _FLAG_OF[field] = name

    g = p.add_argument_group("runtime")
    flag(g, "--threads", "threads", "compute threads; 0 = every core (the torch backend: "
         "torch's own setting)", type=int,
         metavar="N")
    flag(g, "--no-direct-io", "use_direct_io",
         "read through the page cache instead of O_DIRECT / F_NOCACHE", action="store_false")
    flag(g, "--io-engine", "io_engine", "read engine: auto = io_uring when available, else a "
         "thread pool", choices=["auto", "threads", "io_uring"])
    flag(g, "--queue-depth", "queue_depth", "reads in flight", type=int, metavar="N")
    flag(g, "--coalesce-gap", "coalesce_gap_bytes", "merge two neurons into one read when at "
         "most this many bytes of records lie between them (read and dropped); 0 merges only "
         "neighbours. Default: two records when a record is at most 4 KiB (SmolLM2 8%% faster "
         "under a budget), else 0", type=int,
         metavar="BYTES")
    flag(g, "--read-timeout-ms", "read_timeout_ms", "io_uring engine: a read that makes no "
         "progress for this long fails with a FlashIOError instead of hanging on a failing "
         "disk; 0 waits forever. The threads engine cannot interrupt a read", type=int,
         metavar="MS")
    flag(g, "--max-context", "max_context", "prompt + generated tokens the KV cache is sized "
         "for; the cache is float32 and counts against --dram-budget: 2 x layers x key-value "
         "width x 4 bytes a token (a Llama-2-7B: 1 MiB a token, 2 GiB at 2048), so a "
         "smaller context leaves more of a small budget to the neuron cache", type=int,
         metavar="TOKENS")
    b = p.add_argument_group("backend (where the forward pass runs)")
    flag(b, "--backend", "backend", "native: numpy and the C++ kernels on the CPU; torch: "
         "PyTorch on --device (pip install 'flashinfer_py[torch]'); mlx: Apple's MLX on "
         "--device (pip install 'flashinfer_py[mlx]'); auto: mlx for --device gpu, torch "
         "for cuda or mps, each when installed, else native", choices=BACKENDS)
    flag(b, "--device", "device", "torch device: cpu, cuda, cuda:N or mps; mlx device: cpu "
         "or gpu (default: cpu)")
    flag(b, "--compute-dtype", "compute_dtype", "torch/mlx backend: the dtype weights are "
         "dequantized to and computed in (default: float32)", choices=COMPUTE_DTYPES)
    flag(b, "--vram-budget", "vram_budget", "device memory the model may use, e.g. 6GB: the "
         "resident tensors, the KV cache and the device copy of the neuron cache, which gets "
         "the rest; implies --sparse (default: none)", metavar="SIZE")
    flag(b, "--unified-memory", "unified_memory", "yes: the device shares the host's RAM, "
         "so one memory plan holds both and --dram-budget/--vram-budget are one budget; no: "
         "it has its own memory (default: from the device: mlx, cpu and mps share it)",
         type=_yes_no, metavar="yes|no")
    s = p.add_argument_group("sparse inference from flash (the paper's method)")
    flag(s, "--dram-budget", "dram_budget", "memory the model may use, e.g. 4GB or 300MB "
         "(binary units: 1GB = 2^30 bytes; a bare number is bytes); implies --sparse. The FFN is streamed from flash through a neuron cache sized to fit "
         "(default: none, every weight in DRAM)", metavar="SIZE")
    flag(s, "--sparse", "sparse", "stream the FFN from flash even without a budget",
         action="store_true")
    flag(s, "--selection", "selection", "how the neurons a token needs are found: auto (the "
         "sketch when train-predictors built one and --eviction is rank or auto, unless the "
         "model is ReLU and has low-rank predictors too; else the predictors), sketch (a 4-bit copy of the "
         "uncached neurons' gate/up rows estimates their activations), predictor (the paper's "
         "low-rank predictors), oracle (the true activations; measurement only: keeps the FFN "
         "in DRAM), all (hybrid)", choices=SELECTIONS)
    flag(s, "--sketch", "sketch", "with the sketch: what it holds of an uncached neuron. full: "
         "its gate and up rows; gate: the gate row only, half the bytes, scored with the "
         "neuron's mean |up.x| from calibration (a larger cache under the same budget: for "
         "4-bit records, where the full sketch is 64%% of a neuron); auto: gate "
         "where the full sketch would be over 40%% of a cached neuron", choices=SKETCHES)
    flag(s, "--eviction", "eviction", "when cached neurons leave DRAM: auto (rank with the "
         "sketch, else window); rank: the cache stays full and the neurons that matter least "
         "to the current token make room for better ones; window: when no token of the last "
         "--window used them (the paper); frequency: only when the cache is full, least used "
         "first", choices=EVICTIONS)
    flag(s, "--read-limit", "read_limit", "eviction rank: read at most this fraction of each "
         "layer's neurons per token (more reads cost time, fewer cost quality)", type=float,
         metavar="FRACTION")
    flag(s, "--swap-margin", "swap_margin", "eviction rank: an uncached neuron replaces a "
         "cached one only when it scores more than (1 + M) times as much (0: any higher "
         "score)", type=float, metavar="M")
    flag(s, "--uniform-cache", "per_layer_cache", "eviction rank: the same cache size in every "
         "layer instead of sizes from the calibration", action="store_false")
    flag(s, "--window", "window", "eviction window: tokens whose neurons stay cached",
         type=int, metavar="K")
    flag(s, "--threshold", "predictor_threshold", "predictor probability above which a neuron "
         "is loaded", type=float, metavar="P")
    flag(s, "--compute", "compute", "compute each token with every cached neuron (cached: the "
         "window's union) or only with its own predicted neurons", choices=["predicted", "cached"])
    flag(s, "--overlap", "overlap", "read while computing: off (read, then compute), layer (a "
         "layer's reads run while its FFN computes on the rows already cached), ahead (also "
         "start the most confident quarter of the next layer's likely reads early, from a "
         "guess on this layer's input; the selection is unchanged, so a wrong guess costs "
         "reads, not quality), async (a layer loads only what the guess read ahead: no read "
         "waits, the neurons the guess missed are left out for that token, a cost in "
         "quality). With --eviction window: layer when the window fits the budget, ahead "
         "when it does not",
         choices=OVERLAPS)
    flag(s, "--stream-resident", "stream_resident", "resident matrices (attention, LM head, "
         "embeddings) left on flash and read every token: auto (below the whole model, the "
         "budget is shared in proportion between them and the neuron cache: a larger cache, "
         "so better quality), needed (that split only when --dram-budget cannot hold them "
         "beside a neuron cache), off (a budget that is too small is an error), all (every "
         "one; for measurement). Same arithmetic either way; costs their bytes in reads every "
         "token", choices=STREAM_RESIDENT)
    flag(s, "--no-reuse", "reuse", "reload every needed neuron each token (ablation: no "
         "window)", action="store_false")
    flag(s, "--unbundled", "bundled", "read up/gate/down as separate requests (ablation: no "
         "bundling)", action="store_false")


def _add_sampling_args(p: argparse.ArgumentParser, tokens_help: str, default_tokens) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", "-n", type=int, default=default_tokens, help=tokens_help)
    g.add_argument("--temperature", "-t", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-k", type=int, default=0, help="sample among the k most likely (0 = all)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1.0 = off)")
    g.add_argument("--seed", type=int, default=None, help="random seed for sampling")


def _add_chat_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("chat template")
    g.add_argument("--system", default=None, metavar="TEXT",
                   help="a system message to start the conversation with (default: none; "
                        "the template may add its own, SmolLM2's does)")
    g.add_argument("--chat-template", default=None, metavar="FILE",
                   help="the chat template to use instead of the model's own: a jinja file, a "
                        "tokenizer_config.json, or a .gguf whose metadata holds one (e.g. the "
                        "GGUF an older directory was converted from). Default: DIR's "
                        "chat_template.jinja or tokenizer_config.json")


def _yes_no(v: str) -> bool:
    if v.lower() not in ("yes", "no"):
        raise argparse.ArgumentTypeError(f"expected yes or no, not {v!r}")
    return v.lower() == "yes"


def _runtime(ns):
    """The RuntimeConfig of the parsed flags: every field a flag set (see _add_runtime_args)."""
    import dataclasses

    from .config import RuntimeConfig

    return RuntimeConfig(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(RuntimeConfig)
                            if hasattr(ns, f.name)})


def build_parser() -> argparse.ArgumentParser:
    from .config import SUPPORTED_ARCHS
    from .dtypes import DOWN_LAYOUTS, FORMATS

    ap = argparse.ArgumentParser(
        prog="flashinfer-py",
        description="Run LLMs larger than DRAM by streaming sparse FFN neurons from flash "
                    "(an implementation of Apple's 'LLM in a flash').",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    from . import __version__

    ap.add_argument("--version", action="version", version=f"flashinfer_py {__version__}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")

    c = sub.add_parser("convert", help="convert a Hugging Face checkpoint or GGUF file to a flash directory",
                       description="Convert a checkpoint into a flash model directory: resident "
                       "tensors in dense.safetensors, FFN neurons as aligned bundle records in "
                       "ffn_bundles.bin. Supported: "
                       + "; ".join(SUPPORTED_ARCHS.values())
                       + ". The output is written to a temporary directory and renamed at the "
                       "end.")
    c.add_argument("src", help="Hugging Face checkpoint directory (config.json + *.safetensors or "
                               "pytorch_model.bin) or a .gguf file")
    c.add_argument("dst", help="flash directory to create (must not exist unless --force)")
    c.add_argument("--dtype", choices=list(FORMATS), default=None, metavar="FORMAT",
                   help="storage format of the FFN records, the bytes read from flash for "
                        "every neuron: " + "; ".join(f"{n} ({f.summary})" for n, f in
                                                     FORMATS.items())
                        + ". Fewer bits mean fewer bytes read per token and more neurons per "
                        "GB of DRAM, at some accuracy (q8_0 is close to float16; the 4-bit "
                        "formats are what llama.cpp users run, q4_1 with less error than q4_0). "
                        "A GGUF's tensors already in the chosen block format are copied bit for "
                        "bit; other quantized ones (K-quants) are requantized, with a warning. "
                        "Default: the checkpoint's dtype (float16 for GGUF).")
    c.add_argument("--resident-dtype", choices=["auto", *FORMATS], default="auto",
                   metavar="FORMAT",
                   help="storage format of the resident matrices (embeddings, attention, LM "
                        "head), which are read from DRAM for every token: e.g. q8_0 keeps "
                        "attention at 8 bits while --dtype q4_0 puts the FFN at 4. Norms and "
                        "biases stay float32. auto (default): the same as --dtype, except that "
                        "with a block --dtype a GGUF's matrices already in a block format keep "
                        "theirs (SmolLM2's Q8_0 embeddings and Q4_1 attention: exactly the "
                        "model llama.cpp runs).")
    c.add_argument("--down-layout", choices=DOWN_LAYOUTS, default="auto",
                   help="with a block --dtype, how the FFN's down projection is stored. blocks: "
                        "each neuron's down column quantized along d_model, nothing resident. "
                        "codes: down_proj quantized along d_ff as llama.cpp does, the neurons' "
                        "codes in their records and the blocks' scales resident (2-4 bytes per "
                        "32 neurons and model dimension; 32 MB for a 1B q4_1): a dense model "
                        "then runs each FFN layer as two products, 1.5x faster decode on a 1B "
                        "q4_1, for that much more DRAM under a budget. auto (default): codes "
                        "when the checkpoint's down_proj is already in those blocks (a GGUF, "
                        "kept exactly), else blocks")
    c.add_argument("--force", action="store_true",
                   help="replace DST if it exists (only once the new directory is complete)")
    c.add_argument("--alignment", type=int, default=4096,
                   help="bundle record alignment in bytes, a power of two from 512 to 1 MiB "
                        "(default 4096, right for SSDs; direct reads need a multiple of the "
                        "device's block size)")
    c.add_argument("--quiet", action="store_true", help="no progress bars")

    g = sub.add_parser("generate", help="generate text from a flash directory",
                       description="Stream generated text to the terminal. Without DIR, uses the "
                       "embedded default model (SmolLM2-135M-Instruct, converted once and "
                       "cached). With --chat, the prompt is one user message in the model's "
                       "chat template and only the answer is printed.")
    g.add_argument("dir", nargs="?", default=None, help="flash directory (default: embedded SmolLM2)")
    g.add_argument("--prompt", "-p", default=None, help="prompt text (default: a fixed demo prompt)")
    g.add_argument("--chat", action="store_true",
                   help="send the prompt as a user message through the model's chat template "
                        "(instruct models), and stop at the end of the answer")
    _add_sampling_args(g, "tokens to generate (default 64)", 64)
    _add_chat_args(g)
    g.add_argument("--stats", action="store_true", help="print per-token statistics to stderr")
    g.add_argument("--summary", action="store_true",
                   help="print the memory plan and a summary of the statistics to stderr at "
                        "the end, not a line per token")
    g.add_argument("--json", action="store_true",
                   help="with --stats: one JSON object per token on stderr, and a summary")
    _add_runtime_args(g)

    ch = sub.add_parser("chat", help="talk to a model in the terminal, through its chat template",
                        description="An interactive chat: each line you type is a user message, "
                        "rendered with the model's own chat template; the answer streams as it "
                        "is generated. The conversation's KV cache is kept between turns, so a "
                        "turn runs only its new tokens. Commands: /reset starts a new "
                        "conversation, /exit (or Ctrl-D) leaves, \"\"\" starts and ends a "
                        "message of several lines; Ctrl-C stops an answer. Without a terminal, "
                        "reads one message per line from standard input.",
                        epilog='example: flashinfer-py chat --system "Answer in one sentence." '
                        "--dram-budget 300MB")
    ch.add_argument("dir", nargs="?", default=None, help="flash directory (default: embedded SmolLM2)")
    _add_sampling_args(ch, "most tokens an answer may have (default: the context left)", None)
    _add_chat_args(ch)
    ch.add_argument("--stats", action="store_true",
                    help="after each answer, print its tokens, speed and the prompt tokens the "
                         "cache already held, to stderr")
    _add_runtime_args(ch)

    sv = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API",
                        description="Serve one model over HTTP with the OpenAI API: GET /health, "
                        "GET /v1/models, POST /v1/completions and POST /v1/chat/completions "
                        "(stream: true for server-sent events; temperature, top_p, top_k, "
                        "max_tokens, stop, seed). One generation runs at a time; up to "
                        "--queue-size requests wait, and more are refused with 429 and "
                        "Retry-After. A client that disconnects cancels its generation. n "
                        "asks for several choices, logprobs (chat: logprobs, top_logprobs) "
                        "for each token's log-probability. It listens on loopback unless "
                        "--host says otherwise, and asks for no key unless --api-key gives one. "
                        "Needs pip install 'flashinfer_py[serve]'.",
                        epilog="example: flashinfer-py serve ./llama2.flash --port 8000 "
                        "--dram-budget 4GB, then: curl http://127.0.0.1:8000/v1/chat/completions "
                        "-H 'Content-Type: application/json' -d '{\"messages\": [{\"role\": "
                        "\"user\", \"content\": \"Hello\"}]}'")
    sv.add_argument("dir", nargs="?", default=None, help="flash directory (default: embedded SmolLM2)")
    sv.add_argument("--host", default="127.0.0.1",
                    help="address to listen on (default 127.0.0.1, this machine only; 0.0.0.0 "
                         "exposes the model to the network: give it an --api-key)")
    sv.add_argument("--api-key", default=None, metavar="KEY",
                    help="require 'Authorization: Bearer KEY' on every request but /health "
                         "(401 otherwise). Default: $FLASHINFER_PY_API_KEY, else no key; the "
                         "variable keeps the key out of the process list")
    sv.add_argument("--port", type=int, default=8000, help="TCP port (default 8000; 0 picks a free one)")
    sv.add_argument("--queue-size", type=int, default=8,
                    help="requests that may wait while one generates (default 8); more get 429")
    sv.add_argument("--max-request-bytes", type=int, default=16 << 20, metavar="N",
                    help="largest request body accepted (default 16 MiB, far above any real "
                         "prompt); larger ones get 413")
    sv.add_argument("--name", default=None,
                    help="the model id clients see and send (default: DIR's name)")
    sv.add_argument("--chat-template", default=None, metavar="FILE",
                    help="chat template instead of the model's own (a jinja file, a "
                         "tokenizer_config.json or a .gguf); without any, /v1/chat/completions "
                         "answers 400 and /v1/completions still works")
    sv.add_argument("--log-level", default="info",
                    choices=["critical", "error", "warning", "info", "debug"],
                    help="uvicorn's log level (default info: a line per request)")
    _add_runtime_args(sv)

    i = sub.add_parser("info", help="describe a flash directory and this build",
                       description="Print the model's configuration and file layout, and "
                       "what the native core was built with; with --dram-budget (or --sparse), "
                       "also the memory plan: what stays resident, what streams from flash, "
                       "and how many neurons a layer the cache holds.")
    i.add_argument("dir", nargs="?", default=None, help="flash directory (omit for build info only)")
    i.add_argument("--verify", action="store_true", help="check every file's sha256 against the manifest")
    i.add_argument("--json", action="store_true", help="machine-readable output")
    _add_runtime_args(i)

    t = sub.add_parser("train-predictors", help="prepare a model for sparse inference on your text",
                       description="Record the dense model's FFN activations on calibration text "
                       "and build what sparse inference under a DRAM budget uses: calibration "
                       "statistics (the neurons to cache first, per-layer cache sizes) and, by "
                       "--method, the 4-bit sketch (DIR/ffn_sketch.bin: the default for "
                       "SwiGLU/GeGLU models, no training, no torch) and/or the paper's low-rank "
                       "predictors (the default for ReLU models; trained with the balanced loss, "
                       "needs torch: pip install 'flashinfer_py[train]'). Saves "
                       "DIR/predictors.npz and prints how well each ranks the neurons on held-out "
                       "tokens. Re-run after fine-tuning.")
    t.add_argument("dir", nargs="?", default=None, help="flash directory (default: embedded SmolLM2)")
    t.add_argument("--method", choices=["auto", "sketch", "lowrank", "both"], default="auto",
                   help="what to build (default auto: sketch for SwiGLU/GeGLU, lowrank for ReLU)")
    t.add_argument("--text", nargs="+", default=None, metavar="FILE",
                   help="calibration text files (default: Shakespeare's plays, offline)")
    t.add_argument("--tokens", type=int, default=4096,
                   help="calibration tokens (default 4096); their activations are kept in "
                        "DRAM beside the dense model: 2 x (d_model + d_ff) x layers bytes a "
                        "token, about 1 MB for a 7B")
    t.add_argument("--rank", type=int, default=64,
                   help="lowrank: predictor rank of most layers (default 64)")
    t.add_argument("--rank-last", type=int, default=64,
                   help="rank of the last --last-layers layers (default 64)")
    t.add_argument("--last-layers", type=int, default=3,
                   help="how many last layers get --rank-last (default 3)")
    t.add_argument("--sparsity", type=float, default=0.5,
                   help="non-ReLU models: fraction of neurons per layer counted inactive (default 0.5)")
    t.add_argument("--epochs", type=int, default=6, help="training epochs (default 6)")
    t.add_argument("--quiet", action="store_true", help="no progress bars")

    dm = sub.add_parser("demo", help="the embedded SmolLM2: dense, then streamed from flash under a budget",
                        description="Convert the embedded SmolLM2-135M (once), generate densely, "
                        "prepare sparse inference if needed (calibration and the 4-bit sketch, "
                        "once), then generate again in a fresh process with the FFN streamed from "
                        "flash under a DRAM budget below the model's size, printing per-token "
                        "statistics and the peak memory, and finally measure what that budget "
                        "costs in perplexity on held-out text.")
    dm.add_argument("--prompt", "-p", default=None,
                    help="the question, sent through SmolLM2's chat template (default: \"What "
                         "is the capital of France?\")")
    dm.add_argument("--max-tokens", "-n", type=int, default=32, help="tokens to generate (default 32)")

    b = sub.add_parser("bench-disk", help="measure random-read throughput of a disk (Figure 2b)",
                       description="Reproduce the paper's random-read figure on your disk: create "
                       "a test file on the filesystem of PATH, and measure cold-cache direct-I/O "
                       "random reads for every read size x reads-in-flight x engine through "
                       "the reader the runtime uses. Prints one table per engine (GB/s). "
                       "The file is deleted afterwards unless --keep. Takes about "
                       "sizes x depths x engines x --seconds (126 s with the defaults).",
                       epilog="example: flashinfer-py bench-disk /mnt/ssd --sizes 16K 32K 64K "
                       "--depths 16 32 --seconds 2 --plot disk.png")
    b.add_argument("path", nargs="?", default=".",
                   help="a directory on the disk to measure (default: the current directory)")
    b.add_argument("--sizes", nargs="+", default=None, metavar="SIZE",
                   help="read sizes, multiples of 4K (default: 4K 8K 16K ... 1M)")
    b.add_argument("--depths", nargs="+", type=int, default=None, metavar="N",
                   help="reads in flight (default: 1 2 4 8 16 32 64)")
    b.add_argument("--engines", nargs="+", choices=["threads", "io_uring"], default=None,
                   help="read engines (default: both, io_uring when this build has it)")
    b.add_argument("--seconds", type=float, default=1.0,
                   help="measuring time per cell (default 1.0)")
    b.add_argument("--file-size", default="4GB", metavar="SIZE",
                   help="test file size (default 4GB; larger than the disk's cache is best)")
    b.add_argument("--keep", action="store_true",
                   help="keep the test file (a later run on the same PATH reuses it)")
    b.add_argument("--json", action="store_true", help="print the results as JSON")
    b.add_argument("--plot", default=None, metavar="FILE.png",
                   help="save the figure (needs matplotlib: pip install \"flashinfer_py[bench]\")")
    b.add_argument("--quiet", action="store_true", help="no progress bars")
    return ap


def cmd_bench_disk(ns) -> int:
    from . import bench_disk as bd
    from .config import parse_bytes

    if ns.plot:  # fail before minutes of measuring, not after
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise ImportError(f"--plot needs matplotlib: {bd.BENCH_EXTRA}") from None
    res = bd.run(ns.path, sizes=[parse_bytes(s) for s in ns.sizes] if ns.sizes else
                 bd.DEFAULT_SIZES, depths=ns.depths or bd.DEFAULT_DEPTHS, engines=ns.engines,
                 seconds=ns.seconds, file_size=parse_bytes(ns.file_size), keep=ns.keep,
                 progress=not ns.quiet)
    print(bd.to_json(res) if ns.json else bd.format_tables(res))
    if ns.plot:
        bd.plot(res, ns.plot)
        print(f"wrote {ns.plot}", file=sys.stderr)
    return 0


def cmd_convert(ns) -> int:
    from .convert import convert

    t0 = time.perf_counter()
    out = convert(ns.src, ns.dst, dtype=ns.dtype, resident_dtype=ns.resident_dtype,
                  down_layout=ns.down_layout,
                  force=ns.force, progress=not ns.quiet, alignment=ns.alignment)
    print(f"wrote {out} in {time.perf_counter() - t0:.1f} s")
    from .format import read_manifest

    m = read_manifest(out)
    res = sorted(set(m.get("resident_formats", {}).values())) or [m["dtype"]]
    print(f"FFN records: {m['dtype']} ({m['bundle']['record_bytes']} bytes a neuron on flash, "
          f"down layout {m['bundle'].get('down_layout', 'blocks')}); resident matrices: "
          f"{', '.join(res)}")
    notes = m.get("conversion", {})
    for kind, label in (("kept_bit_for_bit", "kept bit for bit"), ("requantized", "requantized")):
        if notes.get(kind):
            print(f"{label}: " + ", ".join(f"{n} x {k}" for k, n in sorted(notes[kind].items())))
    return 0


def _default_dir() -> str:
    from .default_model import default_model_dir

    print("using the embedded default model SmolLM2-135M-Instruct", file=sys.stderr)
    return str(default_model_dir())


def cmd_generate(ns) -> int:
    from .runtime import load

    directory = ns.dir or _default_dir()
    prompt = ns.prompt
    if prompt is None:
        from .default_model import DEFAULT_CHAT_PROMPT, DEFAULT_PROMPT

        prompt = DEFAULT_CHAT_PROMPT if ns.chat else DEFAULT_PROMPT
    model = load(directory, _runtime(ns))
    ends = set(model.args.eos_token_ids)
    if ns.chat:
        from .chat import ChatTemplate

        template = ChatTemplate.from_dir(directory, ns.chat_template)
        messages = ([{"role": "system", "content": ns.system}] if ns.system else []) + [
            {"role": "user", "content": prompt}]
        feed = template.encode(model.tokenizer, messages)
        ends.update(template.stop_token_ids(model.tokenizer))
    else:
        feed = prompt
        print(prompt, end="", flush=True)
    if model.sparse and (ns.stats or ns.summary):
        print("memory plan:\n" + model.plan.describe(), file=sys.stderr)
    steps = []
    for step in model.generate_step(feed, ns.max_tokens, ns.temperature, ns.top_k, ns.top_p,
                                    ns.seed, stop_at_eos=False):
        if step.token not in ends:
            print(step.text, end="", flush=True)
        steps.append(step)
        if ns.stats:
            row = {"token": step.token, "ms": round(step.seconds * 1e3, 2), **step.stats}
            print(json.dumps(row) if ns.json else _stats_line(len(steps), step), file=sys.stderr)
        if step.token in ends:
            break
    print()
    if ns.stats or ns.summary:
        summary = _summary(model, steps)
        print(json.dumps(summary) if ns.json else _summary_text(summary), file=sys.stderr)
    return 0


CHAT_HELP = """commands: /reset (new conversation), /exit or Ctrl-D (leave), \"\"\" (a message of
several lines, ended by another \"\"\"), /help; Ctrl-C stops an answer"""


def cmd_chat(ns) -> int:
    from .chat import ChatTemplate, Conversation
    from .runtime import load

    directory = ns.dir or _default_dir()
    model = load(directory, _runtime(ns))
    conv = Conversation(model, ChatTemplate.from_dir(directory, ns.chat_template), ns.system)
    tty = sys.stdin.isatty()
    if tty:
        import readline  # noqa: F401 - line editing and history for input()

        print(f"chatting with {model.directory.name} ({model.max_context} tokens of context)"
              f"\n{CHAT_HELP}", file=sys.stderr)
    sampling = dict(temperature=ns.temperature, top_k=ns.top_k, top_p=ns.top_p, seed=ns.seed)
    while True:
        try:
            text = _read_message(">>> " if tty else "", "... " if tty else "")
        except EOFError:
            break
        except KeyboardInterrupt:
            print("\n(Ctrl-D or /exit leaves)", file=sys.stderr)
            continue
        if text is None:
            continue
        if text in ("/exit", "/quit", "/bye"):
            break
        if text in ("/reset", "/clear"):
            conv.reset()
            print("(new conversation)", file=sys.stderr)
            continue
        if text in ("/help", "/?"):
            print(CHAT_HELP, file=sys.stderr)
            continue
        try:
            for piece in conv.say(text, ns.max_tokens, **sampling):
                print(piece, end="", flush=True)
        except KeyboardInterrupt:
            print("\n(stopped)", end="", file=sys.stderr)
        except ValueError as e:  # the conversation outgrew the context: say so, keep going
            print(f"error: {e}", file=sys.stderr)
            continue
        print(flush=True)
        if ns.stats and conv.last is not None:
            d = conv.last
            print(f"[{d.completion_tokens} tokens in {d.seconds:.2f} s "
                  f"({d.completion_tokens / max(d.seconds, 1e-9):.1f} tokens/s); prompt "
                  f"{d.prompt_tokens} tokens, {d.cached_tokens} of them cached]", file=sys.stderr)
    return 0


def _read_message(prompt: str, more: str) -> Optional[str]:
    """One message from the user: a line, or the lines between two \"\"\"; None if blank."""
    line = input(prompt).strip()
    if not line.startswith('"""'):
        return line or None
    body, lines = line[3:], []
    while not body.rstrip().endswith('"""'):
        lines.append(body)
        body = input(more)
    lines.append(body.rstrip()[:-3])
    return "\n".join(lines).strip() or None


def cmd_serve(ns) -> int:
    from . import server as srv
    from .chat import ChatTemplate
    from .errors import FlashFormatError
    from .runtime import load

    api_key = _api_key(ns)  # before the model loads: a bad key fails at once
    directory = ns.dir or _default_dir()
    model = load(directory, _runtime(ns))
    try:
        template = ChatTemplate.from_dir(directory, ns.chat_template)
    except FlashFormatError as e:
        if ns.chat_template:
            raise
        template = None
        print(f"warning: {e} /v1/chat/completions will answer 400.", file=sys.stderr)
    if (api_key is None and ns.host not in ("127.0.0.1", "localhost", "::1")
            and not ns.host.startswith("127.")):
        print(f"warning: listening on {ns.host}: anyone who can reach this address can use the "
              "model; there is no authentication (give --api-key)", file=sys.stderr)
    name = ns.name
    if name is None:
        from .default_model import DEFAULT_MODEL_NAME

        name = model.directory.name if ns.dir else DEFAULT_MODEL_NAME
    server = srv.Server(model, name, template, queue_size=ns.queue_size, api_key=api_key,
                        max_request_bytes=ns.max_request_bytes)
    try:
        srv.run(server, ns.host, ns.port, ns.log_level,
                announce=lambda line: print(line, file=sys.stderr, flush=True))
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it shut down on: the normal way out
        print("stopped", file=sys.stderr)
    return 0


def _api_key(ns) -> Optional[str]:
    """--api-key, else $FLASHINFER_PY_API_KEY (an empty variable counts as unset), else None."""
    if ns.api_key is not None:
        if not ns.api_key:
            raise ValueError("--api-key is empty; give a key, or leave the option out")
        return ns.api_key
    return os.environ.get("FLASHINFER_PY_API_KEY") or None


def _summary(model, steps) -> dict:
    """Totals over a generation: prompt time, decode speed, and (sparse) per-token averages."""
    decode = steps[1:]
    t = sum(s.seconds for s in decode)
    out = {"prompt_ms": round(steps[0].seconds * 1e3, 1) if steps else 0.0, "tokens": len(steps),
           "tokens_per_s": round(len(decode) / t, 2) if t > 0 else None}
    if model.sparse and decode:
        n = len(decode)
        for key in ("bytes_read", "reads", "loaded", "evicted", "io_ns", "io_wait_ns", "mm_ns",
                    "compute_ns", "total_ns", "hit_rate"):
            out[f"avg_{key}"] = sum(s.stats[key] for s in decode) / n
        ffn = model.args.num_hidden_layers * model.args.intermediate_size * model.plan.record_bytes
        out["ffn_fraction_read_per_token"] = out["avg_bytes_read"] / ffn
        out["direct_io"] = all(s.stats["direct"] for s in decode)
        out["dram_budget"] = model.runtime.dram_budget
        if model.runtime.overlap == "async":  # what the look-ahead's misses left out
            out["avg_dropped"] = sum(s.stats["dropped"] for s in decode) / n
            out["avg_needed"] = sum(s.stats["needed"] for s in decode) / n
        if "stream_bytes" in decode[0].stats:  # resident matrices read from flash
            for key in ("stream_bytes", "stream_wait_ns"):
                out[f"avg_{key}"] = sum(s.stats[key] for s in decode) / n
    out["peak_rss"] = _peak_rss()
    return out


def _peak_rss() -> Optional[int]:
    """This process's peak resident memory (Linux VmHWM, reset at exec); None elsewhere."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _summary_text(s: dict) -> str:
    tps = s["tokens_per_s"]
    text = (f"prompt: {s['prompt_ms']} ms, {s['tokens']} tokens, "
            f"{tps if tps is not None else float('nan'):.2f} tokens/s")
    if "avg_bytes_read" in s:
        text += (f"\nper generated token: read {s['avg_bytes_read'] / 2**20:.2f} MiB "
                 f"({100 * s['ffn_fraction_read_per_token']:.1f}% of the FFN) in "
                 f"{s['avg_reads']:.0f} reads; I/O {s['avg_io_ns'] / 1e6:.1f} ms"
                 + (f" (waited {s['avg_io_wait_ns'] / 1e6:.1f} ms: the rest overlapped compute)"
                    if s['avg_io_wait_ns'] < s['avg_io_ns'] - 1e5 else "")
                 + f", memory management "
                 f"{s['avg_mm_ns'] / 1e6:.1f} ms, compute {s['avg_compute_ns'] / 1e6:.1f} ms, "
                 f"token {s['avg_total_ns'] / 1e6:.1f} ms; "
                 f"cache hit rate {100 * s['avg_hit_rate']:.0f}%; direct I/O {s['direct_io']}")
    if "avg_dropped" in s:
        text += (f"\noverlap async: {s['avg_dropped']:.0f} of the {s['avg_needed']:.0f} "
                 "neurons a token needed were left out (the look-ahead missed them)")
    if "avg_stream_bytes" in s:
        text += (f"\nresident matrices left on flash: read {s['avg_stream_bytes'] / 2**20:.2f} "
                 f"MiB a token, waited {s['avg_stream_wait_ns'] / 1e6:.1f} ms for them (the "
                 "rest overlapped compute)")
    if s.get("peak_rss"):
        text += f"\npeak memory (RSS) of this process: {s['peak_rss'] / 2**20:.1f} MiB"
        if s.get("dram_budget"):
            text += (f" of the {s['dram_budget'] / 2**20:.1f} MiB budget "
                     f"({'within' if s['peak_rss'] <= s['dram_budget'] else 'OVER'})")
    return text


def _stats_line(n: int, step) -> str:
    s = step.stats
    line = f"[token {n}: id {step.token}, {step.seconds * 1e3:.1f} ms"
    if s:
        waited = (f" (waited {s['io_wait_ns'] / 1e6:.1f})"
                  if s.get("io_wait_ns", s["io_ns"]) != s["io_ns"] else "")
        line += (f"; io {s['io_ns'] / 1e6:.1f} ms{waited}, mem {s['mm_ns'] / 1e6:.1f} ms, compute "
                 f"{s['compute_ns'] / 1e6:.1f} ms; read {s['bytes_read'] / 2**20:.2f} MiB in "
                 f"{s['reads']} reads, {s['loaded']} neurons in / {s['evicted']} out, hit rate "
                 f"{100 * s['hit_rate']:.0f}%")
    return line + "]"


def cmd_info(ns) -> int:
    from . import build_info
    from .backends import available

    probe = getattr(ns, "backend", "native") != "native" or getattr(ns, "device", None)
    rt = _runtime(ns)  # checks the flags, with or without DIR
    if not ns.dir and rt.sparse:
        raise ValueError("--dram-budget, --vram-budget and --sparse show a directory's memory "
                         "plan: give the flash directory (flashinfer-py info DIR --dram-budget 4GB)")
    out: dict = {"build": build_info(), "backends": available(probe=bool(probe))}
    if ns.dir:
        from .format import check_files, read_manifest

        m = read_manifest(ns.dir)
        if ns.verify:
            from .convert import _progress

            check_files(ns.dir, m, verify=True,
                        progress_factory=lambda total, desc: _progress(total, desc, True))
        a = m["model"]
        from .config import ModelArgs

        args = ModelArgs.from_dict(a)
        out["model"] = {"model_type": args.model_type or args.arch}
        out["model"].update({k: a[k] for k in ("arch", "hidden_size", "intermediate_size",
                                               "num_hidden_layers", "num_attention_heads",
                                               "num_key_value_heads", "head_dim", "hidden_act",
                                               "vocab_size")})
        out["model"]["features"] = args.features()
        out["dtype"] = m["dtype"]
        out["resident_dtypes"] = sorted(set(m.get("resident_formats", {}).values())) or [m["dtype"]]
        out["bundle"] = m["bundle"]
        out["files"] = {n: v["bytes"] for n, v in m["checksums"].items()}
        out["verified"] = bool(ns.verify)
        out["runtime"] = {"backend": rt.backend, "device": rt.device or "cpu",
                          "compute_dtype": rt.compute_dtype or "float32"}
        if rt.sparse:
            from .loader import plan_directory

            rt, plan = plan_directory(ns.dir, rt)
            kind = {"sketch_kind": rt.sketch} if rt.selection == "sketch" else {}
            out["memory_plan"] = {"selection": rt.selection, "eviction": rt.eviction, **kind,
                                  **plan.as_dict()}
            if not ns.json:
                sk = f", sketch {rt.sketch}" if kind else ""
                print(f"memory plan (selection {rt.selection}{sk}, eviction {rt.eviction}):\n"
                      + plan.describe(per_layer=True))
    if ns.json:
        print(json.dumps(out, indent=2))
        return 0
    for section, body in out.items():
        if isinstance(body, dict):
            print(f"{section}:")
            for k, v in body.items():
                print(f"  {k}: {'; '.join(map(str, v)) or '-' if isinstance(v, list) else v}")
        else:
            print(f"{section}: {body}")
    return 0


def cmd_demo(ns) -> int:
    from .default_model import DEFAULT_CHAT_PROMPT
    from .demo import run

    return run(ns.prompt or DEFAULT_CHAT_PROMPT, ns.max_tokens)


def cmd_train(ns) -> int:
    from .runtime import load
    from .train import TrainConfig, format_report, read_texts, train_predictors

    directory = ns.dir or _default_dir()
    if ns.text:
        text = read_texts(ns.text)
    else:
        from .corpora import calibration_text

        print("calibrating on Shakespeare's plays (offline; pass --text FILE for your own)",
              file=sys.stderr)
        text = calibration_text()
    model = load(directory)
    methods = {"auto": (), "both": ("sketch", "lowrank")}.get(ns.method, (ns.method,))
    cfg = TrainConfig(rank=ns.rank, rank_last=ns.rank_last, last_layers=ns.last_layers,
                      sparsity=ns.sparsity, max_tokens=ns.tokens, epochs=ns.epochs,
                      methods=methods)
    ids = model.tokenizer.encode(text[: ns.tokens * 12])  # ~4 characters a token, with margin
    preds = train_predictors(model, ids, cfg, progress=not ns.quiet)
    print(format_report(preds))
    saved = [f"{model.directory / 'predictors.npz'} (low-rank predictors "
             f"{preds.nbytes / 2**20:.1f} MiB in DRAM)"]
    if preds.sketch is not None:
        sk = model.directory / preds.sketch["file"]
        saved.append(f"{sk} ({sk.stat().st_size / 2**20:.1f} MiB on flash; in DRAM only for "
                     "the neurons the cache does not hold)")
    print("saved " + " and ".join(saved))
    return 0


def main(argv: Optional[list] = None) -> int:
    ap = build_parser()
    ns = ap.parse_args(argv)
    if ns.command is None:
        ap.print_help()
        return 2
    handler = {"convert": cmd_convert, "generate": cmd_generate, "info": cmd_info,
               "train-predictors": cmd_train, "bench-disk": cmd_bench_disk,
               "demo": cmd_demo, "chat": cmd_chat, "serve": cmd_serve}[ns.command]
    try:
        return handler(ns)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, ImportError) as e:  # our errors carry fix-its
        print(f"flashinfer-py {ns.command}: error: {_with_flags(str(e))}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
