//! ValidatingAdmissionPolicies (`admissionregistration.k8s.io/v1`, Kubernetes 1.30+), as the
//! real server's admission plugin evaluates them for writes (create, update, patch, apply; the
//! main resource and its subresources):
//!
//! - a policy acts only through a binding (`ValidatingAdmissionPolicyBinding` naming it in
//!   `policyName`) whose `validationActions` include `Deny`; a policy without one does
//!   nothing;
//! - `matchConstraints.resourceRules` select by API group, version, operation and resource
//!   (`domains/status` for the status subresource, `*` for any);
//! - every `matchConditions` expression must be true for the policy to apply;
//! - `variables` are evaluated in order, each seeing the ones before as `variables.NAME`;
//! - each `validations[].expression` must be true; a false one denies the request with its
//!   `message` (else `failed expression: EXPR`);
//! - an expression that fails to evaluate denies the request (`failurePolicy: Fail`, the
//!   default), and is skipped with `Ignore`.
//!
//! The expressions see `object` (the object as it would be stored; null for a deletion),
//! `oldObject` (null for a creation) and `request` (`operation`, `userInfo.username` and
//! `.extra`, `resource.{group,version,resource}`, `subResource`, `name`, `namespace`). A
//! denial is the real server's 403: `<resource> "<name>" is forbidden:
//! ValidatingAdmissionPolicy '<policy>' with binding '<binding>' denied request: <message>`.
//! Not modelled: `paramKind`/params, `namespaceSelector`/`objectSelector`, `auditAnnotations`,
//! `messageExpression`, `Warn`/`Audit` actions (only `Deny` acts), type checking at creation.

use std::collections::BTreeMap;

use serde_json::{Value, json};

/// Why policies could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// Not YAML documents.
    #[error("the admission policies are not YAML: {0}")]
    Yaml(String),
    /// A policy or binding lacks a field the server requires.
    #[error("{kind} {name:?}: {what}")]
    Invalid {
        /// The object's kind.
        kind: String,
        /// Its name.
        name: String,
        /// What is wrong.
        what: String,
    },
    /// A CEL expression does not compile (the real server refuses such a policy).
    #[error("policy {policy:?}: expression {expression:?} does not compile: {message}")]
    Compile {
        /// The policy.
        policy: String,
        /// The expression.
        expression: String,
        /// The parser's message.
        message: String,
    },
}

/// The user a request is authenticated as.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UserInfo {
    /// `userInfo.username`.
    pub username: String,
    /// `userInfo.extra` (e.g. `authentication.kubernetes.io/node-name` of a service account
    /// token bound to a pod on a node).
    pub extra: BTreeMap<String, Vec<String>>,
}

impl UserInfo {
    /// The user a bearer token names. The server's whole notion of authentication: the token
    /// is the username, optionally followed by `|KEY=VALUE` extras, e.g.
    /// `system:serviceaccount:ns:sa|authentication.kubernetes.io/node-name=node-a`.
    pub fn from_token(token: &str) -> UserInfo {
        let mut parts = token.split('|');
        let username = parts.next().unwrap_or_default().to_string();
        let mut extra: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for part in parts {
            if let Some((key, value)) = part.split_once('=') {
                extra
                    .entry(key.to_string())
                    .or_default()
                    .push(value.to_string());
            }
        }
        UserInfo { username, extra }
    }
}

/// The token of `username` with a service account token's node binding (what the real
/// server puts in `userInfo.extra` for a pod's token from Kubernetes 1.30 on).
pub fn token_on_node(username: &str, node: &str) -> String {
    format!("{username}|{NODE_NAME_EXTRA}={node}")
}

/// The `userInfo.extra` key of the node a service account token's pod runs on.
pub const NODE_NAME_EXTRA: &str = "authentication.kubernetes.io/node-name";

/// One write to be admitted.
#[derive(Debug, Clone)]
pub struct Attributes<'a> {
    /// `CREATE`, `UPDATE` or `DELETE`.
    pub operation: &'static str,
    /// API group.
    pub group: &'a str,
    /// API version.
    pub version: &'a str,
    /// Resource (plural).
    pub resource: &'a str,
    /// Subresource ("" for the main resource).
    pub subresource: &'a str,
    /// Namespace ("" for cluster-scoped).
    pub namespace: &'a str,
    /// Object name.
    pub name: &'a str,
    /// Who asks.
    pub user: &'a UserInfo,
    /// The object as it would be stored (`None` for a deletion).
    pub object: Option<&'a Value>,
    /// The stored object (`None` for a creation).
    pub old_object: Option<&'a Value>,
}

struct Expression {
    source: String,
    program: cel::Program,
}

struct Validation {
    expression: Expression,
    message: Option<String>,
}

struct Rule {
    groups: Vec<String>,
    versions: Vec<String>,
    operations: Vec<String>,
    resources: Vec<String>,
}

impl Rule {
    fn matches(&self, a: &Attributes) -> bool {
        let any = |list: &[String], value: &str| list.iter().any(|v| v == "*" || v == value);
        let resource = if a.subresource.is_empty() {
            a.resource.to_string()
        } else {
            format!("{}/{}", a.resource, a.subresource)
        };
        let resource_matches = self.resources.iter().any(|r| {
            r == "*"
                || *r == resource
                || (a.subresource.is_empty() && r == "*/*")
                || r.strip_suffix("/*")
                    .is_some_and(|base| base == a.resource && !a.subresource.is_empty())
                || r.strip_prefix("*/")
                    .is_some_and(|sub| sub == a.subresource && !a.subresource.is_empty())
        });
        any(&self.groups, a.group)
            && any(&self.versions, a.version)
            && self.operations.iter().any(|o| o == "*" || o == a.operation)
            && resource_matches
    }
}

struct Policy {
    name: String,
    binding: String,
    ignore_failures: bool,
    rules: Vec<Rule>,
    match_conditions: Vec<Expression>,
    variables: Vec<(String, Expression)>,
    validations: Vec<Validation>,
}

/// The policies in force (those with a `Deny` binding).
#[derive(Default)]
pub struct Policies {
    policies: Vec<Policy>,
}

impl std::fmt::Debug for Policies {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.policies.iter().map(|p| &p.name))
            .finish()
    }
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s.as_str().map(str::to_string))
        .collect()
}

fn compile(policy: &str, source: &str) -> Result<Expression, PolicyError> {
    let program = cel::Program::compile(source).map_err(|e| PolicyError::Compile {
        policy: policy.to_string(),
        expression: source.to_string(),
        message: e.to_string(),
    })?;
    Ok(Expression {
        source: source.to_string(),
        program,
    })
}

impl Policies {
    /// None.
    pub fn none() -> Policies {
        Policies::default()
    }

    /// Reads the `ValidatingAdmissionPolicy` and `ValidatingAdmissionPolicyBinding`
    /// documents among `docs` (others are ignored, so a whole rendered chart can be given).
    pub fn from_documents(docs: &[Value]) -> Result<Policies, PolicyError> {
        let name_of = |d: &Value| {
            d["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        };
        let mut bindings: BTreeMap<String, String> = BTreeMap::new();
        for d in docs.iter().filter(|d| {
            d["kind"] == "ValidatingAdmissionPolicyBinding"
                && strings(&d["spec"]["validationActions"]).contains(&"Deny".to_string())
        }) {
            let Some(policy) = d["spec"]["policyName"].as_str() else {
                return Err(PolicyError::Invalid {
                    kind: "ValidatingAdmissionPolicyBinding".into(),
                    name: name_of(d),
                    what: "spec.policyName is required".into(),
                });
            };
            bindings.insert(policy.to_string(), name_of(d));
        }
        let mut policies = Vec::new();
        for d in docs
            .iter()
            .filter(|d| d["kind"] == "ValidatingAdmissionPolicy")
        {
            let name = name_of(d);
            let Some(binding) = bindings.get(&name) else {
                continue;
            };
            let spec = &d["spec"];
            let rules = spec["matchConstraints"]["resourceRules"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|r| Rule {
                    groups: strings(&r["apiGroups"]),
                    versions: strings(&r["apiVersions"]),
                    operations: strings(&r["operations"]),
                    resources: strings(&r["resources"]),
                })
                .collect();
            let each = |field: &str, key: &str| -> Result<Vec<(String, Expression)>, PolicyError> {
                spec[field]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|item| {
                        let source = item["expression"].as_str().unwrap_or_default();
                        Ok((
                            item[key].as_str().unwrap_or_default().to_string(),
                            compile(&name, source)?,
                        ))
                    })
                    .collect()
            };
            let match_conditions = each("matchConditions", "name")?
                .into_iter()
                .map(|(_, e)| e)
                .collect();
            let variables = each("variables", "name")?;
            let validations = each("validations", "message")?
                .into_iter()
                .map(|(message, expression)| Validation {
                    expression,
                    message: (!message.is_empty()).then_some(message),
                })
                .collect();
            policies.push(Policy {
                name: name.clone(),
                binding: binding.clone(),
                ignore_failures: spec["failurePolicy"] == "Ignore",
                rules,
                match_conditions,
                variables,
                validations,
            });
        }
        Ok(Policies { policies })
    }

    /// Reads policies from YAML text (several documents).
    pub fn from_yaml(text: &str) -> Result<Policies, PolicyError> {
        let docs: Vec<Value> =
            serde_saphyr::from_str_multiple(text).map_err(|e| PolicyError::Yaml(e.to_string()))?;
        Self::from_documents(&docs)
    }

    /// The names of the policies in force.
    pub fn names(&self) -> Vec<String> {
        self.policies.iter().map(|p| p.name.clone()).collect()
    }

    /// Admits the write `a`, or says why the server denies it: `(policy, binding, message)`.
    pub fn check(&self, a: &Attributes) -> Result<(), Denial> {
        for policy in &self.policies {
            if !policy.rules.iter().any(|r| r.matches(a)) {
                continue;
            }
            policy.check(a)?;
        }
        Ok(())
    }
}

/// A policy's refusal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    /// The policy.
    pub policy: String,
    /// Its binding.
    pub binding: String,
    /// The validation's message (or what failed).
    pub message: String,
}

impl std::fmt::Display for Denial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ValidatingAdmissionPolicy '{}' with binding '{}' denied request: {}",
            self.policy, self.binding, self.message
        )
    }
}

fn request_of(a: &Attributes) -> Value {
    json!({
        "operation": a.operation,
        "userInfo": {"username": a.user.username, "extra": a.user.extra},
        "resource": {"group": a.group, "version": a.version, "resource": a.resource},
        "subResource": a.subresource,
        "name": a.name,
        "namespace": a.namespace,
    })
}

fn cel_value(v: &Value) -> Result<cel::Value, String> {
    cel::to_value(v).map_err(|e| e.to_string())
}

impl Policy {
    fn deny(&self, message: String) -> Denial {
        Denial {
            policy: self.name.clone(),
            binding: self.binding.clone(),
            message,
        }
    }

    fn check(&self, a: &Attributes) -> Result<(), Denial> {
        let null = Value::Null;
        let mut ctx = cel::Context::default();
        let bindings = [
            ("object", a.object.unwrap_or(&null)),
            ("oldObject", a.old_object.unwrap_or(&null)),
        ];
        for (name, value) in bindings {
            let v = cel_value(value).map_err(|e| self.deny(format!("{name}: {e}")))?;
            ctx.add_variable_from_value(name, v);
        }
        let request = cel_value(&request_of(a)).map_err(|e| self.deny(e))?;
        ctx.add_variable_from_value("request", request);
        // An evaluation error: the request is denied unless the policy ignores failures.
        let failed = |e: &Expression, why: String| -> Option<Denial> {
            (!self.ignore_failures).then(|| {
                self.deny(format!(
                    "expression '{}' resulted in error: {why}",
                    e.source
                ))
            })
        };
        for condition in &self.match_conditions {
            match condition.program.execute(&ctx) {
                Ok(cel::Value::Bool(true)) => {}
                Ok(cel::Value::Bool(false)) => return Ok(()),
                Ok(other) => {
                    return failed(condition, format!("not a bool: {other:?}")).map_or(Ok(()), Err);
                }
                Err(e) => return failed(condition, e.to_string()).map_or(Ok(()), Err),
            }
        }
        let mut variables: BTreeMap<String, cel::Value> = BTreeMap::new();
        for (name, expression) in &self.variables {
            let mut scope = cel::Context::default();
            for (n, v) in bindings {
                scope.add_variable_from_value(n, cel_value(v).map_err(|e| self.deny(e))?);
            }
            scope.add_variable_from_value(
                "request",
                cel_value(&request_of(a)).map_err(|e| self.deny(e))?,
            );
            scope.add_variable_from_value("variables", variables_value(&variables));
            match expression.program.execute(&scope) {
                Ok(v) => {
                    variables.insert(name.clone(), v);
                }
                Err(e) => return failed(expression, e.to_string()).map_or(Ok(()), Err),
            }
        }
        ctx.add_variable_from_value("variables", variables_value(&variables));
        for validation in &self.validations {
            let e = &validation.expression;
            match e.program.execute(&ctx) {
                Ok(cel::Value::Bool(true)) => {}
                Ok(cel::Value::Bool(false)) => {
                    return Err(self.deny(
                        validation
                            .message
                            .clone()
                            .unwrap_or_else(|| format!("failed expression: {}", e.source)),
                    ));
                }
                Ok(other) => {
                    return failed(e, format!("not a bool: {other:?}")).map_or(Ok(()), Err);
                }
                Err(err) => return failed(e, err.to_string()).map_or(Ok(()), Err),
            }
        }
        Ok(())
    }
}

fn variables_value(variables: &BTreeMap<String, cel::Value>) -> cel::Value {
    let map: std::collections::HashMap<cel::objects::Key, cel::Value> = variables
        .iter()
        .map(|(k, v)| (cel::objects::Key::String(k.clone().into()), v.clone()))
        .collect();
    cel::Value::Map(cel::objects::Map { map: map.into() })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(validation: &str, binding: bool) -> Vec<Value> {
        let mut docs = vec![json!({
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "ValidatingAdmissionPolicy",
            "metadata": {"name": "p"},
            "spec": {
                "failurePolicy": "Fail",
                "matchConstraints": {"resourceRules": [{
                    "apiGroups": ["virtkube.io"], "apiVersions": ["*"],
                    "operations": ["CREATE", "UPDATE"], "resources": ["domains", "domains/status"]}]},
                "matchConditions": [{"name": "agent", "expression": "request.userInfo.username == 'agent'"}],
                "variables": [
                    {"name": "node", "expression": "request.userInfo.extra['authentication.kubernetes.io/node-name'][0]"},
                    {"name": "mine", "expression": "object.status.nodeName == variables.node"}
                ],
                "validations": [{"expression": validation, "message": "not yours"}]
            }
        })];
        if binding {
            docs.push(json!({
                "apiVersion": "admissionregistration.k8s.io/v1",
                "kind": "ValidatingAdmissionPolicyBinding",
                "metadata": {"name": "b"},
                "spec": {"policyName": "p", "validationActions": ["Deny"]}
            }));
        }
        docs
    }

    fn attributes<'a>(
        user: &'a UserInfo,
        object: &'a Value,
        subresource: &'a str,
    ) -> Attributes<'a> {
        Attributes {
            operation: "UPDATE",
            group: "virtkube.io",
            version: "v1alpha1",
            resource: "domains",
            subresource,
            namespace: "ns",
            name: "vm",
            user,
            object: Some(object),
            old_object: Some(object),
        }
    }

    #[test]
    fn a_token_names_the_user_and_its_extras() {
        let user = UserInfo::from_token(&token_on_node("system:serviceaccount:a:b", "n1"));
        assert_eq!(user.username, "system:serviceaccount:a:b");
        assert_eq!(user.extra[NODE_NAME_EXTRA], vec!["n1".to_string()]);
        assert!(UserInfo::from_token("admin").extra.is_empty());
    }

    #[test]
    fn a_false_validation_denies_with_the_real_servers_message_and_variables_chain() {
        let policies = Policies::from_documents(&policy("variables.mine", true)).unwrap();
        let user = UserInfo::from_token(&token_on_node("agent", "a"));
        let on_a = json!({"status": {"nodeName": "a"}});
        let on_b = json!({"status": {"nodeName": "b"}});
        assert_eq!(policies.check(&attributes(&user, &on_a, "status")), Ok(()));
        let denial = policies
            .check(&attributes(&user, &on_b, "status"))
            .unwrap_err();
        assert_eq!(
            denial.to_string(),
            "ValidatingAdmissionPolicy 'p' with binding 'b' denied request: not yours"
        );
        // Another user: the match condition leaves it alone.
        let other = UserInfo::from_token("admin");
        assert_eq!(policies.check(&attributes(&other, &on_b, "status")), Ok(()));
        // Another resource: not matched.
        let mut volume = attributes(&user, &on_b, "");
        volume.resource = "volumes";
        assert_eq!(policies.check(&volume), Ok(()));
    }

    #[test]
    fn a_policy_without_a_deny_binding_does_nothing() {
        let policies = Policies::from_documents(&policy("false", false)).unwrap();
        assert!(policies.names().is_empty());
        let user = UserInfo::from_token(&token_on_node("agent", "a"));
        let on_b = json!({"status": {"nodeName": "b"}});
        assert_eq!(policies.check(&attributes(&user, &on_b, "")), Ok(()));
    }

    #[test]
    fn an_expression_that_fails_to_evaluate_denies_under_fail() {
        let policies = Policies::from_documents(&policy("object.spec.missing == 1", true)).unwrap();
        let user = UserInfo::from_token(&token_on_node("agent", "a"));
        let on_a = json!({"status": {"nodeName": "a"}});
        let denial = policies
            .check(&attributes(&user, &on_a, "status"))
            .unwrap_err();
        assert!(
            denial
                .message
                .starts_with("expression 'object.spec.missing == 1' resulted in error"),
            "{denial}"
        );
    }

    #[test]
    fn an_expression_that_does_not_compile_is_refused_at_load() {
        let err = Policies::from_documents(&policy("object.(", true)).expect_err("refused");
        assert!(matches!(err, PolicyError::Compile { .. }), "{err}");
    }
}
