//! The agent's one error type. Every variant has a stable metric label, so the failure
//! counter can be broken down without parsing messages.

use virtkube_engine::EngineError;

/// Everything a reconcile, the start-up checks or the publishers can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A call to the Kubernetes API failed.
    #[error("Kubernetes API call failed: {0}")]
    Kube(#[source] kube::Error),

    /// A status written as a compare-and-swap did not happen (the object changed since it
    /// was read, is gone, or the API failed).
    #[error("{0}")]
    Write(#[from] crate::placement::write::WriteError),

    /// A libvirt call made through the engine failed.
    #[error("libvirt: {0}")]
    Engine(#[source] EngineError),

    /// Adding or removing the finalizer, or the work inside it, failed. Boxed because the
    /// finalizer error wraps this very type.
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),

    /// The spec cannot be realized on this node as written (a missing pool or network, a
    /// CPU the host lacks, a libvirt refusal). Reported as `Ready=False` with `reason`.
    #[error("{reason}: {message}")]
    Unrealizable {
        /// CamelCase reason, as written in the condition and the event.
        reason: &'static str,
        /// What and why, for a human.
        message: String,
    },

    /// A volume cannot be deleted while anything uses it (a domain or another volume,
    /// through any copy-on-write chain, on this node or as a resource).
    #[error("volume is in use by {users}: its deletion waits until none of them uses it")]
    VolumeInUse {
        /// What uses it, as people read them (`Domain team/web`, `Volume team/overlay`,
        /// `libvirt domain legacy (not virtkube's)`), comma-separated.
        users: String,
    },

    /// The object lacks a field every stored object has (name, namespace, uid).
    #[error("object has no {0}")]
    MissingField(&'static str),

    /// A status or event body could not be serialized.
    #[error("serialization failed: {0}")]
    Serialization(#[source] serde_json::Error),

    /// The virtkube CRDs are not installed; the message says how to install them.
    #[error("{0}")]
    CrdsMissing(String),

    /// The metrics and health server could not start.
    #[error("metrics server on {addr}: {source}")]
    MetricsServer {
        /// The address asked for.
        addr: std::net::SocketAddr,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
}

impl From<kube::Error> for Error {
    fn from(e: kube::Error) -> Self {
        Error::Kube(e)
    }
}

impl From<EngineError> for Error {
    fn from(e: EngineError) -> Self {
        Error::Engine(e)
    }
}

impl From<kube::runtime::finalizer::Error<Error>> for Error {
    fn from(e: kube::runtime::finalizer::Error<Error>) -> Self {
        Error::Finalizer(Box::new(e))
    }
}

impl Error {
    /// A stable, low-cardinality label for the failure counter.
    pub fn metric_label(&self) -> String {
        match self {
            Error::Kube(_) => "kube".into(),
            Error::Write(e) if e.is_conflict() => "conflict".into(),
            Error::Write(_) => "status_write".into(),
            Error::Engine(e) => format!("libvirt_{}", e.metric_label()),
            Error::Finalizer(inner) => match inner.as_ref() {
                kube::runtime::finalizer::Error::ApplyFailed(e)
                | kube::runtime::finalizer::Error::CleanupFailed(e) => e.metric_label(),
                kube::runtime::finalizer::Error::AddFinalizer(_)
                | kube::runtime::finalizer::Error::RemoveFinalizer(_) => "finalizer_patch".into(),
                _ => "finalizer".into(),
            },
            Error::Unrealizable { reason, .. } => format!("unrealizable_{reason}"),
            Error::VolumeInUse { .. } => "volume_in_use".into(),
            Error::MissingField(_) => "missing_field".into(),
            Error::Serialization(_) => "serialization".into(),
            Error::CrdsMissing(_) => "crds_missing".into(),
            Error::MetricsServer { .. } => "metrics_server".into(),
        }
    }

    /// The condition reason and message this error is reported with in status and events.
    pub fn reason_and_message(&self) -> (&'static str, String) {
        match self {
            Error::Unrealizable { reason, message } => (reason, message.clone()),
            Error::VolumeInUse { .. } => ("VolumeInUse", self.to_string()),
            Error::Engine(e) if e.is_not_owned() => ("NotOwned", e.to_string()),
            Error::Engine(e) => ("LibvirtError", e.to_string()),
            Error::Finalizer(inner) => match inner.as_ref() {
                kube::runtime::finalizer::Error::ApplyFailed(e)
                | kube::runtime::finalizer::Error::CleanupFailed(e) => e.reason_and_message(),
                _ => ("FinalizerFailed", self.to_string()),
            },
            _ => ("ReconcileFailed", self.to_string()),
        }
    }

    /// Whether the object changed under the reconcile: reading it again (not waiting out a
    /// backoff) is the answer.
    pub fn is_conflict(&self) -> bool {
        matches!(self, Error::Write(e) if e.is_conflict())
    }
}

/// The agent's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
