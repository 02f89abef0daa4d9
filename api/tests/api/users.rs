//! The users API, success and error cases (SPEC §2 "Users").

use serde_json::{Value, json};
use uuid::Uuid;

use crate::helpers::{error_code, spawn_app, unique_email};

#[tokio::test(flavor = "multi_thread")]
async fn create_returns_the_stored_user_with_location() {
    let app = spawn_app().await;
    let email = unique_email("create");
    let response = app
        .client
        .post(app.url("/api/v1/users"))
        .json(&json!({"email": format!("  {email} "), "first_name": " Ada ", "last_name": "Lovelace"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    let location = response.headers()["location"].to_str().unwrap().to_owned();
    let user: Value = response.json().await.unwrap();
    assert_eq!(location, format!("/api/v1/users/{}", user["id"].as_str().unwrap()));
    assert_eq!(user["email"], email.as_str());
    assert_eq!(user["first_name"], "Ada");
    assert_eq!(user["last_name"], "Lovelace");
    let keys: Vec<_> = user.as_object().unwrap().keys().cloned().collect();
    assert_eq!(keys.len(), 6, "{keys:?}");
    let created_at = user["created_at"].as_str().unwrap();
    assert!(
        created_at.ends_with('Z') && created_at.split('.').nth(1).unwrap().len() == 7,
        "microseconds and Z: {created_at}"
    );
    assert_eq!(user["created_at"], user["updated_at"]);

    let (status, fetched) = app.get(&location).await;
    assert_eq!(status, 200);
    assert_eq!(fetched, user, "GET returns exactly what POST returned");
}

#[tokio::test(flavor = "multi_thread")]
async fn create_validation_errors_name_each_field() {
    let app = spawn_app().await;
    let cases = [
        (json!({}), vec!["email", "first_name", "last_name"]),
        (json!({"email": "a@b", "first_name": "A", "last_name": "B"}), vec!["email"]),
        (json!({"email": "a b@c.d", "first_name": "A", "last_name": "B"}), vec!["email"]),
        (json!({"email": format!("{}@b.cd", "a".repeat(260)), "first_name": "A", "last_name": "B"}), vec!["email"]),
        (
            json!({"email": "a@b.cd", "first_name": "   ", "last_name": "x".repeat(101)}),
            vec!["first_name", "last_name"],
        ),
        (json!({"email": "a@b.cd", "first_name": "A\u{0}", "last_name": "B"}), vec!["first_name"]),
        (json!({"email": 5, "first_name": "A", "last_name": "B"}), vec!["email"]),
        (json!({"email": null, "first_name": "A", "last_name": "B"}), vec!["email"]),
        (json!({"email": "a@b.cd", "first_name": "A", "last_name": "B", "admin": true}), vec!["admin"]),
    ];
    for (body, fields) in cases {
        let response = app.client.post(app.url("/api/v1/users")).json(&body).send().await.unwrap();
        assert_eq!(response.status(), 400, "{body}");
        let error: Value = response.json().await.unwrap();
        assert_eq!(error_code(&error), "validation_failed", "{error}");
        let reported: Vec<_> =
            error["details"].as_array().unwrap().iter().map(|d| d["field"].as_str().unwrap()).collect();
        assert_eq!(reported, fields, "{body} -> {error}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn email_is_unique_case_insensitively() {
    let app = spawn_app().await;
    let email = unique_email("dup");
    app.create_user(&email).await;
    let response = app
        .client
        .post(app.url("/api/v1/users"))
        .json(&json!({"email": email.to_uppercase(), "first_name": "A", "last_name": "B"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 409);
    assert_eq!(error_code(&response.json().await.unwrap()), "email_taken");
}

#[tokio::test(flavor = "multi_thread")]
async fn get_with_bad_or_unknown_id() {
    let app = spawn_app().await;
    let (status, body) = app.get("/api/v1/users/not-a-uuid").await;
    assert_eq!((status, error_code(&body)), (400, "invalid_id"));
    let (status, body) = app.get(&format!("/api/v1/users/{}", Uuid::new_v4())).await;
    assert_eq!((status, error_code(&body)), (404, "not_found"));
}

#[tokio::test(flavor = "multi_thread")]
async fn update_is_partial_and_returns_the_stored_row() {
    let app = spawn_app().await;
    let user = app.create_user(&unique_email("upd")).await;
    let path = format!("/api/v1/users/{}", user["id"].as_str().unwrap());

    let (status, updated) = app.put(&path, json!({"first_name": "  Grace "})).await;
    assert_eq!(status, 200);
    assert_eq!(updated["first_name"], "Grace");
    assert_eq!(updated["last_name"], user["last_name"]);
    assert_eq!(updated["email"], user["email"]);
    assert_eq!(updated["created_at"], user["created_at"]);
    assert!(updated["updated_at"].as_str() > user["updated_at"].as_str());
    assert_eq!(app.get(&path).await, (200, updated.clone()));

    let new_email = unique_email("moved");
    let (status, updated) = app.put(&path, json!({"email": new_email, "last_name": "Hopper"})).await;
    assert_eq!(status, 200);
    assert_eq!((updated["email"].as_str(), updated["last_name"].as_str()), (Some(new_email.as_str()), Some("Hopper")));
    assert_eq!(updated["first_name"], "Grace");
}

#[tokio::test(flavor = "multi_thread")]
async fn update_errors() {
    let app = spawn_app().await;
    let taken = unique_email("taken");
    app.create_user(&taken).await;
    let user = app.create_user(&unique_email("upd-err")).await;
    let path = format!("/api/v1/users/{}", user["id"].as_str().unwrap());

    let (status, body) = app.put(&path, json!({})).await;
    assert_eq!((status, error_code(&body)), (400, "validation_failed"));
    let (status, body) = app.put(&path, json!({"nickname": "x"})).await;
    assert_eq!((status, error_code(&body)), (400, "validation_failed"));
    assert_eq!(body["details"][0]["field"], "nickname");
    let (status, body) = app.put(&path, json!({"email": "not-an-email"})).await;
    assert_eq!((status, error_code(&body)), (400, "validation_failed"));
    let (status, body) = app.put(&path, json!({"last_name": null})).await;
    assert_eq!((status, error_code(&body)), (400, "validation_failed"));
    let (status, body) = app.put(&path, json!({"email": taken.to_uppercase()})).await;
    assert_eq!((status, error_code(&body)), (409, "email_taken"));
    let (status, body) = app.put(&format!("/api/v1/users/{}", Uuid::new_v4()), json!({"first_name": "X"})).await;
    assert_eq!((status, error_code(&body)), (404, "not_found"));
    let (status, body) = app.put("/api/v1/users/123", json!({"first_name": "X"})).await;
    assert_eq!((status, error_code(&body)), (400, "invalid_id"));

    // Nothing above changed the stored user.
    assert_eq!(app.get(&path).await, (200, user));
}

#[tokio::test(flavor = "multi_thread")]
async fn delete_then_everything_is_404() {
    let app = spawn_app().await;
    let user = app.create_user(&unique_email("del")).await;
    let path = format!("/api/v1/users/{}", user["id"].as_str().unwrap());
    assert_eq!(app.get(&path).await.0, 200, "warms the cache");

    let response = app.client.delete(app.url(&path)).send().await.unwrap();
    assert_eq!(response.status(), 204);
    assert!(response.bytes().await.unwrap().is_empty(), "204 has no body");

    assert_eq!(app.get(&path).await.0, 404);
    assert_eq!(app.delete(&path).await, 404);
    assert_eq!(app.put(&path, json!({"first_name": "X"})).await.0, 404);
    assert_eq!(app.delete("/api/v1/users/nope").await, 400);
}

#[tokio::test(flavor = "multi_thread")]
async fn list_is_newest_first_with_total_and_validated_paging() {
    let app = spawn_app().await;
    let (status, empty) = app.get("/api/v1/users").await;
    assert_eq!(status, 200);
    assert_eq!(empty, json!({"users": [], "total": 0, "page": 1, "limit": 10, "next_cursor": null}));

    let mut ids = Vec::new();
    for n in 0..5 {
        ids.push(app.create_user(&unique_email(&format!("list{n}"))).await["id"].clone());
    }
    ids.reverse();

    let (status, page) = app.get("/api/v1/users?page=1&limit=2").await;
    assert_eq!(status, 200);
    assert_eq!(page["total"], 5);
    assert_eq!((page["page"].clone(), page["limit"].clone()), (json!(1), json!(2)));
    let listed: Vec<_> = page["users"].as_array().unwrap().iter().map(|u| u["id"].clone()).collect();
    assert_eq!(listed, ids[..2]);

    let (_, page3) = app.get("/api/v1/users/?page=3&limit=2").await;
    let listed: Vec<_> = page3["users"].as_array().unwrap().iter().map(|u| u["id"].clone()).collect();
    assert_eq!(listed, ids[4..]);

    assert!(page3["next_cursor"].is_null(), "the last page has no next page");

    let (_, beyond) = app.get("/api/v1/users?page=9").await;
    assert_eq!(beyond["users"], json!([]));
    assert_eq!(beyond["total"], 5);

    let cursor = page["next_cursor"].as_str().expect("a next page exists").to_owned();
    for query in
        ["page=0", "page=-1", "page=x", "limit=0", "limit=101", "limit=", "page=1.5", "cursor=", "cursor=bm9wZQ"]
            .into_iter()
            .map(str::to_owned)
            .chain([format!("cursor={cursor}&page=2")])
    {
        let (status, body) = app.get(&format!("/api/v1/users?{query}")).await;
        assert_eq!((status, error_code(&body)), (400, "validation_failed"), "{query}");
    }
}

/// Walking by `next_cursor` visits every user once, in list order, even across equal timestamps;
/// `total` follows creates and deletes.
#[tokio::test(flavor = "multi_thread")]
async fn cursor_pages_walk_every_user_once_and_total_follows_writes() {
    let app = spawn_app().await;
    let mut created = Vec::new();
    for n in 0..7 {
        created.push(app.create_user(&unique_email(&format!("walk{n}"))).await["id"].as_str().unwrap().to_owned());
    }
    // Three users share one timestamp: the cursor must break the tie by id, neither skipping nor repeating.
    let mut conn = testkit::connect(&app.config.database.name).await;
    diesel_async::RunQueryDsl::execute(
        diesel::sql_query(format!(
            "UPDATE users SET created_at = '2026-01-01T00:00:00Z' WHERE id IN ('{}', '{}', '{}')",
            created[1], created[2], created[3]
        )),
        &mut conn,
    )
    .await
    .unwrap();
    let (_, everything) = app.get("/api/v1/users?limit=100").await;
    let expected: Vec<String> =
        everything["users"].as_array().unwrap().iter().map(|u| u["id"].as_str().unwrap().to_owned()).collect();
    assert_eq!(expected.len(), 7);

    let mut walked = Vec::new();
    let mut query = "limit=2".to_owned();
    loop {
        let (status, page) = app.get(&format!("/api/v1/users?{query}")).await;
        assert_eq!(status, 200, "{page}");
        assert_eq!(page["total"], 7);
        walked.extend(page["users"].as_array().unwrap().iter().map(|u| u["id"].as_str().unwrap().to_owned()));
        match page["next_cursor"].as_str() {
            Some(cursor) => {
                assert!(page.get("page").is_none() || query == "limit=2", "a cursor page has no page number: {page}");
                query = format!("cursor={cursor}&limit=2");
            }
            None => break,
        }
    }
    assert_eq!(walked, expected);

    assert_eq!(app.delete(&format!("/api/v1/users/{}", created[0])).await, 204);
    let (_, after_delete) = app.get("/api/v1/users").await;
    assert_eq!(after_delete["total"], 6);
}

#[tokio::test(flavor = "multi_thread")]
async fn list_tie_break_is_id_desc_for_equal_timestamps() {
    let app = spawn_app().await;
    let a = app.create_user(&unique_email("tie-a")).await;
    let b = app.create_user(&unique_email("tie-b")).await;
    // Force equal created_at directly in the database, then the id decides.
    let mut conn = testkit::connect(&app.config.database.name).await;
    diesel_async::RunQueryDsl::execute(
        diesel::sql_query("UPDATE users SET created_at = '2026-01-01T00:00:00Z'"),
        &mut conn,
    )
    .await
    .unwrap();
    let (_, page) = app.get("/api/v1/users").await;
    let mut expected = [a["id"].as_str().unwrap().to_owned(), b["id"].as_str().unwrap().to_owned()];
    expected.sort();
    expected.reverse();
    let listed: Vec<_> =
        page["users"].as_array().unwrap().iter().map(|u| u["id"].as_str().unwrap().to_owned()).collect();
    assert_eq!(listed, expected);
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_puts_on_different_fields_both_survive() {
    let app = spawn_app().await;
    let user = app.create_user(&unique_email("concurrent")).await;
    let path = format!("/api/v1/users/{}", user["id"].as_str().unwrap());
    for round in 0..40 {
        let first = format!("First{round}");
        let last = format!("Last{round}");
        let (a, b) =
            tokio::join!(app.put(&path, json!({"first_name": first})), app.put(&path, json!({"last_name": last})));
        assert_eq!((a.0, b.0), (200, 200));
        let (_, stored) = app.get(&path).await;
        assert_eq!(
            (stored["first_name"].as_str(), stored["last_name"].as_str()),
            (Some(first.as_str()), Some(last.as_str())),
            "round {round}"
        );
    }
}
