"""The self-view, ``GET /v1/key`` (and under each converter prefix): a caller's own key, its
account's limits and money, what is left now and the models it may use
(docs/limits-and-balance.md, "What a key sees of itself").

What it promises: it consumes nothing (no admission, no bucket token, no concurrency slot,
no hold: the limiter's peek writes nothing), so it answers 200 while the key is over its
limits; it refuses exactly the keys admission refuses, with the same 401 / 403 in the
caller's protocol; its figures are the admin API's (``GET /admin/accounts/{id}``, ``GET
/admin/keys``), read from storage as the request arrives, not from the key cache; and it
names nothing but the caller's own key and account (never a secret).
"""

from __future__ import annotations

import msgspec
from aiohttp import web

from ..budgets import Budget
from ..context import context
from ..errors import GatewayError
from ..limiter import BucketReport, Decision
from ..limits import Limits, flatten
from ..management import AccountError
from ..model_limits import ModelLimit
from ..protocols import ADAPTERS, credential_protocol
from ..rejections import key_error
from ..services import SERVICES

# The self-view every SDK's caller may reach without a prefix: its protocol is the one whose
# credential it sent (docs/limits-and-balance.md).
SHARED_PATH = "/v1/key"
# Where it is served: the shared path, then each protocol's own prefix (README.md, Routes).
PATHS = (
    SHARED_PATH,
    "/v1beta/key",
    "/openai/v1/key",
    "/anthropic/v1/key",
    "/gemini/v1beta/key",
    "/gemini/v1/key",
)


class KeyView(msgspec.Struct, kw_only=True):
    """The caller's key as ``GET /admin/keys`` lists it, less its account and revocation."""

    id: str
    name: str
    prefix: str  # the first characters of the secret, never more
    models: tuple[str, ...]  # the ids and globs it is limited to ([]: every model)
    limits: Limits  # flat on the wire: rpm, tpm, concurrency (null: no such limit)
    expires_at: str | None  # for a rotated-out secret: when its grace ends
    created_at: str
    budget: Budget | None  # its cap, this period's spend and reset (null: no budget)
    model_limits: dict[str, ModelLimit]  # pattern → its rpm/tpm ({}: none)


class AccountView(msgspec.Struct, kw_only=True):
    """The caller's account as ``GET /admin/accounts/{id}`` shows it, in part."""

    id: str
    prepaid: bool
    # Prepaid accounts only (null otherwise): available = balance − held (live holds).
    balance_usd: str | None
    held_usd: str | None
    available_usd: str | None
    limits: Limits  # flat; rpm is the rate in force (after rpm_policy and rpm_override)
    rpm_policy: str
    timezone: str  # where its budgets' days, weeks and months begin
    budget: Budget | None  # its cap, this period's spend and reset (null: no budget)
    model_limits: dict[str, ModelLimit]  # pattern → its rpm/tpm ({}: none)


class ConcurrencyLeft(msgspec.Struct, kw_only=True):
    limit: int
    in_use: int
    remaining: int


class Remaining(msgspec.Struct, kw_only=True):
    """What the next request may use: of each kind, the tightest of the key's and the
    account's buckets (what the rate-limit headers report); null where no limit applies.
    Per-model limits are not in it (they depend on the model): a request's headers show
    them."""

    requests: BucketReport | None  # reset_ms: until the bucket is full again
    tokens: BucketReport | None
    concurrency: ConcurrencyLeft | None


class SelfView(msgspec.Struct, kw_only=True):
    """The answer. ``key.budget`` and ``account.budget`` are each scope's budget (SPEC §15:
    cap, period, this period's spend and holds, remaining, reset), as the admin API shows
    them. Clients must ignore fields they do not know."""

    object: str = "key"
    key: KeyView
    account: AccountView
    remaining: Remaining
    allowed_models: list[str]  # configured model ids the key may use, sorted


_ENCODER = msgspec.json.Encoder()


async def show_key(request: web.Request) -> web.Response:
    svc = request.app[SERVICES]
    ctx = context(request)
    if request.path == SHARED_PATH:
        ctx.protocol = credential_protocol(request.headers, request.query)
    secret = ADAPTERS[ctx.protocol].credential(request.headers, request.query)
    key = await svc.keys.authenticate(secret)
    ctx.key = key
    ctx.decision = decision = await svc.limiter.peek(key.account, key.id)
    if (refused := key_error(decision.reason)) is not None:
        raise refused
    # Fresh, not the cache's: the admin API's figures, and a rotated-out secret's grace.
    record = await svc.accounts.find_key(secret or "")
    if record is None or record.revoked:
        raise _refused("key_revoked" if record else "invalid_key")
    try:
        account = await svc.accounts.get_account(key.account)
        # The key's budget with its period's spend (a lookup does not read it).
        key_budget = (await svc.accounts.get_key(key.account, record.id)).budget
    except AccountError:  # wiped since the peek
        raise _refused("invalid_key") from None
    prepaid = account.prepaid
    view = SelfView(
        key=KeyView(
            id=record.id,
            name=record.name,
            prefix=record.prefix,
            models=record.models,
            limits=record.limits,
            expires_at=record.expires_at,
            created_at=record.created_at,
            budget=key_budget,
            model_limits=record.model_limits,
        ),
        account=AccountView(
            id=account.id,
            prepaid=prepaid,
            balance_usd=account.balance_usd if prepaid else None,
            held_usd=account.held_usd if prepaid else None,
            available_usd=account.available_usd if prepaid else None,
            limits=msgspec.structs.replace(account.limits, rpm=decision.account_rpm),
            rpm_policy=account.rpm_policy,
            timezone=account.timezone,
            budget=account.budget,
            model_limits=account.model_limits,
        ),
        remaining=_remaining(decision),
        allowed_models=[m.id for m in svc.config.catalog.listings(record)],
    )
    return web.Response(body=_ENCODER.encode(flatten(view)), content_type="application/json")


def _refused(reason: str) -> GatewayError:
    refused = key_error(reason)
    assert refused is not None  # a key reason
    return refused


def _remaining(decision: Decision) -> Remaining:
    concurrency = None
    if decision.concurrency_limit is not None and decision.concurrency_in_use is not None:
        limit, in_use = decision.concurrency_limit, decision.concurrency_in_use
        concurrency = ConcurrencyLeft(limit=limit, in_use=in_use, remaining=max(limit - in_use, 0))
    return Remaining(requests=decision.requests, tokens=decision.tokens, concurrency=concurrency)
