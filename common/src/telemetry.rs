//! Logging (one subscriber per process, JSON lines by default: SPEC §6) and, when configured, trace
//! export (see [`crate::traces`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::config::{LogConfig, LogFormat, TracesConfig};
use crate::traces::{self, Exporter};
use anyhow::Context;
use tracing::level_filters::LevelFilter;
use tracing_subscriber::filter::{EnvFilter, FilterExt, filter_fn};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{Layer, Registry};

/// What [`init`] installed; [`Telemetry::shutdown`] exports the spans still queued.
pub struct Telemetry {
    exporter: Option<Exporter>,
}

impl Telemetry {
    /// Call once the process's work is done: exports what is left (a blocking call, run off the
    /// async workers so that a gRPC export can still make progress on them).
    pub async fn shutdown(self) {
        if let Some(exporter) = self.exporter {
            let _ = tokio::task::spawn_blocking(move || exporter.shutdown()).await;
        }
    }
}

/// Installs the global subscriber: log lines per `log`, spans to OTLP per `traces` (`service`
/// names the binary when `OTEL_SERVICE_NAME` does not). Fails on a bad `LOG_LEVEL`, naming it.
pub fn init(log: &LogConfig, traces: &TracesConfig, service: &'static str) -> anyhow::Result<Telemetry> {
    let filter =
        EnvFilter::try_new(&log.level).with_context(|| format!("invalid value for LOG_LEVEL: {:?}", log.level))?;
    // Trace-only spans stay out of log lines, whatever LOG_LEVEL enables.
    // (The hint keeps EnvFilter's most verbose level the subscriber's, so that a `log` record or event
    // below it is still dropped by one comparison.)
    let not_trace_only = filter_fn(|metadata| metadata.target() != traces::CHILD_TARGET);
    let filter = filter.and(not_trace_only.with_max_level_hint(LevelFilter::TRACE));
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stdout);
    let logs = match log.format {
        LogFormat::Json => {
            fmt.json().flatten_event(true).with_current_span(true).with_span_list(false).with_filter(filter).boxed()
        }
        LogFormat::Text => fmt.with_filter(filter).boxed(),
    };
    let mut layers = vec![logs];
    let exporter = match &traces.export {
        Some(export) => {
            let (spans, exporter) = traces::exporter::<Registry>(export, service)?;
            layers.push(spans.boxed());
            Some(exporter)
        }
        None => None,
    };
    tracing_subscriber::registry()
        .with(layers)
        .try_init()
        .map_err(|err| anyhow::anyhow!(err))
        .context("failed to install the log subscriber")?;
    Ok(Telemetry { exporter })
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
