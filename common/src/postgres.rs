//! Opening one PostgreSQL connection the way `DB_*` says (TLS per `DB_SSLMODE`, over rustls), for
//! the pool, the outbox relay's leader session and migrations alike.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use diesel::ConnectionError;
use diesel_async::AsyncPgConnection;
use tokio_postgres::NoTls;
use tokio_postgres::config::SslMode as WireSslMode;
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::config::{DatabaseConfig, SslMode};
use crate::telemetry::Throttle;
use crate::tls::{self, Verification};

/// Failed connections are logged at most this often per connector.
const LOG_EVERY: Duration = Duration::from_secs(10);

/// Opens connections to one database as one role. Cheap to clone.
#[derive(Clone)]
pub struct Connector(Arc<Inner>);

struct Inner {
    config: tokio_postgres::Config,
    /// `None` with `DB_SSLMODE=disable`.
    tls: Option<MakeRustlsConnect>,
    /// Names the server in log lines and errors: `postgres at host:port/db`.
    target: String,
    /// Failures logged at most once per [`LOG_EVERY`].
    log_throttle: Throttle,
}

impl Connector {
    /// Reads the CA bundle now, so that a missing or malformed `DB_SSLROOTCERT` stops the process at
    /// start rather than failing every connection later. `application_name` shows in `pg_stat_activity`.
    pub fn new(config: &DatabaseConfig, application_name: &str) -> anyhow::Result<Self> {
        Self::with_settings(config, application_name, &[])
    }

    /// As [`Connector::new`], with server `settings` (name, value) for every session it opens.
    pub fn with_settings(
        config: &DatabaseConfig,
        application_name: &str,
        settings: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        let roots = match &config.ssl_root_cert {
            Some(path) if config.ssl_mode != SslMode::Disable => {
                Some(tls::load_roots(path).context("DB_SSLROOTCERT cannot be used")?)
            }
            _ => None,
        };
        // libpq: `require` with a root certificate verifies the chain, as `verify-ca` does.
        let tls = match (config.ssl_mode, roots) {
            (SslMode::Disable, _) => None,
            (SslMode::Prefer, _) | (SslMode::Require, None) => Some(Verification::None),
            (SslMode::Require | SslMode::VerifyCa, Some(roots)) => Some(Verification::Chain(roots)),
            (SslMode::VerifyFull, Some(roots)) => Some(Verification::ChainAndName(roots)),
            (SslMode::VerifyCa | SslMode::VerifyFull, None) => {
                anyhow::bail!("DB_SSLMODE {:?} needs DB_SSLROOTCERT", config.ssl_mode)
            }
        };
        let mut options = format!("-c statement_timeout={}", config.statement_timeout.as_millis());
        for (name, value) in settings {
            options.push_str(&format!(" -c {}={}", escape_option(name), escape_option(value)));
        }
        let mut wire = tokio_postgres::Config::new();
        wire.host(&config.host)
            .port(config.port)
            .user(&config.user)
            .password(config.password.expose())
            .dbname(&config.name)
            .application_name(application_name)
            .connect_timeout(config.connect_timeout.max(Duration::from_secs(1)))
            // A server that vanished without closing (a partition, a frozen host) is noticed in about
            // half a minute rather than the kernel's two hours: idle probes after 10 s, 3 more 5 s apart,
            // and unacknowledged data gives up after 30 s.
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(10))
            .keepalives_interval(Duration::from_secs(5))
            .keepalives_retries(3)
            .tcp_user_timeout(Duration::from_secs(30))
            .options(&options)
            .ssl_mode(match config.ssl_mode {
                SslMode::Disable => WireSslMode::Disable,
                SslMode::Prefer => WireSslMode::Prefer,
                SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => WireSslMode::Require,
            });
        Ok(Self(Arc::new(Inner {
            config: wire,
            tls: tls.map(|verification| MakeRustlsConnect::new(tls::client_config(verification))),
            target: format!("postgres at {}:{}/{}", config.host, config.port, config.name),
            log_throttle: Throttle::new(LOG_EVERY),
        })))
    }

    /// Opens a connection within `DB_CONNECT_TIMEOUT`, TLS handshake and startup included. A failure
    /// carries its whole cause chain (a TLS error says which check failed) and is logged, naming the
    /// server, at most once per [`LOG_EVERY`].
    pub async fn connect(&self) -> Result<AsyncPgConnection, ConnectionError> {
        let result = match self.open().await {
            Ok(conn) => Ok(conn),
            Err(Failure::Refused(err) | Failure::Unreachable(err)) => Err(ConnectionError::BadConnection(err)),
        };
        if let Err(err) = &result {
            self.log(err);
        }
        result
    }

    /// Fails if the server refuses these settings: a certificate that does not verify, no TLS where
    /// the mode demands it, a role, password or database it does not know. Waiting cures none of
    /// those, so a process checks at start and stops, rather than retrying for ever. A server that is
    /// merely unreachable passes: the pool keeps trying.
    pub async fn check(&self) -> anyhow::Result<()> {
        match self.open().await {
            Err(Failure::Refused(err)) => {
                tracing::error!(dependency = "postgres", error = %err, "PostgreSQL refuses this configuration");
                Err(anyhow::anyhow!(err))
            }
            Err(Failure::Unreachable(err)) => {
                tracing::warn!(dependency = "postgres", error = %err, "PostgreSQL unreachable at start; retrying");
                Ok(())
            }
            Ok(_) => Ok(()),
        }
    }

    async fn open(&self) -> Result<AsyncPgConnection, Failure> {
        let deadline = self.0.config.get_connect_timeout().copied().unwrap_or(Duration::from_secs(5));
        let attempt = async {
            let connected = match &self.0.tls {
                None => match self.0.config.connect(NoTls).await {
                    Ok((client, connection)) => {
                        AsyncPgConnection::try_from_client_and_connection(client, connection).await
                    }
                    Err(err) => return Err(self.failure(err)),
                },
                Some(tls) => match self.0.config.connect(tls.clone()).await {
                    Ok((client, connection)) => {
                        AsyncPgConnection::try_from_client_and_connection(client, connection).await
                    }
                    Err(err) => return Err(self.failure(err)),
                },
            };
            connected.map_err(|err| Failure::Unreachable(format!("{}: {err}", self.0.target)))
        };
        // tokio-postgres bounds the TCP connect only: a peer that accepts and then says nothing (a
        // wrong port, a stalled proxy) would otherwise hold a pool slot for ever.
        tokio::time::timeout(deadline, attempt)
            .await
            .unwrap_or_else(|_| Err(Failure::Unreachable(format!("{}: no answer within {deadline:?}", self.0.target))))
    }

    fn failure(&self, err: tokio_postgres::Error) -> Failure {
        let refused = is_refusal(&err);
        let message = format!("{}: {:#}", self.0.target, anyhow::Error::new(err));
        if refused { Failure::Refused(message) } else { Failure::Unreachable(message) }
    }

    fn log(&self, err: &ConnectionError) {
        if self.0.log_throttle.allow() {
            tracing::error!(dependency = "postgres", error = %err, "cannot connect to PostgreSQL");
        }
    }
}

/// PostgreSQL splits the startup `options` at spaces, with `\` escaping the next character.
fn escape_option(text: &str) -> String {
    text.replace('\\', "\\\\").replace(' ', "\\ ")
}

/// A failed attempt, and whether waiting could cure it.
enum Failure {
    /// The server (or its certificate) refuses these settings.
    Refused(String),
    /// Anything else: down, unreachable, slow, shutting down.
    Unreachable(String),
}

/// Whether the server refused the settings rather than failed to answer: a TLS error (rustls's, or
/// no TLS where the mode demands it), an authorization error (SQLSTATE class 28; 3D000: no such
/// database; 42501: no CONNECT privilege; 55000: the database does not accept connections), or a
/// session setting it does not know or accept (42704, 22023: a server older than PostgreSQL 12 has no
/// `plan_cache_mode`).
fn is_refusal(err: &tokio_postgres::Error) -> bool {
    if let Some(db) = err.as_db_error() {
        let code = db.code().code();
        return code.starts_with("28") || ["3D000", "42501", "55000", "42704", "22023"].contains(&code);
    }
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(error) = cause {
        // An io::Error's `source` skips the error it wraps: look inside.
        let wrapped = error.downcast_ref::<std::io::Error>().and_then(std::io::Error::get_ref);
        if error.is::<rustls::Error>() || wrapped.is_some_and(|inner| inner.is::<rustls::Error>()) {
            return true;
        }
        if error.to_string().contains("server does not support TLS") {
            return true;
        }
        cause = error.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn connector(vars: &[(&str, &str)]) -> anyhow::Result<Connector> {
        let vars: std::collections::HashMap<_, _> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let config = Config::from_lookup(|name| vars.get(name).cloned()).unwrap();
        Connector::new(&config.database, "test")
    }

    #[test]
    fn settings_reach_the_driver_and_the_password_is_kept_exactly() {
        let connector = connector(&[("DB_PASSWORD", r"it's\secret"), ("DB_HOST", "db.internal")]).unwrap();
        let config = &connector.0.config;
        assert_eq!(config.get_password(), Some(r"it's\secret".as_bytes()));
        assert_eq!(config.get_options(), Some("-c statement_timeout=5000"));
        assert_eq!(config.get_ssl_mode(), WireSslMode::Disable);
        let dead_peer = (config.get_keepalives_idle(), config.get_tcp_user_timeout());
        assert_eq!(dead_peer, (Duration::from_secs(10), Some(&Duration::from_secs(30))));
        assert!(connector.0.tls.is_none());
        assert_eq!(connector.0.target, "postgres at db.internal:5432/highload_db");
    }

    #[test]
    fn extra_settings_follow_the_statement_timeout() {
        let vars = std::collections::HashMap::from([("DB_STATEMENT_TIMEOUT_MS".to_string(), "700".to_string())]);
        let config = Config::from_lookup(|name| vars.get(name).cloned()).unwrap();
        let connector = Connector::with_settings(&config.database, "test", &[("plan_cache_mode", "force_custom_plan")]);
        assert_eq!(
            connector.unwrap().0.config.get_options(),
            Some("-c statement_timeout=700 -c plan_cache_mode=force_custom_plan")
        );
    }

    #[test]
    fn spaces_and_backslashes_in_settings_are_escaped() {
        assert_eq!(escape_option(r"a b\c"), r"a\ b\\c");
    }

    #[test]
    fn an_unusable_root_certificate_stops_the_start() {
        let dir = std::env::temp_dir().join(format!("hlms-tls-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let not_pem = dir.join("not.pem");
        std::fs::write(&not_pem, "hello").unwrap();
        for path in [dir.join("missing.pem"), not_pem] {
            let path = path.to_str().unwrap();
            let err = connector(&[("DB_SSLMODE", "verify-full"), ("DB_SSLROOTCERT", path)]).err().unwrap();
            assert!(format!("{err:#}").starts_with("DB_SSLROOTCERT cannot be used"), "{err:#}");
        }
        std::fs::remove_dir_all(dir).unwrap();
    }
}
