//! virtkube's controller crate: the planner (pure), the executors, and the command line.
//!
//! - [`plan`]: (desired, observed) → ordered [`plan::Plan`]; no I/O.
//! - [`host`]: reading libvirt hosts into the planner's observed model, and carrying out
//!   single actions through the engine.
//! - [`execute`]: runs a plan: independent actions in parallel (bounded), dependents in
//!   order; a failure stops only what depends on it.
//! - [`placement`]: the placement protocol (who may run a domain, how it moves), pure.
//! - [`agent`]: `virtkube agent`, the per-node Kubernetes operator process.
//! - [`cluster`]: `virtkube controller`, the cluster-wide process (scheduling, moves, drain,
//!   node liveness), one active replica by Lease.
//! - [`events`]: Kubernetes Events with repeats folded into series, for both processes.
//! - [`progress`]: showing long actions' progress (bars on a terminal, lines otherwise).
//! - [`cli`]: the `virtkube` subcommands.
//! - [`service`]: how the long-running commands start (logging, the async runtime).

pub mod agent;
pub mod cli;
pub mod cluster;
pub mod event_queue;
pub mod events;
pub mod execute;
pub mod host;
pub mod http_server;
pub mod placement;
pub mod plan;
pub mod progress;
pub mod service;
