//! A binary of this workspace run as a child process, its stdout lines collected for the test to read.

use std::collections::HashMap;
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// A running child; killed when dropped.
pub struct Process {
    /// The child itself.
    pub child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    /// Reads stdout until the child closes it.
    reader: Option<tokio::task::JoinHandle<()>>,
}

impl Process {
    /// Starts `program` with exactly `vars` as its environment; stderr goes to the test's.
    pub fn spawn(program: &Path, vars: &HashMap<String, String>) -> Self {
        Self::spawn_command(Command::new(program), vars)
    }

    /// Like [`Process::spawn`], for a command already prepared (e.g. [`crate::Netns::command`]).
    pub fn spawn_command(mut command: Command, vars: &HashMap<String, String>) -> Self {
        let mut child = command
            .env_clear()
            .envs(vars)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|err| panic!("cannot start {:?}: {err}", command.as_std()));
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stdout = child.stdout.take().unwrap();
        let collected = Arc::clone(&lines);
        let reader = tokio::spawn(async move {
            let mut reader = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                collected.lock().unwrap().push(line);
            }
        });
        Self { child, lines, reader: Some(reader) }
    }

    /// Sends SIGTERM (or SIGINT).
    pub fn signal(&self, signal: &str) {
        let pid = self.child.id().expect("running").to_string();
        let status = std::process::Command::new("kill").args([&format!("-{signal}"), &pid]).status().unwrap();
        assert!(status.success(), "kill -{signal} {pid}");
    }

    /// Waits for the exit; panics past `timeout`.
    /// Its last lines are collected by then (the exit alone raced the reader: a test read no lines).
    pub async fn exit_within(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let status = tokio::time::timeout(timeout, self.child.wait()).await.expect("exited in time").unwrap();
        if let Some(reader) = self.reader.take() {
            tokio::time::timeout(timeout, reader).await.expect("stdout closed in time").expect("reader finished");
        }
        status
    }

    /// Every stdout line so far.
    pub fn output(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    /// The first stdout line containing `needle`, waiting for it up to `timeout`.
    pub async fn line_containing(&self, needle: &str, timeout: Duration) -> String {
        crate::eventually(&format!("a line containing {needle:?}"), timeout, || async {
            self.output().into_iter().find(|line| line.contains(needle))
        })
        .await
    }
}
