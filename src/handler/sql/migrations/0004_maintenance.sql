-- queue-worker 0004: pruning, run inside invocations.
--
-- queue_prune(...) deletes one small chunk of finished history: completed/cancelled jobs whose
-- last change is older than p_completed_before, dead letters older than p_dead_before, and
-- expired idempotency records. It takes a transaction-level advisory lock first and returns
-- NULL at once when another invocation holds it, so only one prunes at a time. Finished jobs
-- are never in the claim's index nor locked by a claim, so pruning never blocks a claim;
-- rows locked by anyone are skipped, not waited for. Callers repeat it (one short transaction
-- per chunk) while it keeps finding rows and their time allows.

CREATE FUNCTION queue_prune(
    p_completed_before timestamptz,
    p_dead_before timestamptz,
    p_chunk int DEFAULT 500)
RETURNS TABLE (jobs_pruned int, dead_letters_pruned int, idempotency_pruned int)
LANGUAGE plpgsql
AS $$
#variable_conflict use_column
DECLARE
    v_jobs int;
    v_dead int;
    v_idem int;
BEGIN
    IF p_chunk IS NULL OR p_chunk < 1 OR p_chunk > 10000 THEN
        RAISE EXCEPTION 'queue_prune: p_chunk must be between 1 and 10000' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF NOT pg_try_advisory_xact_lock(7261400917338130) THEN
        RETURN;  -- another invocation is pruning
    END IF;

    WITH doomed AS (
        SELECT id FROM queue_jobs
        WHERE status IN ('completed', 'cancelled') AND updated_at < p_completed_before
        ORDER BY updated_at
        LIMIT p_chunk
        FOR UPDATE SKIP LOCKED
    )
    DELETE FROM queue_jobs j USING doomed WHERE j.id = doomed.id;
    GET DIAGNOSTICS v_jobs = ROW_COUNT;

    WITH doomed AS (
        SELECT id FROM queue_jobs_dead_letter
        WHERE dead_at < p_dead_before
        ORDER BY dead_at
        LIMIT p_chunk
        FOR UPDATE SKIP LOCKED
    )
    DELETE FROM queue_jobs_dead_letter d USING doomed WHERE d.id = doomed.id;
    GET DIAGNOSTICS v_dead = ROW_COUNT;

    WITH doomed AS (
        SELECT id FROM queue_idempotency
        WHERE expiration < extract(epoch FROM now())::bigint
        ORDER BY expiration
        LIMIT p_chunk
        FOR UPDATE SKIP LOCKED
    )
    DELETE FROM queue_idempotency i USING doomed WHERE i.id = doomed.id;
    GET DIAGNOSTICS v_idem = ROW_COUNT;

    RETURN QUERY SELECT v_jobs, v_dead, v_idem;
END;
$$;
