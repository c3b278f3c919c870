-- A finished OSB operation is announced on a channel of its own, the task id as payload: an API request that
-- answers synchronously (no accepts_incomplete) waits for it instead of polling. Queue-internal tasks (no
-- `operation`: webhook deliveries, backups, bench tasks) never fire it, so the queue's own finishes stay as cheap.
CREATE FUNCTION tasks_notify_finished() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('berth_task_finished', NEW.id::text);
    RETURN NULL;
END $$;
CREATE TRIGGER tasks_notify_finished AFTER UPDATE OF state ON tasks FOR EACH ROW
    WHEN (NEW.operation IS NOT NULL AND NEW.state IN ('succeeded', 'failed') AND OLD.state IS DISTINCT FROM NEW.state)
    EXECUTE FUNCTION tasks_notify_finished();
