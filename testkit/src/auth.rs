//! A real token issuer for tests: keys generated in the test process, tokens signed with them, and a
//! JWKS served over HTTP by a real server that a test can rotate, break, or make hang.

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, Ed25519KeyPair};
use base64::Engine;
use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

/// The issuer every test api trusts (`AUTH_ISSUER`).
pub const ISSUER: &str = "https://issuer.test.invalid/";
/// The audience every test api expects (`AUTH_AUDIENCE`).
pub const AUDIENCE: &str = "highload-microservice-test";
/// The client the shared issuer's tokens name.
pub const CLIENT_ID: &str = "test-client";
/// Every scope the api knows.
pub const ALL_SCOPES: &str = "users:read users:write events:read events:write";

/// A private key, its id and its public JWK.
pub struct SigningKey {
    /// `kid`.
    pub kid: String,
    /// What it signs with.
    pub algorithm: Algorithm,
    encoding: EncodingKey,
    /// The public half as a JWK (with `kid`, `alg` and `use`).
    pub jwk: Value,
}

impl SigningKey {
    /// A fresh key for `algorithm` (RS256 and PS256: RSA 2048; ES256: P-256; EdDSA: Ed25519).
    pub fn generate(algorithm: Algorithm) -> Self {
        let rng = SystemRandom::new();
        let encoding = match algorithm {
            Algorithm::ES256 => {
                let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
                EncodingKey::from_ec_der(pkcs8.as_ref())
            }
            Algorithm::EdDSA => EncodingKey::from_ed_der(Ed25519KeyPair::generate_pkcs8v1(&rng).unwrap().as_ref()),
            Algorithm::RS256 | Algorithm::PS256 => {
                let pair = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).unwrap();
                let pkcs8 = AsDer::<aws_lc_rs::encoding::Pkcs8V1Der>::as_der(&pair).unwrap();
                EncodingKey::from_rsa_pem(pem("PRIVATE KEY", pkcs8.as_ref()).as_bytes()).unwrap()
            }
            other => panic!("no test keys for {other:?}"),
        };
        let kid = format!("{algorithm:?}-{}", crate::unique());
        let mut jwk = serde_json::to_value(Jwk::from_encoding_key(&encoding, algorithm).unwrap()).unwrap();
        jwk["kid"] = json!(kid);
        jwk["use"] = json!("sig");
        Self { kid, algorithm, encoding, jwk }
    }

    /// A token for `claims`, signed with this key, its header naming the key.
    pub fn sign(&self, claims: &Value) -> String {
        let mut header = Header::new(self.algorithm);
        header.kid = Some(self.kid.clone());
        self.sign_with(&header, claims)
    }

    /// A token with a header of the test's choosing.
    pub fn sign_with(&self, header: &Header, claims: &Value) -> String {
        jsonwebtoken::encode(header, claims, &self.encoding).unwrap()
    }

    /// Claims that pass every check, for `scopes`, expiring in an hour.
    pub fn claims(scopes: &str) -> Value {
        let now = now();
        json!({"iss": ISSUER, "aud": AUDIENCE, "client_id": CLIENT_ID, "sub": "test-user", "scope": scopes,
               "iat": now, "nbf": now, "exp": now + 3600})
    }
}

/// Seconds since the epoch.
pub fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

/// A JWK Set document of these keys' public halves.
pub fn jwks(keys: &[&SigningKey]) -> String {
    json!({"keys": keys.iter().map(|key| key.jwk.clone()).collect::<Vec<_>>()}).to_string()
}

/// PEM text of a DER document.
fn pem(label: &str, der: &[u8]) -> String {
    let body = base64::engine::general_purpose::STANDARD.encode(der);
    let lines: Vec<&str> = body.as_bytes().chunks(64).map(|line| std::str::from_utf8(line).unwrap()).collect();
    format!("-----BEGIN {label}-----\n{}\n-----END {label}-----\n", lines.join("\n"))
}

/// What a [`JwksServer`] answers.
#[derive(Clone)]
pub enum Behaviour {
    /// 200 with this body.
    Serve(String),
    /// Accepts the request and never answers.
    Hang,
    /// 200 with a body that is not a JWK Set.
    Garbage,
    /// This status with an empty body.
    Status(u16),
    /// 302 to this location.
    Redirect(String),
}

/// A JWKS endpoint on 127.0.0.1, on a thread of its own (so it outlives any one test's runtime).
pub struct JwksServer {
    /// `http://127.0.0.1:<port>/jwks.json`.
    pub url: String,
    behaviour: Arc<Mutex<Behaviour>>,
    requests: Arc<AtomicUsize>,
}

impl JwksServer {
    /// Serves `body` until told otherwise.
    pub fn start(body: String) -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let url = format!("http://{}/jwks.json", listener.local_addr().unwrap());
        let behaviour = Arc::new(Mutex::new(Behaviour::Serve(body)));
        let requests = Arc::new(AtomicUsize::new(0));
        let (shared, counter) = (behaviour.clone(), requests.clone());
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            runtime
                .block_on(async { serve(tokio::net::TcpListener::from_std(listener).unwrap(), shared, counter).await });
        });
        Self { url, behaviour, requests }
    }

    /// Changes what the next requests get.
    pub fn set(&self, behaviour: Behaviour) {
        *self.behaviour.lock().unwrap() = behaviour;
    }

    /// Requests received so far.
    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

async fn serve(listener: tokio::net::TcpListener, behaviour: Arc<Mutex<Behaviour>>, requests: Arc<AtomicUsize>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let (behaviour, requests) = (behaviour.clone(), requests.clone());
        let service = service_fn(move |_request: Request<hyper::body::Incoming>| {
            requests.fetch_add(1, Ordering::SeqCst);
            let behaviour = behaviour.lock().unwrap().clone();
            async move {
                let (status, body, location) = match behaviour {
                    Behaviour::Serve(body) => (200, body, None),
                    Behaviour::Garbage => (200, "<html>this is not a JWK Set</html>".to_owned(), None),
                    Behaviour::Status(status) => (status, String::new(), None),
                    Behaviour::Redirect(location) => (302, String::new(), Some(location)),
                    Behaviour::Hang => std::future::pending().await,
                };
                let mut response = Response::new(Full::new(Bytes::from(body)));
                *response.status_mut() = hyper::StatusCode::from_u16(status).unwrap();
                if let Some(location) = location {
                    response.headers_mut().insert(hyper::header::LOCATION, location.parse().unwrap());
                }
                Ok::<_, Infallible>(response)
            }
        });
        tokio::spawn(async move {
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            let _ = builder.serve_connection(TokioIo::new(stream), service).await;
        });
    }
}

/// The issuer every test api trusts unless a test sets up its own: one ES256 key behind one JWKS
/// server per test process.
pub struct SharedIssuer {
    /// Its key.
    pub key: SigningKey,
    /// Its JWKS endpoint.
    pub server: JwksServer,
}

/// The process's shared issuer (started on first use).
pub fn shared_issuer() -> &'static SharedIssuer {
    static ISSUER_INSTANCE: OnceLock<SharedIssuer> = OnceLock::new();
    ISSUER_INSTANCE.get_or_init(|| {
        let key = SigningKey::generate(Algorithm::ES256);
        let server = JwksServer::start(jwks(&[&key]));
        SharedIssuer { key, server }
    })
}

/// A token of the shared issuer granting `scopes`.
pub fn token(scopes: &str) -> String {
    shared_issuer().key.sign(&SigningKey::claims(scopes))
}

/// `AUTH_*` variables that make an api trust the issuer whose JWKS is at `jwks_url`.
pub fn vars(jwks_url: &str) -> [(&'static str, String); 3] {
    [("AUTH_ISSUER", ISSUER.to_owned()), ("AUTH_AUDIENCE", AUDIENCE.to_owned()), ("AUTH_JWKS_URL", jwks_url.to_owned())]
}

/// Headers carrying `Authorization: Bearer <token>`, for a client's `default_headers`.
pub fn bearer_headers(token: &str) -> hyper::HeaderMap {
    let mut headers = hyper::HeaderMap::new();
    headers.insert(hyper::header::AUTHORIZATION, format!("Bearer {token}").parse().unwrap());
    headers
}

/// [`bearer_headers`] with a shared-issuer token granting every scope.
pub fn all_scopes_headers() -> hyper::HeaderMap {
    bearer_headers(&token(ALL_SCOPES))
}

/// Waits (up to 10 s) until the api at `base_url` has loaded its issuer's keys and finished its first
/// PostgreSQL check, whatever that check found: before, requests get 503 and readiness says nothing yet.
pub async fn wait_for_keys(base_url: &str) {
    let url = format!("{base_url}/health/ready");
    crate::eventually(
        "the api to load its JWKS and check PostgreSQL once",
        std::time::Duration::from_secs(10),
        || async {
            let body = reqwest::get(&url).await.ok()?.text().await.ok()?;
            // Ready, or not ready for a reason the test may want (PostgreSQL down): not merely starting.
            (!body.contains("JWK Set is not loaded") && !body.contains("not checked yet")).then_some(())
        },
    )
    .await;
}
