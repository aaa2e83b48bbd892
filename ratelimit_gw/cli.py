"""The `ratelimit-gw` command: entry point and subcommands; wiring only."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec

from .accounts import AccountError, AccountStore
from .limits import DESCRIPTIONS, LIMIT_NAMES, Limits, flatten
from .money import MoneyError, parse_usd
from .settings import ConfigError, StorageSettings, load_settings
from .storage import Storage, StorageError, open_storage


def _storage_settings(args: argparse.Namespace) -> StorageSettings:
    if args.storage:
        return StorageSettings(url=args.storage)
    return load_settings(args.config).storage


def _print(document: Any, as_json: bool) -> None:
    data = flatten(document)
    if as_json:
        sys.stdout.write(msgspec.json.encode(data).decode() + "\n")
        return
    rows = data if isinstance(data, list) else [data]
    for row in rows:
        if isinstance(row, dict):
            width = max((len(k) for k in row), default=0)
            for name, value in row.items():
                print(f"{name:<{width}}  {value}")
            print()
        else:
            print(row)


def _usd(text: str) -> int:
    try:
        return parse_usd(text)
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
    storage: Storage = open_storage(settings)
    try:
        return await operation(AccountStore(storage), args)
    finally:
        await storage.close()


async def _accounts_create(store: AccountStore, a: argparse.Namespace) -> Any:
    return await store.create_account(
        a.id,
        balance_nano=None if a.balance_usd is None else _usd(a.balance_usd),
        limits=_limits(a),
        rpm_policy=a.rpm_policy,
        rpm_override=a.rpm_override,
    )


async def _accounts_update(store: AccountStore, a: argparse.Namespace) -> Any:
    changes: dict[str, Any] = {}
    for name in (*LIMIT_NAMES, "rpm_override", "rpm_policy"):
        value = getattr(a, name)
        if value is not None:
            changes[name] = None if value == 0 and name != "rpm_policy" else value
    if a.prepaid is not None:
        changes["prepaid"] = a.prepaid == "yes"
    return await store.update_account(a.id, changes)


async def _accounts_topup(store: AccountStore, a: argparse.Namespace) -> Any:
    credited = await store.topup(a.id, _usd(a.amount_usd), a.idempotency_key)
    return {"credited": credited, "account": await store.get_account(a.id)}


async def _keys_create(store: AccountStore, a: argparse.Namespace) -> Any:
    created = await store.create_key(
        a.account,
        name=a.name,
        models=a.models,
        limits=_limits(a),
        expires_at=a.expires_at,
    )
    document = flatten(created.record)
    document["key"] = created.key
    return document


OPERATIONS: dict[str, Operation] = {
    "accounts create": _accounts_create,
    "accounts show": lambda s, a: s.get_account(a.id),
    "accounts update": _accounts_update,
    "accounts topup": _accounts_topup,
    "accounts ledger": lambda s, a: s.ledger(a.id, a.limit),
    "accounts list": lambda s, a: s.list_accounts(),
    "keys create": _keys_create,
    "keys list": lambda s, a: s.list_keys(a.account),
    "keys revoke": lambda s, a: s.revoke_key(a.id),
}


def _limit_args(p: argparse.ArgumentParser, clear_hint: bool = False) -> None:
    suffix = " (0 clears it)" if clear_hint else ""
    for name in LIMIT_NAMES:
        p.add_argument(f"--{name}", type=int, help=DESCRIPTIONS[name] + suffix)


def _limits(a: argparse.Namespace) -> Limits:
    return Limits(**{name: getattr(a, name) for name in LIMIT_NAMES})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ratelimit-gw", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", help="TOML config file (default: $RLGW_CONFIG)")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--workers", type=worker_count, default=1, help="processes sharing the port")
    # The benchmark's baseline: relay with no keys, limits or balance. Never for real traffic.
    serve.add_argument("--passthrough-for-benchmark", action="store_true", help=argparse.SUPPRESS)

    demo = sub.add_parser("demo", help="mock upstream + gateway on memory://, with a demo key")
    demo.add_argument("--host", default="127.0.0.1")
    demo.add_argument("--port", type=int, default=8080)

    mock = sub.add_parser("mock-upstream", help="a fake OpenAI/Anthropic/Gemini provider")
    mock.add_argument("--host", default="127.0.0.1")
    mock.add_argument("--port", type=int, default=9090)
    mock.add_argument("--latency-ms", type=float, default=0.0)
    mock.add_argument("--chunk-delay-ms", type=float, default=0.0)
    mock.add_argument("--chunks", type=int, default=4)
    mock.add_argument("--tokens-per-chunk", type=int, default=5)
    mock.add_argument(
        "--no-request-log",
        action="store_true",
        help="keep no log of received requests (benchmark baseline)",
    )

    for group, verbs in (
        ("accounts", ("create", "show", "update", "topup", "ledger", "list")),
        ("keys", ("create", "list", "revoke")),
    ):
        gp = sub.add_parser(group, help=f"manage {group} (directly in storage)")
        gsub = gp.add_subparsers(dest="verb", required=True)
        for verb in verbs:
            p = gsub.add_parser(verb)
            p.add_argument("--storage", help="storage URL, e.g. redis://127.0.0.1:6379/0")
            p.add_argument("--config", help="take the storage URL from this config file")
            p.add_argument("--json", action="store_true", help="print JSON")
            _add_verb_args(group, verb, p)
    return parser


def _add_verb_args(group: str, verb: str, p: argparse.ArgumentParser) -> None:
    if group == "accounts":
        if verb != "list":
            p.add_argument("id", help="account id")
        if verb == "create":
            p.add_argument("--balance-usd", help="prepaid balance, e.g. 10.00 (makes it prepaid)")
            _limit_args(p)
            p.add_argument("--rpm-policy", choices=("fixed", "balance", "tier"), default="fixed")
            p.add_argument("--rpm-override", type=int)
        elif verb == "update":
            _limit_args(p, clear_hint=True)
            p.add_argument("--rpm-policy", choices=("fixed", "balance", "tier"))
            p.add_argument("--rpm-override", type=int, help="rpm that wins over the policy")
            p.add_argument("--prepaid", choices=("yes", "no"))
        elif verb == "topup":
            p.add_argument("amount_usd", help="e.g. 25.00")
            p.add_argument("--idempotency-key", required=True)
        elif verb == "ledger":
            p.add_argument("--limit", type=int, default=50)
    elif verb == "create":
        p.add_argument("account")
        p.add_argument("--name", default="")
        p.add_argument("--models", nargs="+", help="allowed model ids or globs")
        p.add_argument("--expires-at", help="RFC 3339 time")
        _limit_args(p)
    elif verb == "list":
        p.add_argument("account")
    else:
        p.add_argument("id", help="key id (key_…)")


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
        from .serve import serve_workers

        settings = load_settings(args.config)
        server = settings.server
        if args.host or args.port is not None:
            server = msgspec.structs.replace(
                server,
                host=args.host or server.host,
                port=server.port if args.port is None else args.port,
            )
            settings = msgspec.structs.replace(settings, server=server)
        serve_workers(settings, args.workers, passthrough=args.passthrough_for_benchmark)
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
    else:
        operation = OPERATIONS[f"{args.command} {args.verb}"]
        _print(asyncio.run(_with_store(args, operation)), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
