//! The command-line front ends, one module per subcommand.

pub mod apply;
pub mod cluster;
pub mod common;
pub mod crd;
pub mod delete;
pub mod get;
pub mod plan;
pub mod status;
