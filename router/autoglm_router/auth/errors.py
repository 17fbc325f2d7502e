"""Why a request's token was refused, and the HTTP answer for it (RFC 6750 §3: ``WWW-Authenticate``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

REALM = "autoglm"


class AuthError(Exception):
    """A refused token. ``error`` is RFC 6750's code: ``invalid_token`` (401), ``insufficient_scope``
    (403) or ``None`` for a request that carried no token at all (401, no error code, as the RFC says);
    ``description`` says why in words (no token contents)."""

    def __init__(self, status: int, error: str | None, description: str, scope: tuple[str, ...] = ()) -> None:
        super().__init__(description)
        self.status = status
        self.error = error
        self.description = description
        self.scope = scope


def missing_token() -> AuthError:
    return AuthError(401, None, "missing bearer token (expected `Authorization: Bearer <access token>`)")


def invalid_token(description: str) -> AuthError:
    return AuthError(401, "invalid_token", description)


def insufficient_scope(required: tuple[str, ...], missing: list[str]) -> AuthError:
    return AuthError(403, "insufficient_scope", f"token lacks scope(s) {' '.join(missing)}", scope=required)


@dataclass(frozen=True)
class AuthResponse:
    """What the router answers a refused request: status, headers and an OpenAI-style JSON body."""

    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: dict[str, Any] = field(default_factory=dict)


def _quoted(value: str, limit: int = 200) -> str:
    """A header parameter value as RFC 6750 allows it (printable ASCII without ``"`` and ``\\``): the
    description can hold a token's ``kid``, which the client chose; a CR/LF must never reach a header."""
    safe = "".join(c if " " <= c <= "~" and c not in '"\\' else "'" if c in '"\\' else "?" for c in value)
    return '"' + (safe if len(safe) <= limit else safe[: limit - 3] + "...") + '"'


def challenge(err: AuthError, realm: str = REALM) -> AuthResponse:
    """The answer to a refused token: 401 ``Bearer error="invalid_token"`` or 403
    ``Bearer error="insufficient_scope", scope="..."``, and ``{"error": {message, type, param, code}}``."""
    params = [f"realm={_quoted(realm)}"]
    if err.error:
        params.append(f"error={_quoted(err.error)}")
        params.append(f"error_description={_quoted(err.description)}")
    if err.scope:
        params.append(f"scope={_quoted(' '.join(err.scope))}")
    kind = "permission_error" if err.status == 403 else "authentication_error"
    body = {"error": {"message": err.description, "type": kind, "param": None, "code": err.error or "missing_token"}}
    return AuthResponse(err.status, {"WWW-Authenticate": "Bearer " + ", ".join(params)}, body)
