//! The transactional outbox (SPEC §3): every event is written to `outbox` in the same transaction as
//! the change that caused it; [`relay`] publishes the rows to Kafka after commit and deletes them once
//! Kafka has acknowledged them.

pub mod relay;

use common::db::models::{EventRow, NewOutboxRow, UserRow};
use common::db::prepared::Bind;
use common::db::schema::outbox;
use common::kafka::EventMessage;
use common::wire::User;
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use serde_json::value::RawValue;

use crate::http::error::ApiError;

/// Appends one message to the outbox (call inside the transaction of the change it announces).
pub async fn append(conn: &mut AsyncPgConnection, row: NewOutboxRow) -> Result<(), ApiError> {
    diesel::insert_into(outbox::table).values(row).execute(conn).await?;
    Ok(())
}

/// The values of an outbox row in the column order `(event_id, user_id, event_type, payload,
/// request_id)`, for statements that insert the row together with the change it announces.
pub fn binds(message: &NewOutboxRow) -> [Bind<'_>; 5] {
    [
        Bind::Uuid(message.event_id),
        Bind::Uuid(message.user_id),
        Bind::Text(&message.event_type),
        Bind::Text(&message.payload),
        Bind::OptionalText(message.request_id.as_deref()),
    ]
}

/// The outbox row announcing a client event.
pub fn client_event(event: &EventRow, request_id: &str) -> Result<NewOutboxRow, ApiError> {
    let data = RawValue::from_string(event.data.clone()).map_err(|err| ApiError::Internal(err.into()))?;
    row(
        EventMessage {
            id: event.id,
            user_id: event.user_id,
            event_type: event.event_type.clone(),
            data,
            timestamp: event.created_at,
        },
        request_id,
    )
}

/// The outbox row announcing a `user_*` lifecycle event; `data` is the user's fields.
pub fn lifecycle_event(event_type: &str, user: &UserRow, request_id: &str) -> Result<NewOutboxRow, ApiError> {
    let data =
        serde_json::value::to_raw_value(&User::from(user.clone())).map_err(|err| ApiError::Internal(err.into()))?;
    let timestamp =
        if event_type == common::kafka::lifecycle::USER_DELETED { chrono::Utc::now() } else { user.updated_at };
    row(
        EventMessage { id: uuid::Uuid::now_v7(), user_id: user.id, event_type: event_type.to_owned(), data, timestamp },
        request_id,
    )
}

fn row(message: EventMessage, request_id: &str) -> Result<NewOutboxRow, ApiError> {
    Ok(NewOutboxRow {
        event_id: message.id,
        user_id: message.user_id,
        event_type: message.event_type.clone(),
        payload: serde_json::to_string(&message).map_err(|err| ApiError::Internal(err.into()))?,
        request_id: Some(request_id.to_owned()),
    })
}
