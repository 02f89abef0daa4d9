//! Bearer tokens (SPEC §8) against the real app: keys made here, a real JWKS server that rotates,
//! hangs and returns garbage, and every hostile token we could think of getting a clean 4xx.

use std::time::Duration;

use jsonwebtoken::{Algorithm, Header};
use serde_json::{Value, json};
use testkit::auth::{ALL_SCOPES, Behaviour, JwksServer, SigningKey, jwks, now};

use crate::helpers::{TestApp, error_code, spawn_app_unready, spawn_app_with};

/// A plain client: no default token.
fn client() -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap()
}

/// GET `path` with these `Authorization` values (none, one, or several).
async fn get_with(app: &TestApp, path: &str, authorizations: &[&str]) -> (u16, String, Value) {
    let mut request = client().get(app.url(path));
    for value in authorizations {
        request = request.header("authorization", *value);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let challenge = response.headers().get("www-authenticate").map(|v| v.to_str().unwrap().to_owned());
    (status, challenge.unwrap_or_default(), response.json().await.unwrap_or(Value::Null))
}

async fn get_bearer(app: &TestApp, path: &str, token: &str) -> (u16, String, Value) {
    get_with(app, path, &[&format!("Bearer {token}")]).await
}

const UNAUTHORIZED: &str = r#"Bearer realm="highload-microservice""#;
const INVALID: &str = r#"Bearer error="invalid_token""#;

/// One issuer with one key of each accepted algorithm behind its own JWKS server, and an api trusting it.
struct Issuer {
    keys: Vec<SigningKey>,
    server: JwksServer,
    app: TestApp,
}

impl Issuer {
    async fn start(extra: &[(&str, &str)]) -> Self {
        let keys: Vec<SigningKey> =
            [Algorithm::RS256, Algorithm::PS256, Algorithm::ES256, Algorithm::EdDSA].map(SigningKey::generate).into();
        let server = JwksServer::start(jwks(&keys.iter().collect::<Vec<_>>()));
        let mut vars = vec![("AUTH_JWKS_URL", server.url.as_str())];
        vars.extend_from_slice(extra);
        let app = spawn_app_with(&vars).await;
        Self { keys, server, app }
    }

    fn key(&self, algorithm: Algorithm) -> &SigningKey {
        self.keys.iter().find(|key| key.algorithm == algorithm).unwrap()
    }

    fn token(&self, claims: &Value) -> String {
        self.key(Algorithm::ES256).sign(claims)
    }
}

fn claims_with(changes: Value) -> Value {
    let mut claims = SigningKey::claims(ALL_SCOPES);
    for (name, value) in changes.as_object().unwrap() {
        if value.is_null() {
            claims.as_object_mut().unwrap().remove(name);
        } else {
            claims[name] = value.clone();
        }
    }
    claims
}

fn base64url(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

#[tokio::test(flavor = "multi_thread")]
async fn every_accepted_algorithm_works_and_the_client_is_known() {
    let issuer = Issuer::start(&[]).await;
    for key in &issuer.keys {
        let (status, _, body) =
            get_bearer(&issuer.app, "/api/v1/users", &key.sign(&SigningKey::claims("users:read"))).await;
        assert_eq!(status, 200, "{:?}: {body}", key.algorithm);
    }
    // `scp` as an array, and `sub` when there is no `client_id`.
    let token = issuer.token(&claims_with(json!({"scope": null, "client_id": null, "scp": ["users:read"]})));
    assert_eq!(get_bearer(&issuer.app, "/api/v1/users", &token).await.0, 200);
    // `scp` as a space-separated string, and an empty `client_id` beside a `sub`.
    let token = issuer.token(&claims_with(json!({"scope": null, "client_id": "", "scp": "events:read users:read"})));
    assert_eq!(get_bearer(&issuer.app, "/api/v1/users", &token).await.0, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn missing_or_malformed_credentials_are_401_unauthorized() {
    let issuer = Issuer::start(&[]).await;
    let app = &issuer.app;
    let good = issuer.token(&SigningKey::claims(ALL_SCOPES));
    let huge = format!("Bearer {}", "a".repeat(64 * 1024));
    let cases: Vec<(&str, Vec<String>)> = vec![
        ("no header", vec![]),
        ("another scheme", vec!["Basic dXNlcjpwYXNzd29yZA==".into()]),
        ("no token", vec!["Bearer".into()]),
        ("not base64 at all", vec!["Bearer !!!not-a-token!!!".into()]),
        ("two headers", vec![format!("Bearer {good}"), format!("Bearer {good}")]),
        ("a 64 KiB header", vec![huge]),
    ];
    for (case, headers) in cases {
        let headers: Vec<&str> = headers.iter().map(String::as_str).collect();
        let (status, challenge, body) = get_with(app, "/api/v1/users", &headers).await;
        assert_eq!((status, challenge.as_str(), error_code(&body)), (401, UNAUTHORIZED, "unauthorized"), "{case}");
    }
    // A token in the query string is refused, alone or beside a good header.
    let path = format!("/api/v1/users?access_token={good}");
    let (status, challenge, body) = get_with(app, &path, &[]).await;
    assert_eq!((status, challenge.as_str(), error_code(&body)), (401, UNAUTHORIZED, "unauthorized"));
    assert_eq!(get_bearer(app, &path, &good).await.0, 401);
    // Probes, metrics and the OpenAPI document need nothing.
    for path in ["/health/live", "/health/ready", "/health", "/metrics", "/openapi.json"] {
        assert_eq!(client().get(app.url(path)).send().await.unwrap().status(), 200, "{path}");
    }
}

/// `auth_rejections_total` by reason, read from `/metrics`.
async fn rejections(app: &TestApp) -> std::collections::HashMap<String, u64> {
    let metrics = client().get(app.url("/metrics")).send().await.unwrap().text().await.unwrap();
    metrics
        .lines()
        .filter_map(|line| line.strip_prefix("auth_rejections_total{reason=\""))
        .filter_map(|rest| rest.split_once("\"} "))
        .map(|(reason, count)| (reason.to_owned(), count.parse().unwrap()))
        .collect()
}

/// The token with one character of its signature changed (still valid base64url).
fn flip_signature(token: &str) -> String {
    let (message, signature) = token.rsplit_once('.').unwrap();
    let mut signature = signature.as_bytes().to_vec();
    let middle = signature.len() / 2;
    signature[middle] = if signature[middle] == b'A' { b'B' } else { b'A' };
    format!("{message}.{}", String::from_utf8(signature).unwrap())
}

#[tokio::test(flavor = "multi_thread")]
async fn tokens_that_fail_a_check_are_401_invalid_token_each_for_its_own_reason() {
    let issuer = Issuer::start(&[]).await;
    let now = now();
    let stranger = SigningKey::generate(Algorithm::ES256);
    let rsa = issuer.key(Algorithm::RS256);
    let good = issuer.token(&SigningKey::claims(ALL_SCOPES));
    let (header, payload) = {
        let parts: Vec<&str> = good.split('.').collect();
        (parts[0].to_owned(), parts[1].to_owned())
    };
    let none_header =
        base64url(json!({"alg": "none", "typ": "JWT", "kid": issuer.key(Algorithm::ES256).kid}).to_string().as_bytes());
    // Algorithm confusion: HS256 with the RSA key's public JWK as the HMAC secret, naming the RSA key.
    let mut hmac_header = Header::new(Algorithm::HS256);
    hmac_header.kid = Some(rsa.kid.clone());
    let confused = jsonwebtoken::encode(
        &hmac_header,
        &SigningKey::claims(ALL_SCOPES),
        &jsonwebtoken::EncodingKey::from_secret(rsa.jwk.to_string().as_bytes()).unwrap(),
    )
    .unwrap();
    // An RSA key published for PS256 only, used with RS256.
    let mut rs256_on_pss = Header::new(Algorithm::RS256);
    rs256_on_pss.kid = Some(issuer.key(Algorithm::PS256).kid.clone());
    let tampered_claims = base64url(claims_with(json!({"client_id": "admin"})).to_string().as_bytes());
    let cases: Vec<(&str, &str, String)> = vec![
        ("expired", "expired", issuer.token(&claims_with(json!({"exp": now - 120})))),
        ("not yet valid", "not_yet_valid", issuer.token(&claims_with(json!({"nbf": now + 120})))),
        ("wrong issuer", "issuer", issuer.token(&claims_with(json!({"iss": "https://evil.example/"})))),
        ("wrong audience", "audience", issuer.token(&claims_with(json!({"aud": "another-api"})))),
        ("audience array without ours", "audience", issuer.token(&claims_with(json!({"aud": ["a", "b"]})))),
        ("no exp", "claims", issuer.token(&claims_with(json!({"exp": null})))),
        ("no client", "claims", issuer.token(&claims_with(json!({"client_id": null, "sub": null})))),
        ("unknown kid", "unknown_key", stranger.sign(&SigningKey::claims(ALL_SCOPES))),
        ("alg none", "malformed", format!("{none_header}.{payload}.")),
        ("HMAC with the RSA public key", "algorithm", confused),
        (
            "RS256 on a PS256 key",
            "algorithm",
            issuer.key(Algorithm::PS256).sign_with(&rs256_on_pss, &SigningKey::claims(ALL_SCOPES)),
        ),
        ("one signature character changed", "signature", flip_signature(&good)),
        (
            "claims changed after signing",
            "signature",
            format!("{header}.{tampered_claims}.{}", good.rsplit('.').next().unwrap()),
        ),
        ("truncated inside the claims", "malformed", good[..header.len() + 1 + payload.len() / 2].to_owned()),
        ("not base64url", "malformed", "a+b/c.d~e.f".to_owned()),
        ("header not JSON", "malformed", format!("{}.{payload}.sig", base64url(b"not json"))),
    ];
    for (case, reason, token) in cases {
        let before = rejections(&issuer.app).await.get(reason).copied().unwrap_or(0);
        let (status, challenge, body) = get_bearer(&issuer.app, "/api/v1/users", &token).await;
        assert_eq!((status, challenge.as_str(), error_code(&body)), (401, INVALID, "invalid_token"), "{case}: {body}");
        let after = rejections(&issuer.app).await.get(reason).copied().unwrap_or(0);
        assert_eq!(after, before + 1, "{case}: not rejected for {reason}: {:?}", rejections(&issuer.app).await);
    }
    // Clock skew: 10 s past `exp` is inside the default 30 s.
    let lately_expired = issuer.token(&claims_with(json!({"exp": now - 10})));
    assert_eq!(get_bearer(&issuer.app, "/api/v1/users", &lately_expired).await.0, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_remembered_token_is_refused_once_it_expires() {
    let issuer = Issuer::start(&[("AUTH_CLOCK_SKEW", "0")]).await;
    let token = issuer.token(&claims_with(json!({"exp": now() + 2})));
    assert_eq!(get_bearer(&issuer.app, "/api/v1/users", &token).await.0, 200);
    assert_eq!(get_bearer(&issuer.app, "/api/v1/users", &token).await.0, 200);
    testkit::eventually("the remembered token to expire", Duration::from_secs(10), || async {
        let (status, _, body) = get_bearer(&issuer.app, "/api/v1/users", &token).await;
        (status == 401).then(|| assert_eq!(error_code(&body), "invalid_token"))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_kids_while_the_jwks_server_hangs_delay_nobody_else() {
    let issuer = Issuer::start(&[]).await;
    let app = &issuer.app;
    let good = issuer.token(&SigningKey::claims(ALL_SCOPES));
    issuer.server.set(Behaviour::Hang);
    let forged: Vec<String> =
        (0..20).map(|_| SigningKey::generate(Algorithm::EdDSA).sign(&SigningKey::claims(ALL_SCOPES))).collect();
    let started = std::time::Instant::now();
    let attempts = forged.iter().map(|token| get_bearer(app, "/api/v1/users", token));
    let statuses: Vec<u16> = futures_util::future::join_all(attempts).await.into_iter().map(|(s, _, _)| s).collect();
    let forged_took = started.elapsed();
    let started = std::time::Instant::now();
    assert_eq!(get_bearer(app, "/api/v1/users", &good).await.0, 200);
    let good_took = started.elapsed();
    eprintln!("20 unknown kids against a hanging JWKS server: {forged_took:?}; a valid token then: {good_took:?}");
    assert!(statuses.iter().all(|status| *status == 401), "{statuses:?}");
    // Each waits at most about a second for the refresh, never the server's 5 s fetch timeout.
    assert!(forged_took < Duration::from_secs(4), "{forged_took:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_token_without_the_routes_scope_is_403_naming_the_scope() {
    let issuer = Issuer::start(&[]).await;
    let app = &issuer.app;
    let reader = issuer.token(&SigningKey::claims("users:read events:read"));
    let response = client()
        .post(app.url("/api/v1/users"))
        .bearer_auth(&reader)
        .json(&json!({"email": "a@example.com", "first_name": "A", "last_name": "B"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 403);
    assert_eq!(response.headers()["www-authenticate"], r#"Bearer error="insufficient_scope", scope="users:write""#);
    assert_eq!(error_code(&response.json().await.unwrap()), "insufficient_scope");
    let (status, challenge, _) =
        get_bearer(app, "/api/v1/events", &issuer.token(&SigningKey::claims("users:read"))).await;
    assert_eq!((status, challenge.as_str()), (403, r#"Bearer error="insufficient_scope", scope="events:read""#));
    assert_eq!(get_bearer(app, "/api/v1/users", &issuer.token(&SigningKey::claims(""))).await.0, 403);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rotated_key_is_picked_up_without_a_restart_and_made_up_kids_cannot_flood_the_issuer() {
    let issuer = Issuer::start(&[]).await;
    let app = &issuer.app;
    let next = SigningKey::generate(Algorithm::ES256);
    let token = next.sign(&SigningKey::claims(ALL_SCOPES));
    // The issuer starts publishing the new key: the first token naming it makes the api look again.
    issuer.server.set(Behaviour::Serve(jwks(&issuer.keys.iter().chain([&next]).collect::<Vec<_>>())));
    assert_eq!(get_bearer(app, "/api/v1/users", &token).await.0, 200);
    // Many made-up kids in a burst cause at most one more fetch (one per 10 s).
    let fetched = issuer.server.requests();
    for _ in 0..30 {
        let forged = SigningKey::generate(Algorithm::EdDSA).sign(&SigningKey::claims(ALL_SCOPES));
        assert_eq!(get_bearer(app, "/api/v1/users", &forged).await.0, 401);
    }
    assert!(
        issuer.server.requests() <= fetched + 1,
        "{} fetches for 30 unknown kids",
        issuer.server.requests() - fetched
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_key_removed_from_the_set_stops_working_at_the_next_refresh() {
    let issuer = Issuer::start(&[("AUTH_JWKS_REFRESH", "1")]).await;
    let token = issuer.token(&SigningKey::claims(ALL_SCOPES));
    assert_eq!(get_bearer(&issuer.app, "/api/v1/users", &token).await.0, 200);
    let rest: Vec<&SigningKey> = issuer.keys.iter().filter(|key| key.algorithm != Algorithm::ES256).collect();
    issuer.server.set(Behaviour::Serve(jwks(&rest)));
    testkit::eventually("the removed key to be refused", Duration::from_secs(10), || async {
        (get_bearer(&issuer.app, "/api/v1/users", &token).await.0 == 401).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_jwks_server_that_hangs_fails_or_returns_garbage_later_changes_nothing_for_valid_tokens() {
    let issuer = Issuer::start(&[("AUTH_JWKS_REFRESH", "1")]).await;
    let app = &issuer.app;
    let token = issuer.token(&SigningKey::claims(ALL_SCOPES));
    for behaviour in
        [Behaviour::Garbage, Behaviour::Status(500), Behaviour::Serve(r#"{"keys": []}"#.into()), Behaviour::Hang]
    {
        issuer.server.set(behaviour);
        let seen = issuer.server.requests();
        testkit::eventually("a refresh against the broken server", Duration::from_secs(10), || async {
            (issuer.server.requests() > seen).then_some(())
        })
        .await;
        assert_eq!(get_bearer(app, "/api/v1/users", &token).await.0, 200);
        // A fresh token (not remembered) still verifies against the last good set.
        let fresh = issuer.key(Algorithm::RS256).sign(&claims_with(json!({"jti": testkit::unique()})));
        assert_eq!(get_bearer(app, "/api/v1/users", &fresh).await.0, 200);
        assert_eq!(client().get(app.url("/health/ready")).send().await.unwrap().status(), 200);
    }
    // Garbage and errors are reported as a stale key set: degraded, still serving.
    issuer.server.set(Behaviour::Garbage);
    let health = testkit::eventually("/health to report the stale key set", Duration::from_secs(15), || async {
        let health: Value = client().get(app.url("/health")).send().await.ok()?.json().await.ok()?;
        (health["checks"]["jwks"]["status"] == "stale").then_some(health)
    })
    .await;
    assert_eq!(health["auth"], "jwt");
    assert_eq!(health["status"], "degraded", "{health}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_api_is_not_ready_until_a_key_set_is_loaded() {
    let key = SigningKey::generate(Algorithm::ES256);
    let server = JwksServer::start(jwks(&[&key]));
    server.set(Behaviour::Hang);
    let app = spawn_app_unready(&[("AUTH_JWKS_URL", &server.url)]).await;
    let ready = client().get(app.url("/health/ready")).send().await.unwrap();
    assert_eq!(ready.status(), 503);
    let (status, _, body) = get_bearer(&app, "/api/v1/users", &key.sign(&SigningKey::claims(ALL_SCOPES))).await;
    assert_eq!((status, error_code(&body)), (503, "service_unavailable"));
    server.set(Behaviour::Serve(jwks(&[&key])));
    testkit::eventually("readiness once the JWKS loads", Duration::from_secs(15), || async {
        (client().get(app.url("/health/ready")).send().await.ok()?.status() == 200).then_some(())
    })
    .await;
    assert_eq!(get_bearer(&app, "/api/v1/users", &key.sign(&SigningKey::claims(ALL_SCOPES))).await.0, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_jwks_file_works_like_a_url() {
    let key = SigningKey::generate(Algorithm::EdDSA);
    let path = std::env::temp_dir().join(format!("jwks-{}.json", testkit::unique()));
    std::fs::write(&path, jwks(&[&key])).unwrap();
    let app = spawn_app_with(&[("AUTH_JWKS_URL", ""), ("AUTH_JWKS_FILE", path.to_str().unwrap())]).await;
    assert_eq!(get_bearer(&app, "/api/v1/users", &key.sign(&SigningKey::claims(ALL_SCOPES))).await.0, 200);
    std::fs::remove_file(path).unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn auth_mode_none_opens_every_route_and_says_so() {
    let app = spawn_app_with(&[("AUTH_MODE", "none")]).await;
    assert_eq!(get_with(&app, "/api/v1/users", &[]).await.0, 200);
    let health: Value = client().get(app.url("/health")).send().await.unwrap().json().await.unwrap();
    assert_eq!(health["auth"], "disabled");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_jwks_that_is_garbage_or_a_redirect_at_start_leaves_the_api_unready() {
    let key = SigningKey::generate(Algorithm::ES256);
    let elsewhere = JwksServer::start(jwks(&[&key]));
    for behaviour in [Behaviour::Garbage, Behaviour::Redirect(elsewhere.url.clone())] {
        let server = JwksServer::start(String::new());
        server.set(behaviour);
        let app = spawn_app_unready(&[("AUTH_JWKS_URL", &server.url)]).await;
        testkit::eventually("a load attempt", Duration::from_secs(10), || async {
            (server.requests() > 0).then_some(())
        })
        .await;
        let health: Value = client().get(app.url("/health")).send().await.unwrap().json().await.unwrap();
        assert_eq!(health["checks"]["jwks"]["status"], "down", "{health}");
        assert_eq!(client().get(app.url("/health/ready")).send().await.unwrap().status(), 503);
        let token = key.sign(&SigningKey::claims(ALL_SCOPES));
        assert_eq!(get_bearer(&app, "/api/v1/users", &token).await.0, 503);
    }
    assert_eq!(elsewhere.requests(), 0, "the redirect was followed");
}
