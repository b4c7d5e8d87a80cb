//! The crash campaigns' shared parts: seeded scenarios, the fleets that are killed and
//! restarted (in-process instances or real processes), the invariant checks and the counts.

#![allow(dead_code)]

pub mod campaign;
pub mod check;
pub mod cleanup;
pub mod inprocess;
pub mod rng;
pub mod scenario;
