//! One error type for everything the engine does, keeping libvirt's own code, domain and
//! message, and saying whether a retry can help.

use std::os::raw::c_void;
use std::time::Duration;

use virt::sys;

use crate::model::{Owner, XmlError};

/// The kinds of libvirt object the engine manages (used in errors and ownership checks).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ObjectKind {
    /// A `virDomain`.
    Domain,
    /// A `virNetwork`.
    Network,
    /// A `virStoragePool`.
    Pool,
    /// A `virStorageVol`.
    Volume,
}

impl std::fmt::Display for ObjectKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ObjectKind::Domain => "domain",
            ObjectKind::Network => "network",
            ObjectKind::Pool => "storage pool",
            ObjectKind::Volume => "storage volume",
        })
    }
}

/// An error from libvirt, as libvirt reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LibvirtError {
    /// `virErrorNumber` (e.g. 42 = `VIR_ERR_NO_DOMAIN`).
    pub code: i32,
    /// `virErrorDomain`: the libvirt subsystem that raised it.
    pub domain: i32,
    /// libvirt's message.
    pub message: String,
    /// Human-readable names of code and domain, as the `virt` crate prints them.
    pub code_name: String,
    /// Name of the error domain.
    pub domain_name: String,
}

impl From<virt::error::Error> for LibvirtError {
    fn from(e: virt::error::Error) -> Self {
        Self {
            code: e.code().to_raw() as i32,
            domain: e.domain().to_raw() as i32,
            message: e.message().to_string(),
            code_name: e.code().to_string(),
            domain_name: e.domain().to_string(),
        }
    }
}

/// Everything that can go wrong in the engine.
#[derive(Debug, Clone, thiserror::Error)]
pub enum EngineError {
    /// libvirt refused or failed a call. The message ends with virtkube's explanation and
    /// next step when [`crate::explain::explain`] has one.
    #[error("{call}: libvirt error {}: {} (code {}, from {}){}", .error.code_name, .error.message, .error.code, .error.domain_name, crate::explain::beside(self))]
    Libvirt {
        /// The engine call that failed.
        call: &'static str,
        /// What libvirt said.
        error: LibvirtError,
    },
    /// A live migration failed; `dest_uri` is the destination as the source libvirtd was
    /// given it (after [`crate::explain::peer_uri_for`]).
    #[error("migrating to {dest_uri}: {cause}")]
    Migration {
        /// The destination URI the source libvirtd was given.
        dest_uri: String,
        /// Why it failed.
        cause: Box<EngineError>,
    },
    /// The object does not exist.
    #[error("{call}: {kind} `{name}` not found{}", crate::explain::beside(self))]
    NotFound {
        /// The engine call that failed.
        call: &'static str,
        /// Kind of object.
        kind: ObjectKind,
        /// The name (or key, UUID, path) looked up.
        name: String,
    },
    /// The object exists but does not carry virtkube's mark for the expected owner: the
    /// engine never changes or deletes it.
    #[error("{kind} `{name}` is not owned by {expected}: {}{}", match .found { Some(o) => format!("it is marked as owned by {o}"), None => "it carries no virtkube ownership mark".to_string() }, crate::explain::beside(self))]
    NotOwned {
        /// Kind of object.
        kind: ObjectKind,
        /// libvirt name.
        name: String,
        /// The owner the caller expected.
        expected: Box<Owner>,
        /// The owner found on the object, if any mark was found.
        found: Option<Box<Owner>>,
    },
    /// A volume's key differs from the key the caller recorded when it created the volume
    /// (volumes carry no mark in libvirt: the recorded key is their ownership proof).
    #[error(
        "storage volume `{pool}/{name}` is not the one virtkube created: key is `{found}`, recorded `{recorded}`"
    )]
    VolumeKeyMismatch {
        /// Pool name.
        pool: String,
        /// Volume name.
        name: String,
        /// The key the caller recorded.
        recorded: String,
        /// The key found.
        found: String,
    },
    /// A call did not finish within its class's timeout. The libvirt call itself may still be
    /// running on its blocking thread (libvirt calls cannot be interrupted); its pool slot is
    /// only released when it returns.
    #[error("{call}: no answer from libvirt within {after:?}")]
    Timeout {
        /// The engine call.
        call: &'static str,
        /// The timeout that expired.
        after: Duration,
    },
    /// The connection to libvirt is gone and could not be re-established (yet).
    #[error("connection to {uri} lost: {message}{}", crate::explain::beside(self))]
    ConnectionLost {
        /// The connection URI.
        uri: String,
        /// Why.
        message: String,
    },
    /// [`crate::Engine::close`] was called.
    #[error("engine for {uri} is closed")]
    Closed {
        /// The connection URI.
        uri: String,
    },
    /// The request itself is invalid (e.g. pinning to no CPU, a vCPU count of zero).
    #[error("invalid request: {}{}", .0, crate::explain::beside(self))]
    InvalidSpec(String),
    /// A size change would make a volume or a guest's disk smaller than it is: refused,
    /// because it would cut the data at its end.
    #[error("{what} is {current} bytes: shrinking it to {requested} bytes is refused")]
    ShrinkRefused {
        /// What would shrink (`storage volume pool/name`, `disk vda of domain team.web`).
        what: String,
        /// Its size now, bytes.
        current: u64,
        /// The size asked for, bytes.
        requested: u64,
    },
    /// libvirt returned XML the engine could not read.
    #[error("{0}")]
    Xml(#[from] XmlError),
    /// A bug or an impossible state inside the engine (a panicked blocking task…).
    #[error("internal engine error: {0}")]
    Internal(String),
}

/// The engine's result type.
pub type Result<T, E = EngineError> = std::result::Result<T, E>;

/// What libvirt's RPC layer says when the peer went away (the same codes also carry e.g.
/// "Failed to connect socket to virtlogd", which is not our connection's fault).
const LOST_CONNECTION_MESSAGES: &[&str] = &[
    "End of file while reading data",
    "Cannot write data",
    "Cannot recv data",
    "client socket is closed",
    "Broken pipe",
    "Connection reset",
    "connection closed",
];

fn code_in(code: i32, set: &[u32]) -> bool {
    set.iter().any(|&c| c as i32 == code)
}

/// Maps a `virt` error of engine call `call` to [`EngineError::Libvirt`] (for `map_err`).
pub(crate) fn lv(call: &'static str) -> impl Fn(virt::error::Error) -> EngineError {
    move |e| EngineError::libvirt(call, e)
}

/// The reads of an object found a moment ago, with "not found" meaning it is gone: another
/// client undefined it between the lookup and the reads (a host observation lists first and
/// reads each object after, and must not fail because one vanished in between).
pub(crate) fn gone_is_none<T>(read: Result<T>) -> Result<Option<T>> {
    match read {
        Ok(v) => Ok(Some(v)),
        Err(e) if e.is_not_found() => Ok(None),
        Err(e) => Err(e),
    }
}

/// Whether a size change from `current` to `requested` bytes is a growth to make: `false`
/// for the same size, [`EngineError::ShrinkRefused`] (naming `what()`) for a smaller one.
pub(crate) fn growth(what: impl FnOnce() -> String, current: u64, requested: u64) -> Result<bool> {
    if requested < current {
        return Err(EngineError::ShrinkRefused {
            what: what(),
            current,
            requested,
        });
    }
    Ok(requested > current)
}

impl EngineError {
    /// Wraps a libvirt error raised by `call`, mapping "no such object" codes to
    /// [`EngineError::NotFound`] when the looked-up `name` is known.
    pub fn libvirt(call: &'static str, e: virt::error::Error) -> Self {
        EngineError::Libvirt {
            call,
            error: e.into(),
        }
    }

    /// Like [`EngineError::libvirt`], but turns libvirt's "no such …" codes into
    /// [`EngineError::NotFound`] for `kind`/`name`.
    pub fn lookup(call: &'static str, kind: ObjectKind, name: &str, e: virt::error::Error) -> Self {
        let err = Self::libvirt(call, e);
        if err.is_not_found() {
            EngineError::NotFound {
                call,
                kind,
                name: name.to_string(),
            }
        } else {
            err
        }
    }

    /// libvirt's error code, when this error came from libvirt.
    pub fn libvirt_code(&self) -> Option<i32> {
        match self {
            EngineError::Migration { cause, .. } => cause.libvirt_code(),
            EngineError::Libvirt { error, .. } => Some(error.code),
            _ => None,
        }
    }

    /// The object does not exist (typed, or any of libvirt's "no such …" codes).
    pub fn is_not_found(&self) -> bool {
        if let EngineError::Migration { cause, .. } = self {
            return cause.is_not_found();
        }
        match self {
            EngineError::NotFound { .. } => true,
            EngineError::Libvirt { error, .. } => code_in(
                error.code,
                &[
                    sys::VIR_ERR_NO_DOMAIN,
                    sys::VIR_ERR_NO_NETWORK,
                    sys::VIR_ERR_NO_STORAGE_POOL,
                    sys::VIR_ERR_NO_STORAGE_VOL,
                ],
            ),
            _ => false,
        }
    }

    /// The object is not virtkube's (for the expected owner or recorded key).
    pub fn is_not_owned(&self) -> bool {
        if let EngineError::Migration { cause, .. } = self {
            return cause.is_not_owned();
        }
        matches!(
            self,
            EngineError::NotOwned { .. } | EngineError::VolumeKeyMismatch { .. }
        )
    }

    /// The object already exists (define/create of a name that is taken).
    pub fn is_already_exists(&self) -> bool {
        if let EngineError::Migration { cause, .. } = self {
            return cause.is_already_exists();
        }
        matches!(self, EngineError::Libvirt { error, .. } if code_in(error.code, &[
            sys::VIR_ERR_DOM_EXIST,
            sys::VIR_ERR_NETWORK_EXIST,
            sys::VIR_ERR_STORAGE_VOL_EXIST,
        ]))
    }

    /// The connection itself failed (as opposed to the call): reconnecting may help.
    pub fn is_connection_error(&self) -> bool {
        if let EngineError::Migration { cause, .. } = self {
            return cause.is_connection_error();
        }
        match self {
            EngineError::ConnectionLost { .. } => true,
            EngineError::Libvirt { error, .. } => {
                code_in(
                    error.code,
                    &[
                        sys::VIR_ERR_NO_CONNECT,
                        sys::VIR_ERR_INVALID_CONN,
                        sys::VIR_ERR_RPC,
                    ],
                ) || ((error.code == sys::VIR_ERR_SYSTEM_ERROR as i32
                    || error.code == sys::VIR_ERR_INTERNAL_ERROR as i32)
                    && error.domain == sys::VIR_FROM_RPC as i32
                    && LOST_CONNECTION_MESSAGES
                        .iter()
                        .any(|m| error.message.contains(m)))
            }
            _ => false,
        }
    }

    /// Whether trying the same call again later can succeed without anyone changing the
    /// request: timeouts, lost connections, busy resources, libvirt's state-change lock.
    /// Permanent: not found, not owned, invalid arguments or XML, "operation invalid" (e.g.
    /// starting a running domain), unsupported operations.
    pub fn is_retryable(&self) -> bool {
        if let EngineError::Migration { cause, .. } = self {
            return cause.is_retryable();
        }
        if crate::explain::is_permanent(self) {
            return false;
        }
        match self {
            EngineError::Timeout { .. } | EngineError::ConnectionLost { .. } => true,
            EngineError::Libvirt { error, .. } => {
                self.is_connection_error()
                    || code_in(
                        error.code,
                        &[
                            sys::VIR_ERR_OPERATION_TIMEOUT,
                            sys::VIR_ERR_RESOURCE_BUSY,
                            sys::VIR_ERR_AGENT_UNRESPONSIVE,
                            sys::VIR_ERR_OPERATION_ABORTED,
                            sys::VIR_ERR_OPERATION_FAILED,
                            sys::VIR_ERR_INTERNAL_ERROR,
                        ],
                    )
            }
            _ => false,
        }
    }

    /// A stable, low-cardinality label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            EngineError::Migration { cause, .. } => cause.metric_label(),
            EngineError::Libvirt { .. } if self.is_connection_error() => "connection",
            EngineError::Libvirt { .. } if self.is_not_found() => "not_found",
            EngineError::Libvirt { .. } => "libvirt",
            EngineError::NotFound { .. } => "not_found",
            EngineError::NotOwned { .. } | EngineError::VolumeKeyMismatch { .. } => "not_owned",
            EngineError::Timeout { .. } => "timeout",
            EngineError::ConnectionLost { .. } => "connection",
            EngineError::Closed { .. } => "closed",
            EngineError::InvalidSpec(_) => "invalid_spec",
            EngineError::ShrinkRefused { .. } => "shrink_refused",
            EngineError::Xml(_) => "xml",
            EngineError::Internal(_) => "internal",
        }
    }
}

unsafe extern "C" fn log_libvirt_error(_data: *mut c_void, err: sys::virErrorPtr) {
    if err.is_null() {
        return;
    }
    // SAFETY: libvirt hands us a valid virError for the duration of the callback.
    let (code, domain, message) = unsafe {
        let e = &*err;
        let msg = if e.message.is_null() {
            String::new()
        } else {
            std::ffi::CStr::from_ptr(e.message)
                .to_string_lossy()
                .into_owned()
        };
        (e.code, e.domain, msg)
    };
    // The error is also returned to the caller, which decides how loud it is.
    tracing::debug!(target: "virtkube_engine::libvirt", code, domain, %message, "libvirt reported an error");
}

/// Replaces libvirt's default error handler (which prints every error to stderr) with one
/// that logs through `tracing` at debug level. Called by [`crate::Engine::connect`]; safe to
/// call more than once.
pub fn route_libvirt_errors_to_tracing() {
    // SAFETY: sets a process-global function pointer; the handler is a plain function.
    unsafe { sys::virSetErrorFunc(std::ptr::null_mut(), Some(log_libvirt_error)) };
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lv(code: u32, domain: u32, message: &str) -> EngineError {
        EngineError::Libvirt {
            call: "t",
            error: LibvirtError {
                code: code as i32,
                domain: domain as i32,
                message: message.into(),
                code_name: String::new(),
                domain_name: String::new(),
            },
        }
    }

    #[test]
    fn an_object_undefined_between_lookup_and_read_is_gone_not_an_error() {
        let gone = lv(
            sys::VIR_ERR_NO_NETWORK,
            sys::VIR_FROM_NETWORK,
            "Network not found: no network with matching uuid",
        );
        assert!(matches!(gone_is_none::<u8>(Err(gone)), Ok(None)));
        assert!(matches!(gone_is_none(Ok(7u8)), Ok(Some(7))));
        let other = lv(sys::VIR_ERR_INTERNAL_ERROR, sys::VIR_FROM_NETWORK, "boom");
        assert!(gone_is_none::<u8>(Err(other)).is_err());
    }

    #[test]
    fn classification() {
        let gone = lv(
            sys::VIR_ERR_SYSTEM_ERROR,
            sys::VIR_FROM_RPC,
            "End of file while reading data: Input/output error",
        );
        assert!(gone.is_connection_error() && gone.is_retryable());
        let virtlogd = lv(
            sys::VIR_ERR_SYSTEM_ERROR,
            sys::VIR_FROM_RPC,
            "Failed to connect socket to '/run/libvirt/virtlogd-sock'",
        );
        assert!(!virtlogd.is_connection_error());
        let missing = lv(
            sys::VIR_ERR_NO_DOMAIN,
            sys::VIR_FROM_QEMU,
            "Domain not found",
        );
        assert!(missing.is_not_found() && !missing.is_retryable());
        assert_eq!(missing.metric_label(), "not_found");
        let invalid = lv(
            sys::VIR_ERR_OPERATION_INVALID,
            sys::VIR_FROM_QEMU,
            "domain is not running",
        );
        assert!(!invalid.is_retryable());
        let busy = lv(
            sys::VIR_ERR_OPERATION_TIMEOUT,
            sys::VIR_FROM_QEMU,
            "cannot acquire state change lock",
        );
        assert!(busy.is_retryable() && !busy.is_connection_error());
        let t = EngineError::Timeout {
            call: "x",
            after: Duration::from_secs(1),
        };
        assert!(t.is_retryable());
        assert_eq!(t.metric_label(), "timeout");
        // libvirt words these as internal errors; retrying cannot help.
        let same_host = lv(
            sys::VIR_ERR_INTERNAL_ERROR,
            sys::VIR_FROM_QEMU,
            "Attempt to migrate guest to the same host 5a5a5a5a-0000-4000-8000-0000000000a1",
        );
        assert!(!same_host.is_retryable());
        let no_lvm = lv(
            sys::VIR_ERR_INTERNAL_ERROR,
            sys::VIR_FROM_STORAGE,
            "Child process (/sbin/vgcreate x) unexpected exit status 127",
        );
        assert!(no_lvm.is_retryable(), "outside a pool call it says nothing");
        let exists = lv(
            sys::VIR_ERR_STORAGE_VOL_EXIST,
            sys::VIR_FROM_STORAGE,
            "exists",
        );
        assert!(exists.is_already_exists());
    }
}
