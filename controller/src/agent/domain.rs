//! The Domain controller: reconciles the domains placed on this node.
//!
//! Guarantees (as kube-runtime's finalizer states its own):
//! - Only domains placed on this node are touched: `status.nodeName` is this node, or no
//!   status names a node yet and `spec.nodeName` does (or, with `--claim-unscheduled`, neither
//!   names one).
//! - A domain never runs on two nodes: when `spec.nodeName` changes, the node in
//!   `status.nodeName` (the source) moves it — a live migration while it runs — and records
//!   the target there; only then does the target's agent take over.
//! - A libvirt domain without virtkube's mark for this very resource (kind and UID) is never
//!   changed or removed: the clash is reported as `Ready=False`, reason `NameConflict`.
//! - Deleting a Domain shuts its guest down (ACPI, then power-off after the timeout) and
//!   undefines it before the finalizer is removed; a domain already gone counts as removed.
//! - Stopping the agent never stops a guest.
//! - Status is written only when it changed, so steady state makes no API call.

use std::sync::Arc;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::finalizer::Event as Finalizer;
use kube::{Resource, ResourceExt};
use serde_json::json;
use virtkube_crds::conditions::{self, status as cs};
use virtkube_crds::domain::{
    DomainPhase, DomainStatus, InterfaceStatus, MigrationState, MigrationStatus, PowerState,
    VcpuAffinity,
};
use virtkube_crds::quantity::ByteQuantity;
use virtkube_crds::validation::Validate;
use virtkube_crds::{API_VERSION, Domain};
use virtkube_engine::model::{DomainObserved, DomainState};

use super::context::{Context, FIELD_MANAGER, FINALIZER};
use super::converge::{self, Change, Converged};
use super::error::{Error, Result};
use super::reconcile;

/// The kind label of this controller's metrics.
pub const KIND: &str = "Domain";

/// Condition types the agent owns on a Domain (the cluster controller may add others).
const AGENT_CONDITIONS: [&str; 7] = [
    conditions::READY,
    conditions::MIGRATING,
    conditions::SCHEDULED,
    conditions::RUNNING,
    conditions::DEFINED,
    conditions::SPEC_VALID,
    conditions::RESTART_REQUIRED,
];

/// Whether this node's agent is responsible for `dom`.
pub fn concerns(dom: &Domain, ctx: &Context) -> bool {
    let node = ctx.settings.node.as_str();
    let status_node = dom.status.as_ref().and_then(|s| s.node_name.as_deref());
    match (dom.spec.node_name.as_deref(), status_node) {
        // Placed: the node the status names owns it, also while `spec.nodeName` asks for a
        // move (that node is the migration's source). The target takes over only once the
        // status names it, so a domain never runs on two nodes at once.
        (_, Some(n)) => n == node,
        (Some(n), None) => n == node,
        (None, None) => ctx.settings.claim_unscheduled,
    }
}

/// The Domains of `vol`'s namespace whose disks name it (to reconcile them when it changes).
pub fn users_of(
    store: &kube::runtime::reflector::Store<Domain>,
    vol: &virtkube_crds::Volume,
) -> Vec<kube::runtime::reflector::ObjectRef<Domain>> {
    let (ns, name) = (vol.namespace(), vol.name_any());
    store
        .state()
        .into_iter()
        .filter(|d| d.namespace() == ns)
        .filter(|d| {
            d.spec
                .disks
                .iter()
                .any(|disk| disk.volume.as_deref() == Some(name.as_str()))
        })
        .map(|d| kube::runtime::reflector::ObjectRef::from_obj(&*d))
        .collect()
}

/// The Domains with an interface on `net` (to reconcile them when it changes).
pub fn users_of_network(
    store: &kube::runtime::reflector::Store<Domain>,
    net: &virtkube_crds::Network,
) -> Vec<kube::runtime::reflector::ObjectRef<Domain>> {
    let name = net.name_any();
    store
        .state()
        .into_iter()
        .filter(|d| d.spec.interfaces.iter().any(|i| i.network == name))
        .map(|d| kube::runtime::reflector::ObjectRef::from_obj(&*d))
        .collect()
}

/// The reconciler the Controller runs for each Domain.
pub async fn reconcile(dom: Arc<Domain>, ctx: Arc<Context>) -> Result<Action> {
    if !concerns(&dom, &ctx) {
        return Ok(Action::await_change());
    }
    let _timer = ctx.metrics.reconcile_started(KIND);
    let ns = dom
        .namespace()
        .ok_or(Error::MissingField("metadata.namespace"))?;
    let api: Api<Domain> = Api::namespaced(ctx.client.clone(), &ns);
    let span =
        tracing::info_span!("reconcile", kind = KIND, namespace = %ns, name = %dom.name_any());
    let (ctx_ref, api_ref) = (&*ctx, &api);
    reconcile::finalized(&ctx, KIND, &api, FINALIZER, dom, span, |event| async move {
        match event {
            Finalizer::Apply(dom) => apply(&dom, ctx_ref, api_ref).await,
            Finalizer::Cleanup(dom) => cleanup(&dom, ctx_ref).await,
        }
    })
    .await
}

/// Converges the domain, then writes status and events.
async fn apply(dom: &Domain, ctx: &Context, api: &Api<Domain>) -> Result<Action> {
    let invalid = dom.spec.validate();
    if !invalid.is_empty() {
        let status = status_for(
            dom,
            ctx,
            None,
            &[],
            Some(("InvalidSpec", invalid.to_string())),
            false,
        );
        if write_status(dom, ctx, api, status).await? {
            reconcile::report_failure(ctx, dom, "InvalidSpec", &invalid.to_string()).await;
        }
        // Nothing to retry: only a new spec can fix it.
        return Ok(Action::await_change());
    }
    let moving_to = dom
        .spec
        .node_name
        .clone()
        .filter(|n| *n != ctx.settings.node);
    let started = match &moving_to {
        Some(target) => Some(migration_started(dom, ctx, api, target).await?),
        None => None,
    };
    match converge::domain(ctx, dom).await {
        Ok(Converged {
            changes,
            observed,
            pending,
            moved_to,
        }) => {
            reconcile::report_changes(ctx, dom, &changes).await;
            let mut status = status_for(dom, ctx, observed.as_ref(), &pending, None, true);
            if let Some(target) = moved_to {
                // The domain left: the target's agent takes over from here (spec.nodeName
                // names it), and this status tells it where the domain came from.
                let note = changes
                    .iter()
                    .find(|c| c.reason == "Migrated")
                    .map(|c| c.note.clone());
                status.node_name = Some(target.clone());
                status.migration = Some(MigrationStatus {
                    state: Some(MigrationState::Succeeded),
                    source_node: Some(ctx.settings.node.clone()),
                    target_node: Some(target.clone()),
                    start_time: started.clone(),
                    end_time: Some(now()),
                    message: note,
                    ..MigrationStatus::default()
                });
                conditions::set_condition(
                    &mut status.conditions,
                    conditions::condition(
                        conditions::MIGRATING,
                        cs::FALSE,
                        "Migrated",
                        format!("moved from node {} to node {target}", ctx.settings.node),
                        dom.meta().generation,
                        now(),
                    ),
                );
                let message = format!("moved from node {} to node {target}", ctx.settings.node);
                for c in &mut status.conditions {
                    if c.type_ == conditions::SCHEDULED {
                        c.message = format!("placed on node {target}");
                    }
                    if c.type_ == conditions::READY && c.status == cs::TRUE {
                        c.message = message.clone();
                    }
                }
            }
            write_status(dom, ctx, api, status).await?;
            Ok(Action::requeue(ctx.settings.resync))
        }
        Err(error) => {
            let (reason, message) = error.reason_and_message();
            let unreachable = matches!(
                &error,
                Error::Engine(e) if e.is_connection_error()
                    || matches!(e, virtkube_engine::EngineError::Closed { .. })
            );
            let observed = if unreachable {
                None
            } else {
                ctx.engine
                    .domain_observe(&converge::domain_host_name(dom))
                    .await
                    .ok()
                    .flatten()
                    .filter(|o| {
                        converge::owner_of(dom)
                            .is_ok_and(|me| o.owner.as_ref().is_some_and(|m| m.same_resource(&me)))
                    })
            };
            let mut status = status_for(
                dom,
                ctx,
                observed.as_ref(),
                &[],
                Some((reason, message.clone())),
                true,
            );
            if let Some(target) = &moving_to {
                status.migration = Some(MigrationStatus {
                    state: Some(MigrationState::Failed),
                    source_node: Some(ctx.settings.node.clone()),
                    target_node: Some(target.clone()),
                    start_time: started.clone(),
                    end_time: Some(now()),
                    message: Some(message.clone()),
                    ..MigrationStatus::default()
                });
                conditions::set_condition(
                    &mut status.conditions,
                    conditions::condition(
                        conditions::MIGRATING,
                        cs::FALSE,
                        "MigrationFailed",
                        message.clone(),
                        dom.meta().generation,
                        now(),
                    ),
                );
            }
            if unreachable {
                // libvirt cannot be asked: what the guest does is unknown, not failed; the
                // last facts stay as they were.
                let mut kept = dom.status.as_ref().map(agent_view).unwrap_or_default();
                kept.phase = Some(DomainPhase::Unknown);
                kept.conditions = status.conditions;
                kept.observed_generation = status.observed_generation;
                status = kept;
            }
            // One event per distinct failure: the status changes only when the failure does.
            if write_status(dom, ctx, api, status).await? {
                reconcile::report_failure(ctx, dom, reason, &message).await;
            }
            Err(error)
        }
    }
}

/// Records that a move to `target` starts (phase `Migrating`, condition `Migrating=True`,
/// `status.migration` running), once per attempt; returns its start time.
async fn migration_started(
    dom: &Domain,
    ctx: &Context,
    api: &Api<Domain>,
    target: &str,
) -> Result<Time> {
    let current = dom.status.as_ref().map(agent_view).unwrap_or_default();
    if let Some(m) = &current.migration
        && m.state == Some(MigrationState::Running)
        && m.target_node.as_deref() == Some(target)
        && let Some(start) = &m.start_time
    {
        return Ok(start.clone());
    }
    let start = now();
    let mut status = current;
    status.phase = Some(DomainPhase::Migrating);
    status.migration = Some(MigrationStatus {
        state: Some(MigrationState::Running),
        source_node: Some(ctx.settings.node.clone()),
        target_node: Some(target.to_string()),
        start_time: Some(start.clone()),
        ..MigrationStatus::default()
    });
    conditions::set_condition(
        &mut status.conditions,
        conditions::condition(
            conditions::MIGRATING,
            cs::TRUE,
            "Migrating",
            format!("moving from node {} to node {target}", ctx.settings.node),
            dom.meta().generation,
            start.clone(),
        ),
    );
    write_status(dom, ctx, api, status).await?;
    Ok(start)
}

/// Removes the libvirt domain before the resource goes away.
async fn cleanup(dom: &Domain, ctx: &Context) -> Result<Action> {
    let changes: Vec<Change> = converge::remove_domain(ctx, dom).await?;
    for change in changes {
        ctx.event(dom, false, change.reason, "Delete", change.note)
            .await;
    }
    Ok(Action::await_change())
}

/// Writes `status` with server-side apply when it differs from what the object carries
/// (compared on the fields the agent owns). Returns whether a patch was sent.
pub async fn write_status(
    dom: &Domain,
    ctx: &Context,
    api: &Api<Domain>,
    status: DomainStatus,
) -> Result<bool> {
    let current = dom.status.as_ref().map(agent_view).unwrap_or_default();
    if current == status {
        return Ok(false);
    }
    let patch = json!({
        "apiVersion": API_VERSION,
        "kind": "Domain",
        "status": status,
    });
    api.patch_status(
        &dom.name_any(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await?;
    ctx.metrics
        .status_patches
        .get_or_create(&super::metrics::KindLabels { kind: KIND.into() })
        .inc();
    Ok(true)
}

/// The part of a status the agent writes (its conditions only; every other field is the
/// agent's).
fn agent_view(status: &DomainStatus) -> DomainStatus {
    let mut s = status.clone();
    s.conditions
        .retain(|c| AGENT_CONDITIONS.contains(&c.type_.as_str()));
    s
}

fn now() -> Time {
    Time(k8s_openapi::jiff::Timestamp::now())
}

/// The status that describes `observed` (or a failure), keeping condition transition times
/// from the current status so an unchanged condition compares equal.
pub fn status_for(
    dom: &Domain,
    ctx: &Context,
    observed: Option<&DomainObserved>,
    pending: &[String],
    problem: Option<(&str, String)>,
    spec_valid: bool,
) -> DomainStatus {
    let generation = dom.meta().generation;
    let current = dom.status.as_ref().map(agent_view).unwrap_or_default();
    let mut conds: Vec<Condition> = current.conditions.clone();
    let set = |conds: &mut Vec<Condition>, t: &str, ok: bool, reason: &str, msg: String| {
        conditions::set_condition(
            conds,
            conditions::condition(
                t,
                if ok { cs::TRUE } else { cs::FALSE },
                reason,
                msg,
                generation,
                now(),
            ),
        );
    };
    let node = ctx.settings.node.clone();
    let mut status = DomainStatus {
        node_name: Some(node.clone()),
        domain_name: Some(converge::domain_host_name(dom)),
        observed_generation: generation,
        pending_changes: pending.to_vec(),
        // The record of the last migration stays until the next one.
        migration: current.migration.clone(),
        ..DomainStatus::default()
    };
    set(
        &mut conds,
        conditions::SCHEDULED,
        true,
        "NodeAssigned",
        format!("placed on node {node}"),
    );
    if spec_valid {
        set(
            &mut conds,
            conditions::SPEC_VALID,
            true,
            "Valid",
            String::new(),
        );
    } else if let Some((reason, msg)) = &problem {
        set(
            &mut conds,
            conditions::SPEC_VALID,
            false,
            reason,
            msg.clone(),
        );
    }
    let desired = dom.spec.effective_state();
    match observed {
        Some(o) => {
            status.uuid = Some(o.uuid.clone());
            status.id = o.id;
            status.state_reason = Some(o.reason.clone());
            status.vcpus = Some(o.vcpus);
            status.max_vcpus = Some(o.max_vcpus);
            status.vcpu_affinity = (0..o.max_vcpus)
                .filter_map(|v| {
                    o.affinity(v).map(|c| VcpuAffinity {
                        vcpu: v,
                        cpuset: c.to_string(),
                    })
                })
                .collect();
            status.emulator_cpuset = o.emulator_cpuset.as_ref().map(ToString::to_string);
            status.memory = Some(ByteQuantity::from_bytes(o.memory_kib * 1024));
            status.max_memory = Some(ByteQuantity::from_bytes(o.max_memory_kib * 1024));
            status.autostart = Some(o.autostart);
            status.interfaces = dom
                .spec
                .interfaces
                .iter()
                .zip(&o.interfaces)
                .filter_map(|(spec, seen)| {
                    seen.mac.as_ref().map(|mac| InterfaceStatus {
                        name: spec.name.clone(),
                        mac_address: mac.clone(),
                    })
                })
                .collect();
            status.phase = Some(phase_of(o));
            set(
                &mut conds,
                conditions::DEFINED,
                true,
                "Defined",
                format!("libvirt domain {} (uuid {})", o.name, o.uuid),
            );
            let running = o.state.is_active();
            set(
                &mut conds,
                conditions::RUNNING,
                running,
                &camel(o.state.as_str()),
                format!("libvirt state {}, reason {}", o.state.as_str(), o.reason),
            );
            if pending.is_empty() {
                set(
                    &mut conds,
                    conditions::RESTART_REQUIRED,
                    false,
                    "UpToDate",
                    String::new(),
                );
            } else {
                set(
                    &mut conds,
                    conditions::RESTART_REQUIRED,
                    true,
                    "PendingChanges",
                    format!("applied at the next stop: {}", pending.join(", ")),
                );
            }
        }
        None => {
            status.phase = Some(DomainPhase::Pending);
            set(
                &mut conds,
                conditions::DEFINED,
                false,
                "NotDefined",
                "the libvirt domain does not exist".into(),
            );
        }
    }
    match problem {
        Some((reason, msg)) => {
            if observed.is_none() || !spec_valid {
                status.phase = Some(DomainPhase::Failed);
            }
            set(&mut conds, conditions::READY, false, reason, msg);
        }
        None => {
            let reached = observed.is_some_and(|o| matches_power(o.state, desired));
            if reached {
                set(
                    &mut conds,
                    conditions::READY,
                    true,
                    "Reconciled",
                    format!("{desired:?} on node {node}"),
                );
            } else {
                let state = observed.map_or("absent", |o| o.state.as_str());
                set(
                    &mut conds,
                    conditions::READY,
                    false,
                    "Converging",
                    format!("wants {desired:?}, libvirt says {state}"),
                );
            }
        }
    }
    status.conditions = conds;
    status
}

fn matches_power(state: DomainState, desired: PowerState) -> bool {
    match desired {
        PowerState::Running => matches!(state, DomainState::Running | DomainState::Blocked),
        PowerState::Paused => state == DomainState::Paused,
        PowerState::Stopped => !state.is_active(),
    }
}

fn phase_of(o: &DomainObserved) -> DomainPhase {
    match o.state {
        DomainState::Running | DomainState::Blocked | DomainState::Shutdown => DomainPhase::Running,
        DomainState::Paused | DomainState::PmSuspended => DomainPhase::Paused,
        DomainState::Crashed => DomainPhase::Crashed,
        DomainState::Shutoff if o.reason == "crashed" => DomainPhase::Crashed,
        DomainState::Shutoff => DomainPhase::Stopped,
        DomainState::NoState | DomainState::Unknown => DomainPhase::Unknown,
    }
}

/// `shutoff` -> `Shutoff`, for condition reasons (which must be CamelCase).
fn camel(word: &str) -> String {
    word.split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(|w| {
            let mut cs = w.chars();
            cs.next()
                .map(|f| f.to_ascii_uppercase().to_string() + cs.as_str())
                .unwrap_or_default()
        })
        .collect()
}
