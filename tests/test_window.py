"""The eviction policies (compiled, flashinfer_py._bookkeeping): exact (to_load, to_evict) over
scripted sequences, and every enter/leave list against the plain set-based references of
policy_reference.py on random streams, with and without capacity overflow."""
import numpy as np
import pytest

from flashinfer_py.window import SlidingWindow
from policy_reference import FrequencyReference, WindowReference


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


def _random_sets(rng, d_ff, n, max_size):
    return [rng.choice(d_ff, size=rng.integers(0, max_size + 1), replace=False)
            for _ in range(n)]


def _compare(policy, refs, rng, sets, capacity):
    """Feed a policy and its references the same stream (each set to a random layer, shuffled
    for the policy): every enter/leave list and the state after it must agree, and a set the
    reference refuses must be refused. Returns (sets refused, ids evicted)."""
    refused = evicted = 0
    for ids in sets:
        layer = int(rng.integers(len(refs)))
        try:
            want = refs[layer].update(ids.tolist(), capacity)
        except ValueError:
            with pytest.raises(ValueError, match="exceed"):
                policy.update(layer, ids, capacity)
            refused += 1
            continue
        load, evict = policy.update(layer, rng.permutation(ids), capacity)
        assert (load.tolist(), evict.tolist()) == want
        assert load.dtype == evict.dtype == np.int32
        held = refs[layer].held()
        assert policy.state(layer).tolist() == sorted(held) and policy.size(layer) == len(held)
        evicted += len(evict)
    return refused, evicted


@pytest.mark.parametrize("k,capacity", [(1, None), (2, None), (5, None), (3, 25), (5, 28),
                                        (4, 20), (8, 29)])
def test_window_against_set_reference(k, capacity):
    """Random streams; with a capacity below the window's union (its oldest sets are then
    forgotten), and sets larger than the capacity (refused, nothing changes)."""
    rng = np.random.default_rng(7 + k)
    refs = [WindowReference(k) for _ in range(2)]
    refused, _ = _compare(SlidingWindow(2, 97, k), refs, rng, _random_sets(rng, 97, 300, 30),
                          capacity)
    if capacity is not None:  # the streams did reach both cases
        assert refused > 0 and sum(r.forgotten for r in refs) > 0


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
    # a tie goes to the lower id, but never to a neuron this token needs
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


@pytest.mark.parametrize("halflife", [64.0, 1e9, 0.01])
def test_frequency_against_set_reference(halflife):
    """Random streams at a capacity the sets overflow; halflife 1e9 gives plain counts (many
    ties: the lower id leaves first), 0.01 rescales the weights every few tokens."""
    rng = np.random.default_rng(3)
    refs = [FrequencyReference(97, halflife) for _ in range(2)]
    refused, evicted = _compare(FrequencyPolicy(2, 97, halflife), refs, rng,
                                _random_sets(rng, 97, 300, 45), 40)
    assert evicted > 0 and refused > 0


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


def test_ids_are_checked_and_named():
    w, f = SlidingWindow(2, 10, 2), FrequencyPolicy(2, 10)
    for pol, cap in ((w, None), (f, 5)):
        with pytest.raises(ValueError, match=r"in \[0, 10\); got -1\.\.3"):
            pol.update(0, [3, -1], cap)
        with pytest.raises(ValueError, match="integers"):
            pol.update(0, np.array([1.5]), cap)
        with pytest.raises(ValueError, match=r"layer 2 out of range \[0, 2\)"):
            pol.update(2, [1], cap)
        assert pol.size(0) == 0  # nothing was recorded
    with pytest.raises(ValueError, match="capacity"):
        f.update(0, [1], None)
    with pytest.raises(ValueError, match="halflife"):
        FrequencyPolicy(1, 10, halflife=0)


def test_window_keeps_its_own_copy_of_the_ids():
    w = SlidingWindow(1, 10, 2)
    ids = np.array([1, 2, 3], dtype=np.int64)  # already sorted: no np.unique on this path
    w.update(0, ids)
    ids[:] = [7, 8, 9]                          # the caller reuses its buffer
    assert w.state(0).tolist() == [1, 2, 3]
    assert w.update(0, [3, 1, 1])[0].tolist() == []  # unsorted with duplicates still works


# ---- rank_swaps (eviction="rank") ---------------------------------------------------------

from itertools import combinations  # noqa: E402

from flashinfer_py.window import rank_swaps  # noqa: E402


def _swaps(cached, cand_ids, cand_scores, max_swaps, free=0):
    load, evict = rank_swaps(np.asarray(cached, np.float32), np.asarray(cand_ids, np.int64),
                             np.asarray(cand_scores, np.float32), max_swaps, free)
    assert load.dtype == np.int64 and evict.dtype == np.int64
    return load.tolist(), evict.tolist()


# (cached scores by row, candidate ids, their scores, max_swaps, free) -> (load ids, evict rows)
RANK_CASES = {
    # free rows only: the best candidates fill them, best first; nothing is replaced
    "free-only": (([5.0, 6.0], [10, 11, 12, 13], [1.0, 9.0, 3.0, 7.0], 0, 2), ([11, 13], [])),
    # swaps only: candidates best first against cached rows lowest first, while strictly better
    "swaps-only": (([5.0, 1.0, 3.0, 8.0], [20, 21, 22, 23], [4.0, 0.5, 2.0, 9.5], 4, 0),
                   ([23, 20], [1, 2])),
    # free rows first (the 2 best), then the next best replace cached rows
    "free-then-swaps": (([2.0, 0.1, 4.0], [7, 8, 9, 30, 31], [6.0, 5.0, 3.0, 1.0, 0.05], 5, 2),
                        ([7, 8, 9], [1])),
    # the best remaining candidate only ties the lowest cached row: no swap (ties never swap)
    "tie": (([3.0, 2.0, 4.0], [40, 41], [2.0, 1.0], 2, 0), ([], [])),
    "tie-after-a-swap": (([3.0, 1.0, 4.0], [40, 41], [5.0, 3.0], 2, 0), ([40], [1])),
    # at most max_swaps replacements even when more candidates would win
    "max-swaps": (([1.0, 1.0, 1.0, 1.0], [50, 51, 52, 53], [9.0, 8.0, 7.0, 6.0], 2, 0),
                  ([50, 51], [0, 1])),
    "max-swaps-zero": (([1.0], [50], [9.0], 0, 0), ([], [])),
    # more winning candidates than cached rows: each row is replaced once at most
    "short-cache": (([0.0], [60, 61, 62], [3.0, 2.0, 1.0], 5, 0), ([60], [0])),
    "no-candidates": (([1.0, 2.0], [], [], 3, 1), ([], [])),
    "empty-cache": (([], [70, 71, 72], [1.0, 3.0, 2.0], 4, 0), ([], [])),
    "empty-cache-free": (([], [70, 71, 72], [1.0, 3.0, 2.0], 4, 2), ([71, 72], [])),
    "more-free-than-candidates": (([5.0], [80, 81], [1.0, 2.0], 3, 6), ([81, 80], [])),
    "negative-limits-mean-none": (([1.0], [90, 91], [5.0, 6.0], -1, -2), ([], [])),
}


def test_rank_swaps_margin_needs_a_candidate_that_much_better():
    """swap_margin m: a candidate replaces a cached row only above (1 + m) x its score; free
    rows are filled as without a margin."""
    cached, ids, cand = [2.0, 4.0, 9.0], [10, 11, 12], [7.0, 5.0, 3.0]
    got = {m: rank_swaps(np.asarray(cached), np.asarray(ids), np.asarray(cand), 3, free=0,
                         margin=m) for m in (0.0, 0.5, 1.0, 3.0)}
    assert got[0.0][0].tolist() == [10, 11] and got[0.0][1].tolist() == [0, 1]   # 7 > 2, 5 > 4
    assert got[0.5][0].tolist() == [10] and got[0.5][1].tolist() == [0]          # 5 < 1.5 x 4
    assert got[1.0][0].tolist() == [10]                                           # 7 > 2 x 2
    assert got[3.0][0].tolist() == []                                             # 7 < 4 x 2
    load, evict = rank_swaps(np.asarray(cached), np.asarray(ids), np.asarray(cand), 3, free=1,
                             margin=3.0)
    assert load.tolist() == [10] and evict.tolist() == []
    from flashinfer_py.config import RuntimeConfig

    with pytest.raises(ValueError, match="swap_margin"):
        RuntimeConfig(swap_margin=-0.5)


@pytest.mark.parametrize("case", list(RANK_CASES))
def test_rank_swaps_scripted(case):
    args, (load, evict) = RANK_CASES[case]
    assert _swaps(*args) == (load, evict)


def _best_by_enumeration(cached, cand, max_swaps, free):
    """Every choice of neurons to load and rows to evict that fills min(free, candidates)
    empty rows and replaces at most max_swaps rows; the one keeping the largest total score,
    and among those the one replacing the fewest rows (a tie is not worth a read).
    Returns (total score gained, rows replaced, candidate indices, rows)."""
    n_fill = min(max(free, 0), len(cand))
    best = None
    for e in range(0, min(max(max_swaps, 0), len(cached), len(cand) - n_fill) + 1):
        for rows in combinations(range(len(cached)), e):
            lost = sum(cached[r] for r in rows)
            for picks in combinations(range(len(cand)), n_fill + e):
                gain = sum(cand[i] for i in picks) - lost
                key = (gain, -e)
                if best is None or key > best[0]:
                    best = (key, picks, rows)
    (gain, neg_e), picks, rows = best
    return gain, -neg_e, set(picks), set(rows)


@pytest.mark.parametrize("ties", [False, True])
def test_rank_swaps_against_enumeration(ties):
    """Random small cases against the best choice found by trying every one. Continuous scores
    have one best choice, which must be returned; integer scores tie often, and then any of the
    best choices will do (same total, same number of reads)."""
    rng = np.random.default_rng(11 + ties)
    for _ in range(400):
        n_cached, n_cand = int(rng.integers(0, 6)), int(rng.integers(0, 7))
        score = (lambda n: rng.integers(0, 4, n).astype(np.float64)) if ties else rng.random
        cached, cand = score(n_cached), score(n_cand)
        ids = rng.choice(1000, n_cand, replace=False)
        max_swaps, free = int(rng.integers(-1, 5)), int(rng.integers(-1, 4))
        load, evict = _swaps(cached, ids, cand, max_swaps, free)
        gain, n_evict, picks, rows = _best_by_enumeration(cached, cand, max_swaps, free)
        pos = {int(i): k for k, i in enumerate(ids)}
        got_picks = [pos[i] for i in load]
        assert len(set(load)) == len(load) and len(set(evict)) == len(evict)
        assert len(evict) == n_evict and len(load) == n_evict + min(max(free, 0), n_cand)
        got_gain = cand[got_picks].sum() - cached[evict].sum()
        assert got_gain == pytest.approx(gain, abs=1e-5)
        if not ties:
            assert set(got_picks) == picks and set(evict) == rows
        # pairwise: each replacement is strictly better than the row it replaces
        swapped = got_picks[len(load) - len(evict):]
        assert all(cand[i] > cached[r] for i, r in zip(swapped, evict))
