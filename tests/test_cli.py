"""The flashinfer-py command, driven through main([...])."""
from __future__ import annotations

import json

import pytest

from flashinfer_py.cli import main


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("convert", "generate", "info"):
        assert cmd in out


def test_convert_then_info_then_generate(tiny_hf, tmp_path, capsys):
    _, src = tiny_hf("llama-relu")
    dst = tmp_path / "m.flash"
    assert main(["convert", str(src), str(dst), "--dtype", "float16", "--quiet"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert main(["info", str(dst), "--verify", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["dtype"] == "float16" and info["verified"] is True
    assert info["model"]["hidden_act"] == "relu"
    assert main(["generate", str(dst), "--prompt", "w5 w6", "-n", "4", "--stats", "--json"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("w5 w6")
    rows = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert len(rows) == 5 and "tokens_per_s" in rows[-1]


def test_errors_are_one_line_not_tracebacks(tmp_path, capsys):
    (tmp_path / "exists").mkdir()
    assert main(["convert", str(tmp_path / "nowhere"), str(tmp_path / "exists")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("flashinfer-py convert: error:") and "Traceback" not in err
    assert main(["info", str(tmp_path)]) == 1
    assert "manifest.json" in capsys.readouterr().err


def test_info_without_dir_prints_build(capsys):
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["build"]["direct_io"] in ("O_DIRECT", "F_NOCACHE", "none")


def test_sparse_generate_summary_reports_bytes_and_memory(tiny_flash, capsys):
    d = tiny_flash("llama-relu")
    assert main(["generate", str(d), "--prompt", "w5 w6 w7", "-n", "5", "--sparse",
                 "--selection", "oracle", "--window", "2", "--stats", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    summary = rows[-1]
    assert summary["tokens"] == 5
    assert summary["avg_bytes_read"] >= 0 and 0 <= summary["avg_hit_rate"] <= 1
    assert 0 <= summary["ffn_fraction_read_per_token"] <= 1
    assert summary["peak_rss"] is None or summary["peak_rss"] > 0


def test_stream_resident_flag_reaches_the_plan_and_the_summary(tiny_flash, capsys):
    """--stream-resident all: info's plan names what stays on flash; generate's summary says
    what it read a token and how long the token waited for it."""
    d = tiny_flash("llama-relu")
    assert main(["info", str(d), "--dram-budget", "1GB", "--selection", "oracle",
                 "--stream-resident", "all"]) == 0
    assert "read from flash every token" in capsys.readouterr().out
    assert main(["generate", str(d), "--prompt", "w5 w6 w7", "-n", "4", "--sparse",
                 "--selection", "oracle", "--stream-resident", "all", "--stats"]) == 0
    err = capsys.readouterr().err
    assert "resident matrices left on flash: read" in err


def test_overlap_async_reports_the_neurons_it_left_out(tiny_flash, capsys):
    """--overlap async: the summary says how many neurons a token left out (the look-ahead
    missed them), in the text and in --json."""
    d = tiny_flash("llama-relu")
    args = ["generate", str(d), "--prompt", "w5 w6 w7", "-n", "6", "--sparse", "--selection",
            "oracle", "--window", "2", "--overlap", "async", "--stats"]
    assert main(args) == 0
    assert "neurons a token needed were left out" in capsys.readouterr().err
    assert main(args + ["--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    summary = rows[-1]
    # a guess from the layer before misses some of what each layer's own input picks
    assert 0 < summary["avg_dropped"] <= summary["avg_needed"]
    assert summary["avg_hit_rate"] < 1  # the dropped ones count as misses


def test_generate_eviction_flag_reaches_the_runtime(tiny_flash, monkeypatch):
    import flashinfer_py.cli as cli

    seen = []
    real = cli._runtime
    monkeypatch.setattr(cli, "_runtime", lambda ns: seen.append(real(ns)) or seen[-1])
    d = tiny_flash("llama-relu")
    assert main(["generate", str(d), "--prompt", "w5 w6", "-n", "3", "--sparse",
                 "--selection", "oracle", "--eviction", "frequency"]) == 0
    assert seen and seen[-1].eviction == "frequency"
    with pytest.raises(SystemExit):
        main(["generate", str(d), "--eviction", "lru"])


def test_demo_help_describes_the_budget(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    assert "budget" in capsys.readouterr().out


TEMPLATE = ("{% for m in messages %}w{{ 4 if m.role == 'user' else 8 }} {{ m.content }} w9 "
            "{% endfor %}{% if add_generation_prompt %}w8{% endif %}")


def test_chat_reads_messages_and_keeps_the_conversation(tiny_flash, tmp_path, monkeypatch, capsys):
    import io

    tpl = tmp_path / "t.jinja"
    tpl.write_text(TEMPLATE)
    d = tiny_flash("llama-silu")
    lines = 'w5 w6\n\n"""\nw7\nw8\n"""\n/reset\nw5 w6\n/exit\nw9\n'
    monkeypatch.setattr("sys.stdin", io.StringIO(lines))
    assert main(["chat", str(d), "--chat-template", str(tpl), "-n", "3", "--stats"]) == 0
    out, err = capsys.readouterr()
    answers = out.splitlines()
    stats = [line for line in err.splitlines() if line.startswith("[")]
    assert len(answers) == len(stats) == 3  # the blank line is no message; /exit ends it
    assert answers[0] == answers[2]  # after /reset, the same message gets the same answer
    cached = [int(s.split(", ")[-1].split()[0]) for s in stats]
    assert cached[0] == 0 and cached[1] > 0  # turn 2 reuses turn 1's keys and values
    assert "(new conversation)" in err


def test_generate_chat_prints_only_the_answer(tiny_flash, tmp_path, capsys):
    tpl = tmp_path / "t.jinja"
    tpl.write_text(TEMPLATE)
    d = tiny_flash("llama-silu")
    assert main(["generate", str(d), "--chat", "--chat-template", str(tpl), "-p", "w5 w6",
                 "-n", "4"]) == 0
    out = capsys.readouterr().out
    import flashinfer_py as fi
    from flashinfer_py.chat import ChatTemplate, stream

    model = fi.load(d)
    ids = ChatTemplate(TEMPLATE, "t").encode(model.tokenizer, [{"role": "user", "content": "w5 w6"}])
    assert out == "".join(x.text for x in stream(model, ids, 4)) + "\n"


def test_chat_without_a_template_says_where_it_looked(tiny_flash, capsys):
    d = tiny_flash("llama-silu")
    assert main(["chat", str(d)]) == 1
    err = capsys.readouterr().err
    assert str(d) in err and "chat_template.jinja" in err and "--chat-template" in err


def test_serve_help_names_the_endpoints_and_the_queue(capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = capsys.readouterr().out
    for word in ("/v1/chat/completions", "/v1/completions", "429", "--queue-size", "127.0.0.1"):
        assert word in out


def test_read_timeout_is_checked_parsed_and_reaches_the_readers(tiny_flash, monkeypatch):
    import flashinfer_py as fi
    import flashinfer_py.bundles as bundles
    import flashinfer_py.cli as cli
    from flashinfer_py.config import RuntimeConfig

    with pytest.raises(ValueError, match="read_timeout_ms must be a whole number >= 0 milliseconds"):
        RuntimeConfig(read_timeout_ms=-1)
    assert RuntimeConfig().read_timeout_ms == 60000 == bundles.ReaderParams().read_timeout_ms
    ns = cli.build_parser().parse_args(["generate", "--read-timeout-ms", "1234"])
    assert cli._runtime(ns).read_timeout_ms == 1234
    ns = cli.build_parser().parse_args(["serve", "--read-timeout-ms", "0"])
    assert cli._runtime(ns).read_timeout_ms == 0  # 0 = wait forever
    readers = []
    real = bundles.BundleReader.__init__

    def spy(self, path, params=None):
        real(self, path, params)
        readers.append(self)

    monkeypatch.setattr(bundles.BundleReader, "__init__", spy)
    d = tiny_flash("llama-relu")
    fi.load(d, read_timeout_ms=1234)  # dense: the FFN is read once, at load
    assert len(readers) == 1
    sparse = fi.load(d, read_timeout_ms=1234, sparse=True, selection="oracle")
    assert sparse.ffn.reader in readers  # streamed: the reader it keeps
    assert all(r.params.read_timeout_ms == 1234 == r._r.params.read_timeout_ms for r in readers)


def test_serve_api_key_comes_from_the_option_or_the_environment(monkeypatch):
    import flashinfer_py.cli as cli

    parse = cli.build_parser().parse_args
    monkeypatch.delenv("FLASHINFER_PY_API_KEY", raising=False)
    assert cli._api_key(parse(["serve"])) is None
    assert cli._api_key(parse(["serve", "--api-key", "k1"])) == "k1"
    monkeypatch.setenv("FLASHINFER_PY_API_KEY", "k2")
    assert cli._api_key(parse(["serve"])) == "k2"
    assert cli._api_key(parse(["serve", "--api-key", "k1"])) == "k1"  # the option wins
    monkeypatch.setenv("FLASHINFER_PY_API_KEY", "")
    assert cli._api_key(parse(["serve"])) is None
    with pytest.raises(ValueError, match="--api-key is empty"):
        cli._api_key(parse(["serve", "--api-key", ""]))


# ---- what a user who types something wrong sees -------------------------------------------------

def test_errors_name_the_flag_of_a_field(capsys):
    assert main(["generate", "--threshold", "1", "--prompt", "x"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == ("flashinfer-py generate: error: predictor_threshold must be in (0, 1), "
                       "got 1.0 (predictor_threshold is --threshold)")


def test_info_budget_needs_a_directory_and_a_valid_size(capsys):
    assert main(["info", "--dram-budget", "4GB"]) == 1
    assert "give the flash directory" in capsys.readouterr().err
    assert main(["info", "--dram-budget", "bogus"]) == 1  # was: ignored, exit 0
    assert "cannot read 'bogus' as a size" in capsys.readouterr().err


@pytest.mark.parametrize("alignment", ["0", "1000", "2097152"])
def test_convert_alignment_checked_before_any_work(tmp_path, capsys, alignment):
    assert main(["convert", str(tmp_path / "nowhere"), str(tmp_path / "out"),
                 "--alignment", alignment, "--quiet"]) == 1
    assert "must be a power of two from 512 to 1048576" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
