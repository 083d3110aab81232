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


def test_capacity_forgets_the_oldest_tokens_first():
    w = SlidingWindow(1, 10, k=3)
    w.update(0, [1, 2], capacity=4)
    w.update(0, [3], capacity=4)
    load, evict = w.update(0, [4, 5], capacity=4)   # union {1..5} > 4: token [1, 2] goes
    assert load.tolist() == [4, 5] and evict.tolist() == [1, 2]
    assert w.state(0).tolist() == [3, 4, 5] and w.size(0) == 3
    with pytest.raises(ValueError, match="raise the DRAM budget"):
        w.update(0, [6, 7, 8, 9], capacity=3)        # the newest set alone does not fit


def test_k_must_be_positive():
    with pytest.raises(ValueError):
        SlidingWindow(1, 4, 0)


# ---- FrequencyPolicy ---------------------------------------------------------------------

from flashinfer_py.window import FrequencyPolicy  # noqa: E402


def test_frequency_keeps_until_full_then_evicts_least_used():
    p = FrequencyPolicy(n_layers=2, d_ff=10, halflife=1e9)  # plain counts
    assert [a.tolist() for a in p.update(0, [1, 2, 3], capacity=4)] == [[1, 2, 3], []]
    assert [a.tolist() for a in p.update(0, [1, 4], capacity=4)] == [[4], []]  # room: nothing goes
    assert [a.tolist() for a in p.update(0, [1, 2], capacity=4)] == [[], []]   # hits
    # full (1,2,3,4 held): 5 needs a row; 3 and 4 were used once, 1 three times, 2 twice;
    # ties go to either, but never to a neuron this token needs
    load, evict = p.update(0, [5, 4], capacity=4)
    assert load.tolist() == [5] and evict.tolist() == [3]
    assert p.state(0).tolist() == [1, 2, 4, 5] and p.size(0) == 4
    assert p.size(1) == 0  # layer 1 untouched


def test_frequency_decay_prefers_recent_use():
    p = FrequencyPolicy(1, 10, halflife=1.0)
    for _ in range(3):
        p.update(0, [1], capacity=2)   # 1: used three times, long ago
    for _ in range(3):
        p.update(0, [2, 3], capacity=3)
    p.update(0, [4], capacity=3)       # full: 1 is now the least used (decayed), 2, 3 recent
    assert p.state(0).tolist() == [2, 3, 4]


def test_frequency_random_invariants():
    rng = np.random.default_rng(3)
    d_ff, cap = 97, 40
    p = FrequencyPolicy(1, d_ff)
    held = set()
    for _ in range(300):
        active = set(rng.choice(d_ff, size=rng.integers(0, 30), replace=False).tolist())
        load, evict = p.update(0, sorted(active), capacity=cap)
        assert set(load.tolist()) == active - held           # reads only what is missing
        assert not (set(evict.tolist()) & active)            # never drops what is needed now
        assert set(evict.tolist()) <= held
        held = (held - set(evict.tolist())) | set(load.tolist())
        assert len(held) <= cap and set(p.state(0).tolist()) == held
        assert active <= held


def test_frequency_reads_fewer_than_window_when_some_neurons_are_hot():
    """A Zipf-popular workload at the same capacity as the window's peak: the frequency policy
    reads fewer neurons (the reason it exists)."""
    rng = np.random.default_rng(0)
    d_ff, k, n = 2000, 4, 60
    pop = 1.0 / np.arange(1, d_ff + 1) ** 1.1
    pop /= pop.sum()
    sets = [np.unique(rng.choice(d_ff, 150, p=pop)) for _ in range(n)]
    w = SlidingWindow(1, d_ff, k)
    window_reads, peak = 0, 0
    for s in sets:
        window_reads += w.update(0, s)[0].size
        peak = max(peak, w.size(0))
    f = FrequencyPolicy(1, d_ff)
    freq_reads = sum(f.update(0, s, capacity=peak)[0].size for s in sets)
    assert freq_reads < 0.9 * window_reads


def test_frequency_refuses_a_set_larger_than_the_cache():
    with pytest.raises(ValueError, match="exceed"):
        FrequencyPolicy(1, 10).update(0, [1, 2, 3], capacity=2)


def test_window_keeps_its_own_copy_of_the_ids():
    w = SlidingWindow(1, 10, 2)
    ids = np.array([1, 2, 3], dtype=np.int64)  # already sorted: no np.unique on this path
    w.update(0, ids)
    ids[:] = [7, 8, 9]                          # the caller reuses its buffer
    assert w.state(0).tolist() == [1, 2, 3]
    assert w.update(0, [3, 1, 1])[0].tolist() == []  # unsorted with duplicates still works
