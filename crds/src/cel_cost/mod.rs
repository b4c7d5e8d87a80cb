//! The static cost of the CRDs' CEL rules, estimated the way the Kubernetes API server does
//! before it accepts a CRD.
//!
//! When a CRD is created or updated, the API server prices every `x-kubernetes-validations`
//! rule with cel-go's static estimator, using the worst-case sizes the schema allows
//! (`maxLength`, `maxItems`, `maxProperties`; the 3 MiB request size where the schema says
//! nothing), multiplies each rule's cost by the number of times it can run in one object (the
//! `maxItems` of every enclosing list), and refuses the CRD when one rule is over
//! [`limits::STATIC_ESTIMATED_COST_LIMIT`] or all together are over
//! [`limits::STATIC_ESTIMATED_CRD_COST_LIMIT`]. kube's in-process CEL validator evaluates rules
//! but prices nothing, so without this a CRD can pass every test and still be refused by a
//! real cluster.
//!
//! [`SchemaCost::of`] prices every rule of one schema; [`SchemaCost::problems`] lists what
//! the API server would refuse, what is over virtkube's own [`Budget`], and rule shapes that
//! are risky although their estimate is small (see [`Estimate::findings`]).

mod decl;
mod estimate;
pub mod limits;

use std::fmt::Write as _;

use serde_json::Value;

use decl::Decl;
use estimate::estimate;
pub use estimate::{Estimate, EstimateError};

/// Prices `rule` as if it were attached to the schema node `node` (not a resource root): the
/// cost of one evaluation, as the API server's `Compile` reports it in `MaxCost`.
pub fn estimate_rule(rule: &str, node: &Value) -> Result<Estimate, EstimateError> {
    let decl = Decl::of(node, "", false).ok_or_else(|| {
        EstimateError::Unsupported("a rule on a schema node CEL cannot see (no type)".into())
    })?;
    estimate(rule, decl)
}

/// virtkube's own ceiling for its rules: each rule within the API server's run-time limit for
/// one evaluation, and all rules of a kind within its run-time budget for one object, so that
/// no validation can ever be cut off at run time. Both are a tenth of the limits the API
/// server checks when the CRD is installed, which leaves room for estimator changes in later
/// Kubernetes versions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    /// The most one rule may cost, times the number of times it runs in one object.
    pub per_rule: u64,
    /// The most all rules of one schema may cost together.
    pub per_schema: u64,
}

impl Budget {
    /// The budget virtkube's CRDs are held to.
    pub const VIRTKUBE: Budget = Budget {
        per_rule: limits::PER_CALL_LIMIT,
        per_schema: limits::RUNTIME_CEL_COST_BUDGET,
    };
}

/// How many times a rule can run for one object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cardinality {
    /// At most this often: the product of the `maxItems`/`maxProperties` of every list and
    /// map above the rule.
    Bounded(u64),
    /// Under a list or map without a limit; the API server then assumes as many runs as
    /// copies of the node fit into one request.
    Unbounded {
        /// The first list or map without a limit.
        under: String,
        /// The number of runs the API server assumes.
        assumed: u64,
    },
}

impl Cardinality {
    /// The number of runs the API server multiplies the rule's cost by.
    pub fn runs(&self) -> u64 {
        match self {
            Cardinality::Bounded(n) => *n,
            Cardinality::Unbounded { assumed, .. } => *assumed,
        }
    }
}

/// One rule and its price.
#[derive(Debug, Clone)]
pub struct RuleCost {
    /// The schema node the rule is attached to (`spec.disks[]`; `self` for the root).
    pub location: String,
    /// The rule's index in that node's `x-kubernetes-validations`.
    pub index: usize,
    /// The CEL expression.
    pub rule: String,
    /// Its cost for one evaluation, or why it cannot be priced.
    pub estimate: Result<Estimate, EstimateError>,
    /// How many times it runs for one object.
    pub cardinality: Cardinality,
}

impl RuleCost {
    /// What the API server compares with its per-rule limit: one evaluation's cost times the
    /// number of runs (saturating; the largest value when the rule cannot be priced).
    pub fn total(&self) -> u64 {
        match &self.estimate {
            Ok(estimate) => estimate.cost.saturating_mul(self.cardinality.runs()),
            Err(_) => u64::MAX,
        }
    }

    fn name(&self) -> String {
        format!(
            "{}: x-kubernetes-validations[{}] `{}`",
            self.location, self.index, self.rule
        )
    }
}

/// Every rule of one schema, priced.
#[derive(Debug, Clone, Default)]
pub struct SchemaCost {
    /// The rules, in schema order (parents before children, properties by name).
    pub rules: Vec<RuleCost>,
}

impl SchemaCost {
    /// Prices every rule in `schema`, a CRD version's `openAPIV3Schema`.
    pub fn of(schema: &Value) -> SchemaCost {
        let mut rules = Vec::new();
        collect(schema, "", Runs::Bounded(1), true, &mut rules);
        SchemaCost { rules }
    }

    /// What the API server adds up and compares with its per-CRD limit (saturating).
    pub fn total(&self) -> u64 {
        self.rules
            .iter()
            .fold(0u64, |sum, rule| sum.saturating_add(rule.total()))
    }

    /// Everything the API server would refuse, everything over `budget`, and every risky
    /// shape, one line each; empty when the schema is fine.
    pub fn problems(&self, budget: Budget) -> Vec<String> {
        let mut out = Vec::new();
        for rule in &self.rules {
            let estimate = match &rule.estimate {
                Ok(estimate) => estimate,
                Err(error) => {
                    out.push(format!("{}: {error}", rule.name()));
                    continue;
                }
            };
            let total = rule.total();
            if total > limits::STATIC_ESTIMATED_COST_LIMIT {
                out.push(format!(
                    "{}: Forbidden: {}",
                    rule.name(),
                    limits::cost_error_message(
                        "estimated rule cost",
                        total,
                        limits::STATIC_ESTIMATED_COST_LIMIT
                    )
                ));
            } else if total > budget.per_rule {
                out.push(format!(
                    "{}: estimated cost {} is over virtkube's budget of {} per rule",
                    rule.name(),
                    thousands(total),
                    thousands(budget.per_rule)
                ));
            }
            if let Cardinality::Unbounded { under, assumed } = &rule.cardinality {
                out.push(format!(
                    "{}: runs once per item of `{under}`, which has no maxItems or maxProperties (the API server assumes {} runs)",
                    rule.name(),
                    thousands(*assumed)
                ));
            }
            for finding in &estimate.findings {
                out.push(format!("{}: {finding}", rule.name()));
            }
        }
        let total = self.total();
        if total > limits::STATIC_ESTIMATED_CRD_COST_LIMIT {
            out.push(format!(
                "openAPIV3Schema: Forbidden: {}",
                limits::cost_error_message(
                    "x-kubernetes-validations estimated rule cost total for entire OpenAPIv3 schema",
                    total,
                    limits::STATIC_ESTIMATED_CRD_COST_LIMIT
                )
            ));
        } else if total > budget.per_schema {
            out.push(format!(
                "openAPIV3Schema: the rules' estimated cost {} is over virtkube's budget of {} per schema",
                thousands(total),
                thousands(budget.per_schema)
            ));
        }
        out
    }

    /// A table of every rule's bound (cost of one evaluation × runs = total) and the schema's
    /// total, for test output.
    pub fn report(&self) -> String {
        let mut out = String::new();
        for rule in &self.rules {
            let cost = match &rule.estimate {
                Ok(estimate) => thousands(estimate.cost),
                Err(_) => "unpriced".to_string(),
            };
            let _ = writeln!(
                out,
                "  {cost:>12} × {:>5} = {:>12}  {}[{}]  {}",
                thousands(rule.cardinality.runs()),
                thousands(rule.total()),
                rule.location,
                rule.index,
                rule.rule
            );
        }
        let _ = writeln!(
            out,
            "  total {} (API server limit {} per rule, {} per CRD; virtkube budget {} per rule, {} per CRD)",
            thousands(self.total()),
            thousands(limits::STATIC_ESTIMATED_COST_LIMIT),
            thousands(limits::STATIC_ESTIMATED_CRD_COST_LIMIT),
            thousands(Budget::VIRTKUBE.per_rule),
            thousands(Budget::VIRTKUBE.per_schema)
        );
        out
    }
}

/// The runs of a node so far: bounded, or under the named unbounded container.
#[derive(Clone)]
enum Runs {
    Bounded(u64),
    Unbounded(String),
}

impl Runs {
    /// The runs of a child of `container` (a list's items, a map's values) whose limit is
    /// `max`.
    fn times(&self, max: Option<u64>, container: &str) -> Runs {
        match (self, max) {
            (Runs::Bounded(n), Some(max)) => Runs::Bounded(n.saturating_mul(max)),
            (Runs::Bounded(_), None) => Runs::Unbounded(display(container).to_string()),
            (unbounded, _) => unbounded.clone(),
        }
    }
}

fn collect(node: &Value, path: &str, runs: Runs, root: bool, out: &mut Vec<RuleCost>) {
    if let Some(rules) = node
        .get("x-kubernetes-validations")
        .and_then(Value::as_array)
    {
        let decl = Decl::of(node, path, root);
        for (index, rule) in rules.iter().enumerate() {
            let text = rule.get("rule").and_then(Value::as_str).unwrap_or_default();
            let estimate = match &decl {
                Some(decl) => estimate(text, decl.clone()),
                None => Err(EstimateError::Unsupported(
                    "a rule on a schema node CEL cannot see (no type)".into(),
                )),
            };
            let cardinality = match &runs {
                Runs::Bounded(n) => Cardinality::Bounded(*n),
                Runs::Unbounded(under) => Cardinality::Unbounded {
                    under: under.clone(),
                    // apiextensions' `MaxCardinality`: copies of the node that fit into one request.
                    assumed: limits::MAX_REQUEST_SIZE_BYTES
                        / (decl.as_ref().map_or(1, |d| d.min_serialized_size) + 1),
                },
            };
            out.push(RuleCost {
                location: display(path).to_string(),
                index,
                rule: text.to_string(),
                estimate,
                cardinality,
            });
        }
    }
    for (name, child) in node
        .get("properties")
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
    {
        let child_path = if path.is_empty() {
            name.clone()
        } else {
            format!("{path}.{name}")
        };
        collect(child, &child_path, runs.clone(), false, out);
    }
    if let Some(items) = node.get("items").filter(|i| i.is_object()) {
        let max = node.get("maxItems").and_then(Value::as_u64);
        collect(
            items,
            &format!("{path}[]"),
            runs.times(max, path),
            false,
            out,
        );
    }
    if let Some(values) = node.get("additionalProperties").filter(|v| v.is_object()) {
        let max = node.get("maxProperties").and_then(Value::as_u64);
        collect(
            values,
            &format!("{path}{{}}"),
            runs.times(max, path),
            false,
            out,
        );
    }
}

fn display(path: &str) -> &str {
    if path.is_empty() { "self" } else { path }
}

/// `1234567` as `1,234,567`.
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn schema(items_rule: &str, max_items: Option<u64>) -> Value {
        let mut disks = json!({
            "type": "array",
            "items": {
                "type": "object",
                "required": ["name"],
                "properties": {
                    "name": {"type": "string", "maxLength": 63},
                    "volume": {"type": "string", "maxLength": 253},
                    "hostPath": {"type": "string", "maxLength": 4096}
                },
                "x-kubernetes-validations": [{"rule": items_rule, "message": "m"}]
            }
        });
        if let Some(max) = max_items {
            disks["maxItems"] = json!(max);
        }
        json!({"type": "object", "properties": {"spec": {"type": "object", "properties": {"disks": disks}}}})
    }

    #[test]
    fn item_rules_are_multiplied_by_max_items() {
        let cost = SchemaCost::of(&schema(
            "has(self.volume) ? !has(self.hostPath) : has(self.hostPath)",
            Some(64),
        ));
        assert_eq!(cost.rules.len(), 1);
        let rule = &cost.rules[0];
        assert_eq!(rule.location, "spec.disks[]");
        assert_eq!(rule.cardinality, Cardinality::Bounded(64));
        assert_eq!(rule.total(), 5 * 64);
        assert_eq!(cost.total(), 320);
        assert!(cost.problems(Budget::VIRTKUBE).is_empty());
        assert!(cost.report().contains("spec.disks[][0]"));
    }

    #[test]
    fn the_old_exactly_one_shape_is_refused_in_the_api_servers_words() {
        let cost = SchemaCost::of(&schema("has(self.volume) != has(self.hostPath)", Some(64)));
        let problems = cost.problems(Budget::VIRTKUBE).join("\n");
        assert!(
            problems.contains("spec.disks[]: x-kubernetes-validations[0] `has(self.volume) != has(self.hostPath)`: Forbidden: estimated rule cost exceeds budget by factor of more than 100x"),
            "{problems}"
        );
        assert!(problems.contains("compares has() results"), "{problems}");
    }

    #[test]
    fn rules_under_an_unbounded_list_are_refused() {
        let cost = SchemaCost::of(&schema(
            "has(self.volume) ? !has(self.hostPath) : has(self.hostPath)",
            None,
        ));
        let rule = &cost.rules[0];
        // 3 MiB / ({} + "name":"" + 1): the API server's MaxCardinality.
        assert_eq!(
            rule.cardinality,
            Cardinality::Unbounded {
                under: "spec.disks".into(),
                assumed: 3 * 1024 * 1024 / (2 + 4 + 2 + 4 + 1)
            }
        );
        let problems = cost.problems(Budget::VIRTKUBE).join("\n");
        assert!(
            problems.contains("runs once per item of `spec.disks`, which has no maxItems"),
            "{problems}"
        );
    }

    #[test]
    fn a_schema_over_the_crd_limit_is_refused() {
        // 64 items × 1,000 cost each, 2,000 times over: over 100,000,000 in total.
        let rule = "self.name == 'a'";
        let mut schema = schema(rule, Some(64));
        let many: Vec<Value> = (0..2000)
            .map(|_| json!({"rule": "self.hostPath == self.hostPath", "message": "m"}))
            .collect();
        schema["properties"]["spec"]["properties"]["disks"]["items"]["x-kubernetes-validations"] =
            json!(many);
        let cost = SchemaCost::of(&schema);
        // ceil(16,384 × 0.1) + 4 = 1,643 per evaluation, × 64 × 2,000.
        assert_eq!(cost.total(), 1_643 * 64 * 2000);
        let problems = cost.problems(Budget::VIRTKUBE).join("\n");
        assert!(
            problems.contains("openAPIV3Schema: Forbidden: x-kubernetes-validations estimated rule cost total for entire OpenAPIv3 schema exceeds budget by factor of 2.1x"),
            "{problems}"
        );
    }

    #[test]
    fn thousands_separators() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(100_000_000), "100,000,000");
    }
}
