"""What each storage format costs in quality and bytes, on the two real models (issue 11).

    python benchmarks/quant_quality.py [--models smollm2 gemma3] [--windows 8] [--window 512]

For each model, the embedded GGUF is converted once per configuration (under
``<cache>/bench/quant_quality/``; SmolLM2's source is Q4_1, Gemma-3-270M's Q4_K_M, so the
"float16" row is the GGUF's own weights dequantized, and every other row re-quantizes them,
except where blocks are kept):

- float16: records and resident matrices in float16 (the reference of this table);
- q8_0, q4_0, q4_1: records and resident matrices in that block format;
- q4_1 FFN + q8_0 resident: 4-bit neurons, 8-bit attention, embeddings and LM head;
- GGUF blocks kept (``--dtype q4_1``, resident "auto"): every GGUF tensor already in Q4_1 or
  Q8_0 copied bit for bit (SmolLM2: exactly the model llama.cpp runs; Gemma's K-quant tensors
  are re-quantized to Q4_1);
- q8_0, resident auto (``--dtype q8_0`` as typed): 8-bit records, and the resident matrices
  the GGUF already stores in a block format kept as they are (the others in q8_0);
- q8_0 FFN values in float16 records: the float16 directory whose FFN weights are replaced
  in DRAM by their q8_0 round trip, run by the float16 kernels: the format's own error, apart
  from our block kernels (the q8_0 FFN row minus this one is what the kernels add).

Each runs dense (every neuron, no flash streaming) over the same windows of the Wikipedia
excerpt (the last `--windows` x `--window` tokens of its first 120k characters; windows start
with BOS where the tokenizer adds one), and reports perplexity and its change against float16,
the bytes of one neuron record (parts, and as read: 4 KiB aligned), the resident file, and the
conversion's own notes on what was kept or re-quantized. Prints markdown; ``--json`` keeps the
numbers.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import git_commit, machine  # noqa: E402

CONFIGS = {  # name: (dtype, resident_dtype)
    "float16": ("float16", "float16"),
    "q8_0": ("q8_0", "q8_0"),
    "q8_0 FFN + float16 resident": ("q8_0", "float16"),
    "q4_1 FFN + q8_0 resident": ("q4_1", "q8_0"),
    "q4_1": ("q4_1", "q4_1"),
    "q4_0": ("q4_0", "q4_0"),
    "GGUF blocks kept (q4_1, resident auto)": ("q4_1", "auto"),
    # `convert --dtype q8_0` as typed: resident "auto" keeps the GGUF's Q8_0 / Q4_1 / Q4_0
    # matrices as they are and stores the others (K-quants, float) in q8_0
    "q8_0, resident auto (the default command)": ("q8_0", "auto"),
    # the float16 directory with its FFN weights replaced, in DRAM, by their q8_0 round trip:
    # the format's own error, without our block kernels
    "q8_0 FFN values in float16 records": ("float16", "float16", "q8_0"),
}
SOURCES = {"smollm2": "default_gguf_path", "gemma3": "gemma3_gguf_path"}


def converted(model: str, name: str) -> Path:
    import flashinfer_py as fi
    from flashinfer_py import default_model
    from flashinfer_py.default_model import cache_root

    dtype, resident = CONFIGS[name][:2]
    slug = f"{dtype}-{resident}"
    dst = cache_root() / "bench" / "quant_quality" / f"{model}-{slug}"
    if not (dst / "manifest.json").is_file():
        src = getattr(default_model, SOURCES[model])()
        fi.convert(src, dst, dtype=dtype, resident_dtype=resident, force=dst.exists(),
                   progress=False)
    return dst


def eval_ids(model, n: int, window: int) -> list:
    from flashinfer_py.corpora import wikipedia_excerpt
    from flashinfer_py.evaluate import bos_id, windows_of

    bos = bos_id(model)  # BOS first in every window where the tokenizer adds one
    body = window - (bos is not None)
    ids = model.tokenizer.encode(wikipedia_excerpt()[:120000])
    if len(ids) < n * body:
        raise SystemExit(f"the text has {len(ids)} tokens; lower --windows")
    return windows_of(ids[-n * body:], window, bos=bos)


def measure(directory: Path, windows: list, roundtrip: str | None = None) -> dict:
    import numpy as np

    import flashinfer_py as fi
    from flashinfer_py import kernels
    from flashinfer_py.dtypes import RecordLayout
    from flashinfer_py.evaluate import perplexity

    if roundtrip:  # the float records themselves run (not two products made from them), so
        from flashinfer_py.ffn import ResidentFFN  # editing them below changes the model

        two, ResidentFFN._two_products = ResidentFFN._two_products, lambda self, layer: False
        try:
            model = fi.load(directory)
        finally:
            ResidentFFN._two_products = two
    else:
        model = fi.load(directory)
    if roundtrip:  # every FFN part through quantize -> dequantize, kept in the float records
        d, off = model.args.hidden_size, model.ffn.kernel.layout.offsets
        for layer, rows in enumerate(model.ffn.rows_by_layer):
            for part in off:
                w = model.ffn.part_f32(layer, part)
                r = kernels.dequantize(kernels.quantize(w, roundtrip), roundtrip, d)
                rows[:, off[part]:off[part] + d] = r.astype(rows.dtype)
    nll, count = 0.0, 0
    for w in windows:  # each window from an empty context, BOS first where the model has it
        r = perplexity(model.logits, w, window=len(w))
        nll += r.nll * r.tokens
        count += r.tokens
    m = model.manifest
    lay = RecordLayout.from_manifest(m)
    dense = directory / m["files"]["dense"]
    conv = m.get("conversion", {})
    return {"perplexity": float(np.exp(nll / count)), "tokens": count,
            "record_payload": lay.payload_bytes, "record_bytes": lay.record_bytes,
            "dense_bytes": dense.stat().st_size,
            "resident_formats": sorted(set(m.get("resident_formats", {}).values())),
            "conversion": conv}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=list(SOURCES), choices=list(SOURCES))
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS),
                    metavar="CONFIG", help="; ".join(CONFIGS))
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--json", type=Path, default=HERE / "results" / "quant_quality.json")
    ns = ap.parse_args(argv)
    import flashinfer_py as fi

    t0 = time.perf_counter()
    out = {"date": time.strftime("%Y-%m-%d %H:%M"), "commit": git_commit(),
           "machine": machine(), "command": "python benchmarks/quant_quality.py "
           + " ".join(argv if argv is not None else sys.argv[1:]), "rows": {}}
    for model in ns.models:
        windows = None
        for name in ns.configs:
            d = converted(model, name)
            if windows is None:
                windows = eval_ids(fi.load(d), ns.windows, ns.window)
            r = measure(d, windows, *CONFIGS[name][2:])
            out["rows"].setdefault(model, {})[name] = r
            print(f"{model} {name}: perplexity {r['perplexity']:.4f}", file=sys.stderr,
                  flush=True)
    out["seconds"] = time.perf_counter() - t0
    ns.json.parent.mkdir(exist_ok=True)
    ns.json.write_text(json.dumps(out, indent=1))
    print(f"- {out['date']}, commit {out['commit']}; {out['machine']}")
    print(f"- `{out['command'].strip()}` ({out['seconds'] / 60:.0f} min); {ns.windows} windows "
          f"x {ns.window} tokens of the Wikipedia excerpt, dense\n")
    print("| model | records / resident | perplexity | vs float16 | neuron record: parts "
          "(read, 4 KiB aligned) | resident file |")
    print("|---|---|---|---|---|---|")
    for model, rows in out["rows"].items():
        base = rows.get("float16", {}).get("perplexity")
        for name, r in rows.items():
            rel = f"{100 * (r['perplexity'] / base - 1):+.2f}%" if base else "-"
            print(f"| {model} | {name} | {r['perplexity']:.3f} | {rel} | "
                  f"{r['record_payload']} B ({r['record_bytes']} B) | "
                  f"{r['dense_bytes'] / 1e6:.1f} MB |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
