//! The Domain controller: this node's side of the placement protocol
//! ([`crate::placement`]) for every Domain routed to it (the controller labels a Domain
//! `node.virtkube.io/<node>` for its holder and for the target of a move).
//!
//! Each reconcile runs rounds of look → read → decide → act:
//! 1. look at this node's libvirt ([`local::look`]);
//! 2. read the Domain — the watch cache in the first round, a fresh GET in the next ones
//!    (the cache can be older than this agent's own last write; only a steady-state
//!    converge, which changes nothing in libvirt, may rest on it). A Domain new here needs
//!    the finalizer first anyway: that patch, bound to the cached resourceVersion, is the
//!    fresh read when it applies ([`confirm_adding_finalizer`]), one round trip instead of
//!    two;
//! 3. decide with [`agent_step`], looking at libvirt again after the read when the step
//!    asks ([`AgentStep::LookAgain`], [`AgentStep::LookAtTarget`]);
//! 4. act: converge as the holder (define, start, pin… through the planner), or one step
//!    of a move, a deletion or a stale copy's removal; claim changes and status are written
//!    with [`write_status`] (compare-and-swap), so a write decided on an old read fails and
//!    the next round decides again.
//!
//! Guarantees, on top of the protocol's:
//! - A libvirt domain without virtkube's mark for this very resource (kind and UID) is never
//!   changed or removed: the clash is reported as `Ready=False`, reason `NameConflict`.
//! - Deleting a Domain shuts its guest down (ACPI, then power-off after the timeout) and
//!   undefines it before the finalizer is removed; a move under way is ended first, and a
//!   copy that is gone from this node is looked for on the move's target before anything is
//!   concluded.
//! - A live migration never holds a reconcile slot: it runs as a task ([`moves`]), and
//!   reconciles in between publish its progress at most every few seconds and enforce its
//!   time limits.
//! - Stopping the agent never stops a guest.
//! - Status is written only when it changed, so steady state makes no API call.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::{Resource, ResourceExt};
use serde_json::json;
use tracing::Instrument;
use virtkube_crds::Domain;
use virtkube_crds::conditions::{self, status as cs};
use virtkube_crds::domain::{
    DomainPhase, DomainStatus, InterfaceStatus, MigrationMode, MigrationProgress, MigrationState,
    PowerState, VcpuAffinity,
};
use virtkube_crds::quantity::ByteQuantity;
use virtkube_crds::validation::Validate;
use virtkube_engine::model::{DomainObserved, DomainState};

use super::context::{Context, FIELD_MANAGER, FINALIZER};
use super::converge::{self, Change, Converged};
use super::error::{Error, Result};
use super::local::{self, Copy};
use super::moves::{self, Ended, TaskState};
use super::reconcile;
use crate::placement::write::{facts_of, write_status};
use crate::placement::{AgentStep, Local, Look, MoveEnd, agent_step};

/// The kind label of this controller's metrics.
pub const KIND: &str = "Domain";

/// Condition types the agent owns on a Domain (the cluster controller owns the others, such
/// as `Scheduled` and `NodeUnreachable`, and the agent carries them over untouched).
pub const AGENT_CONDITIONS: [&str; 6] = [
    conditions::READY,
    conditions::MIGRATING,
    conditions::RUNNING,
    conditions::DEFINED,
    conditions::SPEC_VALID,
    conditions::RESTART_REQUIRED,
];

/// Rounds of look → read → decide → act in one reconcile (a cold move takes four).
const ROUNDS: usize = 8;

/// How soon a reconcile comes back while a migration runs, or while another actor has to act.
const WATCH_EVERY: Duration = Duration::from_secs(2);

/// The least time between two progress writes of a running migration.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// Whether this node holds `dom` (its status names this node), or receives it in a move.
pub fn concerns(dom: &Domain, ctx: &Context) -> bool {
    let facts = facts_of(dom);
    let me = ctx.settings.node.as_str();
    facts.claim.holder.as_deref() == Some(me)
        || facts
            .claim
            .active_move()
            .is_some_and(|m| m.target == me || m.source == me)
}

/// What a change of a Domain must touch for it to be reconciled: its spec (generation),
/// labels (routing), finalizers, deletion, and the claim. The agent's own status writes
/// change none of these, so they do not come back as reconciles.
pub fn trigger_hash(dom: &Domain) -> Option<u64> {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    dom.metadata.generation.hash(&mut h);
    dom.metadata.labels.hash(&mut h);
    dom.metadata.finalizers.hash(&mut h);
    dom.metadata.deletion_timestamp.is_some().hash(&mut h);
    facts_of(dom).claim.hash(&mut h);
    Some(h.finish())
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

/// The reconciler the Controller runs for each Domain routed to this node.
pub async fn reconcile(dom: Arc<Domain>, ctx: Arc<Context>) -> Result<Action> {
    let _timer = ctx.metrics.reconcile_started(KIND);
    let ns = dom
        .namespace()
        .ok_or(Error::MissingField("metadata.namespace"))?;
    let api: Api<Domain> = Api::namespaced(ctx.client.clone(), &ns);
    let span =
        tracing::info_span!("reconcile", kind = KIND, namespace = %ns, name = %dom.name_any());
    let result = rounds(&dom, &ctx, &api).instrument(span.clone()).await;
    if let Err(error) = &result
        && is_unreachable(error)
    {
        unreachable(&dom, &ctx, &api, error).instrument(span).await;
    }
    reconcile::counted(&ctx, KIND, result)
}

/// Whether libvirt could not be asked at all.
fn is_unreachable(error: &Error) -> bool {
    matches!(
        error,
        Error::Engine(e) if e.is_connection_error()
            || matches!(e, virtkube_engine::EngineError::Closed { .. })
    )
}

/// libvirt cannot be asked: for a domain held here, what the guest does is unknown, not
/// failed. The phase says `Unknown`, `Ready` says why, and the last facts stay (a status
/// write, once per outage: it changes only when the failure does).
async fn unreachable(dom: &Domain, ctx: &Context, api: &Api<Domain>, error: &Error) {
    if facts_of(dom).claim.holder.as_deref() != Some(ctx.settings.node.as_str()) {
        return;
    }
    let (reason, message) = error.reason_and_message();
    let mut status = dom.status.clone().unwrap_or_default();
    status.phase = Some(DomainPhase::Unknown);
    set(
        &mut status.conditions,
        dom,
        conditions::READY,
        false,
        reason,
        message.clone(),
    );
    match write_if_changed(dom, ctx, api, status).await {
        Ok(true) => reconcile::report_failure(ctx, dom, reason, &message).await,
        Ok(false) => {}
        Err(e) => tracing::debug!(error = %e, "recording that libvirt is unreachable"),
    }
}

/// What one round ended with.
enum Next {
    /// Done for now.
    Return(Action),
    /// Look, read fresh and decide again.
    Again,
    /// Nothing changed (decided on the cache, the step needs a fresh read): read fresh and
    /// decide again with this round's look, still a look taken before that read.
    Unchanged,
}

async fn rounds(cached: &Domain, ctx: &Context, api: &Api<Domain>) -> Result<Action> {
    let mut dom = cached.clone();
    // The version read fresh by the round before, when that round's act changed only
    // libvirt (a removal): what comes next is usually the finalizer's removal, which can
    // then be bound to that version instead of read again.
    let mut read_before: Option<String> = None;
    // The look of a round that changed nothing ([`Next::Unchanged`]): libvirt is asked once
    // instead of twice.
    let mut carried: Option<local::Copy> = None;
    for round in 0..ROUNDS {
        // (1) Look before the read.
        let before = match carried.take() {
            Some(look) => look,
            None => local::look(&ctx.engine, &dom).await?,
        };
        // (2) Read: the cache first, the API server afterwards.
        if let Some(version) = read_before.take()
            && decide(ctx, &dom, &before).await? == AgentStep::Finalize
        {
            // The removal is a fresh read for the same reason the finalizer's addition is
            // (`confirm_adding_finalizer`): it applies only to the version decided on.
            match finalize(&dom, ctx, api, Some(&version)).await {
                Err(e) if e.is_conflict() => {
                    tracing::debug!("changed since it was read: reading it fresh");
                }
                done => return done,
            }
        }
        if round > 0 {
            match api.get_opt(&dom.name_any()).await? {
                Some(d) => dom = d,
                None => return Ok(Action::await_change()),
            }
        }
        // (3) Decide, looking again after the read when asked.
        let mut step = decide(ctx, &dom, &before).await?;
        let mut fresh = round > 0;
        // The first act of a Domain new here, the finalizer, doubles as the fresh read.
        if !fresh
            && step == AgentStep::Converge
            && let Some(current) = confirm_adding_finalizer(&dom, ctx, api).await?
        {
            dom = current;
            fresh = true;
            step = decide(ctx, &dom, &before).await?;
        }
        tracing::debug!(round, ?step, here = ?before.local, "decided");
        // (4) Act.
        let next = match step {
            AgentStep::Idle => Next::Return(Action::requeue(ctx.settings.resync)),
            AgentStep::Wait { why } => {
                tracing::debug!(why, "waiting");
                Next::Return(Action::requeue(WATCH_EVERY * 5))
            }
            AgentStep::Converge if !fresh => match steady(&dom, &before, ctx, api).await? {
                Some(action) => Next::Return(action),
                None => Next::Unchanged,
            },
            _ if !fresh => Next::Unchanged,
            AgentStep::Converge => Next::Return(converge(&dom, ctx, api).await?),
            step => {
                let libvirt_only = matches!(
                    step,
                    AgentStep::RemoveCopy | AgentStep::Undefine | AgentStep::RemoveStaleCopy
                );
                let next = act(step, &dom, &before, ctx, api).await?;
                if libvirt_only {
                    read_before = dom.resource_version();
                }
                next
            }
        };
        match next {
            Next::Return(action) => return Ok(action),
            Next::Again => continue,
            Next::Unchanged => carried = Some(before),
        }
    }
    // Many rounds in a row that each changed something: come back soon rather than loop.
    Ok(Action::requeue(WATCH_EVERY))
}

/// The protocol's step for `dom` as read, given the look before the read; further looks
/// (this node again, or the move's target) are taken now, after the read.
async fn decide(ctx: &Context, dom: &Domain, before: &Copy) -> Result<AgentStep> {
    let me = ctx.settings.node.as_str();
    let facts = facts_of(dom);
    let mut look = Look::before(before.local);
    loop {
        match agent_step(me, &facts, &look) {
            AgentStep::LookAgain => {
                look.after = Some(local::look(&ctx.engine, dom).await?.local);
            }
            AgentStep::LookAtTarget { target } => {
                look.target = Some(look_at(ctx, dom, &target).await?);
            }
            step => return Ok(step),
        }
    }
}

/// What `target`'s libvirt has of `dom`, through a short-lived connection to it.
async fn look_at(ctx: &Context, dom: &Domain, target: &str) -> Result<Local> {
    if target == ctx.settings.node {
        return Ok(local::look(&ctx.engine, dom).await?.local);
    }
    let spec = converge::target_spec(ctx, target).await?;
    let engine = virtkube_engine::Engine::connect(&spec.uri, Default::default()).await?;
    let seen = local::look(&engine, dom).await;
    if let Err(e) = engine.close().await {
        tracing::debug!(error = %e, node = target, "closing the connection to the target failed");
    }
    Ok(seen?.local)
}

/// Steady state on the cached read: when the domain is converged here already (nothing to
/// change in libvirt, the finalizer in place), write the status if it changed and finish;
/// `None` when there is work, which needs a fresh read first.
async fn steady(
    dom: &Domain,
    before: &Copy,
    ctx: &Context,
    api: &Api<Domain>,
) -> Result<Option<Action>> {
    if !has_finalizer(dom) || !dom.spec.validate().is_empty() {
        return Ok(None);
    }
    // The cache has not seen this agent's last status write yet: whatever it would write
    // now is decided on the version that write replaced, and would fail.
    if ctx.echoes.is_replaced(
        dom.metadata.uid.as_deref(),
        dom.metadata.resource_version.as_deref(),
    ) {
        return Ok(None);
    }
    let Ok(planned) = converge::plan_domain(ctx, dom, before.observed.clone()).await else {
        return Ok(None);
    };
    if !planned.is_quiet() {
        return Ok(None);
    }
    let status = status_for(
        dom,
        ctx,
        planned.observed.as_ref(),
        &planned.pending,
        None,
        true,
    );
    match write_if_changed(dom, ctx, api, status).await {
        Ok(_) => Ok(Some(Action::requeue(ctx.settings.resync))),
        Err(e) if e.is_conflict() => Ok(None),
        Err(e) => Err(e),
    }
}

/// Converges the domain held here (on a fresh read), then writes status and events.
async fn converge(dom: &Domain, ctx: &Context, api: &Api<Domain>) -> Result<Action> {
    let dom = &ensure_finalizer(dom, ctx, api).await?;
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
        if write_if_changed(dom, ctx, api, status).await? {
            reconcile::report_failure(ctx, dom, "InvalidSpec", &invalid.to_string()).await;
        }
        // Nothing to retry: only a new spec can fix it.
        return Ok(Action::await_change());
    }
    match converge::domain(ctx, dom).await {
        Ok(Converged {
            changes,
            observed,
            pending,
            ..
        }) => {
            reconcile::report_changes(ctx, dom, &changes).await;
            let status = status_for(dom, ctx, observed.as_ref(), &pending, None, true);
            write_if_changed(dom, ctx, api, status).await?;
            Ok(Action::requeue(ctx.settings.resync))
        }
        Err(error) => {
            let (reason, message) = error.reason_and_message();
            let unreachable = is_unreachable(&error);
            let mut status = if unreachable {
                // libvirt cannot be asked: what the guest does is unknown, not failed; the
                // last facts stay as they were.
                let mut kept = dom.status.clone().unwrap_or_default();
                kept.phase = Some(DomainPhase::Unknown);
                kept
            } else {
                let observed = local::look(&ctx.engine, dom)
                    .await
                    .ok()
                    .and_then(|c| c.observed);
                status_for(dom, ctx, observed.as_ref(), &[], None, true)
            };
            set(
                &mut status.conditions,
                dom,
                conditions::READY,
                false,
                reason,
                message.clone(),
            );
            if !unreachable && status.phase != Some(DomainPhase::Running) {
                status.phase = Some(DomainPhase::Failed);
            }
            // One event per distinct failure: the status changes only when the failure does.
            if write_if_changed(dom, ctx, api, status).await? {
                reconcile::report_failure(ctx, dom, reason, &message).await;
            }
            Err(error)
        }
    }
}

/// Carries out one step of a move, a deletion or a stale copy's removal (on a fresh read).
async fn act(
    step: AgentStep,
    dom: &Domain,
    before: &Copy,
    ctx: &Context,
    api: &Api<Domain>,
) -> Result<Next> {
    let name = converge::domain_host_name(dom);
    let owner = converge::owner_of(dom)?;
    let key = moves::key(dom);
    match step {
        AgentStep::BeginMove { target } => {
            let mut status = dom.status.clone().unwrap_or_default();
            let mut record = status.migration.clone().unwrap_or_default();
            record.state = Some(MigrationState::Running);
            record.start_time = Some(now());
            record.mode = Some(match before.local {
                Local::Stopped => MigrationMode::Cold,
                _ => MigrationMode::Live,
            });
            record.progress = None;
            record.message = None;
            status.migration = Some(record);
            status.phase = Some(DomainPhase::Migrating);
            set(
                &mut status.conditions,
                dom,
                conditions::MIGRATING,
                true,
                "Migrating",
                format!("moving from node {} to node {target}", ctx.settings.node),
            );
            write(dom, ctx, api, status).await?;
            Ok(Next::Again)
        }
        AgentStep::Migrate { target } => match ctx.migrations.state(&key) {
            TaskState::Ended => {
                let (end, message) = match ctx.migrations.outcome(&key) {
                    Some(Ended::Aborted(why)) => (MoveEnd::Aborted, why),
                    Some(Ended::Failed(why)) => (MoveEnd::Failed, why),
                    // libvirt said done, yet the guest still runs here without a job:
                    // trust what libvirt shows now.
                    Some(Ended::Completed(_)) | None => (
                        MoveEnd::Failed,
                        "libvirt reported the migration complete, yet the guest still runs here"
                            .to_string(),
                    ),
                };
                end_move(dom, ctx, api, end, message).await?;
                ctx.migrations.forget(&key);
                Ok(Next::Again)
            }
            TaskState::Running => watch(dom, before, ctx, api).await,
            TaskState::None => {
                let copied: Vec<String> = dom
                    .status
                    .as_ref()
                    .and_then(|s| s.migration.as_ref())
                    .map(|m| {
                        let ns = dom.namespace().unwrap_or_default();
                        m.copied_volumes
                            .iter()
                            .map(|v| virtkube_crds::names::host_name(Some(&ns), v))
                            .collect()
                    })
                    .unwrap_or_default();
                let disks = if copied.is_empty() {
                    Vec::new()
                } else {
                    ctx.engine
                        .domain_observe(&name)
                        .await?
                        .map(|d| d.disks)
                        .unwrap_or_default()
                };
                match moves::copied_devices(&disks, &copied) {
                    Ok(devices) => {
                        start_migration(dom, &target, ctx, &name, owner, devices).await?;
                        Ok(Next::Return(Action::requeue(WATCH_EVERY)))
                    }
                    Err(volume) => {
                        let message = format!(
                            "no disk of the running guest reads volume {volume}, which the move was to copy: not migrated, the guest stays on {}",
                            ctx.settings.node
                        );
                        end_move(dom, ctx, api, MoveEnd::Failed, message).await?;
                        Ok(Next::Again)
                    }
                }
            }
        },
        AgentStep::WatchMigration { .. } => watch(dom, before, ctx, api).await,
        AgentStep::AbortMigration => {
            ctx.migrations.aborting(
                &key,
                "the move is no longer wanted (spec.nodeName changed, or the domain is being deleted)"
                    .into(),
            );
            if let Err(e) = ctx.engine.domain_abort_job(&name, &owner).await {
                // No job any more (it just ended): the next round sees how.
                tracing::debug!(error = %e, "aborting the migration job");
            }
            Ok(Next::Return(Action::requeue(WATCH_EVERY)))
        }
        AgentStep::Undefine => {
            ctx.engine.domain_undefine(&name, &owner).await?;
            Ok(Next::Again)
        }
        AgentStep::CompleteMove { target } => {
            complete_move(dom, &target, ctx, api).await?;
            ctx.migrations.forget(&key);
            Ok(Next::Again)
        }
        AgentStep::EndMove { end } => {
            let message = match (ctx.migrations.outcome(&key), end) {
                (Some(Ended::Failed(why) | Ended::Aborted(why)), _) => why,
                (_, MoveEnd::Aborted) => {
                    "the move is no longer wanted (spec.nodeName changed, or the domain is being deleted); the domain stays here".into()
                }
                (_, MoveEnd::Failed) => "the migration failed; the domain stays here".into(),
            };
            end_move(dom, ctx, api, end, message).await?;
            ctx.migrations.forget(&key);
            Ok(Next::Again)
        }
        AgentStep::RemoveCopy => {
            let changes: Vec<Change> = converge::remove_domain(ctx, dom).await?;
            for change in changes {
                ctx.event(dom, false, change.reason, "Delete", change.note)
                    .await;
            }
            Ok(Next::Again)
        }
        AgentStep::Finalize => Ok(Next::Return(finalize(dom, ctx, api, None).await?)),
        AgentStep::RemoveStaleCopy => {
            remove_stale_copy(dom, before, ctx).await?;
            Ok(Next::Again)
        }
        // Decided elsewhere; listed for completeness.
        AgentStep::Idle
        | AgentStep::Wait { .. }
        | AgentStep::Converge
        | AgentStep::LookAgain
        | AgentStep::LookAtTarget { .. } => Ok(Next::Again),
    }
}

/// Starts the live migration task towards `target`, copying the guest devices `copy_disks`.
async fn start_migration(
    dom: &Domain,
    target: &str,
    ctx: &Context,
    name: &str,
    owner: virtkube_engine::Owner,
    copy_disks: Vec<String>,
) -> Result<()> {
    let spec = converge::target_spec(ctx, target).await?;
    let opts = moves::options(
        dom.spec.migration.as_ref(),
        spec.p2p_uri.clone().unwrap_or_else(|| spec.uri.clone()),
        spec.uri.clone(),
        spec.migration_uri.clone(),
        ctx.settings.migration_tls,
        copy_disks,
    );
    let requeue = ctx.requeue.clone();
    let me = kube::runtime::reflector::ObjectRef::from_obj(dom);
    let engine =
        virtkube_engine::Engine::connect(ctx.engine.uri(), ctx.engine.config().clone()).await?;
    let task = moves::Task {
        engine,
        name: name.to_string(),
        owner,
        opts,
    };
    let unstarted = ctx
        .migrations
        .start(&moves::key(dom), target, task, move || {
            if let Some(tx) = requeue {
                let _ = tx.unbounded_send(me);
            }
        });
    match unstarted {
        None => tracing::info!(target, "live migration started"),
        Some(task) => {
            if let Err(e) = task.engine.close().await {
                tracing::debug!(error = %e, "closing an unused migration connection failed");
            }
        }
    }
    Ok(())
}

/// A running migration: publishes its progress (at most every [`PROGRESS_EVERY`]) and
/// aborts it when a time limit passed.
async fn watch(dom: &Domain, before: &Copy, ctx: &Context, api: &Api<Domain>) -> Result<Next> {
    let key = moves::key(dom);
    let Some(job) = &before.job else {
        return Ok(Next::Return(Action::requeue(WATCH_EVERY)));
    };
    let processed = job.data_processed.unwrap_or(0);
    let memory = before
        .observed
        .as_ref()
        .map_or(0, |o| o.max_memory_kib.saturating_mul(1024));
    let seen = ctx.migrations.observe(&key, processed, PROGRESS_EVERY);
    // Without a task (this agent restarted mid-migration), libvirt's own clock counts.
    let (elapsed, stalled, report) = match &seen {
        Some(s) => (s.elapsed, s.stalled, s.report),
        None => (
            Duration::from_millis(job.elapsed_ms.unwrap_or(0)),
            Duration::ZERO,
            true,
        ),
    };
    if let Some(why) = moves::overdue(&ctx.settings.migration_limits, elapsed, stalled, memory) {
        tracing::warn!(%why, "aborting the live migration");
        ctx.migrations.aborting(&key, why.clone());
        let owner = converge::owner_of(dom)?;
        if let Err(e) = ctx
            .engine
            .domain_abort_job(&converge::domain_host_name(dom), &owner)
            .await
        {
            tracing::debug!(error = %e, "aborting the migration job");
        }
        ctx.event(dom, true, "MigrationAborted", "AbortMigration", why)
            .await;
        return Ok(Next::Return(Action::requeue(WATCH_EVERY)));
    }
    if report {
        let mut status = dom.status.clone().unwrap_or_default();
        if let Some(record) = status.migration.as_mut() {
            record.progress = Some(MigrationProgress {
                total_bytes: job.data_total,
                processed_bytes: job.data_processed,
                remaining_bytes: job.data_remaining,
                percent: job.percent(),
                bytes_per_second: job.mem_bps,
                iteration: job.iteration,
                update_time: Some(now()),
            });
        }
        // Progress is a courtesy: a conflict skips this update, the next one comes soon.
        match write_if_changed(dom, ctx, api, status).await {
            Err(e) if !e.is_conflict() => return Err(e),
            _ => {}
        }
    }
    Ok(Next::Return(Action::requeue(WATCH_EVERY)))
}

/// Hands the claim to `target` after the copy here is gone (claim write).
async fn complete_move(dom: &Domain, target: &str, ctx: &Context, api: &Api<Domain>) -> Result<()> {
    let me = ctx.settings.node.clone();
    // Forgotten by the caller once this write succeeded.
    let outcome = match ctx.migrations.outcome(&moves::key(dom)) {
        Some(Ended::Completed(o)) => Some(o),
        _ => None,
    };
    let mut status = dom.status.clone().unwrap_or_default();
    let mut record = status.migration.clone().unwrap_or_default();
    let took = record
        .start_time
        .as_ref()
        .map(|t| (k8s_openapi::jiff::Timestamp::now() - t.0).get_seconds());
    record.state = Some(MigrationState::Succeeded);
    record.end_time = Some(now());
    if let Some(o) = &outcome {
        record.downtime_millis = o.downtime_ms;
        record.data_transferred_bytes = o.data_total;
    }
    record.progress = None;
    let note = format!(
        "moved from node {me} to node {target}{}{}",
        took.map(|s| format!(" in {s}s")).unwrap_or_default(),
        record
            .downtime_millis
            .map(|d| format!(", downtime {d} ms"))
            .unwrap_or_default()
    );
    record.message = Some(note.clone());
    status.migration = Some(record);
    status.node_name = Some(target.to_string());
    status.phase = Some(DomainPhase::Migrating);
    set(
        &mut status.conditions,
        dom,
        conditions::MIGRATING,
        false,
        "Migrated",
        note.clone(),
    );
    write(dom, ctx, api, status).await?;
    ctx.event(dom, false, "Migrated", "Migrate", note).await;
    Ok(())
}

/// Ends a move without reaching its target (claim write); the guest stays here.
async fn end_move(
    dom: &Domain,
    ctx: &Context,
    api: &Api<Domain>,
    end: MoveEnd,
    message: String,
) -> Result<()> {
    let mut status = dom.status.clone().unwrap_or_default();
    let mut record = status.migration.clone().unwrap_or_default();
    record.state = Some(end.state());
    record.end_time = Some(now());
    record.message = Some(message.clone());
    record.progress = None;
    status.migration = Some(record);
    let reason = match end {
        MoveEnd::Failed => "MigrationFailed",
        MoveEnd::Aborted => "MigrationAborted",
    };
    set(
        &mut status.conditions,
        dom,
        conditions::MIGRATING,
        false,
        reason,
        message.clone(),
    );
    write(dom, ctx, api, status).await?;
    ctx.event(dom, end == MoveEnd::Failed, reason, "Migrate", message)
        .await;
    Ok(())
}

/// Removes a copy this node does not hold: only the very copy observed before the read
/// (the same runtime id while it runs), never one a migration job holds.
pub(super) async fn remove_stale_copy(dom: &Domain, before: &Copy, ctx: &Context) -> Result<()> {
    let name = converge::domain_host_name(dom);
    let owner = converge::owner_of(dom)?;
    let now = local::look(&ctx.engine, dom).await?;
    let same = match (before.local, now.local) {
        (Local::Running, Local::Running) => before.runtime_id() == now.runtime_id(),
        (Local::Running | Local::Stopped, Local::Stopped) => true,
        _ => false,
    };
    if !same {
        tracing::info!(?before.local, ?now.local, "the copy changed since it was seen: left alone");
        return Ok(());
    }
    if now.local == Local::Running {
        ctx.engine.domain_destroy(&name, &owner).await?;
    }
    ctx.engine.domain_undefine(&name, &owner).await?;
    let holder = facts_of(dom).claim.holder;
    let note = format!(
        "removed a copy of this domain from node {}: the domain is held by {}",
        ctx.settings.node,
        holder.map_or("no node".to_string(), |h| format!("node {h}"))
    );
    tracing::warn!(%note, "stale copy removed");
    // A Domain that no longer exists gets no event, only the log line.
    if dom.resource_version().is_some() {
        ctx.event(dom, true, "StaleCopyRemoved", "RemoveStaleCopy", note)
            .await;
    }
    Ok(())
}

fn has_finalizer(dom: &Domain) -> bool {
    dom.finalizers().iter().any(|f| f == FINALIZER)
}

/// The JSON patch adding the finalizer to `finalizers` (a `test` of the list first, so a
/// concurrent change of it fails instead of being overwritten); with `version`, a `test`
/// of `metadata.resourceVersion` before everything, so the patch applies only to that very
/// version of the object (pure).
pub fn finalizer_patch(finalizers: Option<&[String]>, version: Option<&str>) -> serde_json::Value {
    let mut ops = Vec::new();
    if let Some(rv) = version {
        ops.push(json!({"op": "test", "path": "/metadata/resourceVersion", "value": rv}));
    }
    match finalizers.filter(|f| !f.is_empty()) {
        None => ops.extend([
            json!({"op": "test", "path": "/metadata/finalizers", "value": null}),
            json!({"op": "add", "path": "/metadata/finalizers", "value": [FINALIZER]}),
        ]),
        Some(list) => ops.extend([
            json!({"op": "test", "path": "/metadata/finalizers", "value": list}),
            json!({"op": "add", "path": "/metadata/finalizers/-", "value": FINALIZER}),
        ]),
    }
    serde_json::Value::Array(ops)
}

/// Adds the finalizer before anything is defined here; returns the object as the API
/// server stored it.
async fn ensure_finalizer(dom: &Domain, ctx: &Context, api: &Api<Domain>) -> Result<Domain> {
    if has_finalizer(dom) {
        return Ok(dom.clone());
    }
    add_finalizer(dom, ctx, api, None).await
}

/// Adds the finalizer to `dom` with [`finalizer_patch`] (bound to `version` when given).
async fn add_finalizer(
    dom: &Domain,
    ctx: &Context,
    api: &Api<Domain>,
    version: Option<&str>,
) -> Result<Domain> {
    let ops = finalizer_patch(dom.metadata.finalizers.as_deref(), version);
    let patched = json_patch(api, dom, ops).await?;
    // Its echo through the watch changes the finalizers (a trigger) yet needs no reconcile:
    // this one goes on from the patched object.
    if let (Some(uid), Some(rv)) = (patched.uid(), patched.resource_version()) {
        ctx.echoes.wrote(&uid, &rv);
    }
    Ok(patched)
}

/// The fresh read and the finalizer in one round trip, for a cached `dom` without the
/// finalizer: the finalizer patch, bound to the cached copy's resourceVersion. `Some` with
/// the object as stored when the API server applied it; `None` when the cached copy is not
/// the current version (or the Domain is gone, or it needs no finalizer): read fresh then.
///
/// Why an applied patch is a fresh read (the protocol's rule 4, "nothing that can start a
/// guest rests on the watch cache"): the API server applies a JSON patch to the object as
/// it is stored at that moment, all operations or none, and the `test` of
/// `metadata.resourceVersion` passes only if that stored object is the very version cached
/// here. So the cached copy was current when the patch was applied, which is after this
/// round's look at libvirt, exactly what a GET at that moment would have shown; the answer
/// is that object plus the finalizer. A cached copy older than the agent's own last write
/// fails the `test` like any other stale copy (422), and so does one the server moved on
/// from in any way, so the claim it shows can be acted on only when it is still the claim.
async fn confirm_adding_finalizer(
    dom: &Domain,
    ctx: &Context,
    api: &Api<Domain>,
) -> Result<Option<Domain>> {
    let version = dom.resource_version();
    let stale = ctx
        .echoes
        .is_replaced(dom.metadata.uid.as_deref(), version.as_deref());
    let Some(version) = version.filter(|_| !has_finalizer(dom) && !stale) else {
        return Ok(None);
    };
    match add_finalizer(dom, ctx, api, Some(&version)).await {
        Ok(current) => Ok(Some(current)),
        Err(e) if e.is_conflict() => {
            tracing::debug!("the cached copy is not the current version: reading it fresh");
            Ok(None)
        }
        Err(Error::Kube(kube::Error::Api(e))) if e.code == 404 => Ok(None),
        Err(e) => Err(e),
    }
}

/// Removes the finalizer once nothing of the domain is left here.
/// A volume the domain's last move copied whose handover still depends on this domain (its
/// `status.transfer` names it, `Copying`). The deletion waits for it: the controller learns
/// from the domain's move record that the copy is the data (`Copied`), and without the record
/// a volume whose data was copied would stay bound to the node with the stale image. The
/// later steps need no domain.
async fn handover_unfinished(dom: &Domain, ctx: &Context) -> Result<Option<String>> {
    let Some(m) = dom.status.as_ref().and_then(|s| s.migration.as_ref()) else {
        return Ok(None);
    };
    let ns = dom.namespace().unwrap_or_default();
    let volumes: Api<virtkube_crds::Volume> = Api::namespaced(ctx.client.clone(), &ns);
    for name in &m.copied_volumes {
        let transfer = volumes
            .get_opt(name)
            .await?
            .and_then(|v| v.status.and_then(|s| s.transfer));
        if transfer.is_some_and(|t| {
            t.domain == dom.name_any() && t.state == virtkube_crds::volume::TransferState::Copying
        }) {
            return Ok(Some(name.clone()));
        }
    }
    Ok(None)
}

/// The deletion's last step, once nothing of the domain is left here: the finalizer's
/// removal (bound to `version` when given), unless a volume's handover still needs the
/// domain's move record.
async fn finalize(
    dom: &Domain,
    ctx: &Context,
    api: &Api<Domain>,
    version: Option<&str>,
) -> Result<Action> {
    if let Some(volume) = handover_unfinished(dom, ctx).await? {
        tracing::info!(
            volume,
            "deletion waits for the handover of a volume its last move copied"
        );
        return Ok(Action::requeue(Duration::from_secs(2)));
    }
    remove_finalizer(dom, api, version).await?;
    Ok(Action::await_change())
}

/// The JSON patch removing the finalizer at `index` of `metadata.finalizers`; with
/// `version`, a `test` of `metadata.resourceVersion` first, so it applies only to that very
/// version of the object (pure).
pub fn finalizer_removal_patch(index: usize, version: Option<&str>) -> serde_json::Value {
    let mut ops = Vec::new();
    if let Some(rv) = version {
        ops.push(json!({"op": "test", "path": "/metadata/resourceVersion", "value": rv}));
    }
    ops.extend([
        json!({"op": "test", "path": format!("/metadata/finalizers/{index}"), "value": FINALIZER}),
        json!({"op": "remove", "path": format!("/metadata/finalizers/{index}")}),
    ]);
    serde_json::Value::Array(ops)
}

async fn remove_finalizer(dom: &Domain, api: &Api<Domain>, version: Option<&str>) -> Result<()> {
    let Some(i) = dom.finalizers().iter().position(|f| f == FINALIZER) else {
        return Ok(());
    };
    let ops = finalizer_removal_patch(i, version);
    match json_patch(api, dom, ops).await {
        Ok(_) => Ok(()),
        // Gone already: the last finalizer was ours.
        Err(Error::Kube(kube::Error::Api(e))) if e.code == 404 => Ok(()),
        Err(e) => Err(e),
    }
}

async fn json_patch(api: &Api<Domain>, dom: &Domain, ops: serde_json::Value) -> Result<Domain> {
    let patch: json_patch::Patch = serde_json::from_value(ops).map_err(Error::Serialization)?;
    let params = PatchParams {
        field_manager: Some(FIELD_MANAGER.to_string()),
        ..PatchParams::default()
    };
    match api
        .patch(&dom.name_any(), &params, &Patch::Json::<()>(patch))
        .await
    {
        Ok(d) => Ok(d),
        // The list changed since it was read: decide again on a fresh read.
        Err(kube::Error::Api(e)) if e.code == 422 || e.code == 409 => Err(Error::Write(
            crate::placement::write::WriteError::Conflict {
                kind: KIND.into(),
                name: dom.name_any(),
                rv: dom.resource_version().unwrap_or_default(),
            },
        )),
        Err(e) => Err(Error::Kube(e)),
    }
}

/// Writes `status` (compare-and-swap on the read `dom`), counting the patch.
async fn write(dom: &Domain, ctx: &Context, api: &Api<Domain>, status: DomainStatus) -> Result<()> {
    write_status(api, dom, &status, FIELD_MANAGER).await?;
    if let (Some(uid), Some(rv)) = (dom.uid(), dom.resource_version()) {
        ctx.echoes.replaced(&uid, &rv);
    }
    ctx.metrics
        .status_patches
        .get_or_create(&super::metrics::KindLabels { kind: KIND.into() })
        .inc();
    Ok(())
}

/// Writes `status` when it differs from what `dom` carries; returns whether it wrote.
pub async fn write_if_changed(
    dom: &Domain,
    ctx: &Context,
    api: &Api<Domain>,
    status: DomainStatus,
) -> Result<bool> {
    if dom.status.as_ref() == Some(&status) {
        return Ok(false);
    }
    write(dom, ctx, api, status).await?;
    Ok(true)
}

fn now() -> Time {
    Time(k8s_openapi::jiff::Timestamp::now())
}

/// Sets one condition of `dom`'s generation, keeping its transition time when its status
/// does not change.
fn set(conds: &mut Vec<Condition>, dom: &Domain, t: &str, ok: bool, reason: &str, msg: String) {
    conditions::set_condition(
        conds,
        conditions::condition(
            t,
            if ok { cs::TRUE } else { cs::FALSE },
            reason,
            msg,
            dom.meta().generation,
            now(),
        ),
    );
}

/// The status describing `observed` (or a failure) on top of the current one: the fields
/// the agent owns are replaced, the claim (`nodeName`, `migration`) and the controller's
/// conditions are kept, and condition transition times stay when nothing changed.
pub fn status_for(
    dom: &Domain,
    ctx: &Context,
    observed: Option<&DomainObserved>,
    pending: &[String],
    problem: Option<(&str, String)>,
    spec_valid: bool,
) -> DomainStatus {
    let current = dom.status.clone().unwrap_or_default();
    let mut conds: Vec<Condition> = current.conditions.clone();
    let node = ctx.settings.node.clone();
    let mut status = DomainStatus {
        node_name: current.node_name.clone(),
        migration: current.migration.clone(),
        domain_name: Some(converge::domain_host_name(dom)),
        observed_generation: dom.meta().generation,
        pending_changes: pending.to_vec(),
        ..DomainStatus::default()
    };
    if spec_valid {
        set(
            &mut conds,
            dom,
            conditions::SPEC_VALID,
            true,
            "Valid",
            String::new(),
        );
    } else if let Some((reason, msg)) = &problem {
        set(
            &mut conds,
            dom,
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
            status.cpu_scheduling =
                crate::cli::status::cpu_scheduling(&crate::host::cpu_tune_from(&o.cpu_tune));
            status.security_labels = crate::host::security_labels(&o.security_labels);
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
            status.host_devices = crate::cli::status::host_device_status(
                &dom.spec
                    .host_devices
                    .iter()
                    .map(|h| (h.name.as_str(), h.address.as_str()))
                    .collect::<Vec<_>>(),
                &o.hostdevs
                    .iter()
                    .map(|h| (h.address.to_string(), h.alias.clone()))
                    .collect::<Vec<_>>(),
            );
            status.phase = Some(phase_of(o));
            set(
                &mut conds,
                dom,
                conditions::DEFINED,
                true,
                "Defined",
                format!("libvirt domain {} (uuid {})", o.name, o.uuid),
            );
            set(
                &mut conds,
                dom,
                conditions::RUNNING,
                o.state.is_active(),
                &camel(o.state.as_str()),
                format!("libvirt state {}, reason {}", o.state.as_str(), o.reason),
            );
            if pending.is_empty() {
                set(
                    &mut conds,
                    dom,
                    conditions::RESTART_REQUIRED,
                    false,
                    "UpToDate",
                    String::new(),
                );
            } else {
                set(
                    &mut conds,
                    dom,
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
                dom,
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
            set(&mut conds, dom, conditions::READY, false, reason, msg);
        }
        None => {
            let reached = observed.is_some_and(|o| matches_power(o.state, desired));
            // The spec asks for another node and the last move there failed: the guest is
            // fine here, but not where it was asked to be. GitOps tools must not call that
            // done (the controller tries the move again after its backoff).
            let failed_move = status.migration.as_ref().filter(|m| {
                m.state == Some(virtkube_crds::domain::MigrationState::Failed)
                    && m.target_node.is_some()
                    && m.target_node == dom.spec.node_name
            });
            let requested = dom.spec.node_name.as_deref().filter(|n| *n != node);
            if let (true, Some(m), Some(requested)) = (reached, failed_move, requested) {
                set(
                    &mut conds,
                    dom,
                    conditions::READY,
                    false,
                    "MigrationFailed",
                    format!(
                        "{desired:?} on node {node}, but spec.nodeName asks for {requested} and the move failed: {}; retried after the cluster controller's backoff",
                        m.message.as_deref().unwrap_or("no reason recorded")
                    ),
                );
            } else if reached {
                set(
                    &mut conds,
                    dom,
                    conditions::READY,
                    true,
                    "Reconciled",
                    format!("{desired:?} on node {node}"),
                );
            } else {
                let state = observed.map_or("absent", |o| o.state.as_str());
                set(
                    &mut conds,
                    dom,
                    conditions::READY,
                    false,
                    "Converging",
                    format!("wants {desired:?}, libvirt says {state}"),
                );
            }
        }
    }
    // Conditions the agent does not own (AGENT_CONDITIONS) came along from the current
    // status untouched.
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
