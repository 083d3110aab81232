"""Nothing half-written: `convert` and `train-predictors` killed (SIGKILL, no clean-up code
runs) at their worst moments leave either no directory or a complete one that `load` verifies,
and the previous predictors.npz intact.

The kill is a real one, in a child process, placed by wrapping one function of the writer so
that it dies at a chosen point; the files are written by the real code.
"""
from __future__ import annotations

import hashlib
import shutil
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import flashinfer_py as fi
from flashinfer_py.errors import FlashFormatError

# Runs in the child: wrap `target` (module:attribute path) so that its `call`-th call kills the
# process, before (`when`="before") or after the wrapped function ran.
CHILD = textwrap.dedent("""
    import importlib, os, signal, sys
    target, call, when, job = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4:]
    mod, _, path = target.partition(":")
    owner = importlib.import_module(mod)
    *parents, name = path.split(".")
    for p in parents:
        owner = getattr(owner, p)
    real, calls = getattr(owner, name), [0]
    def wrapped(*a, **k):
        calls[0] += 1
        if calls[0] == call and when == "before":
            os.kill(os.getpid(), signal.SIGKILL)
        out = real(*a, **k)
        if calls[0] == call and when == "after":
            os.kill(os.getpid(), signal.SIGKILL)
        return out
    setattr(owner, name, wrapped)
    import flashinfer_py as fi
    if job[0] == "convert":
        fi.convert(job[1], job[2], force=True, progress=False)
    else:
        import numpy as np
        from flashinfer_py.train import TrainConfig, train_predictors
        m = fi.load(job[1])
        ids = np.random.default_rng(int(job[2])).integers(3, 503, 512).tolist()
        train_predictors(m, ids, TrainConfig(max_tokens=512, methods=("sketch",)), progress=False)
    sys.exit(3)  # the kill never came
""")


def _killed(target: str, call: int, when: str, *job) -> None:
    r = subprocess.run([sys.executable, "-c", CHILD, target, str(call), when, *map(str, job)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == -signal.SIGKILL, (r.returncode, r.stderr[-2000:])


def _loads_complete(d) -> bool:
    """True if `load` accepts d with every sha256 checked; False if it refuses it."""
    try:
        fi.load(d, verify=True)
    except (FlashFormatError, FileNotFoundError):
        return False
    return True


def _accepted_only_if_complete(d) -> bool:
    """What matters: `load` (no sha256 check) never accepts an incomplete directory."""
    try:
        fi.load(d)
    except (FlashFormatError, FileNotFoundError):
        return True
    return _loads_complete(d)


# (what is wrapped, which call, before/after): mid-FFN, while checksumming, at the rename
CONVERT_KILLS = [("flashinfer_py.bundles:BundleWriter.write_layer", 2, "before"),
                 ("flashinfer_py.convert:file_digest", 2, "after"),
                 ("flashinfer_py.convert:write_manifest", 1, "after"),
                 ("flashinfer_py.convert:_move_into_place", 1, "before")]


@pytest.mark.parametrize("target,call,when", CONVERT_KILLS, ids=lambda x: str(x).split(":")[-1])
def test_a_killed_convert_leaves_nothing_load_accepts(tiny_hf, tmp_path, target, call, when):
    _, src = tiny_hf("llama-silu")
    dst = tmp_path / "m.flash"
    _killed(target, call, when, "convert", src, dst)
    assert not dst.exists() and not _loads_complete(dst)
    leftovers = [p for p in tmp_path.iterdir() if p.name != dst.name]
    assert all(_accepted_only_if_complete(p) for p in leftovers)
    fi.convert(src, dst, progress=False)  # the next run works, and removes what was left
    assert _loads_complete(dst) and [p.name for p in tmp_path.iterdir()] == [dst.name]


@pytest.mark.parametrize("when", ["before", "after"])
def test_a_killed_forced_convert_keeps_a_complete_directory(tiny_hf, tiny_flash, tmp_path, when):
    """--force over an existing model: killed as the new directory takes its place, dst is the
    old model or the new one, complete either way (one atomic exchange, never a gap)."""
    _, src = tiny_hf("llama-silu")
    dst = tmp_path / "m.flash"
    shutil.copytree(tiny_flash("llama-relu"), dst)  # the "previous" model: another one
    target = "flashinfer_py.convert:_exchange"
    _killed(target, 1, when, "convert", src, dst)
    assert _loads_complete(dst)
    act = fi.load(dst).args.hidden_act
    assert act == ("relu" if when == "before" else "silu")


def test_a_killed_train_predictors_keeps_the_previous_file(tiny_flash, tmp_path):
    d = tmp_path / "m.flash"
    shutil.copytree(tiny_flash("llama-silu"), d)
    from flashinfer_py.predictor import Predictors
    from flashinfer_py.train import TrainConfig, train_predictors

    ids = np.random.default_rng(1).integers(3, 503, 512).tolist()
    train_predictors(fi.load(d), ids, TrainConfig(max_tokens=512, methods=("sketch",)),
                     progress=False)
    before = hashlib.sha256((d / "predictors.npz").read_bytes()).hexdigest()
    # killed once the new file is written but before it replaces the old one, and mid-write
    for target, when in (("pathlib:Path.replace", "before"), ("numpy:savez", "before")):
        _killed(target, 1, when, "train", d, 2)
        assert hashlib.sha256((d / "predictors.npz").read_bytes()).hexdigest() == before
        assert "sketch" in Predictors.load(d, fi.load(d).manifest).kinds  # and still loads
