//! End-to-end tests of the events pipeline: the real api and worker against real PostgreSQL, Redis
//! and a private tansu broker per test (behind a proxy that can cut the network path).

#![expect(clippy::unwrap_used, reason = "test helpers: a panic is how a test reports failure")]

mod chaos;
mod delivery;
mod effects;
mod faults;
mod frozen;
mod group;
mod helpers;
mod lifecycle;
mod memory;
mod outages;
mod partitions;
mod scrape;
mod traces;

mod transport;
