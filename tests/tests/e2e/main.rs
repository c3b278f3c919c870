//! End to end: the real binaries over HTTP against a real Postgres.

mod dedicated_local;
mod ha_local;
mod s3_lifecycle;
mod shared_lifecycle;
