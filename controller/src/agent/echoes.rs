//! The agent's own acts coming back to it, recognised so they do not start another
//! reconcile: its finalizer patch returning through the Domain watch, and the libvirt
//! lifecycle events of its own define, start and removal; and a watch cache not yet showing the
//! agent's own last status write, recognised so no write is tried on it that must fail.
//!
//! Each echo is recognised exactly, and only once:
//! - a watch event is the echo of the agent's write when it carries the very
//!   `resourceVersion` that write returned (per UID). Any other version of the object (a
//!   finalizer someone else removed, a relist that skipped versions) passes, and so does the
//!   echo itself when it arrives before the write's answer was recorded;
//! - a libvirt event is the echo of the agent's call when a token set before the call
//!   (per libvirt domain, one per event the call causes) matches its type and detail. The
//!   event consumes the token, so a second event of the same kind (someone else's `virsh
//!   define`) passes; an event the agent did not cause (a crash, a `virsh destroy`) never
//!   matches any token the agent sets; a token whose event does not come within
//!   [`EXPECT_FOR`] is dropped, and every token is dropped when events may have been lost.
//!
//! Missing an echo costs one reconcile that finds everything converged; dropping an event
//! that was not an echo would delay drift repair until the next resync. The rules above
//! lean the first way wherever they have to choose.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use kube::runtime::watcher;
use virtkube_crds::Domain;
use virtkube_engine::DomainEventKind;

use crate::plan::Op;

/// How long a token waits for its libvirt event. libvirt sends the event as the call
/// returns; the margin covers a loaded machine without letting a token linger long enough
/// to meet someone else's act.
pub const EXPECT_FOR: Duration = Duration::from_secs(10);

/// One libvirt event the agent's own call is about to cause.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expected {
    /// The event's type.
    pub kind: DomainEventKind,
    /// The detail words (libvirt's, see `virtkube_engine::events::event_detail_name`) any
    /// one of which the event may carry.
    pub details: &'static [&'static str],
}

/// A token waiting for its event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Token {
    expected: Expected,
    until: Instant,
}

/// The events an operation on a domain causes, that the agent may take as its own: a
/// define (`added` for a new domain, `updated` for a redefinition) and a plain start
/// (`booted`). Nothing else: a start that first destroys a crashed guest, or a shutdown,
/// also report what happened to the guest, and stay triggers. (A removal the agent runs to
/// its end has its own, [`removal_events`].)
pub fn expected_events(op: &Op) -> &'static [Expected] {
    const DEFINED: Expected = Expected {
        kind: DomainEventKind::Defined,
        details: &["added", "updated"],
    };
    const BOOTED: Expected = Expected {
        kind: DomainEventKind::Started,
        details: &["booted"],
    };
    match op {
        Op::DefineDomain { .. } => &[DEFINED],
        Op::StartDomain { recover: false } => &[BOOTED],
        _ => &[],
    }
}

/// The events removing a domain causes (the deletion plan's graceful shutdown, destroyed
/// at its deadline, then the undefine), when the removal runs to its end inside the
/// agent's reconcile, which then goes on to the next step itself: the guest's stop, only
/// when it was `active`, and the undefine. Any other stop (a crash) and any other undefine
/// detail (a rename) stay triggers.
pub fn removal_events(active: bool) -> &'static [Expected] {
    const STOPPED: Expected = Expected {
        kind: DomainEventKind::Stopped,
        details: &["shutdown", "destroyed"],
    };
    const UNDEFINED: Expected = Expected {
        kind: DomainEventKind::Undefined,
        details: &["removed"],
    };
    if active {
        &[STOPPED, UNDEFINED]
    } else {
        &[UNDEFINED]
    }
}

/// Whether an event (`kind`, `detail`) at `now` is the echo of one of `tokens`; consumes the
/// matching token and drops expired ones (pure).
fn consume(tokens: &mut Vec<Token>, kind: DomainEventKind, detail: &str, now: Instant) -> bool {
    tokens.retain(|t| t.until > now);
    let found = tokens
        .iter()
        .position(|t| t.expected.kind == kind && t.expected.details.contains(&detail));
    match found {
        Some(i) => {
            tokens.remove(i);
            true
        }
        None => false,
    }
}

/// What the agent expects back from its own acts. One per agent, shared by the Domain
/// reconciler (which records), the Domain watch and the libvirt event forwarder (which
/// consult).
#[derive(Debug, Default)]
pub struct Echoes {
    /// Per Domain UID, the resourceVersion the agent's last metadata write returned.
    writes: Mutex<HashMap<String, String>>,
    /// Per libvirt domain name, the events the agent's calls are about to cause.
    events: Mutex<HashMap<String, Vec<Token>>>,
    /// Per Domain UID, the resourceVersion the agent's last status write replaced.
    replaced: Mutex<HashMap<String, String>>,
}

impl Echoes {
    /// Records that the agent's write of the object `uid` returned `resource_version`.
    pub fn wrote(&self, uid: &str, resource_version: &str) {
        if let Ok(mut writes) = self.writes.lock() {
            writes.insert(uid.to_string(), resource_version.to_string());
        }
    }

    /// Whether the watched version (`uid`, `resource_version`) is the echo of the agent's
    /// last write of it. The record is consumed by the first version of the object that
    /// gets here, echo or not: watch events come in order, so a different version means the
    /// echo went by unrecognised or was skipped.
    pub fn is_own_write(&self, uid: Option<&str>, resource_version: Option<&str>) -> bool {
        let (Some(uid), Some(rv)) = (uid, resource_version) else {
            return false;
        };
        let Ok(mut writes) = self.writes.lock() else {
            return false;
        };
        writes.remove(uid).is_some_and(|recorded| recorded == rv)
    }

    /// Records that the agent's status write replaced version `resource_version` of `uid`.
    pub fn replaced(&self, uid: &str, resource_version: &str) {
        if let Ok(mut replaced) = self.replaced.lock() {
            replaced.insert(uid.to_string(), resource_version.to_string());
        }
    }

    /// Whether the cached version (`uid`, `resource_version`) is the one the agent's last
    /// status write replaced: a compare-and-swap decided on it is bound to fail (409), so
    /// read fresh instead. Consumes the record: once asked, the cache has either caught up
    /// (it never goes back) or is about to be bypassed by a fresh read.
    pub fn is_replaced(&self, uid: Option<&str>, resource_version: Option<&str>) -> bool {
        let (Some(uid), Some(rv)) = (uid, resource_version) else {
            return false;
        };
        let Ok(mut replaced) = self.replaced.lock() else {
            return false;
        };
        replaced.remove(uid).is_some_and(|old| old == rv)
    }

    /// Sets a token for each event `ops` on the libvirt domain `name` are about to cause,
    /// each valid for [`EXPECT_FOR`] from `now`.
    pub fn expect<'a>(&self, name: &str, ops: impl IntoIterator<Item = &'a Op>, now: Instant) {
        self.expect_events(name, ops.into_iter().flat_map(expected_events), now);
    }

    /// Sets a token for each of `events` on the libvirt domain `name`, each valid for
    /// [`EXPECT_FOR`] from `now`.
    pub fn expect_events<'a>(
        &self,
        name: &str,
        events: impl IntoIterator<Item = &'a Expected>,
        now: Instant,
    ) {
        let tokens: Vec<Token> = events
            .into_iter()
            .map(|&expected| Token {
                expected,
                until: now + EXPECT_FOR,
            })
            .collect();
        if tokens.is_empty() {
            return;
        }
        if let Ok(mut events) = self.events.lock() {
            events.entry(name.to_string()).or_default().extend(tokens);
        }
    }

    /// Drops the tokens of the libvirt domain `name` (its calls failed: which of their
    /// events will come is unknown).
    pub fn forget(&self, name: &str) {
        if let Ok(mut events) = self.events.lock() {
            events.remove(name);
        }
    }

    /// Drops every token (events may have been lost: tokens can no longer be matched).
    pub fn forget_all(&self) {
        if let Ok(mut events) = self.events.lock() {
            events.clear();
        }
    }

    /// Forgets what was recorded of objects no longer routed here (`routed` says which UIDs
    /// are) and tokens expired at `now`. A record is consumed only by a later version or
    /// reconcile of its object, so without this the records of deleted or moved-away Domains
    /// (the version their last status write replaced, a finalizer patch whose echo came
    /// first, the expired tokens of a define whose event never came) would stay for the
    /// agent's lifetime. Run at every resync.
    pub fn prune(&self, routed: impl Fn(&str) -> bool, now: Instant) {
        if let Ok(mut writes) = self.writes.lock() {
            writes.retain(|uid, _| routed(uid));
            writes.shrink_to_fit();
        }
        if let Ok(mut replaced) = self.replaced.lock() {
            replaced.retain(|uid, _| routed(uid));
            replaced.shrink_to_fit();
        }
        if let Ok(mut events) = self.events.lock() {
            events.retain(|_, tokens| {
                tokens.retain(|t| t.until > now);
                !tokens.is_empty()
            });
            events.shrink_to_fit();
        }
    }

    /// Records held: (finalizer writes, replaced versions, domains with tokens).
    pub fn held(&self) -> (usize, usize, usize) {
        let len = |m: &Mutex<HashMap<String, String>>| m.lock().map_or(0, |m| m.len());
        (
            len(&self.writes),
            len(&self.replaced),
            self.events.lock().map_or(0, |e| e.len()),
        )
    }

    /// Whether the libvirt event (`name`, `kind`, `detail`) at `now` is the echo of the
    /// agent's own call; consumes its token.
    pub fn is_own_event(
        &self,
        name: &str,
        kind: DomainEventKind,
        detail: &str,
        now: Instant,
    ) -> bool {
        let Ok(mut events) = self.events.lock() else {
            return false;
        };
        let Some(tokens) = events.get_mut(name) else {
            return false;
        };
        let own = consume(tokens, kind, detail, now);
        if tokens.is_empty() {
            events.remove(name);
        }
        own
    }
}

/// The Domain watch without the echoes of the agent's own metadata writes: the reconcile
/// that wrote went on from the object the write returned. Goes after the trigger filter
/// (`predicate_filter(domain::trigger_hash)`), which must see every version: a finalizer
/// someone else removes after the agent's echo is a change from that echo, and a trigger.
pub fn without_own_writes<S>(
    domains: S,
    echoes: Arc<Echoes>,
) -> impl Stream<Item = Result<Domain, watcher::Error>> + Send
where
    S: Stream<Item = Result<Domain, watcher::Error>> + Send,
{
    domains.filter(move |d| {
        let own = d.as_ref().is_ok_and(|d| {
            echoes.is_own_write(
                d.metadata.uid.as_deref(),
                d.metadata.resource_version.as_deref(),
            )
        });
        if own {
            tracing::debug!("watch event of the agent's own finalizer write: nothing to reconcile");
        }
        futures::future::ready(!own)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::Preserve;
    use crate::plan::desired::{DesiredState, Nodes};
    use DomainEventKind::*;
    use virtkube_crds::manifest::{Manifest, Object, Source};

    fn define() -> Op {
        let mut dom = virtkube_crds::Domain::new(
            "vm",
            serde_json::from_value(serde_json::json!({"memory": {"size": "64Mi"}})).unwrap(),
        );
        dom.metadata.namespace = Some("ns".into());
        let manifest = Manifest {
            source: Source {
                file: "vm.yaml".into(),
                document: 1,
            },
            object: Object::Domain(Box::new(dom)),
        };
        let (desired, notices) = DesiredState::from_manifests(&[manifest], &Nodes::single("a"));
        assert!(notices.is_empty(), "{notices:?}");
        Op::DefineDomain {
            domain: Box::new(desired.domains[0].clone()),
            preserve: Preserve::default(),
        }
    }

    fn start() -> Op {
        Op::StartDomain { recover: false }
    }

    #[test]
    fn only_a_plain_define_and_start_are_expected_back() {
        assert_eq!(expected_events(&define())[0].kind, Defined);
        assert_eq!(expected_events(&start())[0].kind, Started);
        for op in [
            Op::StartDomain { recover: true },
            Op::StopDomain,
            Op::DeleteDomain,
            Op::SuspendDomain,
            Op::ResumeDomain,
        ] {
            assert!(expected_events(&op).is_empty(), "{op:?}");
        }
    }

    #[test]
    fn a_token_matches_one_event_of_its_kind_and_detail_once() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        // (event kind, detail, ms after the tokens were set, is it the agent's own?)
        let table: &[(DomainEventKind, &str, u64, bool)] = &[
            // A guest crash or a `virsh destroy` never matches what the agent expects.
            (Stopped, "crashed", 1, false),
            (Crashed, "panicked", 1, false),
            (Stopped, "destroyed", 2, false),
            // The agent's own define and start.
            (Defined, "added", 3, true),
            (Started, "booted", 4, true),
            // The same again: the tokens are spent (someone else's define and start).
            (Defined, "updated", 5, false),
            (Started, "booted", 6, false),
        ];
        let echoes = Echoes::default();
        echoes.expect("ns.vm", &[define(), start()], t0);
        for &(kind, detail, ms, own) in table {
            assert_eq!(
                echoes.is_own_event("ns.vm", kind, detail, at(ms)),
                own,
                "{kind:?} {detail} at {ms} ms"
            );
        }
    }

    #[test]
    fn a_removal_expects_its_stop_only_when_the_guest_ran_and_its_undefine() {
        let t0 = Instant::now();
        // A running guest removed: the stop (graceful, or destroyed at the deadline) and the
        // undefine are the agent's; a crash during it, a rename, or a second stop are not.
        let echoes = Echoes::default();
        echoes.expect_events("ns.vm", removal_events(true), t0);
        assert!(!echoes.is_own_event("ns.vm", Stopped, "crashed", t0));
        assert!(!echoes.is_own_event("ns.vm", Undefined, "renamed", t0));
        assert!(echoes.is_own_event("ns.vm", Stopped, "shutdown", t0));
        assert!(!echoes.is_own_event("ns.vm", Stopped, "destroyed", t0));
        assert!(echoes.is_own_event("ns.vm", Undefined, "removed", t0));
        assert!(!echoes.is_own_event("ns.vm", Undefined, "removed", t0));
        // A stopped guest removed: only the undefine; a stop is someone else's.
        echoes.expect_events("ns.off", removal_events(false), t0);
        assert!(!echoes.is_own_event("ns.off", Stopped, "destroyed", t0));
        assert!(echoes.is_own_event("ns.off", Undefined, "removed", t0));
        // The deadline's forced stop is the agent's too.
        echoes.expect_events("ns.slow", removal_events(true), t0);
        assert!(echoes.is_own_event("ns.slow", Stopped, "destroyed", t0));
    }

    #[test]
    fn tokens_are_per_domain_expire_and_can_be_forgotten() {
        let t0 = Instant::now();
        let echoes = Echoes::default();
        echoes.expect("ns.a", &[start()], t0);
        // Another domain's start is not this one's.
        assert!(!echoes.is_own_event("ns.b", Started, "booted", t0));
        // Too late: the token expired.
        assert!(!echoes.is_own_event("ns.a", Started, "booted", t0 + EXPECT_FOR));
        echoes.expect("ns.a", &[define()], t0);
        echoes.forget("ns.a");
        assert!(!echoes.is_own_event("ns.a", Defined, "added", t0));
        echoes.expect("ns.a", &[define()], t0);
        echoes.forget_all();
        assert!(!echoes.is_own_event("ns.a", Defined, "added", t0));
        // Within the time, in order.
        echoes.expect("ns.a", &[define()], t0);
        assert!(echoes.is_own_event("ns.a", Defined, "updated", t0 + EXPECT_FOR / 2));
    }

    #[test]
    fn only_the_version_the_agent_wrote_is_its_echo_and_only_once() {
        // (recorded, seen, is it the agent's own?)
        let table: &[(Option<&str>, Option<&str>, bool)] = &[
            (Some("7"), Some("7"), true),
            // A later version (someone removed the finalizer again) or a relist past it.
            (Some("7"), Some("9"), false),
            (None, Some("7"), false),
            (Some("7"), None, false),
        ];
        for &(recorded, seen, own) in table {
            let echoes = Echoes::default();
            if let Some(rv) = recorded {
                echoes.wrote("uid-1", rv);
            }
            assert_eq!(
                echoes.is_own_write(Some("uid-1"), seen),
                own,
                "{recorded:?} {seen:?}"
            );
            // Consumed either way: the same version again is not an echo any more.
            assert!(!echoes.is_own_write(Some("uid-1"), seen));
        }
        let echoes = Echoes::default();
        echoes.wrote("uid-1", "7");
        assert!(
            !echoes.is_own_write(Some("uid-2"), Some("7")),
            "another object"
        );
        assert!(echoes.is_own_write(Some("uid-1"), Some("7")));
    }

    #[test]
    fn the_records_of_domains_no_longer_routed_here_and_expired_tokens_are_forgotten() {
        let t0 = Instant::now();
        let echoes = Echoes::default();
        // Left behind by objects since deleted: an echo that came before its record, the
        // version a last status write replaced, a define whose event never came.
        echoes.wrote("gone-1", "7");
        echoes.replaced("gone-2", "8");
        echoes.expect("ns.gone", &[define()], t0);
        // Still routed here, tokens still waiting.
        echoes.wrote("kept", "9");
        echoes.replaced("kept", "10");
        echoes.expect("ns.kept", &[start()], t0 + EXPECT_FOR);
        assert_eq!(echoes.held(), (2, 2, 2));
        echoes.prune(
            |uid| uid == "kept",
            t0 + EXPECT_FOR + Duration::from_millis(1),
        );
        assert_eq!(echoes.held(), (1, 1, 1));
        assert!(echoes.is_own_write(Some("kept"), Some("9")));
        assert!(echoes.is_replaced(Some("kept"), Some("10")));
        assert!(echoes.is_own_event(
            "ns.kept",
            Started,
            "booted",
            t0 + EXPECT_FOR + Duration::from_millis(2)
        ));
        assert!(!echoes.is_own_write(Some("gone-1"), Some("7")));
        assert!(!echoes.is_replaced(Some("gone-2"), Some("8")));
        assert!(!echoes.is_own_event("ns.gone", Defined, "added", t0));
        assert_eq!(echoes.held(), (0, 0, 0));
    }

    #[test]
    fn a_cached_copy_is_stale_only_when_it_is_the_version_the_agent_wrote_over() {
        // (replaced, cached, is the cached copy known stale?)
        let table: &[(Option<&str>, Option<&str>, bool)] = &[
            (Some("7"), Some("7"), true),
            // The cache caught up with the write (or went past it).
            (Some("7"), Some("8"), false),
            (None, Some("7"), false),
            (Some("7"), None, false),
        ];
        for &(replaced, cached, stale) in table {
            let echoes = Echoes::default();
            if let Some(rv) = replaced {
                echoes.replaced("uid-1", rv);
            }
            assert_eq!(
                echoes.is_replaced(Some("uid-1"), cached),
                stale,
                "{replaced:?} {cached:?}"
            );
            assert!(!echoes.is_replaced(Some("uid-1"), cached), "asked once");
        }
        let echoes = Echoes::default();
        echoes.replaced("uid-1", "7");
        assert!(
            !echoes.is_replaced(Some("uid-2"), Some("7")),
            "another object"
        );
    }
}
