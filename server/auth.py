"""Bearer-token checks for the API key on /v1 and the admin token on /admin.

Tokens are compared in constant time and never logged. With no admin token
configured the admin API does not exist (404), so a forgotten variable can
never leave it open.
"""

from __future__ import annotations

import hmac

from fastapi import Request

from server.errors import APIError


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def _matches(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode(), expected.encode())


async def require_api_key(request: Request) -> None:
    """Optional API key for /v1 (QUANTSERVE_API_KEY)."""
    expected = request.app.state.settings.api_key
    if expected is None:
        return
    token = _bearer(request)
    if token is None or not _matches(token, expected.get_secret_value()):
        raise APIError(401, "Incorrect or missing API key. Send 'Authorization: Bearer <key>'.",
                       code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


async def require_admin(request: Request) -> None:
    """Admin token (QUANTSERVE_ADMIN_TOKEN): 404 when unset, 401 without, 403 wrong."""
    expected = request.app.state.settings.admin_token
    if expected is None:
        raise APIError(404, "no such route (the admin API is disabled: set "
                            "QUANTSERVE_ADMIN_TOKEN to enable it)", code="admin_disabled")
    token = _bearer(request)
    if token is None:
        raise APIError(401, "admin token required: send 'Authorization: Bearer <token>'",
                       code="missing_admin_token", headers={"WWW-Authenticate": "Bearer"})
    if not _matches(token, expected.get_secret_value()):
        raise APIError(403, "admin token is not valid", code="invalid_admin_token")
