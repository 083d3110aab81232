"""benchmarks/llamacpp_compare.py report: issue 15's min / median / max over runs, and the
ratio against llama.cpp, computed from the runs' JSON lines (what RESULTS.md's tables quote)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import llamacpp_compare as lc  # noqa: E402


def _run(tool, cap, secs, rc=0, nbytes=1e9, ra=8192):
    return {"tool_arg": tool, "cap_fraction": cap, "read_ahead_kb": ra, "rc": rc,
            "tokens": [{"s": s, "bytes": nbytes} for s in secs], "peak_rss": 5e9,
            "started": "2026-11-30 13:05:00 UTC", "commit": "abc1234"}


def test_groups_runs_and_takes_min_median_max():
    recs = [_run("ours", 0.5, [2.0] * 4), _run("ours", 0.5, [1.0] * 4),
            _run("ours", 0.5, [4.0] * 4),
            _run("llama", 0.5, [8.0] * 4, nbytes=13e9), _run("llama", 0.5, [10.0] * 4, nbytes=13e9),
            _run("ours", 0.3, [3.0] * 4)]
    groups, ratios = lc.report_rows(recs, min_tokens=4)
    by = {(g["cap"], g["tool"]): g for g in groups}
    assert by[(0.5, "ours")]["tps"] == (0.25, 0.5, 1.0)
    assert by[(0.5, "ours")]["runs"] == 3
    assert by[(0.5, "llama")]["tps"] == (0.1, 0.1125, 0.125)
    # llama.cpp first within a cap, the larger cap first
    assert [(g["cap"], g["tool"]) for g in groups] == [(0.5, "llama"), (0.5, "ours"), (0.3, "ours")]
    # a ratio only where llama.cpp ran at the same cap and read-ahead
    assert len(ratios) == 1
    q = ratios[0]
    assert q["median"] == pytest.approx(0.5 / 0.1125)
    assert q["range"] == pytest.approx((0.25 / 0.125, 1.0 / 0.1))
    assert q["bytes"] == pytest.approx(13.0)
    assert q["runs"] == (3, 2)


def test_failed_and_short_runs_are_left_out():
    recs = [_run("ours", 0.5, [1.0] * 256), _run("ours", 0.5, [0.1] * 10),
            _run("ours", 0.5, [0.1] * 256, rc=1)]
    groups, _ = lc.report_rows(recs, min_tokens=256)
    assert len(groups) == 1 and groups[0]["runs"] == 1 and groups[0]["tps"][1] == 1.0
    groups, _ = lc.report_rows(recs, min_tokens=1)
    assert groups[0]["runs"] == 2       # the failed run stays out at any length


def test_report_reads_jsonl_and_names_a_bad_line(tmp_path, capsys, monkeypatch):
    f = tmp_path / "runs.jsonl"
    f.write_text(json.dumps(_run("ours", 0.5, [2.0] * 3)) + "\n"
                 + json.dumps(_run("llama", 0.5, [8.0] * 3)) + "\n")
    monkeypatch.setattr(sys, "argv", ["llamacpp_compare.py", "report", str(f)])
    lc.main()
    out = capsys.readouterr().out
    assert "| 50% | 8192 KiB | ours (sparse) | 1 x 3 | 0.500 / 0.500 / 0.500 |" in out
    assert "= 4.0x (medians" in out
    f.write_text(f.read_text() + "{not json\n")
    with pytest.raises(SystemExit, match=r"runs.jsonl:3: not a JSON line"):
        lc.main()
    monkeypatch.setattr(sys, "argv", ["llamacpp_compare.py", "report", str(tmp_path / "no.jsonl")])
    with pytest.raises(SystemExit, match="no such file"):
        lc.main()


def test_report_plot_writes_a_png(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    f = tmp_path / "runs.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in [
        _run("ours", 0.5, [2.0] * 3), _run("ours", 0.3, [3.0] * 3),
        _run("llama", 0.5, [8.0] * 3), _run("llama", 0.3, [9.0] * 3)]))
    png = tmp_path / "fig" / "caps.png"
    monkeypatch.setattr(sys, "argv", ["llamacpp_compare.py", "report", str(f), "--plot", str(png)])
    lc.main()
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
