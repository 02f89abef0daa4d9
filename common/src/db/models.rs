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
    /// Set by the database on insert.
    pub created_at: DateTime<Utc>,
    /// Set by the database on insert and on every update.
    pub updated_at: DateTime<Utc>,
}

/// The columns a client provides when creating a user (already validated).
#[derive(Debug, Clone, Insertable)]
#[diesel(table_name = users)]
pub struct NewUserRow<'a> {
    /// New primary key.
    pub id: Uuid,
    /// Validated email.
    pub email: &'a str,
    /// Validated given name.
    pub first_name: &'a str,
    /// Validated family name.
    pub last_name: &'a str,
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
