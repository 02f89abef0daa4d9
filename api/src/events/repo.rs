//! SQL for events and stats.

use common::db::models::{EventRow, NewEventRow, UserEventStatsRow};
use common::db::schema::{events, user_event_stats, users};
use diesel::prelude::*;
use diesel::result::Error as DieselError;
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use uuid::Uuid;

use super::validate::ValidEvent;
use crate::http::query::Pagination;
use crate::pages;

/// Filters of the events list.
#[derive(Debug, Default, Clone)]
pub struct EventFilter {
    pub user_id: Option<Uuid>,
    pub event_type: Option<String>,
}

/// Inserts a pending event.
pub async fn insert(conn: &mut AsyncPgConnection, event: &ValidEvent) -> Result<EventRow, DieselError> {
    diesel::insert_into(events::table)
        .values(NewEventRow {
            id: Uuid::now_v7(),
            user_id: event.user_id,
            event_type: &event.event_type,
            data: event.data.get(),
        })
        .returning(EventRow::as_returning())
        .get_result(conn)
        .await
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
    let mut query = filtered()
        .select(EventRow::as_select())
        .order((events::created_at.desc(), events::id.desc()))
        .limit(pages::rows_to_fetch(page));
    query = match page.after {
        // Spelled as in the users list: the index condition starts the walk at the cursor.
        Some(cursor) => query
            .filter(events::created_at.le(cursor.created_at))
            .filter(events::created_at.lt(cursor.created_at).or(events::id.lt(cursor.id))),
        None => query.offset(page.offset()),
    };
    let rows = query.load(conn).await?;
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
