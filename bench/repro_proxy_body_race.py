"""Why Traefik's default proxy cut ~0.05 % of streams, and that the ``gateway`` add-on's proxy does not.

A standalone reproducer of issue 22's cut streams (no cluster, loopback only, ~1 min a mode): Traefik
(the binary the add-on runs) with its file provider, one router to a weighted service over two services
90/10 (what the ``kubernetesgateway`` provider builds from the operator's HTTPRoute: a WRR service over
one load-balancer service per backendRef), each with one backend: a stand-in for the runtime served by
uvicorn (headers at once, the first token ~20 ms later, ``[DONE]``). ``tests.e2e.traffic.Traffic`` sends
streaming and non-streaming chat completions through it, one connection per request, as the canary
tests do. Each mode runs Traefik afresh:

- ``default proxy``: no proxy flags (Traefik's httputil.ReverseProxy over Go's http.Transport);
- ``add-on proxy``: ``gateway.PROXY_ARGS`` (Traefik's fast proxy; idle connections dropped at 15 s).

It prints, per mode, the requests, the failed ones (by error), the streams' median time to the first
token (a proxy that buffered the stream would show ~ the whole answer's time), and how many times
Traefik's debug log says ``ReverseProxy read error during body copy``::

    .venv/bin/python bench/repro_proxy_body_race.py --seconds 60

The race (Go 1.26's net/http, which Traefik v3.6.12 is built with): the client's POST has a
Content-Length; the transport sends the headers, then copies the body to the pod's socket
(transferWriter.writeBody, transfer.go: ``doBodyCopy(w, io.LimitReader(body, ContentLength))``) and
then reads the body once more to check it ends there (``doBodyCopy(io.Discard, body)``). The pod may
answer in between; the proxy copies the response headers to the client, and Go's server, writing them,
drains and closes the client's request body (chunkWriter.writeHeader, server.go: ``io.CopyN(io.Discard,
w.reqBody, ...)`` then ``w.reqBody.Close()``). The transport's second read then fails (``http: invalid
Read on closed Body``), persistConn.writeLoop (transport.go) closes the connection to the pod, and the
response body being copied ends with ``read tcp ...: use of closed network connection``: the client has
a 200, the headers, no token, and an unterminated chunked body. Known upstream: golang/go#40747; Caddy
wraps the request body so that the server's close cannot reach the transport. Traefik's fast proxy
writes the whole request before it reads the response (pkg/proxy/fast/proxy.go, roundTrip), so the
server closes the body only after the transport is done with it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from devcluster import build_binaries  # noqa: E402
from devcluster.addons import gateway  # noqa: E402
from tests.e2e.traffic import Traffic  # noqa: E402

HOST = "127.0.0.1"
ENTRY = 18480  # Traefik's entry point
BACKENDS = {"stable": (18481, 90), "canary": (18482, 10)}  # name: (port, weight)
FIRST_TOKEN_S, TOKEN_S = 0.02, 0.005


async def app(scope, receive, send) -> None:  # noqa: ANN001 - an ASGI app
    """The runtime's shape: read the JSON body, answer SSE (headers first) or JSON, say who answered."""
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    req = json.loads(body)
    headers = [(b"x-autoglm-revision", scope["app"].encode())]
    if not req.get("stream"):
        await asyncio.sleep(FIRST_TOKEN_S)
        answer = json.dumps({"choices": [{"message": {"content": "t" * req["max_tokens"]}}]}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [*headers, (b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": answer})
        return
    await send(
        {"type": "http.response.start", "status": 200, "headers": [*headers, (b"content-type", b"text/event-stream")]}
    )
    await asyncio.sleep(FIRST_TOKEN_S)
    for _ in range(req["max_tokens"]):
        await asyncio.sleep(TOKEN_S)
        chunk = json.dumps({"choices": [{"delta": {"content": "t"}}]})
        await send({"type": "http.response.body", "body": f"data: {chunk}\n\n".encode(), "more_body": True})
    await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})


def serve(port: int, name: str) -> None:
    import uvicorn

    async def named(scope, receive, send) -> None:  # noqa: ANN001
        await app({**scope, "app": name}, receive, send)

    uvicorn.run(named, host=HOST, port=port, log_level="warning", lifespan="off", timeout_keep_alive=30)


def dynamic_config() -> dict:
    services = {
        name: {"loadBalancer": {"servers": [{"url": f"http://{HOST}:{port}"}]}} for name, (port, _) in BACKENDS.items()
    }
    services["wrr"] = {"weighted": {"services": [{"name": n, "weight": w} for n, (_, w) in BACKENDS.items()]}}
    return {
        "http": {
            "routers": {"chat": {"rule": "PathPrefix(`/`)", "entryPoints": ["web"], "service": "wrr"}},
            "services": services,
        }
    }


def measure(traefik: Path, proxy_args: tuple[str, ...], seconds: float, work: Path) -> str:
    conf = work / "dynamic.yml"
    conf.write_text(json.dumps(dynamic_config()))  # JSON is YAML
    log_path = work / "traefik.log"
    cmd = [
        str(traefik),
        f"--entryPoints.web.address={HOST}:{ENTRY}",
        f"--providers.file.filename={conf}",
        "--log.level=DEBUG",
        "--log.noColor=true",
        "--global.checkNewVersion=false",
        "--global.sendAnonymousUsage=false",
        *proxy_args,
    ]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_served(f"http://{HOST}:{ENTRY}/v1/chat/completions")
        with Traffic(f"http://{HOST}:{ENTRY}/v1", "stand-in", streams=4, calls=2, max_tokens=2) as traffic:
            time.sleep(seconds)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    answers = traffic.answers
    failed = Counter(a.error[:100] for a in answers if not a.ok)
    ttft = statistics.median(a.ttft for a in answers if a.ok and a.stream and a.ttft is not None)
    body_copy = log_path.read_text().count("ReverseProxy read error during body copy")
    cut = sum(failed.values())
    return (
        f"{len(answers)} requests ({dict(traffic.by_revision())}), {cut} failed ({100 * cut / len(answers):.3f} %)"
        f"{': ' + str(dict(failed)) if failed else ''}; stream TTFT median {1000 * ttft:.1f} ms; "
        f"Traefik logged 'read error during body copy' {body_copy} times"
    )


def wait_served(url: str, timeout: float = 30) -> None:
    body = json.dumps({"model": "stand-in", "messages": [], "max_tokens": 1}).encode()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            req = urllib.request.Request(url, body, {"content-type": "application/json"})
            with urllib.request.urlopen(req, timeout=2) as resp:
                if resp.status == 200:
                    return
        except (OSError, urllib.error.HTTPError):
            pass
        time.sleep(0.2)
    raise SystemExit(f"Traefik did not route {url} within {timeout:.0f}s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=60, help="traffic per mode")
    ap.add_argument("--only", choices=("default", "add-on"), help="run one mode")
    ap.add_argument("--serve", nargs=2, metavar=("PORT", "NAME"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve(int(args.serve[0]), args.serve[1])
        return
    traefik = build_binaries() / "traefik"
    modes = {
        "default": ("default proxy", ()),
        "add-on": ("add-on proxy " + " ".join(gateway.PROXY_ARGS), gateway.PROXY_ARGS),
    }
    backends = [
        subprocess.Popen([sys.executable, __file__, "--serve", str(port), name]) for name, (port, _) in BACKENDS.items()
    ]
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for key, (label, proxy_args) in modes.items():
                if args.only in (None, key):
                    print(f"{label}: {measure(traefik, proxy_args, args.seconds, Path(tmp))}", flush=True)
    finally:
        for b in backends:
            b.terminate()
            b.wait(timeout=30)


if __name__ == "__main__":
    main()
