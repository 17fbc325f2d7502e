"""The router's one stateful picker: in-flight counts per pod, queue depths as last scraped, and the hash
rings, turned into a ``Choice`` for each request by the pure policies (``policies.py``)."""

from __future__ import annotations

import itertools
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from autoglm_router.endpoints import Endpoint, Revision, Topology
from autoglm_router.policies import HashRing, is_canary, pick_bounded, pick_least_loaded
from autoglm_router.sessions import canary_user, session_key

Policy = Literal["LeastLoad", "SessionAffinity"]
POLICIES: tuple[Policy, ...] = ("LeastLoad", "SessionAffinity")
DOWN_SECONDS = 5.0


@dataclass(frozen=True)
class Choice:
    endpoint: Endpoint
    revision: str
    policy: Policy
    moved: bool = False  # SessionAffinity: the session's home pod was past the load bound


class NoEndpoints(LookupError):
    """No Ready pod is left to try."""


class Picker:
    def __init__(
        self,
        policy: Policy = "LeastLoad",
        session_source: str = "prompt",
        load_factor: float = 1.25,
        canary_header: str = "x-autoglm-canary",
    ) -> None:
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        self.policy = policy
        self.session_source = session_source
        self.load_factor = load_factor
        self.canary_header = canary_header
        self.inflight: Counter[str] = Counter()  # by address
        self.queued: dict[str, int] = {}  # by address, from the queue scraper
        self._rings: dict[tuple[str, ...], HashRing] = {}
        self._turn = itertools.count()
        self._down_until: dict[str, float] = {}  # address → monotonic time; set by failed()

    def _ring(self, addresses: tuple[str, ...]) -> HashRing:
        ring = self._rings.get(addresses)
        if ring is None:
            if len(self._rings) > 64:  # pod sets come and go; keep the cache small
                self._rings.clear()
            ring = self._rings[addresses] = HashRing(addresses)
        return ring

    def revision_for(self, topo: Topology, headers: Mapping[str, str], body: Mapping[str, Any]) -> list[Revision]:
        """The revisions to try, in order: the user's own (canary or stable), then the other one."""
        stable, canary = topo.stable, topo.canary
        if canary is None or stable is None:
            return topo.revisions()
        forced = headers.get(self.canary_header, "").lower() == "always"
        user = canary_user(headers, body, session_key(self.session_source, headers, body))
        return [canary, stable] if forced or is_canary(user, topo.canary_weight) else [stable, canary]

    def choose(
        self, topo: Topology, headers: Mapping[str, str], body: Mapping[str, Any], exclude: frozenset[str] = frozenset()
    ) -> Choice:
        for revision in self.revision_for(topo, headers, body):
            candidates = [e for e in revision.endpoints if e.address not in exclude]
            if not candidates:
                continue
            now = time.monotonic()
            up = [e for e in candidates if self._down_until.get(e.address, 0.0) <= now]
            candidates = up or candidates  # pods that just failed only when nothing else is left
            by_address = {e.address: e for e in candidates}
            if self.policy == "SessionAffinity":
                ring = self._ring(tuple(sorted(by_address)))
                pick = pick_bounded(
                    ring, session_key(self.session_source, headers, body), self.inflight, self.load_factor
                )
                return Choice(by_address[pick.pod], revision.name, self.policy, pick.moved)
            address = pick_least_loaded(list(by_address), self.inflight, self.queued, next(self._turn))
            return Choice(by_address[address], revision.name, self.policy)
        raise NoEndpoints("no Ready pod to send the request to")

    def failed(self, endpoint: Endpoint, cooldown: float = DOWN_SECONDS) -> None:
        """The pod refused a connection or dropped one before answering: set it aside for ``cooldown``
        seconds (the EndpointSlice drops a dead pod soon; until then, do not keep paying a retry for it)."""
        self._down_until[endpoint.address] = time.monotonic() + cooldown
        if len(self._down_until) > 1024:
            now = time.monotonic()
            self._down_until = {a: t for a, t in self._down_until.items() if t > now}

    def started(self, endpoint: Endpoint) -> None:
        self.inflight[endpoint.address] += 1

    def finished(self, endpoint: Endpoint) -> None:
        self.inflight[endpoint.address] -= 1
        if self.inflight[endpoint.address] <= 0:
            del self.inflight[endpoint.address]
