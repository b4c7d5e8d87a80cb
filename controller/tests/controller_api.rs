//! The controller against the in-memory API server (`virtkube-testapi`, as strict as a real
//! one about resourceVersions, JSON-patch tests, server-side apply and watches): passes over
//! real objects, two controllers racing, the migration limits, cancel and backoff, drain,
//! node loss and fencing, finalizers, volume binding, and the Lease election.
//! No agent runs: where a test needs what an agent writes, it writes it.

mod controller_support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use controller_support::*;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::Client;
use kube::api::{Api, Patch, PatchParams};
use serde_json::{Value, json};
use virtkube::cluster::leader::LeaseConfig;
use virtkube::cluster::metrics::{Metrics, ReasonLabels};
use virtkube::cluster::pass::{Ctx, PassState, Report, Snapshot, pass};
use virtkube::cluster::settings::Settings;
use virtkube::cluster::{Config, spawn};
use virtkube::events::{Recorder, Reporter};
use virtkube_crds::HypervisorNode;
use virtkube_testapi::TestApi;

const NS: &str = "default";

async fn server() -> (TestApi, Client) {
    let api = TestApi::start().await.unwrap();
    let client = api.client("admin").await.unwrap();
    (api, client)
}

async fn ctx(api: &TestApi, identity: &str) -> Ctx {
    let client = api.client(identity).await.unwrap();
    Ctx {
        recorder: Recorder::new(
            client.clone(),
            Reporter {
                controller: "virtkube-controller".into(),
                instance: Some(identity.into()),
            },
        ),
        client,
        settings: Settings::default(),
        metrics: Arc::new(Metrics::default()),
        // Published before the pass goes on: the tests read them right after.
        events: None,
    }
}

async fn pass_at(ctx: &Ctx, state: &mut PassState, t: Timestamp) -> Report {
    let snap = Snapshot::list(&ctx.client).await.unwrap();
    pass(ctx, state, snap, t).await
}

async fn pass_now(ctx: &Ctx, state: &mut PassState) -> Report {
    pass_at(ctx, state, Timestamp::now()).await
}

fn later(secs: i64) -> Timestamp {
    Timestamp::now()
        .checked_add(SignedDuration::from_secs(secs))
        .unwrap()
}

/// The object as a user creates it (no server-owned metadata).
fn created(mut v: Value) -> Value {
    if let Some(meta) = v["metadata"].as_object_mut() {
        meta.remove("uid");
        meta.remove("resourceVersion");
        meta.remove("generation");
    }
    if let Some(o) = v.as_object_mut() {
        o.remove("status");
    }
    v
}

/// A HypervisorNode whose agent just beat.
async fn add_node(api: &TestApi, client: &Client, name: &str, memory: &str) {
    api.create("hypervisornodes", hvn_meta(name)).unwrap();
    agent_publishes(
        client,
        name,
        hvn_status(memory, 8, &Timestamp::now().to_string()),
    )
    .await;
}

async fn add_domain(api: &TestApi, v: Value) {
    api.create("domains", created(v)).unwrap();
}

fn dom(api: &TestApi, name: &str) -> Value {
    api.get("domains", NS, name).unwrap()
}

fn holder(api: &TestApi, name: &str) -> Option<String> {
    dom(api, name)["status"]["nodeName"]
        .as_str()
        .map(str::to_string)
}

fn migration(api: &TestApi, name: &str) -> Value {
    dom(api, name)["status"]["migration"].clone()
}

fn event_reasons(api: &TestApi) -> Vec<String> {
    api.events()
        .iter()
        .filter_map(|e| e["reason"].as_str().map(str::to_string))
        .collect()
}

/// Status writes to `resource` by `identity`.
fn status_patches(api: &TestApi, identity: &str, resource: &str) -> usize {
    api.requests()
        .iter()
        .filter(|r| r.identity == identity && r.verb == "patch")
        .filter(|r| r.resource == resource && r.subresource == "status")
        .count()
}

#[tokio::test]
async fn binds_by_scheduler_and_by_node_name_labels_them_and_explains_the_rest() {
    let (api, client) = server().await;
    add_node(&api, &client, "node-a", "2Gi").await;
    add_node(&api, &client, "node-b", "16Gi").await;
    add_node(&api, &client, "node-c", "16Gi").await;
    api.create("nodes", k8s_node("node-b", true, json!([])))
        .unwrap();
    add_domain(&api, domain(NS, "web", "2Gi")).await;
    add_domain(
        &api,
        with(
            domain(NS, "pinned", "512Mi"),
            json!({"spec": {"nodeName": "node-a"}}),
        ),
    )
    .await;
    add_domain(&api, domain(NS, "huge", "64Gi")).await;
    let ctx = ctx(&api, "ctl").await;
    let mut state = PassState::default();
    let report = pass_now(&ctx, &mut state).await;
    assert_eq!(report.conflicts, 0);

    assert_eq!(holder(&api, "web").as_deref(), Some("node-c"));
    let web = dom(&api, "web");
    assert_eq!(
        web["metadata"]["labels"]["node.virtkube.io/node-c"],
        "holder"
    );
    let scheduled = condition(&web, "Scheduled").unwrap();
    assert_eq!(
        (scheduled["status"].as_str(), scheduled["reason"].as_str()),
        (Some("True"), Some("NodeAssigned"))
    );
    assert_eq!(holder(&api, "pinned").as_deref(), Some("node-a"));
    assert_eq!(
        condition(&dom(&api, "pinned"), "Scheduled").unwrap()["reason"],
        "Requested"
    );
    assert_eq!(holder(&api, "huge"), None);
    let huge = dom(&api, "huge");
    assert_eq!(
        huge["metadata"]["labels"],
        Value::Null,
        "an unbound domain carries no node label"
    );
    let c = condition(&huge, "Scheduled").unwrap();
    assert_eq!(c["status"], "False");
    assert_eq!(
        c["message"],
        "0/3 nodes are available: node-a: insufficient memory (needs 64Gi, 1Gi left); node-b: cordoned, insufficient memory (needs 64Gi, 15Gi left); node-c: insufficient memory (needs 64Gi, 15Gi left)"
    );
    let reasons = event_reasons(&api);
    assert!(reasons.contains(&"Scheduled".to_string()), "{reasons:?}");
    assert!(
        reasons.contains(&"FailedScheduling".to_string()),
        "{reasons:?}"
    );
    let bound = ctx
        .metrics
        .scheduling_failures
        .get_or_create(&ReasonLabels {
            reason: "cordoned".into(),
        })
        .get();
    assert_eq!(bound, 1);

    // The next pass sees web placed on node-c: huge's message follows.
    pass_now(&ctx, &mut state).await;
    let c = condition(&dom(&api, "huge"), "Scheduled").unwrap();
    assert!(
        c["message"]
            .as_str()
            .unwrap()
            .ends_with("node-c: insufficient memory (needs 64Gi, 13Gi left)"),
        "{c}"
    );

    // Steady state: nothing to write.
    let rv = api.resource_version();
    api.clear_requests();
    let report = pass_now(&ctx, &mut state).await;
    let writes: Vec<_> = api
        .requests()
        .into_iter()
        .filter(|r| r.verb != "list" && r.verb != "get")
        .collect();
    assert_eq!((report.writes, report.conflicts), (0, 0), "{writes:?}");
    assert!(
        api.changes_since(rv)
            .iter()
            .all(|c| !c.key.plural.starts_with("domain")),
        "no domain changed"
    );
}

/// A pass writes several domains at once: the memory is still shared out in name order as
/// when writing one by one, and each claim is followed by its label in the same pass.
#[tokio::test]
async fn many_domains_bound_in_one_pass_share_the_memory_out_in_name_order() {
    let (api, client) = server().await;
    // 4Gi less the 1Gi reserve: room for six of 512Mi.
    add_node(&api, &client, "node-a", "4Gi").await;
    let names: Vec<String> = (0..12).map(|i| format!("vm{i:02}")).collect();
    for name in &names {
        add_domain(&api, domain(NS, name, "512Mi")).await;
    }
    let ctx = ctx(&api, "ctl").await;
    let mut state = PassState::default();
    api.clear_requests();
    let report = pass_now(&ctx, &mut state).await;
    assert_eq!(report.conflicts, 0);
    // 12 status writes (six claims, six Unschedulable), six labels.
    assert_eq!(report.writes, 18);
    for (i, name) in names.iter().enumerate() {
        let d = dom(&api, name);
        if i < 6 {
            assert_eq!(holder(&api, name).as_deref(), Some("node-a"), "{name}");
            assert_eq!(d["metadata"]["labels"]["node.virtkube.io/node-a"], "holder");
        } else {
            assert_eq!(holder(&api, name), None, "{name}");
            assert_eq!(condition(&d, "Scheduled").unwrap()["status"], "False");
        }
    }
    // Each label came after its claim, and within the pass.
    let requests = api.requests();
    for name in &names[..6] {
        let at = |sub: &str| {
            requests
                .iter()
                .position(|r| {
                    r.identity == "ctl"
                        && r.verb == "patch"
                        && &r.name == name
                        && r.subresource == sub
                })
                .unwrap_or_else(|| panic!("{name}: no patch of {sub:?}"))
        };
        assert!(at("status") < at(""), "{name}");
    }
    // The next pass writes nothing.
    let report = pass_now(&ctx, &mut state).await;
    assert_eq!((report.writes, report.conflicts), (0, 0));
}

#[tokio::test]
async fn two_controllers_racing_to_bind_one_wins_and_the_loser_reads_again() {
    let (api, client) = server().await;
    add_node(&api, &client, "node-a", "16Gi").await;
    add_domain(&api, domain(NS, "web", "1Gi")).await;
    let a = ctx(&api, "ctl-a").await;
    let b = ctx(&api, "ctl-b").await;
    // Both read before either writes.
    let snap_a = Snapshot::list(&a.client).await.unwrap();
    let snap_b = Snapshot::list(&b.client).await.unwrap();
    let (mut sa, mut sb) = (PassState::default(), PassState::default());
    let ra = pass(&a, &mut sa, snap_a, Timestamp::now()).await;
    let rb = pass(&b, &mut sb, snap_b, Timestamp::now()).await;
    assert_eq!(ra.conflicts, 0);
    assert_eq!(rb.conflicts, 1, "the loser's compare-and-swap was refused");
    assert_eq!(
        rb.writes, 0,
        "and, having read again, it had nothing left to do"
    );
    assert_eq!(holder(&api, "web").as_deref(), Some("node-a"));
    assert_eq!(status_patches(&api, "ctl-a", "domains"), 1);
    assert_eq!(status_patches(&api, "ctl-b", "domains"), 1);
    let reread = api.requests().iter().any(|r| {
        r.identity == "ctl-b" && r.verb == "get" && r.resource == "domains" && r.name == "web"
    });
    assert!(reread, "the loser read the domain again");
    let events: Vec<Value> = api.events();
    assert_eq!(
        events.iter().filter(|e| e["reason"] == "Scheduled").count(),
        1,
        "one decision, one event"
    );
}

/// Nodes with room, a shared pool everywhere, and domains held where given, all running,
/// each requesting `target`.
async fn moving_world(api: &TestApi, client: &Client, held: &[(&str, &str)], target: &str) {
    for n in ["node-a", "node-b", "node-c", "node-d"] {
        add_node(api, client, n, "64Gi").await;
    }
    for (name, node) in held {
        add_domain(
            api,
            with(
                domain(NS, name, "1Gi"),
                json!({"spec": {"nodeName": target}}),
            ),
        )
        .await;
        agent_writes_domain(
            client,
            NS,
            name,
            json!({"nodeName": node, "phase": "Running"}),
        )
        .await;
    }
}

fn pending(api: &TestApi, names: &[&str]) -> Vec<String> {
    names
        .iter()
        .filter(|n| migration(api, n)["state"] == "Pending")
        .map(|n| n.to_string())
        .collect()
}

#[tokio::test]
async fn six_requested_moves_five_approved_and_the_sixth_waits_for_a_slot() {
    let (api, client) = server().await;
    let names = ["m1", "m2", "m3", "m4", "m5", "m6"];
    let held: Vec<(&str, &str)> = names
        .iter()
        .zip(["node-a", "node-a", "node-b", "node-b", "node-c", "node-c"])
        .map(|(n, h)| (*n, h))
        .collect();
    moving_world(&api, &client, &held, "node-d").await;
    let ctx = ctx(&api, "ctl").await;
    let mut state = PassState::default();
    pass_now(&ctx, &mut state).await;
    assert_eq!(pending(&api, &names), vec!["m1", "m2", "m3", "m4", "m5"]);
    let m5 = migration(&api, "m5");
    assert_eq!(
        (m5["sourceNode"].as_str(), m5["targetNode"].as_str()),
        (Some("node-c"), Some("node-d"))
    );
    assert_eq!(
        (m5["mode"].as_str(), m5["reason"].as_str()),
        (Some("Live"), Some("Requested"))
    );
    let m6 = dom(&api, "m6");
    let waiting = condition(&m6, "MoveWaiting").unwrap();
    assert_eq!(waiting["reason"], "MigrationLimit");
    assert_eq!(
        waiting["message"],
        "5 moves are under way in the cluster (--max-migrations)"
    );
    // The target is labelled for its agent while the move is under way.
    assert_eq!(
        dom(&api, "m1")["metadata"]["labels"]["node.virtkube.io/node-d"],
        "target"
    );
    assert_eq!(
        dom(&api, "m1")["metadata"]["labels"]["node.virtkube.io/node-a"],
        "holder"
    );
    assert_eq!(
        ctx.metrics
            .migrations_approved
            .get_or_create(&ReasonLabels {
                reason: "Requested".into()
            })
            .get(),
        5
    );

    // The source's agent completes one move: a slot frees and the sixth is approved.
    agent_writes_domain(&client, NS, "m1", json!({"nodeName": "node-d", "migration": {"state": "Succeeded", "endTime": Timestamp::now().to_string()}})).await;
    pass_now(&ctx, &mut state).await;
    assert_eq!(migration(&api, "m6")["state"], "Pending");
    let finished = ctx
        .metrics
        .migrations_finished
        .get_or_create(&virtkube::cluster::metrics::OutcomeLabels {
            outcome: "Succeeded".into(),
        })
        .get();
    assert_eq!(finished, 1, "the agent's outcome is counted once");
    assert!(condition(&dom(&api, "m6"), "MoveWaiting").is_none());
    let labels = &dom(&api, "m1")["metadata"]["labels"];
    assert_eq!(labels["node.virtkube.io/node-d"], "holder");
    assert_eq!(
        labels["node.virtkube.io/node-a"],
        Value::Null,
        "the old holder's key is gone"
    );
}

#[tokio::test]
async fn three_moves_out_of_one_node_two_approved() {
    let (api, client) = server().await;
    moving_world(
        &api,
        &client,
        &[("x1", "node-a"), ("x2", "node-a"), ("x3", "node-a")],
        "node-b",
    )
    .await;
    let ctx = ctx(&api, "ctl").await;
    let mut state = PassState::default();
    pass_now(&ctx, &mut state).await;
    assert_eq!(pending(&api, &["x1", "x2", "x3"]), vec!["x1", "x2"]);
    let waiting = condition(&dom(&api, "x3"), "MoveWaiting").unwrap();
    assert_eq!(waiting["reason"], "NodeMigrationLimit");
    assert_eq!(
        waiting["message"],
        "2 moves are under way out of node node-a (--max-migrations-per-node)"
    );
}

#[tokio::test]
async fn a_move_nobody_wants_any_more_is_cancelled_and_a_failed_one_backs_off() {
    let (api, client) = server().await;
    moving_world(&api, &client, &[("web", "node-a")], "node-b").await;
    let mut ctx = ctx(&api, "ctl").await;
    // The passes below look up to 92 s ahead; the heartbeats written now must stay fresh.
    ctx.settings.heartbeat_grace = Duration::from_secs(3600);
    let mut state = PassState::default();
    pass_now(&ctx, &mut state).await;
    assert_eq!(migration(&api, "web")["state"], "Pending");

    // The user changes their mind before the source's agent starts it.
    api.edit_spec("domains", NS, "web", |s| s["nodeName"] = json!("node-a"))
        .unwrap();
    pass_now(&ctx, &mut state).await;
    let m = migration(&api, "web");
    assert_eq!(m["state"], "Aborted");
    assert_eq!(m["message"], "cancelled: spec.nodeName is now node-a");
    assert!(m["endTime"].is_string());
    assert!(event_reasons(&api).contains(&"MoveCancelled".to_string()));
    assert_eq!(
        ctx.metrics
            .migrations_cancelled
            .get_or_create(&ReasonLabels {
                reason: "Unwanted".into()
            })
            .get(),
        1
    );

    // Asked again: an aborted move backs off before the same move is approved again.
    api.edit_spec("domains", NS, "web", |s| s["nodeName"] = json!("node-b"))
        .unwrap();
    pass_now(&ctx, &mut state).await;
    assert_eq!(
        condition(&dom(&api, "web"), "MoveWaiting").unwrap()["reason"],
        "Backoff"
    );
    pass_at(&ctx, &mut state, later(31)).await;
    assert_eq!(migration(&api, "web")["state"], "Pending");

    // The source's agent runs it and libvirt fails it: the guest stays, the move waits 60 s
    // now (the second failure of the same move).
    agent_writes_domain(
        &client,
        NS,
        "web",
        json!({"migration": {"state": "Running"}}),
    )
    .await;
    agent_writes_domain(&client, NS, "web", json!({"migration": {"state": "Failed", "endTime": later(31).to_string(), "message": "unable to connect"}})).await;
    pass_at(&ctx, &mut state, later(60)).await;
    assert_eq!(
        migration(&api, "web")["state"],
        "Failed",
        "nothing written over the agent's record yet"
    );
    assert_eq!(
        condition(&dom(&api, "web"), "MoveWaiting").unwrap()["reason"],
        "Backoff"
    );
    pass_at(&ctx, &mut state, later(92)).await;
    assert_eq!(
        migration(&api, "web")["state"],
        "Pending",
        "{}",
        dom(&api, "web")
    );
}

#[tokio::test]
async fn draining_a_cordoned_node_moves_live_migratable_domains_and_blocks_pinned_ones() {
    let (api, client) = server().await;
    for n in ["node-a", "node-b", "node-c"] {
        add_node(&api, &client, n, "16Gi").await;
    }
    api.create("storagepools", created(pool("shared", true, &[])))
        .unwrap();
    let pools: Api<virtkube_crds::StoragePool> = Api::all(client.clone());
    pools
        .patch_status(
            "shared",
            &PatchParams::apply("virtkube-agent.node-x").force(),
            &Patch::Apply(&json!({"apiVersion": "virtkube.io/v1alpha1", "kind": "StoragePool", "status": pool("shared", true, &["node-a", "node-b", "node-c"])["status"]})),
        )
        .await
        .unwrap();
    api.create("volumes", volume(NS, "root", "shared")).unwrap();
    let disk = json!({"spec": {"disks": [{"name": "root", "volume": "root"}]}});
    add_domain(&api, with(domain(NS, "live", "1Gi"), disk.clone())).await;
    add_domain(
        &api,
        with(
            domain(NS, "pinned", "1Gi"),
            with(disk.clone(), json!({"spec": {"nodeName": "node-a"}})),
        ),
    )
    .await;
    add_domain(
        &api,
        with(
            domain(NS, "stays", "1Gi"),
            with(disk, json!({"spec": {"evictionStrategy": "None"}})),
        ),
    )
    .await;
    for name in ["live", "pinned", "stays"] {
        agent_writes_domain(
            &client,
            NS,
            name,
            json!({"nodeName": "node-a", "phase": "Running"}),
        )
        .await;
    }
    let ctx = ctx(&api, "ctl").await;
    let mut state = PassState::default();
    pass_now(&ctx, &mut state).await;
    assert_eq!(
        migration(&api, "live"),
        Value::Null,
        "nothing moves before the drain"
    );

    // kubectl drain node-a: the Node is cordoned.
    api.create("nodes", k8s_node("node-a", true, json!([])))
        .unwrap();
    pass_now(&ctx, &mut state).await;
    let m = migration(&api, "live");
    assert_eq!(
        (
            m["state"].as_str(),
            m["reason"].as_str(),
            m["sourceNode"].as_str()
        ),
        (Some("Pending"), Some("Drain"), Some("node-a"))
    );
    let target = m["targetNode"].as_str().unwrap().to_string();
    assert_ne!(target, "node-a");
    assert_eq!(
        dom(&api, "live")["spec"]["nodeName"],
        Value::Null,
        "the user's spec is untouched"
    );
    let blocked = condition(&dom(&api, "pinned"), "EvictionBlocked").unwrap();
    assert_eq!(blocked["reason"], "PinnedToNode");
    assert_eq!(migration(&api, "stays"), Value::Null);
    assert!(condition(&dom(&api, "stays"), "EvictionBlocked").is_none());
    let hvn = api.get("hypervisornodes", "", "node-a").unwrap();
    let draining = condition(&hvn, "Draining").unwrap();
    assert_eq!(draining["reason"], "Draining");
    assert_eq!(
        draining["message"],
        "0 moved, 1 moving, 0 waiting, 1 blocked (see their EvictionBlocked condition), 1 left in place (evictionStrategy None)"
    );
    let reasons = event_reasons(&api);
    assert!(
        reasons.contains(&"EvictionBlocked".to_string()),
        "{reasons:?}"
    );
    assert!(reasons.contains(&"Draining".to_string()), "{reasons:?}");

    // The source's agent completes the move.
    agent_writes_domain(&client, NS, "live", json!({"nodeName": target, "migration": {"state": "Succeeded", "endTime": Timestamp::now().to_string()}})).await;
    pass_now(&ctx, &mut state).await;
    let draining = condition(
        &api.get("hypervisornodes", "", "node-a").unwrap(),
        "Draining",
    )
    .unwrap();
    assert_eq!(draining["reason"], "DrainBlocked");
    assert!(
        draining["message"]
            .as_str()
            .unwrap()
            .starts_with("1 moved, 0 moving, 0 waiting, 1 blocked")
    );
    assert_eq!(
        migration(&api, "live")["state"],
        "Succeeded",
        "a finished drain move is not cancelled"
    );

    // Uncordoned: the condition goes, and so does the block.
    let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(client.clone());
    nodes
        .patch(
            "node-a",
            &PatchParams::default(),
            &Patch::Merge(&json!({"spec": {"unschedulable": false}})),
        )
        .await
        .unwrap();
    pass_now(&ctx, &mut state).await;
    assert!(
        condition(
            &api.get("hypervisornodes", "", "node-a").unwrap(),
            "Draining"
        )
        .is_none()
    );
    assert!(condition(&dom(&api, "pinned"), "EvictionBlocked").is_none());
}

#[tokio::test]
async fn a_silent_node_is_marked_and_only_its_fencing_reschedules_its_domains() {
    let (api, client) = server().await;
    add_node(&api, &client, "node-b", "16Gi").await;
    api.create("hypervisornodes", hvn_meta("node-a")).unwrap();
    let long_ago = Timestamp::now()
        .checked_sub(SignedDuration::from_secs(200))
        .unwrap();
    agent_publishes(
        &client,
        "node-a",
        hvn_status("16Gi", 8, &long_ago.to_string()),
    )
    .await;
    add_domain(&api, domain(NS, "web", "1Gi")).await;
    agent_writes_domain(
        &client,
        NS,
        "web",
        json!({"nodeName": "node-a", "phase": "Running"}),
    )
    .await;
    let ctx = ctx(&api, "ctl").await;
    let mut state = PassState::default();
    pass_now(&ctx, &mut state).await;

    let hvn = api.get("hypervisornodes", "", "node-a").unwrap();
    let ready = condition(&hvn, "Ready").unwrap();
    assert_eq!(
        (ready["status"].as_str(), ready["reason"].as_str()),
        (Some("Unknown"), Some("HeartbeatStale"))
    );
    let unreachable = condition(&dom(&api, "web"), "NodeUnreachable").unwrap();
    assert_eq!(unreachable["status"], "True");
    assert_eq!(
        holder(&api, "web").as_deref(),
        Some("node-a"),
        "nothing starts elsewhere yet"
    );
    // Steady while silent: no rewrite each pass.
    assert_eq!(pass_now(&ctx, &mut state).await.writes, 0);

    // The administrator declares node-a fenced.
    let hvns: Api<HypervisorNode> = Api::all(client.clone());
    hvns.patch(
        "node-a",
        &PatchParams::default(),
        &Patch::Merge(&json!({"metadata": {"annotations": {"virtkube.io/fenced": "true"}}})),
    )
    .await
    .unwrap();
    pass_now(&ctx, &mut state).await;
    assert_eq!(holder(&api, "web"), None, "released");
    assert_eq!(
        condition(&dom(&api, "web"), "Scheduled").unwrap()["reason"],
        "NodeFenced"
    );
    pass_now(&ctx, &mut state).await;
    assert_eq!(
        holder(&api, "web").as_deref(),
        Some("node-b"),
        "bound again elsewhere"
    );
    let labels = &dom(&api, "web")["metadata"]["labels"];
    assert_eq!(labels["node.virtkube.io/node-b"], "holder");
    assert_eq!(labels["node.virtkube.io/node-a"], Value::Null);
    assert!(condition(&dom(&api, "web"), "NodeUnreachable").is_none());
    assert!(event_reasons(&api).contains(&"Unfenced".to_string()));

    // The agent comes back: it takes Ready again and the controller lets go of it.
    agent_publishes(
        &client,
        "node-a",
        hvn_status("16Gi", 8, &Timestamp::now().to_string()),
    )
    .await;
    pass_now(&ctx, &mut state).await;
    let hvn = api.get("hypervisornodes", "", "node-a").unwrap();
    assert_eq!(condition(&hvn, "Ready").unwrap()["status"], "True");
    let owned_by_controller = hvn["metadata"]["managedFields"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["manager"] == "virtkube-controller")
        .map(|m| m["fieldsV1"].to_string())
        .collect::<String>();
    assert!(
        !owned_by_controller.contains("Ready"),
        "{owned_by_controller}"
    );
    assert!(
        event_reasons(&api).contains(&"FenceIgnored".to_string()),
        "a fenced node that beats is warned about"
    );
}

#[tokio::test]
async fn an_unbound_domain_being_deleted_is_finalized() {
    let (api, _client) = server().await;
    add_domain(
        &api,
        with(
            domain(NS, "gone", "1Gi"),
            json!({"metadata": {"finalizers": ["virtkube.io/cleanup"]}}),
        ),
    )
    .await;
    api.delete("domains", NS, "gone").unwrap();
    assert!(
        api.get("domains", NS, "gone").is_some(),
        "held by its finalizer"
    );
    let ctx = ctx(&api, "ctl").await;
    pass_now(&ctx, &mut PassState::default()).await;
    assert!(api.get("domains", NS, "gone").is_none());
    let removal = api
        .requests()
        .into_iter()
        .find(|r| {
            r.identity == "ctl"
                && r.verb == "patch"
                && r.resource == "domains"
                && r.subresource.is_empty()
        })
        .unwrap();
    assert_eq!(removal.field_manager, "virtkube-controller");
}

#[tokio::test]
async fn a_node_local_volume_waits_for_its_first_consumer_and_follows_it() {
    let (api, client) = server().await;
    add_node(&api, &client, "node-a", "16Gi").await;
    add_node(&api, &client, "node-b", "32Gi").await;
    api.create("storagepools", created(pool("local", false, &[])))
        .unwrap();
    let pools: Api<virtkube_crds::StoragePool> = Api::all(client.clone());
    pools
        .patch_status(
            "local",
            &PatchParams::apply("virtkube-agent.x").force(),
            &Patch::Apply(&json!({"apiVersion": "virtkube.io/v1alpha1", "kind": "StoragePool", "status": pool("local", false, &["node-a", "node-b"])["status"]})),
        )
        .await
        .unwrap();
    api.create("volumes", volume(NS, "data", "local")).unwrap();
    let ctx = ctx(&api, "ctl").await;
    let mut state = PassState::default();
    pass_now(&ctx, &mut state).await;
    let vol = api.get("volumes", NS, "data").unwrap();
    assert_eq!(
        condition(&vol, "Scheduled").unwrap()["reason"],
        "WaitingForConsumer"
    );

    add_domain(
        &api,
        with(
            domain(NS, "db", "1Gi"),
            json!({"spec": {"disks": [{"name": "d", "volume": "data"}]}}),
        ),
    )
    .await;
    pass_now(&ctx, &mut state).await;
    assert_eq!(
        holder(&api, "db").as_deref(),
        Some("node-b"),
        "most memory left"
    );
    let vol = api.get("volumes", NS, "data").unwrap();
    assert_eq!(vol["status"]["nodeName"], "node-b");
    assert_eq!(
        condition(&vol, "Scheduled").unwrap()["reason"],
        "FollowsConsumer"
    );
    assert_eq!(
        vol["metadata"]["labels"]["node.virtkube.io/node-b"],
        "holder"
    );

    // A second domain using it goes where the volume is, though node-a has room.
    add_domain(
        &api,
        with(
            domain(NS, "db2", "20Gi"),
            json!({"spec": {"disks": [{"name": "d", "volume": "data"}]}}),
        ),
    )
    .await;
    pass_now(&ctx, &mut state).await;
    assert_eq!(holder(&api, "db2").as_deref(), Some("node-b"));
}

fn lease(identity: &str) -> Config {
    Config {
        settings: Settings::default(),
        lease: LeaseConfig {
            namespace: NS.into(),
            name: "virtkube-controller".into(),
            identity: identity.into(),
            duration: Duration::from_secs(3),
            renew_deadline: Duration::from_secs(2),
            retry_period: Duration::from_millis(250),
        },
        resync: Duration::from_secs(5),
    }
}

async fn wait_leader(instances: &[(&str, &virtkube::cluster::Instance)], secs: u64) -> String {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let leaders: Vec<&str> = instances
            .iter()
            .filter(|(_, i)| *i.leading.borrow())
            .map(|(n, _)| *n)
            .collect();
        assert!(leaders.len() <= 1, "two leaders at once: {leaders:?}");
        if let [one] = leaders.as_slice() {
            return one.to_string();
        }
        assert!(Instant::now() < deadline, "no leader after {secs}s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn one_of_two_controllers_works_and_a_dead_leader_is_replaced_within_the_lease() {
    let (api, client) = server().await;
    add_node(&api, &client, "node-a", "16Gi").await;
    let a = spawn(
        api.client("ctl-a").await.unwrap(),
        lease("ctl-a"),
        Arc::new(Metrics::default()),
    );
    let b = spawn(
        api.client("ctl-b").await.unwrap(),
        lease("ctl-b"),
        Arc::new(Metrics::default()),
    );
    let first = wait_leader(&[("ctl-a", &a), ("ctl-b", &b)], 10).await;
    add_domain(&api, domain(NS, "one", "1Gi")).await;
    eventually(10, "the first domain bound", || {
        holder(&api, "one").is_some()
    })
    .await;
    let other = if first == "ctl-a" { "ctl-b" } else { "ctl-a" };
    assert!(status_patches(&api, &first, "domains") >= 1);
    assert_eq!(
        status_patches(&api, other, "domains"),
        0,
        "the standby does nothing"
    );
    let standby_reads = api
        .requests()
        .iter()
        .filter(|r| r.identity == other && r.resource != "leases")
        .count();
    assert_eq!(standby_reads, 0, "the standby does not even watch");

    // The leader dies without releasing its lease.
    let (dead, survivor) = if first == "ctl-a" { (a, b) } else { (b, a) };
    let killed = Instant::now();
    dead.kill().await;
    let next = wait_leader(&[(other, &survivor)], 10).await;
    let handover = killed.elapsed();
    println!("handover after the leader died: {handover:?} (lease 3 s, retry 0.25 s)");
    assert_eq!(next, other);
    assert!(handover < Duration::from_millis(3_600), "{handover:?}");
    add_domain(&api, domain(NS, "two", "1Gi")).await;
    eventually(10, "the second domain bound by the new leader", || {
        holder(&api, "two").is_some()
    })
    .await;
    assert!(status_patches(&api, other, "domains") >= 1);

    // A clean stop releases the lease: a third replica takes over within a retry or two.
    let c = spawn(
        api.client("ctl-c").await.unwrap(),
        lease("ctl-c"),
        Arc::new(Metrics::default()),
    );
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(!*c.leading.borrow());
    let stopped = Instant::now();
    survivor.stop().await;
    wait_leader(&[("ctl-c", &c)], 10).await;
    let handover = stopped.elapsed();
    println!("handover after a clean stop: {handover:?}");
    assert!(handover < Duration::from_millis(1_500), "{handover:?}");
    c.stop().await;
}

#[tokio::test]
async fn a_leader_that_cannot_renew_stops_working_before_its_lease_expires() {
    let (api, _client) = server().await;
    let a = spawn(
        api.client("ctl-a").await.unwrap(),
        lease("ctl-a"),
        Arc::new(Metrics::default()),
    );
    wait_leader(&[("ctl-a", &a)], 10).await;
    let hung = Instant::now();
    api.hang(true);
    let mut leading = a.leading.clone();
    tokio::time::timeout(Duration::from_secs(5), leading.wait_for(|l| !*l))
        .await
        .expect("still leading with a hung API server")
        .unwrap();
    let stopped = hung.elapsed();
    println!(
        "stopped working {stopped:?} after the API server hung (renew deadline 2 s, lease 3 s)"
    );
    assert!(stopped < Duration::from_secs(3), "{stopped:?}");
    api.hang(false);
    let mut leading = a.leading.clone();
    tokio::time::timeout(Duration::from_secs(10), leading.wait_for(|l| *l))
        .await
        .expect("leads again once the server answers")
        .unwrap();
    a.stop().await;
}
