"""Low-rank activation predictors: what threshold and max_active mean, the file round trip, and
the errors that tell the user to retrain (wrong shapes, stale weights, unreadable file)."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import flashinfer_py as fi
from flashinfer_py.errors import FlashFormatError
from flashinfer_py.predictor import PREDICTORS_FILE, LayerPredictor, Predictors

D, F, L = 4, 6, 2
SHA = "ab" * 32


def _manifest(d=D, f=F, layers=L, sha=SHA):
    return {"model": {"hidden_size": d, "intermediate_size": f, "num_hidden_layers": layers},
            "files": {"bundles": "ffn_bundles.bin"},
            "checksums": {"ffn_bundles.bin": {"sha256": sha}}}


def _planted(scores_per_unit_x):
    """A predictor whose score for x = e_0 is `scores_per_unit_x` (A = e_0 column, B = scores)."""
    A = np.zeros((D, 1), np.float32)
    A[0, 0] = 1.0
    B = np.asarray(scores_per_unit_x, np.float32)[None, :]
    return LayerPredictor(A, B, np.zeros(F, np.float32))


def test_threshold_is_a_probability():
    p = _planted([-3.0, -0.5, 0.0, 0.5, 1.0, 3.0])  # sigmoid: .05 .38 .5 .62 .73 .95
    x = np.eye(D, dtype=np.float32)[0]
    assert p.predict(x, 0.5).tolist() == [3, 4, 5]  # strictly above
    assert p.predict(x, 0.3).tolist() == [1, 2, 3, 4, 5]
    assert p.predict(x, 0.9).tolist() == [5]
    assert p.predict(x, 0.99).tolist() == []
    assert p.predict(x).dtype == np.int32


def test_max_active_keeps_the_highest_scores_sorted():
    p = _planted([2.0, -1.0, 5.0, 0.5, 4.0, 3.0])
    x = np.eye(D, dtype=np.float32)[0]
    assert p.predict(x, 0.5, max_active=2).tolist() == [2, 4]
    assert p.predict(x, 0.5, max_active=3).tolist() == [2, 4, 5]
    assert p.predict(x, 0.5, max_active=100).tolist() == [0, 2, 3, 4, 5]


def test_several_tokens_need_the_union():
    p = _planted([2.0, -2.0, -2.0, 0.0, 0.0, 0.0])
    x = np.zeros((2, D), np.float32)
    x[0, 0], x[1, 0] = 1.0, -1.0  # token 0 wants neuron 0, token 1 wants neurons 1 and 2
    assert p.predict(x, 0.5).tolist() == [0, 1, 2]


def _random_predictors(rng, d=D, f=F, layers=L, sha=SHA, ranks=(2, 3)):
    ps = [LayerPredictor(rng.standard_normal((d, r)).astype(np.float32),
                         rng.standard_normal((r, f)).astype(np.float32),
                         rng.standard_normal(f).astype(np.float32)) for r in ranks[:layers]]
    return Predictors(ps, "magnitude", [0.1, 0.2][:layers], sha,
                      meta={"report": [{"layer": 0, "recall": 0.9}], "tokens": 7})


def test_save_load_round_trip(tmp_path):
    preds = _random_predictors(np.random.default_rng(0))
    path = preds.save(tmp_path)
    assert path.name == PREDICTORS_FILE and not list(tmp_path.glob("*.tmp*"))
    got = Predictors.load(tmp_path, _manifest())
    assert got.label == "magnitude" and got.act_thresholds == [0.1, 0.2]
    assert got.weights_sha256 == SHA and got.meta == preds.meta
    assert got.nbytes == preds.nbytes
    for a, b in zip(got.layers, preds.layers):
        for name in ("A", "B", "b"):
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    x = np.random.default_rng(1).standard_normal((3, D)).astype(np.float32)
    assert got.layers[1].predict(x, 0.4).tolist() == preds.layers[1].predict(x, 0.4).tolist()


@pytest.mark.parametrize("change", [dict(d=D + 1), dict(f=F + 1), dict(layers=L + 1)])
def test_shape_mismatch_says_retrain(tmp_path, change):
    _random_predictors(np.random.default_rng(0)).save(tmp_path)
    with pytest.raises(FlashFormatError, match="do not match this model.*retrain"):
        Predictors.load(tmp_path, _manifest(**change))


def test_stale_weights_say_retrain(tmp_path):
    _random_predictors(np.random.default_rng(0)).save(tmp_path)
    with pytest.raises(FlashFormatError, match="other weights.*Retrain.*train-predictors"):
        Predictors.load(tmp_path, _manifest(sha="cd" * 32))


def test_unreadable_file_says_retrain(tmp_path):
    (tmp_path / PREDICTORS_FILE).write_bytes(b"not a zip file")
    with pytest.raises(FlashFormatError, match="unreadable.*retrain"):
        Predictors.load(tmp_path, _manifest())


def test_stale_predictors_refused_by_load(tiny_flash, tmp_path):
    """Predictors made for one model's weights, then the bundle file's checksum changes (as a
    re-conversion or fine-tune would): loading sparse refuses them and says to retrain."""
    src = tiny_flash("llama-relu")
    d = tmp_path / "copy.flash"
    shutil.copytree(src, d)
    m = fi.load(d)
    a = m.args
    rng = np.random.default_rng(0)
    sha = m.manifest["checksums"][m.manifest["files"]["bundles"]]["sha256"]
    _random_predictors(rng, a.hidden_size, a.intermediate_size, a.num_hidden_layers, sha,
                       ranks=[4] * a.num_hidden_layers).save(d)
    assert fi.load(d, sparse=True, selection="predictor").predictors is not None
    man = json.loads((d / "manifest.json").read_text())
    man["checksums"][man["files"]["bundles"]]["sha256"] = "0" * 64
    (d / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(FlashFormatError, match="Retrain"):
        fi.load(d, sparse=True, selection="predictor")
