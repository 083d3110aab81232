"""The embedded real model (SmolLM2-135M-Instruct, Q4_1 GGUF) against transformers reading the
same GGUF: greedy tokens identical, perplexity on real English text within 0.5%."""
from __future__ import annotations

import pytest

import flashinfer_py as fi

pytestmark = pytest.mark.slow

N_GREEDY = 32
PPL_WINDOW, PPL_WINDOWS = 256, 3


@pytest.fixture(scope="module")
def gguf():
    from flashinfer_py.default_model import default_gguf_path

    try:
        return default_gguf_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def hf_model(gguf):
    import transformers as tr

    model = tr.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                    dtype="float32")
    return model.eval()


@pytest.fixture(scope="module")
def ours(gguf, tmp_path_factory):
    d = tmp_path_factory.mktemp("smol") / "smollm2-f32"
    return fi.load(fi.convert(gguf, d, dtype="float32", progress=False))


def test_greedy_generation_identical(ours, hf_model):
    import torch

    ids = ours.tokenizer.encode("The capital of France is")
    with torch.no_grad():
        ref = hf_model.generate(torch.tensor([ids]), max_new_tokens=N_GREEDY, do_sample=False,
                                eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
    got = [s.token for s in ours.generate_step(ids, max_new_tokens=N_GREEDY, stop_at_eos=False)]
    assert got == ref
    assert "Paris" in ours.tokenizer.decode(got)


def test_tokenizer_matches_transformers(ours, gguf):
    import transformers as tr

    tok = tr.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    text = "Flash memory is large but slow; DRAM is fast — and small. 1234 ünïcode"
    assert ours.tokenizer.encode(text) == tok(text)["input_ids"]


def test_perplexity_on_wikipedia_agrees(ours, hf_model):
    import torch

    from flashinfer_py.corpora import wikipedia_excerpt
    from flashinfer_py.evaluate import perplexity

    try:
        text = wikipedia_excerpt()
    except Exception as e:  # offline machine without the gensim wheel cached
        pytest.skip(f"Wikipedia excerpt unavailable: {e}")
    ids = ours.tokenizer.encode(text[:60000])

    def hf_logits(w):
        with torch.no_grad():
            return hf_model(torch.tensor([w])).logits[0].float().numpy()

    ref = perplexity(hf_logits, ids, PPL_WINDOW, PPL_WINDOWS)
    got = perplexity(ours.logits, ids, PPL_WINDOW, PPL_WINDOWS)
    assert got.tokens == ref.tokens == PPL_WINDOWS * (PPL_WINDOW - 1)
    assert abs(got.perplexity / ref.perplexity - 1) < 0.005
    assert 5 < got.perplexity < 60  # real text, real model: not garbage
