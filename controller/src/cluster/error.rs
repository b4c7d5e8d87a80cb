//! The controller's one error type.

/// What the controller's start-up and its leader's work can fail with. Failures of single
/// writes during a pass are logged and counted, then retried at the next pass.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A call to the Kubernetes API failed.
    #[error("Kubernetes API call failed: {0}")]
    Kube(#[from] kube::Error),

    /// The start-up CRD check failed (the message says how to install them).
    #[error("{0}")]
    Agent(#[from] crate::agent::error::Error),

    /// A watch of the cluster's objects ended.
    #[error("the watch of {0} ended; the leader's work restarts")]
    WatchEnded(&'static str),

    /// The metrics and health server could not start.
    #[error("metrics server on {addr}: {source}")]
    MetricsServer {
        /// The address asked for.
        addr: std::net::SocketAddr,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },

    /// A flag's value is out of range.
    #[error("{0}")]
    Flag(String),
}
