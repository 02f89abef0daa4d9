//! The reference server: the ceilings the api is measured against in `bench/run`, on the same stack
//! (hyper 1 + hyper-util, one runtime) doing the least possible work per route:
//!
//! - `GET /static`: a constant ~200-byte JSON body (the HTTP ceiling);
//! - `GET /redis/{id}`: one Redis `GET` of the api's cache key over one shared multiplexed connection;
//! - `GET /pg/{id}`: one prepared primary-key `SELECT` over tokio-postgres (connections round-robin);
//! - `POST /echo`: parses a user-shaped JSON body and answers 201.
//!
//! Configuration: `REF_PORT`, `REF_PG` (a libpq connection string), `REF_PG_CONNECTIONS`,
//! `REDIS_URL`, `REDIS_KEY_PREFIX`.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio_postgres::{Client, NoTls, Statement};

const STATIC_BODY: &str = r#"{"id":"0192c5a5-0000-7000-8000-000000000000","email":"reference@example.com","first_name":"Reference","last_name":"Server","created_at":"2026-01-01T00:00:00.000000Z","updated_at":"2026-01-01T00:00:00.000000Z"}"#;

struct State {
    redis: redis::aio::MultiplexedConnection,
    key_prefix: String,
    postgres: Vec<(Client, Statement)>,
    next: AtomicUsize,
}

#[derive(Deserialize)]
#[expect(dead_code, reason = "parsed to measure parsing, not used")]
struct NewUser {
    email: String,
    first_name: String,
    last_name: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let var = |name: &str, default: &str| std::env::var(name).unwrap_or_else(|_| default.to_owned());
    let redis =
        redis::Client::open(var("REDIS_URL", "redis://127.0.0.1:6379"))?.get_multiplexed_async_connection().await?;
    let mut postgres = Vec::new();
    for _ in 0..var("REF_PG_CONNECTIONS", "16").parse::<usize>()? {
        let (client, connection) =
            tokio_postgres::connect(&var("REF_PG", "host=127.0.0.1 user=postgres"), NoTls).await?;
        tokio::spawn(connection);
        let statement = client
            .prepare(
                "SELECT id, email, first_name, last_name, version, created_at, updated_at FROM users WHERE id = $1",
            )
            .await?;
        postgres.push((client, statement));
    }
    let state =
        Arc::new(State { redis, key_prefix: var("REDIS_KEY_PREFIX", "hlms:"), postgres, next: AtomicUsize::new(0) });
    let listener = TcpListener::bind(("127.0.0.1", var("REF_PORT", "18000").parse::<u16>()?)).await?;
    let builder = auto::Builder::new(TokioExecutor::new());
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let state = Arc::clone(&state);
        let service = service_fn(move |request| {
            let state = Arc::clone(&state);
            async move { Ok::<_, Infallible>(route(&state, request).await) }
        });
        let connection = builder.serve_connection(TokioIo::new(stream), service).into_owned();
        tokio::spawn(connection);
    }
}

async fn route(state: &State, request: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = request.uri().path().to_owned();
    match (request.method(), path.as_str()) {
        (&Method::GET, "/static") => json(StatusCode::OK, Bytes::from_static(STATIC_BODY.as_bytes())),
        (&Method::GET, p) if p.starts_with("/redis/") => {
            let key = format!("{}user:{}", state.key_prefix, &p["/redis/".len()..]);
            let mut redis = state.redis.clone();
            match redis::cmd("GET").arg(key).query_async::<Option<Vec<u8>>>(&mut redis).await {
                Ok(Some(value)) => json(StatusCode::OK, Bytes::from(value)),
                Ok(None) => json(StatusCode::NOT_FOUND, Bytes::from_static(b"{}")),
                Err(_) => json(StatusCode::SERVICE_UNAVAILABLE, Bytes::from_static(b"{}")),
            }
        }
        (&Method::GET, p) if p.starts_with("/pg/") => {
            let Ok(id) = uuid::Uuid::parse_str(&p["/pg/".len()..]) else {
                return json(StatusCode::BAD_REQUEST, Bytes::from_static(b"{}"));
            };
            let (client, statement) =
                &state.postgres[state.next.fetch_add(1, Ordering::Relaxed) % state.postgres.len()];
            match client.query_opt(statement, &[&id]).await {
                Ok(Some(row)) => {
                    let created: chrono::DateTime<chrono::Utc> = row.get(5);
                    let updated: chrono::DateTime<chrono::Utc> = row.get(6);
                    let body = serde_json::json!({
                        "id": row.get::<_, uuid::Uuid>(0), "email": row.get::<_, String>(1),
                        "first_name": row.get::<_, String>(2), "last_name": row.get::<_, String>(3),
                        "created_at": created.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
                        "updated_at": updated.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
                    });
                    json(StatusCode::OK, Bytes::from(body.to_string()))
                }
                Ok(None) => json(StatusCode::NOT_FOUND, Bytes::from_static(b"{}")),
                Err(_) => json(StatusCode::SERVICE_UNAVAILABLE, Bytes::from_static(b"{}")),
            }
        }
        (&Method::POST, "/echo") => match Limited::new(request.into_body(), 1 << 20).collect().await {
            Ok(body) => match serde_json::from_slice::<NewUser>(&body.to_bytes()) {
                Ok(_) => json(StatusCode::CREATED, Bytes::from_static(STATIC_BODY.as_bytes())),
                Err(_) => json(StatusCode::BAD_REQUEST, Bytes::from_static(b"{}")),
            },
            Err(_) => json(StatusCode::BAD_REQUEST, Bytes::from_static(b"{}")),
        },
        _ => json(StatusCode::NOT_FOUND, Bytes::from_static(b"{}")),
    }
}

fn json(status: StatusCode, body: Bytes) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static("application/json"));
    response
}
