//! Exhaustive exploration of the placement protocol (`virtkube::placement`): every
//! interleaving of two or three agents, one or two controllers, user edits of
//! `spec.nodeName`, a deletion, agent and controller crashes, libvirt completing or failing
//! a live migration on its own, and a node dying, being fenced by an administrator and
//! coming back.
//!
//! The actors decide with the very functions the agents and the controller run
//! (`agent_step`, `controller_step`); this file only plays the world around them:
//! - **The API server** holds one Domain (spec.nodeName, the claim, the finalizer, the
//!   deletion mark). Every write is a compare-and-swap against the version the writer read,
//!   as `placement::write::write_status` does; a stale writer loses.
//! - **Reads are snapshots** taken at one moment and used at a later one, with any number of
//!   other steps in between: a watch cache's staleness is exactly that.
//! - **Agents** cycle observe-libvirt → read-API → act (rule 4 of the protocol). A crash
//!   drops whatever they were doing.
//! - **libvirt** finishes or fails a started migration on its own; a dying node's guests
//!   die with it (their definitions stay), and an inbound migration to or from it fails.
//!
//! Checked in every reachable state: the guest runs on at most one node, and it runs only
//! on its holder or on the target of the move under way. Checked for every reachable
//! state: once faults and edits stop, the system can still reach a settled state — the
//! guest running on exactly one node (the requested one when it is alive), or, after a
//! deletion, the object gone with no copy left on any live node. The explored state counts
//! are printed.

use std::collections::{HashMap, VecDeque};

use virtkube::placement::{
    AgentStep, Claim, ControllerStep, Facts, Local, Look, Move, MoveEnd, NodeOracle, agent_step,
    controller_step,
};
use virtkube_crds::domain::MigrationState;

const NAMES: [&str; 3] = ["a", "b", "c"];

/// The API server's record of the one Domain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Rec {
    exists: bool,
    deleting: bool,
    finalizer: bool,
    requested: Option<u8>,
    holder: Option<u8>,
    mv: Option<(u8, u8, MigrationState)>,
}

impl Rec {
    fn facts(&self) -> Facts {
        Facts {
            deleting: self.deleting,
            requested: self.requested.map(|n| NAMES[n as usize].to_string()),
            claim: Claim {
                holder: self.holder.map(|n| NAMES[n as usize].to_string()),
                migration: self.mv.map(|(s, t, state)| Move {
                    source: NAMES[s as usize].to_string(),
                    target: NAMES[t as usize].to_string(),
                    state,
                }),
            },
        }
    }
}

fn node_index(name: &str) -> u8 {
    NAMES.iter().position(|n| *n == name).expect("known node") as u8
}

/// A snapshot of the record and whether it is still current (no write since).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct View {
    rec: Rec,
    fresh: bool,
}

/// What an agent saw of its libvirt: the copy's state and its incarnation (libvirt's
/// runtime id changes whenever a copy starts or arrives by migration).
type Seen = (Local, u8);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum AgentPc {
    /// About to look at its libvirt.
    Start,
    /// Looked at its libvirt; about to read the API.
    Observed(Seen),
    /// Read the API; about to act (with what it saw of its libvirt again and of a move's
    /// target, when it looked after the read).
    Decided(Seen, View, Option<Local>, Option<Local>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum CtlPc {
    /// Not part of this configuration.
    Off,
    Start,
    Decided(View),
}

/// At most this many nodes and controllers (fixed arrays keep a state small and
/// allocation-free: the explorations hold tens of millions of them).
const MAX_NODES: usize = 3;
const MAX_CTLS: usize = 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct World {
    nodes: u8,
    rec: Rec,
    local: [Local; MAX_NODES],
    /// Incarnation of each node's copy (mod 4).
    inc: [u8; MAX_NODES],
    alive: [bool; MAX_NODES],
    fenced: [bool; MAX_NODES],
    agents: [AgentPc; MAX_NODES],
    ctls: [CtlPc; MAX_CTLS],
    // Fault budgets left.
    edits: u8,
    deletes: u8,
    crashes: u8,
    deaths: u8,
}

#[derive(Debug, Clone, Copy)]
struct Config {
    nodes: usize,
    controllers: usize,
    edits: u8,
    deletes: u8,
    crashes: u8,
    deaths: u8,
}

struct Oracle<'a> {
    world: &'a World,
}

impl NodeOracle for Oracle<'_> {
    fn fenced(&self, node: &str) -> bool {
        self.world.fenced[node_index(node) as usize]
    }
    fn may_move(&self, _source: &str, target: &str) -> bool {
        let t = node_index(target) as usize;
        self.world.alive[t] && !self.world.fenced[t]
    }
    fn bind_to(&self, requested: Option<&str>) -> Option<String> {
        let usable = |i: usize| self.world.alive[i] && !self.world.fenced[i];
        match requested {
            Some(r) if usable(node_index(r) as usize) => Some(r.to_string()),
            Some(_) => None,
            None => (0..usize::from(self.world.nodes))
                .find(|&i| usable(i))
                .map(|i| NAMES[i].to_string()),
        }
    }
}

impl World {
    fn new(c: &Config) -> World {
        let mut ctls = [CtlPc::Off; MAX_CTLS];
        for c in ctls.iter_mut().take(c.controllers) {
            *c = CtlPc::Start;
        }
        World {
            nodes: c.nodes as u8,
            rec: Rec {
                exists: true,
                deleting: false,
                finalizer: false,
                requested: None,
                holder: None,
                mv: None,
            },
            local: [Local::Absent; MAX_NODES],
            inc: [0; MAX_NODES],
            alive: [true; MAX_NODES],
            fenced: [false; MAX_NODES],
            agents: [AgentPc::Start; MAX_NODES],
            ctls,
            edits: c.edits,
            deletes: c.deletes,
            crashes: c.crashes,
            deaths: c.deaths,
        }
    }

    /// A successful write: every earlier read is now stale.
    fn wrote(&mut self) {
        for a in &mut self.agents {
            if let AgentPc::Decided(_, v, _, _) = a {
                v.fresh = false;
            }
        }
        for c in &mut self.ctls {
            if let CtlPc::Decided(v) = c {
                v.fresh = false;
            }
        }
        if self.rec.deleting && !self.rec.finalizer {
            self.rec = Rec {
                exists: false,
                deleting: false,
                finalizer: false,
                requested: None,
                holder: None,
                mv: None,
            };
        }
    }

    /// A compare-and-swap write decided on `view`.
    fn cas(&mut self, view: &View, change: impl FnOnce(&mut Rec)) -> bool {
        if !view.fresh || !self.rec.exists {
            return false;
        }
        change(&mut self.rec);
        self.wrote();
        true
    }

    /// A copy comes to life on node `i` (started, or arrived by migration).
    fn born(&mut self, i: usize) {
        self.inc[i] = (self.inc[i] + 1) % 4;
    }

    fn running_nodes(&self) -> Vec<usize> {
        (0..usize::from(self.nodes))
            .filter(|&i| self.local[i].is_running())
            .collect()
    }

    /// The partner of node `i`'s migration job (the one other node with the other end).
    fn partner(&self, i: usize) -> Option<usize> {
        let want = match self.local[i] {
            Local::Outgoing => Local::Incoming,
            Local::Incoming => Local::Outgoing,
            _ => return None,
        };
        (0..usize::from(self.nodes)).find(|&j| j != i && self.local[j] == want)
    }
}

/// Whether a step is progress (agents, controllers, libvirt, an administrator confirming a
/// dead node fenced, a dead node coming back) or a fault (edits, deletes, crashes, deaths).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Progress,
    Fault,
}

fn agent_act(w: &World, i: usize) -> Vec<World> {
    let me = NAMES[i];
    let mut out = Vec::new();
    match w.agents[i] {
        AgentPc::Start => {
            let mut n = *w;
            n.agents[i] = AgentPc::Observed((w.local[i], w.inc[i]));
            out.push(n);
        }
        AgentPc::Observed(here) => {
            let mut n = *w;
            if w.rec.exists {
                n.agents[i] = AgentPc::Decided(
                    here,
                    View {
                        rec: w.rec,
                        fresh: true,
                    },
                    None,
                    None,
                );
            } else {
                // The resource is gone: the start-up sweep treats a marked copy of a
                // deleted resource as stale (an unbound claim).
                let gone = Rec {
                    exists: true,
                    deleting: false,
                    finalizer: false,
                    requested: None,
                    holder: None,
                    mv: None,
                };
                n.agents[i] = AgentPc::Decided(
                    here,
                    View {
                        rec: gone,
                        fresh: false,
                    },
                    None,
                    None,
                );
            }
            out.push(n);
        }
        AgentPc::Decided(seen, view, after, target) => {
            let look = Look {
                before: seen.0,
                after,
                target,
            };
            let step = agent_step(me, &view.rec.facts(), &look);
            let mut n = *w;
            n.agents[i] = AgentPc::Start;
            match step {
                AgentStep::Idle | AgentStep::Wait { .. } | AgentStep::WatchMigration { .. } => {}
                AgentStep::LookAgain => {
                    n.agents[i] = AgentPc::Decided(seen, view, Some(w.local[i]), target);
                }
                AgentStep::LookAtTarget { target: t } => {
                    let t = node_index(&t) as usize;
                    n.agents[i] = AgentPc::Decided(seen, view, after, Some(w.local[t]));
                }
                AgentStep::Converge => {
                    let mut ok = true;
                    if !view.rec.finalizer {
                        ok = n.cas(&view, |r| r.finalizer = true);
                    }
                    if ok && matches!(n.local[i], Local::Absent | Local::Stopped) {
                        n.local[i] = Local::Running;
                        n.born(i);
                    }
                }
                AgentStep::BeginMove { .. } => {
                    n.cas(&view, |r| {
                        if let Some(m) = &mut r.mv {
                            m.2 = MigrationState::Running;
                        }
                    });
                }
                AgentStep::Migrate { target } => {
                    let t = node_index(&target) as usize;
                    // libvirt starts the migration when the guest runs here and the target
                    // has no copy (it refuses otherwise, and the guest stays).
                    let mut started = n;
                    if n.local[i] == Local::Running && n.local[t] == Local::Absent && n.alive[t] {
                        started.local[i] = Local::Outgoing;
                        started.local[t] = Local::Incoming;
                    }
                    out.push(started);
                    // Or the agent's last attempt failed and it records the failure (it
                    // does so only after seeing the guest still running here).
                    n.cas(&view, |r| {
                        if let Some(m) = &mut r.mv {
                            m.2 = MoveEnd::Failed.state();
                        }
                    });
                }
                AgentStep::AbortMigration => {
                    if n.local[i] == Local::Outgoing {
                        if let Some(p) = n.partner(i) {
                            n.local[p] = Local::Absent;
                        }
                        n.local[i] = Local::Running;
                    }
                }
                AgentStep::Undefine => {
                    if n.local[i] == Local::Stopped {
                        n.local[i] = Local::Absent;
                    }
                }
                AgentStep::CompleteMove { target } => {
                    let t = node_index(&target);
                    n.cas(&view, |r| {
                        r.holder = Some(t);
                        if let Some(m) = &mut r.mv {
                            m.2 = MigrationState::Succeeded;
                        }
                    });
                }
                AgentStep::EndMove { end } => {
                    n.cas(&view, |r| {
                        if let Some(m) = &mut r.mv {
                            m.2 = end.state();
                        }
                    });
                }
                AgentStep::RemoveCopy => {
                    if matches!(n.local[i], Local::Running | Local::Stopped) {
                        n.local[i] = Local::Absent;
                    }
                }
                AgentStep::Finalize => {
                    n.cas(&view, |r| r.finalizer = false);
                }
                AgentStep::RemoveStaleCopy => {
                    // Only the very copy that was seen: destroyed when it still runs under
                    // the runtime id seen, undefined when it is still shut off (undefining
                    // a guest that started meanwhile would leave it running, transient:
                    // the model counts that as untouched).
                    let now = (n.local[i], n.inc[i]);
                    match (seen, now) {
                        ((Local::Running, a), (Local::Running, b)) if a == b => {
                            n.local[i] = Local::Absent;
                        }
                        ((Local::Running | Local::Stopped, _), (Local::Stopped, _)) => {
                            n.local[i] = Local::Absent;
                        }
                        _ => {}
                    }
                }
            }
            out.push(n);
        }
    }
    out
}

fn ctl_act(w: &World, c: usize) -> Vec<World> {
    let mut n = *w;
    match w.ctls[c] {
        CtlPc::Off => return Vec::new(),
        CtlPc::Start => {
            if !w.rec.exists {
                return Vec::new();
            }
            n.ctls[c] = CtlPc::Decided(View {
                rec: w.rec,
                fresh: true,
            });
        }
        CtlPc::Decided(view) => {
            n.ctls[c] = CtlPc::Start;
            let step = controller_step(&view.rec.facts(), &Oracle { world: w });
            match step {
                ControllerStep::Idle
                | ControllerStep::Unschedulable
                | ControllerStep::MoveWaits => {}
                ControllerStep::Bind { node } => {
                    let h = node_index(&node);
                    n.cas(&view, |r| r.holder = Some(h));
                }
                ControllerStep::ApproveMove { source, target } => {
                    let (s, t) = (node_index(&source), node_index(&target));
                    n.cas(&view, |r| r.mv = Some((s, t, MigrationState::Pending)));
                }
                ControllerStep::CancelMove => {
                    n.cas(&view, |r| {
                        if let Some(m) = &mut r.mv {
                            m.2 = MigrationState::Aborted;
                        }
                    });
                }
                ControllerStep::Unfence { holder } => {
                    let h = holder.as_deref().map(node_index);
                    n.cas(&view, |r| {
                        r.holder = h;
                        if let Some(m) = &mut r.mv
                            && matches!(m.2, MigrationState::Pending | MigrationState::Running)
                        {
                            m.2 = MigrationState::Aborted;
                        }
                    });
                }
                ControllerStep::Finalize => {
                    n.cas(&view, |r| r.finalizer = false);
                }
            }
        }
    }
    vec![n]
}

fn successors(w: &World, c: &Config) -> Vec<(Kind, World)> {
    let mut out = Vec::new();
    for i in 0..c.nodes {
        if w.alive[i] {
            for n in agent_act(w, i) {
                out.push((Kind::Progress, n));
            }
            if w.crashes > 0 && w.agents[i] != AgentPc::Start {
                let mut n = *w;
                n.agents[i] = AgentPc::Start;
                n.crashes -= 1;
                out.push((Kind::Fault, n));
            }
        }
    }
    for k in 0..c.controllers {
        for n in ctl_act(w, k) {
            out.push((Kind::Progress, n));
        }
        if w.crashes > 0 && w.ctls[k] != CtlPc::Start {
            let mut n = *w;
            n.ctls[k] = CtlPc::Start;
            n.crashes -= 1;
            out.push((Kind::Fault, n));
        }
    }
    // libvirt finishes or fails a migration on its own.
    for i in 0..c.nodes {
        if w.local[i] == Local::Outgoing
            && let Some(p) = w.partner(i)
        {
            let mut done = *w;
            done.local[i] = Local::Absent;
            done.local[p] = Local::Running;
            done.born(p);
            out.push((Kind::Progress, done));
            let mut failed = *w;
            failed.local[i] = Local::Running;
            failed.local[p] = Local::Absent;
            out.push((Kind::Progress, failed));
        }
    }
    // The user edits spec.nodeName or deletes the Domain.
    if w.rec.exists && !w.rec.deleting {
        if w.edits > 0 {
            for r in std::iter::once(None).chain((0..c.nodes as u8).map(Some)) {
                if r != w.rec.requested {
                    let mut n = *w;
                    n.rec.requested = r;
                    n.edits -= 1;
                    n.wrote();
                    out.push((Kind::Fault, n));
                }
            }
        }
        if w.deletes > 0 {
            let mut n = *w;
            n.deletes -= 1;
            n.rec.deleting = true;
            n.wrote();
            out.push((Kind::Fault, n));
        }
    }
    // A node dies (its guests with it), an administrator declares it fenced, it comes back.
    for i in 0..c.nodes {
        if w.alive[i] && w.deaths > 0 {
            let mut n = *w;
            n.deaths -= 1;
            n.alive[i] = false;
            if let Some(p) = w.partner(i) {
                n.local[p] = if w.local[p] == Local::Outgoing {
                    Local::Running
                } else {
                    Local::Absent
                };
            }
            n.local[i] = match w.local[i] {
                Local::Running | Local::Outgoing | Local::Stopped => Local::Stopped,
                Local::Incoming | Local::Absent => Local::Absent,
            };
            n.agents[i] = AgentPc::Start;
            out.push((Kind::Fault, n));
        }
        if !w.alive[i] && !w.fenced[i] {
            let mut n = *w;
            n.fenced[i] = true;
            out.push((Kind::Progress, n));
        }
        if !w.alive[i] {
            let mut n = *w;
            n.alive[i] = true;
            n.fenced[i] = false;
            out.push((Kind::Progress, n));
        }
    }
    out
}

/// The safety invariants; `Err` names the broken one.
fn check(w: &World) -> Result<(), String> {
    let running = w.running_nodes();
    if running.len() > 1 {
        return Err(format!("the guest runs on {} nodes", running.len()));
    }
    for &i in &running {
        let holder = w.rec.holder.map(usize::from) == Some(i);
        let arriving = matches!(w.rec.mv, Some((s, t, MigrationState::Running))
            if usize::from(t) == i && w.rec.holder == Some(s));
        if w.rec.exists && !holder && !arriving {
            return Err(format!(
                "the guest runs on {} which neither holds it nor receives a move",
                NAMES[i]
            ));
        }
    }
    Ok(())
}

/// The states the system should come to rest in.
fn settled(w: &World) -> bool {
    let agents_idle = w.agents.iter().all(|a| *a == AgentPc::Start);
    if !w.rec.exists {
        return (0..usize::from(w.nodes)).all(|i| !w.alive[i] || w.local[i] == Local::Absent);
    }
    if w.rec.deleting {
        return false;
    }
    let running = w.running_nodes();
    let Some(h) = w.rec.holder else { return false };
    let requested_ok = match w.rec.requested {
        None => true,
        Some(r) => r == h || !w.alive[usize::from(r)],
    };
    agents_idle
        && running == vec![usize::from(h)]
        && w.local[usize::from(h)] == Local::Running
        && w.rec
            .mv
            .is_none_or(|m| !matches!(m.2, MigrationState::Pending | MigrationState::Running))
        && requested_ok
}

struct Outcome {
    states: usize,
    edges: usize,
    settled: usize,
}

fn explore(c: Config) -> Outcome {
    let start = World::new(&c);
    let mut ids: HashMap<World, u32> = HashMap::new();
    let mut worlds: Vec<World> = Vec::new();
    // Reverse edges of progress steps only (for "can still settle").
    let mut back: Vec<Vec<u32>> = Vec::new();
    // The state each one was first reached from (for the path printed on a failure).
    let mut parent: Vec<u32> = Vec::new();
    let mut queue = VecDeque::new();
    ids.insert(start, 0);
    worlds.push(start);
    back.push(Vec::new());
    parent.push(0);
    queue.push_back(0u32);
    let mut edges = 0usize;
    while let Some(id) = queue.pop_front() {
        let w = worlds[id as usize];
        if let Err(broken) = check(&w) {
            panic!(
                "{broken} in a reachable state; path:\n{}",
                path_to(&worlds, &parent, id)
            );
        }
        for (kind, n) in successors(&w, &c) {
            let nid = match ids.get(&n) {
                Some(&nid) => nid,
                None => {
                    let nid = worlds.len() as u32;
                    ids.insert(n, nid);
                    worlds.push(n);
                    back.push(Vec::new());
                    parent.push(id);
                    queue.push_back(nid);
                    nid
                }
            };
            edges += 1;
            if kind == Kind::Progress && nid != id {
                back[nid as usize].push(id);
            }
        }
    }
    // Every state must be able to settle through progress steps alone.
    let mut can_settle = vec![false; worlds.len()];
    let mut work: Vec<u32> = Vec::new();
    for (i, w) in worlds.iter().enumerate() {
        if settled(w) {
            can_settle[i] = true;
            work.push(i as u32);
        }
    }
    let settled_count = work.len();
    while let Some(i) = work.pop() {
        for &p in &back[i as usize] {
            if !can_settle[p as usize] {
                can_settle[p as usize] = true;
                work.push(p);
            }
        }
    }
    if let Some(stuck) = can_settle.iter().position(|ok| !ok) {
        panic!(
            "a reachable state can never settle; path:\n{}",
            path_to(&worlds, &parent, stuck as u32)
        );
    }
    Outcome {
        states: worlds.len(),
        edges,
        settled: settled_count,
    }
}

/// The path from the start to state `id`, one line per state.
fn path_to(worlds: &[World], parent: &[u32], id: u32) -> String {
    let mut ids = vec![id];
    let mut at = id;
    while at != 0 {
        at = parent[at as usize];
        ids.push(at);
    }
    ids.reverse();
    ids.iter()
        .map(|&i| {
            let w = &worlds[i as usize];
            format!(
                "  rec={:?} local={:?} inc={:?} alive={:?} fenced={:?} agents={:?} ctls={:?}",
                w.rec, w.local, w.inc, w.alive, w.fenced, w.agents, w.ctls
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn report(name: &str, c: Config, o: &Outcome) {
    println!(
        "placement model [{name}]: {} nodes, {} controller(s), {} edits, {} deletes, {} crashes, {} node deaths: \
         {} states, {} transitions, {} settled states; no state runs the guest twice, every state can settle",
        c.nodes,
        c.controllers,
        c.edits,
        c.deletes,
        c.crashes,
        c.deaths,
        o.states,
        o.edges,
        o.settled
    );
}

/// Runs `c`, prints its counts and checks it explored something.
fn run(name: &str, c: Config) {
    let o = explore(c);
    report(name, c, &o);
    assert!(
        o.settled > 0 && o.states > 10_000,
        "the exploration reached too little: {} states",
        o.states
    );
}

// The quick configurations run with every `cargo test`; the larger ones (tens of millions of
// states, minutes in a release build) are `#[ignore]`d and run by `scripts/test` in release
// mode: `cargo test --release -p virtkube --test placement_model -- --include-ignored`.

#[test]
fn quick_two_agents_edits_delete_crash() {
    run(
        "quick",
        Config {
            nodes: 2,
            controllers: 1,
            edits: 2,
            deletes: 1,
            crashes: 1,
            deaths: 0,
        },
    );
}

#[test]
fn quick_node_loss_and_fencing() {
    run(
        "quick node loss",
        Config {
            nodes: 2,
            controllers: 1,
            edits: 1,
            deletes: 1,
            crashes: 0,
            deaths: 1,
        },
    );
}

#[test]
#[ignore = "minutes in a release build; scripts/test runs it with --release"]
fn full_two_agents_one_controller_edits_deletes_and_crashes() {
    run(
        "edits",
        Config {
            nodes: 2,
            controllers: 1,
            edits: 3,
            deletes: 1,
            crashes: 2,
            deaths: 0,
        },
    );
}

#[test]
#[ignore = "minutes in a release build; scripts/test runs it with --release"]
fn full_two_agents_two_controllers_and_a_node_loss() {
    run(
        "two controllers, node loss",
        Config {
            nodes: 2,
            controllers: 2,
            edits: 2,
            deletes: 1,
            crashes: 1,
            deaths: 1,
        },
    );
}

#[test]
#[ignore = "minutes in a release build; scripts/test runs it with --release"]
fn full_three_agents_redirected_moves() {
    run(
        "three nodes",
        Config {
            nodes: 3,
            controllers: 1,
            edits: 2,
            deletes: 1,
            crashes: 0,
            deaths: 0,
        },
    );
}
