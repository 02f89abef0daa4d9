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
    /// The Kafka key.
    pub user_id: Uuid,
    /// The `event-type` header.
    pub event_type: String,
    /// The Kafka message value (JSON).
    pub payload: String,
    /// The `request-id` header.
    pub request_id: Option<String>,
}

/// A row of `outbox` as the relay reads it.
#[derive(Debug, Clone, PartialEq, Eq, Queryable, Selectable)]
#[diesel(table_name = crate::db::schema::outbox, check_for_backend(diesel::pg::Pg))]
pub struct OutboxRow {
    /// Publishing order.
    pub id: i64,
    /// The Kafka key.
    pub user_id: Uuid,
    /// The `event-type` header.
    pub event_type: String,
    /// The Kafka message value.
    pub payload: String,
    /// The `request-id` header.
    pub request_id: Option<String>,
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
