-- queue-worker 0003: recurring jobs. A schedule turns its cron expression into jobs, one per fire
-- time, through enqueue_job.
--
-- The cron math (and the check of cron expressions and time zones against the cron library) is
-- done by the caller, handler.schedules: these functions trust the fire times they are given.
-- What the SQL guarantees is that each fire time becomes a job exactly once, however many
-- invocations fire at the same time: fire_schedule moves next_fire_at only if it still holds the
-- value the caller read (compare-and-set), and enqueues in the same transaction.
--
-- next_fire_at is the schedule's next fire time that has not been enqueued yet. It is NULL while
-- the schedule is paused, and also when nobody has computed it yet (a schedule created from SQL
-- without p_next_fire_at): the next firing run computes it from its own clock, firing nothing.
--
-- Catch-up: when a firing finds several fire times due (after an outage), the caller enqueues the
-- newest max_catch_up of them (at least the newest one) and skips the older ones.

-- true when PostgreSQL knows the time zone name (AT TIME ZONE accepts it). Marked IMMUTABLE so
-- that a CHECK may use it: the answer only changes with the time zone database of the server.
CREATE FUNCTION queue_is_valid_timezone(p_timezone text)
RETURNS boolean
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE
AS $$
BEGIN
    IF p_timezone IS NULL OR p_timezone !~ '\S' THEN
        RETURN false;
    END IF;
    PERFORM timestamptz '2000-01-01 00:00:00+00' AT TIME ZONE p_timezone;
    RETURN true;
EXCEPTION WHEN invalid_parameter_value OR feature_not_supported THEN
    RETURN false;
END;
$$;

CREATE TABLE queue_schedules (
    id            uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    tenant_id     uuid        NOT NULL,
    name          text        NOT NULL CONSTRAINT queue_schedules_name_not_blank CHECK (name ~ '\S'),
    job_type      text        NOT NULL CONSTRAINT queue_schedules_job_type_not_blank CHECK (job_type ~ '\S'),
    payload       jsonb       NOT NULL DEFAULT '{}'::jsonb
                              CONSTRAINT queue_schedules_payload_is_object CHECK (jsonb_typeof(payload) = 'object'),
    cron          text        NOT NULL CONSTRAINT queue_schedules_cron_not_blank CHECK (cron ~ '\S'),
    timezone      text        NOT NULL DEFAULT 'UTC'
                              CONSTRAINT queue_schedules_timezone_known CHECK (queue_is_valid_timezone(timezone)),
    priority      int         NOT NULL DEFAULT 0,
    max_attempts  int         NOT NULL DEFAULT 5
                              CONSTRAINT queue_schedules_max_attempts_positive CHECK (max_attempts >= 1),
    paused        boolean     NOT NULL DEFAULT false,
    -- How many due fire times one firing enqueues at most, newest first (0 and 1 both mean: only
    -- the newest); the older ones are skipped.
    max_catch_up  int         NOT NULL DEFAULT 1
                              CONSTRAINT queue_schedules_max_catch_up_range CHECK (max_catch_up BETWEEN 0 AND 1000),
    next_fire_at  timestamptz,
    last_fired_at timestamptz,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT queue_schedules_tenant_name_key UNIQUE (tenant_id, name),
    CONSTRAINT queue_schedules_paused_has_no_next CHECK (NOT paused OR next_fire_at IS NULL)
);

-- The firing run's read: schedules that are not paused, by next fire time (NULL: not computed
-- yet, also wanted). Paused schedules are not in it.
CREATE INDEX queue_schedules_due_idx ON queue_schedules (next_fire_at) WHERE NOT paused;

-- Creates a schedule, or replaces the one the tenant has under that name (matched by name; the
-- id stays). Returns its id. The pause state is kept on replace.
-- p_next_fire_at is the first fire time after now, computed by the caller. On replace, when cron
-- and time zone are unchanged, the stored next_fire_at is kept instead (a fire time that is due
-- but not fired yet is not lost); NULL leaves it for the next firing run to compute.
CREATE FUNCTION upsert_schedule(
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
    IF NOT queue_is_valid_timezone(p_timezone) THEN
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

    INSERT INTO queue_schedules AS s (tenant_id, name, job_type, payload, cron, timezone, priority,
                                      max_attempts, max_catch_up, next_fire_at)
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
        updated_at = now()
    RETURNING s.id INTO v_id;
    RETURN v_id;
END;
$$;

-- Pauses a schedule: it fires nothing until resumed, and the fire times it misses meanwhile are
-- never enqueued. false when there is no such schedule (pausing a paused one is a no-op: true).
CREATE FUNCTION pause_schedule(p_id uuid)
RETURNS boolean
LANGUAGE plpgsql
AS $$
BEGIN
    UPDATE queue_schedules
    SET paused = true,
        next_fire_at = NULL,
        updated_at = CASE WHEN paused THEN updated_at ELSE now() END
    WHERE id = p_id;
    RETURN FOUND;
END;
$$;

-- Resumes a paused schedule from p_next_fire_at (the caller's first fire time after now; NULL:
-- the next firing run computes it). A schedule that is not paused is left as it is: true.
-- false when there is no such schedule.
CREATE FUNCTION resume_schedule(p_id uuid, p_next_fire_at timestamptz DEFAULT NULL)
RETURNS boolean
LANGUAGE plpgsql
AS $$
BEGIN
    UPDATE queue_schedules
    SET paused = false,
        next_fire_at = CASE WHEN paused THEN p_next_fire_at ELSE next_fire_at END,
        updated_at = CASE WHEN paused THEN now() ELSE updated_at END
    WHERE id = p_id;
    RETURN FOUND;
END;
$$;

-- Deletes a schedule (the jobs it already enqueued stay). false when there is no such schedule.
CREATE FUNCTION delete_schedule(p_id uuid)
RETURNS boolean
LANGUAGE plpgsql
AS $$
BEGIN
    DELETE FROM queue_schedules WHERE id = p_id;
    RETURN FOUND;
END;
$$;

-- Fires a schedule: in one transaction, only if the schedule is not paused and its next_fire_at
-- still equals p_expected_next (what the caller read; NULL matches NULL), enqueues one job per
-- fire time in p_fire_times and moves next_fire_at to p_next_fire_at. Returns the number of jobs
-- it created: 0 when the compare-and-set failed (another run fired it first, or the schedule was
-- changed, paused or deleted meanwhile), and 0 with an empty p_fire_times (only next_fire_at
-- moves: how a never-computed next_fire_at is set).
--
-- A job gets the schedule's job type, priority and max_attempts, scheduled_at = its fire time,
-- payload = the schedule's payload plus "scheduled_for": the fire time (ISO-8601, UTC), and the
-- unique key 'schedule:<schedule id>:<fire time, epoch seconds>': even a repeated call with the
-- same fire times cannot enqueue a second job while the first is unfinished.
CREATE FUNCTION fire_schedule(
    p_id uuid,
    p_expected_next timestamptz,
    p_fire_times timestamptz[],
    p_next_fire_at timestamptz)
RETURNS int
LANGUAGE plpgsql
AS $$
DECLARE
    v_schedule queue_schedules;
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

    -- The compare-and-set. A concurrent call for the same schedule waits here for the row lock,
    -- then re-checks the condition against the committed row: it no longer matches.
    UPDATE queue_schedules
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
        SELECT id INTO v_before FROM queue_jobs
        WHERE tenant_id = v_schedule.tenant_id AND unique_key = v_key
          AND status IN ('waiting', 'pending', 'processing');
        v_id := enqueue_job(
            p_tenant_id => v_schedule.tenant_id,
            p_job_type => v_schedule.job_type,
            p_payload => v_schedule.payload || jsonb_build_object(
                'scheduled_for', to_char(v_time AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"')),
            p_priority => v_schedule.priority,
            p_scheduled_at => v_time,
            p_max_attempts => v_schedule.max_attempts,
            p_unique_key => v_key);
        IF v_before IS DISTINCT FROM v_id THEN
            v_created := v_created + 1;  -- not the unfinished job that already held the key
        END IF;
    END LOOP;
    RETURN v_created;
END;
$$;
