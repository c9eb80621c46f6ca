-- queue-worker 0006: flow control. A claim whose cost does not grow with the number of tenants,
-- weighted fair shares, rate limits that hold across invocations, claims keyed by round, rescues
-- that ask the idempotency record first, lingering, and explain_job.
-- docs/adr/0006-fair-flat-claim.md records the design and the roads not taken.
--
-- queue_tenants keeps, per tenant with live jobs, when its next pending job is due
-- (next_due_at), its fair-share clock (vtime: jobs taken / weight) and its rate bucket. Triggers
-- on queue_jobs keep next_due_at from being later than any pending job's scheduled_at, in the
-- same transaction that makes the job pending (and NOTIFY queue_worker_due when a tenant becomes
-- due); a claim may find it early (a job claimed or cancelled since) and corrects it, under the
-- tenant's row lock and in a statement of its own, so that it never sees a snapshot older than a
-- concurrent enqueue's. A claim reads only the due tenants of its shard, in fair-share order.

-- Where a tenant's jobs go when a scheduled run fans out: shard i of n holds the tenants whose
-- key is in [i * 2^63 / n, (i + 1) * 2^63 / n), so that a shard's claim reads only its tenants.
CREATE FUNCTION queue_worker.queue_shard_key(p_tenant_id uuid)
RETURNS bigint
LANGUAGE sql
IMMUTABLE PARALLEL SAFE
SET search_path = ''
AS $$
    SELECT hashtextextended(p_tenant_id::text, 0) & 9223372036854775807
$$;

CREATE TABLE queue_worker.queue_tenants (
    tenant_id    uuid             PRIMARY KEY,
    shard_key    bigint           NOT NULL,
    -- No pending job of this tenant is due before this (NULL: none known).
    next_due_at  timestamptz,
    -- Jobs taken, each divided by the tenant's weight: the claim serves the lowest first.
    vtime        double precision NOT NULL DEFAULT 0,
    -- The tenant's rate bucket (queue_tenant_limits): tokens at refilled_at (NULL: full).
    tokens       double precision,
    refilled_at  timestamptz
);
CREATE INDEX queue_tenants_shard_idx ON queue_worker.queue_tenants (shard_key);
CREATE INDEX queue_tenants_next_due_idx ON queue_worker.queue_tenants (next_due_at);

-- Per-tenant weight and rate, set by operators (set_tenant_limits). The row of the nil uuid is the
-- default of every tenant without one.
CREATE TABLE queue_worker.queue_tenant_limits (
    tenant_id uuid             PRIMARY KEY,
    weight    double precision NOT NULL DEFAULT 1
              CONSTRAINT queue_tenant_limits_weight CHECK (weight > 0 AND weight <= 100),
    rate      double precision CONSTRAINT queue_tenant_limits_rate CHECK (rate > 0),  -- jobs/s; NULL: none
    burst     double precision CONSTRAINT queue_tenant_limits_burst CHECK (burst >= 1)
);

-- The worker's routes, as its configuration (JOB_ROUTES) names them: which function a job type
-- goes to. The claim reads them for the functions' rate limits, explain_job for its answers.
CREATE TABLE queue_worker.queue_routes (
    job_type   text        PRIMARY KEY,
    function   text        NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- What the queue knows of each function: its rate bucket (rate and burst from JOB_ROUTES), the
-- adaptive limit of calls in flight that invocations hand on to each other, and its last
-- refusal (401, 403, 404), for explain_job.
CREATE TABLE queue_worker.queue_functions (
    function          text             PRIMARY KEY,
    rate              double precision CONSTRAINT queue_functions_rate CHECK (rate > 0),
    burst             double precision CONSTRAINT queue_functions_burst CHECK (burst >= 1),
    tokens            double precision,
    refilled_at       timestamptz,
    concurrency_limit double precision,
    concurrency_cap   int,
    circuit_status    int,
    circuit_error     text,
    circuit_opened_at timestamptz,
    updated_at        timestamptz      NOT NULL DEFAULT now()
);

-- The one invocation that lingers for new work (see queue_linger_take).
CREATE TABLE queue_worker.queue_linger (
    id         int  PRIMARY KEY CONSTRAINT queue_linger_one_row CHECK (id = 1),
    worker_id  text,
    started_at timestamptz,  -- when the lingering invocation started: the latest one lingers
    until      timestamptz
);
INSERT INTO queue_worker.queue_linger (id) VALUES (1);

-- The round a job was leased in (a claim repeated with the same worker and round returns the
-- same jobs), how (new, rescue, check: an expired last attempt whose record is asked for), and
-- why a pending job was pushed back without an attempt (a rate limit), for explain_job.
ALTER TABLE queue_worker.queue_jobs
    ADD COLUMN lease_round int,
    ADD COLUMN leased_as text,
    ADD COLUMN held_reason text;

-- The claim reads pending jobs only, per tenant in claim order; rescues come from the lease index.
CREATE INDEX queue_jobs_pending_idx ON queue_worker.queue_jobs (tenant_id, priority DESC, scheduled_at)
    WHERE status = 'pending';
-- A tenant's next due time.
CREATE INDEX queue_jobs_pending_due_idx ON queue_worker.queue_jobs (tenant_id, scheduled_at)
    WHERE status = 'pending';
DROP INDEX queue_worker.queue_jobs_claim_idx;

INSERT INTO queue_worker.queue_tenants (tenant_id, shard_key, next_due_at)
SELECT tenant_id, queue_worker.queue_shard_key(tenant_id),
       min(scheduled_at) FILTER (WHERE status = 'pending')
FROM queue_worker.queue_jobs
WHERE status IN ('waiting', 'pending', 'processing')
GROUP BY tenant_id;

-- Keeping next_due_at -------------------------------------------------------------------------

-- Lowers the tenants' next_due_at to the given times (one per tenant), creating their rows, and
-- notifies queue_worker_due when one of them became due. ON CONFLICT DO UPDATE locks the tenant's
-- row even when nothing changes: a claim correcting next_due_at meanwhile waits for this
-- transaction, then sees its job.
CREATE FUNCTION queue_worker.queue_tenants_due(p_tenants uuid[], p_due timestamptz[])
RETURNS void
LANGUAGE plpgsql
SET search_path = ''
AS $$
DECLARE
    v_became_due boolean;
BEGIN
    WITH due AS (
        SELECT t.tenant_id, min(t.due) AS due FROM unnest(p_tenants, p_due) AS t(tenant_id, due)
        GROUP BY t.tenant_id
    ), lowered AS (
        INSERT INTO queue_worker.queue_tenants AS q (tenant_id, shard_key, next_due_at)
        SELECT d.tenant_id, queue_worker.queue_shard_key(d.tenant_id), d.due FROM due d
        ORDER BY d.tenant_id  -- one lock order for every caller
        ON CONFLICT (tenant_id) DO UPDATE SET next_due_at = excluded.next_due_at
        WHERE q.next_due_at IS NULL OR q.next_due_at > excluded.next_due_at
        RETURNING q.next_due_at
    )
    SELECT bool_or(next_due_at <= now()) INTO v_became_due FROM lowered;
    IF v_became_due THEN
        PERFORM pg_notify('queue_worker_due', '');
    END IF;
END;
$$;

CREATE FUNCTION queue_worker.queue_jobs_inserted()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = ''
AS $$
DECLARE
    v_tenants uuid[];
    v_due timestamptz[];
BEGIN
    SELECT array_agg(n.tenant_id), array_agg(n.scheduled_at) INTO v_tenants, v_due
    FROM new_rows n WHERE n.status = 'pending';
    IF v_tenants IS NOT NULL THEN
        PERFORM queue_worker.queue_tenants_due(v_tenants, v_due);
    END IF;
    RETURN NULL;
END;
$$;

-- A job that became pending, or pending earlier than before (a retry, a release, a dependency
-- completed, a requeue, an operator's UPDATE).
CREATE FUNCTION queue_worker.queue_jobs_updated()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = ''
AS $$
DECLARE
    v_tenants uuid[];
    v_due timestamptz[];
BEGIN
    SELECT array_agg(n.tenant_id), array_agg(n.scheduled_at) INTO v_tenants, v_due
    FROM new_rows n JOIN old_rows o ON o.id = n.id
    WHERE n.status = 'pending' AND (o.status <> 'pending' OR n.scheduled_at < o.scheduled_at
                                    OR n.tenant_id <> o.tenant_id);
    IF v_tenants IS NOT NULL THEN
        PERFORM queue_worker.queue_tenants_due(v_tenants, v_due);
    END IF;
    RETURN NULL;
END;
$$;

CREATE TRIGGER queue_jobs_inserted AFTER INSERT ON queue_worker.queue_jobs
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION queue_worker.queue_jobs_inserted();
CREATE TRIGGER queue_jobs_updated AFTER UPDATE ON queue_worker.queue_jobs
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION queue_worker.queue_jobs_updated();

-- Rates ------------------------------------------------------------------------------------------

-- A token bucket: the tokens at p_now, refilled at p_rate per second up to p_burst from p_tokens
-- at p_at (a NULL bucket is full).
CREATE FUNCTION queue_worker.queue_tokens(
    p_tokens double precision, p_at timestamptz, p_rate double precision,
    p_burst double precision, p_now timestamptz)
RETURNS double precision
LANGUAGE sql
IMMUTABLE PARALLEL SAFE
SET search_path = ''
AS $$
    SELECT CASE WHEN p_rate IS NULL THEN NULL
                ELSE least(p_burst, coalesce(p_tokens, p_burst)
                                    + p_rate * greatest(0, extract(epoch FROM p_now - coalesce(p_at, p_now))))
           END
$$;

-- The claim --------------------------------------------------------------------------------------

DROP FUNCTION queue_worker.claim_next_job(uuid, int, text);
DROP FUNCTION queue_worker.claim_jobs(text, int, int, int, uuid, int, int);

-- The batch claim. In one statement:
-- 1. A repeat (same worker, same p_round) returns the jobs that round leased, and nothing else:
--    a worker that lost the answer to a claim asks again without stranding the first jobs.
-- 2. Jobs whose lease expired during their last attempt: dead-lettered, or, with
--    p_defer_exhausted (a worker with an idempotency store), leased to this worker without a new
--    attempt (leased_as 'check'), so that it asks the store whether that attempt succeeded.
-- 3. Jobs whose lease expired with attempts left: taken over (the attempt counts).
-- 4. Pending due jobs of the due tenants of this shard (or of p_tenant_id), by weighted fair
--    share: tenant i's k-th job has the tag S_i + k / weight_i, S_i being its vtime (credit capped
--    at one claim's worth), and the claim takes the lowest tags, at most
--    ceil(p_max_per_tenant * weight_i / lowest weight) per tenant (so p_max_per_tenant with equal
--    weights) and p_max_jobs in all; within a tenant, highest priority first, then oldest. A
--    tenant's rate and a function's rate (queue_tenant_limits, queue_functions) are token buckets
--    taken here; a job over its function's rate is pushed back, without an attempt, to when its
--    token will be there (held_reason says why); a tenant over its rate waits, its next_due_at
--    moved to when its next token comes. p_room ({"function": n}) takes at most n jobs of a
--    function (the calls a worker can start soon), leaving the rest for the next claim.
-- Jobs are locked with SKIP LOCKED: concurrent claims take disjoint jobs and never wait for one
-- another; under contention a claim may take fewer than it could.
CREATE FUNCTION queue_worker.claim_jobs(
    p_worker_id text,
    p_lease_seconds int DEFAULT 300,
    p_max_jobs int DEFAULT 1000,
    p_max_per_tenant int DEFAULT 10,
    p_tenant_id uuid DEFAULT NULL,
    p_shard int DEFAULT 0,
    p_shards int DEFAULT 1,
    p_round int DEFAULT NULL,
    p_defer_exhausted boolean DEFAULT false,
    p_room jsonb DEFAULT NULL)
RETURNS TABLE (
    id uuid, tenant_id uuid, job_type text, payload jsonb, priority int, attempts int,
    max_attempts int, scheduled_at timestamptz, locked_until timestamptz, created_at timestamptz,
    rescued boolean, exhausted boolean)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = ''
AS $$
#variable_conflict use_column
DECLARE
    v_now constant timestamptz := now();
    v_lo bigint;
    v_hi bigint;
    v_left int;
    v_exhausted uuid[] := '{}';
    v_rescue uuid[] := '{}';
    v_take uuid[] := '{}';
    v_seen uuid[] := '{}';
    v_hold uuid[] := '{}';
    v_hold_at timestamptz[] := '{}';
    v_hold_why text[] := '{}';
    -- the candidate tenants, in parallel arrays
    v_t uuid[];
    v_s double precision[];
    v_w double precision[];
    v_cap int[];
    v_taken int[];
    v_rate double precision[];
    v_burst double precision[];
    v_tokens double precision[];
    v_limited uuid[];
    v_floor double precision;
    v_wmin double precision;
    -- the rate-limited functions
    v_fn text[] := '{}';
    v_fn_rate double precision[] := '{}';
    v_fn_burst double precision[] := '{}';
    v_fn_tokens double precision[] := '{}';
    v_fn_used int[] := '{}';
    v_fn_held int[] := '{}';
    v_fn_room int[] := '{}';
    v_rt_type text[] := '{}';
    v_rt_fn text[] := '{}';
    -- one pass of the allocation
    v_p_id uuid[];
    v_p_tenant uuid[];
    v_p_type text[];
    v_p_tag double precision[];
    v_a_t uuid[];
    v_a_n int[];
    v_got_id uuid[];
    v_allow uuid[];
    v_held uuid[];
    v_held_at timestamptz[];
    v_held_why text[];
    v_pass int := 0;
    v_locked uuid[];
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
    IF p_round IS NOT NULL AND p_round < 0 THEN
        RAISE EXCEPTION 'claim_jobs: p_round must be at least 0, got %', p_round
            USING ERRCODE = 'invalid_parameter_value';
    END IF;

    -- 1. A repeated round.
    IF p_round IS NOT NULL THEN
        RETURN QUERY
        SELECT q.id, q.tenant_id, q.job_type, q.payload, q.priority, q.attempts, q.max_attempts,
               q.scheduled_at, q.locked_until, q.created_at, q.leased_as = 'rescue', q.leased_as = 'check'
        FROM queue_worker.queue_jobs q
        WHERE q.status = 'processing' AND q.locked_by = p_worker_id AND q.lease_round = p_round;
        IF FOUND THEN
            RETURN;
        END IF;
    END IF;

    v_lo := floor(p_shard::numeric * 9223372036854775808 / p_shards)::bigint;
    v_hi := CASE WHEN p_shard = p_shards - 1 THEN NULL
                 ELSE floor((p_shard + 1)::numeric * 9223372036854775808 / p_shards)::bigint END;

    -- 2. Expired last attempts.
    SELECT coalesce(array_agg(j.id), '{}') INTO v_exhausted
    FROM (SELECT q.id FROM queue_worker.queue_jobs q
          WHERE q.status = 'processing' AND q.locked_until < v_now AND q.attempts >= q.max_attempts
            AND (p_tenant_id IS NULL OR q.tenant_id = p_tenant_id)
            AND (p_shards = 1 OR (queue_worker.queue_shard_key(q.tenant_id) >= v_lo
                                  AND (v_hi IS NULL OR queue_worker.queue_shard_key(q.tenant_id) < v_hi)))
          ORDER BY q.locked_until
          LIMIT p_max_jobs
          FOR UPDATE SKIP LOCKED) j;
    IF cardinality(v_exhausted) > 0 THEN
        UPDATE queue_worker.queue_jobs q
        SET errors = q.errors || jsonb_build_array(jsonb_build_object(
                'attempt', q.attempts, 'at', v_now, 'status', NULL,
                'error', format('Lease expired during attempt %s (worker %s stopped)', q.attempts, q.locked_by))),
            last_error = format('Lease expired during attempt %s (worker %s stopped)', q.attempts, q.locked_by)
        WHERE q.id = ANY (v_exhausted);
        IF NOT coalesce(p_defer_exhausted, false) THEN
            PERFORM queue_worker.queue_move_to_dead_letter(
                v_exhausted,
                (SELECT array_agg(format('Exhausted %s attempts: the lease expired during the last one', q.max_attempts)
                                  ORDER BY array_position(v_exhausted, q.id))
                 FROM queue_worker.queue_jobs q WHERE q.id = ANY (v_exhausted)));
            v_exhausted := '{}';
        END IF;
    END IF;
    v_left := p_max_jobs - cardinality(v_exhausted);

    -- 3. Rescues.
    IF v_left > 0 THEN
        SELECT coalesce(array_agg(j.id), '{}') INTO v_rescue
        FROM (SELECT q.id FROM queue_worker.queue_jobs q
              WHERE q.status = 'processing' AND q.locked_until < v_now AND q.attempts < q.max_attempts
                AND (p_tenant_id IS NULL OR q.tenant_id = p_tenant_id)
                AND (p_shards = 1 OR (queue_worker.queue_shard_key(q.tenant_id) >= v_lo
                                      AND (v_hi IS NULL OR queue_worker.queue_shard_key(q.tenant_id) < v_hi)))
              ORDER BY q.locked_until
              LIMIT v_left
              FOR UPDATE SKIP LOCKED) j;
        v_left := v_left - cardinality(v_rescue);
    END IF;

    -- 4. Fair shares of the due tenants.
    IF v_left > 0 THEN
        SELECT array_agg(c.tenant_id ORDER BY c.vtime, c.next_due_at, c.tenant_id),
               array_agg(c.vtime ORDER BY c.vtime, c.next_due_at, c.tenant_id),
               array_agg(c.weight ORDER BY c.vtime, c.next_due_at, c.tenant_id),
               array_agg(c.rate ORDER BY c.vtime, c.next_due_at, c.tenant_id),
               array_agg(c.burst ORDER BY c.vtime, c.next_due_at, c.tenant_id),
               array_agg(c.tokens ORDER BY c.vtime, c.next_due_at, c.tenant_id)
        INTO v_t, v_s, v_w, v_rate, v_burst, v_tokens
        FROM (SELECT t.tenant_id, t.vtime, t.next_due_at,
                     coalesce(l.weight, d.weight, 1) AS weight,
                     coalesce(l.rate, d.rate) AS rate,
                     coalesce(l.burst, d.burst, greatest(1, coalesce(l.rate, d.rate) / 2)) AS burst,
                     queue_worker.queue_tokens(t.tokens, t.refilled_at, coalesce(l.rate, d.rate),
                                               coalesce(l.burst, d.burst, greatest(1, coalesce(l.rate, d.rate) / 2)),
                                               v_now) AS tokens
              FROM queue_worker.queue_tenants t
              LEFT JOIN queue_worker.queue_tenant_limits l ON l.tenant_id = t.tenant_id
              LEFT JOIN queue_worker.queue_tenant_limits d ON d.tenant_id = '00000000-0000-0000-0000-000000000000'
              WHERE t.next_due_at <= v_now
                AND (p_tenant_id IS NULL OR t.tenant_id = p_tenant_id)
                AND (p_shards = 1 OR (t.shard_key >= v_lo AND (v_hi IS NULL OR t.shard_key < v_hi)))
              ORDER BY t.vtime, t.next_due_at, t.tenant_id
              LIMIT v_left) c;
    END IF;

    IF v_t IS NOT NULL THEN
        -- A tenant's bucket is taken under its row lock; one another claim holds is left alone.
        SELECT coalesce(array_agg(q.tenant_id), '{}') INTO v_limited
        FROM (SELECT q.tenant_id FROM queue_worker.queue_tenants q
              WHERE q.tenant_id = ANY (v_t)
                AND q.tenant_id IN (SELECT u.t FROM unnest(v_t, v_rate) AS u(t, r) WHERE u.r IS NOT NULL)
              ORDER BY q.tenant_id
              FOR UPDATE SKIP LOCKED) q;
        -- Credit is capped at one claim's worth: a tenant back from idle does not take over.
        SELECT max(s) - p_max_per_tenant, min(w) INTO v_floor, v_wmin FROM unnest(v_s, v_w) AS u(s, w);
        -- A tenant's rescues count against its share (they are its oldest jobs, taken first).
        SELECT array_agg(greatest(u.s, v_floor) ORDER BY u.i),
               array_agg(CASE
                   WHEN u.r IS NOT NULL AND NOT (v_t[u.i] = ANY (v_limited)) THEN 0
                   ELSE least(ceil(p_max_per_tenant * u.w / v_wmin)::int, v_left + coalesce(x.n, 0),
                              CASE WHEN u.r IS NULL THEN v_left + coalesce(x.n, 0) ELSE floor(u.k)::int END)
               END ORDER BY u.i),
               array_agg(coalesce(x.n, 0) ORDER BY u.i)
        INTO v_s, v_cap, v_taken
        FROM unnest(v_t, v_s, v_w, v_rate, v_tokens) WITH ORDINALITY AS u(t, s, w, r, k, i)
        LEFT JOIN (SELECT q.tenant_id, count(*)::int AS n FROM queue_worker.queue_jobs q
                   WHERE q.id = ANY (v_rescue) GROUP BY q.tenant_id) x ON x.tenant_id = u.t;

        -- The functions with a rate (their buckets locked: claims only) or a room, and the job
        -- types routed to them.
        PERFORM 1 FROM queue_worker.queue_functions f
        WHERE f.rate IS NOT NULL ORDER BY f.function FOR UPDATE;
        SELECT coalesce(array_agg(u.fn ORDER BY u.fn), '{}'),
               coalesce(array_agg(u.rate ORDER BY u.fn), '{}'),
               coalesce(array_agg(u.burst ORDER BY u.fn), '{}'),
               coalesce(array_agg(u.tokens ORDER BY u.fn), '{}'),
               coalesce(array_agg(0 ORDER BY u.fn), '{}'),
               coalesce(array_agg(0 ORDER BY u.fn), '{}'),
               coalesce(array_agg(u.room ORDER BY u.fn), '{}')
        INTO v_fn, v_fn_rate, v_fn_burst, v_fn_tokens, v_fn_used, v_fn_held, v_fn_room
        FROM (SELECT coalesce(f.function, r.key) AS fn, f.rate,
                     coalesce(f.burst, greatest(1, f.rate / 2)) AS burst,
                     queue_worker.queue_tokens(f.tokens, f.refilled_at, f.rate,
                                               coalesce(f.burst, greatest(1, f.rate / 2)), v_now) AS tokens,
                     CASE WHEN r.value IS NOT NULL THEN greatest(0, r.value::int) END AS room
              FROM (SELECT * FROM queue_worker.queue_functions WHERE rate IS NOT NULL) f
              FULL JOIN jsonb_each_text(coalesce(p_room, '{}')) r ON r.key = f.function) u;
        IF cardinality(v_fn) > 0 THEN
            SELECT coalesce(array_agg(r.job_type), '{}'), coalesce(array_agg(r.function), '{}')
            INTO v_rt_type, v_rt_fn
            FROM queue_worker.queue_routes r WHERE r.function = ANY (v_fn);
        END IF;

        -- Passes: allocate what is left by the lowest tags, read that many due jobs of each
        -- tenant, lock them; a tenant that had fewer is done; jobs over a function's rate are
        -- held. Another pass hands the shortfall to the others.
        LOOP
            v_pass := v_pass + 1;
            WITH c AS (
                SELECT u.i, u.t, u.s, u.w, u.cap, u.taken
                FROM unnest(v_t, v_s, v_w, v_cap, v_taken) WITH ORDINALITY AS u(t, s, w, cap, taken, i)
                WHERE u.cap > u.taken
            ), tags AS (
                SELECT c.i, c.t, c.s + (c.taken + k) / c.w AS tag
                FROM c CROSS JOIN LATERAL generate_series(1, c.cap - c.taken) AS k
            ), alloc AS (
                SELECT x.i, x.t, count(*)::int AS n
                FROM (SELECT tags.i, tags.t FROM tags ORDER BY tags.tag, tags.i LIMIT v_left) x
                GROUP BY x.i, x.t
            ), probe AS (
                SELECT j.id, j.tenant_id, j.job_type, c.s + (c.taken + j.rank) / c.w AS tag
                FROM alloc a
                JOIN c ON c.i = a.i
                CROSS JOIN LATERAL (
                    SELECT q.id, q.tenant_id, q.job_type,
                           row_number() OVER (ORDER BY q.priority DESC, q.scheduled_at) AS rank
                    FROM (SELECT q.id, q.tenant_id, q.job_type, q.priority, q.scheduled_at
                          FROM queue_worker.queue_jobs q
                          WHERE q.tenant_id = a.t AND q.status = 'pending' AND q.scheduled_at <= v_now
                            AND NOT (q.id = ANY (v_seen))
                          ORDER BY q.priority DESC, q.scheduled_at
                          LIMIT a.n) q
                ) j
            )
            SELECT (SELECT coalesce(array_agg(p.id ORDER BY p.tag), '{}') FROM probe p),
                   (SELECT coalesce(array_agg(p.tenant_id ORDER BY p.tag), '{}') FROM probe p),
                   (SELECT coalesce(array_agg(p.job_type ORDER BY p.tag), '{}') FROM probe p),
                   (SELECT coalesce(array_agg(p.tag ORDER BY p.tag), '{}') FROM probe p),
                   (SELECT coalesce(array_agg(a.t), '{}') FROM alloc a),
                   (SELECT coalesce(array_agg(a.n), '{}') FROM alloc a)
            INTO v_p_id, v_p_tenant, v_p_type, v_p_tag, v_a_t, v_a_n;
            EXIT WHEN cardinality(v_p_id) = 0;
            v_seen := v_seen || v_p_id;

            -- Lock what was read; a job another claim took meanwhile (or holds) is left out.
            SELECT coalesce(array_agg(q.id), '{}') INTO v_got_id
            FROM (SELECT q.id FROM queue_worker.queue_jobs q
                  WHERE q.id = ANY (v_p_id) AND q.status = 'pending' AND q.scheduled_at <= v_now
                  FOR UPDATE SKIP LOCKED) q;

            -- Functions' rates and rooms: in tag order, a job of a rate-limited function takes
            -- a token, or is held until the time its token comes (after those held before it);
            -- one past its function's room is left for the next claim.
            WITH got AS (
                SELECT p.id, p.tag, rt.fn
                FROM unnest(v_p_id, v_p_type, v_p_tag) AS p(id, job_type, tag)
                LEFT JOIN unnest(v_rt_type, v_rt_fn) AS rt(job_type, fn) ON rt.job_type = p.job_type
                WHERE p.id = ANY (v_got_id)
            ), ranked AS (
                SELECT g.id, g.fn, f.i AS fi, f.tokens - f.used AS tokens, f.rate, f.held,
                       f.room - f.used AS room,
                       row_number() OVER (PARTITION BY g.fn ORDER BY g.tag) AS fr
                FROM got g
                LEFT JOIN unnest(v_fn, v_fn_rate, v_fn_tokens, v_fn_used, v_fn_held, v_fn_room)
                          WITH ORDINALITY AS f(fn, rate, tokens, used, held, room, i) ON f.fn = g.fn
            ), judged AS (
                SELECT r.*, (r.tokens IS NULL OR r.fr <= floor(r.tokens)) AS within_rate,
                       (r.room IS NULL OR r.fr <= r.room) AS within_room
                FROM ranked r
            )
            SELECT coalesce(array_agg(j.id) FILTER (WHERE j.fi IS NULL OR (j.within_rate AND j.within_room)), '{}'),
                   coalesce(array_agg(j.id) FILTER (WHERE j.fi IS NOT NULL AND NOT j.within_rate), '{}'),
                   coalesce(array_agg(v_now + make_interval(secs => (j.fr + j.held - j.tokens) / j.rate))
                            FILTER (WHERE j.fi IS NOT NULL AND NOT j.within_rate), '{}'),
                   coalesce(array_agg(format('rate limit of %s (%s/s)', j.fn, j.rate))
                            FILTER (WHERE j.fi IS NOT NULL AND NOT j.within_rate), '{}')
            INTO v_allow, v_held, v_held_at, v_held_why
            FROM judged j;

            v_take := v_take || v_allow;
            v_hold := v_hold || v_held;
            v_hold_at := v_hold_at || v_held_at;
            v_hold_why := v_hold_why || v_held_why;
            v_left := v_left - cardinality(v_allow);

            -- Each tenant's count; one whose read came back short of what it was allotted has
            -- nothing more due, and is done.
            SELECT array_agg(CASE WHEN coalesce(x.read, 0) < coalesce(a.n, 0)
                                  THEN u.taken + coalesce(x.taken, 0) ELSE u.cap END ORDER BY u.i),
                   array_agg(u.taken + coalesce(x.taken, 0) ORDER BY u.i)
            INTO v_cap, v_taken
            FROM unnest(v_t, v_cap, v_taken) WITH ORDINALITY AS u(t, cap, taken, i)
            LEFT JOIN unnest(v_a_t, v_a_n) AS a(t, n) ON a.t = u.t
            LEFT JOIN (SELECT p.tenant_id, count(*)::int AS read,
                              (count(*) FILTER (WHERE p.id = ANY (v_allow)))::int AS taken
                       FROM unnest(v_p_id, v_p_tenant) AS p(id, tenant_id)
                       GROUP BY p.tenant_id) x ON x.tenant_id = u.t;

            -- Functions' tokens used, and jobs held, so far.
            SELECT coalesce(array_agg(f.used + coalesce(x.used, 0) ORDER BY f.i), '{}'),
                   coalesce(array_agg(f.held + coalesce(x.held, 0) ORDER BY f.i), '{}')
            INTO v_fn_used, v_fn_held
            FROM unnest(v_fn, v_fn_used, v_fn_held) WITH ORDINALITY AS f(fn, used, held, i)
            LEFT JOIN (SELECT rt.fn,
                              (count(*) FILTER (WHERE p.id = ANY (v_allow)))::int AS used,
                              (count(*) FILTER (WHERE p.id = ANY (v_held)))::int AS held
                       FROM unnest(v_p_id, v_p_type) AS p(id, job_type)
                       JOIN unnest(v_rt_type, v_rt_fn) AS rt(job_type, fn) ON rt.job_type = p.job_type
                       GROUP BY rt.fn) x ON x.fn = f.fn;

            -- (Jobs another claim locked are left out, and the next pass reads past them.)
            EXIT WHEN v_left <= 0 OR v_pass >= 4;
        END LOOP;
    END IF;

    -- Held back by a function's rate: due when the token will be there, no attempt counted.
    IF cardinality(v_hold) > 0 THEN
        UPDATE queue_worker.queue_jobs q
        SET scheduled_at = h.at, held_reason = h.why, updated_at = v_now
        FROM unnest(v_hold, v_hold_at, v_hold_why) AS h(id, at, why)
        WHERE q.id = h.id;
    END IF;

    -- The tenants' clocks, buckets and next due times, under their row locks (rate-limited ones
    -- are locked already), the next due time in a statement of its own: it must see every job a
    -- concurrent transaction made pending before it let go of the tenant's row.
    IF v_t IS NOT NULL THEN
        SELECT coalesce(array_agg(q.tenant_id), '{}') INTO v_locked
        FROM (SELECT q.tenant_id FROM queue_worker.queue_tenants q
              WHERE q.tenant_id = ANY (v_t) AND NOT (q.tenant_id = ANY (v_limited))
              ORDER BY q.tenant_id
              FOR UPDATE SKIP LOCKED) q;
        v_locked := v_locked || v_limited;
        UPDATE queue_worker.queue_tenants q
        SET vtime = u.s + u.taken / u.w,
            tokens = CASE WHEN u.r IS NULL THEN NULL ELSE u.k - u.taken END,
            refilled_at = CASE WHEN u.r IS NULL THEN NULL ELSE v_now END
        FROM unnest(v_t, v_s, v_w, v_taken, v_rate, v_tokens) AS u(t, s, w, taken, r, k)
        WHERE q.tenant_id = u.t AND q.tenant_id = ANY (v_locked);
        UPDATE queue_worker.queue_tenants q
        SET next_due_at = CASE
                WHEN u.r IS NOT NULL AND q.tokens < 1 THEN
                    greatest(n.due, v_now + make_interval(secs => (1 - q.tokens) / u.r))
                ELSE n.due END
        FROM unnest(v_t, v_rate) AS u(t, r)
        CROSS JOIN LATERAL (SELECT min(j.scheduled_at) AS due FROM queue_worker.queue_jobs j
                            WHERE j.tenant_id = u.t AND j.status = 'pending'
                              AND NOT (j.id = ANY (v_take))) n
        WHERE q.tenant_id = u.t AND q.tenant_id = ANY (v_locked);
    END IF;

    IF cardinality(v_fn) > 0 THEN
        UPDATE queue_worker.queue_functions q
        SET tokens = f.tokens - f.used, refilled_at = v_now
        FROM unnest(v_fn, v_fn_rate, v_fn_tokens, v_fn_used) AS f(fn, rate, tokens, used)
        WHERE q.function = f.fn AND f.rate IS NOT NULL;
    END IF;

    IF cardinality(v_exhausted) > 0 THEN
        UPDATE queue_worker.queue_jobs q
        SET locked_by = p_worker_id,
            locked_until = v_now + make_interval(secs => p_lease_seconds),
            lease_round = p_round,
            leased_as = 'check',
            updated_at = v_now
        WHERE q.id = ANY (v_exhausted);
    END IF;

    RETURN QUERY
    UPDATE queue_worker.queue_jobs q
    SET status = 'processing',
        attempts = q.attempts + 1,
        locked_until = v_now + make_interval(secs => p_lease_seconds),
        locked_by = p_worker_id,
        lease_round = p_round,
        leased_as = CASE WHEN q.status = 'processing' THEN 'rescue' ELSE 'new' END,
        held_reason = NULL,
        errors = CASE WHEN q.status = 'processing' THEN q.errors || jsonb_build_array(jsonb_build_object(
                'attempt', q.attempts, 'at', v_now, 'status', NULL,
                'error', format('Lease expired during attempt %s (worker %s stopped)', q.attempts, q.locked_by)))
            ELSE q.errors END,
        last_error = CASE WHEN q.status = 'processing'
            THEN format('Lease expired during attempt %s (worker %s stopped)', q.attempts, q.locked_by)
            ELSE q.last_error END,
        updated_at = v_now
    WHERE q.id = ANY (v_rescue || v_take)
    RETURNING q.id, q.tenant_id, q.job_type, q.payload, q.priority, q.attempts, q.max_attempts,
              q.scheduled_at, q.locked_until, q.created_at, q.id = ANY (v_rescue), false;

    RETURN QUERY
    SELECT q.id, q.tenant_id, q.job_type, q.payload, q.priority, q.attempts, q.max_attempts,
           q.scheduled_at, q.locked_until, q.created_at, true, true
    FROM queue_worker.queue_jobs q WHERE q.id = ANY (v_exhausted);
END;
$$;

CREATE FUNCTION queue_worker.claim_next_job(
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

-- Settlement -------------------------------------------------------------------------------------

-- As in 0005, with two outcomes for a job leased as 'check' (an expired last attempt): 'deferred'
-- (another dispatch of it may still be running: it stays leased to this worker until retry_at,
-- when the next claim asks again; reported 'released') and 'expired' (no record says the attempt
-- succeeded: dead-lettered as the claim would have done).
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
    v_deferred jsonb;
BEGIN
    IF p_outcomes IS NULL OR jsonb_typeof(p_outcomes) <> 'array' THEN
        RAISE EXCEPTION 'settle_jobs: p_outcomes must be a JSON array' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF EXISTS (SELECT 1 FROM jsonb_array_elements(p_outcomes) e
               WHERE e->>'outcome' IS NULL
                  OR e->>'outcome' NOT IN ('completed', 'failed', 'dead', 'rate_limited', 'released',
                                           'deferred', 'expired')
                  OR e->>'id' IS NULL) THEN
        RAISE EXCEPTION 'settle_jobs: every outcome needs an id and an outcome among completed, failed, dead, rate_limited, released, deferred, expired'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;

    WITH o AS (
        SELECT DISTINCT ON (x.id) x.*
        FROM jsonb_to_recordset(p_outcomes)
             AS x(id uuid, attempt int, outcome text, error text, status int, retry_at timestamptz)
    ), held AS (
        SELECT q.id, q.attempts, q.max_attempts, q.leased_as, o.outcome, left(o.error, 4000) AS error,
               o.status, o.retry_at
        FROM queue_worker.queue_jobs q JOIN o ON o.id = q.id
        WHERE q.status = 'processing'
          AND (p_worker_id IS NULL OR q.locked_by = p_worker_id)
          AND (o.attempt IS NULL OR o.attempt = q.attempts)
          -- 'deferred' and 'expired' are answers to a check, and only to one
          AND (o.outcome NOT IN ('deferred', 'expired') OR q.leased_as = 'check')
        FOR UPDATE OF q
    ), decided AS (
        SELECT h.*,
               CASE
                   WHEN h.outcome = 'completed' THEN 'completed'
                   WHEN h.outcome IN ('released', 'deferred') THEN 'released'
                   WHEN h.outcome = 'rate_limited' THEN 'retry'
                   WHEN h.outcome IN ('dead', 'expired') OR h.attempts >= h.max_attempts THEN 'dead'
                   ELSE 'retry'
               END AS result
        FROM held h
    ), deferring AS (
        UPDATE queue_worker.queue_jobs q
        SET locked_until = coalesce(d.retry_at, now() + interval '30 seconds'),
            updated_at = now()
        FROM decided d
        WHERE q.id = d.id AND d.outcome = 'deferred'
        RETURNING q.id, d.result
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
        WHERE q.id = d.id AND d.result <> 'dead' AND d.outcome <> 'deferred'
        RETURNING q.id, d.result
    ), dying AS (
        -- Record the last attempt on the row before it moves (an expired one was recorded when
        -- the claim took it over).
        UPDATE queue_worker.queue_jobs q
        SET errors = CASE WHEN d.outcome = 'expired' THEN q.errors
                          ELSE q.errors || jsonb_build_array(jsonb_build_object(
                              'attempt', q.attempts, 'at', now(), 'error', d.error, 'status', d.status)) END,
            last_error = CASE WHEN d.outcome = 'expired' THEN q.last_error ELSE d.error END,
            locked_until = NULL,
            updated_at = now()
        FROM decided d
        WHERE q.id = d.id AND d.result = 'dead'
        RETURNING q.id,
                  CASE WHEN d.outcome = 'dead' THEN coalesce(d.error, 'Rejected')
                       WHEN d.outcome = 'expired'
                           THEN format('Exhausted %s attempts: the lease expired during the last one', q.max_attempts)
                       ELSE format('Exhausted %s attempts: %s', q.max_attempts, d.error) END AS reason
    )
    SELECT coalesce(jsonb_agg(jsonb_build_object('id', id, 'result', result)), '[]'),
           (SELECT array_agg(id) FROM dying), (SELECT array_agg(reason) FROM dying),
           array_agg(id) FILTER (WHERE result = 'completed'),
           (SELECT coalesce(jsonb_agg(jsonb_build_object('id', id, 'result', result)), '[]') FROM deferring)
    INTO v_results, v_dead, v_dead_reasons, v_completed, v_deferred
    FROM updated;
    v_results := v_results || v_deferred;

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

-- Routes and functions ---------------------------------------------------------------------------

-- The worker's routes (one call per container): {"job_type": {"function": "name", "rate": 20,
-- "burst": 10, "max_concurrency": 5}, ...}, rate in jobs per second or null. Two job types of one
-- function share its bucket: the lowest rate wins.
CREATE FUNCTION queue_worker.record_routes(p_routes jsonb)
RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = ''
AS $$
BEGIN
    IF p_routes IS NULL OR jsonb_typeof(p_routes) <> 'object' THEN
        RAISE EXCEPTION 'record_routes: p_routes must be a JSON object' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    INSERT INTO queue_worker.queue_routes AS r (job_type, function)
    SELECT e.key, e.value->>'function' FROM jsonb_each(p_routes) e
    WHERE e.value->>'function' IS NOT NULL
    ORDER BY e.key
    ON CONFLICT (job_type) DO UPDATE SET function = excluded.function, updated_at = now()
    WHERE r.function IS DISTINCT FROM excluded.function;
    INSERT INTO queue_worker.queue_functions AS f (function, rate, burst, concurrency_cap)
    SELECT e.value->>'function', min((e.value->>'rate')::float8), min((e.value->>'burst')::float8),
           min((e.value->>'max_concurrency')::int)
    FROM jsonb_each(p_routes) e
    WHERE e.value->>'function' IS NOT NULL
    GROUP BY e.value->>'function'
    ORDER BY 1
    ON CONFLICT (function) DO UPDATE
    SET rate = excluded.rate, burst = excluded.burst, concurrency_cap = excluded.concurrency_cap,
        updated_at = now()
    WHERE (f.rate, f.burst, f.concurrency_cap)
          IS DISTINCT FROM (excluded.rate, excluded.burst, excluded.concurrency_cap);
END;
$$;

-- The adaptive limits of calls in flight the last invocations left, per function.
CREATE FUNCTION queue_worker.function_states()
RETURNS TABLE (function text, concurrency_limit double precision)
LANGUAGE sql
STABLE
SECURITY DEFINER
SET search_path = ''
AS $$
    SELECT f.function, f.concurrency_limit FROM queue_worker.queue_functions f
    WHERE f.concurrency_limit IS NOT NULL
$$;

-- [{"function", "concurrency_limit", "circuit_status", "circuit_error"}, ...]: an invocation's
-- adaptive limits, and the refusals (401, 403, 404) that opened a function's circuit.
CREATE FUNCTION queue_worker.record_function_states(p_states jsonb)
RETURNS void
LANGUAGE sql
SECURITY DEFINER
SET search_path = ''
AS $$
    INSERT INTO queue_worker.queue_functions AS f (function, concurrency_limit, circuit_status,
                                                   circuit_error, circuit_opened_at)
    SELECT DISTINCT ON (s.function) s.function, s.concurrency_limit, s.circuit_status,
           left(s.circuit_error, 1000), CASE WHEN s.circuit_status IS NOT NULL THEN now() END
    FROM jsonb_to_recordset(coalesce(p_states, '[]'))
         AS s(function text, concurrency_limit double precision, circuit_status int, circuit_error text)
    WHERE s.function IS NOT NULL
    ORDER BY s.function
    ON CONFLICT (function) DO UPDATE
    SET concurrency_limit = coalesce(excluded.concurrency_limit, f.concurrency_limit),
        circuit_status = coalesce(excluded.circuit_status, f.circuit_status),
        circuit_error = CASE WHEN excluded.circuit_status IS NOT NULL THEN excluded.circuit_error
                             ELSE f.circuit_error END,
        circuit_opened_at = coalesce(excluded.circuit_opened_at, f.circuit_opened_at),
        updated_at = now()
$$;

-- Tenants' weights and rates -----------------------------------------------------------------------

-- A tenant's weight (its share among tenants with due work; default 1) and rate (jobs per second,
-- with a bucket of p_burst; NULL: none). p_tenant_id NULL sets the default of every tenant
-- without a row of its own.
CREATE FUNCTION queue_worker.set_tenant_limits(
    p_tenant_id uuid,
    p_weight double precision DEFAULT 1,
    p_rate double precision DEFAULT NULL,
    p_burst double precision DEFAULT NULL)
RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = ''
AS $$
BEGIN
    IF p_weight IS NULL OR p_weight <= 0 OR p_weight > 100 THEN
        RAISE EXCEPTION 'set_tenant_limits: p_weight must be more than 0 and at most 100, got %', p_weight
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_rate IS NOT NULL AND p_rate <= 0 THEN
        RAISE EXCEPTION 'set_tenant_limits: p_rate must be more than 0 (jobs per second), got %', p_rate
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_burst IS NOT NULL AND p_burst < 1 THEN
        RAISE EXCEPTION 'set_tenant_limits: p_burst must be at least 1, got %', p_burst
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    INSERT INTO queue_worker.queue_tenant_limits AS l (tenant_id, weight, rate, burst)
    VALUES (coalesce(p_tenant_id, '00000000-0000-0000-0000-000000000000'), p_weight, p_rate, p_burst)
    ON CONFLICT (tenant_id) DO UPDATE
    SET weight = excluded.weight, rate = excluded.rate, burst = excluded.burst;
END;
$$;

CREATE FUNCTION queue_worker.clear_tenant_limits(p_tenant_id uuid)
RETURNS boolean
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = ''
AS $$
BEGIN
    DELETE FROM queue_worker.queue_tenant_limits
    WHERE tenant_id = coalesce(p_tenant_id, '00000000-0000-0000-0000-000000000000');
    RETURN FOUND;
END;
$$;

-- Lingering ---------------------------------------------------------------------------------------

-- At most one invocation lingers for new work: the one that started last (the next scheduled
-- invocation takes the linger over, so there is no gap between one and the next; the one it was
-- taken from sees so at its next poll, and stops; an older one never takes it back). true when
-- this worker lingers now.
CREATE FUNCTION queue_worker.queue_linger_take(
    p_worker_id text, p_started_at timestamptz, p_seconds double precision)
RETURNS boolean
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = ''
AS $$
DECLARE
    v_previous text;
BEGIN
    SELECT l.worker_id INTO v_previous FROM queue_worker.queue_linger l WHERE l.id = 1 FOR UPDATE;
    UPDATE queue_worker.queue_linger l
    SET worker_id = p_worker_id, started_at = p_started_at,
        until = now() + make_interval(secs => greatest(p_seconds, 0))
    WHERE l.id = 1
      AND (l.worker_id IS NULL OR l.worker_id = p_worker_id OR l.until < now()
           OR l.started_at <= p_started_at);
    IF FOUND AND v_previous IS DISTINCT FROM p_worker_id AND v_previous IS NOT NULL THEN
        PERFORM pg_notify('queue_worker_due', 'linger');  -- the previous one: poll now, and stop
    END IF;
    RETURN FOUND;
END;
$$;

-- One cheap query per poll: whether this worker still lingers, and in how many seconds the next
-- job is due (0 or less: now; NULL: nothing is waiting) by the tenants' next due times and the
-- leases that will expire.
CREATE FUNCTION queue_worker.queue_linger_poll(p_worker_id text)
RETURNS TABLE (lingering boolean, next_due_in double precision)
LANGUAGE sql
STABLE
SECURITY DEFINER
SET search_path = ''
AS $$
    SELECT coalesce(l.worker_id = p_worker_id AND l.until > now(), false),
           extract(epoch FROM least(
               (SELECT min(t.next_due_at) FROM queue_worker.queue_tenants t),
               (SELECT min(j.locked_until) FROM queue_worker.queue_jobs j WHERE j.status = 'processing')
           ) - now())::float8
    FROM queue_worker.queue_linger l WHERE l.id = 1
$$;

CREATE FUNCTION queue_worker.queue_linger_release(p_worker_id text)
RETURNS void
LANGUAGE sql
SECURITY DEFINER
SET search_path = ''
AS $$
    UPDATE queue_worker.queue_linger SET worker_id = NULL, started_at = NULL, until = NULL
    WHERE id = 1 AND worker_id = p_worker_id
$$;

-- Explain -----------------------------------------------------------------------------------------

-- The one thing holding a job back, in words, with the numbers: reason (a word a dashboard can
-- group by), message (a sentence), detail (the numbers).
CREATE FUNCTION queue_worker.explain_job(p_job_id uuid)
RETURNS TABLE (reason text, message text, detail jsonb)
LANGUAGE plpgsql
STABLE
SECURITY DEFINER
SET search_path = ''
AS $$
DECLARE
    v_job queue_worker.queue_jobs;
    v_dead queue_worker.queue_jobs_dead_letter;
    v_dep uuid;
    v_dep_reason text;
    v_dep_message text;
    v_function text;
    v_fn queue_worker.queue_functions;
    v_tenant queue_worker.queue_tenants;
    v_limits record;
    v_tokens double precision;
    v_ahead int;
    v_due_tenants int;
BEGIN
    SELECT * INTO v_job FROM queue_worker.queue_jobs j WHERE j.id = p_job_id;
    IF v_job.id IS NULL THEN
        SELECT * INTO v_dead FROM queue_worker.queue_jobs_dead_letter d WHERE d.id = p_job_id;
        IF v_dead.id IS NULL THEN
            RETURN QUERY SELECT 'not_found', format('No job %s: it never existed, or it finished and was pruned', p_job_id),
                                jsonb_build_object('job_id', p_job_id);
        ELSE
            RETURN QUERY SELECT 'dead_lettered',
                format('Dead-lettered at %s because %s (after %s of %s attempts); requeue it with requeue_dead_letter once the cause is fixed',
                       v_dead.dead_at, v_dead.reason, v_dead.attempts, v_dead.max_attempts),
                jsonb_build_object('dead_at', v_dead.dead_at, 'reason', v_dead.reason,
                                   'attempts', v_dead.attempts, 'last_error', v_dead.last_error);
        END IF;
        RETURN;
    END IF;

    IF v_job.status = 'completed' THEN
        RETURN QUERY SELECT 'completed', format('Completed at %s (attempt %s)', v_job.completed_at, v_job.attempts),
                            jsonb_build_object('completed_at', v_job.completed_at, 'attempts', v_job.attempts);
        RETURN;
    ELSIF v_job.status = 'cancelled' THEN
        RETURN QUERY SELECT 'cancelled', format('Cancelled at %s', v_job.updated_at),
                            jsonb_build_object('cancelled_at', v_job.updated_at);
        RETURN;
    ELSIF v_job.status = 'processing' THEN
        IF v_job.locked_until < now() THEN
            RETURN QUERY SELECT 'lease_expired',
                format('Its lease expired at %s (worker %s stopped during attempt %s): the next claim takes it over',
                       v_job.locked_until, v_job.locked_by, v_job.attempts),
                jsonb_build_object('locked_by', v_job.locked_by, 'locked_until', v_job.locked_until,
                                   'attempt', v_job.attempts);
        ELSE
            RETURN QUERY SELECT 'held_by_worker',
                format('Held by worker %s until %s (attempt %s of %s)', v_job.locked_by, v_job.locked_until,
                       v_job.attempts, v_job.max_attempts),
                jsonb_build_object('locked_by', v_job.locked_by, 'locked_until', v_job.locked_until,
                                   'attempt', v_job.attempts, 'max_attempts', v_job.max_attempts);
        END IF;
        RETURN;
    ELSIF v_job.status = 'waiting' THEN
        SELECT d.depends_on INTO v_dep FROM queue_worker.queue_job_dependencies d
        WHERE d.job_id = p_job_id ORDER BY d.depends_on LIMIT 1;
        SELECT e.reason, e.message INTO v_dep_reason, v_dep_message FROM queue_worker.explain_job(v_dep) e;
        RETURN QUERY SELECT 'waiting_on_dependency',
            format('Waiting on dependency %s (%s of %s not completed yet); %s: %s', v_dep,
                   v_job.waiting_on, cardinality(v_job.depends_on), v_dep, v_dep_message),
            jsonb_build_object('dependency', v_dep, 'dependency_reason', v_dep_reason,
                               'waiting_on', v_job.waiting_on);
        RETURN;
    END IF;

    -- Pending.
    SELECT r.function INTO v_function FROM queue_worker.queue_routes r WHERE r.job_type = v_job.job_type;
    IF v_job.scheduled_at > now() THEN
        IF v_job.held_reason IS NOT NULL THEN
            RETURN QUERY SELECT 'function_rate_limit',
                format('Held back by the %s until %s (no attempt counted)', v_job.held_reason, v_job.scheduled_at),
                jsonb_build_object('until', v_job.scheduled_at, 'held_reason', v_job.held_reason, 'function', v_function);
        ELSIF v_job.last_error LIKE 'Rate limited by %' THEN
            RETURN QUERY SELECT 'retry_after',
                format('Snoozed by the function''s Retry-After until %s (%s)', v_job.scheduled_at, v_job.last_error),
                jsonb_build_object('until', v_job.scheduled_at, 'last_error', v_job.last_error);
        ELSIF v_job.attempts > 0 THEN
            RETURN QUERY SELECT 'backoff',
                format('Retrying at %s after attempt %s of %s failed: %s', v_job.scheduled_at, v_job.attempts,
                       v_job.max_attempts, v_job.last_error),
                jsonb_build_object('until', v_job.scheduled_at, 'attempts', v_job.attempts,
                                   'max_attempts', v_job.max_attempts, 'last_error', v_job.last_error);
        ELSE
            RETURN QUERY SELECT 'scheduled', format('Scheduled for %s', v_job.scheduled_at),
                                jsonb_build_object('scheduled_at', v_job.scheduled_at);
        END IF;
        RETURN;
    END IF;

    -- Pending and due.
    IF v_function IS NULL AND EXISTS (SELECT FROM queue_worker.queue_routes) THEN
        RETURN QUERY SELECT 'no_route',
            format('No route for job type ''%s'': the next batch dead-letters it (add it to JOB_ROUTES)', v_job.job_type),
            jsonb_build_object('job_type', v_job.job_type);
        RETURN;
    END IF;
    SELECT * INTO v_fn FROM queue_worker.queue_functions f WHERE f.function = v_function;
    IF v_fn.circuit_opened_at > now() - interval '15 minutes' THEN
        RETURN QUERY SELECT 'circuit_open',
            format('Its function %s answered %s at %s (%s); every batch stops sending to it after such an answer',
                   v_function, v_fn.circuit_status, v_fn.circuit_opened_at, v_fn.circuit_error),
            jsonb_build_object('function', v_function, 'status', v_fn.circuit_status,
                               'opened_at', v_fn.circuit_opened_at);
        RETURN;
    END IF;
    IF v_fn.rate IS NOT NULL THEN
        v_tokens := queue_worker.queue_tokens(v_fn.tokens, v_fn.refilled_at, v_fn.rate,
                                              coalesce(v_fn.burst, greatest(1, v_fn.rate / 2)), now());
        IF v_tokens < 1 THEN
            RETURN QUERY SELECT 'function_rate_limit',
                format('Its function %s is at its rate limit (%s/s): the next token comes at %s', v_function, v_fn.rate,
                       now() + make_interval(secs => (1 - v_tokens) / v_fn.rate)),
                jsonb_build_object('function', v_function, 'rate', v_fn.rate, 'tokens', v_tokens);
            RETURN;
        END IF;
    END IF;
    SELECT * INTO v_tenant FROM queue_worker.queue_tenants t WHERE t.tenant_id = v_job.tenant_id;
    SELECT coalesce(l.weight, d.weight, 1) AS weight, coalesce(l.rate, d.rate) AS rate,
           coalesce(l.burst, d.burst, greatest(1, coalesce(l.rate, d.rate) / 2)) AS burst
    INTO v_limits
    FROM (SELECT 1) x
    LEFT JOIN queue_worker.queue_tenant_limits l ON l.tenant_id = v_job.tenant_id
    LEFT JOIN queue_worker.queue_tenant_limits d ON d.tenant_id = '00000000-0000-0000-0000-000000000000';
    IF v_limits.rate IS NOT NULL THEN
        v_tokens := queue_worker.queue_tokens(v_tenant.tokens, v_tenant.refilled_at, v_limits.rate,
                                              v_limits.burst, now());
        IF v_tokens < 1 THEN
            RETURN QUERY SELECT 'tenant_rate_limit',
                format('Its tenant %s is at its rate limit (%s/s): the next token comes at %s', v_job.tenant_id,
                       v_limits.rate, now() + make_interval(secs => (1 - v_tokens) / v_limits.rate)),
                jsonb_build_object('tenant_id', v_job.tenant_id, 'rate', v_limits.rate, 'tokens', v_tokens);
            RETURN;
        END IF;
    END IF;
    SELECT count(*)::int INTO v_ahead FROM queue_worker.queue_jobs j
    WHERE j.tenant_id = v_job.tenant_id AND j.status = 'pending' AND j.scheduled_at <= now()
      AND (j.priority > v_job.priority OR (j.priority = v_job.priority AND j.scheduled_at < v_job.scheduled_at));
    SELECT count(*)::int INTO v_due_tenants FROM queue_worker.queue_tenants t WHERE t.next_due_at <= now();
    IF v_ahead > 0 THEN
        RETURN QUERY SELECT 'tenant_share',
            format('Due, behind %s due jobs of its own tenant (weight %s, one of %s tenants with due work): each claim takes the tenant''s share in priority order',
                   v_ahead, v_limits.weight, v_due_tenants),
            jsonb_build_object('ahead', v_ahead, 'weight', v_limits.weight, 'due_tenants', v_due_tenants);
    ELSE
        RETURN QUERY SELECT 'ready', 'Due now, first of its tenant: the next claim takes it',
                            jsonb_build_object('due_tenants', v_due_tenants);
    END IF;
END;
$$;

-- Privileges -------------------------------------------------------------------------------------

GRANT EXECUTE ON FUNCTION
    queue_worker.claim_jobs(text, int, int, int, uuid, int, int, int, boolean, jsonb),
    queue_worker.claim_next_job(uuid, int, text),
    queue_worker.record_routes(jsonb),
    queue_worker.function_states(),
    queue_worker.record_function_states(jsonb),
    queue_worker.queue_linger_take(text, timestamptz, double precision),
    queue_worker.queue_linger_poll(text),
    queue_worker.queue_linger_release(text)
TO queue_worker_runtime;

GRANT EXECUTE ON FUNCTION
    queue_worker.set_tenant_limits(uuid, double precision, double precision, double precision),
    queue_worker.clear_tenant_limits(uuid),
    queue_worker.explain_job(uuid)
TO queue_worker_operator;
