//! SQL for events and stats.

use chrono::{SubsecRound, Utc};
use common::db::models::{EventRow, NewOutboxRow, UserEventStatsRow};
use common::db::prepared::Bind;
use common::db::schema::{events, user_event_stats, users};
use diesel::prelude::*;
use diesel::result::Error as DieselError;
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use uuid::Uuid;

use super::validate::ValidEvent;
use crate::http::query::Pagination;
use crate::outbox;
use crate::pages;

/// Filters of the events list.
#[derive(Debug, Default, Clone)]
pub struct EventFilter {
    pub user_id: Option<Uuid>,
    pub event_type: Option<String>,
}

/// The event and the outbox row announcing it in one statement: atomic without BEGIN and COMMIT, so
/// one round trip where a transaction takes four.
const INSERT_WITH_MESSAGE: &str = "
WITH event AS (
    INSERT INTO events (id, user_id, type, data, created_at) VALUES ($1, $2, $3, $4, $5)
)
INSERT INTO outbox (event_id, user_id, event_type, payload, request_id, traceparent, tracestate)
    VALUES ($6, $7, $8, $9, $10, $11, $12)";

/// A new pending event as it will be stored. Its `created_at` is taken here (at the precision
/// PostgreSQL keeps), so that the outbox message can be built before the insert.
pub fn new_row(event: ValidEvent) -> EventRow {
    EventRow {
        id: Uuid::now_v7(),
        user_id: event.user_id,
        event_type: event.event_type,
        data: event.data.get().to_owned(),
        status: "pending".to_owned(),
        created_at: Utc::now().trunc_subsecs(6),
        processed_at: None,
    }
}

/// Inserts the event and its outbox row (see [`INSERT_WITH_MESSAGE`]; the row's values, then
/// the outbox row's).
pub async fn insert_with_message(
    conn: &mut AsyncPgConnection,
    row: &EventRow,
    message: &NewOutboxRow,
) -> Result<(), DieselError> {
    let values = vec![
        Bind::Uuid(row.id),
        Bind::Uuid(row.user_id),
        Bind::Text(&row.event_type),
        Bind::Text(&row.data),
        Bind::Timestamp(row.created_at),
    ];
    outbox::insert_with(conn, INSERT_WITH_MESSAGE, values, message).await
}

/// The event with this id, if any.
pub async fn find(conn: &mut AsyncPgConnection, id: Uuid) -> Result<Option<EventRow>, DieselError> {
    events::table.find(id).select(EventRow::as_select()).first(conn).await.optional()
}

/// One page, newest first, with one extra row when another page follows (see [`pages::split`]), and
/// the number of matching events.
pub async fn list(
    conn: &mut AsyncPgConnection,
    filter: &EventFilter,
    page: Pagination,
) -> Result<(Vec<EventRow>, i64), DieselError> {
    let filtered = || {
        let mut query = events::table.into_boxed();
        if let Some(user_id) = filter.user_id {
            query = query.filter(events::user_id.eq(user_id));
        }
        if let Some(event_type) = &filter.event_type {
            query = query.filter(events::event_type.eq(event_type.clone()));
        }
        query
    };
    let mut query = filtered().select(EventRow::as_select()).order((events::created_at.desc(), events::id.desc()));
    if let Some(cursor) = page.after {
        query = query.filter(pages::after_cursor(events::created_at, events::id, cursor));
    }
    let rows = pages::paged(query, page).load(conn).await?;
    let total = if filter.user_id.is_none() && filter.event_type.is_none() {
        pages::total(conn, "events").await?
    } else {
        filtered().count().get_result(conn).await?
    };
    Ok((rows, total))
}

/// Whether the user exists.
pub async fn user_exists(conn: &mut AsyncPgConnection, id: Uuid) -> Result<bool, DieselError> {
    diesel::select(diesel::dsl::exists(users::table.find(id))).get_result(conn).await
}

/// The worker's counters for a user, one row per event type.
pub async fn stats(conn: &mut AsyncPgConnection, user_id: Uuid) -> Result<Vec<UserEventStatsRow>, DieselError> {
    user_event_stats::table
        .filter(user_event_stats::user_id.eq(user_id))
        .select(UserEventStatsRow::as_select())
        .load(conn)
        .await
}
