//! Code shared by the `api` and `worker` binaries.
//!
//! - [`config`]: every environment variable the services read, parsed once into typed values.
//! - [`db`]: the diesel schema (mirrors `migrations/`) and the row models read from it.
//! - [`wire`]: the JSON shapes that cross a process boundary (HTTP bodies).
//! - [`kafka`]: the message on the events topic, client settings, topic creation.
//! - [`pool`]: the PostgreSQL connection pool both binaries use, its connections opened by
//!   [`postgres`] (TLS through [`tls`]); [`metrics`]: Prometheus plumbing.
//! - [`binary`]: what both `main`s do around their work; [`telemetry`]: log subscriber; [`traces`]: spans exported over OTLP (SPEC §11); [`shutdown`]: termination signals; [`backoff`]: retry delays.

pub mod backoff;
pub mod binary;
pub mod config;
pub mod db;
pub mod group_commit;
pub mod kafka;
pub mod metrics;
pub mod pool;
pub mod postgres;
pub mod request_id;
pub mod shutdown;
pub mod telemetry;
pub mod tls;
pub mod traces;
pub mod wire;
