//! Every interleaving of a node-local volume's handover with its Domain's copying move,
//! explored exhaustively with the real decisions: the controller's
//! [`handover`](virtkube::cluster::volumes::handover), the source agent's
//! [`source_step`](virtkube::cluster::volumes::source_step) and the holder agent's
//! [`ownership::claim`](virtkube::agent::ownership::claim), against libvirt pre-creating
//! the copy, completing or failing the migration, and the source's agent recording the
//! outcome. Each party's step is atomic here because each writes with a compare-and-swap on
//! what it read (a step decided on an older read is refused and decided again).
//!
//! Checked in every reachable state: the image the guest runs on (its current data) exists;
//! the key the Volume records is the key of an image on its holder's node. Checked in every
//! state where nothing can happen any more: the Volume is held where the guest runs, records
//! that image's key, has no transfer, and no stale image is left on the node the guest left;
//! no image was ever made empty in place of data.

use std::collections::{HashSet, VecDeque};

use serde_json::json;
use virtkube::agent::ownership::{ImageClaim, claim};
use virtkube::cluster::volumes::{Consumers, Handover, SourceStep, handover, source_step};
use virtkube::plan::observed::ObservedVolume;
use virtkube_crds::volume::TransferState;
use virtkube_crds::{Domain, Volume};

const NODES: [&str; 2] = ["node-a", "node-b"];
const A: usize = 0;
const B: usize = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Rec {
    Pending,
    Running,
    Succeeded,
    Failed,
}

impl Rec {
    fn word(self) -> &'static str {
        match self {
            Rec::Pending => "Pending",
            Rec::Running => "Running",
            Rec::Succeeded => "Succeeded",
            Rec::Failed => "Failed",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Img {
    key: u8,
    /// Holds the guest's current data.
    data: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct State {
    rec: Rec,
    /// The Domain's claim.
    holder: usize,
    /// Where the guest runs.
    guest: usize,
    img: [Option<Img>; 2],
    vol_holder: usize,
    vol_key: Option<u8>,
    transfer: Option<TransferState>,
    next_key: u8,
    /// An empty image was made for the volume while its data was on another node.
    emptied: bool,
}

fn domain(s: &State) -> Domain {
    serde_json::from_value(json!({
        "apiVersion": "virtkube.io/v1alpha1", "kind": "Domain",
        "metadata": {"name": "vm", "namespace": "ns", "uid": "uid-vm"},
        "spec": {"memory": {"size": "64Mi"}, "nodeName": "node-b",
                 "migration": {"allowCopyStorage": true},
                 "disks": [{"name": "d", "volume": "disk"}]},
        "status": {"nodeName": NODES[s.holder], "phase": "Running",
                   "migration": {"state": s.rec.word(), "sourceNode": "node-a", "targetNode": "node-b",
                                 "copiedVolumes": ["disk"]}}
    }))
    .expect("domain")
}

fn volume(s: &State) -> Volume {
    let mut status = json!({"nodeName": NODES[s.vol_holder], "phase": "Available"});
    if let Some(k) = s.vol_key {
        status["key"] = json!(key(k));
    }
    if let Some(t) = s.transfer {
        status["transfer"] = json!({"domain": "vm", "sourceNode": "node-a", "targetNode": "node-b",
                                    "state": serde_json::to_value(t).expect("state")});
    }
    serde_json::from_value(json!({
        "apiVersion": "virtkube.io/v1alpha1", "kind": "Volume",
        "metadata": {"name": "disk", "namespace": "ns", "uid": "uid-disk"},
        "spec": {"pool": "local", "capacity": "1Gi"},
        "status": status
    }))
    .expect("volume")
}

fn key(k: u8) -> String {
    format!("/pools/local/ns.disk#{k}")
}

fn observed(img: Option<Img>) -> Option<ObservedVolume> {
    img.map(|i| ObservedVolume {
        owned: false,
        key: key(i.key),
        path: "/pools/local/ns.disk".into(),
        capacity: 1 << 30,
        allocation: 0,
        format: None,
        backing_path: None,
    })
}

/// Every state one step away, with the step's name.
fn next(s: &State) -> Vec<(&'static str, State)> {
    let mut out = Vec::new();
    // The source's agent starts the approved move.
    if s.rec == Rec::Pending {
        let mut n = s.clone();
        n.rec = Rec::Running;
        out.push(("agent a starts the migration", n));
    }
    if s.rec == Rec::Running && s.guest == A {
        // libvirt pre-creates the copy in B's pool of the same name (an existing one is
        // reused and overwritten).
        if s.img[B].is_none() {
            let mut n = s.clone();
            n.img[B] = Some(Img {
                key: n.next_key,
                data: false,
            });
            n.next_key += 1;
            out.push(("libvirt pre-creates the copy on b", n));
        } else {
            let mut n = s.clone();
            n.guest = B;
            n.img[B] = n.img[B].map(|i| Img { data: true, ..i });
            n.img[A] = n.img[A].map(|i| Img { data: false, ..i });
            out.push(("libvirt completes the migration", n));
        }
        let mut n = s.clone();
        n.rec = Rec::Failed;
        out.push(("libvirt fails the migration", n));
    }
    // The source's agent records the outcome it sees (the guest gone, running on b).
    if s.rec == Rec::Running && s.guest == B {
        let mut n = s.clone();
        n.rec = Rec::Succeeded;
        n.holder = B;
        out.push(("agent a hands the claim over", n));
    }
    // The controller.
    let (dom, vol) = (domain(s), volume(s));
    let consumers = Consumers::of([&dom], [&vol]);
    if let Some(step) = handover(&vol, &consumers) {
        let mut n = s.clone();
        match step {
            Handover::Begin { .. } => n.transfer = Some(TransferState::Copying),
            Handover::Copied => n.transfer = Some(TransferState::Copied),
            Handover::Drop { .. } => n.transfer = None,
            Handover::Bind { target } => {
                n.vol_holder = NODES.iter().position(|x| *x == target).expect("node")
            }
        }
        out.push(("controller", n));
    }
    // The volume's holder's agent.
    let h = s.vol_holder;
    match source_step(
        vol.status.as_ref().and_then(|st| st.transfer.as_ref()),
        NODES[h],
    ) {
        SourceStep::RemoveStale => {
            let mut n = s.clone();
            // Only the image whose key the Volume recorded, and only if nothing on the node
            // reads it (the guest is not there).
            if let Some(i) = n.img[h]
                && Some(i.key) == n.vol_key
                && n.guest != h
            {
                n.img[h] = None;
            }
            n.vol_key = None;
            n.transfer = Some(TransferState::SourceRemoved);
            out.push(("source agent removes its stale image", n));
        }
        SourceStep::Wait => {}
        SourceStep::None | SourceStep::Keep => {
            let mut n = s.clone();
            match claim(&vol, observed(s.img[h]).as_ref()) {
                ImageClaim::MovedHere => {
                    n.vol_key = s.img[h].map(|i| i.key);
                    n.transfer = None;
                }
                // The agent never makes an image while a handover is under way.
                ImageClaim::Absent if s.transfer.is_none() => {
                    if s.guest != h {
                        n.emptied = true;
                    }
                    n.img[h] = Some(Img {
                        key: n.next_key,
                        data: false,
                    });
                    n.vol_key = Some(n.next_key);
                    n.next_key += 1;
                }
                _ => {}
            }
            if n != *s {
                out.push(("holder agent converges the volume", n));
            }
        }
    }
    out
}

fn check(s: &State) {
    assert!(
        s.img[s.guest].is_some_and(|i| i.data),
        "the guest's data is gone: {s:?}"
    );
    if let Some(k) = s.vol_key {
        assert!(
            s.img[s.vol_holder].is_some_and(|i| i.key == k),
            "the Volume records an image its holder does not have: {s:?}"
        );
    }
    assert!(
        !s.emptied,
        "an empty image was made in place of data: {s:?}"
    );
}

fn settled(s: &State) {
    assert_eq!(
        s.vol_holder, s.guest,
        "the volume is not where the guest runs: {s:?}"
    );
    assert_eq!(
        s.vol_key,
        s.img[s.guest].map(|i| i.key),
        "the volume does not record the guest's image: {s:?}"
    );
    assert_eq!(s.transfer, None, "a handover is left open: {s:?}");
    if s.guest == B {
        assert_eq!(s.img[A], None, "a stale image is left on node-a: {s:?}");
    }
}

fn explore(initial: State) -> (usize, usize, usize) {
    let mut seen = HashSet::new();
    let mut queue = VecDeque::from([initial.clone()]);
    seen.insert(initial);
    let (mut transitions, mut terminal) = (0, 0);
    while let Some(s) = queue.pop_front() {
        check(&s);
        let succ = next(&s);
        if succ.is_empty() {
            settled(&s);
            terminal += 1;
        }
        for (_, n) in succ {
            transitions += 1;
            if seen.insert(n.clone()) {
                queue.push_back(n);
            }
        }
    }
    (seen.len(), transitions, terminal)
}

#[test]
fn every_interleaving_of_a_copying_move_keeps_the_data_and_settles() {
    let clean = State {
        rec: Rec::Pending,
        holder: A,
        guest: A,
        img: [Some(Img { key: 1, data: true }), None],
        vol_holder: A,
        vol_key: Some(1),
        transfer: None,
        next_key: 2,
        emptied: false,
    };
    // A copy pre-created by an earlier move that failed is still on node-b.
    let leftover = State {
        img: [
            Some(Img { key: 1, data: true }),
            Some(Img {
                key: 2,
                data: false,
            }),
        ],
        next_key: 3,
        ..clean.clone()
    };
    let mut total = 0;
    for (name, initial) in [
        ("clean target", clean),
        ("leftover copy on the target", leftover),
    ] {
        let (states, transitions, terminal) = explore(initial);
        println!(
            "handover model ({name}): {states} states, {transitions} transitions, {terminal} settled states"
        );
        assert!(
            terminal >= 2,
            "both outcomes (moved, failed) must be reachable"
        );
        total += states;
    }
    // Both initial states explored, each past its first step.
    assert!(
        total >= 25,
        "the model explored too little to mean anything: {total}"
    );
}
