//! Handlers of `/api/v1/events` and `/api/v1/users/{id}/stats`.

use bytes::Bytes;
use common::db::models::EventRow;
use common::traces;
use common::wire::{CreateEventRequest, Event, EventPage, Events, UserStats};
use http::StatusCode;
use tracing::Instrument;
use uuid::Uuid;

use super::repo::{self, EventFilter, NewEvent};
use super::validate;
use super::writer;
use crate::http::error::ApiError;
use crate::http::query::{Cursor, Pagination};
use crate::http::response::{self, HttpResponse};
use crate::idempotency::{self, Answer, Idempotent, WithoutKey};
use crate::outbox;
use crate::pages;
use crate::state::AppState;

/// `POST /api/v1/events`: the event and its outbox row, in a statement shared with concurrent
/// requests (see [`super::writer`]); with an `Idempotency-Key`, in one transaction that also stores the answer.
pub async fn create(
    state: &AppState,
    origin: &outbox::Origin,
    request: CreateEventRequest,
    idempotent: Option<Idempotent>,
) -> Result<HttpResponse, ApiError> {
    let event = validate::new_event(request, state.config.events.max_data_bytes)?;
    let row = repo::new_row(event);
    let message = outbox::client_event(&row, origin)?;
    let new = NewEvent { row, message };
    let Some(idempotent) = idempotent else {
        let answer = created(&new.row)?;
        state.event_writer.write(new).await?;
        state.outbox_signal.rows_committed();
        return Ok(answer.into_response());
    };
    let written = idempotency::write(&state.db, Some(idempotent), WithoutKey::Transaction, move |conn| {
        Box::pin(async move {
            let written = repo::insert_with_messages(conn, std::slice::from_ref(&new))
                .instrument(traces::outbox_insert())
                .await
                .map_err(writer::insert_failed)?;
            if written.is_empty() {
                return Err(ApiError::NotFound("user"));
            }
            Ok(((), created(&new.row)?))
        })
    })
    .await?;
    Ok(written.into_created_response(&state.outbox_signal))
}

/// 201 with the event.
fn created(row: &EventRow) -> Result<Answer, ApiError> {
    let body = serde_json::to_vec(&to_wire(row.clone())?).expect("wire types always serialize");
    Ok(Answer::created(format!("/api/v1/events/{}", row.id), Bytes::from(body)))
}

/// `GET /api/v1/events/{id}`
pub async fn get(state: &AppState, id: Uuid) -> Result<HttpResponse, ApiError> {
    let row = state
        .db
        .run(|conn| Box::pin(async move { Ok::<_, ApiError>(repo::find(conn, id).await?) }))
        .await?
        .ok_or(ApiError::NotFound("event"))?;
    Ok(response::json(StatusCode::OK, &to_wire(row)?))
}

/// `GET /api/v1/events?page=&limit=&user_id=&type=` (or `cursor=` instead of `page=`)
pub async fn list(state: &AppState, query: Option<&str>) -> Result<HttpResponse, ApiError> {
    let page = Pagination::from_query(query)?;
    let filter = filter_from_query(query)?;
    let (rows, total) =
        state.db.run(|conn| Box::pin(async move { Ok::<_, ApiError>(repo::list(conn, &filter, page).await?) })).await?;
    let (rows, next_cursor) = pages::split(rows, page, |row| Cursor { created_at: row.created_at, id: row.id });
    let events = rows.into_iter().map(to_wire).collect::<Result<Vec<_>, _>>()?;
    Ok(response::json(
        StatusCode::OK,
        &EventPage { items: Events { events }, total, page: page.page, limit: page.limit, next_cursor },
    ))
}

/// `GET /api/v1/users/{id}/stats`: what the worker has counted for the user.
pub async fn stats(state: &AppState, user_id: Uuid) -> Result<HttpResponse, ApiError> {
    let rows = state
        .db
        .run(|conn| {
            Box::pin(async move {
                if !repo::user_exists(conn, user_id).await? {
                    return Err(ApiError::NotFound("user"));
                }
                Ok(repo::stats(conn, user_id).await?)
            })
        })
        .await?;
    let stats = UserStats {
        user_id,
        events_total: rows.iter().map(|row| row.count).sum(),
        last_event_at: rows.iter().map(|row| row.last_event_at).max(),
        events_by_type: rows.into_iter().map(|row| (row.event_type, row.count)).collect(),
    };
    Ok(response::json(StatusCode::OK, &stats))
}

fn filter_from_query(query: Option<&str>) -> Result<EventFilter, ApiError> {
    let mut filter = EventFilter::default();
    for (name, value) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        match name.as_ref() {
            "user_id" => {
                let id = Uuid::try_parse(&value).map_err(|_| ApiError::invalid_field("user_id", "must be a UUID"))?;
                filter.user_id = Some(id);
            }
            "type" => {
                if let Some(message) = validate::event_type_error(&value) {
                    return Err(ApiError::invalid_field("type", message));
                }
                filter.event_type = Some(value.into_owned());
            }
            _ => {}
        }
    }
    Ok(filter)
}

fn to_wire(row: EventRow) -> Result<Event, ApiError> {
    Event::try_from(row)
        .map_err(|err| ApiError::Internal(anyhow::Error::new(err).context("stored event data is not JSON")))
}
