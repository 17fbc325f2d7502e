"""HTTPS on both sides of the router, in process: an HTTPS router in front of HTTPS pods (fakes of a pod,
the unit tier; the real runtime is in test_router_runtime_tls.py), certificates made here with
``cryptography``. The pods are verified (pinned to their own certificate, as the operator configures it,
or a CA plus a name), never called in plaintext; the queue-depth scrape goes over HTTPS too."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from autoglm_router.__main__ import make_tls, parser
from autoglm_router.endpoints import Endpoint, Revision, Topology
from autoglm_router.queues import QueueScraper
from autoglm_router.tls import ServedCertificate, TLSFiles, Upstream, server_context
from tests.router.certs import CA, Issued
from tests.router.test_proxy import CHAT, Pod, _chat, make_router  # noqa: F401 - fixture

NAME = "tiny.demo.svc"  # what the Secret's certificate names: the Service, not a pod IP


@pytest.fixture
def ca(tmp_path: Path) -> CA:
    return CA.make(tmp_path / "ca")


@pytest.fixture
def secret(ca: CA, tmp_path: Path) -> Issued:
    """The resource's spec.tls Secret: served by the pods and by the router alike."""
    return ca.issue(tmp_path / "secret", dns=(NAME,))


def client_ssl(ca: CA) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca.cert))


async def test_https_router_streams_from_https_pods_pinned_to_their_own_certificate(make_router, ca, secret):
    """The operator's setting: the router serves the Secret's certificate and pins the pods to it
    (--backend-ca tls.crt). The certificate names no IP, the pods are dialled by IP: pinning needs no name."""
    served = server_context(secret.cert, secret.key)
    pod = Pod("p0")
    pod.release.clear()
    topo = Topology(Revision("r1", (await pod.start(ssl=served),)))
    router, _ = await make_router(topo, ssl=served, upstream=Upstream.https(secret.cert, None))
    assert router.scheme == "https"
    async with (
        aiohttp.ClientSession() as s,
        s.post(router.make_url(CHAT), json=_chat(), ssl=client_ssl(ca), server_hostname=NAME) as r,
    ):
        assert r.status == 200 and r.headers["x-autoglm-pod"] == "p0"
        first = await asyncio.wait_for(r.content.readuntil(b"\n\n"), 5)  # chunk by chunk over both hops
        assert first == b'data: {"n": 0}\n\n'
        pod.release.set()
        assert (await r.read()).endswith(b"data: [DONE]\n\n")
    for path in ("/healthz", "/ready", "/metrics"):  # probes and Prometheus: HTTPS too
        async with aiohttp.ClientSession() as s:
            r = await s.get(router.make_url(path), ssl=client_ssl(ca), server_hostname=NAME)
            assert r.status == 200, path
    with pytest.raises(aiohttp.ClientError):  # no plaintext next to it
        async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{router.port}/healthz") as r:
            await r.read()


async def test_a_pod_with_another_certificate_is_refused_and_skipped(make_router, ca, secret, tmp_path):
    """Pinned to the Secret's certificate: a server with another certificate (the same CA, the same name)
    gets no request; the retry reaches the real pod; alone, it makes a 502 naming the verification."""
    served = server_context(secret.cert, secret.key)
    other = ca.issue(tmp_path / "other", dns=(NAME,))
    imposter, good = Pod("imposter"), Pod("good")
    ep_imposter = await imposter.start(ssl=server_context(other.cert, other.key))
    upstream = Upstream.https(secret.cert, None)
    router, source = await make_router(Topology(Revision("r1", (ep_imposter, await good.start(ssl=served)))),
                                       upstream=upstream)
    for i in range(4):
        async with aiohttp.ClientSession() as s, s.post(router.make_url(CHAT), json=_chat(f"u{i}")) as r:
            assert r.status == 200 and r.headers["x-autoglm-pod"] == "good"
            await r.read()
    source.set(Topology(Revision("r1", (ep_imposter,))))
    async with aiohttp.ClientSession() as s, s.post(router.make_url(CHAT), json=_chat()) as r:
        assert r.status == 502
        err = (await r.json())["error"]
    assert err["code"] == "upstream_failed" and "CERTIFICATE_VERIFY_FAILED" in err["message"], err
    assert imposter.hits == 0


async def test_a_plain_http_pod_is_never_called_in_plaintext(make_router, secret):
    plain = Pod("plain")
    router, _ = await make_router(Topology(Revision("r1", (await plain.start(),))),
                                  upstream=Upstream.https(secret.cert, None))
    async with aiohttp.ClientSession() as s, s.post(router.make_url(CHAT), json=_chat()) as r:
        assert r.status == 502 and (await r.json())["error"]["code"] == "upstream_failed"
    assert plain.hits == 0


async def test_a_ca_with_a_server_name_checks_the_name(make_router, ca, secret):
    """--backend-ca CA --backend-server-name NAME (a cert-manager CA, Istio's sni/subjectAltNames): the right
    name passes, another name is refused although the CA signed the certificate."""
    pod = Pod("p0")
    topo = Topology(Revision("r1", (await pod.start(ssl=server_context(secret.cert, secret.key)),)))
    right, _ = await make_router(topo, upstream=Upstream.https(ca.cert, NAME))
    wrong, _ = await make_router(topo, upstream=Upstream.https(ca.cert, "other.demo.svc"))
    async with aiohttp.ClientSession() as s:
        async with s.post(right.make_url(CHAT), json=_chat()) as r:
            assert r.status == 200 and r.headers["x-autoglm-pod"] == "p0"
            await r.read()
        async with s.post(wrong.make_url(CHAT), json=_chat()) as r:
            assert r.status == 502
            assert "CERTIFICATE_VERIFY_FAILED" in (await r.json())["error"]["message"]
    assert pod.hits == 1


async def test_queue_depth_is_scraped_over_https(secret):
    async def metrics(_: web.Request) -> web.Response:
        return web.Response(text="# TYPE autoglm_requests_waiting gauge\nautoglm_requests_waiting 7\n")

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    pod = TestServer(app, host="127.0.0.1")
    await pod.start_server(ssl=server_context(secret.cert, secret.key))
    ep = Endpoint(f"127.0.0.1:{pod.port}", "p0")
    into: dict[str, int] = {}
    scraper = QueueScraper(lambda: [ep], into, interval=0.05, upstream=Upstream.https(secret.cert, None))
    await scraper.start()
    try:
        for _ in range(100):
            if into.get(ep.address) == 7:
                break
            await asyncio.sleep(0.05)
        assert into.get(ep.address) == 7
    finally:
        await scraper.stop()
        await pod.close()


async def test_a_rotated_secret_is_served_and_trusted_beside_the_old(make_router, tmp_path):
    """The Secret's files change under the router (the kubelet updates a mounted Secret): the next handshake
    presents the new certificate, the new one is trusted for pods beside the old (pods started before the
    rotation serve the old one); a half-written pair (new certificate, old key) keeps the old in use."""
    old = CA.make(tmp_path / "ca-old", "ca-old")
    new = CA.make(tmp_path / "ca-new", "ca-new")
    old_pair, new_pair = old.issue(tmp_path / "old", dns=(NAME,)), new.issue(tmp_path / "new", dns=(NAME,))
    mounted = Issued(tmp_path / "mounted" / "tls.crt", tmp_path / "mounted" / "tls.key")
    mounted.cert.parent.mkdir()
    mounted.cert.write_bytes(old_pair.cert.read_bytes())
    mounted.key.write_bytes(old_pair.key.read_bytes())
    served, upstream = ServedCertificate(mounted.cert, mounted.key), Upstream.https(mounted.cert, None)
    files = TLSFiles(served, upstream, mounted.cert)
    pod_old, pod_new = Pod("old"), Pod("new")
    ep_old = await pod_old.start(ssl=server_context(old_pair.cert, old_pair.key))
    ep_new = await pod_new.start(ssl=server_context(new_pair.cert, new_pair.key))
    router, source = await make_router(Topology(Revision("r1", (ep_new,))), ssl=served.context, upstream=upstream)

    async def call(trusting: CA) -> int:
        async with (
            aiohttp.ClientSession() as s,
            s.post(router.make_url(CHAT), json=_chat(), ssl=client_ssl(trusting), server_hostname=NAME) as r,
        ):
            await r.read()
            return r.status

    assert await call(old) == 502  # the pod with the new certificate is not trusted yet
    with pytest.raises(aiohttp.ClientConnectorCertificateError):
        await call(new)

    mounted.cert.write_bytes(new_pair.cert.read_bytes())  # half-way: the new certificate, the old key
    files.check()
    assert await call(old) == 200 and pod_new.hits == 1  # the old pair still served; the new pod trusted
    with pytest.raises(aiohttp.ClientConnectorCertificateError):
        await call(new)
    mounted.key.write_bytes(new_pair.key.read_bytes())
    files.check()
    assert await call(new) == 200 and pod_new.hits == 2  # the new pair served from the next handshake
    with pytest.raises(aiohttp.ClientConnectorCertificateError):
        await call(old)
    source.set(Topology(Revision("r1", (ep_old,))))
    assert await call(new) == 200 and pod_old.hits == 1  # the old pin stays beside the new


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--ssl-certfile=CERT"], "both --ssl-certfile and --ssl-keyfile"),
        (["--backend-ca=CERT"], "need --backend-tls"),
        (["--backend-tls"], "needs --backend-ca or --backend-server-name"),
        (["--backend-tls", "--backend-ca=/nonexistent/ca.crt"], "--backend-ca /nonexistent/ca.crt: no such file"),
        (["--ssl-certfile=KEY", "--ssl-keyfile=CERT"], "autoglm-router:"),  # swapped: not a certificate
    ],
)
def test_bad_tls_flags_exit_with_the_reason(argv, message, secret):
    argv = [a.replace("CERT", str(secret.cert)).replace("KEY", str(secret.key)) for a in argv]
    with pytest.raises(SystemExit) as exc:
        make_tls(parser().parse_args(argv))
    assert message in str(exc.value), exc.value


def test_good_tls_flags(secret):
    served, upstream = make_tls(parser().parse_args(
        [f"--ssl-certfile={secret.cert}", f"--ssl-keyfile={secret.key}", "--backend-tls", f"--backend-ca={secret.cert}"]
    ))
    assert served is not None and upstream.scheme == "https" and upstream.url(Endpoint("10.0.0.1:8000", "p")) == (
        "https://10.0.0.1:8000"
    )
    served, upstream = make_tls(parser().parse_args([]))
    assert served is None and upstream.scheme == "http" and upstream.request_kwargs() == {}
