-- Operator features: assets, account metadata and closing, platform fees, refunds,
-- credit adjustments, idempotent operator calls, incremental analytics and a webhook
-- outbox. Everything here is additive to the ledger schema.

-- Assets: a code and how many decimals its atomic unit has. Deposits and
-- adjustments name a registered asset; balances are per (account, asset), so
-- amounts of two assets never meet in one counter.
CREATE TABLE assets (
    code        text PRIMARY KEY CHECK (code ~ '^[A-Za-z0-9_.:-]{1,32}$'),
    decimals    integer NOT NULL CHECK (decimals BETWEEN 0 AND 18),
    created_at  timestamptz NOT NULL DEFAULT now()
);
INSERT INTO assets (code, decimals) VALUES ('USD', 6), ('CREDIT', 0);

ALTER TABLE accounts
    ADD COLUMN metadata  jsonb NOT NULL DEFAULT '{}'::jsonb,
    ADD COLUMN closed_at timestamptz,
    -- Merchants only: basis points of every capture that go to the platform account.
    ADD COLUMN fee_bps   integer NOT NULL DEFAULT 0 CHECK (fee_bps BETWEEN 0 AND 10000);

-- Platform fees are credited here; refunds take their share back.
INSERT INTO accounts (id, kind) VALUES ('system:platform', 'system');
-- Operator adjustments are balanced against this account.
INSERT INTO accounts (id, kind) VALUES ('system:adjust', 'system');

-- Migration 1 created the kind check unnamed: Postgres (and YugabyteDB) call it
-- transfers_kind_check, CockroachDB check_kind. Drop whichever exists, then add it by name.
ALTER TABLE transfers DROP CONSTRAINT IF EXISTS transfers_kind_check;
ALTER TABLE transfers DROP CONSTRAINT IF EXISTS check_kind;
ALTER TABLE transfers ADD CONSTRAINT transfers_kind_check
    CHECK (kind IN ('deposit', 'hold', 'capture', 'void', 'expire', 'refund', 'fee', 'fee_refund', 'adjust'));

-- Refunds of one captured payment never exceed what it captured: the counter row
-- is created at capture and its CHECK is the cap, whatever code runs.
CREATE TABLE payment_refunds (
    hold_id   text PRIMARY KEY REFERENCES transfers (id),
    captured  bigint NOT NULL CHECK (captured >= 0),
    fee       bigint NOT NULL CHECK (fee >= 0 AND fee <= captured),
    refunded  bigint NOT NULL DEFAULT 0 CHECK (refunded >= 0),
    fee_refunded bigint NOT NULL DEFAULT 0 CHECK (fee_refunded >= 0 AND fee_refunded <= fee),
    CONSTRAINT payment_refunds_within_captured CHECK (refunded <= captured)
);

-- Refunds, fees and adjustments point at their payment (pending_id) for reporting.
CREATE INDEX transfers_by_pending ON transfers (pending_id) WHERE pending_id IS NOT NULL;

-- Results of operator mutations by idempotency key: the same key and request replay
-- the stored answer; the same key with another request is refused.
CREATE TABLE operator_requests (
    idempotency_key text PRIMARY KEY CHECK (length(idempotency_key) BETWEEN 1 AND 128),
    method          text NOT NULL,
    request_hash    text NOT NULL,
    response        bytea NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now()
);

-- Analytics, aggregated incrementally: the paid path appends one small row per event
-- to analytics_pending (no shared row to contend on); a background task folds them
-- into per-minute aggregates and deletes them in the same transaction, so every event
-- counts exactly once. Reads scan minutes, never payments.
CREATE TABLE analytics_pending (
    id          bigserial PRIMARY KEY,
    at          timestamptz NOT NULL DEFAULT now(),
    -- authorized, refused, captured, voided, expired, refunded
    event       text NOT NULL,
    route       text NOT NULL DEFAULT '',
    merchant    text NOT NULL DEFAULT '',
    payer       text NOT NULL DEFAULT '',
    asset       text NOT NULL DEFAULT '',
    amount      bigint NOT NULL DEFAULT 0,
    fee         bigint NOT NULL DEFAULT 0,
    http_status integer,
    upstream_micros bigint
);

CREATE TABLE analytics_minute (
    minute      timestamptz NOT NULL,
    route       text NOT NULL,
    merchant    text NOT NULL,
    asset       text NOT NULL,
    requests    bigint NOT NULL DEFAULT 0,
    paid        bigint NOT NULL DEFAULT 0,
    refused     bigint NOT NULL DEFAULT 0,
    captures    bigint NOT NULL DEFAULT 0,
    revenue     bigint NOT NULL DEFAULT 0,
    fees        bigint NOT NULL DEFAULT 0,
    voids       bigint NOT NULL DEFAULT 0,
    expiries    bigint NOT NULL DEFAULT 0,
    upstream_errors bigint NOT NULL DEFAULT 0,
    refunds     bigint NOT NULL DEFAULT 0,
    refunded    bigint NOT NULL DEFAULT 0,
    -- Counts of captures by upstream time, log2 buckets (see analytics.rs).
    latency     bigint[] NOT NULL,
    PRIMARY KEY (minute, route, merchant, asset)
);

CREATE TABLE analytics_payer_hour (
    hour        timestamptz NOT NULL,
    payer       text NOT NULL,
    merchant    text NOT NULL,
    asset       text NOT NULL,
    payments    bigint NOT NULL DEFAULT 0,
    spent       bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (hour, payer, merchant, asset)
);

-- Webhooks: one endpoint per merchant; events go into the outbox in the same
-- transaction as the money movement, and a worker delivers them with retries.
CREATE TABLE webhook_endpoints (
    merchant    text PRIMARY KEY REFERENCES accounts (id),
    url         text NOT NULL CHECK (url ~ '^https?://'),
    secret      text NOT NULL CHECK (length(secret) >= 16),
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE webhook_outbox (
    event_id        text PRIMARY KEY DEFAULT gen_random_uuid()::text,
    merchant        text NOT NULL REFERENCES accounts (id),
    event_type      text NOT NULL,
    payload         jsonb NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    attempts        integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    delivered_at    timestamptz,
    last_status     integer,
    last_error      text
);
CREATE INDEX webhook_outbox_due ON webhook_outbox (next_attempt_at) WHERE delivered_at IS NULL;
CREATE INDEX webhook_outbox_by_merchant ON webhook_outbox (merchant, created_at DESC);
