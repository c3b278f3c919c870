-- Runs a task lost with its worker (lease expired: a kill -9, an OOM kill, a spot VM gone) are counted apart
-- from the runs that failed: a worker's death must not spend the retries a task has for its own errors. The
-- task still fails after LOST_LEASE_FACTOR × max_attempts lost runs, so a task that kills every worker running
-- it does not take the fleet down forever. Additive: the previous release's binaries never read it.
ALTER TABLE tasks ADD COLUMN lost_leases integer NOT NULL DEFAULT 0;
