//! Logging: one subscriber per process, JSON lines by default (SPEC §6).

use crate::config::{LogConfig, LogFormat};
use anyhow::Context;
use tracing_subscriber::EnvFilter;

/// Installs the global subscriber. Fails on a bad `LOG_LEVEL`, naming it.
pub fn init(config: &LogConfig) -> anyhow::Result<()> {
    let filter = EnvFilter::try_new(&config.level)
        .with_context(|| format!("invalid value for LOG_LEVEL: {:?}", config.level))?;
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stdout);
    let result = match config.format {
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(true).with_span_list(false).try_init(),
        LogFormat::Text => builder.try_init(),
    };
    result.map_err(|err| anyhow::anyhow!(err)).context("failed to install the log subscriber")
}
