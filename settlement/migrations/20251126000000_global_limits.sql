-- Global rate limits: one counter row per route, identity and fixed window, shared by
-- every settlement replica. Authorize takes a slot with an atomic upsert in the same
-- transaction as the hold, so a refused or rolled-back authorization counts nothing.
CREATE TABLE rate_windows (
    route          text NOT NULL,
    -- 'payer:<account>' or 'client:<address>'.
    identity       text NOT NULL,
    window_seconds integer NOT NULL CHECK (window_seconds > 0),
    -- Unix seconds, a multiple of window_seconds.
    window_start   bigint NOT NULL,
    taken          integer NOT NULL CHECK (taken > 0),
    PRIMARY KEY (route, identity, window_seconds, window_start)
);
-- The sweeper deletes windows that are over.
CREATE INDEX rate_windows_end ON rate_windows ((window_start + window_seconds));
