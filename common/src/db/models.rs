//! Row models: what diesel reads from and writes to the tables in [`super::schema`].

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use uuid::Uuid;

use super::schema::users;

/// A row of `users`, exactly as stored.
#[derive(Debug, Clone, PartialEq, Eq, Queryable, Selectable)]
#[diesel(table_name = users, check_for_backend(diesel::pg::Pg))]
pub struct UserRow {
    /// Primary key (UUID v7, so ids sort roughly by creation time).
    pub id: Uuid,
    /// Trimmed address; unique case-insensitively (index on `lower(email)`).
    pub email: String,
    /// Trimmed given name.
    pub first_name: String,
    /// Trimmed family name.
    pub last_name: String,
    /// Bumped by every update; orders cache entries so a stale fill never overwrites a newer state.
    pub version: i64,
    /// When the api created the user (its clock, so that the outbox message can be built before the
    /// insert).
    pub created_at: DateTime<Utc>,
    /// `created_at` at first; set by the database on every update.
    pub updated_at: DateTime<Utc>,
}

/// A partial update: `None` leaves the column as it is.
#[derive(Debug, Clone, Default, AsChangeset)]
#[diesel(table_name = users)]
pub struct UserChangeset<'a> {
    /// New email, if changed.
    pub email: Option<&'a str>,
    /// New given name, if changed.
    pub first_name: Option<&'a str>,
    /// New family name, if changed.
    pub last_name: Option<&'a str>,
}

/// A row of `events`, exactly as stored.
#[derive(Debug, Clone, PartialEq, Eq, Queryable, Selectable)]
#[diesel(table_name = crate::db::schema::events, check_for_backend(diesel::pg::Pg))]
pub struct EventRow {
    /// Primary key (UUID v7).
    pub id: Uuid,
    /// The user the event belongs to.
    pub user_id: Uuid,
    /// Client-chosen type, `[A-Za-z0-9_.:-]{1,100}`.
    pub event_type: String,
    /// The JSON text of `data`, exactly as the client sent it.
    pub data: String,
    /// `pending`, `processed` or `failed`.
    pub status: String,
    /// When the api accepted the event (its clock, so that the outbox message can be built before
    /// the insert).
    pub created_at: DateTime<Utc>,
    /// Set by the worker when it applied the event.
    pub processed_at: Option<DateTime<Utc>>,
}

/// A new `outbox` row: one Kafka message to publish.
#[derive(Debug, Clone, Insertable)]
#[diesel(table_name = crate::db::schema::outbox)]
pub struct NewOutboxRow {
    /// The event's id (also inside `payload`).
    pub event_id: Uuid,
    /// The message.
    #[diesel(embed)]
    pub message: OutboxMessage,
}

/// A row of `outbox` as the relay reads it.
#[derive(Debug, Clone, PartialEq, Eq, Queryable, Selectable)]
#[diesel(table_name = crate::db::schema::outbox, check_for_backend(diesel::pg::Pg))]
pub struct OutboxRow {
    /// Publishing order.
    pub id: i64,
    /// The message.
    #[diesel(embed)]
    pub message: OutboxMessage,
}

/// The Kafka message an `outbox` row holds: what the relay sends.
#[derive(Debug, Clone, PartialEq, Eq, Insertable, Queryable, Selectable)]
#[diesel(table_name = crate::db::schema::outbox, check_for_backend(diesel::pg::Pg))]
pub struct OutboxMessage {
    /// The Kafka key.
    pub user_id: Uuid,
    /// The `event-type` header.
    pub event_type: String,
    /// The Kafka message value (JSON).
    pub payload: String,
    /// The `request-id` header.
    pub request_id: Option<String>,
    /// The `traceparent` header (SPEC §11).
    pub traceparent: Option<String>,
    /// The `tracestate` header.
    pub tracestate: Option<String>,
}

/// A row of `user_event_stats`.
#[derive(Debug, Clone, PartialEq, Eq, Queryable, Selectable)]
#[diesel(table_name = crate::db::schema::user_event_stats, check_for_backend(diesel::pg::Pg))]
pub struct UserEventStatsRow {
    /// Owner.
    pub user_id: Uuid,
    /// Event type counted.
    pub event_type: String,
    /// Processed events of this type.
    pub count: i64,
    /// Newest `created_at` among them.
    pub last_event_at: DateTime<Utc>,
}

/// A row of `idempotency_keys`: the answer to a write sent with an `Idempotency-Key` (SPEC §10),
/// written by the transaction of that write. Also what a later request with the same client and key
/// is checked against and answered with.
#[derive(Debug, Clone, PartialEq, Eq, Queryable, Selectable, Insertable, AsChangeset)]
#[diesel(table_name = crate::db::schema::idempotency_keys, check_for_backend(diesel::pg::Pg))]
// Replacing an expired row must also clear its `location`.
#[diesel(treat_none_as_null = true)]
pub struct IdempotencyRow {
    /// Who sent the request (the token's client, or the peer with authentication off).
    pub client_id: String,
    /// The client's `Idempotency-Key`.
    pub idempotency_key: String,
    /// The request's method.
    pub method: String,
    /// The request's path (without a trailing slash).
    pub path: String,
    /// SHA-256 (hex) of the request body in canonical JSON.
    pub body_sha256: String,
    /// The answer's status code.
    pub status: i32,
    /// The answer's `Location` header.
    pub location: Option<String>,
    /// The answer's body, byte for byte.
    pub response_body: Vec<u8>,
    /// When the row stops counting (the expiry job deletes it some time after).
    pub expires_at: DateTime<Utc>,
}
