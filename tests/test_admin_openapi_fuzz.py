"""The admin API against its own OpenAPI document, fuzzed by schemathesis over real HTTP.

A ``ratelimit-gw serve`` process on ``memory://`` and one on a real Redis serve
``/admin/openapi.json``; schemathesis loads it from there and sends each documented
operation valid and invalid requests (bounded: a few dozen examples per operation). Every
answer must be no 5xx, of a documented status, and of that status's documented body.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    ignored_auth,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from benchmarks.local_redis import free_port
from ratelimit_gw.admin import ROUTES
from ratelimit_gw.admin_routes import AccountId, AdminRoute, KeyId

from .processes import serve_env, start_serve, stop
from .redis_process import RedisProcess

EXAMPLES = 50  # per operation and mode: about 30 s for the whole run
FUZZ_TOKEN = "fuzz-admin-token-0123456789"
AUTH = {"Authorization": f"Bearer {FUZZ_TOKEN}"}
CHECKS = [
    not_a_server_error,
    ignored_auth,  # a success with the token is refused without it and with a wrong one
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


def _wait_ready(url: str, process: subprocess.Popen[Any], log: Path) -> None:
    deadline = time.monotonic() + 20
    while True:
        assert process.poll() is None, f"the gateway exited: {log.read_text(errors='replace')}"
        try:
            if requests.get(f"{url}/readyz", timeout=1).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        assert time.monotonic() < deadline, f"not ready: {log.read_text(errors='replace')}"
        time.sleep(0.1)


@pytest.fixture(scope="module", params=["memory", "redis"])
def served(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, archive_database: str
) -> Iterator[str]:
    """The base URL of a serve process with the admin API on, on each backend."""
    if request.param == "memory":
        storage_url = "memory://"
    else:
        server: RedisProcess = request.getfixturevalue("redis_server")
        storage_url = server.url
        with redis.Redis.from_url(storage_url) as client:
            client.flushall()  # the session's Redis: what earlier tests left is not ours
    directory = tmp_path_factory.mktemp("fuzz")
    config = directory / "gateway.toml"
    config.write_text(
        f'[storage]\nurl = "{storage_url}"\n\n'
        '[[admin.tokens]]\nname = "fuzzer"\ntoken = "${RLGW_FUZZ_TOKEN}"\naccess = "full"\n'
        # The usage report and old ledger pages read it (this run's, migrated).
        f'\n[archive]\nurl = "{archive_database}"\nin_serve = false\n'
    )
    log = directory / "serve.log"
    port = free_port()
    with log.open("wb") as out:
        process = start_serve(
            config,
            port=port,
            env=serve_env(RLGW_FUZZ_TOKEN=FUZZ_TOKEN),  # a named token from the file
            stdout=out,
            stderr=out,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            _wait_ready(url, process, log)
            yield url
        finally:
            stop(process)


@pytest.fixture(scope="module")
def document(served: str) -> Any:
    """The document as the gateway serves it, loaded by schemathesis."""
    return schemathesis.openapi.from_url(f"{served}/admin/openapi.json", headers=AUTH)


@pytest.fixture(scope="module")
def existing(served: str) -> dict[Any, str]:
    """An account with a balance and a key on it, by the type of their ids: the path ids an
    ``existing`` run sends, so bodies are fuzzed against real things, not only 404s."""
    created = requests.post(
        f"{served}/admin/accounts", json={"id": "acme", "balance_usd": "100.00"}, headers=AUTH
    )
    assert created.status_code == 201, created.text
    key = requests.post(f"{served}/admin/keys", json={"account": "acme"}, headers=AUTH)
    assert key.status_code == 201, key.text
    return {AccountId: "acme", KeyId: key.json()["id"]}


# Each route with its path ids generated; one with ids in its path also with existing ones.
RUNS = [
    pytest.param(route, ids, id=f"{route.operation_id}-{ids}")
    for route in ROUTES
    for ids in (("generated", "existing") if route.path_types else ("generated",))
]


@pytest.mark.slow
@pytest.mark.parametrize("mode", list(GenerationMode))
@pytest.mark.parametrize(("route", "ids"), RUNS)
def test_every_admin_answer_is_documented_and_none_is_a_server_error(
    document: Any,
    served: str,
    existing: dict[Any, str],
    route: AdminRoute,
    mode: GenerationMode,
    ids: str,
) -> None:
    path_parameters = (
        {name: existing[kind] for name, kind in route.path_types.items()}
        if ids == "existing"
        else None
    )
    operation = document.find_operation_by_id(route.operation_id)
    strategy = operation.as_strategy(generation_mode=mode, path_parameters=path_parameters)

    @given(strategy)
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def answers_as_documented(case: schemathesis.Case) -> None:
        case.call_and_validate(base_url=served, headers=AUTH, checks=CHECKS)

    answers_as_documented()
