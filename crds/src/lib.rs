//! virtkube's Kubernetes API, group `virtkube.io`, version `v1alpha1`.
//!
//! Every other part of virtkube (the planner, the agent, the local CLI) speaks these types.
//! Five kinds mirror libvirt's objects:
//!
//! | Kind | Scope | libvirt object |
//! |---|---|---|
//! | [`Domain`] | namespaced | `virDomain` |
//! | [`Volume`] | namespaced | `virStorageVol` |
//! | [`Network`] | cluster | `virNetwork` |
//! | [`StoragePool`] | cluster | `virStoragePool` |
//! | [`HypervisorNode`] | cluster, status only | node info and capabilities |
//!
//! Schema validation lives in the CRDs ([`crd::all`]); the same rules are checked again by
//! [`validation::Validate`], because CEL is optional on Kubernetes 1.24 and absent without a
//! cluster.

// kube's `printcolumn(type_ = "string", …)` repeats the same key in sibling columns, which
// clippy mistakes for a duplicated attribute.
#![allow(clippy::duplicated_attributes)]

pub mod cel_cost;
pub mod conditions;
pub mod cpuset;
pub mod crd;
pub mod descriptions;
pub mod domain;
pub mod hypervisor_node;
pub mod manifest;
pub mod names;
pub mod network;
pub mod quantity;
pub mod schema_check;
pub mod schema_validate;
pub mod storage_pool;
pub mod validation;
pub mod volume;

pub use domain::{Domain, DomainSpec, DomainStatus};
pub use hypervisor_node::{HypervisorNode, HypervisorNodeSpec, HypervisorNodeStatus};
pub use network::{Network, NetworkSpec, NetworkStatus};
pub use storage_pool::{StoragePool, StoragePoolSpec, StoragePoolStatus};
pub use volume::{Volume, VolumeSpec, VolumeStatus};

/// The API group of every virtkube kind.
pub const GROUP: &str = "virtkube.io";
/// The API version of every virtkube kind.
pub const VERSION: &str = "v1alpha1";
/// `apiVersion` as written in manifests.
pub const API_VERSION: &str = "virtkube.io/v1alpha1";
