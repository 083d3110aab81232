"""Run by .ci/wheel_check inside a fresh environment holding only the installed wheel (no
compiler on PATH, cwd outside the source tree): the package comes from the wheel, its version
agrees with the wheel's metadata, and the demo's dense step and a sparse step run.

    python wheel_smoke.py SOURCE_TREE
"""
from __future__ import annotations

import json
import sys
import sysconfig
from importlib.metadata import version
from pathlib import Path

import flashinfer_py as fi
from flashinfer_py import _bookkeeping, _core

src = Path(sys.argv[1]).resolve()
site = Path(sysconfig.get_paths()["platlib"]).resolve()
for mod in (fi, _core, _bookkeeping):
    where = Path(mod.__file__).resolve()
    assert site in where.parents and src not in where.parents, f"{mod.__name__} from {where}"
info = fi.build_info()
assert version("flashinfer_py") == fi.__version__ == info["version"], (
    version("flashinfer_py"), fi.__version__, info["version"])
print("build_info:", json.dumps(info))

# The demo's dense step: the embedded SmolLM2 (converted once into the cache: by `make test`'s
# run of this checkout, or now by the wheel's converter), greedy.
from flashinfer_py.default_model import DEFAULT_PROMPT, default_model_dir  # noqa: E402

directory = default_model_dir()
text = "".join(fi.load(directory).generate(DEFAULT_PROMPT, max_new_tokens=8))
print(f"dense: {DEFAULT_PROMPT!r} ->{text!r}")
assert "Paris" in text, text

# A sparse step: the FFN streamed from flash under a DRAM budget that holds 70% of it, the
# paper's window over the true active set (no predictors to train, so torch stays out), one
# token at a time: the compiled bookkeeping, the native cache (its capacity forcing the
# window to forget old tokens) and O_DIRECT reads, all from the wheel.
sparse = fi.load(directory, dram_budget="300MB", selection="oracle", eviction="window",
                 prefill_chunk=1, max_context=64)
text = "".join(sparse.generate(DEFAULT_PROMPT, max_new_tokens=8))
st = sparse.ffn.total
print(f"sparse: {DEFAULT_PROMPT!r} ->{text!r}; {st.as_dict()}")
assert "Paris" in text, text
assert st.loaded > 0 and st.evicted > 0 and st.bytes_read > 0 and 0 < st.hits < st.needed
print("wheel check: OK")
