"""Would a least-squares scale per block make q8_0 cheaper on SmolLM2? (RESULTS section 12)

    python benchmarks/q8_scale_search.py      # ~1 min, numpy only

The q8_0 quantizer (llama.cpp's reference) sets each block's scale to max|x| / 127. This
measures the relative RMS error of SmolLM2-135M's FFN weights (5 layers: up, gate, down) under
that rule and under the best of a grid of candidate scales per block (f x max/127, stored as
fp16 as the format does, codes clamped to +-127), for several grids.
"""
from __future__ import annotations

import numpy as np

GRIDS = [(0.80, 1.0, 11), (0.70, 1.0, 16), (0.70, 1.02, 33), (0.60, 1.0, 41), (0.50, 1.0, 51),
         (0.90, 1.02, 25), (0.70, 1.05, 141)]


def main() -> None:
    import flashinfer_py as fi
    from flashinfer_py.default_model import default_model_dir

    m = fi.load(default_model_dir())
    parts = [np.asarray(m.ffn.part_f32(layer, p), np.float32)
             for layer in (0, 7, 15, 22, 29) for p in ("up", "gate", "down")]
    w = np.concatenate([r.reshape(-1, 32) for r in parts])
    amax = np.abs(w).max(1)
    s0 = amax / 127
    s0[s0 == 0] = 1
    total = float((w.astype(np.float64) ** 2).sum())

    def err(scale: np.ndarray) -> np.ndarray:
        q = np.clip(np.round(w / scale[:, None]), -127, 127)
        return ((q * scale[:, None] - w) ** 2).sum(1)

    fp16 = lambda a: a.astype(np.float16).astype(np.float32)  # noqa: E731
    base = err(fp16(s0))
    print(f"{w.shape[0]} blocks; max/127: relative RMS error {100 * np.sqrt(base.sum() / total):.4f}%")
    print("| candidates (f x max/127) | relative RMS error | vs max/127 |")
    print("|---|---|---|")
    for lo, hi, k in GRIDS:
        best = base.copy()
        for f in np.linspace(lo, hi, k):
            np.minimum(best, err(fp16(s0 * f)), out=best)
        r = np.sqrt(best.sum() / total)
        print(f"| {k} from {lo} to {hi} | {100 * r:.4f}% | {r / np.sqrt(base.sum() / total) - 1:+.1%} |")


if __name__ == "__main__":
    main()
