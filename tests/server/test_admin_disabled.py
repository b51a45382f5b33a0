"""With no admin token configured the admin API does not exist (404), never open."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.helpers.server_process import running_server
from tests.helpers.tiny_model_dir import write_tiny_model
from tests.server.admin_helpers import AUTH
from tests.server.test_admin_api import ADMIN_ROUTES

pytestmark = pytest.mark.slow


def test_admin_routes_are_404_without_an_admin_token(tmp_path: Path) -> None:
    env = {"QUANTSERVE_MODEL": str(write_tiny_model(tmp_path / "model")),
           "QUANTSERVE_ADMIN_TOKEN": ""}
    with running_server(tmp_path, env=env) as server, httpx.Client(
        base_url=server.base_url
    ) as client:
        for method, path, body in ADMIN_ROUTES:
            for headers in ({}, AUTH):
                response = client.request(method, path, json=body, headers=headers)
                assert response.status_code == 404, (method, path, response.text)
                assert response.json()["error"]["type"] == "not_found_error"
        assert client.get("/v1/models").status_code == 200
