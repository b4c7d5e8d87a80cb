//! The sweep: libvirt domains carrying virtkube's mark whose Domain is not routed to this
//! node. The Domain controller sees only Domains labelled for this node; a copy of any
//! other one is either on its way here (a migration job holds it), or stale: its resource
//! was deleted while this node was away, or an administrator declared this node fenced and
//! the claim moved on. The sweep decides each with the placement protocol on a fresh read
//! and removes only what [`agent_step`] calls a stale copy, exactly as the Domain controller
//! would. It runs at start-up and at every resync.

use std::collections::HashSet;
use std::sync::Arc;

use kube::api::Api;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Resource, ResourceExt};
use virtkube_crds::Domain;

use super::context::Context;
use super::error::Result;
use super::local;
use crate::placement::write::facts_of;
use crate::placement::{AgentStep, Local, Look, agent_step};
use crate::plan::observed::LOCAL_UID_PREFIX;

/// What one sweep found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Swept {
    /// Marked copies looked at (not routed here).
    pub looked: usize,
    /// Stale copies removed, as `namespace/name`.
    pub removed: Vec<String>,
}

/// Looks at every marked libvirt domain whose Domain is not in `routed` (this node's
/// watch cache) and removes the stale ones.
pub async fn sweep(ctx: &Arc<Context>, routed: &Store<Domain>) -> Result<Swept> {
    let mut swept = Swept::default();
    let known: HashSet<ObjectRef<Domain>> = routed
        .state()
        .iter()
        .map(|d| ObjectRef::from_obj(&**d))
        .collect();
    for observed in ctx.engine.domain_observe_all().await? {
        let Some(owner) = observed.owner.clone() else {
            continue;
        };
        let Some(ns) = owner.namespace.clone() else {
            continue;
        };
        // A guest `virtkube apply` made from local manifests (no cluster, no Domain resource
        // ever) is that tool's, not this agent's: its missing resource means nothing here.
        if owner.kind != Domain::kind(&()) || owner.uid.starts_with(LOCAL_UID_PREFIX) {
            continue;
        }
        let key = ObjectRef::<Domain>::new(&owner.name).within(&ns);
        if known.contains(&key) {
            continue;
        }
        swept.looked += 1;
        // Look before the read (the protocol's rule 4): the read must explain the copy.
        let stand_in = orphan(&ns, &owner.name, &owner.uid);
        let before = local::look(&ctx.engine, &stand_in).await?;
        let api: Api<Domain> = Api::namespaced(ctx.client.clone(), &ns);
        let dom = match api.get_opt(&owner.name).await? {
            Some(d) if d.uid().as_deref() == Some(owner.uid.as_str()) => d,
            // The resource is gone (or re-created under a new UID): nothing holds this
            // copy. Judge it as an unbound claim.
            _ => stand_in,
        };
        let step = agent_step(
            &ctx.settings.node,
            &facts_of(&dom),
            &Look::before(before.local),
        );
        if step != AgentStep::RemoveStaleCopy || before.local == Local::Absent {
            continue;
        }
        let copy = before;
        super::domain::remove_stale_copy(&dom, &copy, ctx).await?;
        swept.removed.push(format!("{ns}/{}", owner.name));
    }
    if !swept.removed.is_empty() {
        tracing::warn!(removed = ?swept.removed, "stale copies removed by the sweep");
    }
    Ok(swept)
}

/// A stand-in for a Domain that no longer exists: no holder, so the protocol treats any copy
/// of it as stale.
fn orphan(ns: &str, name: &str, uid: &str) -> Domain {
    let mut dom = Domain::new(
        name,
        virtkube_crds::domain::DomainSpec {
            node_name: None,
            node_selector: Default::default(),
            tolerations: Vec::new(),
            run_strategy: Default::default(),
            state: None,
            autostart: false,
            cpu: Default::default(),
            memory: virtkube_crds::domain::MemorySpec {
                size: virtkube_crds::quantity::ByteQuantity::new("1Mi"),
                max: None,
                hugepages: None,
            },
            os: None,
            disks: Vec::new(),
            interfaces: Vec::new(),
            host_devices: Vec::new(),
            migration: None,
            eviction_strategy: Default::default(),
            update_policy: Default::default(),
        },
    );
    dom.metadata.namespace = Some(ns.to_string());
    dom.metadata.uid = Some(uid.to_string());
    dom
}
