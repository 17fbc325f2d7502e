"""Leader election (leader.py) against the in-memory API: who acts, when a standby takes over,
and that the Lease's resourceVersion decides races. Clocks are explicit; no sleeping."""

from __future__ import annotations

from autoglm_operator.leader import LeaderElector
from tests.operator.fakes import FakeKube


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def elector(kube: FakeKube, who: str, clock: Clock, log: list[str]) -> LeaderElector:
    return LeaderElector(kube, "ops", "autoglm-operator", identity_=who, clock=clock,
                         on_started_leading=lambda: log.append(f"{who} started"),
                         on_stopped_leading=lambda: log.append(f"{who} stopped"))


def holder(kube: FakeKube) -> str | None:
    return kube.obj("Lease", "ops", "autoglm-operator")["spec"].get("holderIdentity")


async def test_one_leader_standby_takes_over_only_after_the_lease_expires() -> None:
    kube, clock, log = FakeKube(), Clock(), []
    a, b = elector(kube, "a", clock, log), elector(kube, "b", clock, log)
    await a._try_acquire()
    await b._try_acquire()
    assert (a.leading, b.leading, holder(kube), log) == (True, False, "a", ["a started"])

    # The leader renews every 5 s: the standby never takes over, however long it waits.
    for _ in range(6):
        clock.t += 5
        await a._renew()
        await b._try_acquire()
    assert not b.leading and holder(kube) == "a"
    assert kube.writes["PUT Lease"] == 6  # one write per renewal, none by the standby

    # The leader dies: 14 s after its last renewal the standby still waits, at 15 s it leads.
    clock.t += 14
    await b._try_acquire()
    assert not b.leading
    clock.t += 1
    await b._try_acquire()
    assert b.leading and holder(kube) == "b"
    assert kube.obj("Lease", "ops", "autoglm-operator")["spec"]["leaseTransitions"] == 1

    # The old leader comes back (a pause, not a death): its renewal loses the race and it stops.
    await a._renew()
    await a._renew()
    assert not a.leading and log == ["a started", "b started", "a stopped"]
    assert holder(kube) == "b"


async def test_release_hands_over_without_waiting() -> None:
    kube, clock, log = FakeKube(), Clock(), []
    a, b = elector(kube, "a", clock, log), elector(kube, "b", clock, log)
    await a._try_acquire()
    await b._try_acquire()
    await a.release()
    assert not a.leading and holder(kube) is None
    await b._try_acquire()  # no time passed
    assert b.leading and holder(kube) == "b"


async def test_of_two_standbys_of_an_expired_lease_the_second_sees_the_first_take_it() -> None:
    kube, clock, log = FakeKube(), Clock(), []
    a, b, c = (elector(kube, w, clock, log) for w in "abc")
    await a._try_acquire()
    await b._try_acquire()
    await c._try_acquire()
    clock.t += 16
    await b._try_acquire()
    await c._try_acquire()  # a new record (b's): c starts waiting again
    assert b.leading and not c.leading and holder(kube) == "b"
    clock.t += 14
    await c._try_acquire()
    assert not c.leading
