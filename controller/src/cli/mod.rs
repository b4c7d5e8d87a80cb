//! The command-line front ends, one module per subcommand.

pub mod crd;
