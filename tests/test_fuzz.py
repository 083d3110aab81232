"""A short run of each coverage-guided fuzzer (tests/fuzz/fuzz_parsers.py): the parsers of
manifest.json, the bundle header, predictors.npz, safetensors and GGUF files, fed mutated
files, give success or a documented error, never another exception, a crash or a hang.
The long runs and their figures are in the README."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("atheris")
SCRIPT = Path(__file__).parent / "fuzz" / "fuzz_parsers.py"
# runs per target, about 5 s each on a loaded 2-core machine (a manifest run opens a model)
RUNS = {"manifest": 300, "bundle": 1000, "predictors": 1000, "safetensors": 1000, "gguf": 1000}


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Scratch shared by the targets: the seed model is converted once."""
    return tmp_path_factory.mktemp("fuzz-work")


@pytest.mark.parametrize("target", list(RUNS))
def test_short_fuzz_run_finds_nothing(target, tmp_path, work):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    r = subprocess.run(
        [sys.executable, str(SCRIPT), target, f"-runs={RUNS[target]}", "-seed=1", "-max_len=32768",
         "-rss_limit_mb=2048", "-timeout=20", f"-artifact_prefix={tmp_path}/", str(corpus)],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "FLASHINFER_FUZZ_WORK": str(work)})
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    assert f"Done {RUNS[target]} runs" in out
    assert (corpus / "seed").stat().st_size > 0  # it started from a valid file
    assert not list(tmp_path.glob("crash-*")) and not list(tmp_path.glob("timeout-*"))
