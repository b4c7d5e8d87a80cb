//! The agent's two Kubernetes clients, with timeouts and retries chosen so that no call
//! waits on a dead server for minutes.
//!
//! kube's defaults suit a short-lived tool better than a node agent: no read timeout (a
//! request to a hung server, or over a connection that died with it, waits forever), a
//! 30 s connect timeout, and a retry layer that retries 429/503/504 up to 15 times with
//! delays growing to minutes (one request can sit out a sick server's whole outage, and
//! well beyond its return). So:
//!
//! - **Requests** (reads, status writes, finalizers, events): a read timeout of
//!   [`REQUEST_TIMEOUT`], counted from when the request was sent. Healthy answers take
//!   milliseconds; the API server itself gives up on a request after 60 s, and API
//!   priority and fairness queues one for at most 15 s before answering 429. A timed-out
//!   request fails its reconcile, which is retried.
//! - **Watches** (lists and watch streams): a read timeout of [`WATCH_READ_TIMEOUT`], above
//!   the server-side watch length (`watches::WATCH_TIMEOUT_SECONDS`, after which the
//!   server ends a quiet watch itself), so a quiet but live watch is never cut, while a
//!   watch request that gets no answer at all is.
//! - Both: a connect timeout of [`CONNECT_TIMEOUT`] (a connect that takes longer goes
//!   nowhere), and at most [`RETRIES`] retries of 429/503/504 with short delays (honouring
//!   `Retry-After`); beyond that the failure goes to the caller's own backoff, which the
//!   server's return resets.

use std::time::Duration;

use kube::client::ClientBuilder;
use kube::client::retry::RetryPolicy;
use kube::{Client, Config};
use tower::buffer::BufferLayer;
use tower::retry::RetryLayer;

/// How long a request may wait for its answer.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(20);

/// How long a watch or list may go without receiving anything.
pub const WATCH_READ_TIMEOUT: Duration = Duration::from_secs(75);

/// How long connecting to the API server may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Retries of 429/503/504 within one call.
pub const RETRIES: u32 = 3;

/// Requests queued in front of the retry layer (it needs a cloneable service).
const BUFFER: usize = 1024;

/// The client for requests.
pub fn requests(config: &Config) -> Result<Client, kube::Error> {
    build(config, REQUEST_TIMEOUT)
}

/// The client for watches.
pub fn watches(config: &Config) -> Result<Client, kube::Error> {
    build(config, WATCH_READ_TIMEOUT)
}

/// `config` with the agent's timeouts and without kube's own retry layer.
pub fn tuned(config: &Config, read_timeout: Duration) -> Config {
    let mut config = config.clone();
    config.connect_timeout = Some(CONNECT_TIMEOUT);
    config.read_timeout = Some(read_timeout);
    // Count the read timeout from when the request was written, not from when its
    // pooled connection went idle.
    config.reset_reader_on_write = true;
    config.default_retry = false;
    config
}

fn build(config: &Config, read_timeout: Duration) -> Result<Client, kube::Error> {
    let policy = RetryPolicy::new(
        Duration::from_millis(100),
        Duration::from_secs(2),
        RETRIES,
        true,
    )
    .map_err(|e| kube::Error::Service(Box::new(e)))?;
    Ok(ClientBuilder::try_from(tuned(config, read_timeout))?
        .with_layer(&BufferLayer::new(BUFFER))
        .with_layer(&RetryLayer::new(policy))
        .build())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_quiet_watch_ends_on_the_server_before_the_client_gives_up_on_it() {
        let server_side =
            Duration::from_secs(u64::from(super::super::watches::WATCH_TIMEOUT_SECONDS));
        assert!(WATCH_READ_TIMEOUT > server_side + Duration::from_secs(10));
        // Longer than API priority and fairness may queue a request.
        assert!(REQUEST_TIMEOUT > Duration::from_secs(15));
        let config = Config::new("http://127.0.0.1:1".parse().unwrap());
        let tuned = tuned(&config, REQUEST_TIMEOUT);
        assert_eq!(tuned.read_timeout, Some(REQUEST_TIMEOUT));
        assert_eq!(tuned.connect_timeout, Some(CONNECT_TIMEOUT));
        assert!(tuned.reset_reader_on_write);
        assert!(!tuned.default_retry);
    }
}
