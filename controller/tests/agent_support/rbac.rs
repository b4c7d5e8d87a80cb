//! A role's RBAC against what its process really asks the API server: the chart's rules as
//! Helm renders them, enforced by the in-memory API server, and compared with every
//! authorization check the process caused.
//!
//! The rules are written once, in `charts/virtkube/rbac/ROLE.yaml`; `templates/rbac.yaml`
//! renders them into a ClusterRole (and a Role for namespaced rules) bound to the role's
//! ServiceAccount. The rendered objects are read from the chart's snapshot
//! (`charts/virtkube/ci/snapshots/default.yaml`), which `scripts/check-chart` keeps equal to
//! what the real `helm template` renders, so the server enforces exactly what a cluster would.
//!
//! One call checks a role once its process has run its scenarios against a server started
//! with [`enforcing`]:
//!
//! ```ignore
//! let report = rbac::check_role(&api, Role::Agent);
//! report.assert_exact();
//! ```

#![allow(dead_code)]

use std::collections::BTreeSet;

use serde_json::Value;
use virtkube_testapi::{ADMIN, Authorizer, RequestInfo, TestApi};

/// (API group, resource or resource/subresource, verb), as RBAC rules name them.
pub type Grant = (String, String, String);

/// A role of the chart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// `virtkube agent`.
    Agent,
    /// `virtkube controller`.
    Controller,
}

impl Role {
    /// The chart's component name (`rbac/NAME.yaml`, `app.kubernetes.io/component`).
    pub fn component(self) -> &'static str {
        match self {
            Role::Agent => "agent",
            Role::Controller => "controller",
        }
    }

    /// The identity the role's ServiceAccount authenticates as in the rendered chart
    /// (release `virtkube` in namespace `virtkube-system`).
    pub fn identity(self) -> String {
        format!(
            "system:serviceaccount:virtkube-system:virtkube-{}",
            self.component()
        )
    }
}

fn chart_path(relative: &str) -> String {
    format!(
        "{}/../charts/virtkube/{relative}",
        env!("CARGO_MANIFEST_DIR")
    )
}

/// The RBAC objects of the chart as Helm renders them with the default values (ClusterRoles,
/// Roles and their bindings, every role's), as YAML documents.
pub fn rendered_rbac() -> Vec<Value> {
    let path = chart_path("ci/snapshots/default.yaml");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let docs: Vec<Value> = serde_saphyr::from_str_multiple(&text).unwrap();
    docs.into_iter()
        .filter(|d| {
            matches!(
                d["kind"].as_str(),
                Some("ClusterRole" | "ClusterRoleBinding" | "Role" | "RoleBinding")
            )
        })
        .collect()
}

/// An authorizer enforcing the chart's rendered RBAC (`admin` may do everything: the test
/// acts as user and, where needed, as the other role).
pub fn enforcing() -> Authorizer {
    let mut authorizer = Authorizer::new(&[ADMIN]);
    let text: Vec<String> = rendered_rbac()
        .iter()
        .map(|d| serde_json::to_string(d).unwrap())
        .collect();
    let users = authorizer.load_yaml(&text).unwrap();
    for role in [Role::Agent, Role::Controller] {
        assert_rendered_as_written(role);
        assert!(
            users.contains(&role.identity()),
            "the rendered chart binds no role to {} (bound: {users:?})",
            role.identity()
        );
    }
    authorizer
}

fn rules_grants(rules: &Value, what: &str) -> BTreeSet<Grant> {
    let mut grants = BTreeSet::new();
    for rule in rules.as_array().into_iter().flatten() {
        let list = |key: &str| -> Vec<String> {
            rule[key]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        };
        assert!(
            list("resourceNames").is_empty(),
            "{what}: resourceNames are not compared here"
        );
        for group in list("apiGroups") {
            for resource in list("resources") {
                for verb in list("verbs") {
                    assert!(
                        ![&group, &resource, &verb].iter().any(|s| s.as_str() == "*"),
                        "{what}: wildcard in {group}/{resource}/{verb}"
                    );
                    grants.insert((group.clone(), resource.clone(), verb));
                }
            }
        }
    }
    grants
}

/// What `charts/virtkube/rbac/ROLE.yaml` grants (cluster and namespaced rules together).
pub fn role_file_grants(role: Role) -> BTreeSet<Grant> {
    let path = chart_path(&format!("rbac/{}.yaml", role.component()));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let file: Value = serde_saphyr::from_str(&text).unwrap();
    let mut grants = rules_grants(&file["clusterRules"], &path);
    grants.extend(rules_grants(&file["namespaceRules"], &path));
    grants
}

/// What the rendered chart grants `role` (its ClusterRole and Role).
pub fn rendered_grants(role: Role) -> BTreeSet<Grant> {
    let mut grants = BTreeSet::new();
    for doc in rendered_rbac() {
        let kind = doc["kind"].as_str().unwrap_or_default();
        let component = doc["metadata"]["labels"]["app.kubernetes.io/component"].as_str();
        if (kind == "ClusterRole" || kind == "Role") && component == Some(role.component()) {
            grants.extend(rules_grants(&doc["rules"], kind));
        }
    }
    grants
}

/// Every authorization check `identity` caused (each request, and the `create` an apply
/// that created its object needs), as grants.
pub fn used_grants(api: &TestApi, identity: &str) -> BTreeSet<Grant> {
    api.authorizations()
        .into_iter()
        .filter(|r| r.identity == identity)
        .map(|r| {
            let resource = if r.subresource.is_empty() {
                r.resource.clone()
            } else {
                format!("{}/{}", r.resource, r.subresource)
            };
            (r.group, resource, r.verb)
        })
        .collect()
}

/// How a role's rules compare with what its process asked.
#[derive(Debug)]
pub struct RoleCheck {
    /// The role.
    pub role: Role,
    /// What `rbac/ROLE.yaml` grants.
    pub granted: BTreeSet<Grant>,
    /// What the process asked for.
    pub used: BTreeSet<Grant>,
    /// Checks the server refused (403), as `verb group/resource[/sub] ns/name`.
    pub refused: Vec<String>,
    /// Used, not granted (the process needs a verb the chart lacks).
    pub missing: BTreeSet<Grant>,
    /// Granted, never used (the chart grants a verb the process does not need).
    pub extra: BTreeSet<Grant>,
}

fn show(set: &BTreeSet<Grant>) -> String {
    set.iter()
        .map(|(g, r, v)| {
            let g = if g.is_empty() { "core" } else { g.as_str() };
            format!("  {g:<16} {r:<28} {v}")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

impl RoleCheck {
    /// Fails, saying what differs, unless nothing was refused and the rules grant exactly
    /// what was used.
    pub fn assert_exact(&self) {
        let role = self.role.component();
        assert!(
            self.refused.is_empty(),
            "the API server refused the {role}'s requests under the chart's RBAC:\n  {}",
            self.refused.join("\n  ")
        );
        assert!(
            self.missing.is_empty(),
            "the {role} uses what charts/virtkube/rbac/{role}.yaml does not grant:\n{}",
            show(&self.missing)
        );
        assert!(
            self.extra.is_empty(),
            "charts/virtkube/rbac/{role}.yaml grants what the {role} never used:\n{}",
            show(&self.extra)
        );
    }
}

/// Fails unless the rendered chart grants `role` exactly what `rbac/ROLE.yaml` says (the
/// snapshot is stale otherwise).
pub fn assert_rendered_as_written(role: Role) {
    assert_eq!(
        rendered_grants(role),
        role_file_grants(role),
        "the rendered chart (ci/snapshots/default.yaml) does not grant the {} what rbac/{}.yaml says: run scripts/check-chart --update",
        role.component(),
        role.component()
    );
}

/// Compares `role`'s rules with every authorization check its identity caused on `api` (a
/// server started with [`enforcing`]); prints both sets.
pub fn check_role(api: &TestApi, role: Role) -> RoleCheck {
    assert_rendered_as_written(role);
    let granted = role_file_grants(role);
    let identity = role.identity();
    let used = used_grants(api, &identity);
    let authorizer = enforcing();
    let refused: Vec<String> = api
        .authorizations()
        .into_iter()
        .filter(|r| r.identity == identity)
        .filter_map(|r| {
            let info = RequestInfo {
                is_resource: true,
                verb: r.verb.clone(),
                group: r.group.clone(),
                resource: r.resource.clone(),
                subresource: r.subresource.clone(),
                namespace: r.namespace.clone(),
                name: r.name.clone(),
                identity: identity.clone(),
                ..RequestInfo::default()
            };
            authorizer.check(&info).map(|_| {
                format!(
                    "{} {}/{}{} {}/{}",
                    r.verb,
                    r.group,
                    r.resource,
                    if r.subresource.is_empty() {
                        String::new()
                    } else {
                        format!("/{}", r.subresource)
                    },
                    r.namespace,
                    r.name
                )
            })
        })
        .collect();
    let missing: BTreeSet<Grant> = used.difference(&granted).cloned().collect();
    let extra: BTreeSet<Grant> = granted.difference(&used).cloned().collect();
    println!(
        "{} role: granted by charts/virtkube/rbac/{}.yaml ({}):\n{}",
        role.component(),
        role.component(),
        granted.len(),
        show(&granted)
    );
    println!(
        "{} role: used by the process as {identity} ({}):\n{}",
        role.component(),
        used.len(),
        show(&used)
    );
    RoleCheck {
        role,
        granted,
        used,
        refused,
        missing,
        extra,
    }
}

/// The agent's node policy (a ValidatingAdmissionPolicy and its binding) as Helm renders it
/// for a Kubernetes 1.30+ cluster (`charts/virtkube/ci/snapshots/node-policy.yaml`, kept
/// equal to `helm template` by `scripts/check-chart`), ready for the in-memory API server.
pub fn node_policy() -> std::sync::Arc<virtkube_testapi::admission::Policies> {
    let path = chart_path("ci/snapshots/node-policy.yaml");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let docs: Vec<Value> = serde_saphyr::from_str_multiple(&text).unwrap();
    let policies = virtkube_testapi::admission::Policies::from_documents(&docs)
        .unwrap_or_else(|e| panic!("{path}: {e}"));
    assert_eq!(
        policies.names(),
        vec!["virtkube-agent-node".to_string()],
        "{path} renders one bound policy"
    );
    std::sync::Arc::new(policies)
}
