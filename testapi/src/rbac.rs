//! Authorization by RBAC rules: Roles and ClusterRoles with their bindings, read from the
//! same YAML a Helm chart renders, matched as `plugin/pkg/auth/authorizer/rbac`
//! (`rbac.go`, `validation/policy_comparator`) matches them: verbs, API groups, resources
//! (`*`, `res/sub`, `*/sub`), resource names; a RoleBinding grants only in its namespace.
//! A refusal is worded as the API server words it.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::request::RequestInfo;

/// One rule.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PolicyRule {
    /// `verbs`.
    pub verbs: Vec<String>,
    /// `apiGroups`.
    pub api_groups: Vec<String>,
    /// `resources`.
    pub resources: Vec<String>,
    /// `resourceNames`.
    pub resource_names: Vec<String>,
}

impl PolicyRule {
    fn from_json(v: &Value) -> Self {
        let list = |k: &str| -> Vec<String> {
            v.get(k)
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(|s| s.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default()
        };
        PolicyRule {
            verbs: list("verbs"),
            api_groups: list("apiGroups"),
            resources: list("resources"),
            resource_names: list("resourceNames"),
        }
    }

    /// Whether this rule allows the request.
    pub fn allows(&self, info: &RequestInfo) -> bool {
        let has = |list: &[String], v: &str| list.iter().any(|x| x == "*" || x == v);
        if !has(&self.verbs, &info.verb) || !has(&self.api_groups, &info.group) {
            return false;
        }
        let combined = if info.subresource.is_empty() {
            info.resource.clone()
        } else {
            format!("{}/{}", info.resource, info.subresource)
        };
        let resource_ok = self.resources.iter().any(|r| {
            r == "*"
                || *r == combined
                || (!info.subresource.is_empty() && *r == format!("*/{}", info.subresource))
        });
        resource_ok && (self.resource_names.is_empty() || self.resource_names.contains(&info.name))
    }
}

/// Rules granted to one user, each limited to a namespace or (`None`) cluster-wide.
type Grants = Vec<(Option<String>, Vec<PolicyRule>)>;

/// Who may do what.
#[derive(Debug, Clone, Default)]
pub struct Authorizer {
    /// Per user: (namespace the grant is limited to, or `None` for cluster-wide; rules).
    grants: BTreeMap<String, Grants>,
    /// Users allowed everything (`system:masters`).
    admins: Vec<String>,
}

/// Why RBAC YAML could not be read.
#[derive(Debug, thiserror::Error)]
pub enum RbacError {
    /// Not YAML.
    #[error("the RBAC file is not valid YAML: {0}")]
    Yaml(String),
    /// A binding names a role the file does not define.
    #[error("{binding} refers to {kind} {name}, which the RBAC files do not define")]
    MissingRole {
        /// The binding.
        binding: String,
        /// Role or ClusterRole.
        kind: String,
        /// Its name.
        name: String,
    },
}

/// The user a binding subject is: `User` by name, `ServiceAccount` as
/// `system:serviceaccount:NS:NAME`.
fn subject_user(subject: &Value, binding_namespace: &str) -> Option<String> {
    let name = subject.get("name")?.as_str()?;
    match subject.get("kind")?.as_str()? {
        "User" => Some(name.to_string()),
        "ServiceAccount" => {
            let ns = subject
                .get("namespace")
                .and_then(Value::as_str)
                .unwrap_or(binding_namespace);
            Some(format!("system:serviceaccount:{ns}:{name}"))
        }
        _ => None,
    }
}

impl Authorizer {
    /// An authorizer where `admins` may do everything and nobody else anything.
    pub fn new(admins: &[&str]) -> Self {
        Authorizer {
            grants: BTreeMap::new(),
            admins: admins.iter().map(|s| s.to_string()).collect(),
        }
    }

    /// Grants `rules` to `user`, cluster-wide or in one namespace.
    pub fn grant(&mut self, user: &str, namespace: Option<&str>, rules: Vec<PolicyRule>) {
        self.grants
            .entry(user.to_string())
            .or_default()
            .push((namespace.map(str::to_string), rules));
    }

    /// Reads Roles, ClusterRoles and their bindings from multi-document YAML texts and grants
    /// what the bindings say. Returns the users that received grants.
    pub fn load_yaml(&mut self, texts: &[String]) -> Result<Vec<String>, RbacError> {
        let mut docs: Vec<Value> = Vec::new();
        for text in texts {
            let parsed: Vec<Value> = serde_saphyr::from_str_multiple(text)
                .map_err(|e| RbacError::Yaml(e.to_string()))?;
            docs.extend(parsed.into_iter().filter(|d| d.is_object()));
        }
        let mut roles: BTreeMap<(String, String, String), Vec<PolicyRule>> = BTreeMap::new();
        for d in &docs {
            let kind = d["kind"].as_str().unwrap_or_default();
            if kind == "Role" || kind == "ClusterRole" {
                let ns = d["metadata"]["namespace"].as_str().unwrap_or_default();
                let name = d["metadata"]["name"].as_str().unwrap_or_default();
                let rules = d["rules"]
                    .as_array()
                    .map(|r| r.iter().map(PolicyRule::from_json).collect())
                    .unwrap_or_default();
                let ns = if kind == "ClusterRole" { "" } else { ns };
                roles.insert((kind.to_string(), ns.to_string(), name.to_string()), rules);
            }
        }
        let mut users = Vec::new();
        for d in &docs {
            let kind = d["kind"].as_str().unwrap_or_default();
            if kind != "RoleBinding" && kind != "ClusterRoleBinding" {
                continue;
            }
            let ns = d["metadata"]["namespace"].as_str().unwrap_or("default");
            let role_kind = d["roleRef"]["kind"].as_str().unwrap_or_default();
            let role_name = d["roleRef"]["name"].as_str().unwrap_or_default();
            let role_ns = if role_kind == "ClusterRole" { "" } else { ns };
            let rules = roles
                .get(&(
                    role_kind.to_string(),
                    role_ns.to_string(),
                    role_name.to_string(),
                ))
                .cloned()
                .ok_or_else(|| RbacError::MissingRole {
                    binding: format!(
                        "{kind} {}",
                        d["metadata"]["name"].as_str().unwrap_or_default()
                    ),
                    kind: role_kind.to_string(),
                    name: role_name.to_string(),
                })?;
            let scope = (kind == "RoleBinding").then_some(ns);
            for subject in d["subjects"].as_array().into_iter().flatten() {
                if let Some(user) = subject_user(subject, ns) {
                    self.grant(&user, scope, rules.clone());
                    if !users.contains(&user) {
                        users.push(user);
                    }
                }
            }
        }
        Ok(users)
    }

    /// `None` when allowed; otherwise the reason sentence of the 403.
    pub fn check(&self, info: &RequestInfo) -> Option<String> {
        if !info.is_resource || self.admins.contains(&info.identity) {
            // Discovery and health paths: `system:discovery` is bound to every
            // authenticated user.
            return None;
        }
        let allowed = self.grants.get(&info.identity).is_some_and(|grants| {
            grants.iter().any(|(ns, rules)| {
                ns.as_ref().is_none_or(|n| *n == info.namespace)
                    && rules.iter().any(|r| r.allows(info))
            })
        });
        if allowed {
            return None;
        }
        let resource = if info.subresource.is_empty() {
            info.resource.clone()
        } else {
            format!("{}/{}", info.resource, info.subresource)
        };
        let place = if info.namespace.is_empty() {
            "at the cluster scope".to_string()
        } else {
            format!("in the namespace \"{}\"", info.namespace)
        };
        Some(format!(
            "User \"{}\" cannot {} resource \"{resource}\" in API group \"{}\" {place}",
            info.identity, info.verb, info.group
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::parse;

    const YAML: &str = r#"
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: agent}
rules:
  - apiGroups: ["virtkube.io"]
    resources: ["domains", "domains/status"]
    verbs: ["get", "list", "watch", "patch"]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: agent}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: agent}
subjects:
  - {kind: ServiceAccount, name: virtkube, namespace: virtkube-system}
"#;

    #[test]
    fn chart_style_rbac_allows_exactly_its_rules() {
        let mut a = Authorizer::new(&["admin"]);
        let users = a.load_yaml(&[YAML.to_string()]).unwrap();
        let sa = "system:serviceaccount:virtkube-system:virtkube";
        assert_eq!(users, vec![sa.to_string()]);
        let ok = parse(
            "PATCH",
            "/apis/virtkube.io/v1alpha1/namespaces/n/domains/d/status",
            "",
            sa,
        );
        assert_eq!(a.check(&ok), None);
        let denied = parse(
            "DELETE",
            "/apis/virtkube.io/v1alpha1/namespaces/n/domains/d",
            "",
            sa,
        );
        assert_eq!(
            a.check(&denied).unwrap(),
            format!(
                "User \"{sa}\" cannot delete resource \"domains\" in API group \"virtkube.io\" in the namespace \"n\""
            )
        );
        let cluster = parse("GET", "/apis/virtkube.io/v1alpha1/networks", "", sa);
        assert!(a.check(&cluster).unwrap().ends_with("at the cluster scope"));
        assert_eq!(
            a.check(&parse("DELETE", "/api/v1/nodes/x", "", "admin")),
            None
        );
    }
}
