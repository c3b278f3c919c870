-- Every sealing key any process of this broker has brought (never the key: its public id and check value), per
-- purpose: `master` seals secrets in this database, `snapshot` seals presets and backups. A process refuses to
-- start when a key still in use here (retired_at IS NULL) is missing from its list. `berth-worker rekey` sets
-- retired_at once nothing is sealed with a key any more, so processes may drop it. sealing_key_checks stays for
-- the previous release's binaries during a rolling upgrade.
CREATE TABLE sealing_keys (
    purpose     text NOT NULL CHECK (purpose IN ('master', 'snapshot')),
    key_id      text NOT NULL,
    check_value bytea NOT NULL,
    added_at    timestamptz NOT NULL DEFAULT now(),
    retired_at  timestamptz,
    -- Order of first sight: rekey retires only keys seen before its primary, never the next rotation's new key.
    seq         bigint GENERATED ALWAYS AS IDENTITY,
    PRIMARY KEY (purpose, key_id)
);

-- Snapshot objects `berth-worker rekey` replaced with a re-sealed copy: queued in the transaction that points the
-- snapshot at the copy, deleted from the store afterwards; a run killed in between deletes them on its next run.
CREATE TABLE snapshot_objects_to_delete (
    object_key text PRIMARY KEY,
    queued_at  timestamptz NOT NULL DEFAULT now()
);
