-- Presets (named, versioned database snapshots) and backups. Both are objects in the snapshot store made by one
-- pipeline (pg_dump -> zstd -> AES-256-GCM stream -> upload); a row here says what an object is and whether it
-- is complete. Only `ready` rows count: an upload cut short leaves a `pending` row and no visible object.

CREATE TABLE presets (
    id               uuid PRIMARY KEY,
    -- db-p's `<repo>/<branch>`; '' when unused
    namespace        text NOT NULL DEFAULT '',
    name             text NOT NULL,
    post_restore_sql text,
    created_by       text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    -- The lock is a compare-and-set on these columns; the key itself is never stored, only its SHA-256.
    lock_key_hash    bytea,
    locked_by        text,
    lock_reason      text,
    locked_at        timestamptz,
    UNIQUE (namespace, name)
);

CREATE TABLE snapshots (
    id           uuid PRIMARY KEY,
    kind         text NOT NULL CHECK (kind IN ('preset', 'backup')),
    preset_id    uuid REFERENCES presets (id) ON DELETE CASCADE,
    version      integer,
    -- the instance it was taken from; no foreign key: backups outlive their instance
    instance_id  text,
    task_id      uuid NOT NULL,
    state        text NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'ready', 'failed')),
    object_key   text NOT NULL,
    -- the stored object (what restore checks before it trusts the object) and the dump inside it
    size_bytes   bigint,
    sha256       text,
    dump_bytes   bigint,
    key_id       text,
    -- roles the source database's objects belonged to or were granted to (the dump carries no owners)
    roles        jsonb,
    description  text,
    created_by   text,
    created_at   timestamptz NOT NULL DEFAULT now(),
    completed_at timestamptz,
    CHECK ((kind = 'preset') = (preset_id IS NOT NULL AND version IS NOT NULL)),
    UNIQUE (preset_id, version)
);
CREATE INDEX snapshots_instance ON snapshots (instance_id, created_at) WHERE kind = 'backup';

-- One row per instance with a `backups` parameter. The scheduler moves next_run_at forward in the transaction
-- that enqueues the backup task, so a due backup is enqueued exactly once, across any number of workers and
-- restarts.
CREATE TABLE backup_schedules (
    instance_id text PRIMARY KEY REFERENCES service_instances (id) ON DELETE CASCADE,
    cron        text NOT NULL,
    retention   integer NOT NULL CHECK (retention > 0),
    next_run_at timestamptz NOT NULL
);
CREATE INDEX backup_schedules_due ON backup_schedules (next_run_at);

-- Never two backups of one instance at once, whoever enqueues them (scheduler or API).
CREATE UNIQUE INDEX tasks_one_backup_per_instance ON tasks (instance_id)
    WHERE kind = 'instance.backup' AND state IN ('pending', 'running');
