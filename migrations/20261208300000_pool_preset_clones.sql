-- Warm pools of preset clones (docs/pools.md): an item cloned from a preset version records which pool made it
-- (`preset_target`: the `POOL_TARGETS` entry's `name` or `name@version`) and the version's snapshot (the claim
-- matches it to the version a provision asks for). Both null: an item made with the plan's defaults.
ALTER TABLE pool_items ADD COLUMN preset_target text, ADD COLUMN preset_snapshot_id uuid;
CREATE INDEX pool_items_ready_clones ON pool_items (plan_id, preset_snapshot_id, ready_at)
    WHERE state = 'ready' AND preset_snapshot_id IS NOT NULL;
