-- Fewer index entries per paid request. Only holds carry a request id and only
-- deposits and operator entries an idempotency key, yet both unique constraints
-- indexed every row, NULLs included; and a capture, void or expire was indexed by
-- its hold twice (transfers_one_resolution and transfers_by_pending). The unique
-- indexes keep their names (the code matches violations by them) and now leave the
-- NULLs out; transfers_by_pending leaves out the rows transfers_one_resolution has.
-- Rebuilding them scans transfers once, under a lock that blocks writes.

ALTER TABLE transfers DROP CONSTRAINT IF EXISTS transfers_request_id_key;
CREATE UNIQUE INDEX transfers_request_id_key ON transfers (request_id)
    WHERE request_id IS NOT NULL;

ALTER TABLE transfers DROP CONSTRAINT IF EXISTS transfers_idempotency_key_key;
CREATE UNIQUE INDEX transfers_idempotency_key_key ON transfers (idempotency_key)
    WHERE idempotency_key IS NOT NULL;

DROP INDEX IF EXISTS transfers_by_pending;
CREATE INDEX transfers_by_pending ON transfers (pending_id)
    WHERE pending_id IS NOT NULL AND kind NOT IN ('capture', 'void', 'expire');
