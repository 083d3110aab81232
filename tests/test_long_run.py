"""A long run: 10,000 tokens generated under a DRAM budget, in a fresh process, keep the
process's peak RSS within the memory plan, and at the end the neuron cache still holds what it
claims: unique ids in range, the slot map and the ids agree, and every cached row is, byte for
byte, its neuron's record in ffn_bundles.bin.

The model is a tiny random Llama written with numpy (10,000 tokens of SmolLM2 would take half
an hour here), with a context long enough for the whole run."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

import flashinfer_py as fi
from flashinfer_py.config import RuntimeConfig

pytestmark = pytest.mark.slow
D, F, LAYERS, HEADS, VOCAB, TOKENS = 64, 512, 2, 4, 64, 10_000

CHILD = """
import json, resource, sys
import numpy as np
import flashinfer_py as fi

d, budget, tokens = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
m = fi.load(d, dram_budget=budget, max_context=tokens + 16)
n = sum(1 for _ in m.generate_step([5, 6, 7], tokens, temperature=1.0, seed=0, stop_at_eos=False))
problems = m.ffn.cache.problems()
with open("/proc/self/status") as f:
    peak = next(int(l.split()[1]) for l in f if l.startswith("VmHWM")) * 1024
print(json.dumps({"tokens": n, "peak_rss": peak, "plan": m.plan.total, "budget": budget,
                  "loaded": int(m.ffn.total.loaded), "problems": problems}))
"""


def _tiny_llama(root):
    from numpy_llama import llama_config, write_llama

    src = write_llama(root / "hf", llama_config(D, F, LAYERS, HEADS, 2, VOCAB, 16384), scale=0.2)
    with pytest.warns(UserWarning, match="no tokenizer.json"):  # token ids are all it needs
        return fi.convert(src, root / "m.flash", progress=False)


def test_ten_thousand_tokens_under_a_budget(tmp_path):
    from flashinfer_py.loader import prepare_sparse
    from flashinfer_py.train import TrainConfig, train_predictors

    d = _tiny_llama(tmp_path)
    ids = np.random.default_rng(1).integers(3, VOCAB, 512).tolist()
    train_predictors(fi.load(d), ids, TrainConfig(max_tokens=512, methods=("sketch",)),
                     progress=False)
    m = fi.load(d)
    rt = RuntimeConfig(dram_budget=1 << 40, max_context=TOKENS + 16)
    _, _, plan = prepare_sparse(d, m.manifest, m.args, rt)
    budget = plan.total - plan.cache_bytes + plan.ffn_dram_bytes // 2  # half the FFN cached
    r = subprocess.run([sys.executable, "-c", CHILD, str(d), str(budget), str(TOKENS)],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["tokens"] == TOKENS and out["problems"] == []
    assert out["loaded"] > 0  # neurons came and went all along
    assert out["peak_rss"] <= out["budget"], out
