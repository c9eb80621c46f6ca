-- 0007: the worker's own way to learn whether its firing of a schedule won.
--
-- fire_schedule is a compare-and-set on next_fire_at; when it enqueues nothing (a schedule whose
-- first fire time was only computed, or fire times already enqueued), the worker tells a win
-- from a lost race by the schedule's updated_at (handler/operate/schedules.py). It read that
-- through get_schedule, which is the operators' (it returns the whole schedule, payload and
-- all), so a worker logged in as queue_worker_runtime failed every invocation that met such a
-- schedule. This returns the one timestamp, to the worker's role.

CREATE FUNCTION queue_worker.queue_schedule_updated_at(p_schedule_id uuid)
RETURNS timestamptz
LANGUAGE sql
STABLE
SECURITY DEFINER
SET search_path = ''
AS $$
    SELECT s.updated_at FROM queue_worker.queue_schedules s WHERE s.id = p_schedule_id
$$;

GRANT EXECUTE ON FUNCTION queue_worker.queue_schedule_updated_at(uuid) TO queue_worker_runtime;
