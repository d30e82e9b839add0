"""The OpenAPI description: complete for the routes, served, and fuzzed with schemathesis."""

from __future__ import annotations

import json
from collections.abc import Iterator
from importlib import resources

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from app.api import create_app
from app.api import describe_openapi as described_for
from app.hotpath import ROUTES as HOT_ROUTES
from app.settings import Settings
from app.stores import open_store
from tests.conftest import serving

ADMIN_TOKEN = "fuzz-token"
# Bodies up to 1 MiB: a fuzzed body over the limit answers 413 (tested on its own), which the
# check that invalid data is rejected does not count as a rejection.
FUZZ_SETTINGS = Settings(tickets=1_000_000, admin_token=ADMIN_TOKEN, access_log="off",
                         max_body_bytes=1024 * 1024)


def described() -> dict[str, object]:
    return json.loads(resources.files("app").joinpath("openapi.json").read_text())


def test_every_route_is_described_and_nothing_else() -> None:
    app = create_app(FUZZ_SETTINGS, open_store(FUZZ_SETTINGS))
    routes = set()
    for rule in app.url_map.iter_rules():
        path = rule.rule.replace("<int:serial>", "{serial}").replace("<hold_id>", "{id}")
        routes |= {(path, method.lower()) for method in rule.methods - {"HEAD", "OPTIONS"}}
    for path, methods in HOT_ROUTES.items():
        routes |= {(path, method.lower()) for method in methods if method != "HEAD"}
    paths = described()["paths"]
    assert isinstance(paths, dict)
    documented = {(path, method) for path, item in paths.items() for method in item}
    assert routes == documented


@pytest.fixture(scope="module")
def fuzz_server() -> Iterator[str]:
    store = open_store(FUZZ_SETTINGS)
    with serving(FUZZ_SETTINGS, store) as url:
        yield url
    store.close()


def test_the_description_is_served(fuzz_server: str) -> None:
    served = requests.get(f"{fuzz_server}/openapi.json", timeout=5)
    assert served.status_code == 200
    assert served.content == served_description()  # the very document the fuzzer uses
    assert served.json()["paths"].keys() == described()["paths"].keys()
    quantity = served.json()["components"]["schemas"]["BuyRequest"]["properties"]["quantity"]
    assert quantity["maximum"] == FUZZ_SETTINGS.max_per_request


def served_description() -> bytes:
    """What the fuzzed server serves at /openapi.json (its quantity cap filled in)."""
    return described_for(resources.files("app").joinpath("openapi.json").read_text(),
                         FUZZ_SETTINGS)


schema = schemathesis.openapi.from_dict(json.loads(served_description()))


@schema.parametrize()
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
def test_fuzzed_requests_match_the_description(case: schemathesis.Case, fuzz_server: str
                                               ) -> None:
    # Every default check runs (no 5xx; status, content type, headers and body as
    # described) except "schema-valid data is accepted": our input rules are stricter than
    # JSON Schema can say (2.0 is an integer to JSON Schema but a float to us; quantity in
    # the query or the body, not both; a reused Idempotency-Key is a documented 422).
    case.call_and_validate(base_url=fuzz_server,
                           headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
                           excluded_checks=[positive_data_acceptance])
