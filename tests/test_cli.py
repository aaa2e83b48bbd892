"""The CLI as an operator meets it: --help and --version, list options beside positionals, a
new key's secret shown once and never echoed back, human output without Python internals,
and account commands that need only a config's [storage] (§12).

The account and key commands run as subprocesses against a real Redis (``redis_url``)."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pytest

from ratelimit_gw import text_output
from ratelimit_gw.cli import SECRET_NOTICE, build_parser

from .cli_helpers import audit_lines, cli, cli_json

PYPROJECT_VERSION = re.search(
    r'^version = "([^"]+)"$',
    (Path(__file__).resolve().parent.parent / "pyproject.toml").read_text(),
    re.MULTILINE,
)


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _commands(
    parser: argparse.ArgumentParser, prefix: str = ""
) -> list[tuple[str, argparse.ArgumentParser]]:
    """Every command and verb with its parser: ("serve", …), ("keys create", …)."""
    found = []
    for name, sub in _subparsers(parser).items():
        path = f"{prefix} {name}".strip()
        found.append((path, sub))
        found += _commands(sub, path)
    return found


def test_help_describes_every_command_verb_and_option() -> None:
    parser = build_parser()
    commands = _commands(parser)
    assert {path for path, _ in commands} >= {"serve", "demo", "accounts create", "keys revoke"}
    undescribed = []
    for path, sub in [("", parser), *commands]:
        if path and not sub.description:
            undescribed.append(f"{path}: no description")
        for action in sub._actions:
            if isinstance(action, argparse._SubParsersAction):
                undescribed += [
                    f"{path} {choice.dest}: no help"
                    for choice in action._choices_actions
                    if not choice.help
                ]
            elif action.help is None:
                undescribed.append(f"{path} {'/'.join(action.option_strings) or action.dest}")
    assert undescribed == []


@pytest.mark.slow  # runs the CLI as a subprocess
def test_help_and_version_from_the_shell() -> None:
    done = cli("--help")
    assert done.returncode == 0
    for line in ("serve", "demo", "mock-upstream", "accounts", "keys"):
        assert re.search(rf"^    {line}\s+\S", done.stdout, re.MULTILINE), line
    verbs = cli("keys", "--help")
    assert re.search(r"^    revoke\s+revoke a key by its id", verbs.stdout, re.MULTILINE)
    assert PYPROJECT_VERSION is not None
    version = cli("--version")
    assert (version.returncode, version.stdout) == (0, f"ratelimit-gw {PYPROJECT_VERSION[1]}\n")


def test_a_list_option_takes_one_value_per_use_and_leaves_positionals_alone() -> None:
    parser = build_parser()
    args = parser.parse_args(["keys", "create", "--models", "gpt-*", "acme"])
    assert (args.account, args.models) == ("acme", ["gpt-*"])
    args = parser.parse_args(
        ["keys", "create", "--models", "gpt-4o, claude-*", "acme", "--models", "gemini-*"]
    )
    assert (args.account, args.models) == ("acme", ["gpt-4o", "claude-*", "gemini-*"])
    assert parser.parse_args(["keys", "create", "acme"]).models is None


def test_human_output_of_any_document_has_no_python_reprs() -> None:
    document = {
        "id": "key_1",
        "models": ("gpt-*", "claude-*"),
        "expires_at": None,
        "name": "",
        "revoked": False,
        "limits": {"rpm": 5, "tpm": None, "concurrency": None},
        "account": {"id": "acme", "prepaid": True, "tags": []},
        "entries": [{"type": "topup", "amount_usd": "1.00"}, {"type": "charge"}],
    }
    assert text_output.render(document) == (
        "id           key_1\n"
        "models       gpt-*, claude-*\n"
        "expires_at   -\n"
        "name         -\n"
        "revoked      no\n"
        "rpm          5\n"
        "tpm          -\n"
        "concurrency  -\n"
        "account\n"
        "  id       acme\n"
        "  prepaid  yes\n"
        "  tags     -\n"
        "entries\n"
        "  type        topup\n"
        "  amount_usd  1.00\n"
        "\n"
        "  type  charge\n"
    )
    assert text_output.render(["acme", "beta"]) == "acme\nbeta\n"
    assert text_output.render([]) == ""
    for reprs in ("None", "True", "False", "('", "{'", "['"):
        assert reprs not in text_output.render(document)


@pytest.mark.slow  # runs the CLI as a subprocess
def test_a_new_key_is_printed_as_shown_once_and_json_stays_machine_readable(
    redis_url: str,
) -> None:
    storage = ("--storage", redis_url)
    cli_json("accounts", "create", "acme", *storage)
    done = cli("keys", "create", "--models", "gpt-*", "acme", *storage)
    assert done.returncode == 0, done.stderr
    (audit,) = audit_lines(done.stderr)  # stderr holds the change's audit line, nothing else
    assert audit["action"] == "key.create"
    secret = re.search(r"^key\s+(rlgw-\S+)$", done.stdout, re.MULTILINE)
    assert secret is not None, done.stdout
    assert re.search(r"^models\s+gpt-\*$", done.stdout, re.MULTILINE)
    assert done.stdout.endswith(f"\n\n{SECRET_NOTICE}\n")
    assert "shown once, store it now" in SECRET_NOTICE

    as_json = cli("keys", "create", "acme", "--models", "a,b", "--json", *storage)
    created = json.loads(as_json.stdout)  # one JSON document: no notice mixed in
    assert (created["account"], created["models"]) == ("acme", ["a", "b"])


@pytest.mark.slow  # runs the CLI as a subprocess
def test_revoking_by_the_secret_refuses_without_echoing_it(redis_url: str) -> None:
    storage = ("--storage", redis_url)
    cli_json("accounts", "create", "acme", *storage)
    created = cli_json("keys", "create", "acme", *storage)
    secret = created["key"]
    done = cli("keys", "revoke", secret, *storage)
    assert (done.returncode, done.stdout) == (1, "")
    assert secret not in done.stderr
    assert done.stderr == (
        "error: that is a key's secret, not its id; its account's key list shows the id "
        f"(key_…) beside the prefix '{created['prefix']}'\n"
    )
    assert not any(k["revoked"] for k in cli_json("keys", "list", "acme", *storage))


@pytest.mark.slow  # runs the CLI as a subprocess
def test_account_commands_need_only_the_storage_part_of_a_config(
    redis_url: str, tmp_path: Path
) -> None:
    """The gateway's config names provider keys that only the gateway's host has: the CLI
    run elsewhere must not need them."""
    config = tmp_path / "gateway.toml"
    config.write_text(
        f'[storage]\nurl = "{redis_url}"\n\n'
        '[[providers]]\nname = "openai"\nprotocol = "openai"\n'
        'base_url = "https://api.openai.com"\napi_key_env = "OPENAI_API_KEY"\n\n'
        '[[models]]\nid = "gpt-4o-mini"\nprovider = "openai"\n'
    )
    created = cli_json("accounts", "create", "acme", "--config", str(config))
    assert created["id"] == "acme"
    assert cli_json("keys", "create", "acme", "--config", str(config))["account"] == "acme"
    # Serving does need the secret, and says which.
    serve = cli("serve", "--config", str(config))
    assert serve.returncode == 2
    assert "providers[0].api_key_env: environment variable OPENAI_API_KEY is not set" in (
        serve.stderr
    )


@pytest.mark.slow  # runs the CLI as a subprocess
def test_account_commands_without_storage_say_how_to_give_it() -> None:
    done = cli("accounts", "list")
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr.startswith("config error: no storage: pass --storage redis://")
