-- The request that wrote a task: the platform's X-Broker-API-Request-Identity, or the id the API made up. Workers
-- put it on every log line of the task, so a request's lines join its task's.
ALTER TABLE tasks ADD COLUMN request_id text;

-- The audit trail of an instance: who asked for what, when, from which request, and how it ended. One row per
-- task on an instance (its OSB operation, or its kind for berth's own: backups, preset pushes, expiries), written
-- by the triggers below so no path that enqueues can forget it. Rows outlive the instance (and its tasks'
-- usefulness) for EVENT_RETENTION_DAYS after its last event; a worker prunes them.
CREATE TABLE instance_events (
    id bigserial PRIMARY KEY,
    instance_id text NOT NULL,
    binding_id text,
    task_id uuid NOT NULL,
    action text NOT NULL,
    -- Safe fields of the payload only (snapshot_id, plan_id): parameters may hold secrets.
    detail jsonb NOT NULL DEFAULT '{}',
    request_id text,
    originating_identity jsonb,
    requested_at timestamptz NOT NULL,
    -- NULL while the task runs; then 'succeeded' or 'failed'.
    outcome text,
    error text,
    finished_at timestamptz
);
CREATE INDEX instance_events_by_instance ON instance_events (instance_id, id DESC);
CREATE INDEX instance_events_by_task ON instance_events (task_id);

CREATE FUNCTION tasks_record_event() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO instance_events (instance_id, binding_id, task_id, action, detail, request_id,
                                 originating_identity, requested_at)
    VALUES (NEW.instance_id, NEW.binding_id, NEW.id, coalesce(NEW.operation, NEW.kind),
            jsonb_strip_nulls(jsonb_build_object('snapshot_id', NEW.payload -> 'snapshot_id',
                                                 'plan_id', NEW.payload -> 'plan_id')),
            NEW.request_id, NEW.originating_identity, NEW.created_at);
    RETURN NULL;
END $$;
CREATE TRIGGER tasks_record_event AFTER INSERT ON tasks FOR EACH ROW
    WHEN (NEW.instance_id IS NOT NULL AND NEW.kind <> 'webhook.deliver')
    EXECUTE FUNCTION tasks_record_event();

CREATE FUNCTION tasks_record_event_outcome() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE instance_events
    SET outcome = NEW.state, error = CASE WHEN NEW.state = 'failed' THEN NEW.last_error END, finished_at = coalesce(NEW.finished_at, now())
    WHERE task_id = NEW.id;
    RETURN NULL;
END $$;
CREATE TRIGGER tasks_record_event_outcome AFTER UPDATE OF state ON tasks FOR EACH ROW
    WHEN (NEW.instance_id IS NOT NULL AND NEW.state IN ('succeeded', 'failed')
          AND OLD.state IS DISTINCT FROM NEW.state)
    EXECUTE FUNCTION tasks_record_event_outcome();
