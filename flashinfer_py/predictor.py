"""What `train-predictors` produces, stored as ``predictors.npz``: the paper's low-rank
activation predictors (Section 3.1), and the calibration that sparse inference under a budget
uses with the 4-bit sketch (sketch.py): which neurons are hot (the cache's first fill), how the
FFN output error falls with the number of neurons kept, per layer (per-layer cache sizes), and
the norm of every down column.

Per layer: ``score = (x @ A) @ B + b`` with A [d, r], B [r, d_ff]; neuron j is predicted active
when ``sigmoid(score_j) > threshold`` (0.5 in the paper). x is the FFN's input: the layer's
attention output after the FFN norm. Inference needs only numpy; training (train.py) uses torch.

What "active" means is stored with the predictors (``label``):
- ``"nonzero"``: ReLU / FATReLU models, the neuron's activation is not zero.
- ``"magnitude"``: gated non-ReLU models (SwiGLU, GeGLU): ``|act(gate.x) * up.x| > t_l``, with
  the per-layer threshold t_l calibrated to a target sparsity (CATS/TEAL-style).
"""
from __future__ import annotations

import json
import os
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from .errors import FlashFormatError

PREDICTORS_FILE = "predictors.npz"
PREDICTOR_FORMAT = 2  # 1: low-rank only (still read)


@dataclass
class LayerPredictor:
    """One layer's predictor: score = (x @ A) @ B + b."""

    A: np.ndarray  # [d, r] float32
    B: np.ndarray  # [r, d_ff] float32
    b: np.ndarray  # [d_ff] float32

    @property
    def rank(self) -> int:
        return self.A.shape[1]

    def scores(self, x: np.ndarray) -> np.ndarray:
        """Logits [T, d_ff] for inputs x [T, d]."""
        return (np.atleast_2d(x) @ self.A) @ self.B + self.b

    def predict(self, x: np.ndarray, threshold: float = 0.5, max_active: Optional[int] = None) -> np.ndarray:
        """Sorted int32 ids predicted active for any of the rows of x.

        Args:
            threshold: probability above which a neuron counts as active.
            max_active: keep at most this many (the highest-scoring) neurons.
        """
        return self.predict_scored(x, threshold, max_active)[0].astype(np.int32)

    def predict_scored(self, x: np.ndarray, threshold: float = 0.5,
                       max_active: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
        """`predict`'s ids (sorted, int64) and every neuron's logit [d_ff] (its max over the
        rows of x), for a caller that ranks them by confidence."""
        s = self.scores(x).max(axis=0)  # a neuron is needed if any token needs it
        logit_t = np.log(threshold / (1.0 - threshold))
        ids = np.flatnonzero(s > logit_t)
        if max_active is not None and ids.size > max_active:
            ids = ids[np.argpartition(-s[ids], max_active - 1)[:max_active]]
            ids.sort()
        return ids, s

    @property
    def nbytes(self) -> int:
        return self.A.nbytes + self.B.nbytes + self.b.nbytes


@dataclass
class Calibration:
    """Statistics of the dense model on calibration text, per layer and neuron.

    Contribution of neuron j to a token: |h_j| * ||down_j|| (h its activation).
    """

    hot: np.ndarray        # [L, d_ff] mean contribution: the cache is first filled hottest first
    err_k: np.ndarray      # [K] neuron counts, 0..d_ff, increasing
    err: np.ndarray        # [L, K] FFN output error when each token keeps its err_k[i] largest
                           # contributions, relative to the residual stream's norm (mean)
    down_norm: np.ndarray  # [L, d_ff] ||down_j||
    up_mean: Optional[np.ndarray] = None  # [L, d_ff] mean |up_j . x| (gated FFNs; the gate
                                          # sketch's scale); None in files that predate it

    def arrays(self) -> dict:
        out = {"cal_hot": self.hot, "cal_err_k": self.err_k, "cal_err": self.err,
               "cal_down_norm": self.down_norm}
        if self.up_mean is not None:
            out["cal_up_mean"] = self.up_mean
        return out


@dataclass
class Predictors:
    """All layers' predictors plus what they were trained for."""

    layers: list[LayerPredictor]        # low-rank predictors (empty: none trained)
    label: str                          # "nonzero" | "magnitude"
    act_thresholds: list[float]         # t_l for "magnitude" labels (0 for "nonzero")
    weights_sha256: str                 # sha256 of the bundle file they were trained on
    meta: dict = field(default_factory=dict)  # training report: recall/precision per layer, text, ...
    calibration: Optional[Calibration] = None
    sketch: Optional[dict] = None       # the 4-bit sketch file: {"file", "bits", "record_bytes",
                                        # "sha256"} (sketch.py)

    @property
    def nbytes(self) -> int:
        """DRAM of the low-rank predictors."""
        return sum(p.nbytes for p in self.layers)

    @property
    def kinds(self) -> list[str]:
        """What is here: "lowrank" (the paper's predictors), "sketch" (4-bit sketch + calibration)."""
        return (["lowrank"] if self.layers else []) + (
            ["sketch"] if self.sketch is not None and self.calibration is not None else [])

    def save(self, directory) -> Path:
        path = Path(directory) / PREDICTORS_FILE
        arrays = {}
        for i, p in enumerate(self.layers):
            arrays[f"A{i}"], arrays[f"B{i}"], arrays[f"b{i}"] = p.A, p.B, p.b
        if self.calibration is not None:
            arrays.update(self.calibration.arrays())
        header = {"format": PREDICTOR_FORMAT, "label": self.label, "n_layers": len(self.layers),
                  "act_thresholds": self.act_thresholds, "weights_sha256": self.weights_sha256,
                  "meta": self.meta, "sketch": self.sketch}
        arrays["header"] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
        tmp = path.with_name(path.name + ".tmp.npz")
        with open(tmp, "wb") as f:  # complete on disk before it replaces the previous file
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, directory, manifest: dict) -> "Predictors":
        """Load and check against the model: shapes, and the weights they were trained on."""
        path = Path(directory) / PREDICTORS_FILE
        if not path.is_file():
            raise FlashFormatError(
                f"{path}: no predictors. Train them with `flashinfer-py train-predictors "
                f"{directory} --text FILE` (or use --selection oracle/all).")
        try:
            with np.load(path, allow_pickle=False) as z:
                _check_sizes(z)
                header = json.loads(bytes(z["header"]).decode())
                if header.get("format") not in (1, PREDICTOR_FORMAT):
                    raise ValueError(f"format {header.get('format')!r}, this version reads "
                                     f"1 and {PREDICTOR_FORMAT}")
                n = int(header["n_layers"])
                layers = [LayerPredictor(z[f"A{i}"].astype(np.float32), z[f"B{i}"].astype(np.float32),
                                         z[f"b{i}"].astype(np.float32)) for i in range(n)]
                cal = None
                if "cal_hot" in z.files:
                    cal = Calibration(*(z[k].astype(np.float32 if k != "cal_err_k" else np.int64)
                                        for k in ("cal_hot", "cal_err_k", "cal_err",
                                                  "cal_down_norm")))
                    if "cal_up_mean" in z.files:
                        cal.up_mean = z["cal_up_mean"].astype(np.float32)
            label, thresholds = str(header["label"]), [float(t) for t in header["act_thresholds"]]
            meta, sketch = dict(header.get("meta") or {}), header.get("sketch")
            if sketch is not None and not isinstance(sketch, dict):
                raise ValueError("header.sketch is not an object")
        # what a damaged zip, npy or JSON header raises (the fuzzer found each of these)
        except (KeyError, ValueError, TypeError, AttributeError, IndexError, OSError, EOFError,
                NotImplementedError, RuntimeError, zipfile.BadZipFile, zlib.error,
                json.JSONDecodeError, UnicodeDecodeError) as e:  # RuntimeError: "encrypted"
            raise FlashFormatError(f"{path}: unreadable predictor file ({type(e).__name__}: "
                                   f"{e}); retrain with `flashinfer-py train-predictors`.") from None
        m = manifest["model"]
        d, f, L = m["hidden_size"], m["intermediate_size"], m["num_hidden_layers"]
        if (n not in (0, L) or any(p.A.ndim != 2 or p.B.ndim != 2 or p.A.shape[0] != d
                                   or p.B.shape[1] != f or p.A.shape[1] != p.B.shape[0]
                                   or p.b.shape != (f,) for p in layers)
                or (cal is not None and not _calibration_fits(cal, L, f))):
            raise FlashFormatError(f"{path}: predictor shapes do not match this model "
                                   f"({L} layers, d={d}, d_ff={f}); retrain them.")
        want = manifest["checksums"][manifest["files"]["bundles"]]["sha256"]
        if header.get("weights_sha256") != want:
            raise FlashFormatError(
                f"{path}: these predictors were trained on other weights (the FFN bundle checksum "
                f"differs): stale after a fine-tune or re-conversion. Retrain with "
                f"`flashinfer-py train-predictors {directory} --text FILE`.")
        return cls(layers, label, thresholds, header["weights_sha256"], meta, cal, sketch)


def _check_sizes(z) -> None:
    """Every array's declared size fits its zip member: numpy allocates an array before it
    reads it, so a damaged header must not make it allocate terabytes."""
    for name in z.files:
        info = z.zip.getinfo(name + ".npy")
        # np.savez stores its members: then the declared size is the bytes on disk. A
        # compressed member's declared size is whatever its writer said (a zip bomb's is huge).
        if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size:
            raise ValueError(f"{name}: compressed or inconsistent zip member (this project "
                             "writes them stored)")
        with z.zip.open(info) as f:
            fmt = np.lib.format
            read = fmt.read_array_header_1_0 if fmt.read_magic(f) == (1, 0) else \
                fmt.read_array_header_2_0
            shape, _, dtype = read(f)
        if dtype.hasobject or int(np.prod(shape, dtype=object)) * dtype.itemsize > info.file_size:
            raise ValueError(f"{name}: shape {shape} of {dtype} does not fit its "
                             f"{info.file_size} bytes")


def _calibration_fits(cal: Calibration, L: int, f: int) -> bool:
    k = cal.err_k
    return (k.ndim == 1 and k.size >= 2 and cal.hot.shape == (L, f) and cal.down_norm.shape == (L, f) and k.ndim == 1
            and cal.err.shape == (L, k.size) and k.size >= 2 and k[0] == 0 and k[-1] == f
            and bool((np.diff(k) > 0).all()) and bool(np.isfinite(cal.err).all())
            and bool(np.isfinite(cal.down_norm).all()) and bool((cal.down_norm >= 0).all())
            and (cal.up_mean is None or (cal.up_mean.shape == (L, f)
                                         and bool(np.isfinite(cal.up_mean).all())
                                         and bool((cal.up_mean >= 0).all()))))
