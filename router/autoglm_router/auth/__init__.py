"""OAuth2 bearer tokens at the router (``spec.auth.oauth2``): JWT access tokens checked with PyJWT
against the issuer's keys (discovery document → JWKS, cached, refetched on an unknown ``kid``).

    verifier = BearerVerifier(OAuth2Config.from_spec(spec["auth"]["oauth2"]))
    try:
        user = (await verifier.authenticate(request.headers.get("Authorization"))).user
    except AuthError as err:
        answer = challenge(err)  # status, headers (WWW-Authenticate), JSON body

See docs/auth.md.
"""

from autoglm_router.auth.config import ALLOWED_ALGORITHMS, OAuth2Config
from autoglm_router.auth.errors import AuthError, AuthResponse, challenge
from autoglm_router.auth.keys import IssuerError, IssuerKeys
from autoglm_router.auth.verify import BearerVerifier, Principal, bearer_token, token_scopes

__all__ = [
    "ALLOWED_ALGORITHMS",
    "AuthError",
    "AuthResponse",
    "BearerVerifier",
    "IssuerError",
    "IssuerKeys",
    "OAuth2Config",
    "Principal",
    "bearer_token",
    "challenge",
    "token_scopes",
]
