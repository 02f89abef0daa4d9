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
            .options(format!("-c statement_timeout={}", config.statement_timeout.as_millis()))
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

    /// Opens a connection. A failure carries its whole cause chain (a TLS error says which check
    /// failed) and is logged, naming the server, at most once per [`LOG_EVERY`].
    pub async fn connect(&self) -> Result<AsyncPgConnection, ConnectionError> {
        let result = match &self.0.tls {
            None => match self.0.config.connect(NoTls).await {
                Ok((client, connection)) => AsyncPgConnection::try_from_client_and_connection(client, connection).await,
                Err(err) => Err(self.failure(err)),
            },
            Some(tls) => match self.0.config.connect(tls.clone()).await {
                Ok((client, connection)) => AsyncPgConnection::try_from_client_and_connection(client, connection).await,
                Err(err) => Err(self.failure(err)),
            },
        };
        if let Err(err) = &result {
            self.log(err);
        }
        result
    }

    fn failure(&self, err: tokio_postgres::Error) -> ConnectionError {
        ConnectionError::BadConnection(format!("{}: {:#}", self.0.target, anyhow::Error::new(err)))
    }

    fn log(&self, err: &ConnectionError) {
        if self.0.log_throttle.allow() {
            tracing::error!(dependency = "postgres", error = %err, "cannot connect to PostgreSQL");
        }
    }
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
        // Plain text never reads the file.
        let missing = dir.join("missing.pem");
        assert!(connector(&[("DB_SSLROOTCERT", missing.to_str().unwrap())]).is_ok());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
