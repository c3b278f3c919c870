-- The broker's own state. The API writes instance/binding rows and their task in one transaction;
-- workers claim tasks with FOR UPDATE SKIP LOCKED.

CREATE TABLE service_instances (
    id                  text PRIMARY KEY,
    service_id          text NOT NULL,
    plan_id             text NOT NULL,
    organization_guid   text NOT NULL,
    space_guid          text NOT NULL,
    context             jsonb NOT NULL DEFAULT '{}',
    parameters          jsonb NOT NULL DEFAULT '{}',
    maintenance_version text,
    -- provider-owned, non-secret facts (database name, host, ...)
    details             jsonb NOT NULL DEFAULT '{}',
    -- provider-owned secrets, AES-256-GCM sealed
    secrets             bytea,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE service_bindings (
    id                  text PRIMARY KEY,
    instance_id         text NOT NULL REFERENCES service_instances (id) ON DELETE CASCADE,
    service_id          text NOT NULL,
    plan_id             text NOT NULL,
    app_guid            text,
    bind_resource       jsonb NOT NULL DEFAULT '{}',
    context             jsonb NOT NULL DEFAULT '{}',
    parameters          jsonb NOT NULL DEFAULT '{}',
    details             jsonb NOT NULL DEFAULT '{}',
    -- the credentials handed to the app, AES-256-GCM sealed
    credentials         bytea,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX service_bindings_instance ON service_bindings (instance_id);

CREATE TABLE tasks (
    id                   uuid PRIMARY KEY,
    kind                 text NOT NULL,
    instance_id          text,
    binding_id           text,
    -- the OSB operation this task answers (provision, update, deprovision, bind, unbind), if any
    operation            text,
    payload              jsonb NOT NULL DEFAULT '{}',
    state                text NOT NULL DEFAULT 'pending'
                         CHECK (state IN ('pending', 'running', 'succeeded', 'failed')),
    attempts             integer NOT NULL DEFAULT 0,
    max_attempts         integer NOT NULL DEFAULT 10 CHECK (max_attempts > 0),
    run_at               timestamptz NOT NULL DEFAULT now(),
    lease_until          timestamptz,
    worker_id            text,
    progress             text,
    last_error           text,
    originating_identity jsonb,
    webhook_url          text,
    webhook_secret       bytea,
    created_at           timestamptz NOT NULL DEFAULT now(),
    updated_at           timestamptz NOT NULL DEFAULT now(),
    finished_at          timestamptz
);
-- Claims walk this index in run_at order; finished tasks leave it, so a large history never slows a claim.
CREATE INDEX tasks_pending_run_at ON tasks (run_at) WHERE state = 'pending';
CREATE INDEX tasks_running_lease ON tasks (lease_until) WHERE state = 'running';
CREATE INDEX tasks_instance ON tasks (instance_id, created_at) WHERE instance_id IS NOT NULL;
CREATE INDEX tasks_binding ON tasks (binding_id, created_at) WHERE binding_id IS NOT NULL;

-- One NOTIFY per inserting statement (not per row), so bulk enqueues stay cheap.
CREATE FUNCTION tasks_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('berth_tasks', '');
    RETURN NULL;
END $$;
CREATE TRIGGER tasks_notify AFTER INSERT ON tasks FOR EACH STATEMENT EXECUTE FUNCTION tasks_notify();

CREATE TABLE webhook_deliveries (
    id           uuid PRIMARY KEY,
    task_id      uuid NOT NULL,
    url          text NOT NULL,
    secret       bytea NOT NULL,
    body         jsonb NOT NULL,
    state        text NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'delivered', 'failed')),
    attempts     integer NOT NULL DEFAULT 0,
    last_status  integer,
    last_error   text,
    created_at   timestamptz NOT NULL DEFAULT now(),
    delivered_at timestamptz
);
CREATE INDEX webhook_deliveries_task ON webhook_deliveries (task_id);
