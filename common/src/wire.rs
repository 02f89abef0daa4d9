//! JSON shapes that cross a process boundary. Field names are snake_case; timestamps are RFC 3339 UTC
//! with microseconds, which is exactly PostgreSQL's `timestamptz` precision.

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use uuid::Uuid;

use std::collections::BTreeMap;

use serde_json::value::RawValue;

use crate::db::models::{EventRow, UserRow};

/// A user as the API returns it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    /// Primary key.
    pub id: Uuid,
    /// Email address.
    pub email: String,
    /// Given name.
    pub first_name: String,
    /// Family name.
    pub last_name: String,
    /// When the user was created.
    #[serde(with = "rfc3339_micros")]
    pub created_at: DateTime<Utc>,
    /// When the user was last changed.
    #[serde(with = "rfc3339_micros")]
    pub updated_at: DateTime<Utc>,
}

impl From<UserRow> for User {
    fn from(row: UserRow) -> Self {
        Self {
            id: row.id,
            email: row.email,
            first_name: row.first_name,
            last_name: row.last_name,
            created_at: row.created_at,
            updated_at: row.updated_at,
        }
    }
}

/// The user fields a client sends. Every field is optional at this level so that validation can
/// report every bad or missing field at once instead of stopping at serde's first error; which ones
/// are required is the endpoint's business (see [`CreateUserRequest`], [`UpdateUserRequest`]).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserFields {
    /// Email address.
    #[serde(default, deserialize_with = "present_string")]
    pub email: Option<String>,
    /// Given name.
    #[serde(default, deserialize_with = "present_string")]
    pub first_name: Option<String>,
    /// Family name.
    #[serde(default, deserialize_with = "present_string")]
    pub last_name: Option<String>,
}

/// Body of `POST /api/v1/users`: all three fields required.
pub type CreateUserRequest = UserFields;

/// Body of `PUT /api/v1/users/{id}`: any non-empty subset of the fields.
pub type UpdateUserRequest = UserFields;

/// Body of a list answer (`GET /api/v1/users`, `GET /api/v1/events`): the page's items under the
/// resource's name (`Items`, e.g. [`Users`]), then the paging fields every list shares.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Page<Items> {
    /// The page's items, newest first; `[]` when empty.
    #[serde(flatten)]
    pub items: Items,
    /// How many items the list has in all (those matching its filters).
    pub total: i64,
    /// The page number asked for (from 1); absent when the page was asked for by `cursor`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub page: Option<u32>,
    /// The page size asked for.
    pub limit: u32,
    /// Pass as `cursor` for the next page (keyset pagination, fast at any depth); `null` on the last page.
    pub next_cursor: Option<String>,
}

/// The items of a users page: `{"users": [...]}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Users {
    /// Newest first.
    pub users: Vec<User>,
}

/// Body of `GET /api/v1/users`.
pub type UserPage = Page<Users>;

/// An event as the API returns it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Event {
    /// Primary key.
    pub id: Uuid,
    /// Owner.
    pub user_id: Uuid,
    /// Event type.
    #[serde(rename = "type")]
    pub event_type: String,
    /// Any JSON value, byte for byte as the client sent it.
    pub data: Box<RawValue>,
    /// `pending`, `processed` or `failed`.
    pub status: String,
    /// When the event was accepted.
    #[serde(with = "rfc3339_micros")]
    pub created_at: DateTime<Utc>,
    /// When the worker applied it.
    #[serde(with = "rfc3339_micros_option")]
    pub processed_at: Option<DateTime<Utc>>,
}

impl TryFrom<EventRow> for Event {
    type Error = serde_json::Error;

    fn try_from(row: EventRow) -> Result<Self, Self::Error> {
        Ok(Self {
            id: row.id,
            user_id: row.user_id,
            event_type: row.event_type,
            data: RawValue::from_string(row.data)?,
            status: row.status,
            created_at: row.created_at,
            processed_at: row.processed_at,
        })
    }
}

/// Body of `POST /api/v1/events`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateEventRequest {
    /// Required: an existing user's id.
    #[serde(default)]
    pub user_id: Option<String>,
    /// Required: `[A-Za-z0-9_.:-]{1,100}`.
    #[serde(default, rename = "type", deserialize_with = "present_string")]
    pub event_type: Option<String>,
    /// Required: any JSON value (`null` included), kept byte for byte.
    #[serde(default, deserialize_with = "present_raw")]
    pub data: Option<Box<RawValue>>,
}

/// The items of an events page: `{"events": [...]}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Events {
    /// Newest first.
    pub events: Vec<Event>,
}

/// Body of `GET /api/v1/events`.
pub type EventPage = Page<Events>;

/// Body of `GET /api/v1/users/{id}/stats`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UserStats {
    /// The user.
    pub user_id: Uuid,
    /// Processed client events in all.
    pub events_total: i64,
    /// Processed client events per type.
    pub events_by_type: BTreeMap<String, i64>,
    /// Newest `created_at` among them; `null` when there are none.
    #[serde(with = "rfc3339_micros_option")]
    pub last_event_at: Option<DateTime<Utc>>,
}

/// One invalid field of a request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FieldError {
    /// The field's name as the client sent it (a dotted path for nested values).
    pub field: String,
    /// What is wrong with it, for a human.
    pub message: String,
}

/// Every error response has this body.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorBody {
    /// Human-readable message.
    pub error: String,
    /// Stable machine-readable code.
    pub code: String,
    /// Per-field problems, for validation errors.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub details: Option<Vec<FieldError>>,
    /// The request's id, as echoed in the `X-Request-Id` header.
    pub request_id: String,
}

/// A field that, when present, must be a string: `null` is rejected rather than read as "absent",
/// so a client cannot believe it cleared a field that is in fact left unchanged.
fn present_string<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<String>, D::Error> {
    String::deserialize(deserializer).map(Some)
}

/// A field that must be present but may hold any JSON value, `null` included.
fn present_raw<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<Box<RawValue>>, D::Error> {
    Box::<RawValue>::deserialize(deserializer).map(Some)
}

/// Serde adapter for timestamps in RFC 3339 UTC with exactly six fractional digits.
pub mod rfc3339_micros {
    use super::*;

    /// Formats `2026-01-02T03:04:05.123456Z`.
    pub fn serialize<S: Serializer>(at: &DateTime<Utc>, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&at.to_rfc3339_opts(SecondsFormat::Micros, true))
    }

    /// Parses any RFC 3339 timestamp.
    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<DateTime<Utc>, D::Error> {
        let text = String::deserialize(deserializer)?;
        DateTime::parse_from_rfc3339(&text).map(|at| at.with_timezone(&Utc)).map_err(serde::de::Error::custom)
    }
}

/// [`rfc3339_micros`] for optional timestamps (`null` when absent).
pub mod rfc3339_micros_option {
    use super::*;

    /// `null` or `2026-01-02T03:04:05.123456Z`.
    pub fn serialize<S: Serializer>(at: &Option<DateTime<Utc>>, serializer: S) -> Result<S::Ok, S::Error> {
        match at {
            Some(at) => rfc3339_micros::serialize(at, serializer),
            None => serializer.serialize_none(),
        }
    }

    /// `null` or any RFC 3339 timestamp.
    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<DateTime<Utc>>, D::Error> {
        Option::<String>::deserialize(deserializer)?
            .map(|text| DateTime::parse_from_rfc3339(&text).map(|at| at.with_timezone(&Utc)))
            .transpose()
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn timestamps_have_microseconds_and_z() {
        let at = Utc.with_ymd_and_hms(2026, 1, 2, 3, 4, 5).unwrap();
        let user = User {
            id: Uuid::nil(),
            email: "a@b.c".into(),
            first_name: "A".into(),
            last_name: "B".into(),
            created_at: at,
            updated_at: at,
        };
        let json = serde_json::to_value(&user).unwrap();
        assert_eq!(json["created_at"], "2026-01-02T03:04:05.000000Z");
    }

    #[test]
    fn null_field_is_rejected_not_ignored() {
        let err = serde_json::from_str::<UpdateUserRequest>(r#"{"email":null}"#).unwrap_err();
        assert!(err.to_string().contains("invalid type: null"), "{err}");
    }

    #[test]
    fn unknown_field_is_rejected() {
        let err = serde_json::from_str::<UpdateUserRequest>(r#"{"age":3}"#).unwrap_err();
        assert!(err.to_string().contains("unknown field `age`"), "{err}");
    }
}
