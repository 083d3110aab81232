"""The converter and the flash directory: layout, safety, and clear errors on bad input."""
from __future__ import annotations

import json
import os
import shutil
import subprocess

import numpy as np
import pytest

import flashinfer_py as fi
from flashinfer_py.format import BUNDLE_FILE, DENSE_FILE, MANIFEST, read_manifest


def test_manifest_describes_the_files(tiny_flash):
    d = tiny_flash("llama-silu")
    m = read_manifest(d)
    assert m["format_version"] == 2 and m["dtype"] == "float32"
    assert set(m["resident_formats"].values()) == {"float32"} and "wq" not in m["resident_formats"]
    assert "layers.0.wq" in m["resident_formats"] and "layers.0.attn_norm" not in m["resident_formats"]
    assert m["bundle"]["down_layout"] == "blocks" and m["bundle"]["part_bytes"] == [800] * 3
    assert m["bundle"]["parts"] == ["up", "gate", "down"]
    assert m["bundle"]["record_bytes"] % 4096 == 0
    assert m["bundle"]["record_bytes"] >= 3 * 200 * 4
    for name, meta in m["checksums"].items():
        assert (d / name).stat().st_size == meta["bytes"]
        assert len(meta["sha256"]) == 64
    assert "tokenizer.json" in m["checksums"]
    from flashinfer_py.bundles import read_header

    hdr = read_header(str(d / BUNDLE_FILE))
    assert hdr["d_ff"] == 344 and hdr["d_model"] == 200 and hdr["n_layers"] == 3


def test_bundle_records_hold_each_neurons_weights(tiny_hf, tiny_flash):
    """Neuron i of layer l is one record: its up row, gate row and down column."""
    model, _ = tiny_hf("llama-silu")
    d = tiny_flash("llama-silu")
    m = read_manifest(d)
    rec = m["bundle"]["record_bytes"]
    raw = np.fromfile(d / BUNDLE_FILE, dtype=np.uint8)
    mlp = model.model.layers[2].mlp
    for i in (0, 171, 343):
        off = 4096 + (2 * 344 + i) * rec
        r = raw[off:off + 3 * 200 * 4].view(np.float32)
        np.testing.assert_array_equal(r[:200], mlp.up_proj.weight[i].detach().numpy())
        np.testing.assert_array_equal(r[200:400], mlp.gate_proj.weight[i].detach().numpy())
        np.testing.assert_array_equal(r[400:600], mlp.down_proj.weight[:, i].detach().numpy())


def test_resident_file_is_plain_safetensors(tiny_flash):
    from safetensors.numpy import load_file

    t = load_file(str(tiny_flash("opt") / DENSE_FILE))
    assert t["layers.0.wq"].shape == (200, 200)
    assert t["layers.1.ffn_up_bias"].shape == (344,)
    assert t["pos_embeddings"].shape == (258, 200)


def test_refuses_to_overwrite(tiny_hf, tmp_path):
    _, src = tiny_hf("llama-silu")
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "precious.txt").write_text("keep me")
    with pytest.raises(fi.ConvertError, match="already exists.*--force"):
        fi.convert(src, dst, progress=False)
    assert (dst / "precious.txt").read_text() == "keep me"


def test_force_replaces_only_when_complete(tiny_hf, tmp_path):
    _, src = tiny_hf("llama-silu")
    dst = tmp_path / "out"
    fi.convert(src, dst, progress=False)
    before = (dst / MANIFEST).read_text()
    fi.convert(src, dst, dtype="float16", force=True, progress=False)
    assert json.loads((dst / MANIFEST).read_text())["dtype"] == "float16" != json.loads(before)["dtype"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary directory left behind


def test_unsupported_architecture_lists_supported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    from safetensors.numpy import save_file

    save_file({"wte.weight": np.zeros((4, 4), np.float32)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="(?s)gpt2.*Supported.*llama.*opt"):
        fi.convert(tmp_path, tmp_path.parent / "x", progress=False)
    assert not (tmp_path.parent / "x").exists()


def test_unsupported_activation_and_dtype(tiny_hf, tmp_path):
    _, src = tiny_hf("llama-silu")
    with pytest.raises(fi.ConvertError, match="float8"):
        fi.convert(src, tmp_path / "a", dtype="float8", progress=False)
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["hidden_act"] = "mish"
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(fi.UnsupportedModelError, match="mish.*supported"):
        fi.convert(bad, tmp_path / "b", progress=False)


def test_missing_source_is_clear(tmp_path):
    with pytest.raises(ValueError, match=str(tmp_path / "nowhere")):
        fi.convert(tmp_path / "nowhere", tmp_path / "out", progress=False)


def _corrupt_copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_truncated_bundle_file_is_a_format_error(tiny_flash, tmp_path):
    d = _corrupt_copy(tiny_flash("llama-silu"), tmp_path / "t")
    with open(d / BUNDLE_FILE, "r+b") as f:
        f.truncate(os.path.getsize(d / BUNDLE_FILE) - 4096)
    with pytest.raises(fi.FlashFormatError, match=f"{BUNDLE_FILE}.*(truncated|bytes)"):
        fi.load(d)


def test_corrupted_bundle_caught_by_verify(tiny_flash, tmp_path):
    d = _corrupt_copy(tiny_flash("llama-silu"), tmp_path / "c")
    with open(d / BUNDLE_FILE, "r+b") as f:
        f.seek(4096 + 100)
        f.write(b"\x7f\x7f")
    fi.load(d)  # sizes still agree: a plain open does not hash 100s of GB
    with pytest.raises(fi.FlashFormatError, match="sha256 mismatch"):
        fi.load(d, verify=True)


def test_wrong_magic_and_version(tiny_flash, tmp_path):
    d = _corrupt_copy(tiny_flash("llama-silu"), tmp_path / "m")
    with open(d / BUNDLE_FILE, "r+b") as f:
        f.write(b"NOTMAGIC")
    with pytest.raises(fi.FlashFormatError, match="magic"):
        fi.load(d)
    m = json.loads((d / MANIFEST).read_text())
    m["format_version"] = 99
    (d / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(fi.FlashFormatError, match="format_version 99"):
        fi.load(d)


def test_not_a_flash_directory(tmp_path):
    with pytest.raises(fi.FlashFormatError, match="manifest.json.*convert"):
        fi.load(tmp_path)


@pytest.fixture
def tiny_disk(tmp_path):
    """A 1 MiB tmpfs: a real full disk (needs root; skipped where mount is refused)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=False)


def test_full_disk_is_clear_and_leaves_nothing(tiny_hf, tiny_disk):
    _, src = tiny_hf("llama-silu")  # ~3.5 MB of float32: cannot fit in 1 MiB
    with pytest.raises(fi.ConvertError, match="no space left"):
        fi.convert(src, tiny_disk / "out", progress=False)
    assert list(tiny_disk.iterdir()) == []
