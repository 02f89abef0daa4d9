//! Configuration, read once at start from the environment (and `.env`, if present).
//!
//! Variables (defaults in brackets; durations are whole seconds unless the name ends in `_MS`):
//! - `SERVER_HOST` [0.0.0.0], `SERVER_PORT` [8080]: the api's listen address (port 0 = any free port).
//! - `HTTP_HEADER_READ_TIMEOUT` [5]: a client must send its request headers within this.
//! - `REQUEST_TIMEOUT` [10]: a request (body included) must be answered within this, else 503.
//! - `SHUTDOWN_TIMEOUT` [20]: how long in-flight work may drain after SIGTERM/SIGINT.
//! - `MAX_INFLIGHT_REQUESTS` [1024]: requests served at once; beyond, 503 + `Retry-After`.
//! - `DB_HOST` [localhost], `DB_PORT` [5432], `DB_USER` [postgres], `DB_PASSWORD` [postgres],
//!   `DB_NAME` [highload_db]: PostgreSQL, as the running binaries' role (DML only is enough).
//! - `DB_MIGRATION_USER` [= DB_USER], `DB_MIGRATION_PASSWORD` [= DB_PASSWORD; required when the
//!   users differ]: the schema's owner,
//!   used by `api migrate` (and by the api's start when `RUN_MIGRATIONS` is on).
//! - `DB_SSLMODE` [disable] (or prefer, require, verify-ca, verify-full: libpq's meanings) and
//!   `DB_SSLROOTCERT` [none]: CA bundle (PEM) the verify modes need; with `require` it verifies the
//!   chain as `verify-ca` does, as in libpq; refused with disable and prefer.
//! - `DB_POOL_MAX_SIZE` [16], `DB_POOL_MIN_IDLE` [2]: connection pool bounds.
//! - `DB_POOL_TIMEOUT_MS` [2000]: longest wait for a pooled connection before answering 503.
//! - `DB_CONNECT_TIMEOUT` [5]: TCP connect, TLS handshake and startup of one new connection.
//! - `DB_STATEMENT_TIMEOUT_MS` [5000]: PostgreSQL cancels any statement running longer.
//! - `REDIS_HOST` [localhost], `REDIS_PORT` [6379], `REDIS_USERNAME` [none: the default user],
//!   `REDIS_PASSWORD` [none; required with a user], `REDIS_DB` [0]: the cache and the rate limiter's buckets.
//! - `REDIS_TLS` [false]: TLS to Redis (as `rediss://`), the server's name always verified;
//!   `REDIS_CA_CERT` [none: the system's roots]: CA bundle (PEM) to verify it with.
//! - `REDIS_TIMEOUT_MS` [100]: longest wait for one cache operation (a dial of the one shared
//!   connection included) before the request falls back to PostgreSQL; `REDIS_KEY_PREFIX` [hlms:].
//! - `CACHE_TTL` [300]: lifetime of a cached user; 0 turns the cache off.
//! - `LOG_LEVEL` [info] (an `EnvFilter` directive, e.g. `info,api=debug`), `LOG_FORMAT` [json|text].
//! - `RUN_MIGRATIONS` [true]: `api` applies pending migrations at start, under an advisory lock.
//! - `KAFKA_BROKERS` [localhost:9092] (comma-separated), `KAFKA_TOPIC` [user-events],
//!   `KAFKA_GROUP_ID` [highload-service], `KAFKA_TOPIC_PARTITIONS` [12] and
//!   `KAFKA_REPLICATION_FACTOR` [1] (used when a binary creates missing topics).
//! - `KAFKA_SECURITY_PROTOCOL` [PLAINTEXT] (or SSL, SASL_PLAINTEXT, SASL_SSL); with SASL,
//!   `KAFKA_SASL_MECHANISM` [PLAIN] (or SCRAM-SHA-256, SCRAM-SHA-512), `KAFKA_SASL_USERNAME` and
//!   `KAFKA_SASL_PASSWORD` (required); with SSL, `KAFKA_SSL_CA_LOCATION` [none: the system's roots]:
//!   CA bundle (PEM) for the brokers' certificates, whose names are always verified.
//! - `KAFKA_SESSION_TIMEOUT_MS` [10000], `KAFKA_HEARTBEAT_INTERVAL_MS` [1000]: consumer group liveness.
//! - `KAFKA_LINGER_MS` [0]: producer batching delay; `KAFKA_MESSAGE_TIMEOUT_MS` [0 = never]: how long
//!   the producer retries a message before giving it back to the outbox relay.
//! - `KAFKA_FETCH_WAIT_MAX_MS` [20]: longest a consumer fetch waits on the broker for new messages.
//!   Kafka answers a waiting fetch as soon as data arrives; on tansu the wait shows in the delay
//!   from commit to processing (measured). Lower costs only more idle fetch requests.
//! - `EVENT_MAX_DATA_BYTES` [65536]: largest serialized `data` of an event (413 beyond).
//! - `OUTBOX_BATCH_SIZE` [500], `OUTBOX_POLL_INTERVAL_MS` [100], `OUTBOX_TAKEOVER_TIMEOUT` [10]: the
//!   api's outbox relay.
//! - `IDEMPOTENCY_TTL` [86400]: how long the api keeps the answer to a write sent with an
//!   `Idempotency-Key` (SPEC §10); 1 to 31536000 (a year).
//! - `WORKER_HTTP_PORT` [8081], `WORKER_CONCURRENCY` [16], `WORKER_MAX_RETRIES` [5],
//!   `WORKER_RETRY_BACKOFF_MS` [100], `WORKER_MAX_IN_FLIGHT` [4000]: the worker.
//! - `WORKER_MAX_IN_FLIGHT_BYTES` [67108864 = 64 MiB]: bytes of messages in flight before the worker
//!   pauses fetching, whichever of it and `WORKER_MAX_IN_FLIGHT` comes first (see
//!   [`DEFAULT_WORKER_MAX_IN_FLIGHT_BYTES`] for why this fits the worker's memory limit).
//! - `RATE_LIMIT_RPS` [0 = off], `RATE_LIMIT_BURST` [= RATE_LIMIT_RPS]: the api's per-client limit;
//!   `TRUSTED_PROXIES` [none]: comma-separated CIDRs whose `X-Forwarded-For` names the client.
//!
//! - Traces (SPEC §11), only from OpenTelemetry's standard variables: `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`
//!   (used as is) or `OTEL_EXPORTER_OTLP_ENDPOINT` (http/protobuf: `/v1/traces` appended) [none: no
//!   tracing at all]; `OTEL_EXPORTER_OTLP_PROTOCOL` (or `…_TRACES_PROTOCOL`) [http/protobuf|grpc];
//!   `OTEL_SERVICE_NAME` [highload-api, highload-worker]; `OTEL_TRACES_SAMPLER` [parentbased_always_on]
//!   and `OTEL_TRACES_SAMPLER_ARG` [1.0]; `OTEL_SDK_DISABLED` [false]. The exporter itself also honours
//!   `OTEL_EXPORTER_OTLP_HEADERS` and `…_TIMEOUT` (export is uncompressed: a compression it was not
//!   built with stops the start).
//!
//! The api alone also reads [`AuthConfig`] (SPEC §8), so the worker never needs an issuer:
//! - `AUTH_MODE` [jwt|none]; with `jwt`, `AUTH_ISSUER`, `AUTH_AUDIENCE` and one of `AUTH_JWKS_URL`
//!   (http or https) or `AUTH_JWKS_FILE` are required.
//! - `AUTH_CLOCK_SKEW` [30]: leeway on `exp` and `nbf`; `AUTH_JWKS_REFRESH` [300]: JWKS refresh period.

use std::fmt::Display;
use std::net::{IpAddr, SocketAddr};
use std::num::{NonZeroU32, NonZeroUsize};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

/// A variable that is set but cannot be used. The message names the variable.
#[derive(Debug, thiserror::Error)]
#[error("invalid value for {var}: {reason}")]
pub struct ConfigError {
    /// The variable's name.
    pub var: &'static str,
    /// Why its value was refused.
    pub reason: String,
}

/// Everything both binaries are configured with.
#[derive(Debug, Clone)]
pub struct Config {
    /// HTTP server.
    pub server: ServerConfig,
    /// PostgreSQL.
    pub database: DatabaseConfig,
    /// Redis and the user cache.
    pub redis: RedisConfig,
    /// Logging.
    pub log: LogConfig,
    /// Apply pending migrations at start.
    pub run_migrations: bool,
    /// Kafka.
    pub kafka: KafkaConfig,
    /// Events API limits.
    pub events: EventsConfig,
    /// The api's outbox relay.
    pub outbox: OutboxConfig,
    /// How long answers to requests with an `Idempotency-Key` are kept (SPEC §10).
    pub idempotency_ttl: Duration,
    /// The worker.
    pub worker: WorkerConfig,
    /// The api's per-client rate limit.
    pub rate_limit: RateLimitConfig,
    /// Trace export (SPEC §11).
    pub traces: TracesConfig,
}

/// Where and how spans are exported (SPEC §11); `export` is `None` when no endpoint is set or
/// `OTEL_SDK_DISABLED` is true: then nothing is traced at all.
#[derive(Debug, Clone, PartialEq)]
pub struct TracesConfig {
    /// The exporter, when traces are on.
    pub export: Option<TraceExport>,
}

/// An OTLP exporter's settings.
#[derive(Debug, Clone, PartialEq)]
pub struct TraceExport {
    /// The traces endpoint itself (for http/protobuf, the URL spans are POSTed to).
    pub endpoint: String,
    /// The wire protocol.
    pub protocol: OtlpProtocol,
    /// `OTEL_SERVICE_NAME`; `None`: the binary's own name (`highload-api`, `highload-worker`).
    pub service_name: Option<String>,
    /// Which traces are recorded.
    pub sampler: TraceSampler,
}

/// `OTEL_EXPORTER_OTLP_PROTOCOL`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OtlpProtocol {
    /// `http/protobuf` (the default).
    HttpProtobuf,
    /// `grpc`.
    Grpc,
}

/// `OTEL_TRACES_SAMPLER` with its argument.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TraceSampler {
    /// `parentbased_*`: a span with a parent is recorded exactly when its parent was.
    pub parent_based: bool,
    /// The share of the other traces that are recorded: 1 (`always_on`), 0 (`always_off`) or
    /// `OTEL_TRACES_SAMPLER_ARG` (`traceidratio`).
    pub ratio: f64,
}

impl TracesConfig {
    fn from_env(env: &Env<'_>) -> Result<Self, ConfigError> {
        // Every value is checked, used or not, so that a typo shows at once rather than on the day
        // an endpoint is set.
        let disabled = env.bool("OTEL_SDK_DISABLED", false)?;
        let sampler = TraceSampler::from_env(env)?;
        let (protocol_var, protocol) = match env.optional("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") {
            Some(protocol) => ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", Some(protocol)),
            None => ("OTEL_EXPORTER_OTLP_PROTOCOL", env.optional("OTEL_EXPORTER_OTLP_PROTOCOL")),
        };
        let protocol = match protocol.as_deref().map(str::trim) {
            None | Some("http/protobuf") => OtlpProtocol::HttpProtobuf,
            Some("grpc") => OtlpProtocol::Grpc,
            Some(other) => return Err(env.invalid(protocol_var, format!("{other:?} is not http/protobuf or grpc"))),
        };
        let (var, endpoint) = match (env.optional("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"), protocol) {
            (Some(endpoint), _) => ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", endpoint.trim().to_owned()),
            (None, protocol) => match (env.optional("OTEL_EXPORTER_OTLP_ENDPOINT"), protocol) {
                (None, _) => return Ok(Self { export: None }),
                (Some(base), OtlpProtocol::HttpProtobuf) => {
                    ("OTEL_EXPORTER_OTLP_ENDPOINT", format!("{}/v1/traces", base.trim().trim_end_matches('/')))
                }
                (Some(base), OtlpProtocol::Grpc) => ("OTEL_EXPORTER_OTLP_ENDPOINT", base.trim().to_owned()),
            },
        };
        match endpoint.parse::<http::Uri>() {
            Ok(uri) if matches!(uri.scheme_str(), Some("http" | "https")) && uri.host().is_some() => {}
            _ => return Err(env.invalid(var, format!("{endpoint:?} is not an http:// or https:// URL"))),
        }
        if protocol == OtlpProtocol::Grpc
            && endpoint.get(..6).is_some_and(|scheme| scheme.eq_ignore_ascii_case("https:"))
        {
            return Err(env.invalid(var, "gRPC export is plain text here; use http/protobuf for https".into()));
        }
        let service_name = env.optional("OTEL_SERVICE_NAME").map(|name| name.trim().to_owned());
        Ok(Self { export: (!disabled).then_some(TraceExport { endpoint, protocol, service_name, sampler }) })
    }
}

impl TraceSampler {
    fn from_env(env: &Env<'_>) -> Result<Self, ConfigError> {
        let sampler = env.optional("OTEL_TRACES_SAMPLER").map(|raw| raw.trim().to_owned());
        let sampler = sampler.as_deref().unwrap_or("parentbased_always_on");
        let (parent_based, rule) = match sampler.strip_prefix("parentbased_") {
            Some(rule) => (true, rule),
            None => (false, sampler),
        };
        let argument = match env.parse::<f64>("OTEL_TRACES_SAMPLER_ARG", 1.0)? {
            ratio if (0.0..=1.0).contains(&ratio) => ratio,
            other => return Err(env.invalid("OTEL_TRACES_SAMPLER_ARG", format!("{other} is not between 0 and 1"))),
        };
        let ratio = match rule {
            "always_on" => 1.0,
            "always_off" => 0.0,
            "traceidratio" => argument,
            _ => {
                return Err(env.invalid(
                    "OTEL_TRACES_SAMPLER",
                    format!(
                        "{sampler:?} is not always_on, always_off, traceidratio, parentbased_always_on, \
                         parentbased_always_off or parentbased_traceidratio"
                    ),
                ));
            }
        };
        Ok(Self { parent_based, ratio })
    }
}

/// Highest `RATE_LIMIT_RPS`.
pub const MAX_RATE_LIMIT_RPS: u32 = 100_000;

/// The api's per-client rate limit (SPEC §8).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimitConfig {
    /// Sustained requests per second per client; `None`: no limit.
    pub rps: Option<NonZeroU32>,
    /// Requests a client may make at once (the bucket's size).
    pub burst: NonZeroU32,
    /// Peers whose `X-Forwarded-For` is believed (load balancers, the ingress controller).
    pub trusted_proxies: Vec<ipnet::IpNet>,
}

/// Kafka settings shared by producer and consumer.
#[derive(Debug, Clone)]
pub struct KafkaConfig {
    /// `host:port` list, comma-separated, as librdkafka takes it.
    pub brokers: String,
    /// The events topic; its dead-letter topic is `<topic>.dlq`.
    pub topic: String,
    /// The worker's consumer group.
    pub group_id: String,
    /// Partitions of topics this service creates.
    pub topic_partitions: NonZeroU32,
    /// Replication factor of topics this service creates.
    pub replication_factor: NonZeroU32,
    /// Consumer session timeout.
    pub session_timeout: Duration,
    /// Consumer heartbeat interval.
    pub heartbeat_interval: Duration,
    /// Producer `linger.ms`.
    pub linger: Duration,
    /// Producer `message.timeout.ms`; zero retries until delivered. Zero is the default because an
    /// idempotent producer whose messages timed out must bump its epoch, and that recovery fails on
    /// some brokers (tansu answers ProducerFenced from then on); retrying in librdkafka keeps order.
    pub message_timeout: Duration,
    /// Consumer `fetch.wait.max.ms`.
    pub fetch_wait_max: Duration,
    /// TLS and authentication to the brokers.
    pub security: KafkaSecurity,
}

/// How clients reach the brokers (librdkafka's `security.protocol` and what it needs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KafkaSecurity {
    /// TLS to the brokers.
    pub tls: bool,
    /// SASL authentication; `None` connects anonymously.
    pub sasl: Option<KafkaSasl>,
    /// CA bundle for the brokers' certificates; `None`: the system's roots.
    pub ssl_ca_location: Option<PathBuf>,
}

/// SASL credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KafkaSasl {
    /// `PLAIN`, `SCRAM-SHA-256` or `SCRAM-SHA-512`, as librdkafka spells them.
    pub mechanism: &'static str,
    /// User name.
    pub username: String,
    /// Password.
    pub password: Secret,
}

impl KafkaConfig {
    /// The dead-letter topic.
    pub fn dlq_topic(&self) -> String {
        format!("{}.dlq", self.topic)
    }
}

/// Longest `IDEMPOTENCY_TTL`: a year. Beyond, a key is as good as permanent and the table only grows.
pub const MAX_IDEMPOTENCY_TTL_SECONDS: u64 = 365 * 24 * 3600;

/// Events API limits.
#[derive(Debug, Clone)]
pub struct EventsConfig {
    /// Largest serialized `data`.
    pub max_data_bytes: usize,
}

/// The outbox relay.
#[derive(Debug, Clone)]
pub struct OutboxConfig {
    /// Rows published per batch.
    pub batch_size: NonZeroU32,
    /// How often the relay looks for rows written by other replicas (its own wake it at once).
    pub poll_interval: Duration,
    /// How long after the publishing replica stops making progress another one publishes.
    pub takeover_timeout: Duration,
}

/// The worker.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Health and metrics port (the worker never binds `SERVER_PORT`).
    pub http_port: u16,
    /// Parallel lanes; one user's events always go to the same lane, in order.
    pub concurrency: NonZeroU32,
    /// Attempts at a failing event before it is dead-lettered.
    pub max_retries: u32,
    /// First retry delay; doubles per attempt (see [`crate::backoff::Backoff`]).
    pub retry_backoff: Duration,
    /// Messages in flight before the consumer pauses fetching.
    pub max_in_flight: NonZeroU32,
    /// Bytes of messages in flight before the consumer pauses fetching.
    pub max_in_flight_bytes: NonZeroUsize,
}

/// Default `WORKER_MAX_IN_FLIGHT_BYTES`: 64 MiB, sized for the worker's 256 MiB memory limit
/// (k8s/worker-deployment.yaml). At `EVENT_MAX_DATA_BYTES` (64 KiB) per event, the 4,000 messages
/// `WORKER_MAX_IN_FLIGHT` allows would be ~260 MB; this bound stops fetching at ~1,000 of them.
/// What the worker holds of fetched messages, at most:
/// - in flight: this bound (plus the one message that crosses it);
/// - the lanes' decoded copies of the batches they are applying: at most as much again (64 MiB);
/// - librdkafka's prefetch queue: [`crate::kafka::CONSUMER_PREFETCH_MAX_BYTES`] (24 MiB).
///
/// That is 152 MiB on top of the idle process (21 MiB, measured by the test below): ~173 MiB,
/// leaving ~80 MiB of the limit for the allocator's slack and everything else. The test
/// `memory::a_backlog_of_maximum_size_events_during_a_postgres_outage_keeps_worker_memory_bounded`
/// (worker/tests/pipeline) holds a worker to this arithmetic at a smaller bound.
pub const DEFAULT_WORKER_MAX_IN_FLIGHT_BYTES: usize = 64 * 1024 * 1024;

/// HTTP server settings.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Listen address.
    pub addr: SocketAddr,
    /// Deadline for a client to send its request headers.
    pub header_read_timeout: Duration,
    /// Deadline for a whole request.
    pub request_timeout: Duration,
    /// Deadline for draining in-flight work at shutdown.
    pub shutdown_timeout: Duration,
    /// Requests served at once; more are refused with 503.
    pub max_inflight_requests: usize,
}

/// PostgreSQL settings.
#[derive(Debug, Clone)]
pub struct DatabaseConfig {
    /// Host name or address.
    pub host: String,
    /// Port.
    pub port: u16,
    /// Role of the running binaries.
    pub user: String,
    /// Password; never logged (see the `Debug` of [`Secret`]).
    pub password: Secret,
    /// Role that owns the schema and runs migrations (often `user`).
    pub migration_user: String,
    /// Its password, if set (see [`DatabaseConfig::as_migration_owner`]).
    pub migration_password: Option<Secret>,
    /// TLS to the server.
    pub ssl_mode: SslMode,
    /// CA bundle for verifying the server's certificate.
    pub ssl_root_cert: Option<PathBuf>,
    /// Database name.
    pub name: String,
    /// Largest number of pooled connections.
    pub pool_max_size: NonZeroU32,
    /// Connections kept open while idle.
    pub pool_min_idle: u32,
    /// Longest wait for a pooled connection.
    pub pool_timeout: Duration,
    /// Deadline to open one connection.
    pub connect_timeout: Duration,
    /// Server-side limit for one statement.
    pub statement_timeout: Duration,
}

/// libpq's `sslmode`s this service implements (`allow` is not one: it would try plain text first).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    /// Plain TCP.
    Disable,
    /// TLS if the server offers it, plain TCP if it does not; no verification.
    Prefer,
    /// TLS or no connection; the certificate is verified only against `DB_SSLROOTCERT`, if set.
    Require,
    /// TLS; the certificate must chain to `DB_SSLROOTCERT`.
    VerifyCa,
    /// TLS; the certificate must chain to `DB_SSLROOTCERT` and name `DB_HOST`.
    VerifyFull,
}

/// Redis settings.
#[derive(Debug, Clone)]
pub struct RedisConfig {
    /// Host name or address.
    pub host: String,
    /// Port.
    pub port: u16,
    /// ACL user; `None` is Redis's `default` user.
    pub username: Option<String>,
    /// Password, if the server wants one.
    pub password: Option<Secret>,
    /// TLS (`rediss://`), the server's name verified.
    pub tls: bool,
    /// CA bundle for TLS; `None` trusts the system's roots.
    pub ca_cert: Option<PathBuf>,
    /// Logical database number.
    pub db: u32,
    /// Deadline for one cache operation.
    pub timeout: Duration,
    /// Prefix of every key this service writes.
    pub key_prefix: String,
    /// Lifetime of a cached user; `None` turns the cache off.
    pub cache_ttl: Option<Duration>,
}

/// Logging settings.
#[derive(Debug, Clone)]
pub struct LogConfig {
    /// `EnvFilter` directives.
    pub level: String,
    /// Output format.
    pub format: LogFormat,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// One JSON object per line (production).
    Json,
    /// Human-readable lines (development).
    Text,
}

/// A string that must not reach logs: its `Debug` prints a placeholder.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// The secret itself, for the one place that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl Config {
    /// Reads `.env` (if present, without overriding the real environment), then the environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        // A missing .env is the normal case in containers; a malformed one should not be ignored.
        match dotenvy::dotenv() {
            Ok(_) => {}
            Err(err) if err.not_found() => {}
            Err(err) => {
                return Err(ConfigError { var: ".env", reason: err.to_string() });
            }
        }
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Builds the configuration from any variable source (the environment, or a map in tests).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let env = Env(&lookup);
        let host: IpAddr = env.parse("SERVER_HOST", "0.0.0.0".parse().expect("valid literal"))?;
        let port: u16 = env.parse("SERVER_PORT", 8080)?;
        Ok(Self {
            server: ServerConfig {
                addr: SocketAddr::new(host, port),
                header_read_timeout: env.seconds("HTTP_HEADER_READ_TIMEOUT", 5)?,
                request_timeout: env.seconds("REQUEST_TIMEOUT", 10)?,
                shutdown_timeout: env.seconds("SHUTDOWN_TIMEOUT", 20)?,
                max_inflight_requests: env
                    .parse::<NonZeroU32>("MAX_INFLIGHT_REQUESTS", NonZeroU32::new(1024).expect("non-zero"))?
                    .get() as usize,
            },
            database: DatabaseConfig {
                host: env.string("DB_HOST", "localhost"),
                port: env.port("DB_PORT", 5432)?,
                user: env.string("DB_USER", "postgres"),
                password: Secret(env.string("DB_PASSWORD", "postgres")),
                migration_user: env.optional("DB_MIGRATION_USER").unwrap_or_else(|| env.string("DB_USER", "postgres")),
                migration_password: env.optional("DB_MIGRATION_PASSWORD").map(Secret),
                ssl_mode: match env.optional("DB_SSLMODE").as_deref().map(str::trim) {
                    None | Some("disable") => SslMode::Disable,
                    Some("prefer") => SslMode::Prefer,
                    Some("require") => SslMode::Require,
                    Some("verify-ca") => SslMode::VerifyCa,
                    Some("verify-full") => SslMode::VerifyFull,
                    Some(other) => {
                        return Err(env.invalid(
                            "DB_SSLMODE",
                            format!("{other:?} is not disable, prefer, require, verify-ca or verify-full"),
                        ));
                    }
                },
                ssl_root_cert: env.optional("DB_SSLROOTCERT").map(PathBuf::from),
                name: env.string("DB_NAME", "highload_db"),
                pool_max_size: env.parse("DB_POOL_MAX_SIZE", NonZeroU32::new(16).expect("non-zero"))?,
                pool_min_idle: env.parse("DB_POOL_MIN_IDLE", 2)?,
                pool_timeout: env.millis("DB_POOL_TIMEOUT_MS", 2000)?,
                connect_timeout: env.seconds("DB_CONNECT_TIMEOUT", 5)?,
                statement_timeout: env.millis("DB_STATEMENT_TIMEOUT_MS", 5000)?,
            }
            .checked(&env)?,
            redis: RedisConfig {
                host: env.string("REDIS_HOST", "localhost"),
                port: env.port("REDIS_PORT", 6379)?,
                username: env.optional("REDIS_USERNAME"),
                password: env.optional("REDIS_PASSWORD").map(Secret),
                tls: env.bool("REDIS_TLS", false)?,
                ca_cert: env.optional("REDIS_CA_CERT").map(PathBuf::from),
                db: env.parse("REDIS_DB", 0)?,
                timeout: env.millis("REDIS_TIMEOUT_MS", 100)?,
                key_prefix: env.string("REDIS_KEY_PREFIX", "hlms:"),
                cache_ttl: Some(env.seconds("CACHE_TTL", 300)?).filter(|ttl| !ttl.is_zero()),
            }
            .checked(&env)?,
            log: LogConfig {
                level: env.string("LOG_LEVEL", "info"),
                format: match env.optional("LOG_FORMAT").as_deref() {
                    None | Some("json") => LogFormat::Json,
                    Some("text") => LogFormat::Text,
                    Some(other) => return Err(env.invalid("LOG_FORMAT", format!("{other:?} is not json or text"))),
                },
            },
            run_migrations: env.bool("RUN_MIGRATIONS", true)?,
            kafka: KafkaConfig {
                brokers: env.string("KAFKA_BROKERS", "localhost:9092"),
                topic: env.string("KAFKA_TOPIC", "user-events"),
                group_id: env.string("KAFKA_GROUP_ID", "highload-service"),
                topic_partitions: env.parse("KAFKA_TOPIC_PARTITIONS", NonZeroU32::new(12).expect("non-zero"))?,
                replication_factor: env.parse("KAFKA_REPLICATION_FACTOR", NonZeroU32::MIN)?,
                session_timeout: env.millis("KAFKA_SESSION_TIMEOUT_MS", 10_000)?,
                heartbeat_interval: env.millis("KAFKA_HEARTBEAT_INTERVAL_MS", 1_000)?,
                linger: env.millis("KAFKA_LINGER_MS", 0)?,
                message_timeout: env.millis("KAFKA_MESSAGE_TIMEOUT_MS", 0)?,
                fetch_wait_max: env.millis("KAFKA_FETCH_WAIT_MAX_MS", 20)?,
                security: KafkaSecurity::from_env(&env)?,
            },
            events: EventsConfig { max_data_bytes: env.parse("EVENT_MAX_DATA_BYTES", 65_536)? },
            outbox: OutboxConfig {
                batch_size: env.parse("OUTBOX_BATCH_SIZE", NonZeroU32::new(500).expect("non-zero"))?,
                poll_interval: env.millis("OUTBOX_POLL_INTERVAL_MS", 100)?,
                takeover_timeout: match env.seconds("OUTBOX_TAKEOVER_TIMEOUT", 10)? {
                    timeout if timeout.is_zero() => {
                        return Err(env.invalid("OUTBOX_TAKEOVER_TIMEOUT", "must be at least 1 second".into()));
                    }
                    timeout => timeout,
                },
            },
            idempotency_ttl: match env.parse("IDEMPOTENCY_TTL", 86_400)? {
                seconds @ 1..=MAX_IDEMPOTENCY_TTL_SECONDS => Duration::from_secs(seconds),
                other => {
                    return Err(env.invalid(
                        "IDEMPOTENCY_TTL",
                        format!("{other} is not between 1 and {MAX_IDEMPOTENCY_TTL_SECONDS} seconds"),
                    ));
                }
            },
            rate_limit: RateLimitConfig::from_env(&env)?,
            traces: TracesConfig::from_env(&env)?,
            worker: WorkerConfig {
                http_port: env.parse("WORKER_HTTP_PORT", 8081)?,
                concurrency: env.parse("WORKER_CONCURRENCY", NonZeroU32::new(16).expect("non-zero"))?,
                max_retries: env.parse("WORKER_MAX_RETRIES", 5)?,
                retry_backoff: env.millis("WORKER_RETRY_BACKOFF_MS", 100)?,
                max_in_flight: env.parse("WORKER_MAX_IN_FLIGHT", NonZeroU32::new(4000).expect("non-zero"))?,
                max_in_flight_bytes: env.parse(
                    "WORKER_MAX_IN_FLIGHT_BYTES",
                    NonZeroUsize::new(DEFAULT_WORKER_MAX_IN_FLIGHT_BYTES).expect("non-zero"),
                )?,
            },
        })
    }
}

/// How the api authenticates its clients (SPEC §8).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthConfig {
    /// `AUTH_MODE=none`: every caller is anonymous (development only; the api warns at start).
    Disabled,
    /// `AUTH_MODE=jwt` (the default): OAuth 2.0 bearer tokens in JWT form.
    Jwt(JwtConfig),
}

/// Which tokens the api accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwtConfig {
    /// Required `iss`.
    pub issuer: String,
    /// Required `aud` (the token's `aud` may be a string or an array containing it).
    pub audience: String,
    /// Where the issuer's public keys are.
    pub jwks: JwksSource,
    /// Leeway on `exp` and `nbf`.
    pub clock_skew: Duration,
    /// How often the JWKS is fetched again.
    pub refresh: Duration,
}

/// Where a JWK Set comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JwksSource {
    /// Fetched over HTTP(S).
    Url(String),
    /// Read from a file (e.g. a mounted ConfigMap).
    File(PathBuf),
}

impl AuthConfig {
    /// Reads the `AUTH_*` variables from the environment (after `.env`, which [`Config::from_env`] loads).
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Reads the `AUTH_*` variables from any source. A missing required variable is named in the error.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let env = Env(&lookup);
        match env.optional("AUTH_MODE").as_deref().map(str::trim) {
            Some("none") => return Ok(Self::Disabled),
            None | Some("jwt") => {}
            Some(other) => return Err(env.invalid("AUTH_MODE", format!("{other:?} is not jwt or none"))),
        }
        let jwks = match (env.optional("AUTH_JWKS_URL"), env.optional("AUTH_JWKS_FILE")) {
            (Some(_), Some(_)) => {
                return Err(env.invalid("AUTH_JWKS_FILE", "set AUTH_JWKS_URL or AUTH_JWKS_FILE, not both".into()));
            }
            (Some(url), None) if url.starts_with("https://") || url.starts_with("http://") => JwksSource::Url(url),
            (Some(url), None) => return Err(env.invalid("AUTH_JWKS_URL", format!("{url:?} is not an http(s) URL"))),
            (None, Some(path)) => JwksSource::File(path.into()),
            (None, None) => {
                return Err(env.invalid("AUTH_JWKS_URL", "required (or AUTH_JWKS_FILE) when AUTH_MODE=jwt".into()));
            }
        };
        let refresh = env.seconds("AUTH_JWKS_REFRESH", 300)?;
        if refresh.is_zero() {
            return Err(env.invalid("AUTH_JWKS_REFRESH", "must be at least 1 second".into()));
        }
        let clock_skew = env.seconds("AUTH_CLOCK_SKEW", 30)?;
        if clock_skew > Duration::from_secs(300) {
            return Err(env.invalid("AUTH_CLOCK_SKEW", "more than 300 seconds would accept long-expired tokens".into()));
        }
        Ok(Self::Jwt(JwtConfig {
            issuer: env.required("AUTH_ISSUER", "AUTH_MODE=jwt (the default)")?,
            audience: env.required("AUTH_AUDIENCE", "AUTH_MODE=jwt (the default)")?,
            jwks,
            clock_skew,
            refresh,
        }))
    }
}

impl RateLimitConfig {
    fn from_env(env: &Env<'_>) -> Result<Self, ConfigError> {
        let rps = NonZeroU32::new(env.parse("RATE_LIMIT_RPS", 0)?);
        // Redis keeps each bucket's time as milliseconds since the epoch in a double: beyond this the
        // emission interval nears its resolution. Per client, more would be no limit anyway.
        if rps.is_some_and(|rps| rps.get() > MAX_RATE_LIMIT_RPS) {
            return Err(env.invalid("RATE_LIMIT_RPS", format!("at most {MAX_RATE_LIMIT_RPS} (0 turns the limit off)")));
        }
        let burst = env.parse("RATE_LIMIT_BURST", rps.unwrap_or(NonZeroU32::MIN))?;
        let trusted_proxies = env
            .optional("TRUSTED_PROXIES")
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|cidr| !cidr.is_empty())
            .map(|cidr| {
                // A bare address is a network of one.
                cidr.parse::<ipnet::IpNet>()
                    .or_else(|_| cidr.parse::<IpAddr>().map(ipnet::IpNet::from))
                    .map_err(|_| env.invalid("TRUSTED_PROXIES", format!("{cidr:?} is not an address or a CIDR")))
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { rps, burst, trusted_proxies })
    }
}

impl KafkaSecurity {
    /// Settings that contradict the protocol are refused rather than ignored: a CA or credentials
    /// given with `PLAINTEXT` would otherwise mean a plain-text connection the operator did not want.
    fn from_env(env: &Env<'_>) -> Result<Self, ConfigError> {
        let protocol = env.optional("KAFKA_SECURITY_PROTOCOL").map(|raw| raw.trim().to_ascii_uppercase());
        let (tls, sasl) = match protocol.as_deref() {
            None | Some("PLAINTEXT") => (false, false),
            Some("SSL") => (true, false),
            Some("SASL_PLAINTEXT") => (false, true),
            Some("SASL_SSL") => (true, true),
            Some(other) => {
                return Err(env.invalid(
                    "KAFKA_SECURITY_PROTOCOL",
                    format!("{other:?} is not PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL"),
                ));
            }
        };
        let ssl_ca_location = env.optional("KAFKA_SSL_CA_LOCATION").map(PathBuf::from);
        if ssl_ca_location.is_some() && !tls {
            return Err(env.invalid("KAFKA_SSL_CA_LOCATION", "set, but KAFKA_SECURITY_PROTOCOL has no SSL".into()));
        }
        if !sasl {
            for var in ["KAFKA_SASL_MECHANISM", "KAFKA_SASL_USERNAME", "KAFKA_SASL_PASSWORD"] {
                if env.optional(var).is_some() {
                    return Err(env.invalid(var, "set, but KAFKA_SECURITY_PROTOCOL has no SASL".into()));
                }
            }
            return Ok(Self { tls, sasl: None, ssl_ca_location });
        }
        let mechanism = match env.optional("KAFKA_SASL_MECHANISM").map(|raw| raw.trim().to_ascii_uppercase()).as_deref()
        {
            None | Some("PLAIN") => "PLAIN",
            Some("SCRAM-SHA-256") => "SCRAM-SHA-256",
            Some("SCRAM-SHA-512") => "SCRAM-SHA-512",
            Some(other) => {
                return Err(env.invalid(
                    "KAFKA_SASL_MECHANISM",
                    format!("{other:?} is not PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512"),
                ));
            }
        };
        let when = "KAFKA_SECURITY_PROTOCOL is SASL_PLAINTEXT or SASL_SSL";
        let sasl = KafkaSasl {
            mechanism,
            username: env.required("KAFKA_SASL_USERNAME", when)?,
            password: Secret(env.required("KAFKA_SASL_PASSWORD", when)?),
        };
        Ok(Self { tls, sasl: Some(sasl), ssl_ca_location })
    }

    /// librdkafka's `security.protocol`.
    pub fn protocol(&self) -> &'static str {
        match (self.tls, self.sasl.is_some()) {
            (false, false) => "plaintext",
            (true, false) => "ssl",
            (false, true) => "sasl_plaintext",
            (true, true) => "sasl_ssl",
        }
    }
}

impl RedisConfig {
    /// A CA without TLS would mean plain text the operator did not want, and a user without a
    /// password the `default` user (the client logs in only when given a password): both refused.
    fn checked(self, env: &Env<'_>) -> Result<Self, ConfigError> {
        if self.ca_cert.is_some() && !self.tls {
            return Err(env.invalid("REDIS_CA_CERT", "set, but REDIS_TLS is false".into()));
        }
        if self.username.is_some() && self.password.is_none() {
            return Err(env.invalid("REDIS_PASSWORD", "required with REDIS_USERNAME".into()));
        }
        Ok(self)
    }
}

impl DatabaseConfig {
    /// Rejects combinations that each variable alone cannot.
    fn checked(self, env: &Env<'_>) -> Result<Self, ConfigError> {
        if self.pool_min_idle > self.pool_max_size.get() {
            return Err(env.invalid("DB_POOL_MIN_IDLE", "must not exceed DB_POOL_MAX_SIZE".into()));
        }
        // libpq refuses the same: a verify mode with nothing to verify against.
        if matches!(self.ssl_mode, SslMode::VerifyCa | SslMode::VerifyFull) && self.ssl_root_cert.is_none() {
            return Err(env.invalid("DB_SSLROOTCERT", "required by DB_SSLMODE verify-ca and verify-full".into()));
        }
        // libpq would ignore it; here a CA that verifies nothing is refused, as for Redis and Kafka.
        if matches!(self.ssl_mode, SslMode::Disable | SslMode::Prefer) && self.ssl_root_cert.is_some() {
            return Err(env.invalid("DB_SSLROOTCERT", "set, but DB_SSLMODE disable or prefer verifies nothing".into()));
        }
        Ok(self)
    }

    /// The same settings with the migration owner's credentials. Only `api migrate` needs the owner's
    /// password, so only it fails without one (the running binaries never see it); another owner than
    /// `DB_USER` must have its own, lest it be sent the runtime role's.
    pub fn as_migration_owner(&self) -> Result<Self, ConfigError> {
        let password = match &self.migration_password {
            Some(password) => password.clone(),
            None if self.migration_user == self.user => self.password.clone(),
            None => {
                return Err(ConfigError {
                    var: "DB_MIGRATION_PASSWORD",
                    reason: "required when DB_MIGRATION_USER differs from DB_USER".into(),
                });
            }
        };
        Ok(Self { user: self.migration_user.clone(), password, ..self.clone() })
    }
}

/// Typed access to the variables, every error naming its variable. Empty values count as unset,
/// as `.env` files and manifests often carry `NAME=` for "no value".
struct Env<'a>(&'a dyn Fn(&str) -> Option<String>);

impl Env<'_> {
    fn optional(&self, name: &str) -> Option<String> {
        (self.0)(name).filter(|value| !value.trim().is_empty())
    }

    fn required(&self, var: &'static str, when: &str) -> Result<String, ConfigError> {
        self.optional(var).ok_or_else(|| self.invalid(var, format!("required when {when}")))
    }

    fn string(&self, name: &str, default: &str) -> String {
        self.optional(name).unwrap_or_else(|| default.to_owned())
    }

    fn invalid(&self, var: &'static str, reason: String) -> ConfigError {
        ConfigError { var, reason }
    }

    fn parse<T>(&self, var: &'static str, default: T) -> Result<T, ConfigError>
    where
        T: FromStr,
        T::Err: Display,
    {
        match self.optional(var) {
            None => Ok(default),
            Some(raw) => raw.trim().parse().map_err(|err| self.invalid(var, format!("{raw:?}: {err}"))),
        }
    }

    fn port(&self, var: &'static str, default: u16) -> Result<u16, ConfigError> {
        match self.parse(var, default)? {
            0 => Err(self.invalid(var, "port 0 is not a port to connect to".into())),
            port => Ok(port),
        }
    }

    fn seconds(&self, var: &'static str, default: u64) -> Result<Duration, ConfigError> {
        self.parse(var, default).map(Duration::from_secs)
    }

    fn millis(&self, var: &'static str, default: u64) -> Result<Duration, ConfigError> {
        self.parse(var, default).map(Duration::from_millis)
    }

    fn bool(&self, var: &'static str, default: bool) -> Result<bool, ConfigError> {
        match self.optional(var).map(|raw| raw.trim().to_ascii_lowercase()).as_deref() {
            None => Ok(default),
            Some("true" | "1" | "yes" | "on") => Ok(true),
            Some("false" | "0" | "no" | "off") => Ok(false),
            Some(other) => Err(self.invalid(var, format!("{other:?} is not true or false"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn config(vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let vars: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Config::from_lookup(|name| vars.get(name).cloned())
    }

    #[test]
    fn defaults_match_the_seed() {
        let config = config(&[]).unwrap();
        assert_eq!(config.server.addr, "0.0.0.0:8080".parse().unwrap());
        assert_eq!(config.database.name, "highload_db");
        assert_eq!(config.database.port, 5432);
        assert_eq!(config.redis.port, 6379);
        assert_eq!(config.redis.cache_ttl, Some(Duration::from_secs(300)));
        assert_eq!(config.idempotency_ttl, Duration::from_secs(86_400));
        assert_eq!(config.log.format, LogFormat::Json);
        assert!(config.run_migrations);
        assert_eq!(config.worker.max_in_flight_bytes.get(), 64 * 1024 * 1024);
    }

    #[test]
    fn errors_name_the_variable() {
        for (var, value) in [
            ("SERVER_PORT", "http"),
            ("SERVER_PORT", "70000"),
            ("SERVER_HOST", "not an ip"),
            ("DB_PORT", "0"),
            ("DB_POOL_MAX_SIZE", "0"),
            ("REDIS_TIMEOUT_MS", "-1"),
            ("CACHE_TTL", "5m"),
            ("LOG_FORMAT", "xml"),
            ("RUN_MIGRATIONS", "maybe"),
            ("DB_SSLMODE", "allow"),
            ("REDIS_TLS", "tls"),
            ("REDIS_CA_CERT", "/ca.pem"),
            ("DB_SSLROOTCERT", "/ca.pem"),
            ("KAFKA_SECURITY_PROTOCOL", "TLS"),
            ("KAFKA_SSL_CA_LOCATION", "/ca.pem"),
            ("KAFKA_SASL_PASSWORD", "secret"),
            ("DB_POOL_MIN_IDLE", "99"),
            ("KAFKA_TOPIC_PARTITIONS", "0"),
            ("WORKER_CONCURRENCY", "many"),
            ("EVENT_MAX_DATA_BYTES", "64k"),
            ("WORKER_MAX_IN_FLIGHT_BYTES", "64MiB"),
            ("WORKER_MAX_IN_FLIGHT_BYTES", "0"),
            ("RATE_LIMIT_RPS", "-5"),
            ("RATE_LIMIT_BURST", "0"),
            ("RATE_LIMIT_RPS", "100001"),
            ("TRUSTED_PROXIES", "10.0.0.0/8, nonsense"),
            ("IDEMPOTENCY_TTL", "0"),
            ("IDEMPOTENCY_TTL", "1d"),
            ("IDEMPOTENCY_TTL", "31536001"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json"),
            ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "thrift"),
            ("OTEL_TRACES_SAMPLER", "sometimes"),
            ("OTEL_TRACES_SAMPLER_ARG", "half"),
            ("OTEL_SDK_DISABLED", "perhaps"),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "collector:4318"),
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "ftp://collector/v1/traces"),
        ] {
            let err = config(&[(var, value)]).unwrap_err();
            assert_eq!(err.var, var);
            assert!(err.to_string().starts_with(&format!("invalid value for {var}:")), "{err}");
        }
    }

    #[test]
    fn traces_follow_the_standard_variables() {
        assert_eq!(config(&[]).unwrap().traces.export, None, "no endpoint: no tracing");
        let base = [("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318/")];
        let export = config(&base).unwrap().traces.export.unwrap();
        assert_eq!(export.endpoint, "http://collector:4318/v1/traces");
        assert_eq!(export.protocol, OtlpProtocol::HttpProtobuf);
        assert_eq!(export.sampler, TraceSampler { parent_based: true, ratio: 1.0 });
        assert_eq!(export.service_name, None);
        let grpc = config(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
        ]);
        assert_eq!(grpc.unwrap().traces.export.unwrap().endpoint, "http://collector:4317");
        let own = config(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://ignored:4318"),
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "https://collector.example/otlp/traces"),
            ("OTEL_SERVICE_NAME", "edge-api"),
            ("OTEL_TRACES_SAMPLER", "traceidratio"),
            ("OTEL_TRACES_SAMPLER_ARG", "0.25"),
        ]);
        let own = own.unwrap().traces.export.unwrap();
        assert_eq!(own.endpoint, "https://collector.example/otlp/traces");
        assert_eq!(own.service_name.as_deref(), Some("edge-api"));
        assert_eq!(own.sampler, TraceSampler { parent_based: false, ratio: 0.25 });
        let disabled = config(&[base[0], ("OTEL_SDK_DISABLED", "true")]).unwrap();
        assert_eq!(disabled.traces.export, None);
        let tls_grpc = [("OTEL_EXPORTER_OTLP_ENDPOINT", "https://c:4317"), ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")];
        assert_eq!(config(&tls_grpc).unwrap_err().var, "OTEL_EXPORTER_OTLP_ENDPOINT");
        let ratio = [base[0], ("OTEL_TRACES_SAMPLER", "parentbased_traceidratio"), ("OTEL_TRACES_SAMPLER_ARG", "1.5")];
        assert_eq!(config(&ratio).unwrap_err().var, "OTEL_TRACES_SAMPLER_ARG");
    }

    #[test]
    fn rate_limit_is_off_by_default_and_the_burst_defaults_to_one_second() {
        assert_eq!(config(&[]).unwrap().rate_limit.rps, None);
        let limit =
            config(&[("RATE_LIMIT_RPS", "50"), ("TRUSTED_PROXIES", "10.0.0.0/8, 192.168.1.7,::1")]).unwrap().rate_limit;
        assert_eq!((limit.rps.map(NonZeroU32::get), limit.burst.get()), (Some(50), 50));
        let proxies: Vec<String> = limit.trusted_proxies.iter().map(ToString::to_string).collect();
        assert_eq!(proxies, ["10.0.0.0/8", "192.168.1.7/32", "::1/128"]);
    }

    #[test]
    fn empty_values_count_as_unset_and_zero_ttl_disables_the_cache() {
        let config = config(&[("REDIS_PASSWORD", ""), ("DB_PORT", ""), ("CACHE_TTL", "0")]).unwrap();
        assert!(config.redis.password.is_none());
        assert_eq!(config.database.port, 5432);
        assert_eq!(config.redis.cache_ttl, None);
    }

    fn auth(vars: &[(&str, &str)]) -> Result<AuthConfig, ConfigError> {
        let vars: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        AuthConfig::from_lookup(|name| vars.get(name).cloned())
    }

    #[test]
    fn auth_is_on_by_default_and_names_each_missing_variable() {
        let full = [
            ("AUTH_ISSUER", "https://id.example"),
            ("AUTH_AUDIENCE", "api"),
            ("AUTH_JWKS_URL", "https://id.example/jwks"),
        ];
        let Ok(AuthConfig::Jwt(jwt)) = auth(&full) else { panic!("jwt by default") };
        assert_eq!(jwt.jwks, JwksSource::Url("https://id.example/jwks".into()));
        assert_eq!((jwt.clock_skew, jwt.refresh), (Duration::from_secs(30), Duration::from_secs(300)));
        for missing in ["AUTH_ISSUER", "AUTH_AUDIENCE", "AUTH_JWKS_URL"] {
            let vars: Vec<_> = full.iter().copied().filter(|(name, _)| *name != missing).collect();
            assert_eq!(auth(&vars).unwrap_err().var, missing);
        }
        let both = [&full[..], &[("AUTH_JWKS_FILE", "/etc/jwks.json")]].concat();
        assert_eq!(auth(&both).unwrap_err().var, "AUTH_JWKS_FILE");
        assert_eq!(auth(&[("AUTH_MODE", "None")]).unwrap_err().var, "AUTH_MODE");
        assert_eq!(auth(&[("AUTH_MODE", "none")]).unwrap(), AuthConfig::Disabled);
        let ftp = [("AUTH_ISSUER", "i"), ("AUTH_AUDIENCE", "a"), ("AUTH_JWKS_URL", "ftp://x")];
        assert_eq!(auth(&ftp).unwrap_err().var, "AUTH_JWKS_URL");
    }

    #[test]
    fn migrations_run_as_the_runtime_role_unless_an_owner_is_named() {
        let same = config(&[("DB_USER", "app"), ("DB_PASSWORD", "pw")]).unwrap().database.as_migration_owner().unwrap();
        assert_eq!((same.user.as_str(), same.password.expose()), ("app", "pw"));
        let unset = config(&[("DB_MIGRATION_USER", "owner")]).unwrap().database.as_migration_owner();
        assert_eq!(unset.unwrap_err().var, "DB_MIGRATION_PASSWORD");
        assert_eq!(config(&[("REDIS_USERNAME", "app")]).unwrap_err().var, "REDIS_PASSWORD");
        let vars = [("DB_USER", "app"), ("DB_MIGRATION_USER", "owner"), ("DB_MIGRATION_PASSWORD", "secret")];
        let database = config(&vars).unwrap().database;
        let owner = database.as_migration_owner().unwrap();
        assert_eq!((owner.user.as_str(), owner.password.expose(), database.user.as_str()), ("owner", "secret", "app"));
        assert!(!format!("{database:?}").contains("secret"));
    }

    #[test]
    fn kafka_security_follows_the_protocol() {
        let plain = config(&[]).unwrap().kafka.security;
        assert_eq!((plain.protocol(), plain.sasl), ("plaintext", None));
        let vars = [
            ("KAFKA_SECURITY_PROTOCOL", "sasl_ssl"),
            ("KAFKA_SASL_MECHANISM", "scram-sha-512"),
            ("KAFKA_SASL_USERNAME", "svc"),
            ("KAFKA_SASL_PASSWORD", "pw"),
            ("KAFKA_SSL_CA_LOCATION", "/ca.pem"),
        ];
        let security = config(&vars).unwrap().kafka.security;
        assert_eq!(security.protocol(), "sasl_ssl");
        assert_eq!(security.ssl_ca_location, Some(PathBuf::from("/ca.pem")));
        let sasl = security.sasl.unwrap();
        assert_eq!((sasl.mechanism, sasl.username.as_str(), sasl.password.expose()), ("SCRAM-SHA-512", "svc", "pw"));
        let missing = [("KAFKA_SECURITY_PROTOCOL", "SASL_PLAINTEXT"), ("KAFKA_SASL_USERNAME", "svc")];
        assert_eq!(config(&missing).unwrap_err().var, "KAFKA_SASL_PASSWORD");
        let default = [&missing[..], &[("KAFKA_SASL_PASSWORD", "pw")]].concat();
        assert_eq!(config(&default).unwrap().kafka.security.sasl.unwrap().mechanism, "PLAIN");
        assert_eq!(config(&[("KAFKA_SECURITY_PROTOCOL", "SSL")]).unwrap().kafka.security.protocol(), "ssl");
    }

    #[test]
    fn verify_modes_need_a_root_certificate() {
        assert_eq!(config(&[]).unwrap().database.ssl_mode, SslMode::Disable);
        assert_eq!(config(&[("DB_SSLMODE", "require")]).unwrap().database.ssl_mode, SslMode::Require);
        for mode in ["verify-ca", "verify-full"] {
            assert_eq!(config(&[("DB_SSLMODE", mode)]).unwrap_err().var, "DB_SSLROOTCERT");
            let database = config(&[("DB_SSLMODE", mode), ("DB_SSLROOTCERT", "/ca.pem")]).unwrap().database;
            assert_eq!(database.ssl_root_cert, Some(PathBuf::from("/ca.pem")));
        }
    }
}
