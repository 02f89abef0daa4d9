//! `api [serve]` runs the HTTP API; `api migrate` applies pending migrations and exits.

use std::process::ExitCode;

use anyhow::anyhow;
use api::{App, db};
use common::config::{AuthConfig, Config};
use common::{shutdown, telemetry};

#[tokio::main]
async fn main() -> ExitCode {
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // The subscriber may not be installed yet (bad config), so this goes to stderr directly.
            eprintln!("api: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> anyhow::Result<()> {
    let config = Config::from_env()?;
    let telemetry = telemetry::init(&config.log, &config.traces, "highload-api")?;
    let result = match std::env::args().nth(1).as_deref() {
        Some("migrate") => db::migrate(&config.database).await,
        None | Some("serve") => serve(config).await,
        Some(other) => Err(anyhow!("unknown command {other:?}: expected `serve` (the default) or `migrate`")),
    };
    telemetry.shutdown().await;
    result
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let auth = AuthConfig::from_env()?;
    App::build(config, &auth).await?.run_until_stopped(shutdown::signal_received()).await
}
