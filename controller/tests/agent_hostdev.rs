//! The agent and host PCI devices (`spec.hostDevices`), against the strict in-memory API
//! server with the real engine on libvirt's test driver, its host described by a file with
//! two PCI devices (`engine/tests/fixtures/pci-host.xml`): a domain with one is defined and
//! runs with it, reported in `status.hostDevices`; a second domain asking for the same device
//! and one asking for a device the node lacks are refused before anything is defined, each
//! with its own `Ready=False` reason.

mod agent_support;

use std::sync::Arc;
use std::time::Duration;

use agent_support::{NODE, bind_domain, testapi_context_on};
use kube::api::Api;
use serde_json::json;
use virtkube::agent::domain;
use virtkube_crds::Domain;
use virtkube_crds::conditions;
use virtkube_testapi::TestApi;

const PCI_HOST: &str = include_str!("../../engine/tests/fixtures/pci-host.xml");
const NS: &str = "pci";

async fn reconcile(
    api: &Api<Domain>,
    ctx: &Arc<virtkube::agent::context::Context>,
    name: &str,
) -> Result<kube::runtime::controller::Action, virtkube::agent::error::Error> {
    let dom = api.get(name).await.unwrap();
    tokio::time::timeout(
        Duration::from_secs(30),
        domain::reconcile(Arc::new(dom), ctx.clone()),
    )
    .await
    .expect("the reconcile finished")
}

fn ready(dom: &Domain) -> (String, String, String) {
    let c = conditions::find(&dom.status.as_ref().unwrap().conditions, "Ready").unwrap();
    (c.status.clone(), c.reason.clone(), c.message.clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_runs_with_one_domain_and_is_refused_to_a_second_or_when_missing() {
    let dir = tempfile::tempdir().unwrap();
    let host_file = dir.path().join("host.xml");
    std::fs::write(&host_file, PCI_HOST).unwrap();
    let api = TestApi::start().await.unwrap();
    api.create_namespace(NS).unwrap();
    let (ctx, _, engine) =
        testapi_context_on(&api, NODE, &format!("test://{}", host_file.display())).await;
    let client = api.client("admin").await.unwrap();
    let domains: Api<Domain> = Api::namespaced(client.clone(), NS);
    let create = |name: &str, address: &str| {
        api.create(
            "domains",
            json!({
                "apiVersion": "virtkube.io/v1alpha1",
                "kind": "Domain",
                "metadata": {"name": name, "namespace": NS},
                "spec": {
                    "memory": {"size": "64Mi"},
                    "hostDevices": [{"name": "gpu", "address": address}]
                }
            }),
        )
        .unwrap();
    };

    // 1. The first domain gets the device and runs with it.
    create("ml", "0000:07:00.0");
    bind_domain(&client, NS, "ml", NODE).await;
    reconcile(&domains, &ctx, "ml").await.unwrap();
    let ml = domains.get("ml").await.unwrap();
    assert_eq!(ready(&ml).0, "True", "{:?}", ready(&ml));
    let status = ml.status.unwrap();
    assert_eq!(status.host_devices.len(), 1);
    assert_eq!(
        (
            status.host_devices[0].name.as_str(),
            status.host_devices[0].address.as_str()
        ),
        ("gpu", "0000:07:00.0")
    );
    let seen = engine.domain_observe("pci.ml").await.unwrap().unwrap();
    assert!(seen.state.is_active());
    assert_eq!(seen.hostdevs[0].address.to_string(), "0000:07:00.0");

    // 2. A second domain asking for the same device: refused, nothing defined.
    create("ml2", "0000:07:00.0");
    bind_domain(&client, NS, "ml2", NODE).await;
    assert!(reconcile(&domains, &ctx, "ml2").await.is_err());
    let (status, reason, message) = ready(&domains.get("ml2").await.unwrap());
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("False", "HostDeviceInUse")
    );
    assert!(
        message.contains("0000:07:00.0 is already given to domain pci.ml"),
        "{message}"
    );
    assert!(engine.domain_observe("pci.ml2").await.unwrap().is_none());

    // 3. A device the node does not have: refused, nothing defined.
    create("ml3", "0000:09:00.0");
    bind_domain(&client, NS, "ml3", NODE).await;
    assert!(reconcile(&domains, &ctx, "ml3").await.is_err());
    let (status, reason, message) = ready(&domains.get("ml3").await.unwrap());
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("False", "HostDeviceMissing")
    );
    assert!(
        message.contains("has no PCI device 0000:09:00.0"),
        "{message}"
    );
    assert!(engine.domain_observe("pci.ml3").await.unwrap().is_none());
}
