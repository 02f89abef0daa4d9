//! Logging: one subscriber per process, JSON lines by default (SPEC §6).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

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

/// Lets through at most one log line per period: for failures a retry loop meets over and over
/// (a dependency down), where one line per attempt would drown everything else.
#[derive(Debug)]
pub struct Throttle {
    period: Duration,
    /// When a line was last let through, in seconds since the epoch (0: never).
    last: AtomicU64,
}

impl Throttle {
    /// At most one line per `period` (whole seconds).
    pub const fn new(period: Duration) -> Self {
        Self { period, last: AtomicU64::new(0) }
    }

    /// Whether a line may be written now; if so, the next one waits a period.
    pub fn allow(&self) -> bool {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
        let last = self.last.load(Ordering::Relaxed);
        now >= last.saturating_add(self.period.as_secs())
            && self.last.compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throttle_lets_one_line_through_per_period() {
        let throttle = Throttle::new(Duration::from_secs(3600));
        assert!(throttle.allow());
        assert!(!throttle.allow());
        assert!(Throttle::new(Duration::ZERO).allow());
    }
}
