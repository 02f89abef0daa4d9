//! Code shared by the `api` and `worker` binaries.
//!
//! - [`config`]: every environment variable the services read, parsed once into typed values.
//! - [`db`]: the diesel schema (mirrors `migrations/`) and the row models read from it.
//! - [`wire`]: the JSON shapes that cross a process boundary (HTTP bodies).

pub mod config;
pub mod db;
pub mod wire;
