"""SlidingWindow: exact (to_load, to_evict) over scripted sequences, and a randomized check
against a plain set-based reference."""
import numpy as np
import pytest

from flashinfer_py.window import SlidingWindow


def test_scripted_sequence_with_wraparound():
    w = SlidingWindow(n_layers=2, d_ff=10, k=2)
    steps = [
        ([1, 2, 3], [1, 2, 3], []),      # warm-up: everything is new
        ([2, 3, 4], [4], []),            # window not full yet: nothing leaves
        ([3, 5], [5], [1]),              # token 1 leaves: 1 was only there; 2 still in token 2
        ([9], [9], [2, 4]),              # token 2 leaves
        ([9], [], [3, 5]),               # same set twice: nothing to load
        ([], [], []),                    # an empty set keeps the previous token's neurons
        ([], [], [9]),
    ]
    for active, load, evict in steps:
        got_load, got_evict = w.update(0, active)
        assert got_load.tolist() == load and got_evict.tolist() == evict
    assert w.size(0) == 0 and w.state(1).size == 0  # layer 1 untouched


def test_duplicates_and_range():
    w = SlidingWindow(1, 8, 3)
    load, _ = w.update(0, [5, 5, 1])
    assert load.tolist() == [1, 5]
    with pytest.raises(ValueError, match=r"\[0, 8\)"):
        w.update(0, [8])


@pytest.mark.parametrize("k", [1, 2, 5])
def test_random_against_set_reference(k):
    rng = np.random.default_rng(7)
    d_ff = 97
    w = SlidingWindow(1, d_ff, k)
    history = []
    for _ in range(200):
        active = set(rng.choice(d_ff, size=rng.integers(0, 30), replace=False).tolist())
        before = set().union(*history[-k:]) if history else set()
        history.append(active)
        after = set().union(*history[-k:])
        load, evict = w.update(0, sorted(active))
        assert set(load.tolist()) == after - before
        assert set(evict.tolist()) == before - after
        assert set(w.state(0).tolist()) == after and w.size(0) == len(after)


def test_k_must_be_positive():
    with pytest.raises(ValueError):
        SlidingWindow(1, 4, 0)
