"""The README documents what the service really serves."""

from __future__ import annotations

import re

from fastapi.testclient import TestClient

from service.api import create_app
from service.settings import Settings
from tests.server import ROOT

README = (ROOT / "README.md").read_text()


def test_readme_opens_with_the_two_commands() -> None:
    head = README[:1500]
    assert "make serve" in head and "make test" in head


def test_every_route_is_documented() -> None:
    spec = TestClient(create_app(10**6)).get("/openapi.json").json()
    for path, methods in spec["paths"].items():
        for method in methods:
            route = f"{method.upper()} /v1{re.sub(r'{[a-z_]+}', '{id}', path)}"
            assert route in README, f"{route} is not in README.md"


def test_every_setting_is_documented() -> None:
    for name in Settings.model_fields:
        assert f"GRAFT_{name.upper()}" in README, f"GRAFT_{name.upper()} is not in README.md"
