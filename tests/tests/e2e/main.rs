//! End to end: the real binaries over HTTP against a real Postgres.

mod abandoned_requests;
mod auth_throttle;
mod binding_rotation;
mod chaos;
mod cli;
mod command_line;
mod dashboard;
mod dedicated_local;
mod dedicated_spot_vm;
mod embedded_default;
mod ha_ec2_vm;
mod ha_local;
mod key_rotation;
mod observability;
mod openapi;
mod pools;
mod pools_ec2;
mod pools_ha;
mod pools_s3;
mod s3_lifecycle;
mod shared_lifecycle;
mod slow_clients;
mod snapshots;
mod startup;
mod synchronous;
mod tls;
