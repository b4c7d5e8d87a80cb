//! How the long-running commands (`virtkube agent`, `virtkube controller`) start: the log
//! format they write in and the async runtime they run on until a signal stops them.

use std::future::Future;
use std::process::ExitCode;

use anyhow::Context as _;

/// Log output format.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line (for log collectors).
    Json,
}

/// Sets up logging in `format` (filtered by `RUST_LOG`, `info` by default) and runs
/// `service` on a multi-threaded runtime until it returns.
pub fn run(
    format: LogFormat,
    service: impl Future<Output = anyhow::Result<()>>,
) -> anyhow::Result<ExitCode> {
    init_tracing(format);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(service)?;
    Ok(ExitCode::SUCCESS)
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    let result = match format {
        LogFormat::Json => builder.json().with_current_span(true).try_init(),
        LogFormat::Text => builder.try_init(),
    };
    // A test or an embedding program may have set logging up already; that is not an error.
    if let Err(e) = result {
        eprintln!("logging already initialised: {e}");
    }
}
