//! Domain lifecycle events, delivered by libvirt's event loop thread into a broadcast
//! channel that outlives reconnects.

use std::ffi::CStr;
use std::os::raw::{c_char, c_int, c_void};
use std::time::SystemTime;

use tokio::sync::broadcast;
use virt::connect::Connect;
use virt::sys;

use crate::error::{EngineError, Result};

/// libvirt's `virDomainEventType`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DomainEventKind {
    /// Defined (created or updated).
    Defined,
    /// Undefined.
    Undefined,
    /// Started (booted, migrated in, restored…).
    Started,
    /// Suspended (paused).
    Suspended,
    /// Resumed.
    Resumed,
    /// Stopped (shut down, destroyed, crashed, migrated away, saved, failed).
    Stopped,
    /// Guest shutdown finished.
    Shutdown,
    /// Suspended by guest power management.
    PmSuspended,
    /// Crashed (panicked).
    Crashed,
    /// An event type this engine does not know.
    Unknown,
}

impl DomainEventKind {
    fn from_raw(v: c_int) -> Self {
        match v {
            0 => DomainEventKind::Defined,
            1 => DomainEventKind::Undefined,
            2 => DomainEventKind::Started,
            3 => DomainEventKind::Suspended,
            4 => DomainEventKind::Resumed,
            5 => DomainEventKind::Stopped,
            6 => DomainEventKind::Shutdown,
            7 => DomainEventKind::PmSuspended,
            8 => DomainEventKind::Crashed,
            _ => DomainEventKind::Unknown,
        }
    }
}

/// libvirt's detail word for an event (`booted`, `migrated`, `destroyed`, `paused`, …).
pub fn event_detail_name(kind: DomainEventKind, detail: c_int) -> &'static str {
    let table: &[&str] = match kind {
        DomainEventKind::Defined => &["added", "updated", "renamed", "from snapshot"],
        DomainEventKind::Undefined => &["removed", "renamed"],
        DomainEventKind::Started => &["booted", "migrated", "restored", "from snapshot", "wakeup"],
        DomainEventKind::Suspended => &[
            "paused",
            "migrated",
            "I/O error",
            "watchdog",
            "restored",
            "from snapshot",
            "api error",
            "post-copy",
            "post-copy failed",
        ],
        DomainEventKind::Resumed => &[
            "unpaused",
            "migrated",
            "from snapshot",
            "post-copy",
            "post-copy failed",
        ],
        DomainEventKind::Stopped => &[
            "shutdown",
            "destroyed",
            "crashed",
            "migrated",
            "saved",
            "failed",
            "from snapshot",
        ],
        DomainEventKind::Shutdown => &["finished", "guest", "host"],
        DomainEventKind::PmSuspended => &["memory", "disk"],
        DomainEventKind::Crashed => &["panicked", "crashloaded"],
        DomainEventKind::Unknown => &[],
    };
    usize::try_from(detail)
        .ok()
        .and_then(|d| table.get(d))
        .copied()
        .unwrap_or("unknown")
}

/// One domain lifecycle event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainEvent {
    /// Connection URI it came from.
    pub uri: String,
    /// Domain name.
    pub name: String,
    /// Domain UUID.
    pub uuid: String,
    /// Event type.
    pub kind: DomainEventKind,
    /// Detail word (`booted`, `migrated`, `destroyed`, …).
    pub detail: &'static str,
    /// Raw libvirt event type.
    pub raw_event: i32,
    /// Raw libvirt detail.
    pub raw_detail: i32,
    /// When the engine received it.
    pub received: SystemTime,
}

/// What [`crate::Engine::events`] yields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EngineEvent {
    /// A domain lifecycle event.
    Domain(DomainEvent),
    /// The connection was re-established: events may have been missed, resync.
    Reconnected,
    /// This subscriber fell behind and lost this many events: resync.
    Lagged(u64),
}

struct Sink {
    tx: broadcast::Sender<EngineEvent>,
    uri: String,
}

unsafe extern "C" fn lifecycle_cb(
    _conn: sys::virConnectPtr,
    dom: sys::virDomainPtr,
    event: c_int,
    detail: c_int,
    opaque: *mut c_void,
) -> c_int {
    // SAFETY: opaque is the Box<Sink> registered below, alive until free_sink; `dom` is valid
    // for the callback; name and UUID are read from the local object (no RPC).
    unsafe {
        let sink = &*(opaque as *const Sink);
        let name_ptr = sys::virDomainGetName(dom);
        let name = if name_ptr.is_null() {
            String::new()
        } else {
            CStr::from_ptr(name_ptr).to_string_lossy().into_owned()
        };
        let mut buf = [0 as c_char; 64];
        let uuid = if sys::virDomainGetUUIDString(dom, buf.as_mut_ptr()) == 0 {
            CStr::from_ptr(buf.as_ptr()).to_string_lossy().into_owned()
        } else {
            String::new()
        };
        let kind = DomainEventKind::from_raw(event);
        let ev = DomainEvent {
            uri: sink.uri.clone(),
            name,
            uuid,
            kind,
            detail: event_detail_name(kind, detail),
            raw_event: event,
            raw_detail: detail,
            received: SystemTime::now(),
        };
        tracing::debug!(domain = %ev.name, kind = ?ev.kind, detail = ev.detail, "libvirt domain event");
        let _ = sink.tx.send(EngineEvent::Domain(ev));
    }
    0
}

unsafe extern "C" fn free_sink(opaque: *mut c_void) {
    // SAFETY: matches Box::into_raw in register_lifecycle.
    drop(unsafe { Box::from_raw(opaque as *mut Sink) });
}

/// Registers the lifecycle callback on `conn`; returns libvirt's callback id.
pub(crate) fn register_lifecycle(
    conn: &Connect,
    tx: broadcast::Sender<EngineEvent>,
    uri: String,
) -> Result<c_int> {
    type LifecycleCb = unsafe extern "C" fn(
        sys::virConnectPtr,
        sys::virDomainPtr,
        c_int,
        c_int,
        *mut c_void,
    ) -> c_int;
    type GenericCb = unsafe extern "C" fn(sys::virConnectPtr, sys::virDomainPtr, *mut c_void);
    let sink = Box::into_raw(Box::new(Sink { tx, uri })) as *mut c_void;
    // SAFETY: libvirt calls the callback with the signature matching the event id
    // (VIR_DOMAIN_EVENT_CALLBACK does the same cast in C).
    let id = unsafe {
        let cb: GenericCb = std::mem::transmute::<LifecycleCb, GenericCb>(lifecycle_cb);
        sys::virConnectDomainEventRegisterAny(
            conn.as_ptr(),
            std::ptr::null_mut(),
            sys::VIR_DOMAIN_EVENT_ID_LIFECYCLE as c_int,
            Some(cb),
            sink,
            Some(free_sink),
        )
    };
    if id < 0 {
        // SAFETY: libvirt did not take the box.
        drop(unsafe { Box::from_raw(sink as *mut Sink) });
        return Err(EngineError::libvirt(
            "domain_event_register",
            virt::error::Error::last_error(),
        ));
    }
    Ok(id)
}
