"""Pure picking policies: which pod a request goes to, and which revision a user is on.

Nothing here does I/O or keeps global state, so two router replicas given the same pods and loads pick
the same pod for the same key (the hash is ``blake2b``, not Python's per-process ``hash``).

- ``HashRing`` + ``pick_bounded``: consistent hashing with bounded loads (CHWBL; Mirrokni, Thorup and
  Zadimoghaddam 2017, as KubeAI's prefix-hash routing does): a key goes to the first pod clockwise on a
  ring of virtual nodes whose in-flight load, counting this request, stays within
  ``ceil(load_factor x mean)``; only a pod past that bound hands the key on to the next pod.
- ``pick_least_loaded``: in-flight requests plus the queue depth the pod last reported.
- ``canary_share`` / ``is_canary``: a user's fixed point in [0, 1) against the canary weight; a user is on
  the canary while the weight exceeds their point, so raising the weight only moves users stable → canary.
"""

from __future__ import annotations

import bisect
import hashlib
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

DEFAULT_VNODES = 100


def hash64(text: str) -> int:
    """A stable 64-bit hash of ``text`` (the same in every process and on every machine)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


class HashRing:
    """Pods placed on a 64-bit ring, ``vnodes`` virtual nodes each."""

    def __init__(self, pods: Iterable[str], vnodes: int = DEFAULT_VNODES) -> None:
        self.pods = tuple(sorted(set(pods)))
        points = sorted((hash64(f"{pod}#{i}"), pod) for pod in self.pods for i in range(vnodes))
        self._hashes = [h for h, _ in points]
        self._owners = [p for _, p in points]

    def walk(self, key: str) -> Iterator[str]:
        """Every pod once, in ring order clockwise from ``key``'s point."""
        if not self.pods:
            return
        start = bisect.bisect_left(self._hashes, hash64(key))
        seen: set[str] = set()
        n = len(self._owners)
        for i in range(n):
            pod = self._owners[(start + i) % n]
            if pod not in seen:
                seen.add(pod)
                yield pod
                if len(seen) == len(self.pods):
                    return


def load_bound(loads: Mapping[str, int], pods: Sequence[str], load_factor: float) -> int:
    """The most requests one pod may hold once this request is placed: ``ceil(c x (total + 1) / n)``."""
    total = sum(loads.get(p, 0) for p in pods) + 1
    return math.ceil(load_factor * total / len(pods))


@dataclass(frozen=True)
class Pick:
    pod: str
    moved: bool  # not the key's home pod: that one was past the load bound


def pick_bounded(ring: HashRing, key: str, loads: Mapping[str, int], load_factor: float) -> Pick:
    """CHWBL: the first pod clockwise from ``key`` whose load + 1 is within the bound.

    ``load_factor`` >= 1 guarantees a pod is found (not all pods can be over a bound of at least the mean).
    """
    if load_factor < 1:
        raise ValueError(f"load_factor must be >= 1, got {load_factor}")
    if not ring.pods:
        raise LookupError("no pods")
    bound = load_bound(loads, ring.pods, load_factor)
    home = None
    for pod in ring.walk(key):
        home = home or pod
        if loads.get(pod, 0) + 1 <= bound:
            return Pick(pod, pod != home)
    raise AssertionError("unreachable: some pod is at or below the mean")


def pick_least_loaded(
    pods: Sequence[str], inflight: Mapping[str, int], queued: Mapping[str, int], turn: int = 0
) -> str:
    """The pod with the fewest in-flight + queued requests; ties go round in ``turn`` order."""
    if not pods:
        raise LookupError("no pods")
    ordered = sorted(pods)
    n = len(ordered)
    rotated = [ordered[(turn + i) % n] for i in range(n)]
    return min(rotated, key=lambda p: inflight.get(p, 0) + queued.get(p, 0))


def canary_share(user: str) -> float:
    """The user's fixed point in [0, 1) (its own hash space, independent of the pod ring)."""
    return hash64("canary:" + user) / 2**64


def is_canary(user: str, weight_percent: float) -> bool:
    """Whether ``user`` is on the canary at ``weight_percent`` (monotone: true stays true as it grows)."""
    return canary_share(user) < weight_percent / 100
