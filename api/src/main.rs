//! `api [serve]` runs the HTTP API; `api migrate` applies pending migrations and exits.

use std::process::ExitCode;

use anyhow::bail;
use api::{App, db};
use common::config::AuthConfig;
use common::shutdown;

#[tokio::main]
async fn main() -> ExitCode {
    common::binary::run("api", "highload-api", |config| async move {
        match std::env::args().nth(1).as_deref() {
            Some("migrate") => db::migrate(&config.database).await,
            None | Some("serve") => {
                let auth = AuthConfig::from_env()?;
                App::build(config, &auth).await?.run_until_stopped(shutdown::signal_received()).await
            }
            Some(other) => bail!("unknown command {other:?}: expected `serve` (the default) or `migrate`"),
        }
    })
    .await
}
