-- Warm pools: items a worker makes ahead of time for a plan. They are berth's own (no OSB call sees them) until a
-- provision takes one in the transaction that records its instance (the row goes, its details and secrets move
-- to the instance). `filling`: a pool.fill task is making it; `ready`: it can be taken; `removing`: a pool.remove
-- task is taking it apart (recycled, drained, or left over by a failed fill).
CREATE TABLE pool_items (
    id         text PRIMARY KEY,
    plan_id    text NOT NULL,
    state      text NOT NULL DEFAULT 'filling' CHECK (state IN ('filling', 'ready', 'removing')),
    details    jsonb NOT NULL DEFAULT '{}',
    secrets    bytea,
    -- the item's current pool.fill or pool.remove task
    task_id    uuid,
    created_at timestamptz NOT NULL DEFAULT now(),
    ready_at   timestamptz
);
CREATE INDEX pool_items_ready ON pool_items (plan_id, ready_at) WHERE state = 'ready';

-- Provisions of a pooled plan that took an item (hits) or found none it could use (misses), for /metrics.
CREATE TABLE pool_stats (
    plan_id text PRIMARY KEY,
    hits    bigint NOT NULL DEFAULT 0,
    misses  bigint NOT NULL DEFAULT 0
);
