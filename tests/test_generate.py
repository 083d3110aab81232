"""Generation: greedy decoding equals transformers' greedy decoding; sampling is well-formed."""
from __future__ import annotations

import numpy as np
import pytest

import flashinfer_py as fi
from flashinfer_py.sampling import make_sampler


def test_greedy_tokens_match_transformers(tiny_hf, tiny_flash, prompt_ids):
    import torch

    ref_model, _ = tiny_hf("llama-silu")
    with torch.no_grad():
        ref = ref_model.generate(torch.tensor([prompt_ids]), max_new_tokens=16, do_sample=False,
                                 eos_token_id=None, pad_token_id=0)[0, len(prompt_ids):].tolist()
    model = fi.load(tiny_flash("llama-silu"))
    ours = [s.token for s in model.generate_step(prompt_ids, max_new_tokens=16, stop_at_eos=False)]
    assert ours == ref


def test_step_results_are_populated(tiny_flash):
    model = fi.load(tiny_flash("opt"))
    steps = list(model.generate_step("w5 w6 w7 w8", max_new_tokens=5, stop_at_eos=False))
    assert len(steps) == 5
    for s in steps:
        assert 0 <= s.token < 503
        assert s.logprob <= 0.0
        assert s.seconds > 0
        assert s.prompt_tokens == 4
    # the word-level tokenizer decodes id i as "w{i}": the streamed pieces spell the tokens
    words = [f"w{s.token}" for s in steps if s.token > 3]
    assert "".join(s.text for s in steps).split() == words


def test_generate_streams_text(tiny_flash):
    model = fi.load(tiny_flash("llama-silu"))
    pieces = list(model.generate("w10 w11 w12", max_new_tokens=6, temperature=0.8, seed=3))
    assert pieces and all(isinstance(p, str) for p in pieces)
    again = list(model.generate("w10 w11 w12", max_new_tokens=6, temperature=0.8, seed=3))
    assert pieces == again  # the seed makes sampling reproducible


def test_sampler_semantics():
    logits = np.array([0.0, 3.0, 1.0, 2.5], dtype=np.float32)
    assert make_sampler()(logits) == 1
    assert make_sampler(temperature=1.0, top_k=1, seed=0)(logits) == 1
    assert make_sampler(temperature=1.0, top_p=1e-6, seed=0)(logits) == 1
    draws = {make_sampler(temperature=1.0, top_k=2, seed=s)(logits) for s in range(50)}
    assert draws == {1, 3}
    with pytest.raises(ValueError, match="top_p"):
        make_sampler(temperature=1.0, top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        make_sampler(temperature=-1.0)


def test_top_p_is_the_nucleus_of_what_top_k_kept():
    """transformers, vLLM and llama.cpp renormalise after top-k: with k = 2 of probabilities
    (0.3, 0.2, ...) the kept pair is (0.6, 0.4) and top_p = 0.5 keeps the first alone (over
    the whole vocabulary, 0.3 < 0.5 kept both)."""
    p = np.array([0.3, 0.2] + [0.5 / 8] * 8)
    logits = np.log(p).astype(np.float32)
    assert {make_sampler(1.0, top_k=2, top_p=0.5, seed=s)(logits) for s in range(40)} == {0}
    assert {make_sampler(1.0, top_k=2, top_p=0.7, seed=s)(logits) for s in range(40)} == {0, 1}


@pytest.mark.parametrize("kw,match", [
    (dict(temperature=float("nan")), "temperature"), (dict(temperature=float("inf")), "temperature"),
    (dict(temperature=True), "temperature"), (dict(top_k=40.0), "top_k"), (dict(top_k=-1), "top_k"),
    (dict(top_p=float("nan")), "top_p"), (dict(seed=-1), "seed"), (dict(seed=1.5), "seed"),
    (dict(max_new_tokens=2.5), "max_new_tokens"), (dict(max_new_tokens=-1), "max_new_tokens")])
def test_bad_settings_are_refused_when_called_before_the_prompt_runs(tiny_flash, kw, match):
    model = fi.load(tiny_flash("llama-silu"))
    kw = {"temperature": 0.7, **kw}
    with pytest.raises(ValueError, match=match):
        model.generate_step([5, 6, 7], **kw)  # no next(): the call itself refuses
    if "max_new_tokens" not in kw:
        with pytest.raises(ValueError, match=match):
            make_sampler(**kw)


def test_prompt_plus_tokens_beyond_context_is_refused(tiny_flash):
    model = fi.load(tiny_flash("llama-silu"), max_context=16)
    with pytest.raises(ValueError, match="context limit 16.*raise max_context"):
        model.generate_step(list(range(3, 13)), max_new_tokens=10)
    # where the model's own limit binds, raising max_context cannot help: it says so
    capped = fi.load(tiny_flash("llama-silu"), max_context=10**6)
    n = capped.args.max_position_embeddings
    assert capped.max_context == n
    with pytest.raises(ValueError, match="max_position_embeddings"):
        capped.generate_step([5] * n, max_new_tokens=1)


def test_generate_without_a_tokenizer_says_so(tiny_flash, tmp_path):
    import json
    import shutil

    d = tmp_path / "m"  # as converted from a checkpoint that came without a tokenizer
    shutil.copytree(tiny_flash("llama-silu"), d)
    (d / "tokenizer.json").unlink()
    man = json.loads((d / "manifest.json").read_text())
    del man["checksums"]["tokenizer.json"]
    (d / "manifest.json").write_text(json.dumps(man))
    model = fi.load(d)
    with pytest.raises(fi.FlashFormatError, match="no tokenizer.json"):
        model.generate([5, 6, 7])
    assert len(list(model.generate_step([5, 6, 7], max_new_tokens=3))) >= 1


def _sentencepiece_like(tmp_path, added=()):
    """A tokenizer.json whose decoder is Llama 2's (and Mistral's): "▁" -> " ", fuse, then
    strip one leading space of the text."""
    from tokenizers import AddedToken, Tokenizer as HF, decoders, models, pre_tokenizers

    from flashinfer_py.tokenizer import Tokenizer

    words = ["<unk>", "<s>", "</s>", "▁The", "▁capital", "▁is", "▁Paris", ".", "<0xC3>", "<0xA9>"]
    hf = HF(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.Metaspace()
    hf.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                    decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    if added:
        hf.add_special_tokens([AddedToken(t, special=True) for t in added])
    hf.save(str(tmp_path / "tokenizer.json"))
    return Tokenizer(tmp_path)


def test_streamed_pieces_keep_the_space_a_sentencepiece_decoder_strips(tmp_path):
    from flashinfer_py.tokenizer import StreamingDetokenizer

    tok = _sentencepiece_like(tmp_path)
    prompt = tok.encode("The capital is")
    assert prompt == [3, 4, 5] and tok.decode([6]) == "Paris"  # alone: stripped
    gen = [6, 7, 8, 9, 6]  # " Paris", ".", then "é" in two byte tokens, " Paris"
    d = StreamingDetokenizer(tok, context=prompt)
    pieces = [d.add(t) for t in gen]
    assert pieces == [" Paris", ".", "", "é", " Paris"]  # the first byte held back
    full = tok.decode(prompt + gen)
    assert "".join(pieces) == full[len(tok.decode(prompt)):]
    # a chat prompt ends in special tokens (decoding to nothing): the context skips them
    special = tmp_path / "sp"
    special.mkdir()
    tok2 = _sentencepiece_like(special, added=["<|end|>"])
    end = tok2.token_id("<|end|>")
    d2 = StreamingDetokenizer(tok2, context=prompt + [end] * 5)
    assert d2.add(6) == " Paris"
    # the window stays short: a long generation decodes a few ids a token, not all of them
    for _ in range(1000):
        d.add(6)
    assert d.read - d.prefix == 1
