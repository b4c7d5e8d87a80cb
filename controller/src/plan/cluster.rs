//! A preview of what a cluster would do with a set of manifests (`virtkube plan
//! --kubeconfig`): the same planner as the local CLI, run against the observed model built
//! from the cluster's reports ([`reported`](super::reported)), with the cluster's own rules
//! around it. Pure: the caller reads the cluster.
//!
//! What it adds to the local plan:
//! - **Placement as the cluster decides it**: a Domain or Volume without `spec.nodeName`
//!   stays where it is held (`status.nodeName`), or is planned on [`UNSCHEDULED`] when the
//!   controller has not bound it yet; a changed `spec.nodeName` is a move (live when the
//!   guest runs, cold otherwise); pools and networks go to the nodes their `nodeSelector`
//!   selects.
//! - **The API server's refusals**: the CRDs' transition rules (immutable fields), evaluated
//!   with the stored object as `oldSelf`, and the schema and CEL rules of each manifest.
//! - **The agent's refusals**: [`Validate`], as the agent runs it before every reconcile
//!   (`SpecValid=False`), reported as forbidden.
//! - **Deletions** (`prune`): objects in the cluster that the manifests no longer describe.

use std::collections::{BTreeMap, BTreeSet};

use kube::ResourceExt;
use serde_json::Value;
use virtkube_crds::manifest::{Manifest, ManifestError, Object};
use virtkube_crds::names::host_name;
use virtkube_crds::validation::Validate;

use super::desired::DesiredState;
use super::reported::{self, ClusterState, UNSCHEDULED};
use super::{Notice, NoticeKind, ObjectKind, ObjectRef, Plan, PlanOptions};

/// What a cluster plan covers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClusterPlanOptions {
    /// Also delete objects of virtkube's kinds in the cluster that the manifests do not
    /// describe.
    pub prune: bool,
}

/// A cluster plan: the plan and what the reader should know about the nodes.
#[derive(Debug, Clone, Default)]
pub struct ClusterPlan {
    /// Actions and notices, as the local plan has them.
    pub plan: Plan,
    /// Nodes that are not Ready, or that objects name without a `HypervisorNode`.
    pub node_notes: Vec<String>,
}

/// Identity of an object across manifests and cluster: (kind, namespace, name).
type Key = (&'static str, Option<String>, String);

fn meta_of(object: &Object) -> &kube::api::ObjectMeta {
    match object {
        Object::Domain(o) => &o.metadata,
        Object::Volume(o) => &o.metadata,
        Object::Network(o) => &o.metadata,
        Object::StoragePool(o) => &o.metadata,
    }
}

fn meta_mut(object: &mut Object) -> &mut kube::api::ObjectMeta {
    match object {
        Object::Domain(o) => &mut o.metadata,
        Object::Volume(o) => &mut o.metadata,
        Object::Network(o) => &mut o.metadata,
        Object::StoragePool(o) => &mut o.metadata,
    }
}

fn key_of(object: &Object) -> Key {
    let meta = meta_of(object);
    let namespace = match object {
        Object::Domain(_) | Object::Volume(_) => {
            Some(meta.namespace.clone().unwrap_or_else(|| "default".into()))
        }
        Object::Network(_) | Object::StoragePool(_) => None,
    };
    (
        object.kind(),
        namespace,
        meta.name.clone().unwrap_or_default(),
    )
}

fn object_ref(object: &Object) -> ObjectRef {
    let (_, namespace, name) = key_of(object);
    let kind = match object {
        Object::Domain(_) => ObjectKind::Domain,
        Object::Volume(_) => ObjectKind::Volume,
        Object::Network(_) => ObjectKind::Network,
        Object::StoragePool(_) => ObjectKind::StoragePool,
    };
    match namespace {
        Some(ns) => ObjectRef::new(kind, &host_name(Some(&ns), &name), &format!("{ns}/{name}")),
        None => ObjectRef::new(kind, &name, &name),
    }
}

fn spec_errors(object: &Object) -> virtkube_crds::validation::FieldErrors {
    match object {
        Object::Domain(o) => o.spec.validate(),
        Object::Volume(o) => o.spec.validate(),
        Object::Network(o) => o.spec.validate(),
        Object::StoragePool(o) => o.spec.validate(),
    }
}

fn to_json(object: &Object) -> Value {
    let value = match object {
        Object::Domain(o) => serde_json::to_value(o),
        Object::Volume(o) => serde_json::to_value(o),
        Object::Network(o) => serde_json::to_value(o),
        Object::StoragePool(o) => serde_json::to_value(o),
    };
    value.unwrap_or(Value::Null)
}

/// The CRDs' transition rules (`oldSelf`), as an API server that evaluates CEL applies them
/// to an update of `stored` into `wanted`: each broken rule as (field, message).
struct Transitions {
    schemas: BTreeMap<String, Value>,
    cel: kube::core::cel::Validator,
}

impl Transitions {
    fn new() -> Self {
        let schemas = virtkube_crds::crd::all()
            .into_iter()
            .filter_map(|crd| {
                let schema = crd
                    .spec
                    .versions
                    .first()?
                    .schema
                    .as_ref()?
                    .open_api_v3_schema
                    .as_ref()?;
                Some((
                    crd.spec.names.kind.clone(),
                    serde_json::to_value(schema).ok()?,
                ))
            })
            .collect();
        Self {
            schemas,
            cel: kube::core::cel::Validator::new(),
        }
    }

    fn broken(&self, wanted: &Object, stored: &Object) -> Vec<(String, String)> {
        let Some(schema) = self.schemas.get(wanted.kind()) else {
            return Vec::new();
        };
        let (new, old) = (to_json(wanted), to_json(stored));
        // Only what the update itself breaks: a rule the manifest breaks on its own was
        // reported when it was read.
        let alone: BTreeSet<(String, String)> = match self.cel.validate(schema, &new, None) {
            Ok(()) => BTreeSet::new(),
            Err(errors) => errors
                .iter()
                .map(|e| (e.field_path.clone(), e.message.clone()))
                .collect(),
        };
        match self.cel.validate(schema, &new, Some(&old)) {
            Ok(()) => Vec::new(),
            Err(errors) => errors
                .iter()
                .map(|e| (e.field_path.clone(), e.message.clone()))
                .filter(|e| !alone.contains(e))
                .collect(),
        }
    }
}

/// Plans `manifests` against what `cluster` reports. `refused` are the manifest refusals of
/// the schema and CEL gates (as the API server would refuse them): each becomes an error on
/// its object, and the rest is still planned.
pub fn plan_cluster(
    manifests: &[Manifest],
    refused: &[ManifestError],
    cluster: &ClusterState,
    options: &ClusterPlanOptions,
) -> ClusterPlan {
    let mut notices = Vec::new();
    let mut invalid = |object: ObjectRef, node: &str, kind: NoticeKind, message: String| {
        notices.push(Notice {
            kind,
            object,
            node: node.to_string(),
            message,
            changes: Vec::new(),
            users: Vec::new(),
        });
    };
    for e in refused {
        let display = e
            .object
            .clone()
            .unwrap_or_else(|| e.file.display().to_string());
        let field = e
            .field
            .as_deref()
            .map(|f| format!("{f}: "))
            .unwrap_or_default();
        // The object as `Kind ns/name`: keep the kind out of the display.
        let (kind, display) = match display.split_once(' ') {
            Some(("Domain", d)) => (ObjectKind::Domain, d.to_string()),
            Some(("Volume", d)) => (ObjectKind::Volume, d.to_string()),
            Some(("Network", d)) => (ObjectKind::Network, d.to_string()),
            Some(("StoragePool", d)) => (ObjectKind::StoragePool, d.to_string()),
            _ => (ObjectKind::Domain, display.clone()),
        };
        let name = display.replacen('/', ".", 1);
        invalid(
            ObjectRef::new(kind, &name, &display),
            "",
            NoticeKind::Invalid,
            format!(
                "{} (document {}): the API server refuses this manifest: {field}{}",
                e.file.display(),
                e.document.map_or_else(|| "?".into(), |d| d.to_string()),
                e.message
            ),
        );
    }

    let stored: BTreeMap<Key, Object> = cluster
        .as_manifests()
        .into_iter()
        .map(|m| (key_of(&m.object), m.object))
        .collect();
    let nodes = cluster.node_names();
    let transitions = Transitions::new();
    let mut kept: Vec<Manifest> = Vec::new();
    for m in manifests {
        let object_ref = object_ref(&m.object);
        let origin = format!(
            "{} (document {})",
            m.source.file.display(),
            m.source.document
        );
        let mut object = m.object.clone();
        let old = stored.get(&key_of(&object));
        if let Some(old) = old {
            // The same resource: the owner mark on its libvirt objects carries its UID.
            meta_mut(&mut object).uid = meta_of(old).uid.clone();
        }
        let errors = spec_errors(&object);
        if !errors.is_empty() {
            invalid(
                object_ref,
                "",
                NoticeKind::Forbidden,
                format!(
                    "{origin}: the agent refuses this spec (SpecValid=False, InvalidSpec): {errors}"
                ),
            );
            continue;
        }
        if let Some(old) = old {
            let broken = transitions.broken(&object, old);
            if !broken.is_empty() {
                let what = broken
                    .iter()
                    .map(|(f, msg)| format!("{f}: {msg}"))
                    .collect::<Vec<_>>()
                    .join("; ");
                invalid(
                    object_ref,
                    "",
                    NoticeKind::Forbidden,
                    format!(
                        "{origin}: the API server refuses this change to the stored object (a transition rule of the CRD; where CEL is off, as on Kubernetes 1.24, virtkube refuses it instead): {what}"
                    ),
                );
                continue;
            }
        }
        let named = match &object {
            Object::Domain(d) => d.spec.node_name.clone(),
            Object::Volume(v) => v.spec.node_name.clone(),
            _ => None,
        };
        if let Some(node) = named
            && !nodes.contains(&node)
        {
            invalid(
                object_ref,
                &node,
                NoticeKind::Invalid,
                format!(
                    "{origin}: spec.nodeName: no HypervisorNode {node} in this cluster (`kubectl get hypervisornodes` lists the nodes)"
                ),
            );
            continue;
        }
        kept.push(Manifest {
            source: m.source.clone(),
            object,
        });
    }

    let all = cluster.all_nodes();
    let (mut desired, from_manifests) = DesiredState::from_manifests(&kept, &all);
    notices.extend(from_manifests);
    place(&mut desired, &kept, cluster, &stored);

    let reported = reported::observe(cluster);
    let mut observed = reported.state;
    // Wherever the controller will place an unbound object, what it needs is there (the
    // controller only binds to a node that has its networks and pools).
    let unscheduled = observed.host_mut(UNSCHEDULED);
    for p in &desired.pools {
        unscheduled.pools.insert(
            p.name.clone(),
            reported::pool_observed(p, true, p.autostart),
        );
    }
    for n in &desired.networks {
        unscheduled.networks.insert(
            n.name.clone(),
            reported::network_observed(n, None, true, n.autostart),
        );
    }

    let mut plan = super::plan(&desired, &observed, &PlanOptions { prune: false });
    if options.prune {
        let wanted: BTreeSet<Key> = manifests.iter().map(|m| key_of(&m.object)).collect();
        let gone: Vec<Manifest> = cluster
            .as_manifests()
            .into_iter()
            .filter(|m| !wanted.contains(&key_of(&m.object)))
            .collect();
        let (mut doomed, _) = DesiredState::from_manifests(&gone, &all);
        place(&mut doomed, &gone, cluster, &stored);
        plan.append(super::plan_delete(&doomed, &observed));
    }
    plan.notices.extend(notices);
    plan.notices.extend(reported.notes.into_iter().filter(|n| {
        // Notes about objects the manifests do not touch would only be noise, unless the
        // plan deletes them.
        manifests.iter().any(|m| object_ref(&m.object) == n.object) || options.prune
    }));
    ClusterPlan {
        plan,
        node_notes: reported.node_notes,
    }
}

/// Puts each desired object where the cluster would: Domains and Volumes without
/// `spec.nodeName` on their holder (or [`UNSCHEDULED`]), pools and networks on the nodes
/// their `nodeSelector` selects.
fn place(
    desired: &mut DesiredState,
    manifests: &[Manifest],
    cluster: &ClusterState,
    stored: &BTreeMap<Key, Object>,
) {
    let holder = |key: &Key| -> Option<String> {
        match stored.get(key)? {
            Object::Domain(d) => d.status.as_ref()?.node_name.clone(),
            Object::Volume(v) => v.status.as_ref()?.node_name.clone(),
            _ => None,
        }
    };
    let unnamed: BTreeMap<String, Key> = manifests
        .iter()
        .filter(|m| match &m.object {
            Object::Domain(d) => d.spec.node_name.is_none(),
            Object::Volume(v) => v.spec.node_name.is_none(),
            _ => false,
        })
        .map(|m| (object_ref(&m.object).name, key_of(&m.object)))
        .collect();
    let node_of = |name: &str| {
        unnamed
            .get(name)
            .map(|key| holder(key).unwrap_or_else(|| UNSCHEDULED.to_string()))
    };
    for d in &mut desired.domains {
        if let Some(node) = node_of(&d.name) {
            d.node = node;
        }
    }
    for v in &mut desired.volumes {
        if let Some(node) = node_of(&v.name) {
            v.node = node;
        }
    }
    let labels: BTreeMap<String, BTreeMap<String, String>> = cluster
        .nodes
        .iter()
        .map(|n| (n.name_any(), n.labels().clone()))
        .collect();
    let selected = |selector: &BTreeMap<String, String>| -> BTreeSet<String> {
        labels
            .iter()
            .filter(|(_, l)| selector.iter().all(|(k, v)| l.get(k) == Some(v)))
            .map(|(n, _)| n.clone())
            .collect()
    };
    for m in manifests {
        match &m.object {
            Object::StoragePool(p) => {
                let name = p.name_any();
                for d in desired.pools.iter_mut().filter(|d| d.name == name) {
                    d.only_on = Some(selected(&p.spec.node_selector));
                }
            }
            Object::Network(n) => {
                let name = n.name_any();
                for d in desired.networks.iter_mut().filter(|d| d.name == name) {
                    d.only_on = Some(selected(&n.spec.node_selector));
                }
            }
            _ => {}
        }
    }
}
