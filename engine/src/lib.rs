//! virtkube's node engine: a typed, async API over one libvirt connection.
//!
//! * [`Engine`] owns one connection (by URI), runs every blocking libvirt call on its own
//!   bounded pool with a timeout per [`CallClass`], reconnects with backoff, counts calls
//!   ([`Engine::stats`]) and streams domain lifecycle events ([`Engine::events`]).
//! * [`model`] holds the typed desired/observed models and their XML (pure).
//! * One module per libvirt object kind adds its verbs to [`Engine`]: [`domain`],
//!   [`network`], [`pool`], [`volume`], [`node`], [`migrate`], [`hotplug`]; [`stats`] gathers
//!   run-time statistics of virtkube's domains in one bulk call.
//! * [`EngineError`] keeps libvirt's code, domain and message, and says whether a retry helps;
//!   [`explain`] adds virtkube's explanation and next step to the errors users cause.
//!
//! Every object the engine creates carries virtkube's ownership mark (see [`model::owner`]);
//! the engine refuses to change or delete an object that does not carry the expected mark.

pub mod domain;
mod engine;
pub mod error;
pub mod events;
pub mod explain;
pub mod hotplug;
pub mod migrate;
pub mod model;
pub mod network;
pub mod node;
mod object;
pub mod pool;
pub mod stats;
pub mod typed_params;
pub mod volume;

pub use engine::{CallClass, CallStat, Engine, EngineConfig, EngineStats, ensure_event_loop};
pub use error::{EngineError, LibvirtError, ObjectKind, Result};
pub use events::{DomainEvent, DomainEventKind, EngineEvent};
pub use model::Owner;
pub use virtkube_crds::cpuset::CpuSet;
