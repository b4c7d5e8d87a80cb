//! The executor with a scripted runner: what runs, in which order, how many at once, and
//! what a failure stops.

use std::cell::{Cell, RefCell};
use std::collections::BTreeSet;
use std::time::Duration;

use virtkube::execute::{ActionRunner, ExecOptions, Outcome, execute};
use virtkube::plan::desired::{DesiredState, Nodes};
use virtkube::plan::observed::ObservedState;
use virtkube::plan::{self, Action, ObjectKind, Op, PlanOptions};
use virtkube_crds::manifest;

/// Fails the actions whose object name is listed; records order and concurrency.
struct Scripted {
    fail: BTreeSet<(ObjectKind, String, &'static str)>,
    in_flight: Cell<usize>,
    max_in_flight: Cell<usize>,
    finished: RefCell<Vec<usize>>,
}

impl Scripted {
    fn new(fail: &[(ObjectKind, &str, &'static str)]) -> Self {
        Self {
            fail: fail
                .iter()
                .map(|(k, n, v)| (*k, n.to_string(), *v))
                .collect(),
            in_flight: Cell::new(0),
            max_in_flight: Cell::new(0),
            finished: RefCell::new(Vec::new()),
        }
    }
}

#[derive(Debug)]
struct Refused(String);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn verb(op: &Op) -> &'static str {
    match op {
        Op::DefinePool(_) => "define-pool",
        Op::CreateVolume { .. } => "create-volume",
        Op::DefineNetwork(_) => "define-network",
        Op::DefineDomain { .. } => "define-domain",
        Op::StartDomain { .. } => "start-domain",
        _ => "other",
    }
}

impl ActionRunner for Scripted {
    type Error = Refused;
    async fn run(&self, action: &Action) -> Result<String, Refused> {
        self.in_flight.set(self.in_flight.get() + 1);
        self.max_in_flight
            .set(self.max_in_flight.get().max(self.in_flight.get()));
        tokio::time::sleep(Duration::from_millis(5)).await;
        self.in_flight.set(self.in_flight.get() - 1);
        self.finished.borrow_mut().push(action.id);
        if self.fail.contains(&(
            action.object.kind,
            action.object.name.clone(),
            verb(&action.op),
        )) {
            return Err(Refused(format!(
                "libvirt error: {} refused",
                action.object.name
            )));
        }
        Ok("done".into())
    }
}

fn fixture() -> plan::Plan {
    let mut text = String::from(
        "apiVersion: virtkube.io/v1alpha1\nkind: StoragePool\nmetadata: {name: images}\nspec: {type: dir, target: {path: /p}}\n---\napiVersion: virtkube.io/v1alpha1\nkind: Network\nmetadata: {name: lan}\nspec: {mode: isolated}\n",
    );
    for i in 0..6 {
        text.push_str(&format!(
            "---\napiVersion: virtkube.io/v1alpha1\nkind: Volume\nmetadata: {{name: disk{i}}}\nspec: {{pool: images, capacity: 1Gi}}\n---\napiVersion: virtkube.io/v1alpha1\nkind: Domain\nmetadata: {{name: vm{i}}}\nspec:\n  memory: {{size: 64Mi}}\n  disks: [{{name: root, volume: disk{i}}}]\n  interfaces: [{{name: eth0, network: lan}}]\n"
        ));
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.yaml");
    std::fs::write(&path, text).unwrap();
    let (desired, notices) =
        DesiredState::from_manifests(&manifest::load(&[path]).unwrap(), &Nodes::single("local"));
    assert!(notices.is_empty());
    let mut observed = ObservedState::default();
    observed.host_mut("local");
    plan::plan(&desired, &observed, &PlanOptions::default())
}

#[tokio::test]
async fn a_failure_stops_only_what_depends_on_it() {
    let p = fixture();
    let runner = Scripted::new(&[(ObjectKind::Volume, "default.disk2", "create-volume")]);
    let report = execute(&p, &runner, ExecOptions { concurrency: 4 }, |_, _| {}).await;
    assert_eq!(
        report.results.len(),
        p.actions.len(),
        "every action is accounted for"
    );
    let outcome = |kind: ObjectKind, name: &str, v: &str| {
        let a = p
            .actions
            .iter()
            .find(|a| a.object.kind == kind && a.object.name == name && verb(&a.op) == v)
            .unwrap();
        report
            .results
            .iter()
            .find(|r| r.id == a.id)
            .unwrap()
            .outcome
            .clone()
    };
    assert!(
        matches!(outcome(ObjectKind::Volume, "default.disk2", "create-volume"), Outcome::Failed(m) if m.contains("libvirt error"))
    );
    // vm2 waited for its disk: skipped, naming the failed step.
    let failed_id = p
        .actions
        .iter()
        .find(|a| a.object.name == "default.disk2")
        .unwrap()
        .id;
    assert_eq!(
        outcome(ObjectKind::Domain, "default.vm2", "define-domain"),
        Outcome::Skipped { because: failed_id }
    );
    assert_eq!(
        outcome(ObjectKind::Domain, "default.vm2", "start-domain"),
        Outcome::Skipped { because: failed_id }
    );
    // Everything else ran.
    for i in [0, 1, 3, 4, 5] {
        assert!(
            matches!(
                outcome(
                    ObjectKind::Domain,
                    &format!("default.vm{i}"),
                    "start-domain"
                ),
                Outcome::Done(_)
            ),
            "vm{i}"
        );
    }
    assert_eq!(report.failed().count(), 1);
    assert_eq!(report.skipped().count(), 2);
}

#[tokio::test]
async fn independent_actions_run_in_parallel_within_the_bound_and_dependents_in_order() {
    let p = fixture();
    let runner = Scripted::new(&[]);
    let report = execute(&p, &runner, ExecOptions { concurrency: 3 }, |_, _| {}).await;
    assert!(report.is_success());
    assert!(
        runner.max_in_flight.get() > 1,
        "independent objects overlap"
    );
    assert!(runner.max_in_flight.get() <= 3, "never more than the bound");
    let order = runner.finished.borrow();
    let position = |id: usize| order.iter().position(|x| *x == id).unwrap();
    for a in &p.actions {
        for d in &a.depends_on {
            assert!(
                position(*d) < position(a.id),
                "{:?} finished before its dependency",
                a.object
            );
        }
    }
}
