"""Who may call what: the API key on /v1, the admin token on /admin (404 when
unset), tokens never written to the log, CORS closed and a loopback bind by
default."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.helpers.server_process import ServerProcess
from tests.reliability.fuzzing import error_shape_problem
from tests.reliability.serving import ADMIN_AUTH, ADMIN_TOKEN, API_AUTH, API_KEY, MODEL_ID

pytestmark = pytest.mark.slow  # real server processes (tiny model)

COMPLETION = {"model": MODEL_ID, "prompt": "hi", "max_tokens": 2}
WRONG_SECRET = "wrong-secret-3c7f0a91"


def status_and_code(response: httpx.Response) -> tuple[int, str | None]:
    assert error_shape_problem(response.status_code, response.content) is None
    return response.status_code, response.json()["error"]["code"]


@pytest.mark.parametrize(("headers", "expected"), [
    ({}, (401, "invalid_api_key")),
    ({"Authorization": f"Bearer {WRONG_SECRET}"}, (401, "invalid_api_key")),
    ({"Authorization": f"Basic {API_KEY}"}, (401, "invalid_api_key")),
    ({"Authorization": f"Bearer {API_KEY}x"}, (401, "invalid_api_key")),
    ({"Authorization": f"Bearer {ADMIN_TOKEN}"}, (401, "invalid_api_key")),
])
def test_v1_needs_the_api_key(
    http: httpx.Client, headers: dict[str, str], expected: tuple[int, str]
) -> None:
    for response in (http.post("/v1/completions", json=COMPLETION, headers=headers),
                     http.get("/v1/models", headers=headers)):
        assert status_and_code(response) == expected
        assert response.headers["www-authenticate"] == "Bearer"
    assert http.post("/v1/completions", json=COMPLETION, headers=API_AUTH).status_code == 200
    lower = {"Authorization": f"bearer {API_KEY}"}
    assert http.get("/v1/models", headers=lower).status_code == 200


@pytest.mark.parametrize(("headers", "expected"), [
    ({}, (401, "missing_admin_token")),
    ({"Authorization": f"Bearer {WRONG_SECRET}"}, (403, "invalid_admin_token")),
    ({"Authorization": f"Bearer {API_KEY}"}, (403, "invalid_admin_token")),
    ({"Authorization": "Bearer"}, (401, "missing_admin_token")),
])
def test_admin_needs_the_admin_token(
    http: httpx.Client, headers: dict[str, str], expected: tuple[int, str]
) -> None:
    for response in (http.get("/admin/jobs", headers=headers),
                     http.post("/admin/quantize", json={"method": "int8"}, headers=headers),
                     http.delete("/admin/artifacts/" + "0" * 64, headers=headers)):
        assert status_and_code(response) == expected
    assert http.get("/admin/jobs", headers=ADMIN_AUTH).status_code == 200


def test_tokens_never_reach_the_log(http: httpx.Client, served: ServerProcess) -> None:
    for token in (API_KEY, ADMIN_TOKEN, WRONG_SECRET):
        auth = {"Authorization": f"Bearer {token}", "X-Request-ID": "token-log-check"}
        http.post("/v1/completions", json=COMPLETION, headers=auth)
        http.get("/admin/jobs", headers=auth)
        http.post("/admin/quantize", json={"method": "nope"}, headers=auth)
    http.post("/v1/completions", json={**COMPLETION, "user": WRONG_SECRET}, headers=API_AUTH)
    log = served.log()
    assert "token-log-check" in log, "the requests were logged"
    for secret in (API_KEY, ADMIN_TOKEN, WRONG_SECRET):
        assert secret not in log
    assert "Bearer" not in log


def test_without_an_admin_token_the_admin_api_does_not_exist(open_server: ServerProcess) -> None:
    with httpx.Client(base_url=open_server.base_url, timeout=30) as http:
        for response in (http.get("/admin/jobs"),
                         http.get("/admin/jobs", headers={"Authorization": "Bearer anything"}),
                         http.post("/admin/quantize", json={"method": "int8"}),
                         http.post("/admin/activate", json={"artifact": "base"})):
            assert status_and_code(response) == (404, "admin_disabled")
        assert http.post("/v1/completions", json=COMPLETION).status_code == 200, \
            "no API key configured: /v1 is open"


def test_cors_is_closed_by_default(open_server: ServerProcess) -> None:
    origin = {"Origin": "https://evil.example"}
    with httpx.Client(base_url=open_server.base_url, timeout=30) as http:
        preflight = http.options("/v1/completions", headers={
            **origin, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type"})
        simple = http.get("/v1/models", headers=origin)
    assert preflight.status_code in (404, 405)
    for response in (preflight, simple):
        assert not any(name.startswith("access-control-") for name in response.headers)


def _listening_addresses(port: int) -> set[str]:
    """Local addresses with a TCP socket in LISTEN state on `port` (IPv4 and IPv6)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        path = Path(table)
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            address, port_hex = fields[1].rsplit(":", 1)
            if int(port_hex, 16) == port and fields[3] == "0A":
                found.add(address)
    return found


def test_binds_loopback_unless_told_otherwise(open_server: ServerProcess) -> None:
    assert "--host" not in open_server.process.args
    assert _listening_addresses(open_server.port) == {"0100007F"}, "127.0.0.1 only"
