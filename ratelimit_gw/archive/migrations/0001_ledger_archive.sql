-- The ledger archive (docs/archive.md): every ledger entry Redis held, once, by what it is.

-- One row per ledger entry. Its identity is the entry itself: the account, the gateway's
-- settlement id (charge, release, overrun, hold_expired) or the top-up's idempotency key
-- (topup, adjustment) or the deletion's time (forfeit), and the type. The Redis stream id is
-- kept, but it is unique only within one account's stream and rewinds after a Redis wipe.
CREATE TABLE ledger_entries (
    account_id         text        NOT NULL,
    entry_type         text        NOT NULL,
    ref                text        NOT NULL,
    stream_id          text        NOT NULL,
    stream_ms          bigint      NOT NULL,  -- the stream id's parts, to order by
    stream_seq         bigint      NOT NULL,
    at                 timestamptz NOT NULL,  -- when Redis appended it (the stream id's time)
    key_id             text,
    model              text,
    request_id         text,
    input_tokens       bigint,
    output_tokens      bigint,
    cache_read_tokens  bigint,
    cache_write_tokens bigint,
    cost_nano          bigint      NOT NULL DEFAULT 0,  -- nano-USD charged (charge only)
    amount_nano        bigint,                          -- credited: topup, adjustment, forfeit
    hold_nano          bigint,
    balance_nano       bigint,                          -- the balance after it
    outcome            text,
    idempotency_key    text,
    reason             text,
    fields             jsonb       NOT NULL,            -- every field as Redis held it
    archived_at        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (account_id, ref, entry_type)
);
CREATE INDEX ledger_entries_at ON ledger_entries (at);
CREATE INDEX ledger_entries_account_at ON ledger_entries (account_id, at);
-- Reports filtered by key or model across every account (docs/archive.md).
CREATE INDEX ledger_entries_key_at ON ledger_entries (key_id, at);
CREATE INDEX ledger_entries_model_at ON ledger_entries (model, at);
CREATE INDEX ledger_entries_account_position
    ON ledger_entries (account_id, stream_ms DESC, stream_seq DESC);

-- Settlements that found no account (wiped or evicted): kept for audit, never applied.
CREATE TABLE orphan_settlements (
    account_id    text        NOT NULL,
    settlement_id text        NOT NULL,
    stream_id     text        NOT NULL,
    at            timestamptz NOT NULL,
    fields        jsonb       NOT NULL,
    archived_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (account_id, settlement_id)
);

-- How far each stream is archived: the last stream id written, valid only in the epoch it
-- was read in (a marker key in Redis that a wipe removes: a new epoch reads from the start).
CREATE TABLE archive_cursors (
    stream     text        PRIMARY KEY,  -- an account id, or '*orphans'
    epoch      text        NOT NULL,
    last_id    text        NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- Up to when the archive holds every entry: the start of the last pass that read every
-- stream to its end (what each usage report says it is complete until).
CREATE TABLE archive_progress (
    singleton      boolean     PRIMARY KEY DEFAULT true CHECK (singleton),
    complete_until timestamptz NOT NULL,
    updated_at     timestamptz NOT NULL DEFAULT now()
);

-- The account and key records as Redis held them, hashes only (no secret ever reaches
-- Redis), without their live state (balances, buckets, holds): what `archive restore`
-- re-creates. Balances and spend are rebuilt from the ledger.
CREATE TABLE account_snapshots (
    account_id  text        PRIMARY KEY,
    record      jsonb       NOT NULL,
    snapshot_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE key_snapshots (
    key_id      text        PRIMARY KEY,
    account_id  text        NOT NULL,
    record      jsonb       NOT NULL,
    snapshot_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX key_snapshots_account ON key_snapshots (account_id);
