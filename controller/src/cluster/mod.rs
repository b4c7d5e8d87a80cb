//! The cluster controller's pure decisions and the small API pieces around them (the
//! `virtkube controller` process wires them).
//!
//! - [`orphans`]: per-node finalizers and status entries of nodes that left the cluster.

pub mod orphans;
