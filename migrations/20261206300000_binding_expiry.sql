-- Expiring bindings (OSB v2.17 metadata.expires_at / renew_before). Both NULL for a binding that never expires.
-- revoked_at: when the reconcile loop's `binding.expire` task removed the expired binding's credentials.
ALTER TABLE service_bindings
    ADD COLUMN expires_at   timestamptz,
    ADD COLUMN renew_before timestamptz,
    ADD COLUMN revoked_at   timestamptz;
-- The reconcile loop looks for expired, unrevoked bindings every cycle.
CREATE INDEX service_bindings_expiring ON service_bindings (expires_at)
    WHERE expires_at IS NOT NULL AND revoked_at IS NULL;
