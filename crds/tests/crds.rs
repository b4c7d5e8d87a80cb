//! The generated CRDs: structural, complete, committed, and their CEL rules doing what they say.

use std::path::PathBuf;

use kube::core::cel::Validator;
use serde_json::{Value, json};
use virtkube_crds::{crd, descriptions, schema_check};

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn schema_of(kind: &str) -> Value {
    let crd = crd::all()
        .into_iter()
        .find(|c| c.spec.names.kind == kind)
        .expect("kind exists");
    serde_json::to_value(
        crd.spec.versions[0]
            .schema
            .as_ref()
            .unwrap()
            .open_api_v3_schema
            .as_ref()
            .unwrap(),
    )
    .unwrap()
}

#[test]
fn every_crd_is_structural_and_installable_on_1_24() {
    for crd in crd::all() {
        let name = crd.metadata.name.clone().unwrap();
        assert_eq!(crd.spec.versions.len(), 1, "{name}");
        let version = &crd.spec.versions[0];
        assert!(
            version.selectable_fields.is_none(),
            "{name}: selectableFields needs Kubernetes 1.30"
        );
        assert!(
            version
                .subresources
                .as_ref()
                .and_then(|s| s.status.as_ref())
                .is_some(),
            "{name}: status subresource"
        );
        let schema = serde_json::to_value(
            version
                .schema
                .as_ref()
                .unwrap()
                .open_api_v3_schema
                .as_ref()
                .unwrap(),
        )
        .unwrap();
        let problems = schema_check::problems(&schema);
        assert!(
            problems.is_empty(),
            "{name} would be refused:\n{}",
            problems.join("\n")
        );
    }
}

#[test]
fn every_crd_has_short_name_category_and_printer_columns() {
    let expected = [
        ("Domain", "dom"),
        ("Volume", "vol"),
        ("Network", "vnet"),
        ("StoragePool", "pool"),
        ("HypervisorNode", "hvn"),
    ];
    for (kind, short) in expected {
        let crd = crd::all()
            .into_iter()
            .find(|c| c.spec.names.kind == kind)
            .unwrap();
        assert_eq!(
            crd.spec.names.short_names.as_deref(),
            Some(&[short.to_string()][..]),
            "{kind}"
        );
        assert_eq!(
            crd.spec.names.categories.as_deref(),
            Some(&["virtkube".to_string()][..]),
            "{kind}"
        );
        let columns: Vec<String> = crd.spec.versions[0]
            .additional_printer_columns
            .iter()
            .flatten()
            .map(|c| c.name.clone())
            .collect();
        assert!(
            columns.contains(&"Ready".to_string()),
            "{kind}: {columns:?}"
        );
        let scope = if matches!(kind, "Domain" | "Volume") {
            "Namespaced"
        } else {
            "Cluster"
        };
        assert_eq!(crd.spec.scope, scope, "{kind}");
    }
    let domain = crd::all().remove(0);
    let columns: Vec<(String, String)> = domain.spec.versions[0]
        .additional_printer_columns
        .iter()
        .flatten()
        .map(|c| (c.name.clone(), c.json_path.clone()))
        .collect();
    for (name, path) in [
        ("Phase", ".status.phase"),
        ("Node", ".status.nodeName"),
        ("vCPUs", ".spec.cpu.vcpus"),
        ("Memory", ".spec.memory.size"),
        ("Age", ".metadata.creationTimestamp"),
    ] {
        assert!(
            columns.contains(&(name.to_string(), path.to_string())),
            "Domain column {name}: {columns:?}"
        );
    }
}

/// Validation markers that must reach the YAML: a misspelt attribute would drop one silently.
#[test]
fn validation_markers_reach_the_schema() {
    let domain = schema_of("Domain");
    let spec = "/properties/spec/properties";
    let checks: Vec<(&Value, String, Value)> = vec![
        (
            &domain,
            format!("{spec}/cpu/properties/vcpus/minimum"),
            json!(1.0),
        ),
        (
            &domain,
            format!("{spec}/cpu/properties/vcpus/maximum"),
            json!(4096.0),
        ),
        (
            &domain,
            format!("{spec}/cpu/properties/pinning/x-kubernetes-list-type"),
            json!("map"),
        ),
        (
            &domain,
            format!("{spec}/cpu/properties/pinning/x-kubernetes-list-map-keys"),
            json!(["vcpu"]),
        ),
        (
            &domain,
            format!("{spec}/cpu/properties/pinning/items/properties/cpuset/pattern"),
            json!(virtkube_crds::cpuset::CPUSET_PATTERN),
        ),
        (
            &domain,
            format!("{spec}/hostDevices/items/properties/address/pattern"),
            json!(virtkube_crds::domain::PCI_ADDRESS_PATTERN),
        ),
        (
            &domain,
            format!("{spec}/hostDevices/x-kubernetes-list-map-keys"),
            json!(["name"]),
        ),
        (&domain, format!("{spec}/hostDevices/maxItems"), json!(16)),
        (
            &domain,
            format!("{spec}/disks/x-kubernetes-list-map-keys"),
            json!(["name"]),
        ),
        (
            &domain,
            format!("{spec}/interfaces/x-kubernetes-list-map-keys"),
            json!(["name"]),
        ),
        (
            &domain,
            format!("{spec}/interfaces/items/properties/macAddress/pattern"),
            json!(virtkube_crds::names::MAC_PATTERN),
        ),
        (
            &domain,
            format!("{spec}/memory/properties/size/pattern"),
            json!(virtkube_crds::quantity::SIZE_PATTERN),
        ),
        (
            &domain,
            format!("{spec}/memory/properties/size/x-kubernetes-int-or-string"),
            json!(true),
        ),
        (
            &domain,
            format!("{spec}/runStrategy/enum"),
            json!(["Always", "RerunOnFailure", "Manual", "Halted"]),
        ),
        (
            &domain,
            format!("{spec}/runStrategy/default"),
            json!("Always"),
        ),
        (
            &domain,
            "/properties/status/properties/conditions/x-kubernetes-list-map-keys".into(),
            json!(["type"]),
        ),
        (
            &domain,
            "/properties/spec/required".into(),
            json!(["memory"]),
        ),
    ];
    for (schema, pointer, expected) in checks {
        assert_eq!(schema.pointer(&pointer), Some(&expected), "{pointer}");
    }
    let rule_count = |schema: &Value, pointer: &str| {
        schema
            .pointer(pointer)
            .and_then(Value::as_array)
            .map(Vec::len)
            .unwrap_or(0)
    };
    assert_eq!(
        rule_count(&domain, &format!("{spec}/cpu/x-kubernetes-validations")),
        4
    );
    assert_eq!(
        rule_count(&domain, "/properties/spec/x-kubernetes-validations"),
        3
    );
    assert_eq!(
        rule_count(
            &domain,
            &format!("{spec}/disks/items/x-kubernetes-validations")
        ),
        1
    );
    let volume = schema_of("Volume");
    assert_eq!(
        rule_count(
            &volume,
            "/properties/spec/properties/pool/x-kubernetes-validations"
        ),
        1
    );
    assert_eq!(
        rule_count(&volume, "/properties/spec/x-kubernetes-validations"),
        2
    );
    assert_eq!(
        rule_count(
            &volume,
            "/properties/spec/properties/source/x-kubernetes-validations"
        ),
        2
    );
    let network = schema_of("Network");
    assert_eq!(
        rule_count(&network, "/properties/spec/x-kubernetes-validations"),
        4
    );
    assert_eq!(network.pointer("/properties/spec/properties/ip/properties/dhcp/properties/ranges/x-kubernetes-list-map-keys"), Some(&json!(["start"])));
    assert_eq!(network.pointer("/properties/spec/properties/ip/properties/dhcp/properties/hosts/x-kubernetes-list-map-keys"), Some(&json!(["mac"])));
    assert_eq!(
        network
            .pointer("/properties/spec/properties/dns/properties/hosts/x-kubernetes-list-map-keys"),
        Some(&json!(["ip"]))
    );
    assert_eq!(
        rule_count(
            &network,
            "/properties/spec/properties/ip/properties/dhcp/x-kubernetes-validations"
        ),
        1
    );
    let pool = schema_of("StoragePool");
    assert_eq!(
        rule_count(&pool, "/properties/spec/x-kubernetes-validations"),
        9
    );
    assert_eq!(
        pool.pointer("/properties/spec/properties/source/properties/devices/items/maxLength"),
        Some(&json!(4096))
    );
    assert!(
        pool.pointer("/properties/spec/properties/source/properties/devices/items/pattern")
            .is_some()
    );
    assert_eq!(
        pool.pointer("/properties/status/properties/nodes/x-kubernetes-list-map-keys"),
        Some(&json!(["nodeName"]))
    );
}

/// Every field has a description, so `kubectl explain` teaches the API.
#[test]
fn every_field_is_described() {
    fn walk(node: &Value, path: &str, missing: &mut Vec<String>) {
        if let Some(properties) = node.get("properties").and_then(Value::as_object) {
            for (name, child) in properties {
                let child_path = format!("{path}.{name}");
                let described = child
                    .get("description")
                    .and_then(Value::as_str)
                    .is_some_and(|d| !d.is_empty());
                // metadata, apiVersion and kind are described by Kubernetes itself.
                if !described
                    && !matches!(child_path.as_str(), ".metadata" | ".apiVersion" | ".kind")
                    && !path.contains("conditions")
                {
                    missing.push(child_path.clone());
                }
                walk(child, &child_path, missing);
            }
        }
        if let Some(items) = node.get("items") {
            walk(items, &format!("{path}[]"), missing);
        }
    }
    for kind in [
        "Domain",
        "Volume",
        "Network",
        "StoragePool",
        "HypervisorNode",
    ] {
        let mut missing = Vec::new();
        walk(&schema_of(kind), "", &mut missing);
        assert!(
            missing.is_empty(),
            "{kind} fields without a description: {missing:?}"
        );
    }
}

/// `kubectl explain` prints a description's line breaks as they are: a break kept from a doc
/// comment cuts a sentence in the middle. Paragraphs and list items may break; nothing else.
#[test]
fn descriptions_read_as_prose() {
    fn walk(node: &Value, path: &str, broken: &mut Vec<String>) {
        match node {
            Value::Object(map) => {
                for (key, value) in map {
                    let child = format!("{path}.{key}");
                    if let (true, Some(text)) = (key == "description", value.as_str())
                        && let Some(line) = descriptions::broken_line(text)
                    {
                        broken.push(format!("{child}: a line break before `{line}`"));
                    }
                    walk(value, &child, broken);
                }
            }
            Value::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    walk(item, &format!("{path}[{i}]"), broken);
                }
            }
            _ => {}
        }
    }
    let mut broken = Vec::new();
    let mut paragraphs = 0;
    for crd in crd::all() {
        let name = crd.metadata.name.clone().unwrap();
        let json = serde_json::to_value(&crd).unwrap();
        walk(&json, &name, &mut broken);
        paragraphs += serde_json::to_string(&json)
            .unwrap()
            .matches("\\n\\n")
            .count();
    }
    assert!(
        broken.is_empty(),
        "descriptions broken inside a paragraph:\n{}",
        broken.join("\n")
    );
    assert!(paragraphs > 0, "paragraph breaks must survive");
}

/// The committed chart CRDs are exactly what the code generates. Regenerate with
/// `cargo run -p virtkube -- crd --output-dir charts/virtkube/crds`.
#[test]
fn committed_crds_match_the_code() {
    let dir = repo_root().join("charts/virtkube/crds");
    let mut expected_files = Vec::new();
    for crd in crd::all() {
        let file = crd::file_name(&crd);
        let generated = crd::to_yaml(&crd).unwrap();
        let committed = std::fs::read_to_string(dir.join(&file)).unwrap_or_default();
        assert!(
            committed == generated,
            "charts/virtkube/crds/{file} differs from the code: run `cargo run -p virtkube -- crd --output-dir charts/virtkube/crds` and review the diff"
        );
        expected_files.push(file);
    }
    let mut present: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    present.sort();
    expected_files.sort();
    assert_eq!(
        present, expected_files,
        "stale files in charts/virtkube/crds"
    );
}

fn domain(spec: Value) -> Value {
    json!({"apiVersion": "virtkube.io/v1alpha1", "kind": "Domain", "metadata": {"name": "d", "namespace": "default"}, "spec": spec})
}

fn cel_errors(kind: &str, object: &Value, old: Option<&Value>) -> Vec<String> {
    match Validator::new().validate(&schema_of(kind), object, old) {
        Ok(()) => Vec::new(),
        Err(errors) => errors.iter().map(|e| e.message.clone()).collect(),
    }
}

fn assert_cel(kind: &str, object: Value, old: Option<Value>, expected: Option<&str>) {
    let errors = cel_errors(kind, &object, old.as_ref());
    match expected {
        None => assert!(
            errors.is_empty(),
            "expected no CEL error for {object}, got {errors:?}"
        ),
        Some(text) => assert!(
            errors.iter().any(|e| e.contains(text)),
            "expected a CEL error containing `{text}` for {object}, got {errors:?}"
        ),
    }
}

#[test]
fn domain_cel_rules() {
    let memory = json!({"size": "1Gi"});
    let cases: Vec<(Value, Option<&str>)> = vec![
        (
            json!({"memory": memory, "cpu": {"vcpus": 2, "maxVcpus": 4}}),
            None,
        ),
        (
            json!({"memory": memory, "cpu": {"vcpus": 4, "maxVcpus": 2}}),
            Some("maxVcpus must be at least vcpus"),
        ),
        (
            json!({"memory": memory, "cpu": {"vcpus": 2, "maxVcpus": 4, "pinning": [{"vcpu": 3, "cpuset": "1"}]}}),
            None,
        ),
        (
            json!({"memory": memory, "cpu": {"vcpus": 2, "maxVcpus": 4, "pinning": [{"vcpu": 4, "cpuset": "1"}]}}),
            Some("every pinned vcpu index must be below maxVcpus"),
        ),
        (
            json!({"memory": memory, "cpu": {"vcpus": 2, "pinning": [{"vcpu": 2, "cpuset": "1"}]}}),
            Some("every pinned vcpu index must be below maxVcpus"),
        ),
        (
            json!({"memory": memory, "cpu": {"vcpus": 4, "topology": {"sockets": 1, "cores": 2, "threads": 2}}}),
            None,
        ),
        (
            json!({"memory": memory, "cpu": {"vcpus": 4, "topology": {"sockets": 1, "cores": 2, "threads": 1}}}),
            Some("topology sockets x cores x threads"),
        ),
        (
            json!({"memory": memory, "cpu": {"vcpus": 1, "model": "Skylake-Server"}}),
            Some("model needs mode custom"),
        ),
        (
            json!({"memory": memory, "cpu": {"vcpus": 1, "mode": "custom", "model": "Skylake-Server"}}),
            None,
        ),
        (json!({"memory": memory, "runStrategy": "Halted"}), None),
        (
            json!({"memory": memory, "runStrategy": "Halted", "state": "Running"}),
            Some("runStrategy Halted keeps the domain stopped"),
        ),
        (
            json!({"memory": memory, "runStrategy": "Always", "state": "Stopped"}),
            Some("state Stopped needs runStrategy Halted or Manual"),
        ),
        (
            json!({"memory": memory, "runStrategy": "Manual", "state": "Stopped"}),
            None,
        ),
        (
            json!({"memory": memory, "os": {"cmdline": "console=ttyS0"}}),
            Some("initrd and cmdline need kernel"),
        ),
        (
            json!({"memory": memory, "os": {"kernel": "/boot/vmlinuz", "cmdline": "console=ttyS0"}}),
            None,
        ),
        (
            json!({"memory": memory, "disks": [{"name": "root"}]}),
            Some("set exactly one of volume and hostPath"),
        ),
        (
            json!({"memory": memory, "disks": [{"name": "root", "volume": "v", "hostPath": "/x"}]}),
            Some("set exactly one of volume and hostPath"),
        ),
        (
            json!({"memory": memory, "disks": [{"name": "root", "volume": "v"}]}),
            None,
        ),
        (
            json!({"memory": memory, "os": {"boot": ["hd"]}, "disks": [{"name": "root", "volume": "v", "bootOrder": 1}]}),
            Some("os.boot and a disk's bootOrder cannot be combined"),
        ),
        (
            json!({"memory": memory, "os": {"boot": ["hd"]}, "disks": [{"name": "root", "volume": "v"}]}),
            None,
        ),
        (
            json!({"memory": memory, "hostDevices": [{"name": "a", "address": "0000:07:00.0"}, {"name": "b", "address": "0000:08:00.0"}]}),
            None,
        ),
        (
            json!({"memory": memory, "hostDevices": [{"name": "a", "address": "0000:07:00.0"}, {"name": "b", "address": "0000:07:00.0"}]}),
            Some("each host device needs its own address"),
        ),
    ];
    for (spec, expected) in cases {
        assert_cel("Domain", domain(spec), None, expected);
    }
}

fn volume(spec: Value) -> Value {
    json!({"apiVersion": "virtkube.io/v1alpha1", "kind": "Volume", "metadata": {"name": "v", "namespace": "default"}, "spec": spec})
}

#[test]
fn volume_cel_rules_including_transitions() {
    assert_cel(
        "Volume",
        volume(json!({"pool": "p", "capacity": "1Gi"})),
        None,
        None,
    );
    assert_cel(
        "Volume",
        volume(json!({"pool": "p"})),
        None,
        Some("capacity is required unless the volume is a clone"),
    );
    assert_cel(
        "Volume",
        volume(json!({"pool": "p", "source": {"volume": "base"}})),
        None,
        None,
    );
    assert_cel(
        "Volume",
        volume(
            json!({"pool": "p", "capacity": "1Gi", "format": "raw", "source": {"backingVolume": "base"}}),
        ),
        None,
        Some("a backing volume (copy-on-write) needs format qcow2"),
    );
    assert_cel(
        "Volume",
        volume(
            json!({"pool": "p", "capacity": "1Gi", "source": {"volume": "a", "backingVolume": "b"}}),
        ),
        None,
        Some("set exactly one of volume"),
    );
    let old = volume(json!({"pool": "p", "capacity": "1Gi"}));
    assert_cel(
        "Volume",
        volume(json!({"pool": "q", "capacity": "1Gi"})),
        Some(old.clone()),
        Some("pool is immutable"),
    );
    assert_cel(
        "Volume",
        volume(json!({"pool": "p", "capacity": "1Gi", "format": "raw"})),
        Some(old.clone()),
        Some("format is immutable"),
    );
    assert_cel(
        "Volume",
        volume(json!({"pool": "p", "capacity": "2Gi"})),
        Some(old),
        None,
    );
    let pinned = volume(json!({"pool": "p", "capacity": "1Gi", "nodeName": "node-a"}));
    assert_cel(
        "Volume",
        volume(json!({"pool": "p", "capacity": "1Gi", "nodeName": "node-b"})),
        Some(pinned),
        Some("nodeName is immutable"),
    );
    let clone = volume(json!({"pool": "p", "source": {"volume": "a"}}));
    assert_cel(
        "Volume",
        volume(json!({"pool": "p", "source": {"volume": "b"}})),
        Some(clone),
        Some("source is immutable"),
    );
}

#[test]
fn network_and_pool_cel_rules() {
    let network = |spec: Value| json!({"apiVersion": "virtkube.io/v1alpha1", "kind": "Network", "metadata": {"name": "n"}, "spec": spec});
    assert_cel(
        "Network",
        network(json!({"mode": "bridge"})),
        None,
        Some("mode bridge attaches to an existing host bridge"),
    );
    assert_cel(
        "Network",
        network(json!({"mode": "bridge", "bridge": "br0"})),
        None,
        None,
    );
    assert_cel(
        "Network",
        network(json!({"mode": "isolated", "dns": {"hosts": []}})),
        None,
        Some("dns needs ip"),
    );
    assert_cel(
        "Network",
        network(json!({"mode": "nat", "ip": {"address": "10.0.0.1", "prefix": 24, "dhcp": {}}})),
        None,
        Some("dhcp needs ranges or hosts"),
    );
    assert_cel(
        "Network",
        network(
            json!({"mode": "nat", "ip": {"address": "10.0.0.1", "prefix": 24, "dhcp": {"hosts": [{"mac": "52:54:00:00:00:01", "ip": "10.0.0.5"}]}}}),
        ),
        None,
        None,
    );
    assert_cel(
        "Network",
        network(
            json!({"mode": "bridge", "bridge": "br0", "ip": {"address": "10.0.0.1", "prefix": 24}}),
        ),
        None,
        Some("remove ip"),
    );
    assert_cel(
        "Network",
        network(json!({"mode": "nat"})),
        None,
        Some("need ip"),
    );
    assert_cel("Network", network(json!({"mode": "isolated"})), None, None);
    let old = network(json!({"mode": "isolated"}));
    assert_cel(
        "Network",
        network(json!({"mode": "nat", "ip": {"address": "10.0.0.1", "prefix": 24}})),
        Some(old),
        Some("mode is immutable"),
    );
    let pool = |spec: Value| json!({"apiVersion": "virtkube.io/v1alpha1", "kind": "StoragePool", "metadata": {"name": "p"}, "spec": spec});
    assert_cel(
        "StoragePool",
        pool(json!({"type": "dir"})),
        None,
        Some("a dir pool needs target.path"),
    );
    assert_cel(
        "StoragePool",
        pool(json!({"type": "dir", "target": {"path": "/x"}})),
        None,
        None,
    );
    assert_cel(
        "StoragePool",
        pool(json!({"type": "netfs", "target": {"path": "/x"}})),
        None,
        Some("a netfs pool needs source.host and source.dir"),
    );
    assert_cel(
        "StoragePool",
        pool(
            json!({"type": "disk", "source": {"devices": ["/dev/sdb"], "format": "dos", "build": true}}),
        ),
        None,
        None,
    );
    assert_cel(
        "StoragePool",
        pool(json!({"type": "disk", "source": {"devices": ["/dev/sdb", "/dev/sdc"]}})),
        None,
        Some("a disk pool needs exactly one source.devices entry"),
    );
    assert_cel(
        "StoragePool",
        pool(json!({"type": "disk", "source": {"devices": ["/dev/sdb"], "format": "ext4"}})),
        None,
        Some("a disk pool's source.format is its partition table"),
    );
    assert_cel(
        "StoragePool",
        pool(
            json!({"type": "fs", "target": {"path": "/x"}, "source": {"devices": ["/dev/sdb"], "format": "gpt"}}),
        ),
        None,
        Some("gpt and dos are partition tables"),
    );
    let old = pool(json!({"type": "dir", "target": {"path": "/x"}}));
    assert_cel(
        "StoragePool",
        pool(json!({"type": "logical", "target": {"path": "/x"}})),
        Some(old),
        Some("type is immutable"),
    );
}
