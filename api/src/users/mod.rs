//! The users resource: validation, queries and handlers.

pub mod handlers;
mod repo;
mod validate;
