//! The connection owner: one libvirt connection by URI, a bounded pool of blocking calls with
//! a timeout per call class, reconnect with backoff, per-call statistics, and the event
//! stream.

use std::collections::BTreeMap;
use std::mem::ManuallyDrop;
use std::os::raw::{c_int, c_void};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use futures::Stream;
use tokio::sync::{Semaphore, broadcast};
use virt::connect::Connect;
use virt::sys;

use crate::error::{EngineError, LibvirtError, ObjectKind, Result};
use crate::events::{self, EngineEvent};
use crate::model::Owner;

/// What a call does, which decides its timeout, whether it counts as mutating, and which
/// pool it waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CallClass {
    /// Reads only: lookups, XML, state, info, stats.
    Query,
    /// Changes configuration: define, undefine, pin, set vCPUs/memory, autostart, volumes.
    Mutate,
    /// Changes power state: start, shutdown, destroy, reboot, suspend, resume, save; these
    /// wait on QEMU and on libvirt's per-domain job lock (up to ~30 s when busy).
    Lifecycle,
    /// Live migration: long, with its own small pool so it never starves other calls.
    Migrate,
}

impl CallClass {
    /// Whether calls of this class change anything on the host.
    pub fn is_mutating(self) -> bool {
        !matches!(self, CallClass::Query)
    }

    /// Stable label for metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            CallClass::Query => "query",
            CallClass::Mutate => "mutate",
            CallClass::Lifecycle => "lifecycle",
            CallClass::Migrate => "migrate",
        }
    }
}

/// Tuning of one [`Engine`].
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Blocking libvirt calls in flight at once (queries, mutations, lifecycle).
    pub max_concurrent_calls: usize,
    /// Migrations in flight at once (separate pool).
    pub max_concurrent_migrations: usize,
    /// Timeout of [`CallClass::Query`] calls (includes waiting for a pool slot).
    pub query_timeout: Duration,
    /// Timeout of [`CallClass::Mutate`] calls.
    pub mutate_timeout: Duration,
    /// Timeout of [`CallClass::Lifecycle`] calls.
    pub lifecycle_timeout: Duration,
    /// Timeout of [`CallClass::Migrate`] calls.
    pub migrate_timeout: Duration,
    /// Timeout of opening the connection (the first connection to a fresh libvirtd probes
    /// QEMU for 7–8 s).
    pub connect_timeout: Duration,
    /// Keepalive interval in seconds (remote connections; `<= 0` disables).
    pub keepalive_interval_secs: i32,
    /// Unanswered keepalives before libvirt closes the connection.
    pub keepalive_count: u32,
    /// First reconnect delay; doubles per failed attempt.
    pub reconnect_initial_backoff: Duration,
    /// Ceiling of the reconnect delay.
    pub reconnect_max_backoff: Duration,
    /// Connection attempts made by one call before it fails with `ConnectionLost`.
    pub reconnect_attempts: u32,
    /// Events buffered per subscriber before it sees [`EngineEvent::Lagged`].
    pub event_buffer: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            max_concurrent_calls: 8,
            max_concurrent_migrations: 2,
            query_timeout: Duration::from_secs(40),
            mutate_timeout: Duration::from_secs(60),
            lifecycle_timeout: Duration::from_secs(120),
            migrate_timeout: Duration::from_secs(3600),
            connect_timeout: Duration::from_secs(60),
            keepalive_interval_secs: 5,
            keepalive_count: 5,
            reconnect_initial_backoff: Duration::from_millis(200),
            reconnect_max_backoff: Duration::from_secs(10),
            reconnect_attempts: 4,
            event_buffer: 4096,
        }
    }
}

impl EngineConfig {
    /// The timeout of a call class.
    pub fn timeout(&self, class: CallClass) -> Duration {
        match class {
            CallClass::Query => self.query_timeout,
            CallClass::Mutate => self.mutate_timeout,
            CallClass::Lifecycle => self.lifecycle_timeout,
            CallClass::Migrate => self.migrate_timeout,
        }
    }
}

/// Counters of one engine call (e.g. `domain_start`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallStat {
    /// Engine call name.
    pub name: &'static str,
    /// Its class.
    pub class: CallClass,
    /// Whether it changes anything on the host.
    pub mutating: bool,
    /// Calls made.
    pub count: u64,
    /// Calls that returned an error.
    pub errors: u64,
    /// Total wall time (including pool wait).
    pub total: Duration,
    /// Slowest call.
    pub max: Duration,
}

/// A snapshot of an engine's call counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EngineStats {
    /// One entry per call name, sorted by name.
    pub calls: Vec<CallStat>,
    /// Successful connections opened after the first one.
    pub reconnects: u64,
}

impl EngineStats {
    /// Total mutating calls (what a converged resync must keep at zero).
    pub fn mutating_calls(&self) -> u64 {
        self.calls
            .iter()
            .filter(|c| c.mutating)
            .map(|c| c.count)
            .sum()
    }

    /// Total calls.
    pub fn total_calls(&self) -> u64 {
        self.calls.iter().map(|c| c.count).sum()
    }

    /// The counters of one call.
    pub fn get(&self, name: &str) -> Option<&CallStat> {
        self.calls.iter().find(|c| c.name == name)
    }
}

/// One open libvirt connection with its callbacks. Closing is explicit
/// ([`ConnHandle::release`]); `virt`'s `Connect` is never dropped (its `Drop` panics when
/// closing fails).
pub(crate) struct ConnHandle {
    conn: ManuallyDrop<Connect>,
    pub(crate) lost: Arc<AtomicBool>,
    event_cb: Mutex<Option<c_int>>,
    close_cb: AtomicBool,
    released: AtomicBool,
}

impl ConnHandle {
    pub(crate) fn conn(&self) -> &Connect {
        &self.conn
    }

    /// Deregisters callbacks and closes the connection; idempotent.
    fn release(&self) -> std::result::Result<(), LibvirtError> {
        if self.released.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        // SAFETY: the pointer is valid until virConnectClose below; callbacks are removed
        // first so libvirt drops its references to the connection.
        unsafe {
            let ptr = self.conn.as_ptr();
            if let Some(id) = self.event_cb.lock().map(|mut g| g.take()).unwrap_or(None) {
                let _ = sys::virConnectDomainEventDeregisterAny(ptr, id);
            }
            if self.close_cb.swap(false, Ordering::SeqCst) {
                let _ = sys::virConnectUnregisterCloseCallback(ptr, Some(on_close));
            }
            if sys::virConnectClose(ptr) < 0 {
                return Err(virt::error::Error::last_error().into());
            }
        }
        Ok(())
    }
}

impl Drop for ConnHandle {
    fn drop(&mut self) {
        if let Err(e) = self.release() {
            tracing::warn!(code = e.code, message = %e.message, "closing libvirt connection failed");
        }
    }
}

unsafe extern "C" fn on_close(_conn: sys::virConnectPtr, reason: c_int, opaque: *mut c_void) {
    // SAFETY: opaque is the Arc<AtomicBool> leaked at registration (freed by free_lost_flag).
    let flag = unsafe { &*(opaque as *const AtomicBool) };
    flag.store(true, Ordering::SeqCst);
    tracing::warn!(reason, "libvirt connection closed by the other side");
}

unsafe extern "C" fn free_lost_flag(opaque: *mut c_void) {
    // SAFETY: matches Arc::into_raw at registration.
    drop(unsafe { Arc::from_raw(opaque as *const AtomicBool) });
}

/// Objects (by kind and libvirt UUID) already verified as carrying a given owner's mark, so
/// repeated changes to the same object skip re-reading the mark. A UUID never moves to another
/// object; the one blind spot is someone editing the mark off an object virtkube created.
#[derive(Clone, Default)]
pub(crate) struct OwnedCache(Arc<Mutex<std::collections::HashSet<OwnedKey>>>);

/// (object kind, object UUID, owner kind, owner UID).
type OwnedKey = (ObjectKind, String, String, String);

impl OwnedCache {
    fn key(kind: ObjectKind, uuid: &str, owner: &Owner) -> OwnedKey {
        (
            kind,
            uuid.to_string(),
            owner.kind.clone(),
            owner.uid.clone(),
        )
    }

    pub(crate) fn contains(&self, kind: ObjectKind, uuid: &str, owner: &Owner) -> bool {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .contains(&Self::key(kind, uuid, owner))
    }

    pub(crate) fn insert(&self, kind: ObjectKind, uuid: &str, owner: &Owner) {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(Self::key(kind, uuid, owner));
    }

    pub(crate) fn forget(&self, kind: ObjectKind, uuid: &str) {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .retain(|(k, u, _, _)| !(*k == kind && u == uuid));
    }

    /// Checks `found` (read lazily) against `expected`, consulting and filling the cache.
    pub(crate) fn check(
        &self,
        kind: ObjectKind,
        name: &str,
        uuid: &str,
        expected: &Owner,
        found: impl FnOnce() -> Result<Option<Owner>>,
    ) -> Result<()> {
        if self.contains(kind, uuid, expected) {
            return Ok(());
        }
        crate::domain::ensure_owned(kind, name, expected, found()?)?;
        self.insert(kind, uuid, expected);
        Ok(())
    }
}

struct Inner {
    owned: OwnedCache,
    owner_memo: crate::stats::OwnerMemo,
    uri: String,
    config: EngineConfig,
    current: Mutex<Option<Arc<ConnHandle>>>,
    reconnect: tokio::sync::Mutex<()>,
    permits: Arc<Semaphore>,
    migrate_permits: Arc<Semaphore>,
    stats: Mutex<BTreeMap<&'static str, CallStat>>,
    connects: AtomicU64,
    events: broadcast::Sender<EngineEvent>,
    closed: AtomicBool,
}

/// One libvirt connection, cheap to clone, safe to share between tasks. Every method is
/// async and runs libvirt's blocking calls on the engine's own bounded pool.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("uri", &self.inner.uri)
            .finish()
    }
}

static EVENT_LOOP: OnceLock<std::result::Result<(), String>> = OnceLock::new();

/// Registers libvirt's default event loop implementation (once per process, before any
/// connection) and runs it on a dedicated thread; also routes libvirt's error printing to
/// `tracing`. [`Engine::connect`] calls it; calling it earlier is harmless.
pub fn ensure_event_loop() -> Result<()> {
    EVENT_LOOP
        .get_or_init(|| {
            crate::error::route_libvirt_errors_to_tracing();
            virt::event::event_register_default_impl().map_err(|e| e.to_string())?;
            std::thread::Builder::new()
                .name("libvirt-events".into())
                .spawn(|| {
                    loop {
                        if let Err(e) = virt::event::event_run_default_impl() {
                            tracing::warn!(error = %e, "libvirt event loop iteration failed");
                            std::thread::sleep(Duration::from_millis(100));
                        }
                    }
                })
                .map_err(|e| e.to_string())?;
            Ok(())
        })
        .clone()
        .map_err(EngineError::Internal)
}

impl Engine {
    /// Opens a connection to `uri` (`test:///default`, `qemu:///system`,
    /// `qemu:///system?socket=…`, `qemu+tcp://host/system`, `qemu+ssh://…`,
    /// `qemu:///embed?root=…`). Must be called inside a tokio runtime.
    pub async fn connect(uri: &str, config: EngineConfig) -> Result<Engine> {
        ensure_event_loop()?;
        let (tx, _) = broadcast::channel(config.event_buffer.max(16));
        let inner = Arc::new(Inner {
            owned: OwnedCache::default(),
            owner_memo: Default::default(),
            uri: uri.to_string(),
            permits: Arc::new(Semaphore::new(config.max_concurrent_calls.max(1))),
            migrate_permits: Arc::new(Semaphore::new(config.max_concurrent_migrations.max(1))),
            config,
            current: Mutex::new(None),
            reconnect: tokio::sync::Mutex::new(()),
            stats: Mutex::new(BTreeMap::new()),
            connects: AtomicU64::new(0),
            events: tx,
            closed: AtomicBool::new(false),
        });
        let engine = Engine { inner };
        // The first connection is opened once, without retries: a wrong URI fails fast.
        let handle = engine.open_once().await?;
        *engine
            .inner
            .current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(handle);
        engine.spawn_watchdog();
        Ok(engine)
    }

    /// The URI this engine connects to.
    pub fn uri(&self) -> &str {
        &self.inner.uri
    }

    /// The configuration.
    pub fn config(&self) -> &EngineConfig {
        &self.inner.config
    }

    /// A snapshot of the call counters.
    pub fn stats(&self) -> EngineStats {
        let calls = self
            .inner
            .stats
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .values()
            .cloned()
            .collect();
        EngineStats {
            calls,
            reconnects: self
                .inner
                .connects
                .load(Ordering::Relaxed)
                .saturating_sub(1),
        }
    }

    /// Zeroes the call counters (e.g. before measuring a resync).
    pub fn reset_stats(&self) {
        self.inner
            .stats
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clear();
    }

    /// Domain lifecycle events from this connection as a stream; it lives as long as the
    /// engine and continues across reconnects (after which it yields
    /// [`EngineEvent::Reconnected`]: events may have been missed, resync).
    pub fn events(&self) -> impl Stream<Item = EngineEvent> + Send + 'static {
        let rx = self.inner.events.subscribe();
        futures::stream::unfold(rx, |mut rx| async move {
            match rx.recv().await {
                Ok(e) => Some((e, rx)),
                Err(broadcast::error::RecvError::Lagged(n)) => Some((EngineEvent::Lagged(n), rx)),
                Err(broadcast::error::RecvError::Closed) => None,
            }
        })
    }

    pub(crate) fn owned_cache(&self) -> OwnedCache {
        self.inner.owned.clone()
    }

    pub(crate) fn owner_memo(&self) -> crate::stats::OwnerMemo {
        self.inner.owner_memo.clone()
    }

    /// Whether the connection is currently believed healthy (no call made).
    pub fn is_connected(&self) -> bool {
        self.inner
            .current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_ref()
            .is_some_and(|c| !c.lost.load(Ordering::SeqCst))
    }

    /// Asks libvirt whether the connection is alive (`virConnectIsAlive`), reconnecting if
    /// it was lost.
    pub async fn ping(&self) -> Result<bool> {
        self.call(CallClass::Query, "connect_is_alive", |c| {
            c.is_alive()
                .map_err(|e| EngineError::libvirt("connect_is_alive", e))
        })
        .await
    }

    /// Closes the connection explicitly and reports libvirt's error if closing fails. Calls
    /// made afterwards fail with [`EngineError::Closed`]; calls in flight finish first (up
    /// to the query timeout).
    pub async fn close(&self) -> Result<()> {
        self.inner.closed.store(true, Ordering::SeqCst);
        let Some(mut handle) = self
            .inner
            .current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
        else {
            return Ok(());
        };
        let deadline = Instant::now() + self.inner.config.query_timeout;
        loop {
            match Arc::try_unwrap(handle) {
                Ok(h) => {
                    let res = tokio::task::spawn_blocking(move || {
                        let r = h.release();
                        drop(h);
                        r
                    })
                    .await
                    .map_err(|e| EngineError::Internal(e.to_string()))?;
                    return res.map_err(|error| EngineError::Libvirt {
                        call: "connect_close",
                        error,
                    });
                }
                Err(h) if Instant::now() < deadline => {
                    handle = h;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(_) => {
                    tracing::warn!(uri = %self.inner.uri, "calls still in flight at close: the connection closes when they return");
                    return Ok(());
                }
            }
        }
    }

    /// Runs one blocking libvirt call on the engine's pool with the class's timeout, counting
    /// it under `name`. Queries that fail because the connection dropped are retried once
    /// after reconnecting; mutations are never retried here.
    pub(crate) async fn call<T, F>(&self, class: CallClass, name: &'static str, f: F) -> Result<T>
    where
        F: Fn(&Connect) -> Result<T> + Send + Sync + 'static,
        T: Send + 'static,
    {
        let start = Instant::now();
        let f = Arc::new(f);
        let mut res = self.call_once(class, name, f.clone()).await;
        if class == CallClass::Query
            && res.as_ref().is_err_and(|e| e.is_connection_error())
            && !self.is_connected()
        {
            tracing::info!(call = name, uri = %self.inner.uri, "connection lost during a query; reconnecting and retrying once");
            res = self.call_once(class, name, f).await;
        }
        let elapsed = start.elapsed();
        let mut stats = self
            .inner
            .stats
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let s = stats.entry(name).or_insert(CallStat {
            name,
            class,
            mutating: class.is_mutating(),
            count: 0,
            errors: 0,
            total: Duration::ZERO,
            max: Duration::ZERO,
        });
        s.count += 1;
        s.total += elapsed;
        s.max = s.max.max(elapsed);
        if res.is_err() {
            s.errors += 1;
        }
        res
    }

    async fn call_once<T, F>(&self, class: CallClass, name: &'static str, f: Arc<F>) -> Result<T>
    where
        F: Fn(&Connect) -> Result<T> + Send + Sync + 'static,
        T: Send + 'static,
    {
        if self.inner.closed.load(Ordering::SeqCst) {
            return Err(EngineError::Closed {
                uri: self.inner.uri.clone(),
            });
        }
        let timeout = self.inner.config.timeout(class);
        let deadline = tokio::time::Instant::now() + timeout;
        let sem = if class == CallClass::Migrate {
            self.inner.migrate_permits.clone()
        } else {
            self.inner.permits.clone()
        };
        let permit = tokio::time::timeout_at(deadline, sem.acquire_owned())
            .await
            .map_err(|_| EngineError::Timeout {
                call: name,
                after: timeout,
            })?
            .map_err(|e| EngineError::Internal(e.to_string()))?;
        let handle = tokio::time::timeout_at(deadline, self.connection())
            .await
            .map_err(|_| EngineError::Timeout {
                call: name,
                after: timeout,
            })??;
        let h2 = handle.clone();
        let task = tokio::task::spawn_blocking(move || {
            // The permit is released only when the libvirt call really returns, so a call
            // that outlived its timeout still occupies its slot: the pool stays bounded.
            let _permit = permit;
            let r = f(h2.conn());
            // Only a connection libvirt itself reports dead is marked lost.
            let lost = r.as_ref().is_err_and(|e| e.is_connection_error())
                && !h2.conn().is_alive().unwrap_or(false);
            (r, lost)
        });

        match tokio::time::timeout_at(deadline, task).await {
            Err(_) => {
                tracing::warn!(call = name, ?timeout, uri = %self.inner.uri, "libvirt call timed out");
                Err(EngineError::Timeout {
                    call: name,
                    after: timeout,
                })
            }
            Ok(Err(join)) => Err(EngineError::Internal(format!("{name} panicked: {join}"))),
            Ok(Ok((r, lost))) => {
                if lost {
                    handle.lost.store(true, Ordering::SeqCst);
                }
                r
            }
        }
    }

    /// The current connection, reconnecting with backoff when it is missing or lost.
    async fn connection(&self) -> Result<Arc<ConnHandle>> {
        if let Some(h) = self.healthy() {
            return Ok(h);
        }
        let _guard = self.inner.reconnect.lock().await;
        if let Some(h) = self.healthy() {
            return Ok(h);
        }
        if self.inner.closed.load(Ordering::SeqCst) {
            return Err(EngineError::Closed {
                uri: self.inner.uri.clone(),
            });
        }
        // Drop the dead connection first (its callbacks cannot fire any more).
        let old = self
            .inner
            .current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(old) = old {
            let _ = tokio::task::spawn_blocking(move || drop(old)).await;
        }
        let cfg = &self.inner.config;
        let mut delay = cfg.reconnect_initial_backoff;
        let mut last = String::new();
        for attempt in 0..cfg.reconnect_attempts.max(1) {
            match self.open_once().await {
                Ok(h) => {
                    *self
                        .inner
                        .current
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(h.clone());
                    tracing::info!(uri = %self.inner.uri, attempt, "reconnected to libvirt");
                    let _ = self.inner.events.send(EngineEvent::Reconnected);
                    return Ok(h);
                }
                Err(e) => {
                    tracing::warn!(uri = %self.inner.uri, attempt, error = %e, "reconnect failed");
                    last = e.to_string();
                }
            }
            if attempt + 1 < cfg.reconnect_attempts {
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(cfg.reconnect_max_backoff);
            }
        }
        Err(EngineError::ConnectionLost {
            uri: self.inner.uri.clone(),
            message: last,
        })
    }

    fn healthy(&self) -> Option<Arc<ConnHandle>> {
        self.inner
            .current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_ref()
            .filter(|h| !h.lost.load(Ordering::SeqCst))
            .cloned()
    }

    /// Opens one connection and registers keepalive, the close callback and the lifecycle
    /// event callback.
    async fn open_once(&self) -> Result<Arc<ConnHandle>> {
        let uri = self.inner.uri.clone();
        let cfg = self.inner.config.clone();
        let tx = self.inner.events.clone();
        let task = tokio::task::spawn_blocking(move || -> Result<ConnHandle> {
            let conn = Connect::open(Some(&uri)).map_err(|e| EngineError::ConnectionLost {
                uri: uri.clone(),
                message: LibvirtError::from(e).message,
            })?;
            let handle = ConnHandle {
                conn: ManuallyDrop::new(conn),
                lost: Arc::new(AtomicBool::new(false)),
                event_cb: Mutex::new(None),
                close_cb: AtomicBool::new(false),
                released: AtomicBool::new(false),
            };
            // From here on, dropping `handle` closes the connection properly.
            if cfg.keepalive_interval_secs > 0
                && let Err(e) = handle
                    .conn()
                    .set_keep_alive(cfg.keepalive_interval_secs, cfg.keepalive_count)
            {
                tracing::debug!(error = %e, "keepalive not supported on this connection");
            }
            // SAFETY: the flag is an Arc leaked into libvirt and freed by free_lost_flag.
            unsafe {
                let flag = Arc::into_raw(handle.lost.clone()) as *mut c_void;
                let r = sys::virConnectRegisterCloseCallback(
                    handle.conn().as_ptr(),
                    Some(on_close),
                    flag,
                    Some(free_lost_flag),
                );
                if r == 0 {
                    handle.close_cb.store(true, Ordering::SeqCst);
                } else {
                    drop(Arc::from_raw(flag as *const AtomicBool));
                }
            }
            match events::register_lifecycle(handle.conn(), tx, uri.clone()) {
                Ok(id) => {
                    *handle
                        .event_cb
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(id)
                }
                Err(e) => tracing::warn!(error = %e, "domain lifecycle events unavailable"),
            }
            Ok(handle)
        });
        let handle = tokio::time::timeout(self.inner.config.connect_timeout, task)
            .await
            .map_err(|_| EngineError::Timeout {
                call: "connect_open",
                after: self.inner.config.connect_timeout,
            })?
            .map_err(|e| EngineError::Internal(e.to_string()))??;
        self.inner.connects.fetch_add(1, Ordering::Relaxed);
        Ok(Arc::new(handle))
    }

    /// A background task that notices a lost connection (close callback, keepalive) and
    /// reconnects even when no call is being made, so the event stream resumes.
    fn spawn_watchdog(&self) {
        let weak: Weak<Inner> = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            loop {
                tick.tick().await;
                let Some(inner) = weak.upgrade() else { return };
                if inner.closed.load(Ordering::SeqCst) {
                    return;
                }
                let engine = Engine { inner };
                if engine.healthy().is_none()
                    && let Err(e) = engine.connection().await
                {
                    tracing::debug!(error = %e, "watchdog reconnect failed; will retry");
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn stuck_call_times_out_and_keeps_its_slot() {
        let cfg = EngineConfig {
            max_concurrent_calls: 1,
            query_timeout: Duration::from_millis(100),
            ..EngineConfig::default()
        };
        let e = Engine::connect("test:///default", cfg).await.unwrap();
        // A call that blocks longer than its timeout (as a libvirt call stuck on a job lock).
        let slow = e
            .call(CallClass::Query, "slow", |_c| {
                std::thread::sleep(Duration::from_millis(400));
                Ok(())
            })
            .await;
        assert!(matches!(
            slow,
            Err(EngineError::Timeout { call: "slow", .. })
        ));
        // Its thread still holds the only slot: the next call waits and times out too, so the
        // pool stays bounded even when calls hang.
        let next = e
            .call(CallClass::Query, "next", |c| {
                c.is_alive().map_err(|e| EngineError::libvirt("next", e))
            })
            .await;
        assert!(matches!(
            next,
            Err(EngineError::Timeout { call: "next", .. })
        ));
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert!(e.ping().await.unwrap());
        let stats = e.stats();
        assert_eq!(stats.get("slow").unwrap().errors, 1);
        assert!(!stats.get("slow").unwrap().mutating);
        e.close().await.unwrap();
    }
}
