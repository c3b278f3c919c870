-- A check value of each sealing key (never the key): every API and worker compares its key file against it at
-- start, so a process with another key refuses to start instead of sealing what no other process can open.
CREATE TABLE sealing_key_checks (
    name        text PRIMARY KEY,
    check_value bytea NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
