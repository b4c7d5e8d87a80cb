//! A plan as JSON for machines (`virtkube plan -o json`): a pull-request bot reads what a
//! change does, object by object, without parsing the text output.
//!
//! The schema is stable within `apiVersion: virtkube.io/v1alpha1`, `kind: PlanReport`:
//! fields may be added, none is renamed or removed. Every field is always present (empty
//! lists, `null` for an absent `namespace` or `move`).
//!
//! ```json
//! {
//!   "apiVersion": "virtkube.io/v1alpha1",
//!   "kind": "PlanReport",
//!   "target": {"type": "cluster", "name": "prod", "nodes": ["node-a", "node-b"]},
//!   "exitCode": 2,
//!   "summary": {"create": 1, "changeLive": 1, "restart": 0, "move": 1, "delete": 0,
//!               "restartPending": 1, "errors": 0, "notes": 0},
//!   "changes": [
//!     {"kind": "Domain", "namespace": "prod", "name": "web", "node": "node-b",
//!      "effect": "move", "move": {"from": "node-a", "to": "node-b", "mode": "Live"},
//!      "steps": [{"node": "node-a", "mark": "~", "action": "live-migrate to node-b",
//!                 "reason": "spec.nodeName changed while it runs: live migration",
//!                 "fields": [{"field": "nodeName", "before": "node-a", "after": "node-b"}]}]}
//!   ],
//!   "notices": [
//!     {"type": "restartPending", "error": false, "kind": "Domain", "namespace": "prod",
//!      "name": "db", "node": "node-a", "message": "needs a restart: …",
//!      "fields": [{"field": "os.machine", "before": "pc", "after": "q35"}]}
//!   ],
//!   "nodeNotes": []
//! }
//! ```
//!
//! - `exitCode`: what the command exits with: 0 nothing to do, 2 changes (or changes waiting
//!   for a restart), 1 an error (a forbidden or invalid change, a name clash).
//! - `changes[].effect`: `create`, `changeLive` (applied to the running guest, or to the
//!   definition of a stopped one), `restart` (the guest is restarted now: `updatePolicy:
//!   Restart`), `move` (to another node; `move.mode` `Live` for a running guest, `Cold` for a
//!   stopped one), `delete`. `summary` counts objects by effect.
//! - `changes[].node`: the node the object ends on ([`UNSCHEDULED`](super::reported::UNSCHEDULED)
//!   when the cluster controller will choose it); each step says where it runs.
//! - `notices[].type`: `restartPending` (waits for the guest's next stop), `forbidden`,
//!   `conflict`, `invalid` (these three are errors), `blocked`, `retained`, `note` (what a
//!   preview against a cluster cannot know or what is under way).
//! - `nodeNotes`: nodes not Ready, or named by objects without a `HypervisorNode`.

use serde::Serialize;

use super::{Action, Notice, NoticeKind, ObjectKind, ObjectRef, Op, Plan, Symbol};

/// The `apiVersion` of a [`PlanReport`].
pub const API_VERSION: &str = "virtkube.io/v1alpha1";
/// The `kind` of a [`PlanReport`].
pub const KIND: &str = "PlanReport";

/// A plan for machines; see the module documentation for the schema.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PlanReport {
    /// [`API_VERSION`].
    pub api_version: &'static str,
    /// [`KIND`].
    pub kind: &'static str,
    /// What was planned against.
    pub target: Target,
    /// The command's exit code.
    pub exit_code: u8,
    /// Objects by effect, and notices by weight.
    pub summary: Summary,
    /// One entry per object the plan changes.
    pub changes: Vec<ObjectChange>,
    /// What the plan reports without acting.
    pub notices: Vec<NoticeEntry>,
    /// What the reader should know about nodes.
    pub node_notes: Vec<String>,
}

/// What a plan was computed against.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Target {
    /// `cluster` (what the agents report) or `hosts` (libvirt, read directly).
    #[serde(rename = "type")]
    pub type_: &'static str,
    /// The kubeconfig context, or the libvirt URI of a single host.
    pub name: String,
    /// The nodes planned.
    pub nodes: Vec<String>,
}

/// Counts.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Summary {
    /// Objects created.
    pub create: usize,
    /// Objects changed live.
    pub change_live: usize,
    /// Objects restarted now.
    pub restart: usize,
    /// Objects moved to another node.
    pub r#move: usize,
    /// Objects deleted.
    pub delete: usize,
    /// Changes waiting for a restart.
    pub restart_pending: usize,
    /// Errors (forbidden, invalid, conflicts).
    pub errors: usize,
    /// Notes.
    pub notes: usize,
}

/// A field's before → after.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Field {
    /// The spec path (`cpu.vcpus`).
    pub field: String,
    /// What the node has (`(none)` when absent).
    pub before: String,
    /// What the manifest asks for.
    pub after: String,
}

/// One step of an object's change.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Step {
    /// Where it runs.
    pub node: String,
    /// `+`, `~`, `!` or `-`, as the text output marks it.
    pub mark: String,
    /// What it does.
    pub action: String,
    /// Why.
    pub reason: String,
    /// Field-level changes.
    pub fields: Vec<Field>,
}

/// A move between nodes.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Move {
    /// The node it leaves.
    pub from: String,
    /// The node it goes to.
    pub to: String,
    /// `Live` (the running guest is migrated) or `Cold` (the stopped domain's definition
    /// moves).
    pub mode: &'static str,
}

/// Everything a plan does to one object.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ObjectChange {
    /// `Domain`, `Volume`, `Network`, `StoragePool`.
    pub kind: &'static str,
    /// For namespaced kinds.
    pub namespace: Option<String>,
    /// The resource's name.
    pub name: String,
    /// The node it ends on.
    pub node: String,
    /// `create`, `changeLive`, `restart`, `move` or `delete`.
    pub effect: &'static str,
    /// For `move`.
    pub r#move: Option<Move>,
    /// The steps, in plan order.
    pub steps: Vec<Step>,
}

/// A notice.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct NoticeEntry {
    /// `restartPending`, `forbidden`, `conflict`, `invalid`, `blocked`, `retained`, `note`.
    #[serde(rename = "type")]
    pub type_: &'static str,
    /// Whether it makes the plan fail.
    pub error: bool,
    /// The object's kind.
    pub kind: &'static str,
    /// For namespaced kinds.
    pub namespace: Option<String>,
    /// The resource's name.
    pub name: String,
    /// The node, when it concerns one.
    pub node: String,
    /// The explanation.
    pub message: String,
    /// Field-level changes it is about.
    pub fields: Vec<Field>,
}

fn split(object: &ObjectRef) -> (Option<String>, String) {
    match (object.kind, object.display.split_once('/')) {
        (ObjectKind::Domain | ObjectKind::Volume, Some((ns, name))) => {
            (Some(ns.to_string()), name.to_string())
        }
        _ => (None, object.display.clone()),
    }
}

fn fields(changes: &[super::Change]) -> Vec<Field> {
    changes
        .iter()
        .map(|c| Field {
            field: c.field.clone(),
            before: c.before.clone(),
            after: c.after.clone(),
        })
        .collect()
}

fn notice_type(kind: NoticeKind) -> &'static str {
    match kind {
        NoticeKind::RestartPending => "restartPending",
        NoticeKind::Forbidden => "forbidden",
        NoticeKind::Conflict => "conflict",
        NoticeKind::Blocked => "blocked",
        NoticeKind::Retained => "retained",
        NoticeKind::Invalid => "invalid",
        NoticeKind::Unsupported => "unsupported",
        NoticeKind::Note => "note",
    }
}

/// The move an object's actions make, if any: a live migration, or a definition moved.
fn move_of(actions: &[&Action]) -> Option<Move> {
    actions.iter().find_map(|a| match &a.op {
        Op::MigrateDomain { to, .. } => Some(Move {
            from: a.node.clone(),
            to: to.clone(),
            mode: "Live",
        }),
        _ => a
            .changes
            .iter()
            .find(|c| c.field == "nodeName")
            .map(|c| Move {
                from: c.before.clone(),
                to: c.after.clone(),
                mode: "Cold",
            }),
    })
}

fn effect_of(actions: &[&Action], moved: bool) -> &'static str {
    if moved {
        "move"
    } else if actions.iter().any(|a| a.symbol == Symbol::Create) {
        "create"
    } else if actions.iter().any(|a| a.symbol == Symbol::Restart) {
        "restart"
    } else if actions.iter().all(|a| a.symbol == Symbol::Delete) {
        "delete"
    } else {
        "changeLive"
    }
}

impl Plan {
    /// The exit code of `virtkube plan`: 1 on an error notice, 2 when anything would change
    /// (or waits for a restart), 0 otherwise.
    pub fn exit_code(&self) -> u8 {
        if self.has_errors() {
            1
        } else if !self.is_empty()
            || self
                .notices
                .iter()
                .any(|n| n.kind == NoticeKind::RestartPending)
        {
            2
        } else {
            0
        }
    }

    /// The plan as a [`PlanReport`].
    pub fn report(&self, target: Target, node_notes: &[String]) -> PlanReport {
        let mut order: Vec<&ObjectRef> = Vec::new();
        for a in &self.actions {
            if !order.contains(&&a.object) {
                order.push(&a.object);
            }
        }
        let mut summary = Summary::default();
        let changes: Vec<ObjectChange> = order
            .into_iter()
            .map(|object| {
                let actions: Vec<&Action> = self
                    .actions
                    .iter()
                    .filter(|a| &a.object == object)
                    .collect();
                let r#move = move_of(&actions);
                let effect = effect_of(&actions, r#move.is_some());
                match effect {
                    "move" => summary.r#move += 1,
                    "create" => summary.create += 1,
                    "restart" => summary.restart += 1,
                    "delete" => summary.delete += 1,
                    _ => summary.change_live += 1,
                }
                let node = match &r#move {
                    Some(m) => m.to.clone(),
                    None => actions.last().map(|a| a.node.clone()).unwrap_or_default(),
                };
                let (namespace, name) = split(object);
                ObjectChange {
                    kind: object.kind.as_str(),
                    namespace,
                    name,
                    node,
                    effect,
                    r#move,
                    steps: actions
                        .iter()
                        .map(|a| Step {
                            node: a.node.clone(),
                            mark: a.symbol.mark().to_string(),
                            action: a.op.verb(),
                            reason: a.reason.clone(),
                            fields: fields(&a.changes),
                        })
                        .collect(),
                }
            })
            .collect();
        let notices: Vec<NoticeEntry> = self
            .notices
            .iter()
            .map(|n: &Notice| {
                match n.kind {
                    NoticeKind::RestartPending => summary.restart_pending += 1,
                    NoticeKind::Note => summary.notes += 1,
                    k if k.is_error() => summary.errors += 1,
                    _ => {}
                }
                let (namespace, name) = split(&n.object);
                NoticeEntry {
                    type_: notice_type(n.kind),
                    error: n.kind.is_error(),
                    kind: n.object.kind.as_str(),
                    namespace,
                    name,
                    node: n.node.clone(),
                    message: n.message.clone(),
                    fields: fields(&n.changes),
                }
            })
            .collect();
        PlanReport {
            api_version: API_VERSION,
            kind: KIND,
            target,
            exit_code: self.exit_code(),
            summary,
            changes,
            notices,
            node_notes: node_notes.to_vec(),
        }
    }
}
