"""Custom endpoint key pools (docs/custom-endpoints.md#upstream-key-pools): each key's headers
resolved from env references only, the endpoint's failover fields, callers kept from sending
any header a key sets, and every mistake named by its field path.
"""

from __future__ import annotations

from collections.abc import Mapping

import pytest

from ratelimit_gw.settings import ConfigError, CustomEndpoint, UpstreamKey, parse_settings

POOL = """
[[custom_endpoints]]
provider_account = "pipeshift"
name = "model"
base_url = "https://api.pipeshift.com/api"
headers = { Content-Type = "application/json" }
rpm = 900
max_attempts = 3
cooldown_default_s = 20
probe_interval_s = 45
[[custom_endpoints.keys]]
name = "team-a"
headers = { Authorization = "Bearer ${PIPESHIFT_KEY_A}", X-Project = "${PROJECT_A}" }
rpm = 500
tpm = 200000
[[custom_endpoints.keys]]
name = "team-b"
headers = { Authorization = "Bearer ${PIPESHIFT_KEY_B}" }
"""
KEY_B_HEADERS = 'headers = { Authorization = "Bearer ${PIPESHIFT_KEY_B}" }'
ENV = {"PIPESHIFT_KEY_A": "ps-a", "PROJECT_A": "proj-a", "PIPESHIFT_KEY_B": "ps-b"}
SINGLE = """
[[custom_endpoints]]
provider_account = "pipeshift"
name = "model"
base_url = "https://api.pipeshift.com/api"
headers = { Authorization = "Bearer ${PIPESHIFT_KEY_A}" }
"""


def endpoint(text: str, environ: Mapping[str, str] = ENV) -> CustomEndpoint:
    return parse_settings(text, environ).custom_endpoints[("pipeshift", "model")]


def config_error(text: str, environ: Mapping[str, str] = ENV) -> str:
    with pytest.raises(ConfigError) as caught:
        parse_settings(text, environ)
    return str(caught.value)


def test_an_endpoint_pool_resolves_each_keys_headers_and_ceilings() -> None:
    pool = endpoint(POOL)
    assert pool.keys == (
        UpstreamKey(
            name="team-a",
            headers={"Authorization": "Bearer ps-a", "X-Project": "proj-a"},
            rpm=500,
            tpm=200000,
        ),
        UpstreamKey(name="team-b", headers={"Authorization": "Bearer ps-b"}),
    )
    # Each attempt adds the headers of the key it picked; these go with every attempt.
    assert pool.upstream_headers == {"Content-Type": "application/json"}
    assert (pool.rpm, pool.tpm) == (900, None)  # the whole pool's ceiling
    assert (pool.max_attempts, pool.cooldown_default_s, pool.probe_interval_s) == (3, 20.0, 45.0)


def test_an_endpoint_without_keys_is_a_pool_of_one_key_named_after_it() -> None:
    single = endpoint(SINGLE)
    assert single.keys == (UpstreamKey(name="model", headers={}),)
    assert single.upstream_headers == {"Authorization": "Bearer ps-a"}  # its credential, as before
    assert (single.max_attempts, single.cooldown_default_s, single.probe_interval_s) == (
        2,
        60.0,
        30.0,
    )


def test_callers_never_send_a_header_any_key_of_the_pool_sets() -> None:
    policy = endpoint(POOL).client_headers
    assert {"authorization", "x-project", "content-type"} <= policy.withheld
    caller = {
        "Authorization": "Bearer rlgw-caller",
        "x-PROJECT": "forged",
        "OpenAI-Organization": "org-caller",  # transparent: the rest still passes
        "X-Trace": "t",
    }
    assert policy.forwarded(caller) == {"OpenAI-Organization": "org-caller", "X-Trace": "t"}


def test_a_header_only_the_second_key_sets_is_withheld_too() -> None:
    text = POOL.replace(KEY_B_HEADERS, KEY_B_HEADERS[:-2] + ', X-Region = "${PROJECT_A}" }')
    assert "x-region" in endpoint(text).client_headers.withheld


@pytest.mark.parametrize(
    ("edit", "environ", "message"),
    [
        (
            ('name = "team-b"', 'name = "team-a"'),
            ENV,
            "custom_endpoints[0].keys[1].name: duplicate key 'team-a' in this endpoint's pool",
        ),
        (
            ('name = "team-b"', 'name = "team b"'),
            ENV,
            "custom_endpoints[0].keys[1].name: 'team b' must be 1-64 letters, digits, '_', '.' "
            "or '-', starting with a letter or digit",
        ),
        (
            ("${PIPESHIFT_KEY_B}", "ps-literal"),
            ENV,
            "custom_endpoints[0].keys[1].headers.Authorization: credentials must be an env "
            "reference like ${NAME}",
        ),
        (  # every header of a key is a credential, whatever its name
            ('"${PROJECT_A}"', '"proj-literal"'),
            ENV,
            "custom_endpoints[0].keys[0].headers.X-Project: credentials must be an env "
            "reference like ${NAME}",
        ),
        (
            ("", ""),
            {"PIPESHIFT_KEY_A": "ps-a", "PROJECT_A": "proj-a"},
            "custom_endpoints[0].keys[1].headers.Authorization: environment variable "
            "PIPESHIFT_KEY_B is not set",
        ),
        (
            ("", ""),
            {**ENV, "PIPESHIFT_KEY_B": "ps-b\n"},
            "custom_endpoints[0].keys[1].headers.Authorization: the value contains CR, LF or "
            "NUL (a trailing newline?)",
        ),
        (
            (KEY_B_HEADERS, 'headers = { "bad name" = "${PIPESHIFT_KEY_B}" }'),
            ENV,
            "custom_endpoints[0].keys[1].headers.bad name: 'bad name' is not a valid HTTP "
            "header name",
        ),
        (  # two credentials would be sent, whatever the letter case
            (
                'headers = { Content-Type = "application/json" }',
                'headers = { authorization = "Bearer ${PIPESHIFT_KEY_A}" }',
            ),
            ENV,
            "custom_endpoints[0].keys[0].headers.Authorization: custom_endpoints[0].headers "
            "sets authorization too, and every request would carry both; set it in the keys only",
        ),
        (  # one upstream key under two names, whatever the order and letter case
            (
                KEY_B_HEADERS,
                'headers = { x-project = "${PROJECT_A}", '
                'authorization = "Bearer ${PIPESHIFT_KEY_B}" }',
            ),
            {**ENV, "PIPESHIFT_KEY_B": "ps-a"},
            "custom_endpoints[0].keys[1].headers: the same headers as key 'team-a'; list each "
            "upstream key once",
        ),
        (
            (KEY_B_HEADERS, "headers = {}"),
            ENV,
            "custom_endpoints[0].keys[1].headers: empty; a key sends its credential here, e.g. "
            '{ Authorization = "Bearer ${KEY_A}" }',
        ),
        (
            (KEY_B_HEADERS, ""),
            ENV,
            "custom_endpoints[0].keys[1].headers: required field is missing",
        ),
        (
            ("rpm = 500\n", 'rpm = 500\napi_key_env = "PIPESHIFT_KEY_A"\n'),
            ENV,
            "custom_endpoints[0].keys[0].api_key_env: unknown field (allowed: name, headers, "
            "rpm, tpm)",
        ),
        (
            ("tpm = 200000", "tpm = 0"),
            ENV,
            "custom_endpoints[0].keys[0].tpm: Expected `int` >= 1",
        ),
        (
            ("max_attempts = 3", "max_attempts = 0"),
            ENV,
            "custom_endpoints[0].max_attempts: Expected `int` >= 1",
        ),
        (
            ("cooldown_default_s = 20", "cooldown_default_s = 0"),
            ENV,
            "custom_endpoints[0].cooldown_default_s: Expected `float` > 0.0",
        ),
        (
            ("probe_interval_s = 45", "probe_interval_s = -1"),
            ENV,
            "custom_endpoints[0].probe_interval_s: Expected `float` > 0.0",
        ),
    ],
)
def test_a_bad_endpoint_pool_is_named_by_its_field_path(
    edit: tuple[str, str], environ: Mapping[str, str], message: str
) -> None:
    assert config_error(POOL.replace(*edit), environ) == message
