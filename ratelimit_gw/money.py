"""Money as integers: nano-USD everywhere inside; decimal strings at the edges (admin, CLI)."""

from __future__ import annotations

from decimal import Decimal, InvalidOperation

NANO_PER_USD = 1_000_000_000
TOKENS_PER_PRICE_UNIT = 1_000_000  # prices are per million tokens


class MoneyError(ValueError):
    pass


def parse_usd(text: str | int, *, allow_zero: bool = True, signed: bool = False) -> int:
    """A decimal USD string (at most 9 decimals) → nano-USD. Floats are refused on purpose;
    a negative amount only when ``signed`` (an adjustment's debit)."""
    if isinstance(text, bool) or not isinstance(text, str | int):
        raise MoneyError('amounts must be decimal strings, e.g. "12.50"')
    try:
        amount = Decimal(str(text).strip())
    except InvalidOperation:
        raise MoneyError(f"{text!r} is not a decimal amount") from None
    if not amount.is_finite():  # before any arithmetic: "sNaN" would raise InvalidOperation
        raise MoneyError(f"{text!r} is not a decimal amount")
    nano = amount * NANO_PER_USD
    if nano != nano.to_integral_value():
        raise MoneyError(f"{text!r} must have at most 9 decimal places")
    if amount == 0 and not allow_zero:
        raise MoneyError(f"{text!r} must not be 0" if signed else f"{text!r} must be > 0")
    if amount < 0 and not signed:
        raise MoneyError(f"{text!r} must be {'≥' if allow_zero else '>'} 0")
    return int(nano)


def format_usd(nano: int) -> str:
    """nano-USD → "12.50", "0.000150", "-0.25": exact, at least two decimals."""
    text = f"{Decimal(nano) / NANO_PER_USD:.9f}".rstrip("0")
    whole, _, frac = text.partition(".")
    return f"{whole}.{frac.ljust(2, '0')}"


def cost_nano(
    tokens_in: int,
    tokens_out: int,
    in_per_mtok_nano: int,
    out_per_mtok_nano: int,
    *,
    cache_read_tokens: int = 0,
    cache_read_per_mtok_nano: int = 0,
    cache_write_tokens: int = 0,
    cache_write_per_mtok_nano: int = 0,
) -> int:
    """Cost of a usage, rounded up to the next nano-USD (exact integer arithmetic).

    ``tokens_in`` counts every input token; the cache reads and writes among them are
    priced at their own rates, the rest at the input rate.
    """
    cached = min(cache_read_tokens + cache_write_tokens, tokens_in)
    cache_read = min(cache_read_tokens, cached)
    numerator = (
        (tokens_in - cached) * in_per_mtok_nano
        + cache_read * cache_read_per_mtok_nano
        + (cached - cache_read) * cache_write_per_mtok_nano
        + tokens_out * out_per_mtok_nano
    )
    return -(-numerator // TOKENS_PER_PRICE_UNIT)


def affordable_output_tokens(
    available_nano: int, input_cost_nano: int, out_per_mtok_nano: int
) -> int:
    """How many output tokens the money left after the input would pay for."""
    left = available_nano - input_cost_nano
    if left <= 0:
        return 0
    if out_per_mtok_nano == 0:
        return 2**31
    return left * TOKENS_PER_PRICE_UNIT // out_per_mtok_nano
