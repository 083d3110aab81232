"""Chat: templates render as transformers renders them, stop strings are cut as OpenAI cuts
them, and a conversation that keeps its KV cache answers exactly as a fresh run does."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import flashinfer_py as fi
from flashinfer_py.chat import ChatTemplate, Conversation, normalize_messages, stream
from flashinfer_py.errors import FlashFormatError
from flashinfer_py.generate import StopStrings

# Llama 3's shape: bos_token from tokenizer_config.json, | trim, a generation prompt
LLAMA3 = ("{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] "
          "+ '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
          "{% endif %}")
# what the templates of Qwen, Gemma and Phi use: namespace, continue, raise_exception, tojson,
# and block tags on their own indented lines (trim_blocks / lstrip_blocks decide the spaces)
FEATURES = """{%- set ns = namespace(system='') -%}
{%- for m in messages -%}
    {%- if m['role'] == 'system' -%}
        {%- set ns.system = m['content'] -%}
        {%- continue -%}
    {%- endif -%}
    {% if m['role'] not in ['user', 'assistant'] %}
        {{ raise_exception('roles must be user or assistant, not ' + m['role']) }}
    {% endif %}
[{{ m['role'] }}] {{ m['content'] | tojson }}
    {% if loop.last and ns.system %}
(system: {{ ns.system }}) {{ eos_token }}
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}[assistant]{% endif %}"""

CONVERSATIONS = [
    [{"role": "user", "content": "Hello <b>there</b> & ünïcode \"quotes\""}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "  Hi  "},
     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Again\nplease"}],
]


def _tokenizer_dir(tmp_path, tiny_flash, template):
    """A directory transformers' AutoTokenizer loads: the word tokenizer and a config."""
    d = tmp_path / "tok"
    d.mkdir()
    shutil.copy(tiny_flash("llama-silu") / "tokenizer.json", d / "tokenizer.json")
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>",
        "eos_token": {"__type": "AddedToken", "content": "</s>", "lstrip": False,
                      "normalized": False, "rstrip": False, "single_word": False}, "chat_template": template}))
    return d


@pytest.mark.parametrize("template", [LLAMA3, FEATURES], ids=["llama3", "features"])
def test_render_equals_transformers(template, tiny_flash, tmp_path):
    from transformers import AutoTokenizer

    d = _tokenizer_dir(tmp_path, tiny_flash, template)
    ref = AutoTokenizer.from_pretrained(str(d))
    ours = ChatTemplate.from_dir(d)
    assert ours.origin.endswith("tokenizer_config.json")
    for messages in CONVERSATIONS:
        for gen in (True, False):
            assert ours.render(messages, add_generation_prompt=gen) == ref.apply_chat_template(
                messages, add_generation_prompt=gen, tokenize=False)


def test_template_errors_name_the_cause(tiny_flash, tmp_path):
    d = _tokenizer_dir(tmp_path, tiny_flash, FEATURES)
    with pytest.raises(ValueError, match="roles must be user or assistant, not tool"):
        ChatTemplate.from_dir(d).render([{"role": "tool", "content": "x"}])
    bad = tmp_path / "bad.jinja"
    bad.write_text("{% for m in messages %}{{ m.content }")
    with pytest.raises(FlashFormatError, match="bad.jinja.*not valid jinja"):
        ChatTemplate.from_dir(d, override=str(bad))
    with pytest.raises(FlashFormatError, match="no chat template.*--chat-template"):
        ChatTemplate.from_dir(tiny_flash("llama-silu"))
    with pytest.raises(FileNotFoundError, match="nowhere.jinja"):
        ChatTemplate.from_dir(d, override=str(tmp_path / "nowhere.jinja"))


def test_named_templates_and_files_are_found(tiny_flash, tmp_path):
    d = _tokenizer_dir(tmp_path, tiny_flash, [{"name": "tool_use", "template": "T"},
                                              {"name": "default", "template": "D{{ bos_token }}"}])
    assert ChatTemplate.from_dir(d).render([]) == "D<s>"
    (d / "chat_template.jinja").write_text("J")  # the file wins over the config, as in transformers
    assert ChatTemplate.from_dir(d).render([]) == "J"


def test_messages_are_checked_and_text_parts_joined():
    out = normalize_messages([{"role": "user", "content": [{"type": "text", "text": "a"},
                                                           {"type": "text", "text": "b"}]}])
    assert out == [{"role": "user", "content": "a\nb"}]
    for bad, match in (([], "non-empty"), ([{"role": "robot", "content": "x"}], r"messages\[0\].role"),
                       ([{"role": "user", "content": [{"type": "image_url"}]}], "only text"),
                       ([{"role": "user", "content": 3}], "string or a list")):
        with pytest.raises(ValueError, match=match):
            normalize_messages(bad)


def test_stop_strings_are_held_back_then_cut():
    s = StopStrings(["END", "\n\n"])
    assert [s.add(p) for p in ("Hello E", "N", "D and more")] == ["Hello ", "", ""]
    assert s.hit == "END"
    s = StopStrings(["abc"])
    assert (s.add("xab"), s.add("d"), s.hit, s.flush()) == ("x", "abd", None, "")
    s = StopStrings(["abc"])
    assert (s.add("zab"), s.flush()) == ("z", "ab")  # held back, then given at the end
    s = StopStrings(["b", "ab"])
    assert (s.add("xab"), s.hit) == ("x", "ab")  # the earliest match wins
    assert StopStrings([]).add("any") == "any"


def test_prompt_cache_runs_only_new_tokens_and_matches_a_fresh_run(tiny_flash):
    model = fi.load(tiny_flash("llama-silu"))
    pc = model.new_prompt_cache()
    ids = list(range(5, 17))
    first = list(model.generate_step(ids, 4, prompt_cache=pc, stop_at_eos=False))
    assert pc.tokens == ids + [s.token for s in first[:-1]]  # the last sampled id never ran
    assert pc.kv.size == len(pc.tokens)
    longer = pc.tokens + [first[-1].token, 40, 41]
    cont = list(model.generate_step(longer, 5, prompt_cache=pc, stop_at_eos=False))
    fresh = list(model.generate_step(longer, 5, stop_at_eos=False))
    assert cont[0].cached_tokens == len(longer) - 3 and fresh[0].cached_tokens == 0
    assert [s.token for s in cont] == [s.token for s in fresh]
    assert [s.logprob for s in cont] == pytest.approx([s.logprob for s in fresh], abs=1e-4)
    other = ids[:3] + [60, 61]  # diverges after 3 ids: only those are kept
    step = next(model.generate_step(other, 1, prompt_cache=pc))
    assert step.cached_tokens == 3 and pc.tokens == other
    again = next(model.generate_step(other, 1, prompt_cache=pc))
    assert again.cached_tokens == len(other) - 1  # its logits need one id to run
    assert again.token == step.token


def test_conversation_keeps_its_cache_and_answers_as_a_fresh_run(tiny_flash):
    model = fi.load(tiny_flash("llama-silu"))
    tpl = ChatTemplate("{% for m in messages %}w{{ 4 if m.role == 'user' else 8 }} "
                       "{{ m.content }} w9 {% endfor %}{% if add_generation_prompt %}w8"
                       "{% endif %}", "test")
    conv = Conversation(model, tpl)
    one = "".join(conv.say("w50 w51 w52", max_tokens=5))
    first_prompt = conv.last.prompt_tokens
    two = "".join(conv.say("w60 w61", max_tokens=5))
    assert [m["role"] for m in conv.messages] == ["user", "assistant"] * 2
    assert conv.messages[1]["content"] == one and conv.messages[3]["content"] == two
    assert conv.last.cached_tokens >= first_prompt  # turn 1 was not run again
    ids = tpl.encode(model.tokenizer, conv.messages[:3])
    fresh = "".join(d.text for d in stream(fi.load(tiny_flash("llama-silu")), ids, 5))
    assert two == fresh
    conv.reset()
    assert conv.messages == []
    with pytest.raises(ValueError, match="does not fit the context"):
        list(conv.say("w5 " * (model.max_context + 1)))
    for bad in (0, -1, 2.5):  # 0 used to mean "the whole context left"
        with pytest.raises(ValueError, match="max_tokens"):
            conv.say("w50", max_tokens=bad)
    with pytest.raises(ValueError, match="temperature"):
        conv.say("w50", temperature=float("nan"))
    assert conv.messages == []  # nothing refused was recorded


def test_stream_reports_why_it_stopped(tiny_flash):
    model = fi.load(tiny_flash("llama-silu"))
    ids = list(range(5, 15))
    tokens = [s.token for s in model.generate_step(ids, 6, stop_at_eos=False)]
    full = list(stream(model, ids, 6, ignore_eos=True))
    assert full[-1].finish_reason == "length" and full[-1].completion_tokens == 6
    text = "".join(d.text for d in full)
    assert text.split() == [f"w{t}" for t in tokens if t > 3]
    cut = list(stream(model, ids, 6, stop_ids=[tokens[2]], ignore_eos=False))
    assert cut[-1].finish_reason == "stop" and cut[-1].completion_tokens == 3
    word = f"w{tokens[1]}"
    by_text = list(stream(model, ids, 6, stop=[word]))
    assert by_text[-1].finish_reason == "stop"
    assert "".join(d.text for d in by_text) == text[:text.index(word)]


@pytest.mark.slow
def test_the_template_of_a_source_gguf_can_be_given(tiny_flash, tmp_path):
    """For a directory converted before templates were kept: --chat-template model.gguf."""
    from flashinfer_py.default_model import default_gguf_path

    try:
        gguf = default_gguf_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    t = ChatTemplate.from_dir(tiny_flash("llama-silu"), override=str(gguf))
    text = t.render([{"role": "user", "content": "Hi"}])
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_stream_lists_logprobs_only_when_asked(tiny_flash):
    from flashinfer_py.sampling import log_softmax

    model = fi.load(tiny_flash("llama-silu"))
    ids = list(range(5, 15))
    assert all(d.logprobs is None for d in stream(model, ids, 4, ignore_eos=True))
    deltas = list(stream(model, ids, 4, ignore_eos=True, logprobs=3))
    listed = [t for d in deltas for t in d.logprobs]
    steps = list(model.generate_step(ids, 4, stop_at_eos=False))
    assert [t.token for t in listed] == [s.token for s in steps]
    ref = np.array([log_softmax(row) for row in
                    model.logits(ids + [s.token for s in steps[:-1]])[len(ids) - 1:]])
    for k, t in enumerate(listed):
        assert t.logprob == pytest.approx(ref[k, t.token], abs=1e-4) and t.logprob <= 0
        assert [i for i, _ in t.top] == list(np.argsort(-ref[k], kind="stable")[:3])
        assert [lp for _, lp in t.top] == pytest.approx(np.sort(ref[k])[::-1][:3], abs=1e-4)
    assert all(not t.top for d in stream(model, ids, 2, logprobs=0) for t in d.logprobs)


def test_token_bytes_of_byte_level_and_sentencepiece_vocabularies(tmp_path):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models

    from flashinfer_py.tokenizer import Tokenizer

    sp = HFTokenizer(models.BPE(vocab={"<unk>": 0, "\u2581hi": 1, "<0xE2>": 2, "\u00e9": 3},
                                merges=[], byte_fallback=True, unk_token="<unk>"))
    sp.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                    decoders.Fuse()])
    bl = HFTokenizer(models.BPE(vocab={"\u0120hi": 0, "\u00c3\u00a9": 1, "\u00c3": 2},
                                merges=[]))
    bl.decoder = decoders.ByteLevel()
    for name, tok, want in (("sp", sp, {1: b" hi", 2: b"\xe2", 3: "\u00e9".encode()}),
                            ("bl", bl, {0: b" hi", 1: "\u00e9".encode(), 2: b"\xc3"})):
        (tmp_path / name).mkdir()
        tok.save(str(tmp_path / name / "tokenizer.json"))
        t = Tokenizer(tmp_path / name)
        assert {i: t.token_bytes(i) for i in want} == want, name


@pytest.mark.parametrize("source,match", [
    # 10^10 iterations: the sandbox's own range cap (100,000 a call) does not bound nesting
    ("{% for a in range(100000) %}{% for b in range(100000) %}x{% endfor %}{% endfor %}",
     "loops ran past"),
    ("{{ 'x' * 10000000000 }}", "repetition of 1 x 10000000000"),   # ~10 GB of string
    ("{{ [1, 2] * 999999999 }}", "repetition of 2 x 999999999"),
    ("{{ 10 ** 100000000 }}", "too large"),
    ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "recursed too deeply"),
])
def test_a_hostile_template_is_stopped_not_run_forever(source, match):
    """A template comes with the model and renders every request: one that would run for
    hours or fill memory is refused with an error instead."""
    t = ChatTemplate(source, "hostile.jinja", {})
    with pytest.raises(ValueError, match=match):
        t.render([{"role": "user", "content": "hi"}])
    ok = ChatTemplate("{% for i in range(3) %}{{ i }}{% endfor %}{{ 'ab' * 2 }}", "fine", {})
    for _ in range(3):  # the budget is per render, not per template
        assert ok.render([]) == "012abab"


def test_a_prompt_cache_serves_one_generation_at_a_time(tiny_flash):
    """Two live generators on one PromptCache: the paused one, resumed after the other used
    the cache, raises instead of writing its tokens at the other's position (silent garbage
    before); a conversation keeps the turn that ran last."""
    model = fi.load(tiny_flash("llama-silu"))
    pc = model.new_prompt_cache()
    g1 = model.generate_step([5, 6, 7], 4, prompt_cache=pc, stop_at_eos=False)
    next(g1)
    b = [s.token for s in model.generate_step([8, 9, 10], 3, prompt_cache=pc, stop_at_eos=False)]
    with pytest.raises(RuntimeError, match="another generation"):
        next(g1)
    fresh = [s.token for s in fi.load(tiny_flash("llama-silu")).generate_step(
        [8, 9, 10], 3, stop_at_eos=False)]
    assert b == fresh
    tpl = ChatTemplate("{% for m in messages %}w{{ 4 if m.role == 'user' else 8 }} "
                       "{{ m.content }} w9 {% endfor %}{% if add_generation_prompt %}w8"
                       "{% endif %}", "test")
    conv = Conversation(model, tpl)
    first = conv.say("w50 w51", max_tokens=3)
    next(first, None)
    two = "".join(conv.say("w60", max_tokens=3))
    with pytest.raises(RuntimeError, match="another generation"):
        list(first)
    assert [m["content"] for m in conv.messages] == ["w60", two]
    # says made ahead and consumed in order are successive turns (each answers the
    # conversation as it stands when it starts)
    conv.reset()
    a, b = conv.say("w50 w51", max_tokens=3), conv.say("w60", max_tokens=3)
    ta, tb = "".join(a), "".join(b)
    assert [m["content"] for m in conv.messages] == ["w50 w51", ta, "w60", tb]
