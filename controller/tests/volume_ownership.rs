//! Whose image is it: the agent's Volume controller against the in-memory API server, on
//! `test:///default`.
//!
//! - A retained image is never inherited by a later Volume of the same namespace and name
//!   (a re-created namespace, another tenant): that Volume is `Ready=False`, `NameConflict`,
//!   and says how to adopt it; adopting is the explicit annotation `virtkube.io/adopt-image`
//!   naming the image's key or path, and nothing else adopts.
//! - An image the agent made before it could record its key (a crash in between) is known by
//!   the `Creating` phase recorded before libvirt was asked.
//! - A Volume in a pool virtkube did not make (the test driver's `default-pool`) is never
//!   deleted from it, whatever its policy, and its deletion completes.
//! - The status is written by compare-and-swap: a write that loses to another writer reads
//!   the Volume again and keeps what that writer set (`nodeName`, `Scheduled`).

use std::sync::Arc;
use std::time::Duration;

use kube::api::{Api, Patch, PatchParams};
use prometheus_client::registry::Registry;
use serde_json::json;
use virtkube::agent::context::{Context, Settings};
use virtkube::agent::metrics::Metrics;
use virtkube::agent::{pool, volume};
use virtkube::host::{HostSpec, Hosts};
use virtkube_crds::{StoragePool, Volume};
use virtkube_engine::{Engine, EngineConfig};
use virtkube_testapi::{ADMIN, TestApi};

const NODE: &str = "node-a";
/// The annotation that asks to adopt an existing image (spelled out: the API's constant is
/// `virtkube_crds::volume::ADOPT_IMAGE_ANNOTATION`).
const ADOPT: &str = "virtkube.io/adopt-image";

async fn agent(api: &TestApi) -> (Arc<Context>, Engine, kube::Client) {
    let client = api.client(ADMIN).await.unwrap();
    let hosts = Hosts::connect(
        &[HostSpec {
            node: NODE.into(),
            uri: "test:///default".into(),
            p2p_uri: None,
            migration_uri: None,
        }],
        EngineConfig::default(),
    )
    .await
    .unwrap();
    let engine = hosts.get(NODE).unwrap().engine.clone();
    let settings = Settings::for_node(NODE);
    let metrics = Metrics::register(&mut Registry::default(), None);
    let ctx = Context::new(client.clone(), hosts, metrics, settings).unwrap();
    (Arc::new(ctx), engine, client)
}

/// A virtkube pool `images` on the test driver, through the pool controller.
async fn images_pool(api: &TestApi, ctx: &Arc<Context>, client: &kube::Client) {
    api.create(
        "storagepools",
        json!({ "apiVersion": "virtkube.io/v1alpha1", "kind": "StoragePool",
                "metadata": { "name": "images" },
                "spec": { "type": "dir", "target": { "path": "/var/lib/virtkube/pools/images" } } }),
    )
    .unwrap();
    let pools: Api<StoragePool> = Api::all(client.clone());
    for _ in 0..3 {
        let p = pools.get("images").await.unwrap();
        let _ = pool::reconcile(Arc::new(p), ctx.clone()).await;
    }
}

/// Creates `team/disk` in `pool` and binds it to `NODE` as the cluster controller does.
async fn bound_volume(api: &TestApi, client: &kube::Client, pool: &str, policy: &str) {
    api.create_namespace("team").unwrap();
    api.create(
        "volumes",
        json!({ "apiVersion": "virtkube.io/v1alpha1", "kind": "Volume",
                "metadata": { "name": "disk", "namespace": "team",
                              "labels": { "node.virtkube.io/node-a": "holder" } },
                "spec": { "pool": pool, "capacity": "1Gi", "reclaimPolicy": policy } }),
    )
    .unwrap();
    Api::<Volume>::namespaced(client.clone(), "team")
        .patch_status(
            "disk",
            &PatchParams::default(),
            &Patch::Merge(json!({ "status": { "nodeName": NODE } })),
        )
        .await
        .unwrap();
}

async fn get(client: &kube::Client) -> Option<Volume> {
    Api::<Volume>::namespaced(client.clone(), "team")
        .get_opt("disk")
        .await
        .unwrap()
}

/// Reconciles `team/disk` `times` times from fresh reads.
async fn reconcile(ctx: &Arc<Context>, client: &kube::Client, times: usize) {
    for _ in 0..times {
        let Some(vol) = get(client).await else { return };
        let _ = volume::reconcile(Arc::new(vol), ctx.clone()).await;
    }
}

fn ready(vol: &Volume) -> (String, String, String) {
    let status = vol.status.as_ref().expect("a status");
    let c = virtkube_crds::conditions::find(&status.conditions, "Ready").expect("Ready");
    (c.status.clone(), c.reason.clone(), c.message.clone())
}

fn reasons(api: &TestApi) -> Vec<String> {
    api.events()
        .iter()
        .map(|e| e["reason"].as_str().unwrap_or_default().to_string())
        .collect()
}

#[tokio::test]
async fn a_new_volume_of_the_same_name_never_inherits_a_retained_image() {
    let api = TestApi::start().await.unwrap();
    let (ctx, engine, client) = agent(&api).await;
    images_pool(&api, &ctx, &client).await;

    // The first tenant's Volume makes an image and is deleted with Retain.
    bound_volume(&api, &client, "images", "Retain").await;
    reconcile(&ctx, &client, 3).await;
    let first = get(&client).await.unwrap();
    assert_eq!(ready(&first).0, "True", "{:?}", first.status);
    let key = first.status.as_ref().unwrap().key.clone().unwrap();
    api.delete("volumes", "team", "disk").unwrap();
    reconcile(&ctx, &client, 1).await;
    assert!(get(&client).await.is_none(), "the deletion completed");
    let image = engine.volume_observe("images", "team.disk").await.unwrap();
    assert_eq!(image.as_ref().map(|i| i.key.clone()), Some(key.clone()));

    // A new Volume of the same namespace and name (a new UID): refused, nothing recorded.
    bound_volume(&api, &client, "images", "Delete").await;
    reconcile(&ctx, &client, 3).await;
    let second = get(&client).await.unwrap();
    assert_ne!(second.metadata.uid, first.metadata.uid);
    let (status, reason, message) = ready(&second);
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("False", "NameConflict")
    );
    assert!(
        message.contains(&format!("{ADOPT}={key}")),
        "says how to adopt it: {message}"
    );
    assert_eq!(second.status.as_ref().unwrap().key, None);
    assert!(!reasons(&api).contains(&"Adopted".to_string()));

    // Deleting that Volume (policy Delete) leaves the image alone: it was never its own.
    api.delete("volumes", "team", "disk").unwrap();
    reconcile(&ctx, &client, 1).await;
    assert!(get(&client).await.is_none(), "the deletion completed");
    assert!(
        engine
            .volume_observe("images", "team.disk")
            .await
            .unwrap()
            .is_some(),
        "an image that was not the Volume's is never deleted with it"
    );
}

/// Sets the adopt annotation on `team/disk` (a merge patch, as `kubectl annotate`).
async fn set_adopt(client: &kube::Client, value: &str) {
    Api::<Volume>::namespaced(client.clone(), "team")
        .patch(
            "disk",
            &PatchParams::default(),
            &Patch::Merge(json!({ "metadata": { "annotations": { ADOPT: value } } })),
        )
        .await
        .unwrap();
}

#[tokio::test]
async fn adopting_an_existing_image_takes_the_annotation_naming_it_exactly() {
    let api = TestApi::start().await.unwrap();
    let (ctx, engine, client) = agent(&api).await;
    images_pool(&api, &ctx, &client).await;
    // An image left in the pool (retained earlier, or made by hand).
    let def = virtkube_engine::model::VolumeDef {
        name: "team.disk".into(),
        capacity_bytes: 1 << 30,
        format: virtkube_engine::model::VolumeFormat::Qcow2,
        backing_volume: None,
    };
    let made = engine.volume_create("images", &def).await.unwrap();

    bound_volume(&api, &client, "images", "Retain").await;
    set_adopt(&client, "/somewhere/else").await;
    reconcile(&ctx, &client, 3).await;
    let (status, reason, message) = ready(&get(&client).await.unwrap());
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("False", "NameConflict")
    );
    assert!(message.contains("nothing adopted"), "{message}");

    set_adopt(&client, &made.path).await;
    reconcile(&ctx, &client, 2).await;
    let adopted = get(&client).await.unwrap();
    assert_eq!(ready(&adopted).0, "True", "{:?}", adopted.status);
    assert_eq!(
        adopted.status.as_ref().unwrap().key.as_deref(),
        Some(made.key.as_str())
    );
    assert!(
        reasons(&api).contains(&"Adopted".to_string()),
        "{:?}",
        reasons(&api)
    );
    assert!(!reasons(&api).contains(&"VolumeCreated".to_string()));

    // Asking to adopt where there is no image is refused too (not silently made empty).
    api.create_namespace("other").unwrap();
    api.create(
        "volumes",
        json!({ "apiVersion": "virtkube.io/v1alpha1", "kind": "Volume",
                "metadata": { "name": "disk", "namespace": "other", "annotations": { ADOPT: "/pools/x" } },
                "spec": { "pool": "images", "capacity": "1Gi" } }),
    )
    .unwrap();
    let others: Api<Volume> = Api::namespaced(client.clone(), "other");
    others
        .patch_status(
            "disk",
            &PatchParams::default(),
            &Patch::Merge(json!({ "status": { "nodeName": NODE } })),
        )
        .await
        .unwrap();
    for _ in 0..3 {
        let v = others.get("disk").await.unwrap();
        let _ = volume::reconcile(Arc::new(v), ctx.clone()).await;
    }
    let (status, reason, message) = ready(&others.get("disk").await.unwrap());
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("False", "NameConflict")
    );
    assert!(message.contains("nothing to adopt"), "{message}");
    assert!(
        engine
            .volume_observe("images", "other.disk")
            .await
            .unwrap()
            .is_none()
    );
}

#[tokio::test]
async fn an_image_made_just_before_a_crash_is_known_by_the_creating_phase() {
    let api = TestApi::start().await.unwrap();
    let (ctx, engine, client) = agent(&api).await;
    images_pool(&api, &ctx, &client).await;
    bound_volume(&api, &client, "images", "Delete").await;
    // What an agent that crashed right after libvirt made the image left: `Creating`
    // recorded, the image there, no key yet.
    Api::<Volume>::namespaced(client.clone(), "team")
        .patch_status(
            "disk",
            &PatchParams::default(),
            &Patch::Merge(json!({ "status": { "phase": "Creating" } })),
        )
        .await
        .unwrap();
    let def = virtkube_engine::model::VolumeDef {
        name: "team.disk".into(),
        capacity_bytes: 1 << 30,
        format: virtkube_engine::model::VolumeFormat::Qcow2,
        backing_volume: None,
    };
    let made = engine.volume_create("images", &def).await.unwrap();
    reconcile(&ctx, &client, 3).await;
    let vol = get(&client).await.unwrap();
    assert_eq!(ready(&vol).0, "True", "{:?}", vol.status);
    assert_eq!(
        vol.status.as_ref().unwrap().key.as_deref(),
        Some(made.key.as_str())
    );
    assert_eq!(
        vol.status.as_ref().unwrap().phase,
        Some(virtkube_crds::volume::VolumePhase::Available)
    );
}

#[tokio::test]
async fn a_volume_in_a_pool_virtkube_did_not_make_is_never_deleted_and_its_deletion_completes() {
    let api = TestApi::start().await.unwrap();
    let (ctx, engine, client) = agent(&api).await;
    // `default-pool` is the test driver's own: it carries no virtkube mark.
    let pool = engine.pool_observe("default-pool").await.unwrap().unwrap();
    assert!(pool.owner.is_none());
    bound_volume(&api, &client, "default-pool", "Delete").await;
    reconcile(&ctx, &client, 3).await;
    let vol = get(&client).await.unwrap();
    assert_eq!(ready(&vol).0, "True", "{:?}", vol.status);

    api.delete("volumes", "team", "disk").unwrap();
    let deleting = get(&client).await.unwrap();
    tokio::time::timeout(
        Duration::from_secs(20),
        volume::reconcile(Arc::new(deleting), ctx.clone()),
    )
    .await
    .unwrap()
    .expect("the deletion completes");
    assert!(get(&client).await.is_none(), "the finalizer is removed");
    assert!(
        engine
            .volume_observe("default-pool", "team.disk")
            .await
            .unwrap()
            .is_some(),
        "the image stays in a pool virtkube did not make"
    );
    let retained: Vec<String> = api
        .events()
        .iter()
        .filter(|e| e["reason"] == "Retained")
        .map(|e| e["note"].as_str().unwrap_or_default().to_string())
        .collect();
    assert!(
        retained.iter().any(|n| n.contains("not virtkube's")),
        "{retained:?}"
    );
}

#[tokio::test]
async fn a_status_write_that_loses_a_race_reads_again_and_keeps_the_other_writers_fields() {
    let api = TestApi::start().await.unwrap();
    let (ctx, _engine, client) = agent(&api).await;
    // No pool: the reconcile writes a PoolMissing status.
    bound_volume(&api, &client, "no-such-pool", "Delete").await;
    reconcile(&ctx, &client, 1).await; // adds the finalizer
    let stale = get(&client).await.unwrap();
    // Meanwhile the controller writes its Scheduled condition.
    let scheduled = json!({ "type": "Scheduled", "status": "True", "reason": "Bound",
                            "message": "bound to node-a", "lastTransitionTime": "2026-01-01T00:00:00Z" });
    Api::<Volume>::namespaced(client.clone(), "team")
        .patch_status(
            "disk",
            &PatchParams::default(),
            &Patch::Merge(json!({ "status": { "nodeName": NODE, "conditions": [scheduled] } })),
        )
        .await
        .unwrap();
    // The agent decides on its stale read; its write loses and is decided again.
    let result = volume::reconcile(Arc::new(stale), ctx.clone()).await;
    assert!(result.is_err(), "PoolMissing is retried");
    let vol = get(&client).await.unwrap();
    let status = vol.status.unwrap();
    assert_eq!(status.node_name.as_deref(), Some(NODE));
    let types: Vec<&str> = status.conditions.iter().map(|c| c.type_.as_str()).collect();
    assert!(types.contains(&"Scheduled"), "{types:?}");
    let ready = virtkube_crds::conditions::find(&status.conditions, "Ready").unwrap();
    assert_eq!(ready.reason, "PoolMissing");
}
