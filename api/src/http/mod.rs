//! HTTP plumbing shared by all handlers: body and query parsing, responses, the error type.

pub mod body;
pub mod error;
pub mod query;
pub mod response;
