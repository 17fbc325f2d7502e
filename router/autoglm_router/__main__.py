"""``autoglm-router``: serve the router until SIGTERM, then drain.

SIGTERM / SIGINT: ``/ready`` turns 503 at once (the Service stops sending here) while requests are still
served for ``--drain-delay`` seconds (the Service's endpoints lag); then the listening socket closes and
the requests and streams in flight finish, bounded by ``--drain-timeout``; then the process exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from aiohttp import web

from autoglm_router.app import STATE, ReportKeys, create_app
from autoglm_router.auth import BearerVerifier, OAuth2Config
from autoglm_router.endpoints import EndpointSource, StaticSource, parse_backends
from autoglm_router.picker import POLICIES, Picker
from autoglm_router.sessions import validate_session_key
from autoglm_router.tls import PLAIN, ServedCertificate, TLSFiles, Upstream

if TYPE_CHECKING:
    from autoglm_router.kube import KubeConnection

log = logging.getLogger("autoglm_router")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="autoglm-router", description="autoglm's OpenAI-aware router.")
    p.add_argument("--host", default="127.0.0.1", help="Address to listen on (default: loopback).")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--policy", choices=POLICIES, default="LeastLoad", help="How a pod is picked.")
    p.add_argument(
        "--session-key",
        type=validate_session_key,
        default="prompt",
        help="Where SessionAffinity's key comes from: prompt (default), user, or header:<name>.",
    )
    p.add_argument("--load-factor", type=float, default=1.25, help="SessionAffinity's load bound, >= 1.")
    p.add_argument("--canary-header", default="x-autoglm-canary", help='Header whose value "always" forces the canary.')
    p.add_argument("--max-body-bytes", type=int, default=64 * 1024 * 1024, help="Larger request bodies get a 413.")
    p.add_argument(
        "--queue-scrape-interval", type=float, default=1.0, help="Seconds between queue-depth scrapes; 0: off."
    )
    p.add_argument(
        "--hold-timeout",
        type=float,
        default=120.0,
        help="Most seconds a request waits for a Ready pod while there is none (scaled to zero, starting); "
        "then a 503 with Retry-After. 0: answer the 503 at once.",
    )
    p.add_argument(
        "--hold-capacity", type=int, default=1024, help="Most requests held at once; more get the 503 at once."
    )
    p.add_argument("--drain-delay", type=float, default=0.0, help="Seconds to keep listening after SIGTERM.")
    p.add_argument("--drain-timeout", type=float, default=60.0, help="Most seconds in-flight streams get to finish.")
    tls = p.add_argument_group("HTTPS (docs/router.md#https)")
    tls.add_argument("--ssl-certfile", type=Path, help="Serve HTTPS with this PEM certificate (chain).")
    tls.add_argument("--ssl-keyfile", type=Path, help="The certificate's PEM private key.")
    tls.add_argument("--backend-tls", action="store_true", help="Call the model pods over HTTPS, verified.")
    tls.add_argument(
        "--backend-ca",
        type=Path,
        metavar="FILE",
        help="PEM certificates the pods' certificates must chain to; each one is trusted as it is, so the pods' own "
        "certificate pins it (the operator passes spec.tls's tls.crt). Default: the system's CAs.",
    )
    tls.add_argument(
        "--backend-server-name",
        metavar="NAME",
        help="The name the pods' certificate must carry (sent as SNI). Needed without --backend-ca; "
        "without it the name is not checked (pods are dialled by IP).",
    )
    src = p.add_argument_group("endpoints (static)")
    src.add_argument("--backend", action="append", default=[], metavar="REVISION=[POD@]HOST:PORT")
    src.add_argument("--canary-revision", help="The --backend revision that is the canary.")
    src.add_argument("--canary-weight", type=int, default=0, help="Percent of users on the canary, 0..100.")
    kube = p.add_argument_group("endpoints (Kubernetes)")
    kube.add_argument(
        "--deployment", help="The AutoGLMDeployment to route for (watched with the pod's service account)."
    )
    kube.add_argument("--namespace", help="Its namespace (default: the pod's own).")
    kube.add_argument("--kubeconfig", help="Reach the API server with this kubeconfig (default: in-cluster).")
    auth = p.add_argument_group("OAuth2 bearer tokens (off unless --oauth2-issuer is given; docs/auth.md)")
    auth.add_argument("--oauth2-issuer", metavar="URL", help="The issuer: tokens' iss, and where its JWKS is found.")
    auth.add_argument(
        "--oauth2-audience", action="append", default=[], metavar="AUD", help="An accepted aud (repeatable; >= 1)."
    )
    auth.add_argument(
        "--oauth2-scope", action="append", default=[], metavar="SCOPE", help="A scope every token must hold."
    )
    auth.add_argument("--oauth2-user-claim", default="sub", help="The claim naming the caller (default: sub).")
    p.add_argument("--log-level", default="INFO")
    return p


def make_source(args: argparse.Namespace) -> EndpointSource:
    if args.deployment:
        from autoglm_router.kube import KubeSource

        conn, namespace = kube_connection(args)
        return KubeSource(conn, args.deployment, namespace)
    if not args.backend:
        raise SystemExit("autoglm-router: give --deployment, or at least one --backend")
    try:
        return StaticSource(parse_backends(args.backend, args.canary_revision, args.canary_weight))
    except ValueError as exc:
        raise SystemExit(f"autoglm-router: {exc}") from None


def kube_connection(args: argparse.Namespace) -> tuple[KubeConnection, str]:
    """The API server (``--kubeconfig`` or the pod's service account) and the namespace."""
    from autoglm_router.kube import SA_DIR, KubeConnection

    if args.kubeconfig:
        if not args.namespace:
            raise SystemExit("autoglm-router: --kubeconfig needs --namespace")
        return KubeConnection.from_kubeconfig(Path(args.kubeconfig)), args.namespace
    return KubeConnection.in_cluster(), args.namespace or (SA_DIR / "namespace").read_text().strip()


def make_keys_reporter(args: argparse.Namespace) -> ReportKeys | None:
    """With ``--deployment`` and the pod's name in ``POD_NAME`` (the downward API): a condition on the pod."""
    pod = os.environ.get("POD_NAME")
    if not (args.deployment and args.oauth2_issuer and pod):
        return None
    from autoglm_router.auth.report import PodConditionReporter

    return PodConditionReporter(*kube_connection(args), pod).report


def make_verifier(args: argparse.Namespace) -> BearerVerifier | None:
    if not args.oauth2_issuer:
        return None
    try:
        config = OAuth2Config(
            issuer_url=args.oauth2_issuer,
            audiences=tuple(args.oauth2_audience),
            required_scopes=tuple(args.oauth2_scope),
            user_claim=args.oauth2_user_claim,
        )
    except ValueError as exc:
        raise SystemExit(f"autoglm-router: {exc}") from None
    return BearerVerifier(config)


def make_tls(args: argparse.Namespace) -> tuple[ServedCertificate | None, Upstream]:
    """(the certificate to serve HTTPS with or None, how to call the pods); a bad combination or an unreadable
    file exits with the reason."""
    if (args.ssl_certfile is None) != (args.ssl_keyfile is None):
        raise SystemExit("autoglm-router: give both --ssl-certfile and --ssl-keyfile, or neither")
    if not args.backend_tls and (args.backend_ca or args.backend_server_name):
        raise SystemExit("autoglm-router: --backend-ca and --backend-server-name need --backend-tls")
    for flag in ("ssl_certfile", "ssl_keyfile", "backend_ca"):
        path = getattr(args, flag)
        if path is not None and not path.is_file():
            raise SystemExit(f"autoglm-router: --{flag.replace('_', '-')} {path}: no such file")
    try:
        served = ServedCertificate(args.ssl_certfile, args.ssl_keyfile) if args.ssl_certfile else None
        upstream = Upstream.https(args.backend_ca, args.backend_server_name) if args.backend_tls else PLAIN
    except (ValueError, OSError) as exc:  # ssl.SSLError is an OSError: a file that is not PEM
        raise SystemExit(f"autoglm-router: {exc}") from None
    return served, upstream


async def serve(args: argparse.Namespace) -> None:
    if args.load_factor < 1:
        raise SystemExit("autoglm-router: --load-factor must be >= 1")
    if args.hold_timeout < 0 or args.hold_capacity < 0:
        raise SystemExit("autoglm-router: --hold-timeout and --hold-capacity must be >= 0")
    served, upstream = make_tls(args)
    picker = Picker(args.policy, args.session_key, args.load_factor, args.canary_header)
    verifier = make_verifier(args)
    app = create_app(
        make_source(args),
        picker,
        max_body_bytes=args.max_body_bytes,
        queue_scrape_interval=args.queue_scrape_interval,
        deployment=args.deployment or "",
        hold_timeout=args.hold_timeout,
        hold_capacity=args.hold_capacity,
        verifier=verifier,
        report_keys=make_keys_reporter(args),
        upstream=upstream,
    )
    # handler_cancellation: a client that leaves cancels its request at once: a held one leaves the hold
    # queue (it no longer keeps a deployment awake), one still waiting for the pod closes that connection.
    runner = web.AppRunner(
        app, handle_signals=False, shutdown_timeout=args.drain_timeout, access_log=None, handler_cancellation=True
    )
    await runner.setup()
    site = web.TCPSite(runner, args.host, args.port, ssl_context=served.context if served else None)
    await site.start()
    log.info(
        "Started router, address=%s:%d policy=%s scheme=%s backend_scheme=%s",
        args.host,
        args.port,
        args.policy,
        "http" if served is None else "https",
        upstream.scheme,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    rotation = None
    if served is not None or upstream.context is not None:  # a rotated Secret is picked up (docs/router.md#https)
        files = TLSFiles(served, upstream, args.backend_ca)
        rotation = asyncio.create_task(files.follow())
    await stop.wait()
    if rotation is not None:
        rotation.cancel()
    app[STATE].draining = True
    log.info("Received stop signal, draining, delay_s=%.1f timeout_s=%.1f", args.drain_delay, args.drain_timeout)
    await asyncio.sleep(args.drain_delay)
    await runner.cleanup()  # stops listening, waits for the handlers in flight (bounded), closes the rest
    log.info("Stopped router")


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        asyncio.run(serve(args))
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
