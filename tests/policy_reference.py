"""Plain set-based references for the compiled eviction policies (flashinfer_py._bookkeeping):
what each policy means, written as directly as Python allows. The tests drive both with the
same streams of ids and compare every enter/leave list."""
from __future__ import annotations


class WindowReference:
    """The paper's window: the neurons of the last k tokens' sets; with a capacity, the oldest
    sets are forgotten until the union fits."""

    def __init__(self, k: int):
        self.k, self.sets = k, []
        self.forgotten = 0  # sets dropped early because the union did not fit

    def held(self) -> set:
        """The window's union: what the cache holds."""
        return set().union(*self.sets)

    def update(self, ids, capacity=None) -> tuple[list, list]:
        ids = set(ids)
        if capacity is not None and len(ids) > capacity:
            raise ValueError("the set alone exceeds the capacity")
        before = self.held()
        self.sets = (self.sets + [ids])[-self.k:]
        while capacity is not None and len(self.held()) > capacity:
            self.sets.pop(0)
            self.forgotten += 1
        after = self.held()
        return sorted(after - before), sorted(before - after)


class FrequencyReference:
    """Frequency eviction: every held neuron stays while there is room; when full, the held
    neurons this token does not need leave, lowest (decayed use count, id) first."""

    def __init__(self, d_ff: int, halflife: float = 64.0):
        self.growth, self.weight = 2.0 ** (1.0 / halflife), 1.0
        self.score, self._held = [0.0] * d_ff, set()

    def update(self, ids, capacity: int) -> tuple[list, list]:
        ids = set(ids)
        if len(ids) > capacity:
            raise ValueError("the set alone exceeds the capacity")
        w = self.weight * self.growth
        if w > 1e200:  # the same rescaling as the policy, so the scores stay bit-equal
            inv = 1.0 / w
            self.score = [s * inv for s in self.score]
            w = 1.0
        self.weight = w
        for i in ids:
            self.score[i] += w
        enter = ids - self._held
        excess = len(self._held) + len(enter) - capacity
        spare = sorted(self._held - ids, key=lambda i: (self.score[i], i))
        leave = set(spare[:max(excess, 0)])
        self._held = (self._held - leave) | enter
        return sorted(enter), sorted(leave)

    def held(self) -> set:
        return set(self._held)
