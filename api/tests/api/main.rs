//! Integration tests: the real api against real PostgreSQL and Redis (one fresh database and one
//! Redis key prefix per test).

#![expect(clippy::unwrap_used, reason = "test helpers: a panic is how a test reports failure")]

mod auth;
mod cache;
mod docs;
mod events;
mod helpers;
mod http;
mod idempotency;
mod migrations;
mod operability;
mod plans;
mod ratelimit;
mod shutdown;
mod transport;
mod users;
