//! The system under chaos: two api and two worker processes against one PostgreSQL, Redis and broker,
//! each dependency reached through a [`FaultProxy`], and the faults that can be done to them. The
//! processes run in a network namespace of their own, so that a dependency's packets can also be
//! dropped silently (a partition), not only its connections closed (a cut).

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use testkit::{Broker, FaultProxy, Netns};
use tokio::process::Child;

/// One api or worker process, restartable on the same port with the same variables.
pub struct Service {
    pub name: String,
    binary: PathBuf,
    vars: HashMap<String, String>,
    /// Its `/health/live` (the api's port, or the worker's health port).
    pub live_url: String,
    log_dir: PathBuf,
    netns: Arc<Netns>,
    child: Option<Child>,
    starts: u32,
}

impl Service {
    pub fn new(
        name: &str,
        binary: &str,
        vars: HashMap<String, String>,
        port: u16,
        log_dir: &Path,
        netns: &Arc<Netns>,
    ) -> Self {
        let worker = PathBuf::from(env!("CARGO_BIN_EXE_worker"));
        Self {
            name: name.to_owned(),
            binary: worker.with_file_name(binary),
            vars,
            live_url: format!("http://{}:{port}/health/live", netns.ip()),
            log_dir: log_dir.to_owned(),
            netns: Arc::clone(netns),
            child: None,
            starts: 0,
        }
    }

    /// Starts the process (stdout and stderr to `<log_dir>/<name>.<n>.log`) and waits until it is live.
    pub async fn start(&mut self, client: &reqwest::Client) {
        self.starts += 1;
        let log = std::fs::File::create(self.log_dir.join(format!("{}.{}.log", self.name, self.starts))).unwrap();
        let child = self
            .netns
            .command(&self.binary)
            .env_clear()
            .envs(&self.vars)
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|err| panic!("cannot start {}: {err}", self.binary.display()));
        self.child = Some(child);
        let url = self.live_url.clone();
        testkit::eventually(&format!("{} live", self.name), Duration::from_secs(60), || async {
            let response = client.get(&url).timeout(Duration::from_secs(2)).send().await.ok()?;
            response.status().is_success().then_some(())
        })
        .await;
    }

    /// kill -9: no shutdown of any kind.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.start_kill().unwrap();
            child.wait().await.unwrap();
        }
    }

    /// SIGTERM and wait for a clean exit (a rolling restart's stop).
    pub async fn terminate(&mut self) {
        let Some(mut child) = self.child.take() else { return };
        let pid = child.id().expect("running").to_string();
        std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        let status = tokio::time::timeout(Duration::from_secs(60), child.wait())
            .await
            .unwrap_or_else(|_| panic!("{} did not exit within 60 s of SIGTERM", self.name))
            .unwrap();
        assert!(status.success(), "{} exited with {status} after SIGTERM", self.name);
    }

    /// Freezes the process (`SIGSTOP`), or lets it run again (`SIGCONT`).
    pub fn signal(&self, signal: &str) {
        let Some(pid) = self.child.as_ref().and_then(Child::id) else { return };
        std::process::Command::new("kill").args([&format!("-{signal}"), &pid.to_string()]).status().unwrap();
    }

    /// Whether the process is still running (it has not died by itself).
    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|child| child.try_wait().unwrap().is_none())
    }
}

/// The dependencies' fault proxies and the processes.
pub struct Cluster {
    pub netns: Arc<Netns>,
    pub postgres: FaultProxy,
    pub redis: FaultProxy,
    pub broker: Broker,
    /// Keeps the proxy to the test issuer's keys running.
    _jwks: FaultProxy,
    pub apis: Vec<Service>,
    pub workers: Vec<Service>,
    /// `DB_NAME`, for checking the database directly (not through the proxy).
    pub database: String,
    pub log_dir: PathBuf,
}

/// What can go wrong, one at a time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Fault {
    KillApi,
    KillWorker,
    RolloutApi,
    RolloutWorker,
    CutPostgres,
    CutRedis,
    CutBroker,
    FreezeApi,
    FreezeWorker,
    PartitionPostgres,
    PartitionRedis,
    PartitionBroker,
}

impl Fault {
    pub const ALL: [Fault; 12] = [
        Fault::KillApi,
        Fault::KillWorker,
        Fault::RolloutApi,
        Fault::RolloutWorker,
        Fault::CutPostgres,
        Fault::CutRedis,
        Fault::CutBroker,
        Fault::FreezeApi,
        Fault::FreezeWorker,
        Fault::PartitionPostgres,
        Fault::PartitionRedis,
        Fault::PartitionBroker,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Fault::KillApi => "kill -9 an api, restart",
            Fault::KillWorker => "kill -9 a worker, restart",
            Fault::RolloutApi => "SIGTERM an api, restart",
            Fault::RolloutWorker => "SIGTERM a worker, restart",
            Fault::CutPostgres => "cut PostgreSQL, restore",
            Fault::CutRedis => "cut Redis, restore",
            Fault::CutBroker => "cut the broker, restore",
            Fault::FreezeApi => "SIGSTOP an api, SIGCONT",
            Fault::FreezeWorker => "SIGSTOP a worker, SIGCONT",
            Fault::PartitionPostgres => "drop PostgreSQL's packets, heal",
            Fault::PartitionRedis => "drop Redis's packets, heal",
            Fault::PartitionBroker => "drop the broker's packets, heal",
        }
    }
}

impl Cluster {
    pub async fn start(client: &reqwest::Client) -> Self {
        let log_dir = std::env::temp_dir().join(format!("hlms-chaos-{}", testkit::unique()));
        std::fs::create_dir_all(&log_dir).unwrap();
        let base = testkit::service_vars();
        let netns = Arc::new(Netns::create());
        let host = IpAddr::V4(netns.host_ip());
        let postgres = FaultProxy::in_front_of_at(&format!("{}:{}", base["DB_HOST"], base["DB_PORT"]), host).await;
        let redis = FaultProxy::in_front_of_at(&format!("{}:{}", base["REDIS_HOST"], base["REDIS_PORT"]), host).await;
        let (jwks, jwks_url) = crate::helpers::jwks_proxy_at(&base, host).await;
        // tansu's group coordinator can wedge for good under these faults (see testkit::Broker).
        let broker = Broker::start_nisshi_at(host).await;
        // Not `hlms_test_*`: scripts/test drops those when it starts, which would end a long soak
        // running beside it. The soak drops its own database when it passes.
        let database = testkit::create_database_named(&format!("hlms_chaos_{}", testkit::unique())).await;

        let mut vars = base;
        vars.insert("DB_NAME".into(), database.clone());
        vars.insert("DB_HOST".into(), netns.host_ip().to_string());
        vars.insert("DB_PORT".into(), postgres.addr().port().to_string());
        vars.insert("REDIS_HOST".into(), netns.host_ip().to_string());
        vars.insert("REDIS_PORT".into(), redis.addr().port().to_string());
        vars.insert("AUTH_JWKS_URL".into(), jwks_url);
        vars.insert("SERVER_HOST".into(), "0.0.0.0".into());
        // Takeovers happen within the soak's faults, not only after them.
        vars.insert("OUTBOX_TAKEOVER_TIMEOUT".into(), "4".into());
        vars.insert("KAFKA_BROKERS".into(), broker.bootstrap());
        // Fail fast while a dependency is cut, so clients see 503s rather than hangs.
        vars.insert("DB_POOL_TIMEOUT_MS".into(), "1000".into());
        vars.insert("DB_CONNECT_TIMEOUT".into(), "2".into());
        vars.insert("OUTBOX_POLL_INTERVAL_MS".into(), "100".into());
        vars.insert("WORKER_RETRY_BACKOFF_MS".into(), "50".into());
        vars.insert("LOG_LEVEL".into(), "warn".into());
        vars.insert("PATH".into(), std::env::var("PATH").unwrap_or_default());
        let config = common::config::Config::from_lookup(|name| vars.get(name).cloned()).unwrap();
        // Topics are made from here, outside the namespace, so through the link's host address.
        common::kafka::ensure_topics(&config.kafka).await.unwrap();

        let mut apis = Vec::new();
        let mut workers = Vec::new();
        for n in 0..2 {
            let port = testkit::closed_port();
            let mut api_vars = vars.clone();
            api_vars.insert("SERVER_PORT".into(), port.to_string());
            apis.push(Service::new(&format!("api{n}"), "api", api_vars, port, &log_dir, &netns));
            let port = testkit::closed_port();
            let mut worker_vars = vars.clone();
            worker_vars.insert("WORKER_HTTP_PORT".into(), port.to_string());
            // Rebalances and consumer errors: the timeline a stalled consumer is diagnosed from.
            worker_vars.insert("LOG_LEVEL".into(), "warn,worker::pipeline=info".into());
            workers.push(Service::new(&format!("worker{n}"), "worker", worker_vars, port, &log_dir, &netns));
        }
        for service in apis.iter_mut().chain(workers.iter_mut()) {
            service.start(client).await;
        }
        Self { netns, postgres, redis, broker, _jwks: jwks, apis, workers, database, log_dir }
    }

    /// The api replicas' base URLs.
    pub fn api_urls(&self) -> Vec<String> {
        self.apis.iter().map(|api| api.live_url.trim_end_matches("/health/live").to_owned()).collect()
    }

    /// Does `fault` to replica `which` (for process faults) and undoes it after `outage`.
    pub async fn inject(&mut self, fault: Fault, which: usize, outage: Duration, client: &reqwest::Client) {
        match fault {
            Fault::KillApi | Fault::KillWorker | Fault::RolloutApi | Fault::RolloutWorker => {
                let services = if matches!(fault, Fault::KillApi | Fault::RolloutApi) {
                    &mut self.apis
                } else {
                    &mut self.workers
                };
                let count = services.len();
                let service = &mut services[which % count];
                if matches!(fault, Fault::KillApi | Fault::KillWorker) {
                    service.kill().await;
                    tokio::time::sleep(outage).await;
                } else {
                    service.terminate().await;
                }
                service.start(client).await;
            }
            Fault::CutPostgres | Fault::CutRedis | Fault::CutBroker => {
                let proxy = match fault {
                    Fault::CutPostgres => &self.postgres,
                    Fault::CutRedis => &self.redis,
                    _ => &self.broker.proxy,
                };
                proxy.cut();
                tokio::time::sleep(outage).await;
                proxy.restore();
            }
            Fault::FreezeApi | Fault::FreezeWorker => {
                let services = if fault == Fault::FreezeApi { &self.apis } else { &self.workers };
                let service = &services[which % services.len()];
                service.signal("STOP");
                tokio::time::sleep(outage).await;
                service.signal("CONT");
            }
            Fault::PartitionPostgres | Fault::PartitionRedis | Fault::PartitionBroker => {
                let port = match fault {
                    Fault::PartitionPostgres => self.postgres.addr().port(),
                    Fault::PartitionRedis => self.redis.addr().port(),
                    _ => self.broker.proxy.addr().port(),
                };
                self.netns.partition(port);
                tokio::time::sleep(outage).await;
                self.netns.heal(port);
            }
        }
    }

    /// Lines of every process log that report a panic.
    pub fn panics(&self) -> Vec<String> {
        let mut found = Vec::new();
        for entry in std::fs::read_dir(&self.log_dir).unwrap().flatten() {
            let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
            found.extend(
                text.lines()
                    .filter(|line| line.contains("panicked"))
                    .map(|line| format!("{}: {line}", entry.file_name().to_string_lossy())),
            );
        }
        found
    }
}
