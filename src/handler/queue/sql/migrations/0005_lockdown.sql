-- queue-worker 0005: the queue's own schema, its roles, and least privilege.
--
-- Everything the queue owns lives in the schema queue_worker, which PostgREST does not expose
-- (Supabase exposes public). A database migrated by an earlier version has its objects in the
-- schema it was migrated into (usually public): they are moved here, data and all. Then:
--   * every function is replaced by one whose body names every object by its schema; the ones
--     that roles may call are SECURITY DEFINER with SET search_path = '' (they run as the owner,
--     the role that runs queue-worker migrate, and trust nothing a caller's session set);
--   * EXECUTE is revoked from PUBLIC and every privilege from anon and authenticated (Supabase's
--     default privileges grant them whatever is created in public);
--   * row-level security is on for every table, with no policy: a role that is not the owner
--     reaches rows only through the functions, even if someone exposes the schema;
--   * two roles get what they need, and nothing else: queue_worker_runtime (what one invocation
--     of the worker calls) and queue_worker_operator (that, plus requeue, cancel, prune,
--     schedules, and the read views); service_role (Supabase), where it exists, may call the
--     RPC entry point public.enqueue_job.
-- The migration runner (handler.queue.migrations) runs every file with search_path set to
-- queue_worker, and calls queue_lock_down() after each file from this one on.
-- docs/adr/0004-schema-and-grants.md records why.

-- The roles are the cluster's (not the database's): created once, NOLOGIN. Log in as a role of
-- your own that is granted one of them (the README's Supabase section shows how).
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'queue_worker_runtime') THEN
        CREATE ROLE queue_worker_runtime NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'queue_worker_operator') THEN
        CREATE ROLE queue_worker_operator NOLOGIN;
    END IF;
EXCEPTION WHEN insufficient_privilege THEN
    RAISE EXCEPTION 'queue-worker migrate must create the roles queue_worker_runtime and queue_worker_operator once, and the role it runs as may not create roles'
        USING HINT = 'Run migrate once as a role with CREATEROLE, or have an administrator run: CREATE ROLE queue_worker_runtime NOLOGIN; CREATE ROLE queue_worker_operator NOLOGIN;';
END;
$$;

-- An operator can do everything a worker can (`queue-worker run` is a batch too).
DO $$
BEGIN
    IF NOT pg_catalog.pg_has_role('queue_worker_operator', 'queue_worker_runtime', 'MEMBER') THEN
        GRANT queue_worker_runtime TO queue_worker_operator;
    END IF;
END;
$$;

-- Move what an earlier version created elsewhere. queue_worker_migrations was moved by the
-- runner already (it records this very file).
DO $$
DECLARE
    v_schema name;
    v_object record;
BEGIN
    SELECT n.nspname INTO v_schema
    FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
    WHERE c.relname = 'queue_jobs' AND c.relkind = 'r' AND n.nspname <> 'queue_worker';
    IF v_schema IS NULL THEN
        RETURN;
    END IF;
    IF EXISTS (SELECT FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
               WHERE c.relname = 'queue_jobs' AND n.nspname = 'queue_worker') THEN
        RAISE EXCEPTION 'queue_jobs exists both in % and in queue_worker: two installations in one database', v_schema;
    END IF;
    FOR v_object IN
        SELECT c.relname FROM pg_catalog.pg_class c
        WHERE c.relnamespace = (SELECT oid FROM pg_catalog.pg_namespace WHERE nspname = v_schema) AND c.relkind = 'r'
          AND c.relname IN ('queue_jobs', 'queue_jobs_dead_letter', 'queue_job_dependencies',
                            'queue_idempotency', 'queue_schedules')
    LOOP
        EXECUTE format('ALTER TABLE %I.%I SET SCHEMA queue_worker', v_schema, v_object.relname);
    END LOOP;
    FOR v_object IN
        SELECT p.oid::regprocedure AS signature FROM pg_catalog.pg_proc p
        WHERE p.pronamespace = (SELECT oid FROM pg_catalog.pg_namespace WHERE nspname = v_schema)
          AND p.proname IN ('queue_backoff', 'queue_unlink_jobs', 'queue_dead_letter_rows',
                            'queue_move_to_dead_letter', 'queue_fail_dependents',
                            'queue_release_dependents', 'enqueue_job', 'claim_jobs',
                            'claim_next_job', 'settle_jobs', 'complete_job', 'fail_job',
                            'requeue_dead_letter', 'requeue_dead_letters', 'cancel_job',
                            'queue_is_valid_timezone', 'upsert_schedule', 'pause_schedule',
                            'resume_schedule', 'delete_schedule', 'fire_schedule', 'queue_prune')
    LOOP
        EXECUTE format('ALTER FUNCTION %s SET SCHEMA queue_worker', v_object.signature);
    END LOOP;
END;
$$;

-- Schedules remember why they stopped: a schedule that cannot fire pauses itself.
ALTER TABLE queue_worker.queue_schedules
    ADD COLUMN IF NOT EXISTS last_error text,
    ADD COLUMN IF NOT EXISTS last_error_at timestamptz;

-- The opt-in wrapper for signed-in users (public.enqueue_job_as_user) takes only these job types,
-- each with a payload size limit. Empty: nobody may enqueue through it.
CREATE TABLE queue_worker.queue_user_enqueue_rules (
    job_type          text PRIMARY KEY CONSTRAINT queue_user_enqueue_rules_job_type_not_blank CHECK (job_type ~ '\S'),
    max_payload_bytes int  NOT NULL DEFAULT 8192
                           CONSTRAINT queue_user_enqueue_rules_size CHECK (max_payload_bytes BETWEEN 2 AND 1048576)
);

-- Helpers (no role may call them; the API functions below do, as the owner) -------------------

CREATE OR REPLACE FUNCTION queue_worker.queue_unlink_jobs(p_ids uuid[])
RETURNS void
LANGUAGE sql
SET search_path = ''
AS $$
    DELETE FROM queue_worker.queue_job_dependencies d
    USING (SELECT id, depends_on FROM queue_worker.queue_jobs_dead_letter WHERE id = ANY (p_ids)
           UNION ALL
           SELECT id, depends_on FROM queue_worker.queue_jobs WHERE id = ANY (p_ids)) j
    WHERE d.depends_on = ANY (j.depends_on) AND d.job_id = j.id
$$;

CREATE OR REPLACE FUNCTION queue_worker.queue_dead_letter_rows(p_ids uuid[], p_reasons text[])
RETURNS uuid[]
LANGUAGE plpgsql
SET search_path = ''
AS $$
DECLARE
    v_moved uuid[];
BEGIN
    WITH input AS (
        SELECT * FROM unnest(p_ids, p_reasons) AS t(id, reason)
    ), moved AS (
        DELETE FROM queue_worker.queue_jobs j USING input i WHERE j.id = i.id
        RETURNING j.*, i.reason
    ), inserted AS (
        INSERT INTO queue_worker.queue_jobs_dead_letter (
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
    PERFORM queue_worker.queue_unlink_jobs(v_moved);
    RETURN v_moved;
END;
$$;

CREATE OR REPLACE FUNCTION queue_worker.queue_fail_dependents(p_failed uuid[])
RETURNS void
LANGUAGE plpgsql
SET search_path = ''
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
            DELETE FROM queue_worker.queue_job_dependencies d
            WHERE d.depends_on = ANY (v_failed)
            RETURNING d.job_id, d.depends_on
        ), firsts AS (
            SELECT DISTINCT ON (job_id) job_id, depends_on FROM deps ORDER BY job_id, depends_on
        ), doomed AS (
            SELECT j.id, format('Dependency %s failed', f.depends_on) AS reason
            FROM queue_worker.queue_jobs j JOIN firsts f ON f.job_id = j.id
            WHERE j.status IN ('waiting', 'pending')
            FOR UPDATE OF j
        )
        SELECT coalesce(array_agg(id), '{}'), coalesce(array_agg(reason), '{}')
        INTO v_ids, v_reasons FROM doomed;
        v_failed := queue_worker.queue_dead_letter_rows(v_ids, v_reasons);
    END LOOP;
END;
$$;

CREATE OR REPLACE FUNCTION queue_worker.queue_move_to_dead_letter(p_ids uuid[], p_reasons text[])
RETURNS SETOF uuid
LANGUAGE plpgsql
SET search_path = ''
AS $$
DECLARE
    v_moved uuid[] := queue_worker.queue_dead_letter_rows(p_ids, p_reasons);
BEGIN
    PERFORM queue_worker.queue_fail_dependents(v_moved);
    RETURN QUERY SELECT unnest(v_moved);
END;
$$;

CREATE OR REPLACE FUNCTION queue_worker.queue_release_dependents(p_completed uuid[])
RETURNS void
LANGUAGE sql
SET search_path = ''
AS $$
    WITH deps AS (
        DELETE FROM queue_worker.queue_job_dependencies d
        WHERE d.depends_on = ANY (p_completed)
        RETURNING d.job_id
    ), counts AS (
        SELECT job_id, count(*)::int AS n FROM deps GROUP BY job_id
    )
    UPDATE queue_worker.queue_jobs j
    SET waiting_on = j.waiting_on - c.n,
        status = CASE WHEN j.waiting_on - c.n = 0 AND j.status = 'waiting' THEN 'pending' ELSE j.status END,
        updated_at = now()
    FROM counts c
    WHERE j.id = c.job_id
$$;

-- Jobs --------------------------------------------------------------------------------------

-- As in 0001, and a job may depend only on jobs of its own tenant.
CREATE OR REPLACE FUNCTION queue_worker.enqueue_job(
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
SECURITY DEFINER
SET search_path = ''
AS $$
DECLARE
    v_id uuid;
    v_deps uuid[];
    v_live uuid[];
    v_failed uuid;
    v_missing uuid;
    v_foreign uuid;
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
               (array_agg(id) FILTER (WHERE status = 'cancelled'))[1],
               (array_agg(id) FILTER (WHERE tenant_id <> p_tenant_id))[1]
        INTO v_live, v_failed, v_foreign
        FROM (SELECT id, status, tenant_id FROM queue_worker.queue_jobs
              WHERE id = ANY (v_deps) FOR SHARE) s;

        IF v_foreign IS NULL THEN
            SELECT id INTO v_foreign FROM queue_worker.queue_jobs_dead_letter
            WHERE id = ANY (v_deps) AND tenant_id <> p_tenant_id LIMIT 1;
        END IF;
        IF v_foreign IS NOT NULL THEN
            -- Named like a missing one: a tenant learns nothing about another tenant's jobs.
            RAISE EXCEPTION 'enqueue_job: dependency % does not exist for this tenant', v_foreign
                USING ERRCODE = 'foreign_key_violation';
        END IF;

        IF v_failed IS NULL THEN
            SELECT id INTO v_failed FROM queue_worker.queue_jobs_dead_letter WHERE id = ANY (v_deps) LIMIT 1;
        END IF;

        SELECT d INTO v_missing FROM unnest(v_deps) AS d
        WHERE NOT EXISTS (SELECT 1 FROM queue_worker.queue_jobs WHERE id = d)
          AND NOT EXISTS (SELECT 1 FROM queue_worker.queue_jobs_dead_letter WHERE id = d)
        LIMIT 1;
        IF v_missing IS NOT NULL THEN
            RAISE EXCEPTION 'enqueue_job: dependency % does not exist for this tenant', v_missing
                USING ERRCODE = 'foreign_key_violation';
        END IF;
    END IF;

    LOOP
        INSERT INTO queue_worker.queue_jobs (tenant_id, job_type, payload, priority, scheduled_at,
                                             max_attempts, unique_key, depends_on, waiting_on, status)
        VALUES (p_tenant_id, p_job_type, p_payload, coalesce(p_priority, 0),
                coalesce(p_scheduled_at, now()), p_max_attempts, p_unique_key, v_deps,
                coalesce(cardinality(v_live), 0),
                CASE WHEN coalesce(cardinality(v_live), 0) > 0 THEN 'waiting' ELSE 'pending' END)
        ON CONFLICT (tenant_id, unique_key)
            WHERE unique_key IS NOT NULL AND status IN ('waiting', 'pending', 'processing')
            DO NOTHING
        RETURNING id INTO v_id;
        EXIT WHEN v_id IS NOT NULL;

        SELECT id INTO v_id FROM queue_worker.queue_jobs
        WHERE tenant_id = p_tenant_id AND unique_key = p_unique_key
          AND status IN ('waiting', 'pending', 'processing');
        IF v_id IS NOT NULL THEN
            RETURN v_id;  -- the unfinished job that holds the key; nothing inserted
        END IF;
        -- The holder finished between the two statements: the key is free now, insert again.
    END LOOP;

    IF v_live IS NOT NULL THEN
        INSERT INTO queue_worker.queue_job_dependencies (depends_on, job_id)
        SELECT d, v_id FROM unnest(v_live) AS d;
    END IF;

    IF v_failed IS NOT NULL THEN
        PERFORM queue_worker.queue_move_to_dead_letter(ARRAY[v_id], ARRAY[format('Dependency %s failed', v_failed)]);
    END IF;
    RETURN v_id;
END;
$$;

-- As in 0001 (replaced by a new claim in a later migration).
CREATE OR REPLACE FUNCTION queue_worker.claim_jobs(
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
SECURITY DEFINER
SET search_path = ''
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

    SELECT array_agg(j.id),
           array_agg(format('Exhausted %s attempts: the lease expired during the last one', j.max_attempts))
    INTO v_exhausted, v_reasons
    FROM (
        SELECT q.id, q.max_attempts FROM queue_worker.queue_jobs q
        WHERE q.status = 'processing' AND q.locked_until < now() AND q.attempts >= q.max_attempts
          AND (p_tenant_id IS NULL OR q.tenant_id = p_tenant_id)
        LIMIT 1000
        FOR UPDATE SKIP LOCKED) j;
    IF v_exhausted IS NOT NULL THEN
        UPDATE queue_worker.queue_jobs q
        SET errors = q.errors || jsonb_build_array(jsonb_build_object(
                'attempt', q.attempts, 'at', now(), 'status', NULL,
                'error', format('Lease expired during attempt %s (worker %s stopped)', q.attempts, q.locked_by))),
            last_error = format('Lease expired during attempt %s (worker %s stopped)', q.attempts, q.locked_by)
        WHERE q.id = ANY (v_exhausted);
        PERFORM queue_worker.queue_move_to_dead_letter(v_exhausted, v_reasons);
    END IF;

    WITH RECURSIVE tenants AS (
        (SELECT q.tenant_id FROM queue_worker.queue_jobs q
         WHERE q.status IN ('pending', 'processing') AND p_tenant_id IS NULL
         ORDER BY q.tenant_id LIMIT 1)
        UNION ALL
        SELECT (SELECT q.tenant_id FROM queue_worker.queue_jobs q
                WHERE q.status IN ('pending', 'processing') AND q.tenant_id > t.tenant_id
                ORDER BY q.tenant_id LIMIT 1)
        FROM tenants t WHERE t.tenant_id IS NOT NULL
    ), chosen_tenants AS (
        SELECT s.tenant_id
        FROM (SELECT t.tenant_id FROM tenants t WHERE t.tenant_id IS NOT NULL
              UNION ALL
              SELECT p_tenant_id WHERE p_tenant_id IS NOT NULL) s
        WHERE p_shards = 1
           OR (hashtextextended(s.tenant_id::text, 0) & 9223372036854775807) % p_shards = p_shard
    ), shares AS (
        SELECT best.tenant_id, count(*)::int AS n
        FROM (SELECT c.tenant_id
              FROM chosen_tenants t
              CROSS JOIN LATERAL (
                  SELECT q.tenant_id, q.priority, q.scheduled_at
                  FROM queue_worker.queue_jobs q
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
        SELECT c.id, c.status
        FROM shares s
        CROSS JOIN LATERAL (
            SELECT q.id, q.status
            FROM queue_worker.queue_jobs q
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

    RETURN QUERY
    UPDATE queue_worker.queue_jobs q
    SET status = 'processing',
        attempts = q.attempts + 1,
        locked_until = now() + make_interval(secs => p_lease_seconds),
        locked_by = p_worker_id,
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

CREATE OR REPLACE FUNCTION queue_worker.claim_next_job(
    p_tenant_id uuid DEFAULT NULL,
    p_lease_seconds int DEFAULT 300,
    p_worker_id text DEFAULT NULL)
RETURNS SETOF queue_worker.queue_jobs
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = ''
AS $$
DECLARE
    v_id uuid;
BEGIN
    SELECT c.id INTO v_id
    FROM queue_worker.claim_jobs(coalesce(p_worker_id, 'claim_next_job'), p_lease_seconds, 1, 1, p_tenant_id) c;
    -- A statement of its own: one statement that claimed and read the row would read it as it
    -- was before the claim (pending, no lease).
    RETURN QUERY SELECT q.* FROM queue_worker.queue_jobs q WHERE q.id = v_id;
END;
$$;

-- As in 0001.
CREATE OR REPLACE FUNCTION queue_worker.settle_jobs(p_worker_id text, p_outcomes jsonb)
RETURNS TABLE (job_id uuid, result text)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = ''
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
        FROM queue_worker.queue_jobs q JOIN o ON o.id = q.id
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
        UPDATE queue_worker.queue_jobs q
        SET status = CASE WHEN d.result = 'completed' THEN 'completed' ELSE 'pending' END,
            completed_at = CASE WHEN d.result = 'completed' THEN now() END,
            attempts = CASE WHEN d.outcome IN ('released', 'rate_limited') THEN q.attempts - 1
                            ELSE q.attempts END,
            scheduled_at = CASE
                WHEN d.outcome = 'completed' THEN q.scheduled_at
                WHEN d.outcome = 'released' THEN coalesce(d.retry_at, q.scheduled_at)
                ELSE coalesce(d.retry_at, now() + queue_worker.queue_backoff(greatest(q.attempts, 1)))
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
        UPDATE queue_worker.queue_jobs q
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
        PERFORM queue_worker.queue_move_to_dead_letter(v_dead, v_dead_reasons);
        v_results := v_results || (SELECT jsonb_agg(jsonb_build_object('id', d, 'result', 'dead'))
                                   FROM unnest(v_dead) d);
    END IF;
    IF v_completed IS NOT NULL THEN
        PERFORM queue_worker.queue_release_dependents(v_completed);
    END IF;

    RETURN QUERY
    SELECT (e->>'id')::uuid, coalesce(r.result, 'stale')
    FROM jsonb_array_elements(p_outcomes) e
    LEFT JOIN (SELECT (x->>'id')::uuid AS id, x->>'result' AS result
               FROM jsonb_array_elements(v_results) x) r ON r.id = (e->>'id')::uuid;
END;
$$;

CREATE OR REPLACE FUNCTION queue_worker.complete_job(p_job_id uuid, p_worker_id text DEFAULT NULL)
RETURNS boolean
LANGUAGE sql
SECURITY DEFINER
SET search_path = ''
AS $$
    SELECT s.result = 'completed'
    FROM queue_worker.settle_jobs(p_worker_id, jsonb_build_array(jsonb_build_object(
        'id', p_job_id, 'outcome', 'completed'))) s
$$;

CREATE OR REPLACE FUNCTION queue_worker.fail_job(
    p_job_id uuid,
    p_error text,
    p_retryable boolean DEFAULT true,
    p_retry_at timestamptz DEFAULT NULL,
    p_worker_id text DEFAULT NULL)
RETURNS text
LANGUAGE sql
SECURITY DEFINER
SET search_path = ''
AS $$
    SELECT s.result
    FROM queue_worker.settle_jobs(p_worker_id, jsonb_build_array(jsonb_build_object(
        'id', p_job_id, 'error', p_error, 'retry_at', p_retry_at,
        'outcome', CASE WHEN coalesce(p_retryable, true) THEN 'failed' ELSE 'dead' END))) s
$$;

-- As in 0001.
CREATE OR REPLACE FUNCTION queue_worker.requeue_dead_letter(p_job_id uuid)
RETURNS uuid
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = ''
AS $$
DECLARE
    v_job queue_worker.queue_jobs_dead_letter;
    v_live uuid[];
    v_seen uuid[];
    v_dead uuid[];
    v_back uuid[];
    v_cancelled uuid;
    v_holder uuid;
BEGIN
    DELETE FROM queue_worker.queue_jobs_dead_letter WHERE id = p_job_id RETURNING * INTO v_job;
    IF v_job.id IS NULL THEN
        RAISE EXCEPTION 'requeue_dead_letter: job % is not in the dead letter table', p_job_id
            USING ERRCODE = 'no_data_found';
    END IF;

    IF v_job.unique_key IS NOT NULL THEN
        SELECT id INTO v_holder FROM queue_worker.queue_jobs
        WHERE tenant_id = v_job.tenant_id AND unique_key = v_job.unique_key
          AND status IN ('waiting', 'pending', 'processing');
        IF v_holder IS NOT NULL THEN
            RAISE EXCEPTION 'requeue_dead_letter: unique key % is held by unfinished job %', v_job.unique_key, v_holder
                USING ERRCODE = 'unique_violation';
        END IF;
    END IF;

    IF v_job.depends_on IS NOT NULL THEN
        SELECT array_agg(id) FILTER (WHERE status IN ('waiting', 'pending', 'processing')),
               (array_agg(id) FILTER (WHERE status = 'cancelled'))[1],
               array_agg(id)
        INTO v_live, v_cancelled, v_seen
        FROM (SELECT id, status FROM queue_worker.queue_jobs WHERE id = ANY (v_job.depends_on) FOR SHARE) s;
        IF v_cancelled IS NOT NULL THEN
            RAISE EXCEPTION 'requeue_dead_letter: dependency % of job % was cancelled, so the job can never run',
                v_cancelled, p_job_id USING ERRCODE = 'foreign_key_violation';
        END IF;
        SELECT array_agg(id) INTO v_dead FROM (
            SELECT id FROM queue_worker.queue_jobs_dead_letter
            WHERE id = ANY (v_job.depends_on) AND id <> ALL (coalesce(v_seen, '{}'))
            FOR SHARE) s;
        SELECT array_agg(id) INTO v_back FROM (
            SELECT id FROM queue_worker.queue_jobs
            WHERE id = ANY (v_job.depends_on) AND id <> ALL (coalesce(v_seen, '{}'))
              AND id <> ALL (coalesce(v_dead, '{}'))
              AND status IN ('waiting', 'pending', 'processing')
            FOR SHARE) s;
        v_live := nullif(coalesce(v_live, '{}') || coalesce(v_dead, '{}') || coalesce(v_back, '{}'), '{}');
    END IF;

    INSERT INTO queue_worker.queue_jobs (id, tenant_id, job_type, payload, status, priority, attempts,
                                         max_attempts, scheduled_at, last_error, errors, unique_key,
                                         depends_on, waiting_on, created_at, updated_at)
    VALUES (v_job.id, v_job.tenant_id, v_job.job_type, v_job.payload,
            CASE WHEN v_live IS NULL THEN 'pending' ELSE 'waiting' END, v_job.priority, 0,
            v_job.max_attempts, now(), v_job.last_error, v_job.errors, v_job.unique_key,
            v_job.depends_on, coalesce(cardinality(v_live), 0), v_job.created_at, now());

    IF v_live IS NOT NULL THEN
        INSERT INTO queue_worker.queue_job_dependencies (depends_on, job_id)
        SELECT d, v_job.id FROM unnest(v_live) d;
    END IF;
    RETURN v_job.id;
END;
$$;

CREATE OR REPLACE FUNCTION queue_worker.requeue_dead_letters(
    p_tenant_id uuid DEFAULT NULL,
    p_job_type text DEFAULT NULL,
    p_dead_after timestamptz DEFAULT NULL,
    p_limit int DEFAULT 1000)
RETURNS int
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = ''
AS $$
DECLARE
    v_id uuid;
    v_count int := 0;
BEGIN
    FOR v_id IN
        SELECT id FROM queue_worker.queue_jobs_dead_letter
        WHERE (p_tenant_id IS NULL OR tenant_id = p_tenant_id)
          AND (p_job_type IS NULL OR job_type = p_job_type)
          AND (p_dead_after IS NULL OR dead_at >= p_dead_after)
        ORDER BY dead_at
        LIMIT p_limit
    LOOP
        BEGIN
            PERFORM queue_worker.requeue_dead_letter(v_id);
            v_count := v_count + 1;
        EXCEPTION WHEN unique_violation OR no_data_found OR foreign_key_violation THEN
            NULL;
        END;
    END LOOP;
    RETURN v_count;
END;
$$;

CREATE OR REPLACE FUNCTION queue_worker.cancel_job(p_job_id uuid)
RETURNS boolean
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = ''
AS $$
DECLARE
    v_id uuid;
BEGIN
    UPDATE queue_worker.queue_jobs
    SET status = 'cancelled', locked_until = NULL, locked_by = NULL, updated_at = now()
    WHERE id = p_job_id AND status IN ('waiting', 'pending', 'processing')
    RETURNING id INTO v_id;
    IF v_id IS NULL THEN
        RETURN false;
    END IF;
    PERFORM queue_worker.queue_unlink_jobs(ARRAY[v_id]);
    PERFORM queue_worker.queue_fail_dependents(ARRAY[v_id]);
    RETURN true;
END;
$$;

-- The backlog, as metrics report it: jobs due now, and how long the oldest has waited (seconds).
CREATE FUNCTION queue_worker.queue_backlog()
RETURNS TABLE (due_now int, oldest_age_seconds double precision)
LANGUAGE sql
STABLE
SECURITY DEFINER
SET search_path = ''
AS $$
    SELECT count(*)::int,
           coalesce(extract(epoch FROM now() - min(scheduled_at)), 0)::float8
    FROM queue_worker.queue_jobs
    WHERE status IN ('pending', 'processing') AND scheduled_at <= now()
      AND (status = 'pending' OR locked_until < now())
$$;

-- Reading, for operators ------------------------------------------------------------------------

-- Jobs by job type and status, and the dead letters by job type (status 'dead letter').
CREATE FUNCTION queue_worker.queue_stats()
RETURNS TABLE (job_type text, status text, jobs int)
LANGUAGE sql
STABLE
SECURITY DEFINER
SET search_path = ''
AS $$
    SELECT job_type, status, count(*)::int FROM queue_worker.queue_jobs GROUP BY job_type, status
    UNION ALL
    SELECT job_type, 'dead letter', count(*)::int FROM queue_worker.queue_jobs_dead_letter GROUP BY job_type
$$;

CREATE FUNCTION queue_worker.get_job(p_job_id uuid)
RETURNS SETOF queue_worker.queue_jobs
LANGUAGE sql
STABLE
SECURITY DEFINER
SET search_path = ''
AS $$
    SELECT * FROM queue_worker.queue_jobs WHERE id = p_job_id
$$;

CREATE FUNCTION queue_worker.get_dead_letter(p_job_id uuid)
RETURNS SETOF queue_worker.queue_jobs_dead_letter
LANGUAGE sql
STABLE
SECURITY DEFINER
SET search_path = ''
AS $$
    SELECT * FROM queue_worker.queue_jobs_dead_letter WHERE id = p_job_id
$$;

-- Newest first.
CREATE FUNCTION queue_worker.list_dead_letters(
    p_tenant_id uuid DEFAULT NULL,
    p_job_type text DEFAULT NULL,
    p_limit int DEFAULT 50)
RETURNS SETOF queue_worker.queue_jobs_dead_letter
LANGUAGE sql
STABLE
SECURITY DEFINER
SET search_path = ''
AS $$
    SELECT * FROM queue_worker.queue_jobs_dead_letter
    WHERE (p_tenant_id IS NULL OR tenant_id = p_tenant_id)
      AND (p_job_type IS NULL OR job_type = p_job_type)
    ORDER BY dead_at DESC
    LIMIT greatest(coalesce(p_limit, 50), 0)
$$;

-- Schedules ------------------------------------------------------------------------------------

-- A five-field cron expression (or a macro) whose numbers are all in range. The worker reads cron
-- with a full cron library and pauses a schedule it cannot read (queue_schedule_failed); this
-- catches at the SQL entry point the mistakes that are only numbers out of range or the wrong
-- number of fields. Day-of-month and day-of-week tokens with L, W or # are left to the library.
CREATE FUNCTION queue_worker.queue_cron_is_valid(p_cron text)
RETURNS boolean
LANGUAGE plpgsql
IMMUTABLE PARALLEL SAFE
SET search_path = ''
AS $$
DECLARE
    v_fields text[];
    v_low constant int[] := ARRAY[0, 0, 1, 1, 0];
    v_high constant int[] := ARRAY[59, 23, 31, 12, 7];
    v_item text;
    v_match text[];
    v_names text;
    i int;
BEGIN
    IF p_cron IS NULL OR p_cron !~ '\S' THEN
        RETURN false;
    END IF;
    IF btrim(p_cron) ~ '^@' THEN
        RETURN lower(btrim(p_cron)) IN ('@yearly', '@annually', '@monthly', '@weekly', '@daily', '@midnight', '@hourly');
    END IF;
    v_fields := regexp_split_to_array(btrim(p_cron), '\s+');
    IF cardinality(v_fields) <> 5 THEN
        RETURN false;
    END IF;
    FOR i IN 1..5 LOOP
        v_names := upper(v_fields[i]);
        IF i = 4 THEN
            v_names := replace(replace(replace(replace(replace(replace(replace(replace(replace(replace(replace(replace(
                v_names, 'JAN', '1'), 'FEB', '2'), 'MAR', '3'), 'APR', '4'), 'MAY', '5'), 'JUN', '6'),
                'JUL', '7'), 'AUG', '8'), 'SEP', '9'), 'OCT', '10'), 'NOV', '11'), 'DEC', '12');
        ELSIF i = 5 THEN
            v_names := replace(replace(replace(replace(replace(replace(replace(
                v_names, 'SUN', '0'), 'MON', '1'), 'TUE', '2'), 'WED', '3'), 'THU', '4'), 'FRI', '5'), 'SAT', '6');
        END IF;
        FOREACH v_item IN ARRAY string_to_array(v_names, ',') LOOP
            IF i IN (3, 5) AND v_item ~ '[LW#]' THEN
                CONTINUE;  -- the library's to judge
            END IF;
            v_match := regexp_match(v_item, '^(\*|(\d{1,2})(-(\d{1,2}))?)(/(\d{1,3}))?$');
            IF v_match IS NULL THEN
                RETURN false;
            END IF;
            IF v_match[2] IS NOT NULL AND (v_match[2]::int NOT BETWEEN v_low[i] AND v_high[i]) THEN
                RETURN false;
            END IF;
            IF v_match[4] IS NOT NULL AND (v_match[4]::int NOT BETWEEN v_low[i] AND v_high[i]
                                           OR v_match[4]::int < v_match[2]::int) THEN
                RETURN false;
            END IF;
            IF v_match[6] IS NOT NULL AND v_match[6]::int < 1 THEN
                RETURN false;
            END IF;
        END LOOP;
    END LOOP;
    RETURN true;
END;
$$;

-- As in 0003, and the cron expression is checked (queue_cron_is_valid); a replaced schedule
-- forgets its last error.
CREATE OR REPLACE FUNCTION queue_worker.upsert_schedule(
    p_tenant_id uuid,
    p_name text,
    p_job_type text,
    p_cron text,
    p_timezone text DEFAULT 'UTC',
    p_payload jsonb DEFAULT '{}',
    p_priority int DEFAULT 0,
    p_max_attempts int DEFAULT 5,
    p_max_catch_up int DEFAULT 1,
    p_next_fire_at timestamptz DEFAULT NULL)
RETURNS uuid
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = ''
AS $$
DECLARE
    v_id uuid;
BEGIN
    IF p_tenant_id IS NULL THEN
        RAISE EXCEPTION 'upsert_schedule: p_tenant_id must not be null' USING ERRCODE = 'not_null_violation';
    END IF;
    IF p_name IS NULL OR p_name !~ '\S' THEN
        RAISE EXCEPTION 'upsert_schedule: p_name must not be blank' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_job_type IS NULL OR p_job_type !~ '\S' THEN
        RAISE EXCEPTION 'upsert_schedule: p_job_type must not be blank' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_cron IS NULL OR p_cron !~ '\S' THEN
        RAISE EXCEPTION 'upsert_schedule: p_cron must not be blank' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF NOT queue_worker.queue_cron_is_valid(p_cron) THEN
        RAISE EXCEPTION 'upsert_schedule: invalid cron expression %', quote_literal(p_cron)
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Five fields (minute 0-59, hour 0-23, day of month 1-31, month 1-12, day of week 0-7), e.g. ''0 6 * * *'', or @hourly, @daily, @weekly, @monthly, @yearly.';
    END IF;
    IF NOT queue_worker.queue_is_valid_timezone(p_timezone) THEN
        RAISE EXCEPTION 'upsert_schedule: unknown time zone %', coalesce(quote_literal(p_timezone), 'null')
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Use an IANA time zone name such as ''Europe/Berlin'' or ''UTC''.';
    END IF;
    IF p_payload IS NULL OR jsonb_typeof(p_payload) <> 'object' THEN
        RAISE EXCEPTION 'upsert_schedule: p_payload must be a JSON object, got %', coalesce(jsonb_typeof(p_payload), 'null')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_max_attempts IS NOT NULL AND p_max_attempts < 1 THEN
        RAISE EXCEPTION 'upsert_schedule: p_max_attempts must be at least 1, got %', p_max_attempts
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_max_catch_up IS NOT NULL AND (p_max_catch_up < 0 OR p_max_catch_up > 1000) THEN
        RAISE EXCEPTION 'upsert_schedule: p_max_catch_up must be between 0 and 1000, got %', p_max_catch_up
            USING ERRCODE = 'invalid_parameter_value';
    END IF;

    INSERT INTO queue_worker.queue_schedules AS s (tenant_id, name, job_type, payload, cron, timezone,
                                                   priority, max_attempts, max_catch_up, next_fire_at)
    VALUES (p_tenant_id, p_name, p_job_type, p_payload, p_cron, p_timezone, coalesce(p_priority, 0),
            coalesce(p_max_attempts, 5), coalesce(p_max_catch_up, 1), p_next_fire_at)
    ON CONFLICT ON CONSTRAINT queue_schedules_tenant_name_key DO UPDATE
    SET job_type = EXCLUDED.job_type,
        payload = EXCLUDED.payload,
        cron = EXCLUDED.cron,
        timezone = EXCLUDED.timezone,
        priority = EXCLUDED.priority,
        max_attempts = EXCLUDED.max_attempts,
        max_catch_up = EXCLUDED.max_catch_up,
        next_fire_at = CASE
            WHEN s.paused THEN NULL
            WHEN s.cron = EXCLUDED.cron AND s.timezone = EXCLUDED.timezone
                 AND s.next_fire_at IS NOT NULL THEN s.next_fire_at
            ELSE EXCLUDED.next_fire_at
        END,
        last_error = NULL,
        last_error_at = NULL,
        updated_at = now()
    RETURNING s.id INTO v_id;
    RETURN v_id;
END;
$$;

CREATE OR REPLACE FUNCTION queue_worker.pause_schedule(p_id uuid)
RETURNS boolean
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = ''
AS $$
BEGIN
    UPDATE queue_worker.queue_schedules
    SET paused = true,
        next_fire_at = NULL,
        updated_at = CASE WHEN paused THEN updated_at ELSE now() END
    WHERE id = p_id;
    RETURN FOUND;
END;
$$;

-- As in 0003; a resumed schedule forgets its last error.
CREATE OR REPLACE FUNCTION queue_worker.resume_schedule(p_id uuid, p_next_fire_at timestamptz DEFAULT NULL)
RETURNS boolean
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = ''
AS $$
BEGIN
    UPDATE queue_worker.queue_schedules
    SET paused = false,
        next_fire_at = CASE WHEN paused THEN p_next_fire_at ELSE next_fire_at END,
        last_error = CASE WHEN paused THEN NULL ELSE last_error END,
        last_error_at = CASE WHEN paused THEN NULL ELSE last_error_at END,
        updated_at = CASE WHEN paused THEN now() ELSE updated_at END
    WHERE id = p_id;
    RETURN FOUND;
END;
$$;

CREATE OR REPLACE FUNCTION queue_worker.delete_schedule(p_id uuid)
RETURNS boolean
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = ''
AS $$
BEGIN
    DELETE FROM queue_worker.queue_schedules WHERE id = p_id;
    RETURN FOUND;
END;
$$;

-- As in 0003.
CREATE OR REPLACE FUNCTION queue_worker.fire_schedule(
    p_id uuid,
    p_expected_next timestamptz,
    p_fire_times timestamptz[],
    p_next_fire_at timestamptz)
RETURNS int
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = ''
AS $$
DECLARE
    v_schedule queue_worker.queue_schedules;
    v_latest timestamptz;
    v_time timestamptz;
    v_key text;
    v_before uuid;
    v_id uuid;
    v_created int := 0;
BEGIN
    IF p_id IS NULL THEN
        RAISE EXCEPTION 'fire_schedule: p_id must not be null' USING ERRCODE = 'not_null_violation';
    END IF;
    IF p_next_fire_at IS NULL THEN
        RAISE EXCEPTION 'fire_schedule: p_next_fire_at must not be null' USING ERRCODE = 'not_null_violation';
    END IF;
    IF array_position(p_fire_times, NULL) IS NOT NULL THEN
        RAISE EXCEPTION 'fire_schedule: p_fire_times must not contain null' USING ERRCODE = 'not_null_violation';
    END IF;
    SELECT max(t) INTO v_latest FROM unnest(p_fire_times) AS t;
    IF v_latest IS NOT NULL AND p_next_fire_at <= v_latest THEN
        RAISE EXCEPTION 'fire_schedule: p_next_fire_at (%) must be later than every fire time (the latest is %)',
            p_next_fire_at, v_latest
            USING ERRCODE = 'invalid_parameter_value';
    END IF;

    UPDATE queue_worker.queue_schedules
    SET next_fire_at = p_next_fire_at,
        last_fired_at = coalesce(v_latest, last_fired_at),
        updated_at = now()
    WHERE id = p_id
      AND NOT paused
      AND next_fire_at IS NOT DISTINCT FROM p_expected_next
    RETURNING * INTO v_schedule;
    IF NOT FOUND THEN
        RETURN 0;
    END IF;

    FOR v_time IN SELECT DISTINCT t FROM unnest(p_fire_times) AS t ORDER BY t LOOP
        v_key := format('schedule:%s:%s', v_schedule.id, floor(extract(epoch FROM v_time))::bigint);
        SELECT id INTO v_before FROM queue_worker.queue_jobs
        WHERE tenant_id = v_schedule.tenant_id AND unique_key = v_key
          AND status IN ('waiting', 'pending', 'processing');
        v_id := queue_worker.enqueue_job(
            p_tenant_id => v_schedule.tenant_id,
            p_job_type => v_schedule.job_type,
            p_payload => v_schedule.payload || jsonb_build_object(
                'scheduled_for', to_char(v_time AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"')),
            p_priority => v_schedule.priority,
            p_scheduled_at => v_time,
            p_max_attempts => v_schedule.max_attempts,
            p_unique_key => v_key);
        IF v_before IS DISTINCT FROM v_id THEN
            v_created := v_created + 1;
        END IF;
    END LOOP;
    RETURN v_created;
END;
$$;

-- What a firing run reads: due schedules (not paused, next_fire_at <= p_now or not computed yet),
-- oldest first, with the clock it decided by (p_now, or the database's now()).
CREATE FUNCTION queue_worker.queue_due_schedules(p_now timestamptz DEFAULT NULL, p_limit int DEFAULT 100)
RETURNS TABLE (id uuid, cron text, timezone text, max_catch_up int, next_fire_at timestamptz, clock timestamptz)
LANGUAGE sql
STABLE
SECURITY DEFINER
SET search_path = ''
AS $$
    SELECT s.id, s.cron, s.timezone, s.max_catch_up, s.next_fire_at, c.now
    FROM queue_worker.queue_schedules s
    CROSS JOIN (SELECT coalesce(p_now, now()) AS now) c
    WHERE NOT s.paused AND (s.next_fire_at <= c.now OR s.next_fire_at IS NULL)
    ORDER BY s.next_fire_at NULLS FIRST
    LIMIT greatest(coalesce(p_limit, 100), 0)
$$;

-- A schedule the worker cannot fire (a cron expression or time zone it cannot read) pauses
-- itself with the error recorded, instead of failing every invocation. Compare-and-set on
-- next_fire_at, as fire_schedule: a schedule fixed meanwhile is left alone. true if paused.
CREATE FUNCTION queue_worker.queue_schedule_failed(p_id uuid, p_expected_next timestamptz, p_error text)
RETURNS boolean
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = ''
AS $$
BEGIN
    UPDATE queue_worker.queue_schedules
    SET paused = true,
        next_fire_at = NULL,
        last_error = left(coalesce(p_error, 'unknown error'), 1000),
        last_error_at = now(),
        updated_at = now()
    WHERE id = p_id AND NOT paused AND next_fire_at IS NOT DISTINCT FROM p_expected_next;
    RETURN FOUND;
END;
$$;

CREATE FUNCTION queue_worker.get_schedule(p_id uuid)
RETURNS SETOF queue_worker.queue_schedules
LANGUAGE sql
STABLE
SECURITY DEFINER
SET search_path = ''
AS $$
    SELECT * FROM queue_worker.queue_schedules WHERE id = p_id
$$;

-- By tenant and name.
CREATE FUNCTION queue_worker.list_schedules(p_tenant_id uuid DEFAULT NULL)
RETURNS SETOF queue_worker.queue_schedules
LANGUAGE sql
STABLE
SECURITY DEFINER
SET search_path = ''
AS $$
    SELECT * FROM queue_worker.queue_schedules
    WHERE p_tenant_id IS NULL OR tenant_id = p_tenant_id
    ORDER BY tenant_id, name
$$;

-- Maintenance (as in 0004) ---------------------------------------------------------------------

CREATE OR REPLACE FUNCTION queue_worker.queue_prune(
    p_completed_before timestamptz,
    p_dead_before timestamptz,
    p_chunk int DEFAULT 500)
RETURNS TABLE (jobs_pruned int, dead_letters_pruned int, idempotency_pruned int)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = ''
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
        SELECT c.id FROM queue_worker.queue_jobs c
        WHERE c.status IN ('completed', 'cancelled') AND c.updated_at < p_completed_before
          AND NOT (c.status = 'cancelled' AND EXISTS (
              SELECT 1 FROM queue_worker.queue_jobs_dead_letter r
              WHERE r.depends_on IS NOT NULL AND r.depends_on @> ARRAY[c.id]))
        ORDER BY c.updated_at
        LIMIT p_chunk
        FOR UPDATE OF c SKIP LOCKED
    )
    DELETE FROM queue_worker.queue_jobs j USING doomed WHERE j.id = doomed.id;
    GET DIAGNOSTICS v_jobs = ROW_COUNT;

    WITH doomed AS (
        SELECT c.id FROM queue_worker.queue_jobs_dead_letter c
        WHERE c.dead_at < p_dead_before
          AND NOT EXISTS (SELECT 1 FROM queue_worker.queue_job_dependencies l WHERE l.depends_on = c.id)
          AND NOT EXISTS (SELECT 1 FROM queue_worker.queue_jobs_dead_letter r
                          WHERE r.depends_on IS NOT NULL AND r.depends_on @> ARRAY[c.id]
                            AND r.id <> c.id)
        ORDER BY c.dead_at
        LIMIT p_chunk
        FOR UPDATE OF c SKIP LOCKED
    )
    DELETE FROM queue_worker.queue_jobs_dead_letter d USING doomed WHERE d.id = doomed.id;
    GET DIAGNOSTICS v_dead = ROW_COUNT;

    WITH doomed AS (
        SELECT id FROM queue_worker.queue_idempotency
        WHERE expiration < extract(epoch FROM now())::bigint
        ORDER BY expiration
        LIMIT p_chunk
        FOR UPDATE SKIP LOCKED
    )
    DELETE FROM queue_worker.queue_idempotency i USING doomed WHERE i.id = doomed.id;
    GET DIAGNOSTICS v_idem = ROW_COUNT;

    RETURN QUERY SELECT v_jobs, v_dead, v_idem;
END;
$$;

-- The idempotency store's records (handler.dispatch.idempotency) ------------------------------
-- One function per operation of Powertools' persistence layer; times are the caller's, as
-- Powertools computes the stored timestamps from its own clock.

CREATE FUNCTION queue_worker.idempotency_get(p_id text)
RETURNS TABLE (id text, status text, expiration bigint, in_progress_expiration bigint, data text, validation text)
LANGUAGE sql
STABLE
SECURITY DEFINER
SET search_path = ''
AS $$
    SELECT r.id, r.status, r.expiration, r.in_progress_expiration, r.data, r.validation
    FROM queue_worker.queue_idempotency r WHERE r.id = p_id
$$;

-- Inserts the record, or takes over one that no longer counts (expired, or in progress past its
-- in_progress_expiration). When neither happened, returns the record in the way (taken false);
-- no row at all means it exists but this statement's snapshot predates it: read it again. (The
-- last part reads the statement's snapshot, which may show an older version of a row that ON
-- CONFLICT, seeing the latest, refused to take over: such versions are stale, not returned.)
CREATE FUNCTION queue_worker.idempotency_put(
    p_id text, p_status text, p_expiration bigint, p_in_progress_expiration bigint,
    p_validation text, p_now bigint, p_now_ms bigint)
RETURNS TABLE (taken boolean, status text, expiration bigint, in_progress_expiration bigint, data text, validation text)
LANGUAGE sql
SECURITY DEFINER
SET search_path = ''
AS $$
    WITH taken AS (
        INSERT INTO queue_worker.queue_idempotency AS r
            (id, status, expiration, in_progress_expiration, data, validation)
        VALUES (p_id, p_status, p_expiration, p_in_progress_expiration, NULL, p_validation)
        ON CONFLICT (id) DO UPDATE
        SET status = excluded.status,
            expiration = excluded.expiration,
            in_progress_expiration = excluded.in_progress_expiration,
            data = NULL,
            validation = excluded.validation,
            created_at = now()
        WHERE r.expiration < p_now
           OR (r.status = 'INPROGRESS' AND r.in_progress_expiration < p_now_ms)
        RETURNING r.id
    )
    SELECT true, NULL::text, NULL::bigint, NULL::bigint, NULL::text, NULL::text FROM taken
    UNION ALL
    SELECT false, e.status, e.expiration, e.in_progress_expiration, e.data, e.validation
    FROM queue_worker.queue_idempotency e
    WHERE e.id = p_id
      AND NOT EXISTS (SELECT FROM taken)
      AND e.expiration >= p_now
      AND NOT (e.status = 'INPROGRESS' AND coalesce(e.in_progress_expiration < p_now_ms, false))
$$;

-- Like DynamoDB's UpdateItem, this writes the record even if it has vanished meanwhile. The
-- validation hash is only written when given (otherwise it is kept).
CREATE FUNCTION queue_worker.idempotency_update(
    p_id text, p_status text, p_expiration bigint, p_data text, p_validation text)
RETURNS void
LANGUAGE sql
SECURITY DEFINER
SET search_path = ''
AS $$
    INSERT INTO queue_worker.queue_idempotency AS r (id, status, expiration, in_progress_expiration, data, validation)
    VALUES (p_id, p_status, p_expiration, NULL, p_data, p_validation)
    ON CONFLICT (id) DO UPDATE
    SET status = excluded.status,
        expiration = excluded.expiration,
        data = excluded.data,
        validation = coalesce(excluded.validation, r.validation)
$$;

CREATE FUNCTION queue_worker.idempotency_delete(p_id text)
RETURNS void
LANGUAGE sql
SECURITY DEFINER
SET search_path = ''
AS $$
    DELETE FROM queue_worker.queue_idempotency WHERE id = p_id
$$;

-- The schema version: what every command but migrate checks first ------------------------------

CREATE FUNCTION queue_worker.queue_schema_version()
RETURNS text
LANGUAGE sql
STABLE
SECURITY DEFINER
SET search_path = ''
AS $$
    SELECT max(version) FROM queue_worker.queue_worker_migrations
$$;

-- Enqueueing from applications ------------------------------------------------------------------

-- The RPC entry point for trusted code (an Edge Function or a server with the service role key:
-- supabase.rpc('enqueue_job', {...})), and for SQL that calls enqueue_job without naming the
-- schema, as callers of earlier versions did. It lives in public so that PostgREST exposes it;
-- only service_role and the queue's roles may execute it. (Supabase's service_role does not
-- inherit the privileges of roles granted to it, so it is granted this, and only this.)
CREATE FUNCTION public.enqueue_job(
    p_tenant_id uuid,
    p_job_type text,
    p_payload jsonb DEFAULT '{}',
    p_priority int DEFAULT 0,
    p_scheduled_at timestamptz DEFAULT now(),
    p_max_attempts int DEFAULT 5,
    p_unique_key text DEFAULT NULL,
    p_depends_on uuid[] DEFAULT NULL)
RETURNS uuid
LANGUAGE sql
SECURITY DEFINER
SET search_path = ''
AS $$
    SELECT queue_worker.enqueue_job(p_tenant_id, p_job_type, p_payload, p_priority, p_scheduled_at,
                                    p_max_attempts, p_unique_key, p_depends_on)
$$;

-- The opt-in entry point for a signed-in user (supabase.rpc('enqueue_job_as_user', {...}) with
-- the user's JWT). The tenant is the JWT's app_metadata.tenant_id (app_metadata is written by
-- the service role or an auth hook, never by the user); the job type must be in
-- queue_user_enqueue_rules (allow_user_enqueue), the payload within that type's size limit.
-- Priority and attempts are the defaults. Nobody may execute it until an operator grants it:
--   GRANT EXECUTE ON FUNCTION public.enqueue_job_as_user(text, jsonb, timestamptz, text, uuid[]) TO authenticated;
CREATE FUNCTION public.enqueue_job_as_user(
    p_job_type text,
    p_payload jsonb DEFAULT '{}',
    p_scheduled_at timestamptz DEFAULT NULL,
    p_unique_key text DEFAULT NULL,
    p_depends_on uuid[] DEFAULT NULL)
RETURNS uuid
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = ''
AS $$
DECLARE
    v_claims jsonb;
    v_tenant text;
    v_limit int;
BEGIN
    BEGIN
        v_claims := nullif(current_setting('request.jwt.claims', true), '')::jsonb;
    EXCEPTION WHEN invalid_text_representation THEN
        v_claims := NULL;
    END;
    v_tenant := v_claims -> 'app_metadata' ->> 'tenant_id';
    IF v_tenant IS NULL OR v_tenant !~* '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$' THEN
        RAISE EXCEPTION 'enqueue_job_as_user: the JWT carries no tenant (app_metadata.tenant_id)'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    SELECT r.max_payload_bytes INTO v_limit
    FROM queue_worker.queue_user_enqueue_rules r WHERE r.job_type = p_job_type;
    IF v_limit IS NULL THEN
        RAISE EXCEPTION 'enqueue_job_as_user: job type % may not be enqueued by users', coalesce(quote_literal(p_job_type), 'null')
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF octet_length(coalesce(p_payload, '{}'::jsonb)::text) > v_limit THEN
        RAISE EXCEPTION 'enqueue_job_as_user: the payload is larger than % bytes', v_limit
            USING ERRCODE = 'program_limit_exceeded';
    END IF;
    RETURN queue_worker.enqueue_job(
        p_tenant_id => v_tenant::uuid,
        p_job_type => p_job_type,
        p_payload => coalesce(p_payload, '{}'::jsonb),
        p_scheduled_at => greatest(coalesce(p_scheduled_at, now()), now()),
        p_unique_key => p_unique_key,
        p_depends_on => p_depends_on);
END;
$$;

-- Which job types signed-in users may enqueue, and how large a payload. Operators only.
CREATE FUNCTION queue_worker.allow_user_enqueue(p_job_type text, p_max_payload_bytes int DEFAULT 8192)
RETURNS void
LANGUAGE sql
SECURITY DEFINER
SET search_path = ''
AS $$
    INSERT INTO queue_worker.queue_user_enqueue_rules (job_type, max_payload_bytes)
    VALUES (p_job_type, p_max_payload_bytes)
    ON CONFLICT (job_type) DO UPDATE SET max_payload_bytes = excluded.max_payload_bytes
$$;

CREATE FUNCTION queue_worker.disallow_user_enqueue(p_job_type text)
RETURNS boolean
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = ''
AS $$
BEGIN
    DELETE FROM queue_worker.queue_user_enqueue_rules WHERE job_type = p_job_type;
    RETURN FOUND;
END;
$$;

-- Least privilege --------------------------------------------------------------------------------

-- Takes every privilege on the queue's objects from PUBLIC and from Supabase's API roles, and
-- turns row-level security on for every table: whatever default privileges a database has, and
-- whatever a later migration forgets. The migration runner calls it after every file.
CREATE FUNCTION queue_worker.queue_lock_down()
RETURNS void
LANGUAGE plpgsql
SET search_path = ''
AS $$
DECLARE
    v_role text;
    v_object record;
BEGIN
    REVOKE ALL ON SCHEMA queue_worker FROM PUBLIC;
    REVOKE ALL ON ALL TABLES IN SCHEMA queue_worker FROM PUBLIC;
    REVOKE ALL ON ALL SEQUENCES IN SCHEMA queue_worker FROM PUBLIC;
    REVOKE ALL ON ALL FUNCTIONS IN SCHEMA queue_worker FROM PUBLIC;
    REVOKE ALL ON FUNCTION public.enqueue_job(uuid, text, jsonb, int, timestamptz, int, text, uuid[]) FROM PUBLIC;
    REVOKE ALL ON FUNCTION public.enqueue_job_as_user(text, jsonb, timestamptz, text, uuid[]) FROM PUBLIC;
    FOREACH v_role IN ARRAY ARRAY['anon', 'authenticated'] LOOP
        IF EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = v_role) THEN
            EXECUTE format('REVOKE ALL ON SCHEMA queue_worker FROM %I', v_role);
            EXECUTE format('REVOKE ALL ON ALL TABLES IN SCHEMA queue_worker FROM %I', v_role);
            EXECUTE format('REVOKE ALL ON ALL SEQUENCES IN SCHEMA queue_worker FROM %I', v_role);
            EXECUTE format('REVOKE ALL ON ALL FUNCTIONS IN SCHEMA queue_worker FROM %I', v_role);
            EXECUTE format('REVOKE ALL ON FUNCTION public.enqueue_job(uuid, text, jsonb, int, timestamptz, int, text, uuid[]) FROM %I', v_role);
        END IF;
    END LOOP;
    -- The user wrapper keeps an EXECUTE an operator granted to authenticated on purpose; anon
    -- never has it.
    IF EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'anon') THEN
        REVOKE ALL ON FUNCTION public.enqueue_job_as_user(text, jsonb, timestamptz, text, uuid[]) FROM anon;
    END IF;
    FOR v_object IN
        SELECT c.relname FROM pg_catalog.pg_class c
        WHERE c.relnamespace = 'queue_worker'::regnamespace AND c.relkind IN ('r', 'p')
          AND NOT c.relrowsecurity
    LOOP
        EXECUTE format('ALTER TABLE queue_worker.%I ENABLE ROW LEVEL SECURITY', v_object.relname);
    END LOOP;
END;
$$;

-- An EXECUTE granted to authenticated on the user wrapper before this migration would be Supabase's
-- default privilege, not an operator's choice: take it back once, here.
DO $$
BEGIN
    IF EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'authenticated') THEN
        REVOKE ALL ON FUNCTION public.enqueue_job_as_user(text, jsonb, timestamptz, text, uuid[]) FROM authenticated;
    END IF;
END;
$$;

GRANT USAGE ON SCHEMA queue_worker TO queue_worker_runtime, queue_worker_operator;

-- What one invocation of the worker calls.
GRANT EXECUTE ON FUNCTION
    queue_worker.queue_schema_version(),
    queue_worker.queue_backoff(int, double precision),
    queue_worker.enqueue_job(uuid, text, jsonb, int, timestamptz, int, text, uuid[]),
    queue_worker.claim_jobs(text, int, int, int, uuid, int, int),
    queue_worker.claim_next_job(uuid, int, text),
    queue_worker.settle_jobs(text, jsonb),
    queue_worker.complete_job(uuid, text),
    queue_worker.fail_job(uuid, text, boolean, timestamptz, text),
    queue_worker.queue_backlog(),
    queue_worker.queue_due_schedules(timestamptz, int),
    queue_worker.fire_schedule(uuid, timestamptz, timestamptz[], timestamptz),
    queue_worker.queue_schedule_failed(uuid, timestamptz, text),
    queue_worker.idempotency_get(text),
    queue_worker.idempotency_put(text, text, bigint, bigint, text, bigint, bigint),
    queue_worker.idempotency_update(text, text, bigint, text, text),
    queue_worker.idempotency_delete(text),
    public.enqueue_job(uuid, text, jsonb, int, timestamptz, int, text, uuid[])
TO queue_worker_runtime;

-- What operators add (they are members of queue_worker_runtime as well).
GRANT EXECUTE ON FUNCTION
    queue_worker.cancel_job(uuid),
    queue_worker.requeue_dead_letter(uuid),
    queue_worker.requeue_dead_letters(uuid, text, timestamptz, int),
    queue_worker.queue_prune(timestamptz, timestamptz, int),
    queue_worker.upsert_schedule(uuid, text, text, text, text, jsonb, int, int, int, timestamptz),
    queue_worker.pause_schedule(uuid),
    queue_worker.resume_schedule(uuid, timestamptz),
    queue_worker.delete_schedule(uuid),
    queue_worker.get_schedule(uuid),
    queue_worker.list_schedules(uuid),
    queue_worker.queue_stats(),
    queue_worker.get_job(uuid),
    queue_worker.get_dead_letter(uuid),
    queue_worker.list_dead_letters(uuid, text, int),
    queue_worker.allow_user_enqueue(text, int),
    queue_worker.disallow_user_enqueue(text)
TO queue_worker_operator;

-- Supabase's trusted server-side role: the RPC entry point.
DO $$
BEGIN
    IF EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'service_role') THEN
        GRANT EXECUTE ON FUNCTION public.enqueue_job(uuid, text, jsonb, int, timestamptz, int, text, uuid[])
            TO service_role;
    END IF;
END;
$$;
