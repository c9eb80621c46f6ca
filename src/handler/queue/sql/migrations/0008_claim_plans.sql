-- 0008: claim_jobs never looks up jobs by an empty list of ids.
--
-- PL/pgSQL plans a statement with the values of its variables. `q.id = ANY ('{}')` is false
-- whatever the row, and a false condition implies every partial index's predicate, so the
-- planner may read such a statement through any partial index of queue_jobs; with statistics
-- from before the jobs finished (a bulk enqueue, then ANALYZE) it took queue_jobs_finished_idx,
-- believed empty, and read every finished job, twice a claim: one invocation of 50,000 jobs
-- made each claim five times slower by its end (bench/results/rounds.md). The three statements
-- by id that are most often given an empty list (the tenants' rescues, the lease, the leases
-- ended during their last attempt) now run only when it is not empty. Nothing else changes.

CREATE OR REPLACE FUNCTION queue_worker.claim_jobs(
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
                   WHERE cardinality(v_rescue) > 0 AND q.id = ANY (v_rescue)
                   GROUP BY q.tenant_id) x ON x.tenant_id = u.t;

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

    IF cardinality(v_rescue) + cardinality(v_take) > 0 THEN
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
    END IF;

    IF cardinality(v_exhausted) > 0 THEN
        RETURN QUERY
        SELECT q.id, q.tenant_id, q.job_type, q.payload, q.priority, q.attempts, q.max_attempts,
               q.scheduled_at, q.locked_until, q.created_at, true, true
        FROM queue_worker.queue_jobs q WHERE q.id = ANY (v_exhausted);
    END IF;
END;
$$;
