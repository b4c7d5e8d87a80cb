//! The generated CRDs' CEL rules priced the way the API server prices them when a CRD is
//! installed: every rule and every schema within virtkube's budget (a tenth of the API
//! server's limits), with no rule shape that a Kubernetes 1.24–1.37 server refuses for cost.
//! Each rule's bound and each CRD's total are printed (`--nocapture`, or by nextest on failure).

use serde_json::Value;
use virtkube_crds::cel_cost::{Budget, SchemaCost, limits};
use virtkube_crds::crd;

fn schemas() -> Vec<(String, Value)> {
    crd::all()
        .into_iter()
        .map(|crd| {
            let name = crd.metadata.name.clone().unwrap_or_default();
            let schema = crd.spec.versions[0]
                .schema
                .as_ref()
                .and_then(|s| s.open_api_v3_schema.as_ref())
                .map(|s| serde_json::to_value(s).unwrap())
                .unwrap();
            (name, schema)
        })
        .collect()
}

fn schema_of(name: &str) -> Value {
    schemas()
        .into_iter()
        .find(|(n, _)| n == name)
        .map(|(_, s)| s)
        .unwrap()
}

#[test]
fn every_rule_and_every_crd_is_within_budget() {
    let mut problems = Vec::new();
    let mut priced = 0;
    for (name, schema) in schemas() {
        let cost = SchemaCost::of(&schema);
        println!("{name}: {} rules\n{}", cost.rules.len(), cost.report());
        priced += cost.rules.len();
        assert!(
            cost.total() <= Budget::VIRTKUBE.per_schema
                || !cost.problems(Budget::VIRTKUBE).is_empty(),
            "a total over budget must be reported"
        );
        problems.extend(
            cost.problems(Budget::VIRTKUBE)
                .into_iter()
                .map(|p| format!("{name}: {p}")),
        );
    }
    assert!(
        priced >= 20,
        "only {priced} rules found: did the walk miss some?"
    );
    assert!(
        problems.is_empty(),
        "rules an API server refuses or that are over budget:\n{}",
        problems.join("\n")
    );
}

/// The two rules a v1.24 API server refused (issue 8), fed through the checker in their old
/// shape in place of the new one: they must be refused in the API server's own words.
#[test]
fn the_old_exactly_one_rules_are_refused() {
    let cases = [
        (
            "domains.virtkube.io",
            "/properties/spec/properties/disks/items",
            "has(self.volume) ? !has(self.hostPath) : has(self.hostPath)",
            "has(self.volume) != has(self.hostPath)",
        ),
        (
            "volumes.virtkube.io",
            "/properties/spec/properties/source",
            "has(self.volume) ? !has(self.backingVolume) : has(self.backingVolume)",
            "has(self.volume) != has(self.backingVolume)",
        ),
    ];
    for (name, pointer, new, old) in cases {
        let mut schema = schema_of(name);
        let rule = schema
            .pointer_mut(&format!("{pointer}/x-kubernetes-validations/0/rule"))
            .unwrap_or_else(|| panic!("{name}: no rule at {pointer}"));
        assert_eq!(rule, new, "{name}: the rule the test replaces moved");
        *rule = Value::from(old);
        let cost = SchemaCost::of(&schema);
        let problems = cost.problems(Budget::VIRTKUBE);
        println!(
            "{name} with `{old}`:\n{}{}",
            cost.report(),
            problems.join("\n")
        );
        assert!(
            problems.iter().any(|p| p.contains(&format!(
                "`{old}`: Forbidden: estimated rule cost exceeds budget by factor of more than 100x"
            ))),
            "{name}: `{old}` was not refused: {problems:?}"
        );
        assert!(cost.total() > limits::STATIC_ESTIMATED_CRD_COST_LIMIT);
        // Also `==`, which says "both or neither" and was refused the same way.
        let mut schema = schema_of(name);
        *schema
            .pointer_mut(&format!("{pointer}/x-kubernetes-validations/0/rule"))
            .unwrap() = Value::from(old.replace("!=", "=="));
        assert!(
            !SchemaCost::of(&schema)
                .problems(Budget::VIRTKUBE)
                .is_empty(),
            "{name}: the `==` shape was not refused"
        );
    }
}
