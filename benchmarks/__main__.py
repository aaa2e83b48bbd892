"""``python -m benchmarks``: measure the gateway against the mock, side by side."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ratelimit_gw.cli import worker_count
from ratelimit_gw.serve import configure_logging, install_fast_loop

from .bench import __doc__ as bench_doc
from .bench import main as bench_main
from .runs import ARCHIVE_RATE_RPS, DEFAULT_SECTIONS, SECTIONS, TARGET_RATE_RPS, BenchOptions


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=(bench_doc or "").split("\n\n", 1)[0],
    )
    parser.add_argument("--duration", type=float, default=4.0, help="seconds per wrk run")
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help=(
            "times (a), (b) and (c), native and converted, and one_key and pool_of_4 are "
            "measured back to back"
        ),
    )
    parser.add_argument(
        "--connections", type=int, default=128, help="wrk connections in the saturation runs"
    )
    parser.add_argument(
        "--upstream",
        choices=("lean", "aiohttp"),
        default="lean",
        help=(
            "the mock upstream of (a), (b) and (c): lean (the benchmark's, costing least CPU) "
            "or the full aiohttp one (the converter and pools sections always use the full one)"
        ),
    )
    parser.add_argument(
        "--workers",
        type=worker_count,
        default=1,
        help="gateway processes for (b) and (c) (serve --workers)",
    )
    parser.add_argument("--keys", type=int, default=100_000, help="keys in the many-keys run")
    parser.add_argument("--fixed-rate-duration", type=float, default=6.0)
    parser.add_argument(
        "--target-rate",
        type=float,
        default=TARGET_RATE_RPS,
        help="the fixed open-loop rate (req/s) the added-latency target is judged at",
    )
    parser.add_argument(
        "--only",
        choices=SECTIONS,
        help=(
            "run one section: core ((a), (b), (c), many keys, fixed rates), converter "
            "(an OpenAI caller, native vs an Anthropic-protocol model), pools (a provider "
            "with one upstream key vs one with a pool of four) or archive (the ledger "
            "archiver off vs on, on the PostgreSQL at $RLGW_BENCH_POSTGRES_URL); default: "
            "the first three"
        ),
    )
    parser.add_argument(
        "--archive-rate",
        type=float,
        default=ARCHIVE_RATE_RPS,
        help="the archive section's fixed open-loop rate (req/s)",
    )
    parser.add_argument("--output", default="bench-results/bench.json")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging()
    install_fast_loop()
    bench_main(
        BenchOptions(
            duration_s=args.duration,
            rounds=args.rounds,
            connections=args.connections,
            upstream=args.upstream,
            workers=args.workers,
            many_keys=args.keys,
            fixed_rate_duration_s=args.fixed_rate_duration,
            target_rate_rps=args.target_rate,
            output=Path(args.output),
            sections=(args.only,) if args.only else DEFAULT_SECTIONS,
            archive_rate_rps=args.archive_rate,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
