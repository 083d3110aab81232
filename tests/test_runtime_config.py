"""What the backend seam needs from the runtime settings (issue 13): a preset is applied once,
the CLI's flags are RuntimeConfig's fields with its defaults, `threads` reaches the kernels,
and the memory plan has one home (loader.plan_directory) that the CLI and the demo use."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest

import flashinfer_py as fi
from flashinfer_py import cli
from flashinfer_py.config import ABLATIONS, RuntimeConfig
from flashinfer_py.loader import (READ_AHEAD_SLOTS, plan_directory, read_ahead_records,
                                  reader_scratch_bytes)

COMMANDS = {"generate": ["generate", "D", "--prompt", "x"], "chat": ["chat", "D"],
            "serve": ["serve", "D"], "info": ["info", "D"]}


@pytest.mark.parametrize("name", list(ABLATIONS))
def test_a_preset_is_applied_once_and_replace_keeps_an_override(name):
    rt = RuntimeConfig(ablation=name)
    for field, value in ABLATIONS[name].items():
        assert getattr(rt, field) == value
    flipped = rt.replace(bundled=not rt.bundled, window=7)
    assert flipped.bundled == (not rt.bundled) and flipped.window == 7
    assert flipped.ablation == name and flipped.sparse
    assert rt.replace(ablation=name, bundled=not rt.bundled).bundled == rt.bundled  # re-applied


@pytest.mark.parametrize("command", list(COMMANDS))
def test_the_cli_flags_are_runtimeconfig_fields_with_its_defaults(command):
    parser = cli.build_parser()
    ns = parser.parse_args(COMMANDS[command])
    assert cli._runtime(ns) == RuntimeConfig()
    fields = {f.name for f in dataclasses.fields(RuntimeConfig)}
    sub = next(a for a in parser._subparsers._group_actions[0].choices.values()
               if a.prog.endswith(" " + command))
    runtime_dests = {a.dest for g in sub._action_groups
                     if g.title in ("runtime", "sparse inference from flash (the paper's method)",
                                    "backend (where the forward pass runs)")
                     for a in g._group_actions}
    assert runtime_dests and runtime_dests <= fields


def test_cli_flags_set_their_fields():
    ns = cli.build_parser().parse_args(
        ["generate", "D", "--prompt", "x", "--threads", "1", "--no-direct-io", "--uniform-cache",
         "--no-reuse", "--unbundled", "--threshold", "0.3", "--overlap", "layer",
         "--dram-budget", "300MB", "--window", "6"])
    rt = cli._runtime(ns)
    assert (rt.threads, rt.use_direct_io, rt.per_layer_cache, rt.reuse, rt.bundled) == \
        (1, False, False, False, False)
    assert (rt.predictor_threshold, rt.overlap, rt.dram_budget, rt.window, rt.sparse) == \
        (0.3, "layer", 300 << 20, 6, True)


CHILD = """
import json, sys
import numpy as np
import flashinfer_py as fi
from flashinfer_py._core import testing
m = fi.load(sys.argv[1], threads=int(sys.argv[2]))
m.logits(list(range(3, 40)))
print(json.dumps(testing.compute_pool_stats()))
"""


@pytest.mark.parametrize("threads", [1, 2])
def test_threads_reach_the_kernels(tiny_flash, threads):
    """A fresh process: with threads=1 no kernel call shares work with a pool worker."""
    d = tiny_flash("llama-silu")
    out = subprocess.run([sys.executable, "-c", CHILD, str(d), str(threads)],
                         capture_output=True, text=True, check=True)
    st = json.loads(out.stdout.strip().splitlines()[-1])
    if threads == 1:
        assert st["shared"] == 0 and st["workers"] == 0
    else:
        assert st["workers"] >= 1


def test_the_plan_counts_the_read_ahead_slots_and_info_prints_the_plan(tiny_flash, capsys):
    d = tiny_flash("llama-relu")
    kw = dict(sparse=True, selection="oracle", eviction="window")
    _, off = plan_directory(d, RuntimeConfig(**kw))
    _, on = plan_directory(d, RuntimeConfig(**kw, overlap="layer"))
    m = fi.load(d)
    rec, f = m.manifest["bundle"]["record_bytes"], m.args.intermediate_size
    k = read_ahead_records(m.args, RuntimeConfig(**kw))
    # the worker's slots and maps, and its reader's scratch buffer
    assert on.overhead - off.overhead == (READ_AHEAD_SLOTS * (k * rec + f * 4)
                                          + reader_scratch_bytes(rec))
    loaded = fi.load(d, RuntimeConfig(**kw, overlap="layer"))
    assert loaded.ffn.ahead.nbytes <= on.overhead - off.overhead - reader_scratch_bytes(rec)
    # what the plan counts for each reader's scratch is the bound the readers enforce
    assert loaded.ffn.reader.scratch_cap == reader_scratch_bytes(rec)
    assert loaded.ffn.ahead.params == loaded.ffn.reader.params
    assert cli.main(["info", str(d), "--sparse", "--selection", "oracle", "--eviction",
                     "window", "--overlap", "layer", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)["memory_plan"]
    assert plan["overhead"] == on.overhead and plan["total"] == on.total


@pytest.mark.parametrize("text,want", [("4GB", 4 << 30), ("4 GiB", 4 << 30), ("1.5G", 3 << 29),
                                       ("1e9", 10**9), ("300MB", 300 << 20), (4096, 4096),
                                       (2.5e3, 2500)])
def test_sizes_parse_in_binary_units(text, want):
    from flashinfer_py.config import parse_bytes

    assert parse_bytes(text) == want


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -5, "-5GB", True, [1], "4 XB", ""])
def test_a_budget_that_is_not_a_size_is_refused(bad):
    """Every budget goes through parse_bytes: a NaN used to plan the whole model (the budget
    silently ignored) and a negative number to pass as a budget."""
    with pytest.raises(ValueError, match="as a size|positive"):
        RuntimeConfig(dram_budget=bad)
    with pytest.raises(ValueError, match="as a size|positive"):
        RuntimeConfig(dram_budget=0 if bad == "" else bad, backend="torch", vram_budget=bad)


@pytest.mark.parametrize("window", ["4", 0, 1.5, True])
def test_window_must_be_a_whole_number(window):
    with pytest.raises(ValueError, match="window must be a whole number"):
        RuntimeConfig(window=window)


@pytest.mark.parametrize("field,bad", [
    ("max_context", 1000.5), ("max_context", "4096"), ("max_context", 0), ("prefill_chunk", 8.0),
    ("threads", 1.5), ("queue_depth", True), ("read_timeout_ms", -1), ("coalesce_gap_bytes", 4096.0),
    ("sparse", "no"), ("reuse", 1), ("read_limit", "0.1"), ("swap_margin", True)])
def test_every_field_is_checked_for_its_type_when_made(field, bad):
    """A float max_context used to pass and fail ~770 tokens into a generation, a float
    prefill_chunk at the first sparse forward, sparse="no" turned sparse mode on."""
    with pytest.raises(ValueError, match=field):
        RuntimeConfig(**{field: bad})
    import numpy as np

    RuntimeConfig(max_context=np.int64(64), sparse=np.bool_(False), read_limit=np.float32(0.2))
