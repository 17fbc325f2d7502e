"""The router's request step for OAuth2 (``--oauth2-issuer``): a refused token is answered here (401/403
with RFC 6750's challenge; nothing reaches a pod), an accepted one leaves its user on the request for the
proxy (the canary's user and the ``user`` session key, in place of anything the client wrote)."""

from __future__ import annotations

from aiohttp import web

from autoglm_router.auth.errors import AuthError, challenge
from autoglm_router.auth.verify import BearerVerifier
from autoglm_router.proxy import AUTH_RESULT, VERIFIED_USER, Authenticate


def bearer_hook(verifier: BearerVerifier) -> Authenticate:
    async def authenticate(request: web.Request) -> web.StreamResponse | None:
        try:
            principal = await verifier.authenticate(request.headers.get("Authorization"))
        except AuthError as err:
            answer = challenge(err)
            request[AUTH_RESULT] = err.error or "missing_token"
            return web.json_response(answer.body, status=answer.status, headers=answer.headers)
        request[VERIFIED_USER] = principal.user
        request[AUTH_RESULT] = "authenticated"
        return None

    return authenticate
