//! Termination signals: the first SIGTERM or SIGINT starts a graceful shutdown, a second exits at once.

use tokio::signal::unix::{SignalKind, signal};

/// Exit status after a second signal (128 + SIGINT, as shells report an interrupted process).
const FORCED_EXIT_CODE: i32 = 130;

/// Resolves on the first SIGTERM or SIGINT, and arms the second-signal hard exit.
pub async fn signal_received() {
    let (Ok(mut terminate), Ok(mut interrupt)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt()))
    else {
        tracing::error!("cannot listen for termination signals; only SIGKILL will stop this process");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = terminate.recv() => tracing::info!(signal = "SIGTERM", "shutdown requested"),
        _ = interrupt.recv() => tracing::info!(signal = "SIGINT", "shutdown requested"),
    }
    tokio::spawn(async move {
        tokio::select! {
            _ = terminate.recv() => {}
            _ = interrupt.recv() => {}
        }
        tracing::warn!("second signal: exiting immediately");
        std::process::exit(FORCED_EXIT_CODE);
    });
}
