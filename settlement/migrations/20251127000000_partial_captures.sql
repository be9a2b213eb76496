-- Partial captures: a long request billed by time posts what it has used so far
-- while its hold stays open, so a crash loses at most one period of billing.
--
-- A partial capture names the running total captured on the hold; it posts only
-- what that total adds to the hold's captured counter (open_holds.captured), so a
-- retried or late partial capture posts nothing. The hold's final resolution then
-- settles the rest exactly once: a capture names the final total and posts what
-- the partials did not, a void or expiry releases what they left held. Every row
-- that follows a partial capture records `captured_before`, the hold's captured
-- total when it was written, so each row's share is provable from the row alone.

ALTER TABLE transfers DROP CONSTRAINT IF EXISTS transfers_kind_check;
ALTER TABLE transfers ADD CONSTRAINT transfers_kind_check
    CHECK (kind IN ('deposit', 'hold', 'capture', 'void', 'expire', 'refund', 'fee', 'fee_refund', 'adjust',
                    'partial_capture'));

ALTER TABLE transfers ADD COLUMN captured_before bigint;

ALTER TABLE transfers DROP CONSTRAINT IF EXISTS transfers_resolution_points_at_hold;
ALTER TABLE transfers ADD CONSTRAINT transfers_resolution_points_at_hold CHECK (
    (kind IN ('capture', 'void', 'expire', 'partial_capture')) = (pending_id IS NOT NULL AND pending_amount IS NOT NULL)
    OR kind = 'refund'
);

-- A void or expiry releases exactly what partial captures left held.
ALTER TABLE transfers DROP CONSTRAINT IF EXISTS transfers_release_is_whole_hold;
ALTER TABLE transfers ADD CONSTRAINT transfers_release_is_rest_of_hold CHECK (
    kind NOT IN ('void', 'expire') OR amount + coalesce(captured_before, 0) = pending_amount
);

-- A final capture names the total, never less than the partials already posted.
ALTER TABLE transfers ADD CONSTRAINT transfers_captured_before_within_hold CHECK (
    captured_before IS NULL
    OR (kind IN ('capture', 'void', 'expire', 'partial_capture')
        AND captured_before >= 0 AND captured_before <= pending_amount
        AND (kind <> 'capture' OR captured_before <= amount))
);

-- A partial capture posts a positive step that keeps the running total within the hold.
ALTER TABLE transfers ADD CONSTRAINT transfers_partial_capture_within_hold CHECK (
    kind <> 'partial_capture'
    OR (captured_before IS NOT NULL AND amount > 0 AND captured_before + amount <= pending_amount)
);

-- Each partial capture starts where the previous one ended: one row per step.
CREATE UNIQUE INDEX transfers_partial_capture_once ON transfers (pending_id, captured_before)
    WHERE kind = 'partial_capture';

-- The running captured total of an open hold, proven within the hold's amount (the
-- composite key shows `held` is the hold's real amount).
ALTER TABLE open_holds
    ADD COLUMN held bigint,
    ADD COLUMN captured bigint NOT NULL DEFAULT 0;
ALTER TABLE open_holds ADD CONSTRAINT open_holds_held_fk
    FOREIGN KEY (hold_id, held) REFERENCES transfers (id, amount);
ALTER TABLE open_holds ADD CONSTRAINT open_holds_captured_within_held CHECK (
    captured >= 0 AND (captured = 0 OR (held IS NOT NULL AND captured <= held))
);
