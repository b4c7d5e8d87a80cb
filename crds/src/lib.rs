//! virtkube's Kubernetes API, group `virtkube.io`, version `v1alpha1`.
//!
//! Every other part of virtkube (the engine's callers, the planner, the agent, the local CLI)
//! speaks these types. See `DESIGN.md` for the object model.

pub mod cpuset;
