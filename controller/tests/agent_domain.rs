//! The Domain controller against the strict in-memory API server (`virtkube-testapi`), with
//! the real engine on libvirt's `test:///default` underneath.
//!
//! Each scenario creates the Domain as a user would, binds or moves it the way the cluster
//! controller does (claim written by compare-and-swap, routing label), runs the agent's
//! reconcile on the object as the server stores it, and checks libvirt, the stored object,
//! the events and the API calls the agent made.

mod agent_support;

use std::sync::Arc;
use std::time::Duration;

use agent_support::{NODE, approve_move, bind_domain, hypervisor_node, testapi_context};
use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::controller::Action;
use serde_json::json;
use virtkube::agent::context::{Context, FINALIZER};
use virtkube::agent::domain;
use virtkube::placement::write::write_status;
use virtkube_crds::Domain;
use virtkube_crds::conditions;
use virtkube_crds::domain::{DomainPhase, MigrationState};
use virtkube_engine::Engine;
use virtkube_testapi::TestApi;

/// One scenario's world: the server, the agent's context on `NODE`, its libvirt.
struct World {
    api: TestApi,
    /// Acts as the user and the cluster controller (identity `admin`).
    client: kube::Client,
    ctx: Arc<Context>,
    engine: Engine,
    ns: String,
}

impl World {
    /// A server with namespace `ns` (the test driver's state is shared by every test in
    /// this process, so each scenario has its own namespace and libvirt names).
    async fn new(ns: &str) -> World {
        let api = TestApi::start().await.unwrap();
        api.create_namespace(ns).unwrap();
        let (ctx, _, engine) = testapi_context(&api).await;
        let client = api.client("admin").await.unwrap();
        World {
            api,
            client,
            ctx,
            engine,
            ns: ns.to_string(),
        }
    }

    fn domains(&self) -> Api<Domain> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    /// Creates Domain `web` (2 vCPUs, vCPU 0 pinned to host CPU 1, autostart), with
    /// `spec` merged over that.
    fn create(&self, spec: serde_json::Value) {
        let mut body = json!({
            "apiVersion": "virtkube.io/v1alpha1",
            "kind": "Domain",
            "metadata": { "name": "web", "namespace": self.ns },
            "spec": {
                "runStrategy": "Always",
                "autostart": true,
                "cpu": { "vcpus": 2, "pinning": [ { "vcpu": 0, "cpuset": "1" } ] },
                "memory": { "size": "128Mi" }
            }
        });
        if let (Some(base), Some(extra)) = (body["spec"].as_object_mut(), spec.as_object()) {
            for (k, v) in extra {
                base.insert(k.clone(), v.clone());
            }
        }
        self.api.create("domains", body).unwrap();
    }

    async fn stored(&self) -> Option<Domain> {
        self.domains().get_opt("web").await.unwrap()
    }

    /// Runs one reconcile on the object as stored.
    async fn reconcile(&self) -> Result<Action, virtkube::agent::error::Error> {
        let dom = self.stored().await.expect("the Domain exists");
        tokio::time::timeout(
            Duration::from_secs(30),
            domain::reconcile(Arc::new(dom), self.ctx.clone()),
        )
        .await
        .expect("the reconcile finished")
    }

    /// The writes the agent made to virtkube's kinds (not reads, not events).
    fn agent_writes(&self) -> Vec<String> {
        self.api
            .requests()
            .into_iter()
            .filter(|r| r.identity == "agent")
            .filter(|r| !["get", "list", "watch"].contains(&r.verb.as_str()))
            .filter(|r| r.resource != "events")
            .map(|r| {
                format!(
                    "{} {}{}",
                    r.verb,
                    r.resource,
                    if r.subresource.is_empty() {
                        String::new()
                    } else {
                        format!("/{}", r.subresource)
                    }
                )
            })
            .collect()
    }

    /// GETs of Domains by the agent.
    fn agent_gets(&self) -> usize {
        self.api
            .requests()
            .iter()
            .filter(|r| r.identity == "agent" && r.verb == "get" && r.resource == "domains")
            .count()
    }

    fn agent_requests(&self) -> usize {
        self.api
            .requests()
            .iter()
            .filter(|r| r.identity == "agent")
            .count()
    }

    fn event_reasons(&self) -> Vec<String> {
        agent_support::events(&self.api)
            .into_iter()
            .filter(|(name, ..)| name == "web")
            .map(|(_, reason, ..)| reason)
            .collect()
    }

    fn libvirt_name(&self) -> String {
        format!("{}.web", self.ns)
    }

    async fn libvirt_state(&self) -> Option<String> {
        match self.engine.domain_state(&self.libvirt_name()).await {
            Ok((state, _)) => Some(state.as_str().to_string()),
            Err(_) => None,
        }
    }
}

fn ready(dom: &Domain) -> (String, String) {
    let c = conditions::find(&dom.status.as_ref().unwrap().conditions, "Ready").unwrap();
    (c.status.clone(), c.reason.clone())
}

#[tokio::test]
async fn an_unbound_domain_is_never_started_even_when_its_spec_names_this_node() {
    let w = World::new("unbound").await;
    w.create(json!({ "nodeName": NODE }));
    let action = w.reconcile().await.unwrap();
    assert_eq!(action, Action::requeue(w.ctx.settings.resync));
    assert_eq!(w.libvirt_state().await, None, "nothing defined");
    assert!(w.agent_writes().is_empty(), "{:?}", w.agent_writes());
}

#[tokio::test]
async fn the_holder_converges_in_one_reconcile_then_steady_state_is_silent() {
    let w = World::new("apply").await;
    w.create(json!({}));
    bind_domain(&w.client, &w.ns, "web", NODE).await;
    let action = w.reconcile().await.unwrap();
    assert_eq!(action, Action::requeue(w.ctx.settings.resync));
    assert_eq!(
        w.agent_writes(),
        vec!["patch domains", "patch domains/status"],
        "the finalizer, then one status write"
    );
    // The finalizer patch, bound to the cached resourceVersion, was the fresh read.
    assert_eq!(w.agent_gets(), 0, "{:?}", w.api.requests());
    let dom = w.stored().await.unwrap();
    assert!(dom.finalizers().contains(&FINALIZER.to_string()));
    let status = dom.status.clone().unwrap();
    assert_eq!(status.node_name.as_deref(), Some(NODE), "the claim is kept");
    assert_eq!(status.domain_name.as_deref(), Some("apply.web"));
    assert_eq!(status.observed_generation, Some(1));
    assert_eq!(status.autostart, Some(true));
    assert_eq!(status.vcpus, Some(2));
    assert!(status.uuid.is_some() && status.id.is_some());
    assert_eq!(
        status
            .vcpu_affinity
            .iter()
            .find(|a| a.vcpu == 0)
            .map(|a| a.cpuset.as_str()),
        Some("1")
    );
    assert_eq!(ready(&dom), ("True".into(), "Reconciled".into()));
    assert_eq!(w.libvirt_state().await.as_deref(), Some("running"));
    for reason in ["Defined", "AutostartSet", "Started"] {
        assert!(w.event_reasons().contains(&reason.to_string()), "{reason}");
    }

    // Steady state: no API call at all (the cache is enough) and no mutating libvirt call.
    w.engine.reset_stats();
    w.api.clear_requests();
    let action = w.reconcile().await.unwrap();
    assert_eq!(action, Action::requeue(w.ctx.settings.resync));
    assert_eq!(
        w.engine.stats().mutating_calls(),
        0,
        "{:?}",
        w.engine.stats()
    );
    assert_eq!(w.agent_requests(), 0, "{:?}", w.api.requests());
}

/// A cached copy that is no longer the stored version: the finalizer patch bound to its
/// resourceVersion is refused (422), and the reconcile goes on from a fresh read.
#[tokio::test]
async fn a_cached_copy_whose_claim_was_reset_starts_nothing() {
    let w = World::new("stale-claim").await;
    w.create(json!({}));
    bind_domain(&w.client, &w.ns, "web", NODE).await;
    // What the agent's watch cache holds: bound here.
    let cached = w.stored().await.unwrap();
    // Then the claim is reset (the controller unfencing this node) before the reconcile.
    let mut status = cached.status.clone().unwrap();
    status.node_name = None;
    write_status(&w.domains(), &cached, &status, "virtkube-controller")
        .await
        .unwrap();
    w.api.clear_requests();
    let action = tokio::time::timeout(
        Duration::from_secs(30),
        domain::reconcile(Arc::new(cached), w.ctx.clone()),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(action, Action::requeue(w.ctx.settings.resync));
    assert_eq!(
        w.libvirt_state().await,
        None,
        "nothing defined on a stale claim"
    );
    assert_eq!(
        w.agent_writes(),
        vec!["patch domains"],
        "only the refused finalizer patch"
    );
    assert_eq!(w.agent_gets(), 1, "then a fresh read");
    let stored = w.stored().await.unwrap();
    assert!(stored.finalizers().is_empty(), "{:?}", stored.finalizers());
}

/// The same with a spec changed after the cached read: the domain is defined from the
/// stored spec, not the cached one.
#[tokio::test]
async fn a_cached_copy_older_than_the_spec_is_converged_from_a_fresh_read() {
    let w = World::new("stale-spec").await;
    w.create(json!({}));
    bind_domain(&w.client, &w.ns, "web", NODE).await;
    let cached = w.stored().await.unwrap();
    w.api
        .edit_spec("domains", &w.ns, "web", |s| s["cpu"]["vcpus"] = json!(3))
        .unwrap();
    w.api.clear_requests();
    tokio::time::timeout(
        Duration::from_secs(30),
        domain::reconcile(Arc::new(cached), w.ctx.clone()),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(
        w.agent_writes(),
        vec!["patch domains", "patch domains", "patch domains/status"],
        "the refused finalizer patch, the finalizer on the fresh read, the status"
    );
    assert_eq!(w.agent_gets(), 1);
    let dom = w.stored().await.unwrap();
    let status = dom.status.clone().unwrap();
    assert_eq!(status.vcpus, Some(3), "defined from the stored spec");
    assert_eq!(status.observed_generation, Some(2));
    assert_eq!(ready(&dom), ("True".into(), "Reconciled".into()));
}

#[tokio::test]
async fn out_of_band_destroy_is_repaired_with_a_repair_event() {
    let w = World::new("drift").await;
    w.create(json!({}));
    bind_domain(&w.client, &w.ns, "web", NODE).await;
    w.reconcile().await.unwrap();
    let owner = virtkube::agent::converge::owner_of(&w.stored().await.unwrap()).unwrap();
    w.engine
        .domain_destroy(&w.libvirt_name(), &owner)
        .await
        .unwrap();
    w.reconcile().await.unwrap();
    assert_eq!(w.libvirt_state().await.as_deref(), Some("running"));
    let actions: Vec<String> = agent_support::events(&w.api)
        .into_iter()
        .filter(|(name, reason, ..)| name == "web" && reason == "Started")
        .map(|(_, _, action, _)| action)
        .collect();
    assert!(actions.contains(&"RepairStart".to_string()), "{actions:?}");
}

/// The agent's own acts come back to it (its finalizer patch through the watch, its define
/// and start as libvirt events) and ask for no reconcile; the same kinds of change made by
/// someone else (the finalizer removed, the guest destroyed) still do.
#[tokio::test]
async fn the_agents_own_acts_trigger_nothing_the_same_changes_by_others_do() {
    use futures::StreamExt;
    use kube::runtime::{WatchStreamExt, reflector, watcher};
    use virtkube::agent::{drift, echoes};
    let w = World::new("echoes").await;
    w.create(json!({}));
    // The agent's Domain watch as the agent builds it: the trigger filter, then its echoes
    // taken out.
    let watched = watcher(w.domains(), watcher::Config::default())
        .applied_objects()
        .predicate_filter(domain::trigger_hash, Default::default());
    let mut triggers = Box::pin(echoes::without_own_writes(watched, w.ctx.echoes.clone()));
    let (tx, mut requests) = futures::channel::mpsc::unbounded();
    let (store, _writer) = reflector::store::<Domain>();
    tokio::spawn(drift::forward_unexpected(
        w.engine.events(),
        w.ctx.echoes.clone(),
        store,
        w.ctx.metrics.clone(),
        tx,
    ));
    /// The next trigger within `wait_ms`.
    async fn next<S>(triggers: &mut S, wait_ms: u64) -> Option<Domain>
    where
        S: futures::Stream<Item = Result<Domain, watcher::Error>> + Unpin,
    {
        tokio::time::timeout(Duration::from_millis(wait_ms), triggers.next())
            .await
            .ok()
            .flatten()
            .map(|d| d.expect("the watch works"))
    }
    bind_domain(&w.client, &w.ns, "web", NODE).await;
    // Up to the routing label, every version is a trigger.
    let label = virtkube::placement::write::node_label(NODE);
    while !next(&mut triggers, 5_000)
        .await
        .expect("the bound Domain comes through the watch")
        .labels()
        .contains_key(&label)
    {}

    w.reconcile().await.unwrap();
    assert_eq!(w.libvirt_state().await.as_deref(), Some("running"));
    assert!(
        w.stored()
            .await
            .unwrap()
            .finalizers()
            .contains(&FINALIZER.to_string())
    );
    // The finalizer's echo is taken out (the status write changes no trigger field).
    if let Some(d) = next(&mut triggers, 500).await {
        panic!(
            "the agent's own finalizer patch came back as a trigger: {:?}",
            d.metadata
        );
    }
    // libvirt's events of the define and start are taken out.
    let mine = |r: &kube::runtime::reflector::ObjectRef<Domain>| {
        r.namespace.as_deref() == Some(w.ns.as_str())
    };
    let asked = settled_requests(&mut requests, &w.ns).await;
    assert!(
        asked.is_empty(),
        "libvirt events of the agent's own calls: {asked:?}"
    );

    // Someone else removes the finalizer: a trigger (the agent puts it back).
    w.domains()
        .patch(
            "web",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(json!({"metadata": {"finalizers": null}})),
        )
        .await
        .unwrap();
    let seen = next(&mut triggers, 5_000)
        .await
        .expect("the removed finalizer is a trigger");
    assert!(seen.finalizers().is_empty());

    // Someone else destroys the guest: libvirt's event asks for a reconcile.
    let owner = virtkube::agent::converge::owner_of(&w.stored().await.unwrap()).unwrap();
    w.engine
        .domain_destroy(&w.libvirt_name(), &owner)
        .await
        .unwrap();
    let request = tokio::time::timeout(Duration::from_secs(2), async {
        loop {
            let r = requests.next().await.expect("the forwarder runs");
            if mine(&r) {
                return r;
            }
        }
    })
    .await
    .expect("a `virsh destroy` asks for a reconcile");
    assert_eq!(request.name, "web");
    // The repair puts both back, and its own start is again no trigger.
    w.reconcile().await.unwrap();
    assert_eq!(w.libvirt_state().await.as_deref(), Some("running"));
    assert!(
        w.stored()
            .await
            .unwrap()
            .finalizers()
            .contains(&FINALIZER.to_string())
    );
    let asked = settled_requests(&mut requests, &w.ns).await;
    assert!(
        asked.is_empty(),
        "libvirt events of the repair's start: {asked:?}"
    );

    // The agent's own removal (the user deletes the Domain): the guest's stop and undefine
    // come back from libvirt as no trigger; the reconcile went on to the end by itself.
    w.api.delete("domains", &w.ns, "web").unwrap();
    w.reconcile().await.unwrap();
    assert_eq!(w.libvirt_state().await, None, "undefined");
    assert!(w.stored().await.is_none(), "finalized");
    let asked = settled_requests(&mut requests, &w.ns).await;
    assert!(
        asked.is_empty(),
        "libvirt events of the agent's own removal: {asked:?}"
    );
}

/// The reconcile requests libvirt's events made for the Domains of namespace `ns`, once
/// events of the last act had time to come.
async fn settled_requests(
    requests: &mut futures::channel::mpsc::UnboundedReceiver<
        kube::runtime::reflector::ObjectRef<Domain>,
    >,
    ns: &str,
) -> Vec<kube::runtime::reflector::ObjectRef<Domain>> {
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut asked = Vec::new();
    while let Ok(r) = requests.try_recv() {
        asked.extend(Some(r).filter(|r| r.namespace.as_deref() == Some(ns)));
    }
    asked
}

#[tokio::test]
async fn delete_shuts_down_undefines_and_removes_the_finalizer() {
    let w = World::new("delete").await;
    w.create(json!({}));
    bind_domain(&w.client, &w.ns, "web", NODE).await;
    w.reconcile().await.unwrap();
    w.api.delete("domains", &w.ns, "web").unwrap();
    w.api.clear_requests();
    let action = w.reconcile().await.unwrap();
    assert_eq!(action, Action::await_change());
    assert_eq!(w.libvirt_state().await, None, "undefined");
    assert!(w.stored().await.is_none(), "the finalizer was the last one");
    assert!(w.event_reasons().contains(&"Deleted".to_string()));
    // One fresh read before the removal; the finalizer's patch is bound to that version
    // instead of a second read.
    let reads = w
        .api
        .requests()
        .into_iter()
        .filter(|r| r.identity == "agent" && r.verb == "get" && r.resource == "domains")
        .count();
    assert_eq!(
        reads, 1,
        "the agent's reads of the Domain while deleting it"
    );
    assert_eq!(w.agent_writes(), ["patch domains"]);
}

#[tokio::test]
async fn a_finalizer_removal_bound_to_a_version_changed_since_is_refused() {
    // The server's side of the bound removal: the in-memory API server applies the patch
    // only to the version it names (its JSON-patch `test`, as the real one does).
    let w = World::new("bound").await;
    w.create(json!({}));
    bind_domain(&w.client, &w.ns, "web", NODE).await;
    w.reconcile().await.unwrap();
    let read = w.stored().await.unwrap();
    let index = read
        .finalizers()
        .iter()
        .position(|f| f == FINALIZER)
        .unwrap();
    // Someone writes the Domain after the read.
    w.domains()
        .patch(
            "web",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(json!({"metadata": {"annotations": {"x": "y"}}})),
        )
        .await
        .unwrap();
    let patch = |version: Option<String>| {
        let ops = domain::finalizer_removal_patch(index, version.as_deref());
        kube::api::Patch::<()>::Json(serde_json::from_value(ops).unwrap())
    };
    let params = kube::api::PatchParams::default();
    let refused = w
        .domains()
        .patch("web", &params, &patch(read.resource_version()))
        .await
        .expect_err("a removal bound to the version read before the change");
    assert!(
        matches!(refused, kube::Error::Api(ref e) if e.code == 422),
        "{refused:?}"
    );
    assert!(
        w.stored()
            .await
            .unwrap()
            .finalizers()
            .contains(&FINALIZER.to_string())
    );
    let current = w.stored().await.unwrap().resource_version();
    let removed = w
        .domains()
        .patch("web", &params, &patch(current))
        .await
        .unwrap();
    assert!(!removed.finalizers().contains(&FINALIZER.to_string()));
}

#[tokio::test]
async fn a_domain_held_by_another_node_is_not_touched() {
    let w = World::new("other").await;
    w.create(json!({ "nodeName": NODE }));
    bind_domain(&w.client, &w.ns, "web", "node-b").await;
    w.api.clear_requests();
    w.reconcile().await.unwrap();
    assert_eq!(w.libvirt_state().await, None);
    assert!(w.agent_writes().is_empty(), "{:?}", w.agent_writes());
}

#[tokio::test]
async fn a_copy_here_that_another_node_holds_is_removed_with_an_event() {
    let w = World::new("stale").await;
    w.create(json!({}));
    bind_domain(&w.client, &w.ns, "web", NODE).await;
    w.reconcile().await.unwrap();
    assert_eq!(w.libvirt_state().await.as_deref(), Some("running"));
    // An administrator declared this node fenced and the controller gave the claim away
    // (here: to node-b) while this node's copy survived.
    let api = w.domains();
    let dom = api.get("web").await.unwrap();
    let mut status = dom.status.clone().unwrap();
    status.node_name = Some("node-b".into());
    write_status(&api, &dom, &status, "virtkube-controller")
        .await
        .unwrap();
    w.reconcile().await.unwrap();
    assert_eq!(w.libvirt_state().await, None, "the stale copy is gone");
    assert!(w.event_reasons().contains(&"StaleCopyRemoved".to_string()));
    assert_eq!(
        w.stored()
            .await
            .unwrap()
            .status
            .unwrap()
            .node_name
            .as_deref(),
        Some("node-b"),
        "the claim is not this node's to change"
    );
}

#[tokio::test]
async fn a_stopped_domain_moves_cold_undefined_here_then_handed_over() {
    let w = World::new("cold").await;
    w.create(json!({ "runStrategy": "Halted" }));
    bind_domain(&w.client, &w.ns, "web", NODE).await;
    w.reconcile().await.unwrap();
    assert_eq!(w.libvirt_state().await.as_deref(), Some("shutoff"));
    // node-b's libvirt, as its agent publishes it (the test driver's default instance is
    // shared by the whole process, so node-b sees what this node sees).
    hypervisor_node(&w.client, "node-b", "test:///default").await;
    w.api
        .edit_spec("domains", &w.ns, "web", |s| s["nodeName"] = json!("node-b"))
        .unwrap();
    approve_move(&w.client, &w.ns, "web", "node-b").await;
    w.reconcile().await.unwrap();
    let status = w.stored().await.unwrap().status.unwrap();
    assert_eq!(status.node_name.as_deref(), Some("node-b"), "handed over");
    let record = status.migration.unwrap();
    assert_eq!(record.state, Some(MigrationState::Succeeded));
    assert_eq!(
        record.mode,
        Some(virtkube_crds::domain::MigrationMode::Cold)
    );
    assert!(record.start_time.is_some() && record.end_time.is_some());
    assert_eq!(w.libvirt_state().await, None, "undefined on the source");
    assert!(w.event_reasons().contains(&"Migrated".to_string()));
}

#[tokio::test]
async fn a_move_nobody_wants_any_more_is_aborted_and_the_guest_stays() {
    let w = World::new("abort").await;
    w.create(json!({}));
    bind_domain(&w.client, &w.ns, "web", NODE).await;
    w.reconcile().await.unwrap();
    // Approved towards node-b, then the user changed their mind (spec.nodeName unset).
    approve_move(&w.client, &w.ns, "web", "node-b").await;
    w.reconcile().await.unwrap();
    let status = w.stored().await.unwrap().status.unwrap();
    assert_eq!(status.node_name.as_deref(), Some(NODE));
    assert_eq!(
        status.migration.unwrap().state,
        Some(MigrationState::Aborted)
    );
    assert_eq!(w.libvirt_state().await.as_deref(), Some("running"));
}

/// A libvirt test-driver node file for "node-b" holding a running copy of the resource
/// `uid` (test-driver URIs with a file are private instances loaded from it).
fn node_b_with_copy(dir: &std::path::Path, ns: &str, uid: &str) -> String {
    let xml = format!(
        r#"<node>
  <cpu><nodes>1</nodes><sockets>1</sockets><cores>2</cores><threads>1</threads><active>2</active><mhz>2000</mhz></cpu>
  <memory>2097152</memory>
  <domain type='test'>
    <name>{ns}.web</name>
    <memory>131072</memory>
    <vcpu>1</vcpu>
    <os><type>hvm</type></os>
    <metadata><virtkube:owner xmlns:virtkube="https://virtkube.io/xmlns/owner/v1" kind="Domain" uid="{uid}" namespace="{ns}" name="web"/></metadata>
  </domain>
</node>"#
    );
    let path = dir.join("node-b.xml");
    std::fs::write(&path, xml).unwrap();
    format!("test://{}", path.display())
}

#[tokio::test]
async fn deleting_after_a_lost_switch_over_write_finds_the_guest_on_the_target() {
    // The reported bug: a migration completed in libvirt, but the source's write of the
    // switch-over failed; the guest runs on the target while the claim still names the
    // source. Deleting the Domain then must not conclude "gone" from an empty source.
    let w = World::new("lost").await;
    w.create(json!({ "nodeName": "node-b" }));
    bind_domain(&w.client, &w.ns, "web", NODE).await;
    let dom = w.stored().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let uri = node_b_with_copy(dir.path(), &w.ns, &dom.uid().unwrap());
    hypervisor_node(&w.client, "node-b", &uri).await;
    // The finalizer is in place and the move was running when the write was lost.
    w.domains()
        .patch(
            "web",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(json!({"metadata": {"finalizers": [FINALIZER]}})),
        )
        .await
        .unwrap();
    approve_move(&w.client, &w.ns, "web", "node-b").await;
    let api = w.domains();
    let dom = api.get("web").await.unwrap();
    let mut status = dom.status.clone().unwrap();
    if let Some(m) = status.migration.as_mut() {
        m.state = Some(MigrationState::Running);
    }
    write_status(&api, &dom, &status, "virtkube-agent")
        .await
        .unwrap();
    w.api.delete("domains", &w.ns, "web").unwrap();

    w.reconcile().await.unwrap();
    let dom = w
        .stored()
        .await
        .expect("the finalizer is kept: the guest still runs on node-b");
    let status = dom.status.unwrap();
    assert_eq!(
        status.node_name.as_deref(),
        Some("node-b"),
        "the move is completed, so node-b's agent removes the guest"
    );
    assert_eq!(
        status.migration.unwrap().state,
        Some(MigrationState::Succeeded)
    );
}

#[tokio::test]
async fn a_foreign_domain_of_the_same_name_is_reported_never_overwritten() {
    let w = World::new("clash").await;
    let foreign = virtkube_engine::model::DomainDef {
        virt_type: "test".into(),
        ..virtkube_engine::model::DomainDef::new(
            "clash.web",
            virtkube_engine::Owner::new("Domain", "someone-else", Some("clash"), "web"),
        )
    };
    w.engine.domain_define(&foreign).await.unwrap();
    w.create(json!({}));
    bind_domain(&w.client, &w.ns, "web", NODE).await;
    assert!(w.reconcile().await.is_err(), "retried with backoff");
    let dom = w.stored().await.unwrap();
    assert_eq!(ready(&dom), ("False".into(), "NameConflict".into()));
    assert!(w.event_reasons().contains(&"Failed".to_string()));
    let still = w.engine.domain_owner("clash.web").await.unwrap().unwrap();
    assert_eq!(still.uid, "someone-else", "the foreign domain is untouched");
}

#[tokio::test]
async fn libvirt_out_of_reach_makes_the_phase_unknown_not_failed() {
    let w = World::new("gone").await;
    w.create(json!({}));
    bind_domain(&w.client, &w.ns, "web", NODE).await;
    w.reconcile().await.unwrap();
    let before = w.stored().await.unwrap().status.unwrap();
    w.engine.close().await.unwrap();
    assert!(w.reconcile().await.is_err(), "retried with backoff");
    let status = w.stored().await.unwrap().status.unwrap();
    assert_eq!(status.phase, Some(DomainPhase::Unknown));
    assert_eq!(status.uuid, before.uuid, "the last facts are kept");
    let ready = conditions::find(&status.conditions, "Ready").unwrap();
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("False", "LibvirtError")
    );
}

#[tokio::test]
async fn the_sweep_removes_copies_of_deleted_or_elsewhere_held_domains_only() {
    let w = World::new("sweep").await;
    w.create(json!({}));
    bind_domain(&w.client, &w.ns, "web", NODE).await;
    w.reconcile().await.unwrap();
    assert_eq!(w.libvirt_state().await.as_deref(), Some("running"));
    let (empty, _writer) = kube::runtime::reflector::store::<Domain>();

    // Held here, merely not routed yet (the controller has not labelled it): left alone.
    let swept = virtkube::agent::sweep::sweep(&w.ctx, &empty).await.unwrap();
    assert!(swept.looked >= 1 && swept.removed.is_empty(), "{swept:?}");
    assert_eq!(w.libvirt_state().await.as_deref(), Some("running"));

    // Held by another node (this one was declared fenced and came back): removed.
    let api = w.domains();
    let dom = api.get("web").await.unwrap();
    let mut status = dom.status.clone().unwrap();
    status.node_name = Some("node-b".into());
    write_status(&api, &dom, &status, "virtkube-controller")
        .await
        .unwrap();
    let swept = virtkube::agent::sweep::sweep(&w.ctx, &empty).await.unwrap();
    assert_eq!(swept.removed, vec!["sweep/web".to_string()]);
    assert_eq!(w.libvirt_state().await, None);
}

/// `virtkube apply` on the same host (local manifests, no cluster) marks its guests with a
/// `local:` identity: no Domain resource will ever exist for them, and the sweep must not
/// read that as "deleted while away" (it destroyed such a guest before).
#[tokio::test]
async fn the_sweep_leaves_guests_of_virtkube_apply_alone() {
    let w = World::new("local").await;
    let def = virtkube_engine::model::DomainDef {
        virt_type: "test".into(),
        ..virtkube_engine::model::DomainDef::new(
            "local.cli",
            virtkube_engine::Owner::new("Domain", "local:local/cli", Some("local"), "cli"),
        )
    };
    w.engine.domain_define(&def).await.unwrap();
    let owner = w.engine.domain_owner("local.cli").await.unwrap().unwrap();
    w.engine.domain_start("local.cli", &owner).await.unwrap();
    let (empty, _writer) = kube::runtime::reflector::store::<Domain>();
    let swept = virtkube::agent::sweep::sweep(&w.ctx, &empty).await.unwrap();
    assert!(!swept.removed.iter().any(|r| r == "local/cli"), "{swept:?}");
    assert!(
        w.engine.domain_lookup("local.cli").await.unwrap().is_some(),
        "the CLI's guest is still there"
    );
}

#[tokio::test]
async fn the_sweep_removes_the_copy_of_a_domain_deleted_while_the_node_was_away() {
    let w = World::new("orphan").await;
    w.create(json!({}));
    bind_domain(&w.client, &w.ns, "web", NODE).await;
    w.reconcile().await.unwrap();
    // Deleted for good behind this node's back (its finalizer removed by hand).
    w.domains()
        .patch(
            "web",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(json!({"metadata": {"finalizers": null}})),
        )
        .await
        .unwrap();
    w.api.delete("domains", &w.ns, "web").unwrap();
    assert!(w.stored().await.is_none());
    let (empty, _writer) = kube::runtime::reflector::store::<Domain>();
    let swept = virtkube::agent::sweep::sweep(&w.ctx, &empty).await.unwrap();
    assert_eq!(swept.removed, vec!["orphan/web".to_string()]);
    assert_eq!(w.libvirt_state().await, None);
}
