//! The transactional outbox (SPEC §3): every event is written to `outbox` in the same transaction as
//! the change that caused it; [`relay`] publishes the rows to Kafka after commit and deletes them once
//! Kafka has acknowledged them.

pub mod lease;
pub mod relay;

use common::db::models::{EventRow, NewOutboxRow, OutboxMessage, UserRow};
use common::db::prepared::{Bind, Prepared};
use common::db::schema::outbox;
use common::kafka::{EventMessage, lifecycle};
use common::traces::{self, TraceContext};
use common::wire::User;
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use serde_json::value::RawValue;
use tracing::Instrument;
use uuid::Uuid;

use crate::http::error::ApiError;

/// Where a message comes from: the request that caused it, by id and (with traces on) by trace
/// context. Both travel with the message as Kafka headers (SPEC §4, §11).
#[derive(Debug, Clone)]
pub struct Origin {
    /// The request's `X-Request-ID`.
    pub request_id: String,
    /// The request span's W3C context, when traces are on.
    pub trace: Option<TraceContext>,
}

impl Origin {
    /// The request `request_id`, inside whose span this is called.
    pub fn of_request(request_id: &str) -> Self {
        Self { request_id: request_id.to_owned(), trace: traces::current() }
    }
}

/// Appends one message to the outbox (call inside the transaction of the change it announces).
pub async fn append(conn: &mut AsyncPgConnection, row: NewOutboxRow) -> Result<(), ApiError> {
    diesel::insert_into(outbox::table).values(row).execute(conn).instrument(traces::outbox_insert()).await?;
    Ok(())
}

/// Runs `statement`, which inserts a change and the outbox row announcing it in one statement: its
/// parameters are `change`'s values, then the outbox row's in the column order `(event_id, user_id,
/// event_type, payload, request_id, traceparent, tracestate)`.
pub async fn insert_with(
    conn: &mut AsyncPgConnection,
    statement: &'static str,
    mut change: Vec<Bind<'_>>,
    message: &NewOutboxRow,
) -> Result<(), diesel::result::Error> {
    change.extend(binds(message));
    Prepared::new(statement, change).execute(conn).instrument(traces::outbox_insert()).await.map(drop)
}

fn binds(row: &NewOutboxRow) -> [Bind<'_>; 7] {
    let message = &row.message;
    [
        Bind::Uuid(row.event_id),
        Bind::Uuid(message.user_id),
        Bind::Text(&message.event_type),
        Bind::Text(&message.payload),
        Bind::OptionalText(message.request_id.as_deref()),
        Bind::OptionalText(message.traceparent.as_deref()),
        Bind::OptionalText(message.tracestate.as_deref()),
    ]
}

/// The outbox row announcing a client event.
pub fn client_event(event: &EventRow, origin: &Origin) -> Result<NewOutboxRow, ApiError> {
    let data = RawValue::from_string(event.data.clone()).map_err(|err| ApiError::Internal(err.into()))?;
    row(
        EventMessage {
            id: event.id,
            user_id: event.user_id,
            event_type: event.event_type.clone(),
            data,
            timestamp: event.created_at,
        },
        origin,
    )
}

/// The outbox row announcing `user_created` or `user_updated`; `data` is the user's fields.
pub fn lifecycle_event(event_type: &str, user: &UserRow, origin: &Origin) -> Result<NewOutboxRow, ApiError> {
    let data =
        serde_json::value::to_raw_value(&User::from(user.clone())).map_err(|err| ApiError::Internal(err.into()))?;
    let message = EventMessage {
        id: Uuid::now_v7(),
        user_id: user.id,
        event_type: event_type.to_owned(),
        data,
        timestamp: user.updated_at,
    };
    row(message, origin)
}

/// The outbox row announcing `user_deleted`: its `data` is `{"id": …}` and nothing else (SPEC §9).
pub fn user_deleted(user_id: Uuid, origin: &Origin) -> Result<NewOutboxRow, ApiError> {
    let data = id_only(user_id)?;
    let event_type = lifecycle::USER_DELETED.to_owned();
    row(EventMessage { id: Uuid::now_v7(), user_id, event_type, data, timestamp: chrono::Utc::now() }, origin)
}

/// Strips a deleted user's `user_created` and `user_updated` messages still waiting in the outbox down
/// to `{"id": …}` (call in the transaction that deletes the user), so that no email or name leaves the
/// service after the deletion (SPEC §9). A batch the relay read just before the deletion committed may
/// still be on its way to Kafka as it was: it was produced before, not after.
pub async fn forget_user(conn: &mut AsyncPgConnection, user_id: Uuid) -> Result<(), ApiError> {
    let id_only = id_only(user_id)?;
    Prepared::new(FORGET_USER, vec![Bind::Text(id_only.get()), Bind::Uuid(user_id)]).execute(conn).await?;
    Ok(())
}

/// The types are literals, as in the partial index `outbox_user_lifecycle_idx` (a generic plan can
/// only use the index when the query's condition implies the index's; `lifecycle` holds the same names).
pub const FORGET_USER: &str = "UPDATE outbox SET payload = jsonb_set(payload::jsonb, '{data}', $1::jsonb)::text \
     WHERE user_id = $2 AND event_type IN ('user_created', 'user_updated')";

fn id_only(user_id: Uuid) -> Result<Box<RawValue>, ApiError> {
    serde_json::value::to_raw_value(&serde_json::json!({ "id": user_id })).map_err(|err| ApiError::Internal(err.into()))
}

fn row(message: EventMessage, origin: &Origin) -> Result<NewOutboxRow, ApiError> {
    let trace = origin.trace.as_ref();
    Ok(NewOutboxRow {
        event_id: message.id,
        message: OutboxMessage {
            user_id: message.user_id,
            event_type: message.event_type.clone(),
            payload: serde_json::to_string(&message).map_err(|err| ApiError::Internal(err.into()))?,
            request_id: Some(origin.request_id.clone()),
            traceparent: trace.map(|trace| trace.traceparent.clone()),
            tracestate: trace.and_then(|trace| trace.tracestate.clone()),
        },
    })
}
