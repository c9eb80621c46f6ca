-- queue-worker 0001: the job queue, its dead letter table and the SQL API.
--
-- Every state change of a job is one of the functions below: each runs as one atomic statement
-- from the caller's point of view, and the ones a worker calls check that the worker still holds
-- the job (its lease) before they change anything.
--
-- Job states:  waiting --(last dependency completes)--> pending --(claim)--> processing
--              processing --(complete)--> completed
--              processing --(fail, retryable, attempts left)--> pending (later)
--              processing --(release / rate limited: attempt not counted)--> pending
--              processing --(fail, no retry or attempts exhausted)--> dead letter table
--              processing --(lease expired, next claim: the attempt counts)--> processing (rescued)
--              processing --(lease expired during the last attempt, next claim)--> dead letter table
--              waiting/pending/processing --(cancel)--> cancelled
--              waiting/pending --(a dependency dead-lettered or cancelled)--> dead letter table
--              dead letter table --(requeue)--> pending (or waiting)

CREATE TABLE queue_jobs (
    id            uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    tenant_id     uuid        NOT NULL,
    job_type      text        NOT NULL CONSTRAINT queue_jobs_job_type_not_blank CHECK (job_type ~ '\S'),
    payload       jsonb       NOT NULL DEFAULT '{}'::jsonb
                              CONSTRAINT queue_jobs_payload_is_object CHECK (jsonb_typeof(payload) = 'object'),
    status        text        NOT NULL DEFAULT 'pending'
                              CONSTRAINT queue_jobs_status_known
                              CHECK (status IN ('waiting', 'pending', 'processing', 'completed', 'cancelled')),
    priority      int         NOT NULL DEFAULT 0,
    attempts      int         NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    max_attempts  int         NOT NULL DEFAULT 5 CONSTRAINT queue_jobs_max_attempts_positive CHECK (max_attempts >= 1),
    scheduled_at  timestamptz NOT NULL DEFAULT now(),
    locked_until  timestamptz,
    locked_by     text,
    last_error    text,
    errors        jsonb       NOT NULL DEFAULT '[]'::jsonb,
    unique_key    text,
    depends_on    uuid[],
    -- How many of depends_on have not completed yet; the job is 'waiting' while this is > 0.
    waiting_on    int         NOT NULL DEFAULT 0 CHECK (waiting_on >= 0),
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    completed_at  timestamptz
) WITH (fillfactor = 85);  -- room for the in-place (HOT) updates of claim and settle

-- The claim reads only this index: live jobs, per tenant, in claim order. Finished jobs are not
-- in it, so the claim does not slow down as history grows.
CREATE INDEX queue_jobs_claim_idx ON queue_jobs (tenant_id, priority DESC, scheduled_at)
    WHERE status IN ('pending', 'processing');

-- Expired leases: the claim looks for jobs whose worker stopped during their last attempt on
-- every call. Without this index that search reads every live job (the whole backlog).
CREATE INDEX queue_jobs_lease_idx ON queue_jobs (locked_until) WHERE status = 'processing';

-- A unique key is taken while its job is unfinished.
CREATE UNIQUE INDEX queue_jobs_unique_key_idx ON queue_jobs (tenant_id, unique_key)
    WHERE unique_key IS NOT NULL AND status IN ('waiting', 'pending', 'processing');

-- Pruning and the operator's views of finished jobs.
CREATE INDEX queue_jobs_finished_idx ON queue_jobs (updated_at)
    WHERE status IN ('completed', 'cancelled');

-- Which jobs wait on which: one row per unfinished dependency.
CREATE TABLE queue_job_dependencies (
    depends_on uuid NOT NULL,
    job_id     uuid NOT NULL,
    PRIMARY KEY (depends_on, job_id)
);

CREATE TABLE queue_jobs_dead_letter (
    id            uuid        PRIMARY KEY,
    tenant_id     uuid        NOT NULL,
    job_type      text        NOT NULL,
    payload       jsonb       NOT NULL,
    status        text        NOT NULL,  -- the status the job had when it was moved
    priority      int         NOT NULL,
    attempts      int         NOT NULL,
    max_attempts  int         NOT NULL,
    scheduled_at  timestamptz NOT NULL,
    locked_until  timestamptz,
    locked_by     text,
    last_error    text,
    errors        jsonb       NOT NULL,
    unique_key    text,
    depends_on    uuid[],
    waiting_on    int         NOT NULL,
    created_at    timestamptz NOT NULL,
    updated_at    timestamptz NOT NULL,
    completed_at  timestamptz,
    dead_at       timestamptz NOT NULL DEFAULT now(),
    reason        text        NOT NULL
);
CREATE INDEX queue_jobs_dead_letter_dead_at_idx ON queue_jobs_dead_letter (dead_at);
CREATE INDEX queue_jobs_dead_letter_tenant_idx ON queue_jobs_dead_letter (tenant_id, dead_at);

-- Backoff before retry attempt N+1 after failed attempt N: exponential with "equal jitter".
--   ceiling(N) = least(cap, base * 2^(N-1)),  delay = ceiling/2 + jitter * ceiling/2
-- base 10 s, cap 1 hour: attempt 1 waits 5-10 s, 2: 10-20 s, 3: 20-40 s, ... from 10 on 30-60 min.
-- The delay never drops below 5 s nor exceeds 1 hour, and its expectation (0.75 * ceiling) never
-- decreases with N. p_jitter (in [0, 1]) is a parameter so that the function can be tested.
CREATE FUNCTION queue_backoff(p_attempt int, p_jitter double precision DEFAULT random())
RETURNS interval
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    -- (1 + jitter) / 2 rather than 0.5 + 0.5 * jitter: a tiny jitter (5e-324) would underflow.
    SELECT make_interval(secs =>
        least(3600.0, 10.0 * power(2.0, least(greatest(p_attempt, 1), 30) - 1))
        * (1.0 + least(greatest(coalesce(p_jitter, 0.5), 0.0), 1.0)) / 2.0)
$$;

-- Deletes the links from jobs that left the queue (dead-lettered or cancelled) to the
-- dependencies they still waited for: such a job waits for nothing any more, and a requeue links
-- it again. (A link left behind would make that requeue fail on the primary key.)
CREATE FUNCTION queue_unlink_jobs(p_ids uuid[])
RETURNS void
LANGUAGE sql
AS $$
    DELETE FROM queue_job_dependencies d
    USING (SELECT id, depends_on FROM queue_jobs_dead_letter WHERE id = ANY (p_ids)
           UNION ALL
           SELECT id, depends_on FROM queue_jobs WHERE id = ANY (p_ids)) j
    WHERE d.depends_on = ANY (j.depends_on) AND d.job_id = j.id
$$;

-- The move itself: the rows leave queue_jobs for queue_jobs_dead_letter with their reason (and
-- the reason as last_error when they had none), and their dependency links go. No cascade.
CREATE FUNCTION queue_dead_letter_rows(p_ids uuid[], p_reasons text[])
RETURNS uuid[]
LANGUAGE plpgsql
AS $$
DECLARE
    v_moved uuid[];
BEGIN
    WITH input AS (
        SELECT * FROM unnest(p_ids, p_reasons) AS t(id, reason)
    ), moved AS (
        DELETE FROM queue_jobs j USING input i WHERE j.id = i.id
        RETURNING j.*, i.reason
    ), inserted AS (
        INSERT INTO queue_jobs_dead_letter (
            id, tenant_id, job_type, payload, status, priority, attempts, max_attempts,
            scheduled_at, locked_until, locked_by, last_error, errors, unique_key, depends_on,
            waiting_on, created_at, updated_at, completed_at, dead_at, reason)
        SELECT id, tenant_id, job_type, payload, status, priority, attempts, max_attempts,
               scheduled_at, locked_until, locked_by, coalesce(last_error, reason), errors,
               unique_key, depends_on, waiting_on, created_at, now(), completed_at, now(), reason
        FROM moved
        RETURNING id
    )
    SELECT coalesce(array_agg(id), '{}') INTO v_moved FROM inserted;
    PERFORM queue_unlink_jobs(v_moved);
    RETURN v_moved;
END;
$$;

-- Moves jobs to the dead letter table and then, in the same transaction, every job that waits
-- on them, transitively (see queue_fail_dependents). Returns the ids it moved from p_ids.
CREATE FUNCTION queue_move_to_dead_letter(p_ids uuid[], p_reasons text[])
RETURNS SETOF uuid
LANGUAGE plpgsql
AS $$
DECLARE
    v_moved uuid[] := queue_dead_letter_rows(p_ids, p_reasons);
BEGIN
    PERFORM queue_fail_dependents(v_moved);
    RETURN QUERY SELECT unnest(v_moved);
END;
$$;

-- Jobs that wait on a failed (dead-lettered or cancelled) job can never run: they move to the
-- dead letter table with the reason 'Dependency <id> failed', and so do their own dependents.
CREATE FUNCTION queue_fail_dependents(p_failed uuid[])
RETURNS void
LANGUAGE plpgsql
AS $$
DECLARE
    v_failed uuid[] := p_failed;
    v_ids uuid[];
    v_reasons text[];
BEGIN
    -- Level by level. Each level is a new statement, so it sees dependency rows that a concurrent
    -- enqueue committed while this transaction waited for its locks.
    WHILE cardinality(v_failed) > 0 LOOP
        WITH deps AS (
            DELETE FROM queue_job_dependencies d
            WHERE d.depends_on = ANY (v_failed)
            RETURNING d.job_id, d.depends_on
        ), firsts AS (
            SELECT DISTINCT ON (job_id) job_id, depends_on FROM deps ORDER BY job_id, depends_on
        ), doomed AS (
            SELECT j.id, format('Dependency %s failed', f.depends_on) AS reason
            FROM queue_jobs j JOIN firsts f ON f.job_id = j.id
            WHERE j.status IN ('waiting', 'pending')
            FOR UPDATE OF j
        )
        SELECT coalesce(array_agg(id), '{}'), coalesce(array_agg(reason), '{}')
        INTO v_ids, v_reasons FROM doomed;
        v_failed := queue_dead_letter_rows(v_ids, v_reasons);
    END LOOP;
END;
$$;

-- The dependents of jobs that just completed: one fewer dependency to wait for; those with none
-- left become pending (due at once, or at their scheduled_at if that is later).
CREATE FUNCTION queue_release_dependents(p_completed uuid[])
RETURNS void
LANGUAGE sql
AS $$
    WITH deps AS (
        DELETE FROM queue_job_dependencies d
        WHERE d.depends_on = ANY (p_completed)
        RETURNING d.job_id
    ), counts AS (
        SELECT job_id, count(*)::int AS n FROM deps GROUP BY job_id
    )
    UPDATE queue_jobs j
    SET waiting_on = j.waiting_on - c.n,
        status = CASE WHEN j.waiting_on - c.n = 0 AND j.status = 'waiting' THEN 'pending' ELSE j.status END,
        updated_at = now()
    FROM counts c
    WHERE j.id = c.job_id
$$;

CREATE FUNCTION enqueue_job(
    p_tenant_id uuid,
    p_job_type text,
    p_payload jsonb DEFAULT '{}',
    p_priority int DEFAULT 0,
    p_scheduled_at timestamptz DEFAULT now(),
    p_max_attempts int DEFAULT 5,
    p_unique_key text DEFAULT NULL,
    p_depends_on uuid[] DEFAULT NULL)
RETURNS uuid
LANGUAGE plpgsql
AS $$
DECLARE
    v_id uuid;
    v_deps uuid[];
    v_live uuid[];
    v_failed uuid;
    v_missing uuid;
BEGIN
    IF p_tenant_id IS NULL THEN
        RAISE EXCEPTION 'enqueue_job: p_tenant_id must not be null' USING ERRCODE = 'not_null_violation';
    END IF;
    IF p_job_type IS NULL THEN
        RAISE EXCEPTION 'enqueue_job: p_job_type must not be null' USING ERRCODE = 'not_null_violation';
    END IF;
    IF p_job_type !~ '\S' THEN  -- empty, or only white space
        RAISE EXCEPTION 'enqueue_job: p_job_type must not be blank' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_payload IS NULL OR jsonb_typeof(p_payload) <> 'object' THEN
        RAISE EXCEPTION 'enqueue_job: p_payload must be a JSON object, got %', coalesce(jsonb_typeof(p_payload), 'null')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_max_attempts IS NULL OR p_max_attempts < 1 THEN
        RAISE EXCEPTION 'enqueue_job: p_max_attempts must be at least 1, got %', p_max_attempts
            USING ERRCODE = 'invalid_parameter_value';
    END IF;

    SELECT array_agg(DISTINCT d) INTO v_deps FROM unnest(p_depends_on) AS d WHERE d IS NOT NULL;

    IF v_deps IS NOT NULL THEN
        -- FOR SHARE holds the dependencies still while this job links to them: a dependency that
        -- completes or fails concurrently then sees the link once this transaction commits.
        SELECT array_agg(id) FILTER (WHERE status IN ('waiting', 'pending', 'processing')),
               (array_agg(id) FILTER (WHERE status = 'cancelled'))[1]
        INTO v_live, v_failed
        FROM (SELECT id, status FROM queue_jobs WHERE id = ANY (v_deps) FOR SHARE) s;

        IF v_failed IS NULL THEN
            SELECT id INTO v_failed FROM queue_jobs_dead_letter WHERE id = ANY (v_deps) LIMIT 1;
        END IF;

        SELECT d INTO v_missing FROM unnest(v_deps) AS d
        WHERE NOT EXISTS (SELECT 1 FROM queue_jobs WHERE id = d)
          AND NOT EXISTS (SELECT 1 FROM queue_jobs_dead_letter WHERE id = d)
        LIMIT 1;
        IF v_missing IS NOT NULL THEN
            RAISE EXCEPTION 'enqueue_job: dependency % does not exist', v_missing
                USING ERRCODE = 'foreign_key_violation';
        END IF;
    END IF;

    LOOP
        INSERT INTO queue_jobs (tenant_id, job_type, payload, priority, scheduled_at, max_attempts,
                                unique_key, depends_on, waiting_on, status)
        VALUES (p_tenant_id, p_job_type, p_payload, coalesce(p_priority, 0),
                coalesce(p_scheduled_at, now()), p_max_attempts, p_unique_key, v_deps,
                coalesce(cardinality(v_live), 0),
                CASE WHEN coalesce(cardinality(v_live), 0) > 0 THEN 'waiting' ELSE 'pending' END)
        ON CONFLICT (tenant_id, unique_key)
            WHERE unique_key IS NOT NULL AND status IN ('waiting', 'pending', 'processing')
            DO NOTHING
        RETURNING id INTO v_id;
        EXIT WHEN v_id IS NOT NULL;

        SELECT id INTO v_id FROM queue_jobs
        WHERE tenant_id = p_tenant_id AND unique_key = p_unique_key
          AND status IN ('waiting', 'pending', 'processing');
        IF v_id IS NOT NULL THEN
            RETURN v_id;  -- the unfinished job that holds the key; nothing inserted
        END IF;
        -- The holder finished between the two statements: the key is free now, insert again.
    END LOOP;

    IF v_live IS NOT NULL THEN
        INSERT INTO queue_job_dependencies (depends_on, job_id)
        SELECT d, v_id FROM unnest(v_live) AS d;
    END IF;

    IF v_failed IS NOT NULL THEN
        PERFORM queue_move_to_dead_letter(ARRAY[v_id], ARRAY[format('Dependency %s failed', v_failed)]);
    END IF;
    RETURN v_id;
END;
$$;

-- The batch claim. Takes due jobs (pending and due, or processing with an expired lease: the
-- rescue of a dead worker's jobs, which counts as an attempt), at most p_max_per_tenant per
-- tenant and p_max_jobs in all, highest priority first, then oldest scheduled_at, and leases
-- them to p_worker_id for p_lease_seconds. Tenants may be restricted to one (p_tenant_id) or to
-- one shard of p_shards (by a hash of the tenant id). A rescue records the lost attempt in
-- errors. A job whose lease expired during its last attempt is dead-lettered instead of claimed
-- again.
CREATE FUNCTION claim_jobs(
    p_worker_id text,
    p_lease_seconds int DEFAULT 300,
    p_max_jobs int DEFAULT 1000,
    p_max_per_tenant int DEFAULT 10,
    p_tenant_id uuid DEFAULT NULL,
    p_shard int DEFAULT 0,
    p_shards int DEFAULT 1)
RETURNS TABLE (
    id uuid, tenant_id uuid, job_type text, payload jsonb, priority int, attempts int,
    max_attempts int, scheduled_at timestamptz, locked_until timestamptz, created_at timestamptz,
    rescued boolean)
LANGUAGE plpgsql
AS $$
#variable_conflict use_column
DECLARE
    v_exhausted uuid[];
    v_reasons text[];
    v_ids uuid[];
    v_rescued uuid[];
BEGIN
    IF p_worker_id IS NULL OR p_worker_id = '' THEN
        RAISE EXCEPTION 'claim_jobs: p_worker_id is required' USING ERRCODE = 'not_null_violation';
    END IF;
    IF p_lease_seconds IS NULL OR p_lease_seconds < 1 OR p_max_jobs IS NULL OR p_max_jobs < 1
       OR p_max_per_tenant IS NULL OR p_max_per_tenant < 1 THEN
        RAISE EXCEPTION 'claim_jobs: p_lease_seconds, p_max_jobs and p_max_per_tenant must be at least 1'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_shards IS NULL OR p_shards < 1 OR p_shard IS NULL OR p_shard < 0 OR p_shard >= p_shards THEN
        RAISE EXCEPTION 'claim_jobs: need 0 <= p_shard < p_shards, got % of %', p_shard, p_shards
            USING ERRCODE = 'invalid_parameter_value';
    END IF;

    -- A worker died during the last attempt: no attempt is left to rescue it with.
    SELECT array_agg(j.id),
           array_agg(format('Exhausted %s attempts: the lease expired during the last one', j.max_attempts))
    INTO v_exhausted, v_reasons
    FROM (
        SELECT q.id, q.max_attempts FROM queue_jobs q
        WHERE q.status = 'processing' AND q.locked_until < now() AND q.attempts >= q.max_attempts
          AND (p_tenant_id IS NULL OR q.tenant_id = p_tenant_id)
        LIMIT 1000
        FOR UPDATE SKIP LOCKED) j;
    IF v_exhausted IS NOT NULL THEN
        UPDATE queue_jobs q
        SET errors = q.errors || jsonb_build_array(jsonb_build_object(
                'attempt', q.attempts, 'at', now(), 'status', NULL,
                'error', format('Lease expired during attempt %s (worker %s stopped)', q.attempts, q.locked_by))),
            last_error = format('Lease expired during attempt %s (worker %s stopped)', q.attempts, q.locked_by)
        WHERE q.id = ANY (v_exhausted);
        PERFORM queue_move_to_dead_letter(v_exhausted, v_reasons);
    END IF;

    WITH RECURSIVE tenants AS (
        -- Distinct tenants with live jobs, read as a skip scan of the claim index.
        (SELECT q.tenant_id FROM queue_jobs q
         WHERE q.status IN ('pending', 'processing') AND p_tenant_id IS NULL
         ORDER BY q.tenant_id LIMIT 1)
        UNION ALL
        SELECT (SELECT q.tenant_id FROM queue_jobs q
                WHERE q.status IN ('pending', 'processing') AND q.tenant_id > t.tenant_id
                ORDER BY q.tenant_id LIMIT 1)
        FROM tenants t WHERE t.tenant_id IS NOT NULL
    ), chosen_tenants AS (
        SELECT s.tenant_id
        FROM (SELECT t.tenant_id FROM tenants t WHERE t.tenant_id IS NOT NULL
              UNION ALL
              SELECT p_tenant_id WHERE p_tenant_id IS NOT NULL) s
        -- The shard filter comes first: a claim never reads (or locks) another shard's jobs.
        WHERE p_shards = 1
           OR (hashtextextended(s.tenant_id::text, 0) & 9223372036854775807) % p_shards = p_shard
    ), shares AS (
        -- How many jobs of each tenant this claim takes: the best p_max_per_tenant due jobs of
        -- each tenant, and the best p_max_jobs of those, read without locking anything ...
        SELECT best.tenant_id, count(*)::int AS n
        FROM (SELECT c.tenant_id
              FROM chosen_tenants t
              CROSS JOIN LATERAL (
                  SELECT q.tenant_id, q.priority, q.scheduled_at
                  FROM queue_jobs q
                  WHERE q.tenant_id = t.tenant_id
                    AND q.status IN ('pending', 'processing')
                    AND q.scheduled_at <= now()
                    AND (q.status = 'pending' OR (q.locked_until < now() AND q.attempts < q.max_attempts))
                  ORDER BY q.priority DESC, q.scheduled_at
                  LIMIT p_max_per_tenant
              ) c
              ORDER BY c.priority DESC, c.scheduled_at
              LIMIT p_max_jobs) best
        GROUP BY best.tenant_id
    ), chosen AS (
        -- ... then each tenant's share is locked, in the same order, skipping the jobs another
        -- claim holds. A claim locks only the jobs it takes (locking every tenant's candidates
        -- would hide up to p_max_per_tenant x tenants jobs from concurrent claims), so concurrent
        -- claims take disjoint jobs without waiting for each other. Under contention a claim may
        -- take fewer jobs than p_max_jobs; alone, it takes exactly the best ones.
        SELECT c.id, c.status
        FROM shares s
        CROSS JOIN LATERAL (
            SELECT q.id, q.status
            FROM queue_jobs q
            WHERE q.tenant_id = s.tenant_id
              AND q.status IN ('pending', 'processing')
              AND q.scheduled_at <= now()
              AND (q.status = 'pending' OR (q.locked_until < now() AND q.attempts < q.max_attempts))
            ORDER BY q.priority DESC, q.scheduled_at
            LIMIT s.n
            FOR UPDATE SKIP LOCKED
        ) c
    )
    SELECT array_agg(chosen.id), array_agg(chosen.id) FILTER (WHERE chosen.status = 'processing')
    INTO v_ids, v_rescued
    FROM chosen;

    -- The jobs are locked; lease them. A statement of its own, by primary key: joined to the
    -- statement above, the planner cannot tell how few rows it chose and may scan the table.
    RETURN QUERY
    UPDATE queue_jobs q
    SET status = 'processing',
        attempts = q.attempts + 1,
        locked_until = now() + make_interval(secs => p_lease_seconds),
        locked_by = p_worker_id,
        -- A rescue ends the attempt whose worker stopped: recorded like any failed attempt.
        errors = CASE WHEN q.status = 'processing' THEN q.errors || jsonb_build_array(jsonb_build_object(
                'attempt', q.attempts, 'at', now(), 'status', NULL,
                'error', format('Lease expired during attempt %s (worker %s stopped)', q.attempts, q.locked_by)))
            ELSE q.errors END,
        last_error = CASE WHEN q.status = 'processing'
            THEN format('Lease expired during attempt %s (worker %s stopped)', q.attempts, q.locked_by)
            ELSE q.last_error END,
        updated_at = now()
    WHERE q.id = ANY (v_ids)
    RETURNING q.id, q.tenant_id, q.job_type, q.payload, q.priority, q.attempts, q.max_attempts,
              q.scheduled_at, q.locked_until, q.created_at, q.id = ANY (coalesce(v_rescued, '{}'));
END;
$$;

-- The seed's single-job claim, kept for compatibility: the next due job of one tenant or any.
CREATE FUNCTION claim_next_job(
    p_tenant_id uuid DEFAULT NULL,
    p_lease_seconds int DEFAULT 300,
    p_worker_id text DEFAULT NULL)
RETURNS SETOF queue_jobs
LANGUAGE plpgsql
AS $$
DECLARE
    v_id uuid;
BEGIN
    SELECT c.id INTO v_id
    FROM claim_jobs(coalesce(p_worker_id, 'claim_next_job'), p_lease_seconds, 1, 1, p_tenant_id) c;
    -- A statement of its own: one statement that claimed and read the row would read it as it
    -- was before the claim (pending, no lease).
    RETURN QUERY SELECT q.* FROM queue_jobs q WHERE q.id = v_id;
END;
$$;

-- Settles many claimed jobs in one statement. p_outcomes is a JSON array of
--   {"id": uuid, "attempt": int, "outcome": text, "error": text, "status": int, "retry_at": timestamptz}
-- outcome: 'completed'; 'failed' (retry with backoff, or dead letter once attempts are exhausted);
-- 'dead' (no retry can fix it); 'rate_limited' (back to pending at retry_at or backoff, the
-- attempt not counted); 'released' (never sent: back to pending, the attempt not counted,
-- scheduled_at kept unless retry_at is given). A job is settled only while p_worker_id holds it
-- (and, when "attempt" is given, only for that attempt); any other is reported 'stale'.
-- Returns one row per outcome: 'completed', 'retry', 'dead', 'released' or 'stale'.
CREATE FUNCTION settle_jobs(p_worker_id text, p_outcomes jsonb)
RETURNS TABLE (job_id uuid, result text)
LANGUAGE plpgsql
AS $$
#variable_conflict use_column
DECLARE
    v_results jsonb;
    v_dead uuid[];
    v_dead_reasons text[];
    v_completed uuid[];
BEGIN
    IF p_outcomes IS NULL OR jsonb_typeof(p_outcomes) <> 'array' THEN
        RAISE EXCEPTION 'settle_jobs: p_outcomes must be a JSON array' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF EXISTS (SELECT 1 FROM jsonb_array_elements(p_outcomes) e
               WHERE e->>'outcome' IS NULL
                  OR e->>'outcome' NOT IN ('completed', 'failed', 'dead', 'rate_limited', 'released')
                  OR e->>'id' IS NULL) THEN
        RAISE EXCEPTION 'settle_jobs: every outcome needs an id and an outcome among completed, failed, dead, rate_limited, released'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;

    WITH o AS (
        SELECT DISTINCT ON (x.id) x.*
        FROM jsonb_to_recordset(p_outcomes)
             AS x(id uuid, attempt int, outcome text, error text, status int, retry_at timestamptz)
    ), held AS (
        SELECT q.id, q.attempts, q.max_attempts, o.outcome, left(o.error, 4000) AS error,
               o.status, o.retry_at
        FROM queue_jobs q JOIN o ON o.id = q.id
        WHERE q.status = 'processing'
          AND (p_worker_id IS NULL OR q.locked_by = p_worker_id)
          AND (o.attempt IS NULL OR o.attempt = q.attempts)
        FOR UPDATE OF q
    ), decided AS (
        SELECT h.*,
               CASE
                   WHEN h.outcome = 'completed' THEN 'completed'
                   WHEN h.outcome = 'released' THEN 'released'
                   WHEN h.outcome = 'rate_limited' THEN 'retry'
                   WHEN h.outcome = 'dead' OR h.attempts >= h.max_attempts THEN 'dead'
                   ELSE 'retry'
               END AS result
        FROM held h
    ), updated AS (
        UPDATE queue_jobs q
        SET status = CASE WHEN d.result = 'completed' THEN 'completed' ELSE 'pending' END,
            completed_at = CASE WHEN d.result = 'completed' THEN now() END,
            attempts = CASE WHEN d.outcome IN ('released', 'rate_limited') THEN q.attempts - 1
                            ELSE q.attempts END,
            scheduled_at = CASE
                WHEN d.outcome = 'completed' THEN q.scheduled_at
                WHEN d.outcome = 'released' THEN coalesce(d.retry_at, q.scheduled_at)
                ELSE coalesce(d.retry_at, now() + queue_backoff(greatest(q.attempts, 1)))
            END,
            locked_until = NULL,
            locked_by = CASE WHEN d.result = 'completed' THEN q.locked_by END,
            last_error = CASE WHEN d.outcome IN ('failed', 'rate_limited') THEN d.error
                              ELSE q.last_error END,
            errors = CASE WHEN d.outcome = 'failed'
                          THEN q.errors || jsonb_build_array(jsonb_build_object(
                              'attempt', q.attempts, 'at', now(), 'error', d.error, 'status', d.status))
                          ELSE q.errors END,
            updated_at = now()
        FROM decided d
        WHERE q.id = d.id AND d.result <> 'dead'
        RETURNING q.id, d.result
    ), dying AS (
        -- Record the last attempt on the row before it moves.
        UPDATE queue_jobs q
        SET errors = q.errors || jsonb_build_array(jsonb_build_object(
                'attempt', q.attempts, 'at', now(), 'error', d.error, 'status', d.status)),
            last_error = d.error,
            locked_until = NULL,
            updated_at = now()
        FROM decided d
        WHERE q.id = d.id AND d.result = 'dead'
        RETURNING q.id,
                  CASE WHEN d.outcome = 'dead' THEN coalesce(d.error, 'Rejected')
                       ELSE format('Exhausted %s attempts: %s', q.max_attempts, d.error) END AS reason
    )
    SELECT coalesce(jsonb_agg(jsonb_build_object('id', id, 'result', result)), '[]'),
           (SELECT array_agg(id) FROM dying), (SELECT array_agg(reason) FROM dying),
           array_agg(id) FILTER (WHERE result = 'completed')
    INTO v_results, v_dead, v_dead_reasons, v_completed
    FROM updated;

    IF v_dead IS NOT NULL THEN
        PERFORM queue_move_to_dead_letter(v_dead, v_dead_reasons);
        v_results := v_results || (SELECT jsonb_agg(jsonb_build_object('id', d, 'result', 'dead'))
                                   FROM unnest(v_dead) d);
    END IF;
    IF v_completed IS NOT NULL THEN
        PERFORM queue_release_dependents(v_completed);
    END IF;

    RETURN QUERY
    SELECT (e->>'id')::uuid, coalesce(r.result, 'stale')
    FROM jsonb_array_elements(p_outcomes) e
    LEFT JOIN (SELECT (x->>'id')::uuid AS id, x->>'result' AS result
               FROM jsonb_array_elements(v_results) x) r ON r.id = (e->>'id')::uuid;
END;
$$;

CREATE FUNCTION complete_job(p_job_id uuid, p_worker_id text DEFAULT NULL)
RETURNS boolean
LANGUAGE sql
AS $$
    SELECT s.result = 'completed'
    FROM settle_jobs(p_worker_id, jsonb_build_array(jsonb_build_object(
        'id', p_job_id, 'outcome', 'completed'))) s
$$;

CREATE FUNCTION fail_job(
    p_job_id uuid,
    p_error text,
    p_retryable boolean DEFAULT true,
    p_retry_at timestamptz DEFAULT NULL,
    p_worker_id text DEFAULT NULL)
RETURNS text
LANGUAGE sql
AS $$
    SELECT s.result
    FROM settle_jobs(p_worker_id, jsonb_build_array(jsonb_build_object(
        'id', p_job_id, 'error', p_error, 'retry_at', p_retry_at,
        'outcome', CASE WHEN coalesce(p_retryable, true) THEN 'failed' ELSE 'dead' END))) s
$$;

-- Back from the dead letter table: the same id, pending and due now, attempts reset, its errors
-- history kept. Dependencies that have not completed are waited for again (status 'waiting'):
-- unfinished ones, and dead-lettered ones too, which may be requeued in turn, in any order (if one
-- fails again, this job follows it back to the dead letter table). A cancelled dependency can never
-- complete: the requeue is refused. A dependency found nowhere was completed and pruned.
CREATE FUNCTION requeue_dead_letter(p_job_id uuid)
RETURNS uuid
LANGUAGE plpgsql
AS $$
DECLARE
    v_job queue_jobs_dead_letter;
    v_live uuid[];
    v_seen uuid[];
    v_dead uuid[];
    v_back uuid[];
    v_cancelled uuid;
    v_holder uuid;
BEGIN
    DELETE FROM queue_jobs_dead_letter WHERE id = p_job_id RETURNING * INTO v_job;
    IF v_job.id IS NULL THEN
        RAISE EXCEPTION 'requeue_dead_letter: job % is not in the dead letter table', p_job_id
            USING ERRCODE = 'no_data_found';
    END IF;

    IF v_job.unique_key IS NOT NULL THEN
        SELECT id INTO v_holder FROM queue_jobs
        WHERE tenant_id = v_job.tenant_id AND unique_key = v_job.unique_key
          AND status IN ('waiting', 'pending', 'processing');
        IF v_holder IS NOT NULL THEN
            RAISE EXCEPTION 'requeue_dead_letter: unique key % is held by unfinished job %', v_job.unique_key, v_holder
                USING ERRCODE = 'unique_violation';
        END IF;
    END IF;

    IF v_job.depends_on IS NOT NULL THEN
        -- FOR SHARE, as in enqueue_job: a dependency that settles concurrently sees the new links.
        SELECT array_agg(id) FILTER (WHERE status IN ('waiting', 'pending', 'processing')),
               (array_agg(id) FILTER (WHERE status = 'cancelled'))[1],
               array_agg(id)
        INTO v_live, v_cancelled, v_seen
        FROM (SELECT id, status FROM queue_jobs WHERE id = ANY (v_job.depends_on) FOR SHARE) s;
        IF v_cancelled IS NOT NULL THEN
            RAISE EXCEPTION 'requeue_dead_letter: dependency % of job % was cancelled, so the job can never run',
                v_cancelled, p_job_id USING ERRCODE = 'foreign_key_violation';
        END IF;
        -- Each read is a new statement: a dependency dead-lettered meanwhile is found here ...
        SELECT array_agg(id) INTO v_dead FROM (
            SELECT id FROM queue_jobs_dead_letter
            WHERE id = ANY (v_job.depends_on) AND id <> ALL (coalesce(v_seen, '{}'))
            FOR SHARE) s;
        -- ... and one requeued meanwhile (found in neither table above) here.
        SELECT array_agg(id) INTO v_back FROM (
            SELECT id FROM queue_jobs
            WHERE id = ANY (v_job.depends_on) AND id <> ALL (coalesce(v_seen, '{}'))
              AND id <> ALL (coalesce(v_dead, '{}'))
              AND status IN ('waiting', 'pending', 'processing')
            FOR SHARE) s;
        v_live := nullif(coalesce(v_live, '{}') || coalesce(v_dead, '{}') || coalesce(v_back, '{}'), '{}');
    END IF;

    INSERT INTO queue_jobs (id, tenant_id, job_type, payload, status, priority, attempts,
                            max_attempts, scheduled_at, last_error, errors, unique_key, depends_on,
                            waiting_on, created_at, updated_at)
    VALUES (v_job.id, v_job.tenant_id, v_job.job_type, v_job.payload,
            CASE WHEN v_live IS NULL THEN 'pending' ELSE 'waiting' END, v_job.priority, 0,
            v_job.max_attempts, now(), v_job.last_error, v_job.errors, v_job.unique_key,
            v_job.depends_on, coalesce(cardinality(v_live), 0), v_job.created_at, now());

    IF v_live IS NOT NULL THEN
        INSERT INTO queue_job_dependencies (depends_on, job_id) SELECT d, v_job.id FROM unnest(v_live) d;
    END IF;
    RETURN v_job.id;
END;
$$;

-- Requeues dead letters in bulk (oldest first), filtered by tenant, job type and age.
-- Returns how many were requeued; one whose unique key is taken again, or which depends on a
-- cancelled job, is left where it is.
CREATE FUNCTION requeue_dead_letters(
    p_tenant_id uuid DEFAULT NULL,
    p_job_type text DEFAULT NULL,
    p_dead_after timestamptz DEFAULT NULL,
    p_limit int DEFAULT 1000)
RETURNS int
LANGUAGE plpgsql
AS $$
DECLARE
    v_id uuid;
    v_count int := 0;
BEGIN
    FOR v_id IN
        SELECT id FROM queue_jobs_dead_letter
        WHERE (p_tenant_id IS NULL OR tenant_id = p_tenant_id)
          AND (p_job_type IS NULL OR job_type = p_job_type)
          AND (p_dead_after IS NULL OR dead_at >= p_dead_after)
        ORDER BY dead_at
        LIMIT p_limit
    LOOP
        BEGIN
            PERFORM requeue_dead_letter(v_id);
            v_count := v_count + 1;
        EXCEPTION WHEN unique_violation OR no_data_found OR foreign_key_violation THEN
            NULL;
        END;
    END LOOP;
    RETURN v_count;
END;
$$;

-- Cancels an unfinished job. A worker that holds it finds it gone ('stale') when it settles.
-- Jobs that wait on it are dead-lettered in the same transaction.
CREATE FUNCTION cancel_job(p_job_id uuid)
RETURNS boolean
LANGUAGE plpgsql
AS $$
DECLARE
    v_id uuid;
BEGIN
    UPDATE queue_jobs
    SET status = 'cancelled', locked_until = NULL, locked_by = NULL, updated_at = now()
    WHERE id = p_job_id AND status IN ('waiting', 'pending', 'processing')
    RETURNING id INTO v_id;
    IF v_id IS NULL THEN
        RETURN false;
    END IF;
    PERFORM queue_unlink_jobs(ARRAY[v_id]);
    -- Dependents of a cancelled job cannot run: they follow it to the dead letter table.
    PERFORM queue_fail_dependents(ARRAY[v_id]);
    RETURN true;
END;
$$;
