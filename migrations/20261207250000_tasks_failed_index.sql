-- The operator dashboard lists recent failures and counts them per kind: an index over failed tasks only
-- (a small share of the table) keeps that off a scan of every finished task.
CREATE INDEX IF NOT EXISTS tasks_failed_finished ON tasks (finished_at) WHERE state = 'failed';
