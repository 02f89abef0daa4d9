//! A TCP proxy whose path can be cut and restored: how tests simulate a network outage to a
//! dependency without restarting it (tansu's memory storage would lose everything on a restart).

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;

/// A proxy listening on [`FaultProxy::addr`], forwarding to an upstream address.
pub struct FaultProxy {
    addr: SocketAddr,
    state: Arc<State>,
    accept: AbortHandle,
}

struct State {
    cut: AtomicBool,
    connections: Mutex<Vec<AbortHandle>>,
}

impl FaultProxy {
    /// Binds a local port now; forwards to `upstream` once [`FaultProxy::start`] is called.
    pub async fn bind() -> (TcpListener, SocketAddr) {
        Self::bind_at(IpAddr::from([127, 0, 0, 1])).await
    }

    /// Like [`FaultProxy::bind`], on a port of `ip` (one of this host's addresses).
    pub async fn bind_at(ip: IpAddr) -> (TcpListener, SocketAddr) {
        let listener = TcpListener::bind((ip, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        (listener, addr)
    }

    /// Forwards every accepted connection to `upstream`.
    pub fn start(listener: TcpListener, upstream: SocketAddr) -> Self {
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State { cut: AtomicBool::new(false), connections: Mutex::new(Vec::new()) });
        let accept_state = Arc::clone(&state);
        let accept = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                if accept_state.cut.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let task = tokio::spawn(async move {
                    if let Ok(mut server) = TcpStream::connect(upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
                accept_state.connections.lock().unwrap().push(task.abort_handle());
            }
        })
        .abort_handle();
        Self { addr, state, accept }
    }

    /// A running proxy in front of `upstream` (`host:port`).
    pub async fn in_front_of(upstream: &str) -> Self {
        Self::in_front_of_at(upstream, IpAddr::from([127, 0, 0, 1])).await
    }

    /// A running proxy in front of `upstream`, listening on `ip` (e.g. [`crate::Netns::host_ip`]).
    pub async fn in_front_of_at(upstream: &str, ip: IpAddr) -> Self {
        let upstream = tokio::net::lookup_host(upstream).await.unwrap().next().unwrap();
        let (listener, _) = Self::bind_at(ip).await;
        Self::start(listener, upstream)
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Drops every open connection and refuses new ones until [`FaultProxy::restore`].
    pub fn cut(&self) {
        self.state.cut.store(true, Ordering::SeqCst);
        for connection in self.state.connections.lock().unwrap().drain(..) {
            connection.abort();
        }
    }

    /// Lets connections through again.
    pub fn restore(&self) {
        self.state.cut.store(false, Ordering::SeqCst);
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.cut();
        self.accept.abort();
    }
}
