-- queue-worker 0004: pruning, run inside invocations.
--
-- queue_prune(...) deletes one small chunk of finished history: completed/cancelled jobs whose
-- last change is older than p_completed_before, dead letters older than p_dead_before, and
-- expired idempotency records. It takes a transaction-level advisory lock first and returns
-- NULL at once when another invocation holds it, so only one prunes at a time. Finished jobs
-- are never in the claim's index nor locked by a claim, so pruning never blocks a claim;
-- rows locked by anyone are skipped, not waited for. Callers repeat it (one short transaction
-- per chunk) while it keeps finding rows and their time allows.
--
-- A failed dependency is history that still decides something: requeue_dead_letter refuses a job
-- whose dependency was cancelled, and makes a job wait while its dependency is dead-lettered,
-- but it reads a dependency found nowhere as completed. So a cancelled job or a dead letter is
-- kept, whatever its age, while a dead letter names it in depends_on or a live job waits on it
-- (pruned, it would let that job run, or leave it waiting forever). Completed jobs are pruned
-- freely: read as completed is what they are.

-- Which dead letters name a job in depends_on (most name none: the index holds only the others).
CREATE INDEX queue_jobs_dead_letter_depends_on_idx ON queue_jobs_dead_letter USING gin (depends_on)
    WHERE depends_on IS NOT NULL;

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
        SELECT c.id FROM queue_jobs c
        WHERE c.status IN ('completed', 'cancelled') AND c.updated_at < p_completed_before
          AND NOT (c.status = 'cancelled' AND EXISTS (
              SELECT 1 FROM queue_jobs_dead_letter r
              WHERE r.depends_on IS NOT NULL AND r.depends_on @> ARRAY[c.id]))
        ORDER BY c.updated_at
        LIMIT p_chunk
        FOR UPDATE OF c SKIP LOCKED
    )
    DELETE FROM queue_jobs j USING doomed WHERE j.id = doomed.id;
    GET DIAGNOSTICS v_jobs = ROW_COUNT;

    WITH doomed AS (
        SELECT c.id FROM queue_jobs_dead_letter c
        WHERE c.dead_at < p_dead_before
          AND NOT EXISTS (SELECT 1 FROM queue_job_dependencies l WHERE l.depends_on = c.id)
          AND NOT EXISTS (SELECT 1 FROM queue_jobs_dead_letter r
                          WHERE r.depends_on IS NOT NULL AND r.depends_on @> ARRAY[c.id]
                            AND r.id <> c.id)
        ORDER BY c.dead_at
        LIMIT p_chunk
        FOR UPDATE OF c SKIP LOCKED
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
