//! Handlers of `/api/v1/users`: typed inputs in, a response or an [`ApiError`] out.

use std::time::Instant;

use bytes::Bytes;
use common::db::models::UserRow;
use common::kafka::lifecycle;
use common::wire::{CreateUserRequest, UpdateUserRequest, User, UserPage, Users};
use diesel::result::Error as DieselError;
use http::StatusCode;
use uuid::Uuid;

use super::{repo, validate};
use crate::cache::Lookup;
use crate::db::is_unique_violation;
use crate::http::error::ApiError;
use crate::http::query::{Cursor, Pagination};
use crate::http::response::{self, HttpResponse};
use crate::idempotency::{self, Answer, Idempotent, WithoutKey, Written};
use crate::outbox;
use crate::pages;
use crate::state::AppState;

/// `POST /api/v1/users`: the user and its `user_created` event in one statement (with an
/// `Idempotency-Key`, one transaction that also stores the answer).
pub async fn create(
    state: &AppState,
    origin: &outbox::Origin,
    request: CreateUserRequest,
    idempotent: Option<Idempotent>,
) -> Result<HttpResponse, ApiError> {
    let row = repo::new_row(validate::new_user(request)?);
    let message = outbox::lifecycle_event(lifecycle::USER_CREATED, &row, origin)?;
    let written = idempotency::write(&state.db, idempotent, WithoutKey::OneStatement, move |conn| {
        Box::pin(async move {
            repo::insert_with_message(conn, &row, &message).await.map_err(email_conflict)?;
            let location = format!("/api/v1/users/{}", row.id);
            Ok(((), Answer::created(location, serialize(row).1)))
        })
    })
    .await?;
    Ok(written.into_created_response(&state.outbox_signal))
}

/// `GET /api/v1/users/{id}`: from the cache when it has the user, else from PostgreSQL.
pub async fn get(state: &AppState, id: Uuid) -> Result<HttpResponse, ApiError> {
    match state.cache.get(id).await {
        Lookup::Hit(body) => return Ok(response::json_bytes(StatusCode::OK, body)),
        Lookup::Deleted => return Err(ApiError::NotFound("user")),
        Lookup::Miss => {}
    }
    let read_started = Instant::now();
    let row = state
        .db
        .run(|conn| Box::pin(async move { Ok::<_, ApiError>(repo::find(conn, id).await?) }))
        .await?
        .ok_or(ApiError::NotFound("user"))?;
    let (version, body) = serialize(row);
    // The response does not wait for the fill.
    let _ = state.cache.fill(id, version, body.clone(), read_started);
    Ok(response::json_bytes(StatusCode::OK, body))
}

/// `PUT /api/v1/users/{id}`: partial update and its `user_updated` event in one transaction; the
/// response is the row as now stored.
pub async fn update(
    state: &AppState,
    origin: &outbox::Origin,
    id: Uuid,
    request: UpdateUserRequest,
    idempotent: Option<Idempotent>,
) -> Result<HttpResponse, ApiError> {
    let changes = validate::changes(request)?;
    let origin = origin.clone();
    let written = idempotency::write(&state.db, idempotent, WithoutKey::Transaction, move |conn| {
        Box::pin(async move {
            let row =
                repo::update(conn, id, &changes).await.map_err(email_conflict)?.ok_or(ApiError::NotFound("user"))?;
            outbox::append(conn, outbox::lifecycle_event(lifecycle::USER_UPDATED, &row, &origin)?).await?;
            let (version, body) = serialize(row);
            Ok((version, Answer::json(StatusCode::OK, body)))
        })
    })
    .await?;
    let (version, answer) = match written {
        Written::Fresh { value, answer } => (value, answer),
        // A replay wrote nothing: the cache already saw whatever the first request did.
        Written::Replayed(response) => return Ok(response),
    };
    state.outbox_signal.rows_committed();
    // Before answering, so that no GET after this response can be served the previous state.
    state.cache.store(id, version, answer.body.clone()).await;
    Ok(answer.into_response())
}

/// `DELETE /api/v1/users/{id}`: the user (its events and stats cascade), its personal data in messages
/// not yet published, and its `user_deleted` event (the id only), in one transaction.
pub async fn delete(
    state: &AppState,
    origin: &outbox::Origin,
    id: Uuid,
    idempotent: Option<Idempotent>,
) -> Result<HttpResponse, ApiError> {
    let origin = origin.clone();
    let written = idempotency::write(&state.db, idempotent, WithoutKey::Transaction, move |conn| {
        Box::pin(async move {
            let row = repo::delete(conn, id).await?.ok_or(ApiError::NotFound("user"))?;
            outbox::forget_user(conn, id).await?;
            outbox::append(conn, outbox::user_deleted(id, &origin)?).await?;
            Ok((row.version, Answer::no_content()))
        })
    })
    .await?;
    let (version, answer) = match written {
        Written::Fresh { value, answer } => (value, answer),
        Written::Replayed(response) => return Ok(response),
    };
    state.outbox_signal.rows_committed();
    state.cache.store_deleted(id, version).await;
    Ok(answer.into_response())
}

/// `GET /api/v1/users?page=&limit=` or `?cursor=&limit=`
pub async fn list(state: &AppState, page: Pagination) -> Result<HttpResponse, ApiError> {
    let (rows, total) =
        state.db.run(|conn| Box::pin(async move { Ok::<_, ApiError>(repo::list(conn, page).await?) })).await?;
    let (rows, next_cursor) = pages::split(rows, page, |row| Cursor { created_at: row.created_at, id: row.id });
    let users = rows.into_iter().map(User::from).collect();
    let body = UserPage { items: Users { users }, total, page: page.page, limit: page.limit, next_cursor };
    Ok(response::json(StatusCode::OK, &body))
}

/// The row's version and its response body.
fn serialize(row: UserRow) -> (i64, Bytes) {
    let version = row.version;
    let body = serde_json::to_vec(&User::from(row)).expect("wire types always serialize");
    (version, Bytes::from(body))
}

fn email_conflict(err: DieselError) -> ApiError {
    if is_unique_violation(&err, repo::EMAIL_UNIQUE_INDEX) {
        ApiError::Conflict { code: "email_taken", message: "a user with this email already exists".into() }
    } else {
        err.into()
    }
}
