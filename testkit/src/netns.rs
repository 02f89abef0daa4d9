//! A network namespace per test, joined to the host by a veth pair: a binary started inside reaches
//! its dependencies only over that link, and the test drops the packets to and from any one of them
//! with nftables. That is a real partition: nothing is closed, refused or answered, as when a route
//! or a switch fails, so only timeouts can notice it. Needs root, iproute2 and nftables (the
//! project's scripts install both).

use std::collections::BTreeSet;
use std::io::Write;
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Mutex;

/// Namespaces are numbered; each number owns the /30 `10.213.<n / 64>.<(n % 64) * 4>`.
const MAX_NAMESPACES: u32 = 64 * 256;

/// A network namespace linked to the host; deleted (with its link) when dropped.
pub struct Netns {
    name: String,
    host_ip: Ipv4Addr,
    ip: Ipv4Addr,
    /// Host ports whose packets are dropped now.
    partitioned: Mutex<BTreeSet<u16>>,
}

impl Netns {
    /// Creates a namespace with its own loopback and a link to the host.
    pub fn create() -> Self {
        // From a random start: the kernel frees a deleted namespace's link (and its addresses) a
        // few seconds later, so the number a test just gave back must not be taken again at once.
        let start = (uuid::Uuid::new_v4().as_u128() % u128::from(MAX_NAMESPACES)) as u32;
        for index in (0..MAX_NAMESPACES).map(|offset| (start + offset) % MAX_NAMESPACES) {
            let name = format!("hlms-{index}");
            // Fails when the name is taken (by a concurrent test, or left over by a killed one), so
            // the number, and its subnet, belong to this test once it succeeds.
            let created = Command::new(ip_binary())
                .args(["netns", "add", &name])
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|status| status.success());
            if !created {
                continue;
            }
            let [third, fourth] = [(index / 64) as u8, ((index % 64) * 4) as u8];
            let netns = Self {
                host_ip: Ipv4Addr::new(10, 213, third, fourth + 1),
                ip: Ipv4Addr::new(10, 213, third, fourth + 2),
                partitioned: Mutex::new(BTreeSet::new()),
                name,
            };
            netns.link(index);
            return netns;
        }
        panic!("no free network namespace name hlms-0..{MAX_NAMESPACES}");
    }

    fn link(&self, index: u32) {
        let (outside, inside) = (format!("hlv{index}"), format!("hlvn{index}"));
        let name = self.name.as_str();
        ip(&["link", "add", &outside, "type", "veth", "peer", "name", &inside, "netns", name]);
        ip(&["addr", "add", &format!("{}/30", self.host_ip), "dev", &outside]);
        ip(&["link", "set", &outside, "up"]);
        ip(&["-n", name, "addr", "add", &format!("{}/30", self.ip), "dev", &inside]);
        ip(&["-n", name, "link", "set", &inside, "up"]);
        ip(&["-n", name, "link", "set", "lo", "up"]);
        self.nft(
            "add table inet hlms\n\
             add chain inet hlms out { type filter hook output priority 0; }\n\
             add chain inet hlms in { type filter hook input priority 0; }\n",
        );
    }

    /// The host's end of the link: dependencies the binary inside should reach listen here.
    pub fn host_ip(&self) -> Ipv4Addr {
        self.host_ip
    }

    /// The namespace's own address: what the test dials to reach a binary inside.
    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    /// `program` with `args`, to run inside the namespace.
    pub fn command(&self, program: &Path) -> tokio::process::Command {
        let mut command = tokio::process::Command::new(ip_binary());
        command.args(["netns", "exec", &self.name]).arg(program);
        command
    }

    /// From now on, every packet between the namespace and the host's `port` is dropped, both ways.
    pub fn partition(&self, port: u16) {
        self.partitioned.lock().unwrap().insert(port);
        self.apply();
    }

    /// Lets the packets of `port` through again.
    pub fn heal(&self, port: u16) {
        self.partitioned.lock().unwrap().remove(&port);
        self.apply();
    }

    fn apply(&self) {
        let mut rules = String::from("flush chain inet hlms out\nflush chain inet hlms in\n");
        for port in self.partitioned.lock().unwrap().iter() {
            let host = self.host_ip;
            rules.push_str(&format!("add rule inet hlms out ip daddr {host} tcp dport {port} drop\n"));
            rules.push_str(&format!("add rule inet hlms in ip saddr {host} tcp sport {port} drop\n"));
        }
        self.nft(&rules);
    }

    fn nft(&self, script: &str) {
        let mut child = Command::new(ip_binary())
            .args(["netns", "exec", &self.name, "nft", "-f", "-"])
            .stdin(Stdio::piped())
            .spawn()
            .expect("nft (Debian package nftables) runs");
        child.stdin.take().unwrap().write_all(script.as_bytes()).unwrap();
        let status = child.wait().unwrap();
        assert!(status.success(), "nft in {} refused:\n{script}", self.name);
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace deletes the veth pair with it.
        let _ = Command::new(ip_binary()).args(["netns", "delete", &self.name]).status();
    }
}

fn ip(args: &[&str]) {
    let output = Command::new(ip_binary()).args(args).output().expect("ip (Debian package iproute2) runs");
    assert!(output.status.success(), "ip {}: {}", args.join(" "), String::from_utf8_lossy(&output.stderr));
}

/// `ip` by its full path: the binaries run with an environment of their own (no `PATH`).
fn ip_binary() -> &'static str {
    ["/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"]
        .into_iter()
        .find(|path| Path::new(path).exists())
        .unwrap_or("ip")
}
