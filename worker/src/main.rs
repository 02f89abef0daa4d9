//! `worker`: consumes the events topic and applies each event's effects (see the library docs).

use std::process::ExitCode;

use common::config::Config;
use common::{shutdown, telemetry};
use worker::Worker;

#[tokio::main]
async fn main() -> ExitCode {
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("worker: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> anyhow::Result<()> {
    let config = Config::from_env()?;
    let telemetry = telemetry::init(&config.log, &config.traces, "highload-worker")?;
    let result = match Worker::build(config).await {
        Ok(worker) => worker.run_until_stopped(shutdown::signal_received()).await,
        Err(err) => Err(err),
    };
    telemetry.shutdown().await;
    result
}
