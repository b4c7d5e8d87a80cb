//! One pass over the cluster: the I/O shell around the pure decisions. From one read of
//! every object it decides each Domain (in name order, so the migration limits and the
//! nodes' memory are shared out deterministically), then each Volume, then the routing
//! labels, then the HypervisorNodes' conditions, writing only what changed.
//!
//! Every status write is a compare-and-swap ([`write_status`]); a write refused because the
//! object changed since it was read is followed by a fresh GET and a new decision. Domains
//! are decided one by one and written a few at a time, each claim followed at once by its
//! routing label ([`reconcile_domains`]). What the
//! pass wrote is remembered until the watch caches catch up, so the next pass does not decide
//! on a version older than its own write.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use crate::events::{Event, EventType, Recorder};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::{Client, Resource, ResourceExt};
use serde_json::json;
use virtkube_crds::conditions::READY;
use virtkube_crds::domain::MigrationState;
use virtkube_crds::{API_VERSION, Domain, HypervisorNode, Network, StoragePool, Volume};

use crate::event_queue::EventQueue;
use crate::placement::ControllerStep;
use crate::placement::write::{WriteError, write_status};

use super::binding::finalizer_removal;
use super::decide::{Decision, Inputs, Note, decide};
use super::drain::{self, Progress};
use super::labels;
use super::liveness::{self, HEARTBEAT_STALE};
use super::metrics::{DecisionLabels, Metrics, OutcomeLabels, ReasonLabels};
use super::moves::{self, Backoff, backoff_key};
use super::orphans::{self, Membership};
use super::settings::{FIELD_MANAGER, Settings};
use super::usage::{Usage, domain_key};
use super::view::{Cluster, after};
use super::volumes::{Consumers, decide_volume};

/// How often a conflicting write is decided again within one pass before the next pass
/// takes over.
const ATTEMPTS: usize = 3;

/// Domain writes (a claim and its routing label) in flight at once in a pass. The claim rate
/// is bound by the API server's latency, not by the pass's own work (at 1,000 Domains a
/// pass decides in 1-30 ms and waits seconds on its writes): with 8 in flight the last claim
/// came 15-23 s after the last create, with 32 in 5.4-5.9 s (controller/benches/scale/notes.md).
const WRITERS: usize = 32;

/// What a pass needs: the client, the knobs, the metrics and the event recorder.
pub struct Ctx {
    /// The Kubernetes client.
    pub client: Client,
    /// The knobs.
    pub settings: Settings,
    /// The metrics.
    pub metrics: Arc<Metrics>,
    /// Publishes events.
    pub recorder: Recorder,
    /// When set, events go through this queue instead of being published before the pass
    /// goes on (tests that read the events right after a pass leave it out).
    pub events: Option<EventQueue>,
}

/// One read of every object the controller decides on. The objects are shared with the
/// watch caches (a pass never changes one: it replaces it with what it wrote), so taking a
/// snapshot copies pointers, not objects.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Domains.
    pub domains: Vec<Arc<Domain>>,
    /// Volumes.
    pub volumes: Vec<Arc<Volume>>,
    /// HypervisorNodes.
    pub hypervisors: Vec<Arc<HypervisorNode>>,
    /// Kubernetes Nodes.
    pub nodes: Vec<Arc<Node>>,
    /// Networks.
    pub networks: Vec<Arc<Network>>,
    /// StoragePools.
    pub pools: Vec<Arc<StoragePool>>,
}

/// The objects behind `arcs`, borrowed.
fn borrowed<K>(arcs: &[Arc<K>]) -> impl Iterator<Item = &K> {
    arcs.iter().map(|a| &**a)
}

/// Every object of kind `K`, listed once.
async fn list_all<K>(client: &Client) -> Result<Vec<Arc<K>>, kube::Error>
where
    K: Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let api = Api::<K>::all(client.clone());
    let list = api.list(&ListParams::default()).await?;
    Ok(list.items.into_iter().map(Arc::new).collect())
}

impl Snapshot {
    /// Lists every object (the watch caches do this in the controller; tests call it
    /// directly).
    pub async fn list(client: &Client) -> Result<Snapshot, kube::Error> {
        Ok(Snapshot {
            domains: list_all(client).await?,
            volumes: list_all(client).await?,
            hypervisors: list_all(client).await?,
            nodes: list_all(client).await?,
            networks: list_all(client).await?,
            pools: list_all(client).await?,
        })
    }
}

/// An object this controller wrote, until the caches show it: the versions it replaced and
/// the latest.
#[derive(Debug, Clone)]
struct Written<K> {
    replaced: Vec<String>,
    latest: Arc<K>,
}

/// What passes remember from one to the next.
#[derive(Debug, Default)]
pub struct PassState {
    backoff: Backoff,
    domains: HashMap<String, Written<Domain>>,
    volumes: HashMap<String, Written<Volume>>,
    /// Whether a pass has run (the first only notes which moves already ended).
    started: bool,
    /// Per drained node, the last progress reported as an event.
    drain_reported: HashMap<String, String>,
    /// Nodes annotated fenced while still heard from, already warned about.
    fence_warned: HashSet<String>,
}

/// What a pass found, for the loop that runs passes.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Report {
    /// When something time-based changes next (a heartbeat goes stale, a pending move runs
    /// out of time, a backoff ends).
    pub next_wake: Option<Timestamp>,
    /// Writes made.
    pub writes: usize,
    /// Writes refused for a conflict.
    pub conflicts: usize,
}

fn remember<K: Resource>(
    map: &mut HashMap<String, Written<K>>,
    key: String,
    before: &K,
    latest: Arc<K>,
) {
    let entry = map.entry(key).or_insert_with(|| Written {
        replaced: Vec::new(),
        latest: latest.clone(),
    });
    entry
        .replaced
        .extend(before.meta().resource_version.clone());
    entry.latest = latest;
}

/// Replaces cached objects older than this controller's own writes with what it wrote, and
/// forgets writes the cache has caught up with.
fn overlay<K: Resource>(
    objects: &mut [Arc<K>],
    written: &mut HashMap<String, Written<K>>,
    key: impl Fn(&K) -> String,
) {
    let mut live = HashSet::new();
    for obj in objects.iter_mut() {
        let k = key(obj);
        let rv = obj.meta().resource_version.clone().unwrap_or_default();
        if let Some(w) = written.get(&k)
            && w.replaced.contains(&rv)
        {
            *obj = w.latest.clone();
            live.insert(k);
        }
    }
    written.retain(|k, _| live.contains(k));
}

fn volume_key(vol: &Volume) -> String {
    format!("{}/{}", vol.namespace().unwrap_or_default(), vol.name_any())
}

/// Where one pass's time went, milliseconds per phase (logged at debug level: the
/// controller's claim rate is bounded by how long a pass takes).
#[derive(Debug)]
struct Laps {
    last: std::time::Instant,
    phases: Vec<(&'static str, f64)>,
}

impl Laps {
    fn start() -> Laps {
        Laps {
            last: std::time::Instant::now(),
            phases: Vec::new(),
        }
    }

    /// Ends the phase `name` (it started where the previous one ended).
    fn lap(&mut self, name: &'static str) {
        let now = std::time::Instant::now();
        let ms = now.duration_since(self.last).as_secs_f64() * 1e3;
        self.phases.push((name, ms));
        self.last = now;
    }

    fn log(&self, domains: usize, writes: usize) {
        if tracing::enabled!(tracing::Level::DEBUG) {
            let phases: Vec<String> = self
                .phases
                .iter()
                .map(|(name, ms)| format!("{name}={ms:.1}"))
                .collect();
            tracing::debug!(domains, writes, ms = %phases.join(" "), "pass timings");
        }
    }
}

/// Runs one pass over `snap` at `now`.
pub async fn pass(ctx: &Ctx, state: &mut PassState, snap: Snapshot, now: Timestamp) -> Report {
    let started = std::time::Instant::now();
    let mut laps = Laps::start();
    let Snapshot {
        mut domains,
        mut volumes,
        hypervisors,
        nodes,
        networks,
        pools,
    } = snap;
    overlay(&mut domains, &mut state.domains, domain_key);
    overlay(&mut volumes, &mut state.volumes, volume_key);
    domains.sort_by_cached_key(|d| domain_key(d));
    volumes.sort_by_cached_key(|v| volume_key(v));
    let mut report = Report::default();
    let settings = &ctx.settings;
    let mut cluster = Cluster::build(
        borrowed(&hypervisors),
        borrowed(&nodes),
        borrowed(&networks),
        borrowed(&pools),
        borrowed(&volumes),
        settings,
        now,
    );
    cluster.note_users(borrowed(&domains));

    // How moves ended, once per record (the first pass only notes what it finds).
    let first = !state.started;
    state.started = true;
    for dom in &domains {
        let record = dom.status.as_ref().and_then(|s| s.migration.as_ref());
        if let Some(outcome) = state.backoff.observe(&backoff_key(dom), record, settings)
            && !first
        {
            let labels = OutcomeLabels {
                outcome: format!("{:?}", outcome.state),
            };
            ctx.metrics.migrations_finished.get_or_create(&labels).inc();
            if let Some(seconds) = outcome.seconds
                && outcome.state != MigrationState::Aborted
            {
                ctx.metrics
                    .migration_duration
                    .get_or_create(&labels)
                    .observe(seconds);
            }
        }
    }
    let keys: HashSet<String> = domains.iter().map(|d| backoff_key(d)).collect();
    state.backoff.retain(&keys);

    // Domains.
    let mut usage = Usage::of(borrowed(&domains));
    laps.lap("prepare");
    let mut progress: BTreeMap<String, Progress> = cluster
        .nodes
        .values()
        .filter(|n| n.draining())
        .map(|n| (n.name.clone(), Progress::default()))
        .collect();
    let mut waiting = 0i64;
    let mut kept = Vec::with_capacity(domains.len());
    let domain_count = domains.len();
    for (dom, decision) in reconcile_domains(
        ctx,
        state,
        &cluster,
        &mut usage,
        domains,
        now,
        &mut report,
        &mut laps,
    )
    .await
    {
        if let Some(d) = &decision {
            if d.step == ControllerStep::MoveWaits {
                waiting += 1;
            }
            if let Some((node, role)) = &d.drain
                && let Some(p) = progress.get_mut(node)
            {
                p.count(role);
            }
        }
        kept.extend(dom);
    }
    let domains = kept;
    for dom in &domains {
        if let Some(from) = drain::moved_from(dom)
            && let Some(p) = progress.get_mut(from)
        {
            p.moved += 1;
        }
    }

    // Volumes (they follow the domains just bound).
    let consumers = Consumers::of(borrowed(&domains), borrowed(&volumes));
    let mut kept = Vec::with_capacity(volumes.len());
    for vol in volumes {
        kept.extend(
            reconcile_volume(ctx, state, &cluster, &consumers, vol, now, &mut report).await,
        );
    }
    let volumes = kept;
    laps.lap("volumes");

    // Routing labels, from the claims as they are now.
    let consumers = Consumers::of(borrowed(&domains), borrowed(&volumes));
    for dom in &domains {
        let desired = labels::domain_labels(dom);
        relabel(ctx, state, &**dom, &desired, &mut report).await;
    }
    for vol in &volumes {
        let ns = vol.namespace().unwrap_or_default();
        let holder = vol.status.as_ref().and_then(|s| s.node_name.as_deref());
        let desired = labels::volume_labels(holder, &consumers.users(&ns, &vol.name_any()));
        relabel(ctx, state, &**vol, &desired, &mut report).await;
    }
    laps.lap("labels");

    // HypervisorNodes: liveness and drain progress.
    for hvn in &hypervisors {
        let Some(view) = cluster.node(&hvn.name_any()) else {
            continue;
        };
        reconcile_node(
            ctx,
            state,
            hvn,
            view,
            progress.get(&view.name),
            now,
            &mut report,
        )
        .await;
    }
    state
        .drain_reported
        .retain(|node, _| progress.contains_key(node));

    // Per-node finalizers and status entries of nodes that left the cluster.
    release_orphans(
        ctx,
        &hypervisors,
        &nodes,
        &networks,
        &pools,
        now,
        &mut report,
    )
    .await;
    laps.lap("nodes");

    // Gauges and the next time-based change.
    let m = &ctx.metrics;
    m.pending_binds.set(
        domains
            .iter()
            .filter(|d| d.metadata.deletion_timestamp.is_none())
            .filter(|d| {
                d.status
                    .as_ref()
                    .and_then(|s| s.node_name.as_ref())
                    .is_none()
            })
            .count() as i64,
    );
    m.active_moves.set(usage.active_moves() as i64);
    m.waiting_moves.set(waiting);
    m.unreachable_nodes
        .set(cluster.nodes.values().filter(|n| !n.fresh).count() as i64);
    m.draining_nodes.set(progress.len() as i64);
    m.passes.inc();
    m.pass_duration.observe(started.elapsed().as_secs_f64());
    report.next_wake = next_wake(&cluster, &domains, &state.backoff, settings, now);
    laps.lap("rest");
    laps.log(domain_count, report.writes);
    report
}

/// Lets go, on behalf of nodes that left the cluster, of their finalizers and `status.nodes`
/// entries on Networks and StoragePools ([`orphans`]). The watch caches only nominate
/// candidates; the decision is taken again on a fresh read of the membership (a lagging
/// cache must never make a live node look gone), and the finalizer removal is guarded by a
/// JSON-patch `test` of the list it was decided on.
async fn release_orphans(
    ctx: &Ctx,
    hypervisors: &[Arc<HypervisorNode>],
    nodes: &[Arc<Node>],
    networks: &[Arc<Network>],
    pools: &[Arc<StoragePool>],
    now: Timestamp,
    report: &mut Report,
) {
    let cached = Membership::of(
        nodes.iter().map(|n| n.name_any()),
        borrowed(hypervisors),
        now,
        orphans::DEFAULT_GRACE,
    );
    let net_entries = |n: &Network| -> Vec<String> {
        n.status
            .iter()
            .flat_map(|s| s.nodes.iter().map(|e| e.node_name.clone()))
            .collect()
    };
    let pool_entries = |p: &StoragePool| -> Vec<String> {
        p.status
            .iter()
            .flat_map(|s| s.nodes.iter().map(|e| e.node_name.clone()))
            .collect()
    };
    let nets: Vec<&Network> = borrowed(networks)
        .filter(|n| !orphans::orphans(n.finalizers(), &net_entries(n), &cached).is_empty())
        .collect();
    let pls: Vec<&StoragePool> = borrowed(pools)
        .filter(|p| !orphans::orphans(p.finalizers(), &pool_entries(p), &cached).is_empty())
        .collect();
    if nets.is_empty() && pls.is_empty() {
        return;
    }
    let fresh = match orphans::read_membership(&ctx.client, orphans::DEFAULT_GRACE).await {
        Ok(m) => m,
        Err(e) => {
            tracing::warn!(error = %e, "not releasing the finalizers of nodes that left: the membership could not be read");
            ctx.metrics.error("membership");
            return;
        }
    };
    for net in nets {
        let api: Api<Network> = Api::all(ctx.client.clone());
        released(ctx, &api, net, &net_entries(net), &fresh, report).await;
    }
    for pool in pls {
        let api: Api<StoragePool> = Api::all(ctx.client.clone());
        released(ctx, &api, pool, &pool_entries(pool), &fresh, report).await;
    }
}

/// Releases what `obj` still holds for nodes that left, and says so (log, event, metrics).
async fn released<K>(
    ctx: &Ctx,
    api: &Api<K>,
    obj: &K,
    entries: &[String],
    members: &Membership,
    report: &mut Report,
) where
    K: Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let kind = K::kind(&()).to_string();
    match orphans::release(api, obj, entries, members).await {
        Ok(done) if done.is_empty() => {}
        Ok(done) => {
            report.writes += 1;
            ctx.metrics.wrote(&kind.to_lowercase());
            let nodes: Vec<&str> = done
                .entries
                .iter()
                .map(String::as_str)
                .chain(
                    done.finalizers
                        .iter()
                        .filter_map(|f| f.strip_prefix(orphans::NODE_FINALIZER_PREFIX)),
                )
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect();
            let note = format!(
                "released on behalf of node(s) {} that left the cluster (no Node, no heartbeat for {} min): their libvirt objects, if any, stay on those machines",
                nodes.join(", "),
                orphans::DEFAULT_GRACE.as_secs() / 60
            );
            tracing::info!(object = %obj.name_any(), kind, %note, "per-node finalizers released");
            let event = Event {
                type_: EventType::Normal,
                reason: "NodeLeft".into(),
                note: Some(note),
                action: "ReleaseNodeFinalizers".into(),
                secondary: None,
            };
            if let Err(e) = ctx.recorder.publish(&event, &obj.object_ref(&())).await {
                tracing::debug!(error = %e, "event not published");
            }
        }
        Err(e) => {
            ctx.metrics.error(&kind.to_lowercase());
            tracing::warn!(object = %obj.name_any(), error = %e, "releasing the finalizers of nodes that left failed; retried at the next pass");
        }
    }
}

/// Decides and writes every Domain; returns each as it is now (`None` when it is gone) with
/// the decision carried out, in name order.
///
/// The decisions are taken one by one in name order, each as if the writes before it
/// succeeded (so the nodes' memory and the migration limits are shared out exactly as when
/// writing one by one); then up to [`WRITERS`] writes are in flight at once, each claim
/// followed at once by its routing label, so an agent starts on a domain while the pass
/// goes on. Every write is still a compare-and-swap on the read it was decided on; one
/// refused is decided again on a fresh read, one by one, as before.
#[allow(clippy::too_many_arguments)]
async fn reconcile_domains(
    ctx: &Ctx,
    state: &mut PassState,
    cluster: &Cluster,
    usage: &mut Usage,
    domains: Vec<Arc<Domain>>,
    now: Timestamp,
    report: &mut Report,
    laps: &mut Laps,
) -> Vec<(Option<Arc<Domain>>, Option<Decision>)> {
    let mut settled = Vec::with_capacity(domains.len());
    let mut to_write = Vec::new();
    for dom in domains {
        let decision = decide_domain(ctx, state, cluster, usage, &dom, now);
        if !needs_write(&dom, &decision) {
            settled.push((Some(dom), Some(decision)));
            continue;
        }
        // Counted as written, for the decisions that follow.
        let mut planned = (*dom).clone();
        planned.status = Some(decision.status.clone());
        usage.replace(&planned);
        to_write.push((dom, decision));
    }
    laps.lap("decide");
    let written: Vec<_> = futures::stream::iter(to_write)
        .map(|(dom, decision)| async move {
            let result = write_decision(ctx, &dom, &decision).await;
            let labelled = match &result {
                Ok(new) if !is_gone(new) => {
                    write_labels(ctx, new, &labels::domain_labels(new)).await
                }
                _ => None,
            };
            (dom, decision, result, labelled)
        })
        .buffer_unordered(WRITERS)
        .collect()
        .await;
    for (dom, decision, result, labelled) in written {
        let key = domain_key(&dom);
        match result {
            Ok(new) => {
                let mut new = wrote_domain(ctx, state, usage, report, &dom, new, &decision).await;
                if let (Some(claimed), Some(labelled)) = (new.as_ref(), labelled) {
                    report.writes += 1;
                    ctx.metrics.wrote("Domain");
                    let labelled = Arc::new(labelled);
                    remember(&mut state.domains, key, claimed, labelled.clone());
                    new = Some(labelled);
                }
                settled.push((new, Some(decision)));
            }
            Err(e) => {
                // Counted again as it is, until it is decided again.
                usage.replace(&dom);
                let Some(fresh) = read_again(ctx, usage, report, dom, e).await else {
                    settled.push((None, None));
                    continue;
                };
                let fresh = match fresh {
                    Ok(fresh) => fresh,
                    Err(kept) => {
                        settled.push((Some(kept), None));
                        continue;
                    }
                };
                let (mut dom, decision) =
                    reconcile_domain(ctx, state, cluster, usage, fresh, now, report).await;
                if let Some(d) = dom.as_mut() {
                    let desired = labels::domain_labels(d);
                    if let Some(labelled) = relabel(ctx, state, &**d, &desired, report).await {
                        *d = labelled;
                    }
                }
                settled.push((dom, decision));
            }
        }
    }
    laps.lap("write");
    settled.sort_by_cached_key(|(dom, _)| dom.as_ref().map(|d| domain_key(d)));
    settled
}

/// The decision for `dom` (pure).
fn decide_domain(
    ctx: &Ctx,
    state: &PassState,
    cluster: &Cluster,
    usage: &Usage,
    dom: &Domain,
    now: Timestamp,
) -> Decision {
    let inputs = Inputs {
        cluster,
        usage,
        settings: &ctx.settings,
        backoff: &state.backoff,
        now,
    };
    decide(dom, &inputs)
}

/// Whether carrying out `decision` writes anything (pure).
fn needs_write(dom: &Domain, decision: &Decision) -> bool {
    if decision.step == ControllerStep::Finalize {
        return finalizer_removal(dom).is_some();
    }
    match &dom.status {
        Some(s) => *s != decision.status,
        None => decision.status != Default::default(),
    }
}

/// Whether the API server deleted `dom` (deleting, its last finalizer off).
fn is_gone(dom: &Domain) -> bool {
    dom.metadata.deletion_timestamp.is_some()
        && dom.metadata.finalizers.as_ref().is_none_or(Vec::is_empty)
}

/// Writes `decision` about `dom` (compare-and-swap on `dom` as read): the finalizer's
/// removal, or the status.
async fn write_decision(
    ctx: &Ctx,
    dom: &Domain,
    decision: &Decision,
) -> Result<Domain, WriteError> {
    let api: Api<Domain> =
        Api::namespaced(ctx.client.clone(), &dom.namespace().unwrap_or_default());
    let name = dom.name_any();
    if decision.step != ControllerStep::Finalize {
        return write_status(&api, dom, &decision.status, FIELD_MANAGER).await;
    }
    let Some(patch) = finalizer_removal(dom) else {
        return Ok(dom.clone());
    };
    let params = PatchParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..PatchParams::default()
    };
    match api.patch(&name, &params, &Patch::Json::<()>(patch)).await {
        Ok(new) => {
            ctx.metrics.finalized.inc();
            Ok(new)
        }
        Err(kube::Error::Api(e)) if e.code == 409 || e.code == 422 => Err(WriteError::Conflict {
            kind: "Domain".into(),
            name,
            rv: dom.resource_version().unwrap_or_default(),
        }),
        Err(kube::Error::Api(e)) if e.code == 404 => Err(WriteError::Gone {
            kind: "Domain".into(),
            name,
        }),
        Err(e) => Err(WriteError::Kube(e)),
    }
}

/// Records a successful write of `decision` (`before` as read, `new` as written): counts,
/// events, what it takes on the nodes, and the write itself until the cache shows it.
/// Returns the domain as it is now, `None` when the write deleted it.
async fn wrote_domain(
    ctx: &Ctx,
    state: &mut PassState,
    usage: &mut Usage,
    report: &mut Report,
    before: &Domain,
    new: Domain,
    decision: &Decision,
) -> Option<Arc<Domain>> {
    let key = domain_key(before);
    report.writes += 1;
    ctx.metrics.wrote("Domain");
    record_decision(&ctx.metrics, decision);
    tracing::info!(domain = %key, step = ?decision.step, "decided");
    for note in &decision.notes {
        publish(ctx, &new, note).await;
    }
    if is_gone(&new) {
        // The last finalizer is off: the API server deleted it.
        usage.remove(&key);
        return None;
    }
    usage.replace(&new);
    let new = Arc::new(new);
    remember(&mut state.domains, key, before, new.clone());
    Some(new)
}

/// After a refused or failed write of `dom`: `Some(Ok(fresh))` to decide again on, `None`
/// when it is gone, `Some(Err(dom))` to leave it to the next pass.
async fn read_again(
    ctx: &Ctx,
    usage: &mut Usage,
    report: &mut Report,
    dom: Arc<Domain>,
    error: WriteError,
) -> Option<Result<Arc<Domain>, Arc<Domain>>> {
    let key = domain_key(&dom);
    match error {
        e if e.is_conflict() => {
            report.conflicts += 1;
            ctx.metrics.conflict("Domain");
            tracing::debug!(domain = %key, error = %e, "reading again");
            let api: Api<Domain> =
                Api::namespaced(ctx.client.clone(), &dom.namespace().unwrap_or_default());
            match api.get_opt(&dom.name_any()).await {
                Ok(Some(fresh)) => {
                    usage.replace(&fresh);
                    Some(Ok(Arc::new(fresh)))
                }
                Ok(None) => {
                    usage.remove(&key);
                    None
                }
                Err(e) => {
                    ctx.metrics.error("Domain");
                    tracing::warn!(domain = %key, error = %e, "reading the domain again failed; next pass");
                    Some(Err(dom))
                }
            }
        }
        WriteError::Gone { .. } => {
            usage.remove(&key);
            None
        }
        e => {
            ctx.metrics.error("Domain");
            tracing::warn!(domain = %key, error = %e, "writing the decision failed; next pass");
            Some(Err(dom))
        }
    }
}

/// Decides and writes one Domain, deciding again on a fresh read after a conflict (at most
/// [`ATTEMPTS`] times); returns it as it is now (`None` when it is gone) and the decision
/// carried out.
async fn reconcile_domain(
    ctx: &Ctx,
    state: &mut PassState,
    cluster: &Cluster,
    usage: &mut Usage,
    mut dom: Arc<Domain>,
    now: Timestamp,
    report: &mut Report,
) -> (Option<Arc<Domain>>, Option<Decision>) {
    for _ in 0..ATTEMPTS {
        let decision = decide_domain(ctx, state, cluster, usage, &dom, now);
        if !needs_write(&dom, &decision) {
            return (Some(dom), Some(decision));
        }
        match write_decision(ctx, &dom, &decision).await {
            Ok(new) => {
                let new = wrote_domain(ctx, state, usage, report, &dom, new, &decision).await;
                return (new, Some(decision));
            }
            Err(e) => match read_again(ctx, usage, report, dom, e).await {
                Some(Ok(fresh)) => dom = fresh,
                Some(Err(kept)) => return (Some(kept), None),
                None => return (None, None),
            },
        }
    }
    (Some(dom), None)
}

fn record_decision(m: &Metrics, d: &Decision) {
    match &d.step {
        ControllerStep::Bind { .. } | ControllerStep::Unschedulable => {
            let scheduled =
                virtkube_crds::conditions::find(&d.status.conditions, super::conditions::SCHEDULED);
            let bound = matches!(d.step, ControllerStep::Bind { .. });
            m.scheduling
                .get_or_create(&DecisionLabels {
                    decision: if bound { "bound" } else { "unschedulable" }.into(),
                    reason: scheduled.map(|c| c.reason.clone()).unwrap_or_default(),
                })
                .inc();
            for reason in d.refused.iter().flat_map(|r| r.reasons()) {
                m.scheduling_failures
                    .get_or_create(&ReasonLabels {
                        reason: reason.into(),
                    })
                    .inc();
            }
        }
        ControllerStep::Unfence { .. } => {
            m.unfenced.inc();
        }
        _ => {}
    }
    if let Some(reason) = d.approved {
        m.migrations_approved
            .get_or_create(&ReasonLabels {
                reason: reason.into(),
            })
            .inc();
    }
    if let Some(reason) = d.cancelled {
        m.migrations_cancelled
            .get_or_create(&ReasonLabels {
                reason: reason.into(),
            })
            .inc();
    }
}

/// Decides and writes one Volume; returns it as it is now (`None` when it is gone).
async fn reconcile_volume(
    ctx: &Ctx,
    state: &mut PassState,
    cluster: &Cluster,
    consumers: &Consumers,
    mut vol: Arc<Volume>,
    now: Timestamp,
    report: &mut Report,
) -> Option<Arc<Volume>> {
    let key = volume_key(&vol);
    let api: Api<Volume> =
        Api::namespaced(ctx.client.clone(), &vol.namespace().unwrap_or_default());
    let name = vol.name_any();
    for _ in 0..ATTEMPTS {
        let unbound = vol
            .status
            .as_ref()
            .and_then(|s| s.node_name.as_ref())
            .is_none();
        let result = if vol.metadata.deletion_timestamp.is_some() && unbound {
            // Nobody holds it, so no image exists anywhere: nothing to clean up.
            let patch = finalizer_removal(&*vol)?;
            let params = PatchParams {
                field_manager: Some(FIELD_MANAGER.into()),
                ..PatchParams::default()
            };
            api.patch(&name, &params, &Patch::Json::<()>(patch))
                .await
                .map_err(|e| match e {
                    kube::Error::Api(ae) if ae.code == 409 || ae.code == 422 => {
                        WriteError::Conflict {
                            kind: "Volume".into(),
                            name: name.clone(),
                            rv: String::new(),
                        }
                    }
                    kube::Error::Api(ae) if ae.code == 404 => WriteError::Gone {
                        kind: "Volume".into(),
                        name: name.clone(),
                    },
                    e => WriteError::Kube(e),
                })
                .map(|v| (v, Vec::new()))
        } else {
            let decision = decide_volume(&vol, cluster, consumers, now);
            let unchanged = match &vol.status {
                Some(s) => *s == decision.status,
                None => decision.status == Default::default(),
            };
            if unchanged {
                return Some(vol);
            }
            write_status(&api, &vol, &decision.status, FIELD_MANAGER)
                .await
                .map(|v| (v, decision.notes))
        };
        match result {
            Ok((new, notes)) => {
                report.writes += 1;
                ctx.metrics.wrote("Volume");
                if new.metadata.deletion_timestamp.is_some()
                    && new.metadata.finalizers.as_ref().is_none_or(Vec::is_empty)
                {
                    return None;
                }
                for note in &notes {
                    publish(ctx, &new, note).await;
                }
                let new = Arc::new(new);
                remember(&mut state.volumes, key, &vol, new.clone());
                return Some(new);
            }
            Err(e) if e.is_conflict() => {
                report.conflicts += 1;
                ctx.metrics.conflict("Volume");
                match api.get_opt(&name).await {
                    Ok(fresh) => vol = Arc::new(fresh?),
                    Err(e) => {
                        ctx.metrics.error("Volume");
                        tracing::warn!(volume = %key, error = %e, "reading the volume again failed; next pass");
                        return Some(vol);
                    }
                }
            }
            Err(WriteError::Gone { .. }) => return None,
            Err(e) => {
                ctx.metrics.error("Volume");
                tracing::warn!(volume = %key, error = %e, "writing the volume's status failed; next pass");
                return Some(vol);
            }
        }
    }
    Some(vol)
}

/// Sets the node labels of a Domain or Volume to `desired` (a merge patch touching only
/// `node.virtkube.io/*` keys); returns the object as labelled, `None` when nothing was
/// written.
async fn relabel<K>(
    ctx: &Ctx,
    state: &mut PassState,
    obj: &K,
    desired: &BTreeMap<String, String>,
    report: &mut Report,
) -> Option<Arc<K>>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Labelled,
{
    let new = Arc::new(write_labels(ctx, obj, desired).await?);
    report.writes += 1;
    ctx.metrics.wrote(&K::kind(&()));
    K::remember(state, obj, new.clone());
    Some(new)
}

/// The write of [`relabel`] alone: the object as labelled, `None` when nothing needed
/// writing or the write failed (counted and logged; the next pass tries again).
async fn write_labels<K>(ctx: &Ctx, obj: &K, desired: &BTreeMap<String, String>) -> Option<K>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    let body = labels::label_patch(obj.labels(), desired)?;
    let api: Api<K> = Api::namespaced(ctx.client.clone(), &obj.namespace().unwrap_or_default());
    let params = PatchParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..PatchParams::default()
    };
    let kind = K::kind(&());
    match api
        .patch(&obj.name_any(), &params, &Patch::Merge(&body))
        .await
    {
        Ok(new) => Some(new),
        Err(kube::Error::Api(e)) if e.code == 404 => None,
        Err(e) => {
            ctx.metrics.error(&kind);
            tracing::warn!(kind = %kind, object = %obj.name_any(), error = %e, "labelling failed; next pass");
            None
        }
    }
}

/// The objects the controller labels, and where their writes are remembered.
trait Labelled: Sized {
    fn remember(state: &mut PassState, before: &Self, latest: Arc<Self>);
}

impl Labelled for Domain {
    fn remember(state: &mut PassState, before: &Self, latest: Arc<Self>) {
        remember(&mut state.domains, domain_key(before), before, latest);
    }
}

impl Labelled for Volume {
    fn remember(state: &mut PassState, before: &Self, latest: Arc<Self>) {
        remember(&mut state.volumes, volume_key(before), before, latest);
    }
}

/// Applies the controller's conditions to a HypervisorNode and reports transitions.
async fn reconcile_node(
    ctx: &Ctx,
    state: &mut PassState,
    hvn: &HypervisorNode,
    view: &super::view::NodeView,
    progress: Option<&Progress>,
    now: Timestamp,
    report: &mut Report,
) {
    let name = hvn.name_any();
    let desired = liveness::node_conditions(hvn, view, progress, &ctx.settings, now);
    if liveness::needs_apply(hvn, &desired, FIELD_MANAGER) {
        let status = if desired.is_empty() {
            json!({})
        } else {
            json!({"conditions": desired})
        };
        let body = json!({"apiVersion": API_VERSION, "kind": "HypervisorNode", "status": status});
        let api: Api<HypervisorNode> = Api::all(ctx.client.clone());
        match api
            .patch_status(
                &name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&body),
            )
            .await
        {
            Ok(_) => {
                report.writes += 1;
                ctx.metrics.wrote("HypervisorNode");
            }
            Err(e) => {
                ctx.metrics.error("HypervisorNode");
                tracing::warn!(node = %name, error = %e, "writing the node's conditions failed; next pass");
            }
        }
        let was_stale = hvn
            .status
            .as_ref()
            .and_then(|s| virtkube_crds::conditions::find(&s.conditions, READY))
            .is_some_and(|c| c.reason == HEARTBEAT_STALE);
        if !view.fresh && !was_stale {
            let note = Note {
                warning: true,
                reason: "NodeUnreachable".into(),
                action: "Watch",
                message: desired
                    .iter()
                    .find(|c| c.type_ == READY)
                    .map(|c| c.message.clone())
                    .unwrap_or_default(),
            };
            publish(ctx, hvn, &note).await;
        }
    }
    if let Some(p) = progress {
        let message = p.message();
        if state.drain_reported.get(&name) != Some(&message) {
            let note = Note {
                warning: false,
                reason: p.reason().into(),
                action: "Drain",
                message: message.clone(),
            };
            publish(ctx, hvn, &note).await;
            state.drain_reported.insert(name.clone(), message);
        }
    }
    if view.fenced_annotation && view.fresh {
        if state.fence_warned.insert(name.clone()) {
            let note = Note {
                warning: true,
                reason: "FenceIgnored".into(),
                action: "Unfence",
                message: format!(
                    "{name} is annotated {}=true but its agent still sends heartbeats: its guests may be running, so nothing is moved off it",
                    super::view::FENCED_ANNOTATION
                ),
            };
            publish(ctx, hvn, &note).await;
        }
    } else {
        state.fence_warned.remove(&name);
    }
}

/// Publishes an event, or hands it to the event queue; a failure is logged, never fatal
/// (the status is the record).
async fn publish<K: Resource<DynamicType = ()>>(ctx: &Ctx, obj: &K, note: &Note) {
    let mut message = note.message.clone();
    // The API server refuses notes over 1 kB.
    if message.len() > 1000 {
        let mut end = 1000;
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        message.truncate(end);
    }
    let event = Event {
        type_: if note.warning {
            EventType::Warning
        } else {
            EventType::Normal
        },
        reason: note.reason.clone(),
        note: Some(message),
        action: note.action.into(),
        secondary: None,
    };
    let regarding = obj.object_ref(&());
    if let Some(queue) = &ctx.events {
        queue.send(event, regarding);
    } else if let Err(e) = ctx.recorder.publish(&event, &regarding).await {
        tracing::warn!(error = %e, reason = %note.reason, "publishing an event failed");
    }
}

/// The earliest time-based change after `now`: a fresh heartbeat going stale, a pending
/// move running out of time, a backoff ending.
fn next_wake(
    cluster: &Cluster,
    domains: &[Arc<Domain>],
    backoff: &Backoff,
    settings: &Settings,
    now: Timestamp,
) -> Option<Timestamp> {
    let stale = cluster
        .nodes
        .values()
        .filter(|n| n.fresh)
        .filter_map(|n| n.heartbeat)
        .map(|hb| {
            after(
                hb,
                settings.heartbeat_grace + std::time::Duration::from_secs(1),
            )
        });
    let pending = domains
        .iter()
        .filter_map(|d| d.status.as_ref()?.migration.as_ref())
        .filter_map(|m| moves::pending_deadline(m, settings))
        .map(|t| after(t, std::time::Duration::from_millis(10)));
    stale
        .chain(pending)
        .chain(backoff.next_expiry(now))
        .filter(|t| *t > now)
        .min()
}
