"""Files from strangers (a downloaded checkpoint, a converted directory someone shared): what
they hold is checked before it is used, so a malformed or hostile file gives an error that
names it, never a hang, an exhausted memory, a bare traceback or a silently wrong model."""
from __future__ import annotations

import json
import os
import shutil
import signal
import zipfile

import numpy as np
import pytest

import flashinfer_py as fi
from flashinfer_py.checkpoint import MAX_JSON_BYTES, CheckpointError, open_checkpoint
from flashinfer_py.errors import FlashFormatError
from flashinfer_py.predictor import PREDICTORS_FILE, LayerPredictor, Predictors


@pytest.fixture
def deadline():
    """Fail (instead of hanging the suite) if the code under test blocks on a FIFO."""
    def boom(*_):
        raise TimeoutError("blocked: the file was opened instead of refused")
    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def _hf_copy(tiny_hf, tmp_path, name="llama-silu"):
    _, src = tiny_hf(name)
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return dst


# ---- special files in a checkpoint directory --------------------------------------------------

def test_fifo_config_is_refused_not_read(tmp_path, deadline):
    os.mkfifo(tmp_path / "config.json")
    with pytest.raises(CheckpointError, match=r"config\.json: is a FIFO, not the config\.json"):
        open_checkpoint(tmp_path)


def test_config_linked_to_a_device_is_refused(tmp_path):
    os.symlink("/dev/zero", tmp_path / "config.json")
    with pytest.raises(CheckpointError, match="is a device"):
        open_checkpoint(tmp_path)


def test_huge_config_is_refused_before_reading(tmp_path):
    with open(tmp_path / "config.json", "wb") as f:
        f.truncate(MAX_JSON_BYTES + 1)  # sparse: no disk used
    with pytest.raises(CheckpointError, match="more than any config.json"):
        open_checkpoint(tmp_path)


def test_fifo_shard_and_tokenizer_are_refused(tiny_hf, tmp_path, deadline):
    d = _hf_copy(tiny_hf, tmp_path)
    shard = next(d.glob("*.safetensors"))
    shard.unlink()
    os.mkfifo(shard)
    with pytest.raises(CheckpointError, match="is a FIFO, not the safetensors file"):
        fi.convert(d, tmp_path / "out.flash")
    d2 = _hf_copy(tiny_hf, tmp_path / "b")
    (d2 / "tokenizer.json").unlink(missing_ok=True)
    os.symlink("/dev/zero", d2 / "tokenizer.json")
    with pytest.raises(CheckpointError, match="tokenizer.json: is a device"):
        fi.convert(d2, tmp_path / "out2.flash")
    assert not (tmp_path / "out.flash").exists() and not (tmp_path / "out2.flash").exists()


@pytest.mark.parametrize("text,what", [
    ("[" * 100_000 + "]" * 100_000, "RecursionError"),   # nested past the parser's stack
    ('{"vocab_size": ' + "9" * 5000 + "}", "ValueError"),  # past Python's 4300-digit limit
])
def test_pathological_json_is_named(tmp_path, text, what):
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(CheckpointError, match=rf"config\.json: is not valid JSON \({what}"):
        open_checkpoint(tmp_path)


# ---- absurd model configurations ----------------------------------------------------------------

@pytest.mark.parametrize("edit,match", [
    (lambda c: c.pop("vocab_size"), "KeyError: 'vocab_size'"),
    (lambda c: c.update(num_attention_heads=0), "num_attention_heads must be a positive"),
    (lambda c: c.update(num_hidden_layers=-1), "num_hidden_layers must be a positive"),
])
def test_damaged_config_names_config_json(tiny_hf, tmp_path, edit, match):
    d = _hf_copy(tiny_hf, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    edit(cfg)
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=rf"config\.json: the model configuration is "
                                              rf"incomplete or damaged .*{match}"):
        fi.convert(d, tmp_path / "out.flash")


def _gguf_with_heads(path, heads, kv_heads):
    gguf = pytest.importorskip("gguf")
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_embedding_length(8)
    w.add_feed_forward_length(12)
    w.add_head_count(heads)
    if kv_heads is not None:
        w.add_head_count_kv(kv_heads)
    w.add_tensor("token_embd.weight", np.ones((11, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("heads,kv,match", [
    (2, 0, "0 key-value heads"),         # was: k rows left permuted, a wrong model, no error
    (2, 3, "3 key-value heads"),
    (0, None, "head_count' = 0, which must be positive"),  # was: ZeroDivisionError
])
def test_gguf_head_counts_checked(tmp_path, heads, kv, match):
    _gguf_with_heads(tmp_path / "g.gguf", heads, kv)
    with pytest.raises(CheckpointError, match=match):
        open_checkpoint(tmp_path / "g.gguf")


# ---- a converted directory that does not match itself -------------------------------------------

def _flash_copy(tiny_flash, tmp_path, name="llama-silu"):
    d = tmp_path / "m.flash"
    shutil.copytree(tiny_flash(name), d)
    return d


def _edit_manifest(d, fn):
    m = json.loads((d / "manifest.json").read_text())
    fn(m)
    (d / "manifest.json").write_text(json.dumps(m))


def test_manifest_gated_but_records_ungated_is_refused(tiny_flash, tmp_path):
    d = _flash_copy(tiny_flash, tmp_path, "opt")  # (up, down) records
    _edit_manifest(d, lambda m: m["model"].update(gated=True))
    with pytest.raises(FlashFormatError, match=r"parts \['up', 'gate', 'down'\] \(the file: "
                                               r"\['up', 'down'\]\)"):
        fi.load(d)


def test_manifest_record_format_must_match_the_file(tiny_flash, tmp_path):
    d = _flash_copy(tiny_flash, tmp_path)
    _edit_manifest(d, lambda m: m.update(dtype="float16"))  # the records are float32
    with pytest.raises(FlashFormatError, match="dtype 'float16' \\(the file: 'float32'\\)"):
        fi.load(d)


def test_vocab_larger_than_the_embedding_is_refused(tiny_flash, tmp_path):
    d = _flash_copy(tiny_flash, tmp_path)
    _edit_manifest(d, lambda m: m["model"].update(vocab_size=m["model"]["vocab_size"] + 7))
    with pytest.raises(FlashFormatError, match="vocab_size .* disagrees with tok_embeddings"):
        fi.load(d)


# ---- predictors.npz ------------------------------------------------------------------------------

def test_compressed_predictor_members_are_refused(tmp_path):
    """np.savez stores its members; a deflated one's declared size is only its writer's word
    (a zip bomb declares gigabytes), so only stored members are read."""
    rng = np.random.default_rng(0)
    p = Predictors([LayerPredictor(rng.standard_normal((8, 2)).astype(np.float32),
                                   rng.standard_normal((2, 12)).astype(np.float32),
                                   np.zeros(12, np.float32))], "magnitude", [0.1], "ab" * 32)
    path = p.save(tmp_path)
    manifest = {"model": {"hidden_size": 8, "intermediate_size": 12, "num_hidden_layers": 1},
                "files": {"bundles": "b"}, "checksums": {"b": {"sha256": "ab" * 32}}}
    assert Predictors.load(tmp_path, manifest) is not None
    with zipfile.ZipFile(path) as z:
        members = {n: z.read(n) for n in z.namelist()}
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for n, b in members.items():
            z.writestr(n, b)
    with pytest.raises(FlashFormatError, match="compressed or inconsistent zip member"):
        Predictors.load(tmp_path, manifest)
    assert path.name == PREDICTORS_FILE
