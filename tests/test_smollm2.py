"""The embedded real model (SmolLM2-135M-Instruct, Q4_1 GGUF) against transformers reading the
same GGUF: greedy tokens identical, perplexity on real English text within 0.5%. Twice: converted
to float32 (the GGUF dequantized), and with its Q4_1 blocks kept (--dtype q4_1: FFN records and
attention in Q4_1, embeddings in Q8_0, bit for bit: the model llama.cpp runs)."""
from __future__ import annotations

import numpy as np
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


@pytest.fixture(scope="module", params=["float32", "q4_1"])
def ours(request, gguf, tmp_path_factory):
    d = tmp_path_factory.mktemp("smol") / f"smollm2-{request.param}"
    return fi.load(fi.convert(gguf, d, dtype=request.param, progress=False))


@pytest.fixture(scope="module")
def greedy_ref(hf_model, gguf):
    import torch
    import transformers as tr

    ids = tr.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)(
        "The capital of France is")["input_ids"]
    with torch.no_grad():
        out = hf_model.generate(torch.tensor([ids]), max_new_tokens=N_GREEDY, do_sample=False,
                                eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
    return ids, out


@pytest.fixture(scope="module")
def wiki_ppl(hf_model, gguf):
    """(token ids of the Wikipedia excerpt, transformers' perplexity on them)."""
    import torch
    import transformers as tr

    from flashinfer_py.corpora import CorpusError, wikipedia_excerpt
    from flashinfer_py.evaluate import perplexity

    try:
        text = wikipedia_excerpt()
    except CorpusError as e:  # offline, and the gensim wheel not cached: the data is missing
        pytest.skip(f"Wikipedia excerpt unavailable: {e}")
    tok = tr.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    ids = tok(text[:60000])["input_ids"]

    def hf_logits(w):
        with torch.no_grad():
            return hf_model(torch.tensor([w])).logits[0].float().numpy()

    return ids, perplexity(hf_logits, ids, PPL_WINDOW, PPL_WINDOWS)


def test_greedy_generation_identical(ours, greedy_ref):
    ids, ref = greedy_ref
    assert ours.tokenizer.encode("The capital of France is") == ids
    got = [s.token for s in ours.generate_step(ids, max_new_tokens=N_GREEDY, stop_at_eos=False)]
    assert got == ref
    assert "Paris" in ours.tokenizer.decode(got)


def test_tokenizer_matches_transformers(ours, gguf):
    import transformers as tr

    tok = tr.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    text = "Flash memory is large but slow; DRAM is fast — and small. 1234 ünïcode"
    assert ours.tokenizer.encode(text) == tok(text)["input_ids"]


def test_perplexity_on_wikipedia_agrees(ours, wiki_ppl):
    from flashinfer_py.evaluate import perplexity

    ids, ref = wiki_ppl
    got = perplexity(ours.logits, ids, PPL_WINDOW, PPL_WINDOWS)
    assert got.tokens == ref.tokens == PPL_WINDOWS * (PPL_WINDOW - 1)
    assert abs(got.perplexity / ref.perplexity - 1) < 0.005
    assert 5 < got.perplexity < 60  # real text, real model: not garbage


def test_q4_1_directory_is_the_gguf_bit_for_bit(ours, gguf):
    """--dtype q4_1 keeps every quantized tensor's blocks: FFN up/gate rows are the GGUF's
    bytes, down columns its values (codes in the records, the scales resident), attention and
    embeddings its blocks; 3456 bytes of float16 a neuron become 1008 (one 4 KiB read)."""
    if ours.dtype != "q4_1":
        pytest.skip("the float32 directory dequantizes")
    import gguf as gg

    from flashinfer_py.dtypes import codes_to_float32

    man = ours.manifest
    assert man["conversion"] == {"kept_bit_for_bit": {"Q4_1": 210, "Q8_0": 1}, "requantized": {}}
    assert man["bundle"]["part_bytes"] == [360, 360, 288] and man["bundle"]["down_layout"] == "codes"
    assert set(ours.resident_formats.values()) == {"q4_1", "q8_0"}
    t = {x.name: x for x in gg.GGUFReader(gguf).tensors}
    w = ours.transformer.w
    tr = ours.transformer  # weight(): the stored blocks, even where the model interleaves them
    assert np.array_equal(tr.weight("tok_embeddings"), np.asarray(t["token_embd.weight"].data))
    assert np.array_equal(tr.weight("layers.7.wv"), np.asarray(t["blk.7.attn_v.weight"].data))
    for layer in (0, 29):
        rows = ours.ffn.rows_by_layer[layer]
        assert np.array_equal(rows[:, :360], np.asarray(t[f"blk.{layer}.ffn_up.weight"].data))
        assert np.array_equal(rows[:, 360:720], np.asarray(t[f"blk.{layer}.ffn_gate.weight"].data))
        down = gg.quants.dequantize(np.asarray(t[f"blk.{layer}.ffn_down.weight"].data),
                                    gg.GGMLQuantizationType.Q4_1)
        got = codes_to_float32(rows[:, 720:1008], "q4_1", 576,
                               w[f"layers.{layer}.ffn_down_scales"], np.arange(1536))
        assert np.array_equal(got, down.T)


def test_a_tokenizer_without_bos_gets_plain_windows(ours):
    from flashinfer_py.evaluate import bos_id, windows_of

    assert bos_id(ours) is None  # SmolLM2's tokenizer adds none
    ids = list(range(100, 140))
    assert windows_of(ids, 16, bos=bos_id(ours)) == [ids[:16], ids[16:32]]
