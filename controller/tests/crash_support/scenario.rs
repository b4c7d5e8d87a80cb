//! One run's mixed set of objects and what the user does to them, drawn from a seed: a
//! pool, volumes (a base image, a full clone and a copy-on-write overlay of it, an empty
//! one; each `Retain` or `Delete`), a network, domains (power states, autostart, vCPU pins,
//! disks on those volumes, a NIC), then phases of creates, spec updates, moves between nodes
//! and deletes.

use serde_json::{Value, json};
use virtkube_testapi::TestApi;

use super::check::Names;
use super::rng::Rng;

/// What the user does, one API call each.
#[derive(Debug, Clone)]
pub enum Edit {
    /// Creates the object (`kubectl create`).
    Create {
        /// The plural (`domains`, …).
        resource: &'static str,
        /// The whole object.
        body: Value,
    },
    /// Merges `patch` into the spec (`kubectl edit`).
    Update {
        /// The plural.
        resource: &'static str,
        /// Namespace (empty for cluster-scoped kinds).
        namespace: String,
        /// Name.
        name: String,
        /// Fields merged into `spec` (`null` removes one).
        patch: Value,
    },
    /// Deletes the object (`kubectl delete --wait=false`).
    Delete {
        /// The plural.
        resource: &'static str,
        /// Namespace (empty for cluster-scoped kinds).
        namespace: String,
        /// Name.
        name: String,
    },
}

impl Edit {
    /// Sends it; a refusal (an object already gone) is returned as text.
    pub fn apply(&self, api: &TestApi) -> Result<(), String> {
        match self {
            Edit::Create { resource, body } => api.create(resource, body.clone()).map(|_| ()),
            Edit::Update {
                resource,
                namespace,
                name,
                patch,
            } => api
                .edit_spec(resource, namespace, name, |spec| merge(spec, patch))
                .map(|_| ()),
            Edit::Delete {
                resource,
                namespace,
                name,
            } => api.delete(resource, namespace, name).map(|_| ()),
        }
        .map_err(|e| e.to_string())
    }

    /// `create domains web` and the like, for the report.
    pub fn label(&self) -> String {
        match self {
            Edit::Create { resource, body } => {
                format!(
                    "create {resource} {}",
                    body["metadata"]["name"].as_str().unwrap_or("?")
                )
            }
            Edit::Update {
                resource,
                name,
                patch,
                ..
            } => format!("update {resource} {name} {patch}"),
            Edit::Delete { resource, name, .. } => format!("delete {resource} {name}"),
        }
    }
}

/// Merges `patch` into `into` (`null` removes a field), as a merge patch does.
pub fn merge(into: &mut Value, patch: &Value) {
    match (into, patch) {
        (Value::Object(into), Value::Object(patch)) => {
            for (k, v) in patch {
                if v.is_null() {
                    into.remove(k);
                } else {
                    merge(into.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        (into, patch) => *into = patch.clone(),
    }
}

/// A named group of edits: the campaign kills instances while a phase converges.
#[derive(Debug, Clone)]
pub struct Phase {
    /// `create`, `update`, `delete`, …
    pub name: &'static str,
    /// What the user does at the phase's start.
    pub edits: Vec<Edit>,
}

/// How the generator draws.
#[derive(Debug, Clone)]
pub struct Options {
    /// The nodes (the first is where objects start).
    pub nodes: Vec<String>,
    /// The pool's target directory (a subdirectory per run is made under it).
    pub pool_root: String,
    /// Domains that move between nodes (running ones live-migrate: real daemons only).
    pub moves: bool,
    /// Running guests may be moved (live migration).
    pub live_moves: bool,
    /// Host CPUs to pin to (`0..cpus`).
    pub cpus: u32,
    /// A subnet for the run's network: `10.{subnet}.{run % 250}.1/24`.
    pub subnet: u8,
}

/// One run: its names and phases.
#[derive(Debug, Clone)]
pub struct Scenario {
    /// Names.
    pub names: Names,
    /// Phases, in order; the last deletes everything.
    pub phases: Vec<Phase>,
}

#[derive(Debug, Clone)]
struct Dom {
    name: String,
    node: String,
    power: usize,
    autostart: bool,
    vcpus: u32,
    pin: Option<u32>,
    disk: Option<String>,
    nic: bool,
}

/// The power choices: (runStrategy, state).
const POWERS: [(&str, Option<&str>); 4] = [
    ("Always", None),
    ("Manual", Some("Running")),
    ("Manual", Some("Paused")),
    ("Halted", None),
];

impl Dom {
    fn running(&self) -> bool {
        POWERS[self.power].0 != "Halted"
    }

    fn spec(&self, names: &Names) -> Value {
        let (strategy, state) = POWERS[self.power];
        let mut spec = json!({
            "nodeName": self.node,
            "runStrategy": strategy,
            "autostart": self.autostart,
            "cpu": {"vcpus": self.vcpus, "maxVcpus": 2},
            "memory": {"size": "64Mi"},
        });
        if let Some(state) = state {
            spec["state"] = json!(state);
        }
        if let Some(cpu) = self.pin {
            spec["cpu"]["pinning"] = json!([{"vcpu": 0, "cpuset": cpu.to_string()}]);
        }
        if let Some(disk) = &self.disk {
            spec["disks"] = json!([{"name": "root", "volume": disk}]);
        }
        if self.nic {
            spec["interfaces"] = json!([{"name": "nic0", "network": names.network}]);
        }
        spec
    }
}

/// Draws run `run`'s scenario.
pub fn generate(rng: &mut Rng, run: u64, options: &Options) -> Scenario {
    let names = Names {
        ns: format!("crash-r{run}"),
        pool: format!("crash-r{run}"),
        network: format!("crash-r{run}-net"),
    };
    let home = options.nodes[0].clone();
    let policy = |rng: &mut Rng| if rng.chance(50) { "Retain" } else { "Delete" };
    // Volumes: a base, and maybe a clone, an overlay and an empty one.
    let mut volumes: Vec<(String, Value)> = vec![(
        "base".into(),
        json!({"pool": names.pool, "capacity": "64Mi", "format": "qcow2", "reclaimPolicy": policy(rng), "nodeName": home}),
    )];
    if rng.chance(70) {
        volumes.push((
            "clone".into(),
            json!({"pool": names.pool, "capacity": "64Mi", "format": "qcow2", "source": {"volume": "base"}, "reclaimPolicy": policy(rng), "nodeName": home}),
        ));
    }
    if rng.chance(70) {
        volumes.push((
            "overlay".into(),
            json!({"pool": names.pool, "capacity": "64Mi", "format": "qcow2", "source": {"backingVolume": "base"}, "reclaimPolicy": policy(rng), "nodeName": home}),
        ));
    }
    if rng.chance(50) {
        volumes.push((
            "data".into(),
            json!({"pool": names.pool, "capacity": "16Mi", "format": "raw", "reclaimPolicy": policy(rng), "nodeName": home}),
        ));
    }
    // Domains: each disk volume is used by one domain at most; base only through its copies.
    let mut free: Vec<String> = volumes
        .iter()
        .map(|(n, _)| n.clone())
        .filter(|n| n != "base")
        .collect();
    let count = 1 + rng.below(3);
    let mut doms = Vec::new();
    for i in 0..count {
        let mover = options.moves && rng.chance(50);
        let disk = if !mover && !free.is_empty() && rng.chance(75) {
            Some(free.remove(rng.below(free.len() as u64) as usize))
        } else {
            None
        };
        doms.push(Dom {
            name: format!("vm{i}"),
            node: home.clone(),
            power: rng.below(POWERS.len() as u64) as usize,
            autostart: rng.chance(50),
            vcpus: 1 + rng.below(2) as u32,
            pin: rng
                .chance(60)
                .then(|| rng.below(u64::from(options.cpus)) as u32),
            disk,
            nic: !mover && rng.chance(60),
        });
    }
    let mut create = vec![
        Edit::Create {
            resource: "storagepools",
            body: json!({"apiVersion": "virtkube.io/v1alpha1", "kind": "StoragePool",
                "metadata": {"name": names.pool},
                "spec": {"type": "dir", "target": {"path": format!("{}/{}", options.pool_root, names.pool)}, "autostart": true}}),
        },
        Edit::Create {
            resource: "networks",
            body: json!({"apiVersion": "virtkube.io/v1alpha1", "kind": "Network",
                "metadata": {"name": names.network},
                "spec": {"mode": "isolated", "autostart": rng.chance(50),
                         "ip": {"address": format!("10.{}.{}.1", options.subnet, run % 250), "prefix": 24}}}),
        },
    ];
    for (name, spec) in &volumes {
        create.push(Edit::Create {
            resource: "volumes",
            body: json!({"apiVersion": "virtkube.io/v1alpha1", "kind": "Volume",
                "metadata": {"name": name, "namespace": names.ns}, "spec": spec}),
        });
    }
    for d in &doms {
        create.push(Edit::Create {
            resource: "domains",
            body: json!({"apiVersion": "virtkube.io/v1alpha1", "kind": "Domain",
                "metadata": {"name": d.name, "namespace": names.ns}, "spec": d.spec(&names)}),
        });
    }
    // The user's order is arbitrary: dependents may come first.
    shuffle(rng, &mut create);

    let mut update = Vec::new();
    for d in &mut doms {
        let mut patch = serde_json::Map::new();
        if rng.chance(50) {
            // A stopped domain turned Manual stays stopped while its status says it
            // converges (reported apart: not a crash matter), so Halted goes to Always only.
            let choices: &[usize] = if POWERS[d.power].0 == "Halted" {
                &[0, 3]
            } else {
                &[0, 1, 2, 3]
            };
            let next = *rng.pick(choices);
            d.power = next;
            let (strategy, state) = POWERS[next];
            patch.insert("runStrategy".into(), json!(strategy));
            patch.insert("state".into(), state.map_or(Value::Null, |s| json!(s)));
        }
        if rng.chance(40) {
            d.autostart = !d.autostart;
            patch.insert("autostart".into(), json!(d.autostart));
        }
        if rng.chance(40) {
            d.vcpus = 3 - d.vcpus;
            let mut cpu = json!({"vcpus": d.vcpus});
            if rng.chance(50) {
                d.pin = rng
                    .chance(70)
                    .then(|| rng.below(u64::from(options.cpus)) as u32);
                cpu["pinning"] = match d.pin {
                    Some(c) => json!([{"vcpu": 0, "cpuset": c.to_string()}]),
                    None => Value::Null,
                };
            }
            patch.insert("cpu".into(), cpu);
        }
        let movable = d.disk.is_none() && !d.nic && (options.live_moves || !d.running());
        if options.moves && movable && options.nodes.len() > 1 && rng.chance(60) {
            let others: Vec<&String> = options.nodes.iter().filter(|n| **n != d.node).collect();
            d.node = (*rng.pick(&others)).clone();
            patch.insert("nodeName".into(), json!(d.node));
        }
        if !patch.is_empty() {
            update.push(Edit::Update {
                resource: "domains",
                namespace: names.ns.clone(),
                name: d.name.clone(),
                patch: Value::Object(patch),
            });
        }
    }
    if rng.chance(40) {
        update.push(Edit::Update {
            resource: "networks",
            namespace: String::new(),
            name: names.network.clone(),
            patch: json!({"autostart": rng.chance(50)}),
        });
    }
    shuffle(rng, &mut update);

    let mut some = Vec::new();
    let mut gone: Vec<(&'static str, String)> = Vec::new();
    for d in &doms {
        if rng.chance(40) {
            gone.push(("domains", d.name.clone()));
        }
    }
    for (name, _) in &volumes {
        if rng.chance(35) {
            gone.push(("volumes", name.clone()));
        }
    }
    if rng.chance(25) {
        gone.push(("networks", names.network.clone()));
    }
    for (resource, name) in &gone {
        some.push(delete(resource, &names, name));
    }
    shuffle(rng, &mut some);

    let mut all = Vec::new();
    for d in &doms {
        if !gone.contains(&("domains", d.name.clone())) {
            all.push(delete("domains", &names, &d.name));
        }
    }
    for (name, _) in &volumes {
        if !gone.contains(&("volumes", name.clone())) {
            all.push(delete("volumes", &names, name));
        }
    }
    if !gone.contains(&("networks", names.network.clone())) {
        all.push(delete("networks", &names, &names.network));
    }
    all.push(delete("storagepools", &names, &names.pool));
    shuffle(rng, &mut all);

    Scenario {
        names,
        phases: vec![
            Phase {
                name: "create",
                edits: create,
            },
            Phase {
                name: "update",
                edits: update,
            },
            Phase {
                name: "delete some",
                edits: some,
            },
            Phase {
                name: "delete all",
                edits: all,
            },
        ],
    }
}

fn delete(resource: &'static str, names: &Names, name: &str) -> Edit {
    let namespaced = matches!(resource, "domains" | "volumes");
    Edit::Delete {
        resource,
        namespace: if namespaced {
            names.ns.clone()
        } else {
            String::new()
        },
        name: name.to_string(),
    }
}

fn shuffle<T>(rng: &mut Rng, items: &mut [T]) {
    for i in (1..items.len()).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        items.swap(i, j);
    }
}
