-- A group of holds written by one statement checks, before anything it wrote can
-- commit, that what it read beforehand still holds: its payer keys are still
-- unrevoked, every hold went in (no nonce or request id was taken meanwhile) and
-- every balance row it moves exists. When one does not, this raises SQLSTATE X4G01
-- naming the first that failed, the statement (and with it every row it wrote)
-- rolls back, and settlement runs the group again inside a transaction that reads
-- under locks.
CREATE FUNCTION x402_group_checks(keys_ok boolean, holds_ok boolean, balances_ok boolean)
RETURNS boolean
LANGUAGE plpgsql
VOLATILE
AS $$
BEGIN
    IF NOT keys_ok THEN
        RAISE EXCEPTION USING ERRCODE = 'X4G01', MESSAGE = 'keys';
    ELSIF NOT holds_ok THEN
        RAISE EXCEPTION USING ERRCODE = 'X4G01', MESSAGE = 'holds';
    ELSIF NOT balances_ok THEN
        RAISE EXCEPTION USING ERRCODE = 'X4G01', MESSAGE = 'balances';
    END IF;
    RETURN true;
END
$$;
