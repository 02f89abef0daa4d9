//! A private PostgreSQL server per test, for the faults a shared server cannot take: stopping it
//! outright and starting it again.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A PostgreSQL cluster in a temporary directory, listening on 127.0.0.1:`port`; removed when dropped.
pub struct PrivatePostgres {
    /// Its port.
    pub port: u16,
    dir: PathBuf,
    bin: PathBuf,
    /// Server options beyond the port and socket (TLS settings).
    extra_options: String,
}

impl PrivatePostgres {
    /// Creates the cluster (trust authentication, user `postgres`) and starts it. `fsync` is off (an
    /// immediate stop kills processes, not the machine, so the OS still holds every write), but
    /// commits do write their WAL before returning: an acknowledged write must survive the stop.
    pub fn start() -> Self {
        Self::launch(None)
    }

    /// Like [`PrivatePostgres::start`], serving TLS with this certificate (`ssl=on`); plain-text
    /// connections are still accepted, as PostgreSQL does by default.
    pub fn start_with_tls(cert: &crate::tls::ServerCert) -> Self {
        Self::launch(Some(cert))
    }

    fn launch(tls: Option<&crate::tls::ServerCert>) -> Self {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .expect("PostgreSQL server binaries under /usr/lib/postgresql")
            .flatten()
            .map(|entry| entry.path().join("bin"))
            .filter(|bin| bin.join("initdb").exists())
            .max()
            .expect("an initdb under /usr/lib/postgresql/*/bin");
        let dir = std::env::temp_dir().join(format!("hlms-pg-{}", crate::unique()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut extra_options = String::new();
        if let Some(cert) = tls {
            // Copied in, so that the server's owner owns the key (PostgreSQL insists).
            std::fs::copy(&cert.cert, dir.join("server.crt")).unwrap();
            std::fs::copy(&cert.key, dir.join("server.key")).unwrap();
            extra_options.push_str(&format!(
                " -c ssl=on -c ssl_cert_file={0}/server.crt -c ssl_key_file={0}/server.key",
                dir.display()
            ));
        }
        // PostgreSQL refuses to run as root; CI runs tests as root.
        if is_root() {
            run(Command::new("chown").args(["-R", "postgres:postgres"]).arg(&dir));
        }
        let pg = Self { port: crate::closed_port(), dir, bin, extra_options };
        pg.run_as_owner("initdb", &["-A", "trust", "-U", "postgres", "--no-sync", "-D"], Some(&pg.dir.join("data")));
        pg.start_server();
        let (socket_dir, port) = (pg.dir.display().to_string(), pg.port.to_string());
        let create_role = format!("CREATE ROLE {} LOGIN", crate::RUNTIME_ROLE);
        pg.run_as_owner("psql", &["-h", &socket_dir, "-p", &port, "-U", "postgres", "-qc", &create_role], None);
        pg
    }

    /// Starts the server (again) and waits until it accepts connections.
    pub fn start_server(&self) {
        let options = format!(
            "-p {} -c listen_addresses=127.0.0.1 -k {} -c fsync=off{}",
            self.port,
            self.dir.display(),
            self.extra_options
        );
        let log = self.dir.join("server.log");
        self.run_as_owner(
            "pg_ctl",
            &["-w", "-o", &options, "-l", log.to_str().unwrap(), "start", "-D"],
            Some(&self.dir.join("data")),
        );
    }

    /// The server's log so far (for a failing test's message).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }

    /// Stops the server at once, as a crash or a kill would (`pg_ctl stop -m immediate`).
    pub fn stop_server(&self) {
        self.run_as_owner("pg_ctl", &["-w", "-m", "immediate", "stop", "-D"], Some(&self.dir.join("data")));
    }

    /// Runs `sql` as the superuser on database `postgres` (settings, roles).
    pub fn execute(&self, sql: &str) {
        let (socket_dir, port) = (self.dir.display().to_string(), self.port.to_string());
        self.run_as_owner("psql", &["-h", &socket_dir, "-p", &port, "-U", "postgres", "-qc", sql], None);
    }

    /// Freezes the server and its backends (`SIGSTOP`), as a paused VM or a hung host would: its
    /// sockets stay open and the kernel still acknowledges packets, but nothing answers.
    pub fn freeze(&self) {
        self.signal_all("STOP");
    }

    /// Lets a frozen server run again.
    pub fn thaw(&self) {
        self.signal_all("CONT");
    }

    /// Signals the postmaster's children, then the postmaster (which forks no new ones while stopped).
    fn signal_all(&self, signal: &str) {
        let Ok(pid_file) = std::fs::read_to_string(self.dir.join("data/postmaster.pid")) else { return };
        let pid = pid_file.lines().next().unwrap_or_default().trim().to_owned();
        let _ = Command::new("pkill").args([&format!("-{signal}"), "-P", &pid]).status();
        let _ = Command::new("kill").args([&format!("-{signal}"), &pid]).status();
    }

    fn run_as_owner(&self, tool: &str, args: &[&str], path_arg: Option<&Path>) {
        let mut command = self.owner_command(tool);
        command.args(args);
        if let Some(path) = path_arg {
            command.arg(path);
        }
        run(&mut command);
    }

    /// `tool` run as the cluster's owner (`postgres` when the tests run as root).
    fn owner_command(&self, tool: &str) -> Command {
        let program = self.bin.join(tool);
        if is_root() {
            let mut command = Command::new("runuser");
            command.args(["-u", "postgres", "--"]).arg(program);
            command
        } else {
            Command::new(program)
        }
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        // A frozen server would never stop.
        self.thaw();
        let _ =
            self.owner_command("pg_ctl").args(["-m", "immediate", "stop", "-D"]).arg(self.dir.join("data")).output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().is_ok_and(|output| output.stdout.starts_with(b"0\n"))
}

fn run(command: &mut Command) {
    let output = command.output().unwrap_or_else(|err| panic!("{command:?}: {err}"));
    assert!(
        output.status.success(),
        "{command:?} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}
