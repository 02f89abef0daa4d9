//! JSON shapes that cross a process boundary. Field names are snake_case; timestamps are RFC 3339 UTC
//! with microseconds, which is exactly PostgreSQL's `timestamptz` precision.

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use uuid::Uuid;

use crate::db::models::UserRow;

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

/// Body of `POST /api/v1/users`. Fields are optional here so that validation can report every
/// missing field at once instead of stopping at serde's first error.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateUserRequest {
    /// Required.
    #[serde(default, deserialize_with = "present_string")]
    pub email: Option<String>,
    /// Required.
    #[serde(default, deserialize_with = "present_string")]
    pub first_name: Option<String>,
    /// Required.
    #[serde(default, deserialize_with = "present_string")]
    pub last_name: Option<String>,
}

/// Body of `PUT /api/v1/users/{id}`: any non-empty subset of the fields.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateUserRequest {
    /// New email, if present.
    #[serde(default, deserialize_with = "present_string")]
    pub email: Option<String>,
    /// New given name, if present.
    #[serde(default, deserialize_with = "present_string")]
    pub first_name: Option<String>,
    /// New family name, if present.
    #[serde(default, deserialize_with = "present_string")]
    pub last_name: Option<String>,
}

/// Body of `GET /api/v1/users`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UserPage {
    /// The page's users, newest first; `[]` when empty.
    pub users: Vec<User>,
    /// How many users exist in all.
    pub total: i64,
    /// The page number asked for (from 1).
    pub page: u32,
    /// The page size asked for.
    pub limit: u32,
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
