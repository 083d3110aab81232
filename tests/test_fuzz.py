"""Fuzzing in the suite: a short run of each coverage-guided fuzzer, which may find nothing.

- The atheris fuzzers (tests/fuzz/fuzz_parsers.py): the parsers of manifest.json, the bundle
  header, predictors.npz, safetensors and GGUF files, fed mutated files, give success or a
  documented error, never another exception, a crash or a hang.
- The native one (tests/fuzz/fuzz_bundle_header.cpp, built with clang, libFuzzer, ASan and
  UBSan into build/fuzz as `make fuzz-native` builds it): the C++ bundle-header parser and the
  reader's open path, with coverage of the C++ itself, which atheris cannot see.

The long runs and their figures are in the README."""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent / "fuzz" / "fuzz_parsers.py"
ROOT = Path(__file__).resolve().parents[1]
# runs per target, about 5 s each on a loaded 2-core machine (a manifest run opens a model)
RUNS = {"manifest": 300, "bundle": 1000, "predictors": 1000, "safetensors": 1000, "gguf": 1000}
needs_atheris = pytest.mark.skipif(importlib.util.find_spec("atheris") is None,
                                   reason="atheris is not installed (pip install atheris)")


def _rss_limit(own_mb: int = 2048) -> str:
    """libFuzzer's -rss_limit_mb for a fuzzer started from this process: `own_mb` above the
    peak RSS it inherits. Linux keeps a process's peak RSS across exec, and subprocess starts
    the fuzzer from the test runner, so a fuzzer reports the runner's peak from its first input
    (2086 MB once the suite had grown: an "out-of-memory" with nothing allocated)."""
    import resource

    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024  # KiB on Linux
    return f"-rss_limit_mb={peak_mb + own_mb}"


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Scratch shared by the targets: the seed model is converted once."""
    return tmp_path_factory.mktemp("fuzz-work")


@needs_atheris
@pytest.mark.parametrize("target", list(RUNS))
def test_short_fuzz_run_finds_nothing(target, tmp_path, work):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    r = subprocess.run(
        [sys.executable, str(SCRIPT), target, f"-runs={RUNS[target]}", "-seed=1", "-max_len=32768",
         _rss_limit(), "-timeout=20", f"-artifact_prefix={tmp_path}/", str(corpus)],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "FLASHINFER_FUZZ_WORK": str(work)})
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    assert f"Done {RUNS[target]} runs" in out
    assert (corpus / "seed").stat().st_size > 0  # it started from a valid file
    assert not list(tmp_path.glob("crash-*")) and not list(tmp_path.glob("timeout-*"))


# ------------------------------------------------------------------------------------------
# the native target
# ------------------------------------------------------------------------------------------

FUZZ_BUILD = ROOT / "build" / "fuzz"
NO_CLANG = ("the native fuzz target needs clang++ with libFuzzer ({why}); `make fuzz-native` "
            "installs it (as root, with apt-get: clang libclang-rt-dev), builds and runs it")


def _tool(name: str) -> str | None:
    """`name` from PATH, or from this interpreter's scripts (pip's cmake and ninja)."""
    return shutil.which(name) or shutil.which(name, path=sysconfig.get_path("scripts"))


@pytest.fixture(scope="session")
def native_fuzzer(tmp_path_factory) -> Path:
    """The directory of fuzz_bundle_header and bundle_header_seeds, built once a session
    (incrementally into build/fuzz: a few seconds when `make fuzz-native` built it first)."""
    clang, cmake = shutil.which("clang++"), _tool("cmake")
    if clang is None:
        pytest.skip(NO_CLANG.format(why="clang++ is not on PATH"))
    if cmake is None:
        pytest.skip("cmake is not installed (pip install cmake)")
    probe = tmp_path_factory.mktemp("libfuzzer-probe")
    (probe / "p.cpp").write_text('extern "C" int LLVMFuzzerTestOneInput(const char*, '
                                 'unsigned long) { return 0; }\n')
    r = subprocess.run([clang, "-fsanitize=fuzzer,address,undefined", str(probe / "p.cpp"),
                        "-o", str(probe / "p")], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(NO_CLANG.format(why="it links no libFuzzer runtime: " + r.stderr[-300:]))
    configure = [cmake, "-S", str(ROOT), "-B", str(FUZZ_BUILD), "-DFLASHINFER_FUZZ=ON",
                 f"-DCMAKE_CXX_COMPILER={clang}"]
    if not (FUZZ_BUILD / "CMakeCache.txt").exists() and _tool("ninja"):
        configure += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={_tool('ninja')}"]
    for cmd in (configure, [cmake, "--build", str(FUZZ_BUILD)]):
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]  # clang is there: must build
    return FUZZ_BUILD / "tests" / "fuzz"


def _seed_corpus(bin_dir: Path, corpus: Path, bundle_files) -> None:
    """The writer's valid headers (bundle_header_seeds), and the converter's own files' headers,
    each as the target reads an input: the header, then the mode byte 1 (the declared length)."""
    corpus.mkdir()
    r = subprocess.run([str(bin_dir / "bundle_header_seeds"), str(corpus)], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stdout + r.stderr  # UBSan stops it on undefined behaviour
    for i, f in enumerate(bundle_files):
        (corpus / f"converted-{i}").write_bytes(f.read_bytes()[:4096] + b"\x01")


def _run_native(bin_dir: Path, corpus: Path, artifacts: Path, *flags: str) -> str:
    r = subprocess.run(
        [str(bin_dir / "fuzz_bundle_header"), *flags, "-seed=1", "-timeout=10",
         _rss_limit(), "-malloc_limit_mb=2048", f"-artifact_prefix={artifacts}/",
         str(corpus)], capture_output=True, text=True, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-6000:]
    assert not list(artifacts.glob("crash-*")) and not list(artifacts.glob("timeout-*")), out[-6000:]
    assert "runtime error" not in out and "ERROR:" not in out, out[-6000:]
    return out


def test_native_seeds_pass_clean(native_fuzzer, tiny_flash, tmp_path):
    """Every seed, valid or truncated, runs without a report. The regression test of what the
    first runs found: make_header wrote file_bytes through a misaligned pointer into the packed
    header, and error messages bound references to its misaligned 64-bit fields (UBSan)."""
    corpus = tmp_path / "corpus"
    _seed_corpus(native_fuzzer, corpus, [tiny_flash("opt") / "ffn_bundles.bin",
                                         tiny_flash("opt", "q4_0") / "ffn_bundles.bin"])
    out = _run_native(native_fuzzer, corpus, tmp_path, "-runs=0")
    n = len(list(corpus.iterdir()))
    assert f"seed corpus: files: {n} " in out, out[-3000:]


def test_native_short_fuzz_run_finds_nothing(native_fuzzer, tmp_path):
    """20 s (or 20,000 inputs) of coverage-guided mutation from the seeds: nothing found."""
    corpus = tmp_path / "corpus"
    _seed_corpus(native_fuzzer, corpus, [])
    out = _run_native(native_fuzzer, corpus, tmp_path, "-runs=20000", "-max_total_time=20")
    assert "Done " in out, out[-3000:]
