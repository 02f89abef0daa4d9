//! `worker`: consumes the events topic and applies each event's effects (see the library docs).

use std::process::ExitCode;

use common::shutdown;
use worker::Worker;

#[tokio::main]
async fn main() -> ExitCode {
    common::binary::run("worker", "highload-worker", |config| async move {
        Worker::build(config).await?.run_until_stopped(shutdown::signal_received()).await
    })
    .await
}
