//! The events resource and per-user stats: validation, queries and handlers.

pub mod handlers;
mod repo;
mod validate;
pub mod writer;
