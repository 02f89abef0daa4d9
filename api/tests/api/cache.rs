//! The Redis cache: never stale after a write returns (SPEC §3), never fatal when Redis misbehaves.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use api::cache::{Lookup, UserCache};
use bytes::Bytes;
use serde_json::json;
use tokio::net::TcpListener;
use uuid::Uuid;

use crate::helpers::{closed_port, spawn_app, spawn_app_with, spawn_replica, unique_email};

#[tokio::test(flavor = "multi_thread")]
async fn an_older_version_never_replaces_a_newer_entry_or_tombstone() {
    let app = spawn_app().await;
    // This test is about version order, not timeouts: a write that overran the production timeout on
    // a loaded machine would (correctly) turn into a background retry and a miss, so give Redis time.
    let mut redis = app.config.redis.clone();
    redis.timeout = Duration::from_secs(10);
    let client = api::redis_client::RedisClient::new(&redis).unwrap();
    let cache = UserCache::new(client, &redis, api::metrics::ApiMetrics::new().cache.clone());
    let id = Uuid::new_v4();
    cache.store(id, 2, Bytes::from_static(b"{\"v\":2}")).await;
    cache.store(id, 1, Bytes::from_static(b"{\"v\":1}")).await;
    assert_eq!(cache.get(id).await, Lookup::Hit(Bytes::from_static(b"{\"v\":2}")));

    cache.store_deleted(id, 2).await;
    cache.store(id, 2, Bytes::from_static(b"{\"v\":2}")).await;
    assert_eq!(cache.get(id).await, Lookup::Deleted);

    // A fill (the GET-miss path) is held to the same rule...
    let fill = cache.fill(id, 1, Bytes::from_static(b"{\"v\":1}"), Instant::now());
    fill.expect("a fill was started").await.unwrap();
    assert_eq!(cache.get(id).await, Lookup::Deleted);
    // ...and lands where nothing newer is.
    let fresh = Uuid::new_v4();
    cache.fill(fresh, 1, Bytes::from_static(b"{\"v\":1}"), Instant::now()).expect("started").await.unwrap();
    assert_eq!(cache.get(fresh).await, Lookup::Hit(Bytes::from_static(b"{\"v\":1}")));
}

/// GETs hammer two replicas (missing, reading PostgreSQL, filling the cache) while a third client
/// updates and deletes through one of them: once a write has returned, no replica serves the old state.
#[tokio::test(flavor = "multi_thread")]
async fn no_stale_read_after_put_or_delete_under_racing_gets() {
    let a = spawn_app().await;
    let b = spawn_replica(&a).await;
    let replicas = Arc::new([a, b]);
    for round in 0..30 {
        let user = replicas[0].create_user(&unique_email(&format!("race{round}"))).await;
        let path = format!("/api/v1/users/{}", user["id"].as_str().unwrap());
        let stop = Arc::new(AtomicBool::new(false));
        let mut hammers = Vec::new();
        for worker in 0..4 {
            let (replicas, path, stop) = (Arc::clone(&replicas), path.clone(), Arc::clone(&stop));
            hammers.push(tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    replicas[worker % 2].get(&path).await;
                }
            }));
        }
        for version in 0..5 {
            let name = format!("R{round}V{version}");
            let (status, _) = replicas[round % 2].put(&path, json!({"first_name": name})).await;
            assert_eq!(status, 200);
            for replica in replicas.iter() {
                let (status, seen) = replica.get(&path).await;
                assert_eq!((status, seen["first_name"].as_str()), (200, Some(name.as_str())), "stale read after PUT");
            }
        }
        assert_eq!(replicas[round % 2].delete(&path).await, 204);
        for replica in replicas.iter() {
            assert_eq!(replica.get(&path).await.0, 404, "stale read after DELETE");
        }
        stop.store(true, Ordering::Relaxed);
        for hammer in hammers {
            hammer.await.unwrap();
        }
        for replica in replicas.iter() {
            assert_eq!(replica.get(&path).await.0, 404, "a racing GET resurrected a deleted user");
        }
    }
}

async fn exercise_every_endpoint(app: &crate::helpers::TestApp) {
    let started = Instant::now();
    let user = app.create_user(&unique_email("redis-down")).await;
    let path = format!("/api/v1/users/{}", user["id"].as_str().unwrap());
    for _ in 0..3 {
        assert_eq!(app.get(&path).await, (200, user.clone()));
    }
    let (status, updated) = app.put(&path, json!({"last_name": "Changed"})).await;
    assert_eq!(status, 200);
    assert_eq!(app.get(&path).await, (200, updated));
    assert_eq!(app.get("/api/v1/users").await.0, 200);
    assert_eq!(app.delete(&path).await, 204);
    assert_eq!(app.get(&path).await.0, 404);
    let (status, health) = app.get("/health").await;
    assert_eq!((status, health["status"].as_str()), (200, Some("degraded")), "{health}");
    assert_eq!(health["checks"]["redis"]["status"], "down");
    assert_eq!(app.get("/health/ready").await.0, 200);
    assert!(started.elapsed() < Duration::from_secs(5), "Redis trouble slowed requests: {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_down_never_fails_a_request() {
    let port = closed_port().to_string();
    let app = spawn_app_with(&[("REDIS_PORT", &port)]).await;
    exercise_every_endpoint(&app).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn hung_redis_never_stalls_a_request() {
    // Accepts connections and never answers.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port().to_string();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    // The rate limiter's Redis calls hang too: it must fall back to limiting locally just as fast.
    let app = spawn_app_with(&[("REDIS_PORT", &port), ("REDIS_TIMEOUT_MS", "100"), ("RATE_LIMIT_RPS", "1000")]).await;
    exercise_every_endpoint(&app).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn cache_can_be_turned_off() {
    let app = spawn_app_with(&[("CACHE_TTL", "0")]).await;
    let user = app.create_user(&unique_email("nocache")).await;
    let path = format!("/api/v1/users/{}", user["id"].as_str().unwrap());
    assert_eq!(app.get(&path).await, (200, user));
    let (_, health) = app.get("/health").await;
    assert_eq!(
        (health["status"].as_str(), health["checks"]["redis"]["status"].as_str()),
        (Some("healthy"), Some("disabled"))
    );
}

/// Redis cut and restored: a write that could not update the cache while Redis was away still reaches
/// it afterwards (the connections the cut broke are replaced, not kept forever), so a replica that
/// reads Redis after the outage never gets the state before that write.
#[tokio::test(flavor = "multi_thread")]
async fn after_a_redis_outage_the_writes_it_missed_still_reach_the_cache() {
    let proxy = redis_proxy().await;
    let writer = spawn_app_with(&[("REDIS_PORT", &proxy.addr().port().to_string())]).await;
    let user = writer.create_user(&unique_email("outage")).await;
    let path = format!("/api/v1/users/{}", user["id"].as_str().unwrap());
    // The writer holds an established Redis connection, and Redis holds the user, when the cut comes.
    assert_eq!(writer.get(&path).await.0, 200);
    let redis = api::redis_client::RedisClient::new(&writer.config.redis).unwrap();
    let key = format!("{}user:{}", writer.config.redis.key_prefix, user["id"].as_str().unwrap());
    testkit::eventually("the fill in Redis", Duration::from_secs(5), || async {
        let key = key.clone();
        let entry = redis.call("GET", |mut conn| async move {
            redis::cmd("GET").arg(key).query_async::<Option<Vec<u8>>>(&mut conn).await
        });
        entry.await.ok().flatten().map(drop)
    })
    .await;

    proxy.cut();
    let (status, _) = writer.put(&path, json!({"first_name": "DuringOutage"})).await;
    assert_eq!(status, 200, "a write succeeds without Redis");
    proxy.restore();
    // The writer's background retry lands the write it could not make during the outage.
    testkit::eventually("the missed write in Redis", Duration::from_secs(10), || async {
        let key = key.clone();
        let entry = redis.call("GET", |mut conn| async move {
            redis::cmd("GET").arg(key).query_async::<Option<Vec<u8>>>(&mut conn).await
        });
        let entry = entry.await.ok().flatten()?;
        String::from_utf8_lossy(&entry).contains("DuringOutage").then_some(())
    })
    .await;

    // A replica that never saw the outage (e.g. started after it) trusts Redis at once.
    let reader = spawn_replica(&writer).await;
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        let (status, seen) = reader.get(&path).await;
        assert_eq!((status, seen["first_name"].as_str()), (200, Some("DuringOutage")), "stale read after the outage");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Redis cut and restored again and again under reads and writes on two replicas: no request fails,
/// and no read right after a write shows the state before it.
#[tokio::test(flavor = "multi_thread")]
async fn with_redis_flapping_no_request_fails_and_no_read_is_stale() {
    let proxy = Arc::new(redis_proxy().await);
    let a = spawn_app_with(&[("REDIS_PORT", &proxy.addr().port().to_string())]).await;
    let b = spawn_replica(&a).await;
    let flapping = Arc::new(AtomicBool::new(true));
    let flapper = {
        let (proxy, flapping) = (Arc::clone(&proxy), Arc::clone(&flapping));
        tokio::spawn(async move {
            let mut cuts = 0;
            while flapping.load(Ordering::Relaxed) {
                proxy.cut();
                tokio::time::sleep(Duration::from_millis(300)).await;
                proxy.restore();
                tokio::time::sleep(Duration::from_millis(700)).await;
                cuts += 1;
            }
            cuts
        })
    };
    let started = Instant::now();
    let mut writes = 0;
    while started.elapsed() < Duration::from_secs(6) {
        let user = a.create_user(&unique_email("flap")).await;
        let path = format!("/api/v1/users/{}", user["id"].as_str().unwrap());
        for version in 0..5 {
            for replica in [&a, &b] {
                let (status, _) = replica.get(&path).await; // fills the cache when Redis is there
                assert_eq!(status, 200);
            }
            let name = format!("V{writes}x{version}");
            let (status, _) = [&a, &b][version % 2].put(&path, json!({"first_name": name})).await;
            assert_eq!(status, 200, "a write failed because of Redis");
            writes += 1;
            for replica in [&a, &b] {
                let (status, seen) = replica.get(&path).await;
                assert_eq!((status, seen["first_name"].as_str()), (200, Some(name.as_str())), "stale read");
            }
        }
    }
    flapping.store(false, Ordering::Relaxed);
    let cuts = flapper.await.unwrap();
    assert!(cuts >= 4 && writes >= 20, "{cuts} cuts, {writes} writes");
}

/// A fault proxy in front of the test Redis.
pub async fn redis_proxy() -> testkit::FaultProxy {
    let redis = testkit::service_vars();
    testkit::FaultProxy::in_front_of(&format!("{}:{}", redis["REDIS_HOST"], redis["REDIS_PORT"])).await
}
