"""The `ratelimit-gw` command: entry point and subcommands; wiring only."""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
from collections.abc import Awaitable, Callable, Sequence
from importlib import metadata
from typing import Any

import msgspec

from . import text_output
from .account_webhooks import SetWebhookBody, WebhookChanges
from .accounts import AccountStore
from .archive import cli as archive_cli
from .archive.database import ArchiveUnavailable
from .audit import cli_actor
from .audited_changes import AuditedChanges
from .budgets import PERIODS
from .keys import DEFAULT_GRACE_S, MAX_PAGE, KeyRecord
from .limits import DESCRIPTIONS, LIMIT_NAMES, Limits, flatten
from .management import AccountError
from .money import MoneyError, parse_usd
from .settings import (
    ConfigError,
    StorageSettings,
    config_path,
    load_account_settings,
    load_archive_settings,
    load_storage_settings,
)
from .storage import Storage, StorageError, open_storage

DESCRIPTION = """\
An LLM API gateway: per-key and per-account rate limits and prepaid balances, enforced
atomically in Redis, in front of OpenAI-compatible, Anthropic and Gemini providers.

Start with `ratelimit-gw demo` (no config needed). Run a gateway with
`ratelimit-gw serve --config gateway.toml`; manage accounts and keys in its storage with
`ratelimit-gw accounts …` and `ratelimit-gw keys …`. `ratelimit-gw COMMAND --help` describes
each command."""
# Printed after a record that carries a key's secret (a new or rotated key).
SECRET_NOTICE = "This key is shown once, store it now: the gateway keeps only its hash."
# Printed after a webhook whose signing secret was just made.
WEBHOOK_SECRET_NOTICE = (
    "This signing secret is shown once: give it to the receiver now (--new-secret makes another)."
)


def _storage_settings(args: argparse.Namespace) -> StorageSettings:
    if args.storage:
        return StorageSettings(url=args.storage)
    # Only [storage]: managing accounts needs no provider secret in the environment.
    return load_storage_settings(args.config)


def _print(document: Any, as_json: bool) -> None:
    data = flatten(document)
    if as_json:
        sys.stdout.write(msgspec.json.encode(data).decode() + "\n")
        return
    sys.stdout.write(text_output.render(data))
    if isinstance(data, dict) and "key" in data:
        sys.stdout.write(f"\n{SECRET_NOTICE}\n")
    if isinstance(data, dict) and (data.get("webhook") or {}).get("secret"):
        sys.stdout.write(f"\n{WEBHOOK_SECRET_NOTICE}\n")


def _usd(text: str, *, signed: bool = False) -> int:
    try:
        return parse_usd(text, allow_zero=not signed, signed=signed)
    except MoneyError as exc:
        raise SystemExit(f"error: {exc}") from None


def worker_count(text: str) -> int:
    """``--workers`` of serve and of the benchmark (``python -m benchmarks``): one check."""
    count = int(text)
    if count < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return count


Operation = Callable[[AccountStore, argparse.Namespace], Awaitable[Any]]


async def _with_store(args: argparse.Namespace, operation: Operation) -> Any:
    settings = _storage_settings(args)
    if settings.url.startswith("memory://"):
        raise SystemExit(
            "error: memory:// storage lives inside one gateway process; pass --storage "
            "redis://… (or a --config using Redis), or use the admin API of the running gateway"
        )
    # Where budgets' periods begin for an account that names no time zone: the config's.
    zone = "UTC" if args.storage and not args.config else _default_timezone(args.config)
    storage: Storage = open_storage(settings)
    try:
        return await operation(AccountStore(storage, default_timezone=zone), args)
    finally:
        await storage.close()


def _by_cli(store: AccountStore) -> AuditedChanges:
    """The changes a CLI command makes, each audited as made by ``cli:<os user>`` (stderr)."""
    return AuditedChanges(store, cli_actor())


async def _accounts_create(store: AccountStore, a: argparse.Namespace) -> Any:
    return await _by_cli(store).create_account(
        a.id,
        balance_nano=None if a.balance_usd is None else _usd(a.balance_usd),
        limits=_limits(a),
        rpm_policy=a.rpm_policy,
        rpm_override=a.rpm_override,
    )


def _default_timezone(config: str | None) -> str:
    return load_account_settings(config).default_timezone


def _budget_changes(a: argparse.Namespace) -> dict[str, Any]:
    """The budget options of an update (`--budget-usd` with `--budget-period`; `--no-budget`)."""
    if a.no_budget:
        return {"budget_usd": None}
    changes: dict[str, Any] = {}
    if a.budget_usd is not None:
        changes["budget_usd"] = a.budget_usd
    if a.budget_period is not None:
        changes["budget_period"] = a.budget_period
    if a.budget_period_s is not None:
        changes["budget_period_s"] = a.budget_period_s
    return changes


def _budget_args(p: argparse.ArgumentParser) -> None:
    budget = p.add_mutually_exclusive_group()
    budget.add_argument(
        "--budget-usd",
        metavar="USD",
        help="a USD cap per period, e.g. 25.00 (with --budget-period)",
    )
    budget.add_argument("--no-budget", action="store_true", help="clear the budget")
    p.add_argument(
        "--budget-period",
        choices=PERIODS,
        help="day, week (from Monday) or month, in the account's time zone; custom: "
        "--budget-period-s seconds from the Unix epoch (short test and demo windows)",
    )
    p.add_argument("--budget-period-s", type=int, metavar="S", help="the length of a custom period")


_MODEL_LIMIT = re.compile(r"^(rpm|tpm)=(\d+)$")


def _model_limits_changes(a: argparse.Namespace) -> dict[str, Any]:
    """`--model-limits PATTERN:rpm=N:tpm=M,…` (every pattern at once) or `--no-model-limits`."""
    if a.no_model_limits:
        return {"model_limits": None}
    if a.model_limits is None:
        return {}
    limits: dict[str, dict[str, int]] = {}
    for item in a.model_limits:
        parts = item.split(":")
        counts: dict[str, int] = {}
        while len(parts) > 1 and (m := _MODEL_LIMIT.match(parts[-1])):
            counts[m[1]] = int(m[2])
            parts.pop()
        if not counts:
            raise SystemExit(f"error: --model-limits {item!r}: expected PATTERN:rpm=N:tpm=M")
        limits[":".join(parts)] = counts
    return {"model_limits": limits}


def _model_limits_args(p: argparse.ArgumentParser) -> None:
    group = p.add_mutually_exclusive_group()
    list_option(
        group,
        "--model-limits",
        "per-model limits, every pattern at once, e.g. 'gpt-4o*:rpm=60:tpm=100000'",
        metavar="PATTERN:rpm=N:tpm=M",
    )
    group.add_argument("--no-model-limits", action="store_true", help="clear the per-model limits")


async def _accounts_update(store: AccountStore, a: argparse.Namespace) -> Any:
    changes: dict[str, Any] = {**_budget_changes(a), **_model_limits_changes(a)}
    if a.timezone is not None:
        changes["timezone"] = a.timezone or None  # "": the config's default
    for name in (*LIMIT_NAMES, "rpm_override", "rpm_policy"):
        value = getattr(a, name)
        if value is not None:
            changes[name] = None if value == 0 and name != "rpm_policy" else value
    if a.prepaid is not None:
        changes["prepaid"] = a.prepaid == "yes"
    return await _by_cli(store).update_account(a.id, changes)


async def _accounts_topup(store: AccountStore, a: argparse.Namespace) -> Any:
    credited, after = await _by_cli(store).topup(a.id, _usd(a.amount_usd), a.idempotency_key)
    return {"credited": credited, "account": after}


async def _accounts_adjust(store: AccountStore, a: argparse.Namespace) -> Any:
    amount = _usd(a.amount_usd, signed=True)
    adjusted, after = await _by_cli(store).adjust(a.id, amount, a.reason, a.idempotency_key)
    return {"adjusted": adjusted, "account": after}


async def _accounts_ledger(store: AccountStore, a: argparse.Namespace) -> Any:
    # Only --storage: no config, so no archive; Redis's entries alone.
    archive = None if a.storage and not a.config else load_archive_settings(a.config)[1]
    try:
        return (await archive_cli.ledger_page_of(store, a, archive)).data
    except ArchiveUnavailable as exc:
        raise SystemExit(f"archive error: {exc}") from None


async def _accounts_set_disabled(store: AccountStore, a: argparse.Namespace) -> Any:
    return await _by_cli(store).set_disabled(a.id, a.verb == "disable")


async def _accounts_delete(store: AccountStore, a: argparse.Namespace) -> Any:
    return await _by_cli(store).delete_account(a.id, force=a.force)


async def _keys_create(store: AccountStore, a: argparse.Namespace) -> Any:
    created = await _by_cli(store).create_key(
        a.account,
        name=a.name,
        models=a.models,
        limits=_limits(a),
        expires_at=a.expires_at,
    )
    document = flatten(created.record)
    document["key"] = created.key
    return document


async def _keys_list(store: AccountStore, a: argparse.Namespace) -> list[KeyRecord]:
    """Every key (of one account, or of all), page by page; with --limit one page, and the
    cursor of the next on stderr when there is one."""
    if a.limit is not None:
        page = await store.page_keys(a.account, limit=a.limit, cursor=a.cursor)
        if page.next_cursor is not None:
            print(f"next cursor: {page.next_cursor}", file=sys.stderr)
        return page.data
    records: list[KeyRecord] = []
    cursor = a.cursor
    while True:
        page = await store.page_keys(a.account, limit=MAX_PAGE, cursor=cursor)
        records += page.data
        if page.next_cursor is None:
            return records
        cursor = page.next_cursor


async def _keys_update(store: AccountStore, a: argparse.Namespace) -> Any:
    changes: dict[str, Any] = {**_budget_changes(a), **_model_limits_changes(a)}
    for name in LIMIT_NAMES:
        value = getattr(a, name)
        if value is not None:
            changes[name] = None if value == 0 else value
    if a.name is not None:
        changes["name"] = a.name
    if a.models is not None or a.all_models:
        changes["models"] = a.models  # None: every model
    if a.expires_at is not None or a.no_expiry:
        changes["expires_at"] = a.expires_at
    return await _by_cli(store).update_key(a.id, changes)


async def _keys_rotate(store: AccountStore, a: argparse.Namespace) -> Any:
    rotated = await _by_cli(store).rotate_key(a.id, a.grace_s)
    return {**rotated.without_secret(), "key": rotated.key}


async def _keys_revoke(store: AccountStore, a: argparse.Namespace) -> Any:
    return await _by_cli(store).revoke_key(a.id)


async def _webhooks_set(store: AccountStore, a: argparse.Namespace) -> Any:
    body = SetWebhookBody(
        url=a.url,
        events=a.events or [],
        balance_below_usd=a.balance_below_usd,
        key_expiring_within_s=a.key_expiring_within_s,
        new_secret=a.new_secret,
    )
    return await WebhookChanges(store, cli_actor()).set(a.account, body)


OPERATIONS: dict[str, Operation] = {
    "accounts create": _accounts_create,
    "accounts show": lambda s, a: s.get_account(a.id),
    "accounts update": _accounts_update,
    "accounts topup": _accounts_topup,
    "accounts ledger": _accounts_ledger,
    "accounts list": lambda s, a: s.list_accounts(),
    "accounts disable": _accounts_set_disabled,
    "accounts enable": _accounts_set_disabled,
    "accounts delete": _accounts_delete,
    "accounts adjust": _accounts_adjust,
    "keys create": _keys_create,
    "keys list": _keys_list,
    "keys update": _keys_update,
    "keys rotate": _keys_rotate,
    "keys revoke": _keys_revoke,
    "webhooks set": _webhooks_set,
    "webhooks show": lambda s, a: WebhookChanges(s, cli_actor()).show(a.account),
    "webhooks delete": lambda s, a: WebhookChanges(s, cli_actor()).delete(a.account),
}


def _limit_args(p: argparse.ArgumentParser, clear_hint: bool = False) -> None:
    suffix = " (0 clears it)" if clear_hint else ""
    for name in LIMIT_NAMES:
        p.add_argument(f"--{name}", type=int, metavar="N", help=DESCRIPTIONS[name] + suffix)


def _limits(a: argparse.Namespace) -> Limits:
    return Limits(**{name: getattr(a, name) for name in LIMIT_NAMES})


class _ListAction(argparse.Action):
    """A list option that takes one argument per use, so it never swallows a positional:
    repeated (``--models a --models b``) or comma-separated (``--models a,b``), or both."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[Any] | None,
        option_string: str | None = None,
    ) -> None:
        items = list(getattr(namespace, self.dest) or [])
        items += [item.strip() for item in str(values).split(",") if item.strip()]
        setattr(namespace, self.dest, items)


def list_option(p: argparse._ActionsContainer, flag: str, help: str, metavar: str = "A,B") -> None:
    """Add ``flag`` as a list option (:class:`_ListAction`); unset, its value is None."""
    p.add_argument(
        flag, action=_ListAction, metavar=metavar, help=f"{help}; repeat or comma-separate"
    )


def _version() -> str:
    try:
        return metadata.version("ratelimit-gw")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


# One line per subcommand and verb, shown in --help; every verb of OPERATIONS has one.
VERB_HELP = {
    "accounts create": "create an account (prepaid when given a balance)",
    "accounts show": "show an account: balance, holds, limits",
    "accounts update": "change an account's limits (per-model too), rpm policy, prepaid flag, "
    "budget or time zone",
    "accounts topup": "credit a prepaid account, once per idempotency key",
    "accounts ledger": "list an account's ledger entries, newest first",
    "accounts list": "list account ids",
    "accounts disable": "disable an account: its keys get a 403 on the next request",
    "accounts enable": "enable a disabled account again",
    "accounts delete": "delete an account (refused with a balance or live holds unless --force)",
    "accounts adjust": "credit or debit an account by hand, with a reason (a ledger entry)",
    "keys create": "create an API key for an account (its secret is shown once)",
    "keys list": "list one account's keys, or every account's (never their secrets)",
    "keys update": "change a key's name, models, limits (per-model too), budget or expiry (in "
    "force within a second)",
    "keys rotate": "give a key a new secret; the old one works for a grace period",
    "keys revoke": "revoke a key by its id (key_…); effective on the next request",
    "webhooks set": "set an account's own webhook: URL, events, thresholds (docs/webhooks.md)",
    "webhooks show": "show an account's own webhook (never its secret)",
    "webhooks delete": "remove an account's own webhook",
}
GROUP_HELP = {
    "accounts": "manage accounts directly in storage (Redis)",
    "keys": "manage API keys directly in storage (Redis)",
    "webhooks": "manage accounts' own webhooks directly in storage (Redis)",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ratelimit-gw",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser(
        "serve",
        help="run the gateway from a config file",
        description="Run the gateway. Needs a config file: --config FILE or $RLGW_CONFIG "
        "(docs/configuration.md; deploy/gateway.toml is an example).",
    )
    serve.add_argument("--config", metavar="FILE", help="TOML config file (default: $RLGW_CONFIG)")
    serve.add_argument("--host", help="listen address (overrides [server] host)")
    serve.add_argument("--port", type=int, help="listen port (overrides [server] port)")
    serve.add_argument(
        "--workers",
        type=worker_count,
        default=1,
        metavar="N",
        help="processes sharing the port (needs redis:// storage; default 1)",
    )
    # The benchmark's baseline: relay with no keys, limits or balance. Never for real traffic.
    serve.add_argument("--passthrough-for-benchmark", action="store_true", help=argparse.SUPPRESS)

    demo = sub.add_parser(
        "demo",
        help="try it: a mock upstream and a gateway on memory://, with a demo key",
        description="Start a mock upstream (all three protocols) and a gateway on memory:// "
        "storage with a demo account, key and admin token; print snippets to call it.",
    )
    demo.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    demo.add_argument(
        "--port", type=int, default=8080, help="listen port (default 8080; a free one if busy)"
    )

    mock = sub.add_parser(
        "mock-upstream",
        help="run a fake OpenAI/Anthropic/Gemini provider (tests, benchmarks)",
        description="A fake provider speaking the OpenAI, Anthropic and Gemini APIs with "
        "deterministic answers and exact usage; x-mock-* request headers change one request.",
    )
    mock.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    mock.add_argument("--port", type=int, default=9090, help="listen port (default 9090)")
    mock.add_argument(
        "--latency-ms", type=float, default=0.0, help="delay before each answer's headers"
    )
    mock.add_argument(
        "--chunk-delay-ms", type=float, default=0.0, help="delay between a stream's chunks"
    )
    mock.add_argument("--chunks", type=int, default=4, help="text chunks in each answer")
    mock.add_argument("--tokens-per-chunk", type=int, default=5, help="output tokens in each chunk")
    mock.add_argument(
        "--no-request-log",
        action="store_true",
        help="keep no log of received requests (benchmark baseline)",
    )

    archive_cli.add_parsers(sub)
    for group, verbs in (
        (
            "accounts",
            (
                "create",
                "show",
                "update",
                "topup",
                "ledger",
                "list",
                "disable",
                "enable",
                "delete",
                "adjust",
            ),
        ),
        ("keys", ("create", "list", "update", "rotate", "revoke")),
        ("webhooks", ("set", "show", "delete")),
    ):
        gp = sub.add_parser(group, help=GROUP_HELP[group], description=GROUP_HELP[group])
        gsub = gp.add_subparsers(dest="verb", required=True, metavar="VERB")
        for verb in verbs:
            verb_help = VERB_HELP.get(f"{group} {verb}")
            p = gsub.add_parser(verb, help=verb_help, description=verb_help)
            p.add_argument(
                "--storage", metavar="URL", help="storage URL, e.g. redis://127.0.0.1:6379/0"
            )
            p.add_argument(
                "--config",
                metavar="FILE",
                help="take the storage URL from this config file's [storage] (default: "
                "$RLGW_CONFIG); provider secrets need not be set",
            )
            p.add_argument("--json", action="store_true", help="print JSON")
            _add_verb_args(group, verb, p)
    return parser


_RPM_POLICY_HELP = "how the account's rpm is set: fixed (--rpm), balance, or tier (total top-ups)"


def _add_verb_args(group: str, verb: str, p: argparse.ArgumentParser) -> None:
    if group == "webhooks":
        _webhook_args(verb, p)
    elif group == "accounts":
        if verb != "list":
            p.add_argument("id", help="account id")
        if verb == "create":
            p.add_argument(
                "--balance-usd",
                metavar="USD",
                help="prepaid balance, e.g. 10.00 (makes it prepaid)",
            )
            _limit_args(p)
            p.add_argument(
                "--rpm-policy",
                choices=("fixed", "balance", "tier"),
                default="fixed",
                help=f"{_RPM_POLICY_HELP} (default fixed)",
            )
            p.add_argument(
                "--rpm-override", type=int, metavar="N", help="rpm that wins over the policy"
            )
        elif verb == "update":
            _limit_args(p, clear_hint=True)
            p.add_argument(
                "--rpm-policy",
                choices=("fixed", "balance", "tier"),
                help=_RPM_POLICY_HELP,
            )
            p.add_argument(
                "--rpm-override",
                type=int,
                metavar="N",
                help="rpm that wins over the policy (0 clears it)",
            )
            p.add_argument(
                "--prepaid",
                choices=("yes", "no"),
                help="whether requests are held against the balance",
            )
            _budget_args(p)
            _model_limits_args(p)
            p.add_argument(
                "--timezone",
                metavar="ZONE",
                help="IANA time zone where its budgets' periods begin, e.g. Europe/Paris "
                "('' clears it: [accounts] default_timezone)",
            )
        elif verb == "topup":
            p.add_argument("amount_usd", help="amount to credit in USD, e.g. 25.00")
            p.add_argument(
                "--idempotency-key",
                required=True,
                help="e.g. the invoice id: the same key credits once, however often it is sent",
            )
        elif verb == "ledger":
            p.add_argument(
                "--limit", type=int, default=50, metavar="N", help="entries to show (default 50)"
            )
            p.add_argument(
                "--before",
                metavar="ENTRY_ID",
                help="entries older than this one (the next before a page printed); with "
                "[archive] in the config, pages go on into the archive",
            )
        elif verb == "delete":
            p.add_argument(
                "--force",
                action="store_true",
                help="delete even with a balance or live holds (the balance is forfeited)",
            )
        elif verb == "adjust":
            p.add_argument("amount_usd", help="signed: 5.00 credits, -5.00 debits")
            p.add_argument("--reason", required=True, help="why (kept in the ledger)")
            p.add_argument(
                "--idempotency-key",
                required=True,
                help="the same key adjusts once, however often it is sent",
            )
    elif verb == "create":
        p.add_argument("account", help="the account the key belongs to")
        p.add_argument("--name", default="", help="a label for the key, e.g. ci")
        list_option(p, "--models", "allowed model ids or globs, e.g. 'gpt-*' (default: all)")
        p.add_argument(
            "--expires-at", metavar="TIME", help="RFC 3339 time, e.g. 2027-01-01T00:00:00Z"
        )
        _limit_args(p)
    elif verb == "list":
        p.add_argument("account", nargs="?", help="one account's keys (default: every account's)")
        p.add_argument(
            "--limit", type=int, metavar="N", help=f"one page of at most N keys (N <= {MAX_PAGE})"
        )
        p.add_argument("--cursor", help="start after this (the next cursor a page printed)")
    else:
        p.add_argument("id", help="key id (key_…), as `keys list` shows it; not the secret")
        if verb == "update":
            p.add_argument("--name", help="a new label for the key")
            models = p.add_mutually_exclusive_group()
            list_option(models, "--models", "allowed model ids or globs, e.g. 'gpt-*'")
            models.add_argument("--all-models", action="store_true", help="allow every model")
            expiry = p.add_mutually_exclusive_group()
            expiry.add_argument(
                "--expires-at", metavar="TIME", help="RFC 3339 time, e.g. 2027-01-01T00:00:00Z"
            )
            expiry.add_argument("--no-expiry", action="store_true", help="never expires")
            _limit_args(p, clear_hint=True)
            _budget_args(p)
            _model_limits_args(p)
        elif verb == "rotate":
            p.add_argument(
                "--grace-s",
                type=int,
                default=DEFAULT_GRACE_S,
                metavar="S",
                help=f"seconds the old secret keeps working (default {DEFAULT_GRACE_S}; 0: it "
                "stops now)",
            )


def _webhook_args(verb: str, p: argparse.ArgumentParser) -> None:
    p.add_argument("account", help="account id")
    if verb != "set":
        return
    p.add_argument("--url", required=True, help="where events are POSTed (http:// or https://)")
    list_option(p, "--events", "balance.low, key.expiring", metavar="EVENT,…")
    p.add_argument(
        "--balance-below-usd", metavar="USD", help="balance.low: a balance below this, e.g. 5.00"
    )
    p.add_argument(
        "--key-expiring-within-s",
        type=float,
        metavar="S",
        help="key.expiring: a key that expires within this many seconds",
    )
    p.add_argument(
        "--new-secret",
        action="store_true",
        help="make a new signing secret (shown once; the old one stops at once)",
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .serve import configure_logging

    configure_logging()
    if args.command != "serve":  # serve installs it in each worker process
        from .serve import install_fast_loop

        install_fast_loop()
    try:
        return _dispatch(args)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    except AccountError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    except StorageError as exc:
        print(f"storage error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "serve":
        from .live_config import ConfigFile
        from .serve import serve_workers

        config_file = ConfigFile.load(config_path(args.config))
        settings = config_file.started
        server = settings.server
        if args.host or args.port is not None:
            server = msgspec.structs.replace(
                server,
                host=args.host or server.host,
                port=server.port if args.port is None else args.port,
            )
            settings = msgspec.structs.replace(settings, server=server)
        serve_workers(
            settings,
            args.workers,
            passthrough=args.passthrough_for_benchmark,
            config_file=config_file,
        )
    elif args.command == "demo":
        from .demo import run_demo

        asyncio.run(run_demo(args.host, args.port))
    elif args.command == "mock-upstream":
        from .testing.mock_upstream import MockSettings, run_mock_upstream

        mock_settings = MockSettings(
            latency_ms=args.latency_ms,
            chunk_delay_ms=args.chunk_delay_ms,
            chunks=args.chunks,
            tokens_per_chunk=args.tokens_per_chunk,
            record_requests=not args.no_request_log,
        )
        run_mock_upstream(args.host, args.port, mock_settings)
    elif args.command in archive_cli.COMMANDS:
        return archive_cli.dispatch(args)
    else:
        operation = OPERATIONS[f"{args.command} {args.verb}"]
        _print(asyncio.run(_with_store(args, operation)), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
