//! A private `redis-server` per test, for settings the shared server must not take: TLS only and
//! ACL users.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::tls::{ServerCert, TestCa};

/// A Redis server listening on 127.0.0.1:`port` with TLS only; stopped when dropped.
pub struct PrivateRedis {
    /// Its TLS port.
    pub port: u16,
    child: Child,
    dir: PathBuf,
}

impl PrivateRedis {
    /// Starts a server speaking only TLS with `cert` (issued by `ca`; clients need no certificate),
    /// with these ACL `user` lines (e.g. `"app on >secret ~app:* +get"`); the `default` user stays
    /// open when `users` is empty and is switched off otherwise.
    pub fn start_tls(ca: &TestCa, cert: &ServerCert, users: &[&str]) -> Self {
        let port = crate::closed_port();
        let dir = std::env::temp_dir().join(format!("hlms-redis-{}", crate::unique()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut config = format!(
            "port 0\nbind 127.0.0.1\ntls-port {port}\ntls-cert-file {}\ntls-key-file {}\ntls-ca-cert-file {}\n\
             tls-auth-clients no\nsave \"\"\nappendonly no\ndir {}\n",
            cert.cert.display(),
            cert.key.display(),
            ca.ca_file().display(),
            dir.display(),
        );
        for user in users {
            config.push_str(&format!("user {user}\n"));
        }
        if !users.is_empty() {
            config.push_str("user default off\n");
        }
        std::fs::write(dir.join("redis.conf"), config).unwrap();
        let child = Command::new("redis-server")
            .arg(dir.join("redis.conf"))
            .stdout(std::fs::File::create(dir.join("server.log")).unwrap())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server on PATH");
        let redis = Self { port, child, dir };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not listen: {}", redis.log());
            std::thread::sleep(Duration::from_millis(20));
        }
        redis
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
