"""Streams through the Gateway while its configuration changes: every HTTPRoute write makes Traefik
rebuild its routers and services (a reload); a request in flight must not notice.

One runtime pod behind the operator's HTTPRoute (``trafficRouting: GatewayAPI``, no canary), streaming
and non-streaming clients through the Gateway's listener, first with no route change (the baseline),
then while a second HTTPRoute on the same Gateway (another path, nobody sends to it) is rewritten every
``PERIOD`` seconds. Both windows must have no failed request. Figures are printed with ``-s``.

Measured (issue 22), with Traefik's default proxy: reloads are not what cut streams. With one pod behind
the route, 0 of 15,449 (no writes) and 0 of 15,787 (59 writes) failed; split 90/10 over a stable and a
canary pod, 26 of 13,743 failed in the window with NO route write, and Traefik's debug log had the same
rate of ``ReverseProxy read error during body copy: ... use of closed network connection`` in both windows.
That was a race in Go's net/http, not the reload (``bench/repro_proxy_body_race.py``: with one backend too,
no cluster, no reload); the add-on now runs Traefik's fast proxy (``gateway.PROXY_ARGS``).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from devcluster.addons import gateway as gw
from tests.e2e.test_canary import NAME, analysis, rolled_out, scenario  # noqa: F401 - scenario: a fixture
from tests.e2e.test_gateway import StreamsCut, gateway_cr, served_through_gateway
from tests.e2e.traffic import Traffic
from tests.helpers import report
from tests.operator.test_operator_cluster import crd, op_env  # noqa: F401 - fixtures

pytestmark = [pytest.mark.cluster, pytest.mark.runtime]

PERIOD = 1.0  # seconds between two writes of the churned route
WINDOW = 30.0  # seconds of traffic in each window (the figures above: 60 s windows)
CHURN = "churn"  # the second HTTPRoute's name


def churn_route(ns: str, i: int) -> dict:
    """An HTTPRoute on the add-on's Gateway to the stable Service under a path nobody asks for; every
    ``i`` gives another rule, so every write is a new configuration (Traefik skips a configuration equal
    to the one it runs, and reads the provider at most every 2 s: alternating two paths would not do)."""
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {"name": CHURN, "namespace": ns},
        "spec": {
            "parentRefs": [{"name": gw.NAME, "namespace": gw.NAMESPACE, "sectionName": gw.LISTENER}],
            "rules": [
                {
                    "matches": [{"path": {"type": "PathPrefix", "value": f"/{CHURN}/{i}"}}],
                    "backendRefs": [{"name": f"{NAME}-stable", "port": 8000}],
                }
            ],
        },
    }


@contextmanager
def rewriting(kube, ns: str, period: float) -> Iterator[list[float]]:
    """Rewrite the churn route every ``period`` seconds until the block ends; yields the writes' times."""
    path = f"{gw.GW}/namespaces/{ns}/httproutes"
    kube.kube.request("POST", path, churn_route(ns, 0))
    writes: list[float] = []
    stop = threading.Event()

    def loop() -> None:
        i = 1
        while not stop.wait(period):
            patch = {"spec": churn_route(ns, i)["spec"]}
            kube.kube.request("PATCH", f"{path}/{CHURN}", patch, content_type="application/merge-patch+json")
            writes.append(time.monotonic())
            i += 1

    thread = threading.Thread(target=loop, daemon=True, name="route-writes")
    thread.start()
    try:
        yield writes
    finally:
        stop.set()
        thread.join(timeout=30)


def window(url: str, seconds: float) -> Traffic:
    with Traffic(url, "tiny", streams=4, calls=2, max_tokens=2) as traffic:
        time.sleep(seconds)
    return traffic


# A measurement for issue 22 rather than a gate: in one full run (default proxy) Traefik answered 503 "no
# available server" for ~1,300 requests of the quiet window (an unexplained gap before both pods were
# served). Run it with AUTOGLM_GATEWAY_RELOAD=1 until that is understood.
@pytest.mark.skipif(
    not os.environ.get("AUTOGLM_GATEWAY_RELOAD"), reason="issue 22 measurement; AUTOGLM_GATEWAY_RELOAD=1"
)
def test_streams_through_the_gateway_survive_route_writes(kube, gateway, scenario, node_models):  # noqa: F811
    sc = scenario
    url = gw.address(kube.network.ranges.node_ip) + "/v1"
    with rolled_out(sc, gateway_cr([{"weight": 10, "pause": "1h"}], analysis(kube)), 1):
        # A stable and a canary pod behind the operator's route, split 90/10 by Traefik.
        sc.set_version("0.1.1")
        sc.wait(lambda st: st.get("canaryWeight") == 10, 180, "the canary at 10 %")
        served_through_gateway(url)
        time.sleep(3)  # Traefik reads the route (at most every 2 s)
        quiet = window(url, WINDOW)
        report(f"\nGateway, no route writes: {quiet.summary()}")
        with rewriting(kube, sc.ns, PERIOD) as writes:
            t0 = time.monotonic()
            churned = window(url, WINDOW)
        report(f"Gateway, a route write every {PERIOD}s ({len(writes)} writes): {churned.summary()}")
        failed = churned.failed
        if failed:
            after = [round(min((a.start - w for w in writes if w <= a.start), default=-1), 2) for a in failed]
            report(f"failed at t={[round(a.start - t0, 2) for a in failed]} s; seconds after the last write: {after}")
    if quiet.failed or churned.failed:
        raise StreamsCut(f"no writes: {quiet.summary()}; with writes: {churned.summary()}")
