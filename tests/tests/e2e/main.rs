//! End to end: the real binaries over HTTP against a real Postgres.

mod shared_lifecycle;
