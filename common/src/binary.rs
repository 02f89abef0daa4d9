//! What every binary's `main` does around its own work: read the configuration, install logging
//! (and trace export), run, flush the traces, and turn an error into a message and exit code 1.

use std::process::ExitCode;

use crate::config::Config;
use crate::telemetry;

/// Runs `work` as the whole of binary `name`; `service` names it in traces unless
/// `OTEL_SERVICE_NAME` does.
pub async fn run<F, Fut>(name: &str, service: &'static str, work: F) -> ExitCode
where
    F: FnOnce(Config) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let result = async {
        let config = Config::from_env()?;
        let telemetry = telemetry::init(&config.log, &config.traces, service)?;
        let result = work(config).await;
        telemetry.shutdown().await;
        result
    }
    .await;
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // The subscriber may not be installed (a bad configuration), so this goes to stderr directly.
            eprintln!("{name}: {err:#}");
            ExitCode::FAILURE
        }
    }
}
