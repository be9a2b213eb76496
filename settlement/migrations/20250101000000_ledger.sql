-- The 402x ledger, after TigerBeetle's model: accounts carry posted and pending
-- debit/credit counters; money moves only by immutable transfers; a hold is a
-- pending transfer that is later captured (for at most its amount), voided or
-- expired, each resolution a new row pointing at the hold. The invariants live
-- here, in constraints, so no code path can break them.

CREATE TABLE accounts (
    id          text PRIMARY KEY CHECK (id ~ '^[A-Za-z0-9_.:-]{1,64}$'),
    kind        text NOT NULL CHECK (kind IN ('payer', 'merchant', 'system')),
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- Deposits are transfers from this account: credit bought from outside the ledger.
INSERT INTO accounts (id, kind) VALUES ('system:credit', 'system');

CREATE TABLE balances (
    account_id       text NOT NULL REFERENCES accounts (id),
    asset            text NOT NULL CHECK (length(asset) BETWEEN 1 AND 128),
    debits_pending   bigint NOT NULL DEFAULT 0 CHECK (debits_pending >= 0),
    debits_posted    bigint NOT NULL DEFAULT 0 CHECK (debits_posted >= 0),
    credits_pending  bigint NOT NULL DEFAULT 0 CHECK (credits_pending >= 0),
    credits_posted   bigint NOT NULL DEFAULT 0 CHECK (credits_posted >= 0),
    -- Set for payers: what they owe (held or spent) never exceeds what they paid in.
    debits_must_not_exceed_credits boolean NOT NULL,
    PRIMARY KEY (account_id, asset),
    CONSTRAINT balances_debits_within_credits CHECK (
        NOT debits_must_not_exceed_credits
        OR debits_pending + debits_posted <= credits_posted
    )
);

CREATE TABLE payer_keys (
    public_key  text PRIMARY KEY CHECK (public_key ~ '^[0-9a-f]{64}$'),
    account_id  text NOT NULL REFERENCES accounts (id),
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz
);
CREATE INDEX payer_keys_account ON payer_keys (account_id);

CREATE TABLE transfers (
    id              text PRIMARY KEY DEFAULT gen_random_uuid()::text,
    kind            text NOT NULL CHECK (kind IN ('deposit', 'hold', 'capture', 'void', 'expire', 'refund')),
    debit_account   text NOT NULL REFERENCES accounts (id),
    credit_account  text NOT NULL REFERENCES accounts (id),
    asset           text NOT NULL,
    amount          bigint NOT NULL CHECK (amount >= 0),
    created_at      timestamptz NOT NULL DEFAULT now(),

    -- Resolutions (capture, void, expire) point at their hold and copy its amount;
    -- the composite foreign key below proves the copy is the hold's real amount, so
    -- the CHECK "a capture never posts more than its hold" is the database's word.
    pending_id      text,
    pending_amount  bigint,

    -- Holds: the client-chosen idempotency id and a hash of the request it named,
    -- the proof's identity, and when the sweeper may expire it.
    request_id        text UNIQUE,
    request_hash      text,
    payer_key         text,
    nonce             text,
    route             text,
    resource          text,
    expires_at        timestamptz,
    amount_authorized bigint CHECK (amount_authorized >= 0),

    -- Deposits: idempotency key and the hash of the request it named.
    idempotency_key   text UNIQUE,

    -- Resolution detail for reporting.
    reason            text,
    http_status       integer,
    upstream_micros   bigint,

    CONSTRAINT transfers_id_amount UNIQUE (id, amount),
    CONSTRAINT transfers_pending_fk FOREIGN KEY (pending_id, pending_amount)
        REFERENCES transfers (id, amount),
    CONSTRAINT transfers_resolution_points_at_hold CHECK (
        (kind IN ('capture', 'void', 'expire')) = (pending_id IS NOT NULL AND pending_amount IS NOT NULL)
        OR kind = 'refund'
    ),
    CONSTRAINT transfers_capture_within_hold CHECK (
        kind NOT IN ('capture', 'void', 'expire') OR amount <= pending_amount
    ),
    CONSTRAINT transfers_release_is_whole_hold CHECK (
        kind NOT IN ('void', 'expire') OR amount = pending_amount
    ),
    CONSTRAINT transfers_hold_fields CHECK (
        kind <> 'hold' OR (request_id IS NOT NULL AND request_hash IS NOT NULL AND payer_key IS NOT NULL
            AND nonce IS NOT NULL AND expires_at IS NOT NULL AND amount_authorized >= amount)
    ),
    CONSTRAINT transfers_deposit_fields CHECK (
        kind <> 'deposit' OR request_hash IS NOT NULL
    )
);

-- A hold resolves at most once: one capture, void or expire per hold, ever.
CREATE UNIQUE INDEX transfers_one_resolution ON transfers (pending_id)
    WHERE kind IN ('capture', 'void', 'expire');

-- A nonce pays for one request per payer account.
CREATE UNIQUE INDEX transfers_payer_nonce ON transfers (debit_account, nonce)
    WHERE kind = 'hold';

-- Payments by payer or merchant, newest first (keyset pagination on created_at, id).
CREATE INDEX transfers_holds_by_payer ON transfers (debit_account, created_at DESC, id DESC)
    WHERE kind = 'hold';
CREATE INDEX transfers_holds_by_merchant ON transfers (credit_account, created_at DESC, id DESC)
    WHERE kind = 'hold';
CREATE INDEX transfers_holds_newest ON transfers (created_at DESC, id DESC)
    WHERE kind = 'hold';

-- Unresolved holds: a work queue, not a source of truth (the resolution rows are).
-- Resolving a hold deletes its row here; that delete is the lock capture, void and
-- the sweeper race on, and the small table keeps the expiry sweep cheap however
-- many holds history holds.
CREATE TABLE open_holds (
    hold_id     text PRIMARY KEY REFERENCES transfers (id),
    expires_at  timestamptz NOT NULL
);
CREATE INDEX open_holds_expiry ON open_holds (expires_at);
