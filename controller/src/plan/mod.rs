//! The planner: a pure function from (desired, observed) to an ordered [`Plan`].
//!
//! Guarantees, which the tests check:
//! - **Pure**: no I/O; the same inputs give the same plan.
//! - **Ordered by dependencies**: pools, then volumes, then networks, then domains; deletions
//!   in reverse (domains, networks, volumes, pools). Every action's `depends_on` points to
//!   earlier actions only, so running the list in order is always valid and an executor may
//!   run independent actions in parallel.
//! - **Only what the user set is compared**: values libvirt fills in (UUIDs, MACs, PCI
//!   addresses, default models, the expanded machine type) never count as a difference, so a
//!   converged host plans to nothing.
//! - **Ownership**: an object without virtkube's mark, or with another resource's mark, is
//!   never changed or deleted; a name clash is a [`NoticeKind::Conflict`] naming both.
//! - **Data is kept**: a volume with `reclaimPolicy: Retain` (or whose policy is unknown) is
//!   never deleted; a volume or network still used by a domain that stays is not deleted.

pub mod backend;
pub mod cluster;
pub mod dependents;
pub mod desired;
mod domain;
pub mod host_devices;
pub mod json;
pub mod observed;
pub mod render;
pub mod reported;
pub mod simulate;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;

use desired::{
    DesiredDomain, DesiredMigration, DesiredNetwork, DesiredPool, DesiredState, VolumeOrigin,
};
use observed::{DhcpLease, DnsEntry, ObservedNetwork, ObservedState, OwnerMark, PoolSourceView};

/// The kinds of host objects, in dependency order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ObjectKind {
    /// A storage pool.
    StoragePool,
    /// A storage volume.
    Volume,
    /// A network.
    Network,
    /// A domain.
    Domain,
}

impl ObjectKind {
    /// The Kubernetes kind name.
    pub fn as_str(self) -> &'static str {
        match self {
            ObjectKind::StoragePool => "StoragePool",
            ObjectKind::Volume => "Volume",
            ObjectKind::Network => "Network",
            ObjectKind::Domain => "Domain",
        }
    }
}

impl fmt::Display for ObjectKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which object an action or notice is about.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectRef {
    /// Kind.
    pub kind: ObjectKind,
    /// libvirt name (for volumes: the volume name; the pool is in the operation).
    pub name: String,
    /// As users write it (`namespace/name` or `name`).
    pub display: String,
}

impl ObjectRef {
    /// A reference.
    pub fn new(kind: ObjectKind, name: &str, display: &str) -> Self {
        Self {
            kind,
            name: name.to_string(),
            display: display.to_string(),
        }
    }
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.kind, self.display)
    }
}

/// How a reviewer should read an action.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Symbol {
    /// `+`: creates an object (or a step of creating it).
    Create,
    /// `~`: changes it live (or its definition while it is stopped).
    Live,
    /// `!`: restarts the guest to apply the change (`updatePolicy: Restart`).
    Restart,
    /// `-`: deletes it.
    Delete,
}

impl Symbol {
    /// The one-character mark.
    pub fn mark(self) -> char {
        match self {
            Symbol::Create => '+',
            Symbol::Live => '~',
            Symbol::Restart => '!',
            Symbol::Delete => '-',
        }
    }
}

/// One field's difference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// Field path in the spec (`cpu.vcpus`).
    pub field: String,
    /// What the host has (`(none)` when absent).
    pub before: String,
    /// What the manifest asks for.
    pub after: String,
}

impl Change {
    /// A change.
    pub fn new(field: &str, before: impl fmt::Display, after: impl fmt::Display) -> Self {
        Self {
            field: field.to_string(),
            before: before.to_string(),
            after: after.to_string(),
        }
    }
}

/// What libvirt keeps that a redefinition must carry over.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Preserve {
    /// The domain's UUID (libvirt refuses a redefinition under a new UUID).
    pub uuid: Option<String>,
    /// Generated MACs, per desired interface index, for interfaces without a user MAC.
    pub macs: Vec<Option<String>>,
    /// Whether the definition carries the "first start owed" note: set for a domain defined
    /// to be started right after, kept by redefinitions until the start happens.
    pub start_owed: bool,
}

/// A running guest's disk, through which a volume it holds open is grown.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveDisk {
    /// The domain's libvirt name.
    pub domain: String,
    /// The domain's ownership mark (the engine checks it before the resize).
    pub owner: OwnerMark,
    /// The guest's disk target (`vda`), as the plan shows it (the executor resizes by the
    /// image's path).
    pub target: String,
}

/// One live change of a network's DHCP leases or DNS entries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetworkUpdate {
    /// Add a fixed lease.
    AddDhcpHost(DhcpLease),
    /// Replace the lease of this MAC address.
    ModifyDhcpHost(DhcpLease),
    /// Remove a lease (as observed: libvirt matches every attribute).
    DeleteDhcpHost(DhcpLease),
    /// Add DNS names for an address.
    AddDnsHost(DnsEntry),
    /// Remove an address's DNS names (libvirt cannot modify them: a change is a delete and
    /// an add).
    DeleteDnsHost(DnsEntry),
    /// Add a DHCP range.
    AddDhcpRange(DhcpRangeUpdate),
    /// Remove a DHCP range (libvirt matches start and end).
    DeleteDhcpRange(DhcpRangeUpdate),
}

/// A DHCP range changed live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DhcpRangeUpdate {
    /// First address.
    pub start: String,
    /// Last address.
    pub end: String,
}

impl std::fmt::Display for DhcpRangeUpdate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.start, self.end)
    }
}

/// What an action does.
#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    /// Define a storage pool.
    DefinePool(Box<DesiredPool>),
    /// Build it: create its target directory and, with `make_storage`, the volume group
    /// (`logical`) or filesystem (`fs`) on its source devices, never over a device holding
    /// data.
    BuildPool {
        /// Also make the storage on the devices (`spec.source.build`).
        make_storage: bool,
    },
    /// Start it.
    StartPool,
    /// Set its autostart flag.
    SetPoolAutostart(bool),
    /// Stop and undefine it (its files stay).
    DeletePool,
    /// Define a network.
    DefineNetwork(Box<DesiredNetwork>),
    /// Start it.
    StartNetwork,
    /// Set its autostart flag.
    SetNetworkAutostart(bool),
    /// Change one DHCP lease or DNS entry live (`virNetworkUpdate`; the network keeps
    /// running, its guests stay attached).
    UpdateNetwork(NetworkUpdate),
    /// Stop and undefine it.
    DeleteNetwork,
    /// Create a volume.
    CreateVolume {
        /// Pool.
        pool: String,
        /// Capacity in bytes (`None`: a clone's source size).
        capacity: Option<u64>,
        /// Format word.
        format: String,
        /// Initial data.
        source: VolumeOrigin,
    },
    /// Grow a volume.
    ResizeVolume {
        /// Pool.
        pool: String,
        /// Key observed (the ownership proof).
        key: String,
        /// New capacity in bytes.
        capacity: u64,
        /// The running guest that holds the image open, through which it grows live
        /// (QEMU keeps the image's lock, so the pool cannot resize it); `None`: through the
        /// pool.
        live: Option<LiveDisk>,
    },
    /// Delete a volume.
    DeleteVolume {
        /// Pool.
        pool: String,
        /// Key observed.
        key: String,
    },
    /// Define (or redefine, while stopped) a domain.
    DefineDomain {
        /// The definition.
        domain: Box<DesiredDomain>,
        /// What to keep from the current definition.
        preserve: Preserve,
    },
    /// Start a domain (`recover`: destroy a crashed one first).
    StartDomain {
        /// Destroy the crashed process first.
        recover: bool,
    },
    /// Shut a domain down gracefully (destroy after the deadline).
    StopDomain,
    /// Suspend it.
    SuspendDomain,
    /// Resume it.
    ResumeDomain,
    /// Set online vCPUs live.
    SetVcpus(u32),
    /// Set current memory live, KiB.
    SetMemory(u64),
    /// Pin one vCPU live.
    PinVcpu {
        /// vCPU index.
        vcpu: u32,
        /// Canonical cpuset.
        cpuset: String,
    },
    /// Pin the emulator threads live.
    PinEmulator(String),
    /// Set the CPU weight and bandwidth fields that are set, live and in the definition.
    SetCpuTune(observed::CpuTune),
    /// Set the autostart flag.
    SetDomainAutostart(bool),
    /// Plug a disk into the running domain and its definition (hotplug).
    AttachDisk(Box<desired::DesiredDisk>),
    /// Unplug a disk (by guest device) from the running domain and its definition; a guest
    /// that does not release it keeps it until it restarts.
    DetachDisk {
        /// Guest device (`vdb`).
        target: String,
    },
    /// Plug a NIC into the running domain and its definition (hotplug).
    AttachInterface(Box<desired::DesiredNic>),
    /// Unplug a NIC (by MAC) from the running domain and its definition.
    DetachInterface {
        /// Its MAC address.
        mac: String,
    },
    /// Pass a host PCI device through to the running domain and its definition (hotplug).
    AttachHostDevice(Box<desired::DesiredHostDevice>),
    /// Unplug a host PCI device (by address) from the running domain and its definition.
    DetachHostDevice {
        /// Its PCI address on the host.
        address: String,
    },
    /// Shut down, redefine, start again (`updatePolicy: Restart`).
    RestartDomain {
        /// The new definition.
        domain: Box<DesiredDomain>,
        /// What to keep.
        preserve: Preserve,
    },
    /// Shut down within a deadline, destroy, undefine.
    DeleteDomain,
    /// Live-migrate from this action's node to `to` (peer-to-peer).
    MigrateDomain {
        /// Destination node.
        to: String,
        /// Settings.
        migration: DesiredMigration,
    },
}

impl Op {
    /// A short verb for progress lines and the plan.
    pub fn verb(&self) -> String {
        match self {
            Op::DefinePool(_) | Op::DefineNetwork(_) => "define".into(),
            Op::BuildPool {
                make_storage: false,
            } => "build".into(),
            Op::BuildPool { make_storage: true } => "build storage".into(),
            Op::StartPool | Op::StartNetwork => "start".into(),
            Op::UpdateNetwork(u) => match u {
                NetworkUpdate::AddDhcpHost(h) => format!("add DHCP host {h}"),
                NetworkUpdate::ModifyDhcpHost(h) => format!("change DHCP host {h}"),
                NetworkUpdate::DeleteDhcpHost(h) => format!("remove DHCP host {}", h.mac),
                NetworkUpdate::AddDnsHost(h) => format!("add DNS host {h}"),
                NetworkUpdate::DeleteDnsHost(h) => format!("remove DNS host {}", h.ip),
                NetworkUpdate::AddDhcpRange(r) => format!("add DHCP range {r}"),
                NetworkUpdate::DeleteDhcpRange(r) => format!("remove DHCP range {r}"),
            },
            Op::SetPoolAutostart(on) | Op::SetNetworkAutostart(on) | Op::SetDomainAutostart(on) => {
                format!("autostart {}", if *on { "on" } else { "off" })
            }
            Op::DeletePool | Op::DeleteNetwork | Op::DeleteVolume { .. } => "delete".into(),
            Op::CreateVolume { source, .. } => match source {
                VolumeOrigin::Empty => "create".into(),
                VolumeOrigin::Clone(s) => format!("clone from {s}"),
                VolumeOrigin::Backing(s) => format!("create over backing {s}"),
            },
            Op::ResizeVolume { live: None, .. } => "grow".into(),
            Op::ResizeVolume {
                live: Some(disk), ..
            } => format!("grow live through domain {} ({})", disk.domain, disk.target),
            Op::DefineDomain { .. } => "define".into(),
            Op::StartDomain { recover: false } => "start".into(),
            Op::StartDomain { recover: true } => "destroy the crashed guest and start".into(),
            Op::StopDomain => "shut down".into(),
            Op::SuspendDomain => "suspend".into(),
            Op::ResumeDomain => "resume".into(),
            Op::SetVcpus(n) => format!("set vCPUs to {n}"),
            Op::SetMemory(k) => format!("set memory to {}", render::kib(*k)),
            Op::PinVcpu { vcpu, cpuset } => format!("pin vCPU {vcpu} to {cpuset}"),
            Op::PinEmulator(c) => format!("pin emulator to {c}"),
            Op::SetCpuTune(_) => "set CPU weight and bandwidth".into(),
            Op::AttachDisk(d) => format!("plug in disk {} ({})", d.name, d.target),
            Op::DetachDisk { target } => format!("unplug disk {target}"),
            Op::AttachInterface(n) => format!("plug in NIC {} on {}", n.name, n.network),
            Op::DetachInterface { mac } => format!("unplug NIC {mac}"),
            Op::AttachHostDevice(h) => format!("plug in host device {} ({})", h.name, h.address),
            Op::DetachHostDevice { address } => format!("unplug host device {address}"),
            Op::RestartDomain { .. } => "restart with the new definition".into(),
            Op::DeleteDomain => "shut down, destroy, undefine".into(),
            Op::MigrateDomain { to, .. } => format!("live-migrate to {to}"),
        }
    }
}

/// One step of a plan.
#[derive(Debug, Clone, PartialEq)]
pub struct Action {
    /// Position in the plan.
    pub id: usize,
    /// The node it runs against.
    pub node: String,
    /// The object.
    pub object: ObjectRef,
    /// The owner the engine must find on the object (and writes on created ones).
    pub owner: OwnerMark,
    /// What to do.
    pub op: Op,
    /// How to read it.
    pub symbol: Symbol,
    /// Why.
    pub reason: String,
    /// Field-level before → after.
    pub changes: Vec<Change>,
    /// Earlier actions that must succeed first.
    pub depends_on: Vec<usize>,
}

/// Something the plan reports without acting on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum NoticeKind {
    /// A change waits for the guest's next stop (`updatePolicy: Deferred`).
    RestartPending,
    /// A change virtkube refuses (shrinking a volume, changing an immutable field).
    Forbidden,
    /// A name clash with an object virtkube does not own.
    Conflict,
    /// A deletion waits for a user of the object to go away (retried at the next apply).
    Blocked,
    /// A volume kept on disk by its reclaim policy.
    Retained,
    /// The manifests ask for something impossible (unknown node, missing reference).
    Invalid,
    /// The manifests ask for something the pool's type cannot hold or do (a qcow2 image or
    /// an overlay in an LVM pool, growing a logical volume): the spec must change.
    Unsupported,
    /// Something the reader should know that changes nothing (a preview against a cluster:
    /// a status behind its spec, a move under way).
    Note,
}

impl NoticeKind {
    /// Whether this notice makes `plan`/`apply` fail (exit code 1).
    pub fn is_error(self) -> bool {
        matches!(
            self,
            NoticeKind::Forbidden
                | NoticeKind::Conflict
                | NoticeKind::Invalid
                | NoticeKind::Unsupported
        )
    }

    /// A short label.
    pub fn label(self) -> &'static str {
        match self {
            NoticeKind::RestartPending => "needs restart",
            NoticeKind::Forbidden => "forbidden",
            NoticeKind::Conflict => "conflict",
            NoticeKind::Blocked => "blocked",
            NoticeKind::Retained => "retained",
            NoticeKind::Invalid => "invalid",
            NoticeKind::Unsupported => "unsupported",
            NoticeKind::Note => "note",
        }
    }
}

/// A report attached to a plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    /// What kind.
    pub kind: NoticeKind,
    /// About which object.
    pub object: ObjectRef,
    /// On which node (empty when not placed).
    pub node: String,
    /// The explanation.
    pub message: String,
    /// Field-level before → after, when it is about changes.
    pub changes: Vec<Change>,
    /// For a [`NoticeKind::Blocked`] deletion: what still uses the object, as people read
    /// them (`Domain team/web`, `libvirt domain legacy (not virtkube's)`).
    pub users: Vec<String>,
}

/// An ordered list of actions, and what the planner reports without acting.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Plan {
    /// Actions in a valid execution order.
    pub actions: Vec<Action>,
    /// Reports.
    pub notices: Vec<Notice>,
}

impl Plan {
    /// Nothing to do.
    pub fn is_empty(&self) -> bool {
        self.actions.is_empty()
    }

    /// Whether any notice is an error.
    pub fn has_errors(&self) -> bool {
        self.notices.iter().any(|n| n.kind.is_error())
    }

    /// Appends `other`'s actions (after this plan's, their ids and dependencies renumbered)
    /// and notices.
    pub fn append(&mut self, other: Plan) {
        let offset = self.actions.len();
        self.actions.extend(other.actions.into_iter().map(|mut a| {
            a.id += offset;
            for d in &mut a.depends_on {
                *d += offset;
            }
            a
        }));
        self.notices.extend(other.notices);
    }
}

/// What a plan covers beyond the manifests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PlanOptions {
    /// Delete owned objects (from local manifests) that the manifests no longer describe.
    pub prune: bool,
}

type ObjKey = (ObjectKind, String, String);

/// Accumulates actions, chaining those on the same object and recording dependencies.
#[derive(Default)]
struct Builder {
    actions: Vec<Action>,
    notices: Vec<Notice>,
    last: HashMap<ObjKey, usize>,
}

impl Builder {
    #[allow(clippy::too_many_arguments)]
    fn push(
        &mut self,
        node: &str,
        object: &ObjectRef,
        owner: &OwnerMark,
        op: Op,
        symbol: Symbol,
        reason: impl Into<String>,
        changes: Vec<Change>,
        deps: &[ObjKey],
    ) -> usize {
        let id = self.actions.len();
        let key = (object.kind, node.to_string(), object.name.clone());
        let mut depends_on: BTreeSet<usize> = deps
            .iter()
            .filter_map(|k| self.last.get(k).copied())
            .collect();
        if let Some(prev) = self.last.get(&key) {
            depends_on.insert(*prev);
        }
        self.actions.push(Action {
            id,
            node: node.to_string(),
            object: object.clone(),
            owner: owner.clone(),
            op,
            symbol,
            reason: reason.into(),
            changes,
            depends_on: depends_on.into_iter().collect(),
        });
        self.last.insert(key, id);
        id
    }

    /// Pushes steps on one object, each after the previous one on it.
    fn chain(
        &mut self,
        node: &str,
        object: &ObjectRef,
        owner: &OwnerMark,
        symbol: Symbol,
        steps: impl IntoIterator<Item = Step>,
    ) {
        for (op, why, changes) in steps {
            self.push(node, object, owner, op, symbol, why, changes, &[]);
        }
    }

    fn notice(
        &mut self,
        kind: NoticeKind,
        object: &ObjectRef,
        node: &str,
        message: impl Into<String>,
        changes: Vec<Change>,
    ) {
        self.notices.push(Notice {
            kind,
            object: object.clone(),
            node: node.to_string(),
            message: message.into(),
            changes,
            users: Vec::new(),
        });
    }

    fn finish(self) -> Plan {
        Plan {
            actions: self.actions,
            notices: self.notices,
        }
    }
}

/// One step of a chain of actions on one object: what, why, field-level changes.
type Step = (Op, String, Vec<Change>);

fn step(op: Op, why: &str, changes: Vec<Change>) -> Step {
    (op, why.to_string(), changes)
}

/// A network's DHCP ranges as `start-end`, in no particular order (dnsmasq reads them as a
/// set, and libvirt appends a range added live at the end).
fn range_set<'a>(ranges: impl IntoIterator<Item = &'a String>) -> BTreeSet<&'a str> {
    ranges.into_iter().map(String::as_str).collect()
}

/// The live updates that bring a network's DHCP leases, DNS entries and DHCP ranges to the
/// spec: removals first (so an address or name can move between entries), then changes,
/// then additions; range changes last. A lease or DNS change only makes dnsmasq reread its
/// files (SIGHUP), while a range change makes libvirt restart dnsmasq with a configuration
/// written from the whole new definition (seen on libvirt 9.0): last, that restart also
/// picks up whether DHCP is on at all (the first range, or the last one going).
fn network_updates(o: &ObservedNetwork, net: &DesiredNetwork) -> Vec<Step> {
    const WHY: &str = "virNetworkUpdate: dnsmasq rereads its files, the network keeps running";
    const RANGE_WHY: &str =
        "virNetworkUpdate: libvirt restarts the network's dnsmasq, the network keeps running";
    let mut deletes = Vec::new();
    let mut modifies = Vec::new();
    let mut adds = Vec::new();
    let mut ranges = Vec::new();
    let want_ranges: Vec<String> = net.dhcp.iter().map(|(s, e)| format!("{s}-{e}")).collect();
    {
        let (want, have) = (range_set(&want_ranges), range_set(&o.dhcp));
        let update = |text: &str| {
            let (start, end) = text.split_once('-').unwrap_or((text, text));
            DhcpRangeUpdate {
                start: start.to_string(),
                end: end.to_string(),
            }
        };
        for gone in have.difference(&want) {
            ranges.push(step(
                Op::UpdateNetwork(NetworkUpdate::DeleteDhcpRange(update(gone))),
                RANGE_WHY,
                vec![Change::new(
                    &format!("ip.dhcp.ranges[{gone}]"),
                    *gone,
                    "(none)",
                )],
            ));
        }
        for new in want.difference(&have) {
            ranges.push(step(
                Op::UpdateNetwork(NetworkUpdate::AddDhcpRange(update(new))),
                RANGE_WHY,
                vec![Change::new(
                    &format!("ip.dhcp.ranges[{new}]"),
                    "(none)",
                    *new,
                )],
            ));
        }
    }
    let want_lease = |mac: &str| net.dhcp_hosts.iter().find(|h| h.mac == mac);
    for have in &o.dhcp_hosts {
        let field = format!("ip.dhcp.hosts[mac={}]", have.mac);
        match want_lease(&have.mac) {
            None => deletes.push(step(
                Op::UpdateNetwork(NetworkUpdate::DeleteDhcpHost(have.clone())),
                WHY,
                vec![Change::new(&field, have, "(none)")],
            )),
            Some(want) if want != have => modifies.push(step(
                Op::UpdateNetwork(NetworkUpdate::ModifyDhcpHost(want.clone())),
                WHY,
                vec![Change::new(&field, have, want)],
            )),
            Some(_) => {}
        }
    }
    for want in &net.dhcp_hosts {
        if !o.dhcp_hosts.iter().any(|h| h.mac == want.mac) {
            adds.push(step(
                Op::UpdateNetwork(NetworkUpdate::AddDhcpHost(want.clone())),
                WHY,
                vec![Change::new(
                    &format!("ip.dhcp.hosts[mac={}]", want.mac),
                    "(none)",
                    want,
                )],
            ));
        }
    }
    for have in &o.dns_hosts {
        let want = net.dns_hosts.iter().find(|h| h.ip == have.ip);
        if want == Some(have) {
            continue;
        }
        let field = format!("dns.hosts[ip={}]", have.ip);
        let after = want.map_or("(none)".to_string(), |w| w.hostnames.join(" "));
        deletes.push(step(
            Op::UpdateNetwork(NetworkUpdate::DeleteDnsHost(have.clone())),
            WHY,
            vec![Change::new(&field, have.hostnames.join(" "), after)],
        ));
    }
    for want in &net.dns_hosts {
        if !o.dns_hosts.contains(want) {
            let changed = o.dns_hosts.iter().any(|h| h.ip == want.ip);
            adds.push(step(
                Op::UpdateNetwork(NetworkUpdate::AddDnsHost(want.clone())),
                WHY,
                if changed {
                    vec![]
                } else {
                    vec![Change::new(
                        &format!("dns.hosts[ip={}]", want.ip),
                        "(none)",
                        want.hostnames.join(" "),
                    )]
                },
            ));
        }
    }
    deletes.extend(modifies);
    deletes.extend(adds);
    deletes.extend(ranges);
    deletes
}

/// The step that sets an autostart flag as the spec asks, when it differs.
fn autostart_step(set: fn(bool) -> Op, have: bool, want: bool) -> Option<Step> {
    (have != want).then(|| {
        step(
            set(want),
            "spec.autostart",
            vec![Change::new("autostart", have, want)],
        )
    })
}

/// What keeps an existing host-wide object (pool, network) usable as the spec asks: started
/// when inactive, autostart as set. `kind` names it in the reason (`pool`, `network`).
fn keep_usable(
    kind: &str,
    start: Op,
    active: bool,
    set_autostart: fn(bool) -> Op,
    autostart: (bool, bool),
) -> Vec<Step> {
    let mut steps = Vec::new();
    if !active {
        steps.push(step(
            start,
            &format!("the {kind} is inactive"),
            vec![Change::new("active", false, true)],
        ));
    }
    steps.extend(autostart_step(set_autostart, autostart.0, autostart.1));
    steps
}

fn opt<T: fmt::Display>(v: &Option<T>) -> String {
    match v {
        Some(v) => v.to_string(),
        None => "(none)".to_string(),
    }
}

fn owner_text(owner: &Option<OwnerMark>) -> String {
    match owner {
        Some(o) => format!("owned by {} (uid {})", o.label(), o.uid),
        None => "carries no virtkube ownership mark".to_string(),
    }
}

fn clash_message(
    wanted: &str,
    origin: &str,
    what: &str,
    node: &str,
    found: &Option<OwnerMark>,
) -> String {
    format!(
        "{wanted} from {origin} clashes with the existing libvirt {what} of the same name on node {node}, which {}: virtkube leaves it alone; rename one of them",
        owner_text(found)
    )
}

/// The source fields `wanted` sets (a manifest's) that `have` does not match, as changes.
fn source_changes(have: &PoolSourceView, wanted: &PoolSourceView) -> Vec<Change> {
    let mut changes = Vec::new();
    let mut field = |name: &str, have: &Option<String>, want: &Option<String>| {
        if want.is_some() && have != want {
            changes.push(Change::new(name, opt(have), opt(want)));
        }
    };
    field("source.host", &have.host, &wanted.host);
    field("source.dir", &have.dir, &wanted.dir);
    field("source.name", &have.name, &wanted.name);
    field("source.format", &have.format, &wanted.format);
    if !wanted.devices.is_empty() && have.devices != wanted.devices {
        let list = |d: &[String]| {
            if d.is_empty() {
                "(none)".to_string()
            } else {
                d.join(", ")
            }
        };
        changes.push(Change::new(
            "source.devices",
            list(&have.devices),
            list(&wanted.devices),
        ));
    }
    changes
}

/// A volume on a node: (node, volume name).
type NodeVolume = (String, String);

/// The size a volume will have when this plan has run (the plan runs a source's growth
/// before its clones): the larger of what is observed and what its manifest asks, a clone
/// or an overlay at least its source's (as the host model, `simulate`, sizes them). `None`
/// when unknown.
fn planned_size(
    desired: &DesiredState,
    observed: &ObservedState,
    node: &str,
    pool: &str,
    name: &str,
    depth: usize,
) -> Option<u64> {
    let seen = observed
        .hosts
        .get(node)
        .and_then(|h| h.volumes.get(&(pool.to_string(), name.to_string())))
        .map(|v| v.capacity);
    // The depth bounds a (malformed) cycle of clones.
    let wanted = desired
        .volumes
        .iter()
        .find(|d| d.node == node && d.name == name)
        .and_then(|d| match &d.source {
            VolumeOrigin::Empty => d.capacity,
            // A copy or an overlay is at least as large as its source (libvirt sizes an
            // overlay without a capacity, and a clone, from it).
            VolumeOrigin::Clone(src) | VolumeOrigin::Backing(src) if depth < 16 => d.capacity.max(
                planned_size(desired, observed, node, &d.pool, src, depth + 1),
            ),
            _ => d.capacity,
        });
    seen.max(wanted)
}

/// Volumes the plan cannot create: clones smaller than their source (with the source's size,
/// observed or desired), and, so that nothing waits on an image that never comes, the
/// volumes cloned from or layered on one of those (transitively).
fn uncreatable_volumes(
    desired: &DesiredState,
    observed: &ObservedState,
) -> (BTreeMap<NodeVolume, u64>, BTreeSet<NodeVolume>) {
    let missing = |v: &desired::DesiredVolume| {
        observed
            .hosts
            .get(&v.node)
            .is_some_and(|h| !h.volumes.contains_key(&(v.pool.clone(), v.name.clone())))
    };
    let source_of = |v: &desired::DesiredVolume| match &v.source {
        VolumeOrigin::Clone(src) | VolumeOrigin::Backing(src) => Some(src.clone()),
        VolumeOrigin::Empty => None,
    };
    let mut small = BTreeMap::new();
    for v in desired.volumes.iter().filter(|v| missing(v)) {
        let (VolumeOrigin::Clone(src), Some(capacity)) = (&v.source, v.capacity) else {
            continue;
        };
        if let Some(sc) = planned_size(desired, observed, &v.node, &v.pool, src, 0)
            && capacity < sc
        {
            small.insert((v.node.clone(), v.name.clone()), sc);
        }
    }
    let mut blocked: BTreeSet<(String, String)> = BTreeSet::new();
    loop {
        let more: Vec<(String, String)> = desired
            .volumes
            .iter()
            .filter(|v| missing(v))
            .filter(|v| {
                source_of(v).is_some_and(|src| {
                    let key = (v.node.clone(), src);
                    small.contains_key(&key) || blocked.contains(&key)
                })
            })
            .map(|v| (v.node.clone(), v.name.clone()))
            .filter(|k| !blocked.contains(k) && !small.contains_key(k))
            .collect();
        if more.is_empty() {
            return (small, blocked);
        }
        blocked.extend(more);
    }
}

/// Plans the changes that bring the hosts in `observed` to `desired`.
pub fn plan(desired: &DesiredState, observed: &ObservedState, options: &PlanOptions) -> Plan {
    let mut b = Builder::default();
    let nodes: Vec<String> = observed.hosts.keys().cloned().collect();
    let mut unusable_pools: BTreeSet<(String, String)> = BTreeSet::new();

    // Pools, on every node.
    for pool in &desired.pools {
        let object = ObjectRef::new(ObjectKind::StoragePool, &pool.name, &pool.name);
        for node in nodes.iter().filter(|n| pool.placed_on(n)) {
            let host = &observed.hosts[node];
            match host.pools.get(&pool.name) {
                None => {
                    let mut changes = vec![
                        Change::new("type", "(none)", &pool.pool_type),
                        Change::new("target.path", "(none)", opt(&pool.target_path)),
                    ];
                    changes.extend(source_changes(&PoolSourceView::default(), &pool.source));
                    let mut steps = vec![step(
                        Op::DefinePool(Box::new(pool.clone())),
                        "not on the host",
                        changes,
                    )];
                    match pool.build_step() {
                        Some(true) => steps.push(step(
                            Op::BuildPool { make_storage: true },
                            "spec.source.build: make its storage on spec.source.devices (never over a device holding data)",
                            vec![],
                        )),
                        Some(false) => steps.push(step(
                            Op::BuildPool {
                                make_storage: false,
                            },
                            "create its directory",
                            vec![],
                        )),
                        None => {}
                    }
                    steps.push(step(Op::StartPool, "make it usable", vec![]));
                    steps.extend(autostart_step(Op::SetPoolAutostart, false, pool.autostart));
                    b.chain(node, &object, &pool.owner, Symbol::Create, steps);
                }
                Some(o)
                    if !o
                        .owner
                        .as_ref()
                        .is_some_and(|m| m.same_resource(&pool.owner)) =>
                {
                    unusable_pools.insert((node.clone(), pool.name.clone()));
                    b.notice(
                        NoticeKind::Conflict,
                        &object,
                        node,
                        clash_message(
                            &object.to_string(),
                            &pool.origin,
                            "storage pool",
                            node,
                            &o.owner,
                        ),
                        vec![],
                    );
                }
                Some(o) => {
                    let mut forbidden = Vec::new();
                    if o.pool_type != pool.pool_type {
                        forbidden.push(Change::new("type", &o.pool_type, &pool.pool_type));
                    }
                    if pool.target_path.is_some() && o.target_path != pool.target_path {
                        forbidden.push(Change::new(
                            "target.path",
                            opt(&o.target_path),
                            opt(&pool.target_path),
                        ));
                    }
                    forbidden.extend(source_changes(&o.source, &pool.source));
                    if !forbidden.is_empty() {
                        b.notice(NoticeKind::Forbidden, &object, node, "a pool's type, target path and source are immutable: create a new pool and move the volumes", forbidden);
                    }
                    let steps = keep_usable(
                        "pool",
                        Op::StartPool,
                        o.active,
                        Op::SetPoolAutostart,
                        (o.autostart, pool.autostart),
                    );
                    b.chain(node, &object, &pool.owner, Symbol::Live, steps);
                }
            }
        }
    }

    // Volumes, each on its node.
    let desired_volume_names: BTreeMap<(String, String), &desired::DesiredVolume> = desired
        .volumes
        .iter()
        .map(|v| ((v.node.clone(), v.name.clone()), v))
        .collect();
    let (small_clones, without_source) = uncreatable_volumes(desired, observed);
    for vol in &desired.volumes {
        let object = ObjectRef::new(ObjectKind::Volume, &vol.name, &vol.display);
        let node = &vol.node;
        let Some(host) = observed.hosts.get(node) else {
            b.notice(
                NoticeKind::Invalid,
                &object,
                node,
                format!("{}: node {node} is not connected", vol.origin),
                vec![],
            );
            continue;
        };
        if unusable_pools.contains(&(node.clone(), vol.pool.clone())) {
            b.notice(
                NoticeKind::Blocked,
                &object,
                node,
                format!("its pool {} is not virtkube's on node {node}", vol.pool),
                vec![],
            );
            continue;
        }
        let pool_known = desired
            .pools
            .iter()
            .any(|p| p.name == vol.pool && p.placed_on(node))
            || host.pools.contains_key(&vol.pool);
        if !pool_known {
            b.notice(
                NoticeKind::Invalid,
                &object,
                node,
                format!(
                    "{}: spec.pool: StoragePool {} is neither in the manifests nor on node {node}",
                    vol.origin, vol.pool
                ),
                vec![],
            );
            continue;
        }
        // What the pool's type can hold: the manifests' word for it, else the host's.
        let pool_type = desired
            .pools
            .iter()
            .find(|p| p.name == vol.pool && p.placed_on(node))
            .map(|p| p.pool_type.clone())
            .or_else(|| host.pools.get(&vol.pool).map(|p| p.pool_type.clone()))
            .unwrap_or_default();
        if let Some(why) = backend::refuse_volume(&pool_type, &vol.format, &vol.source)
            .or_else(|| backend::refuse_volume_name(&pool_type, &vol.name).map(Into::into))
        {
            b.notice(
                NoticeKind::Unsupported,
                &object,
                node,
                format!("{}: pool {}: {why}", vol.origin, vol.pool),
                vec![],
            );
            continue;
        }
        let pool_key = (ObjectKind::StoragePool, node.clone(), vol.pool.clone());
        // The same Volume already in another pool: `spec.pool` changed, which is immutable
        // (creating a second image would silently leave the data behind).
        if !host
            .volumes
            .contains_key(&(vol.pool.clone(), vol.name.clone()))
            && let Some(((old_pool, _), _)) = host
                .volumes
                .iter()
                .find(|((p, n), v)| v.owned && n == &vol.name && p != &vol.pool)
        {
            b.notice(
                NoticeKind::Forbidden,
                &object,
                node,
                format!(
                    "{}: spec.pool is immutable: the image is in pool {old_pool}",
                    vol.origin
                ),
                vec![Change::new("pool", old_pool, &vol.pool)],
            );
            continue;
        }
        match host.volumes.get(&(vol.pool.clone(), vol.name.clone())) {
            None => {
                let mut deps = vec![pool_key];
                let mut changes = vec![
                    Change::new(
                        "capacity",
                        "(none)",
                        vol.capacity
                            .map(render::bytes)
                            .unwrap_or_else(|| "(size of the source)".into()),
                    ),
                    Change::new("format", "(none)", &vol.format),
                ];
                match &vol.source {
                    VolumeOrigin::Empty => {}
                    VolumeOrigin::Clone(src) | VolumeOrigin::Backing(src) => {
                        let exists = desired_volume_names
                            .contains_key(&(node.clone(), src.clone()))
                            || host.volumes.contains_key(&(vol.pool.clone(), src.clone()));
                        if !exists {
                            b.notice(NoticeKind::Invalid, &object, node, format!("{}: spec.source: Volume {src} is neither in the manifests nor in pool {} on node {node}", vol.origin, vol.pool), vec![]);
                            continue;
                        }
                        // A copy smaller than its source would cut the data at its end.
                        let key = (node.clone(), vol.name.clone());
                        if let (Some(source), Some(capacity)) =
                            (small_clones.get(&key), vol.capacity)
                        {
                            b.notice(NoticeKind::Forbidden, &object, node, format!("{}: a clone cannot be smaller than its source Volume {src}: leave spec.capacity out for the source's size", vol.origin), vec![Change::new("capacity", render::bytes(*source), render::bytes(capacity))]);
                            continue;
                        }
                        if without_source.contains(&key) {
                            b.notice(NoticeKind::Blocked, &object, node, format!("waits for its source Volume {src}, which cannot be created (see its notice)"), vec![]);
                            continue;
                        }
                        // A copy larger than its source is grown after the copy: not in a
                        // pool that cannot grow a volume.
                        if let (Some(why), Some(capacity), Some(source)) = (
                            backend::refuse_larger_clone(&pool_type),
                            vol.capacity,
                            planned_size(desired, observed, node, &vol.pool, src, 0),
                        ) && backend::check_size(&pool_type, capacity, source)
                            == backend::SizeCheck::Below
                        {
                            b.notice(NoticeKind::Unsupported, &object, node, format!("{}: a clone larger than its source Volume {src}: {why}; leave spec.capacity out for the source's size", vol.origin), vec![Change::new("capacity", render::bytes(source), render::bytes(capacity))]);
                            continue;
                        }
                        deps.push((ObjectKind::Volume, node.clone(), src.clone()));
                        changes.push(Change::new("source", "(none)", src));
                    }
                }
                let op = Op::CreateVolume {
                    pool: vol.pool.clone(),
                    capacity: vol.capacity,
                    format: vol.format.clone(),
                    source: vol.source.clone(),
                };
                b.push(
                    node,
                    &object,
                    &vol.owner,
                    op,
                    Symbol::Create,
                    "not in the pool",
                    changes,
                    &deps,
                );
            }
            Some(o) if !o.owned => {
                b.notice(NoticeKind::Conflict, &object, node, format!("Volume {} from {} clashes with volume {} in pool {} on node {node}, which virtkube did not create: virtkube leaves it alone", vol.display, vol.origin, vol.name, vol.pool), vec![]);
            }
            Some(o) => {
                // Copy-on-write ancestry is immutable: compare what libvirt reports of it.
                let wanted_backing = match &vol.source {
                    VolumeOrigin::Backing(src) => host
                        .volumes
                        .get(&(vol.pool.clone(), src.clone()))
                        .map(|s| Some(s.path.clone())),
                    VolumeOrigin::Empty | VolumeOrigin::Clone(_) => Some(None),
                };
                if let Some(wanted) = wanted_backing
                    && wanted != o.backing_path
                {
                    b.notice(
                        NoticeKind::Forbidden,
                        &object,
                        node,
                        "a volume's source is immutable: create a new Volume",
                        vec![Change::new(
                            "source.backingVolume",
                            opt(&o.backing_path),
                            opt(&wanted),
                        )],
                    );
                }
                if let Some(format) = &o.format
                    && format != &vol.format
                {
                    b.notice(
                        NoticeKind::Forbidden,
                        &object,
                        node,
                        "a volume's format is immutable",
                        vec![Change::new("format", format, &vol.format)],
                    );
                }
                if let Some(capacity) = vol.capacity {
                    // Guests holding the image open: a running or paused one grows it live
                    // through its disk; a crashed one cannot, so the growth waits.
                    let users: Vec<(&String, &observed::ObservedDomain, &str)> = host
                        .domains
                        .iter()
                        .filter(|(_, d)| d.power.is_active())
                        .filter_map(|(n, d)| {
                            d.disks.iter().find_map(|disk| match &disk.source {
                                observed::DiskRef::Volume { pool, volume }
                                    if pool == &vol.pool && volume == &vol.name =>
                                {
                                    Some((n, d, disk.target.as_str()))
                                }
                                _ => None,
                            })
                        })
                        .collect();
                    let through = users.iter().find(|(_, d, _)| {
                        matches!(
                            d.power,
                            observed::PowerObserved::Running | observed::PowerObserved::Paused
                        )
                    });
                    let grow = Change::new(
                        "capacity",
                        render::bytes(o.capacity),
                        render::bytes(capacity),
                    );
                    let size = backend::check_size(&pool_type, capacity, o.capacity);
                    let growth_refused = backend::refuse_growth(&pool_type);
                    if size == backend::SizeCheck::Below
                        && let Some(why) = growth_refused
                    {
                        b.notice(
                            NoticeKind::Unsupported,
                            &object,
                            node,
                            format!("{}: {why}", vol.origin),
                            vec![grow],
                        );
                    } else if size == backend::SizeCheck::Below
                        && through.is_none()
                        && !users.is_empty()
                    {
                        b.notice(NoticeKind::Blocked, &object, node, format!("grows when domain {} runs again or stops: a crashed guest holds the image", users.iter().map(|(n, _, _)| n.as_str()).collect::<Vec<_>>().join(", ")), vec![grow]);
                    } else if size == backend::SizeCheck::Below {
                        let live = through.and_then(|(n, d, target)| {
                            d.owner.as_ref().map(|owner| LiveDisk {
                                domain: (*n).clone(),
                                owner: owner.clone(),
                                target: target.to_string(),
                            })
                        });
                        let why = match &live {
                            Some(l) => format!(
                                "spec.capacity grew; domain {} holds the image: grown live through its disk",
                                l.domain
                            ),
                            None => "spec.capacity grew".to_string(),
                        };
                        let op = Op::ResizeVolume {
                            pool: vol.pool.clone(),
                            key: o.key.clone(),
                            capacity,
                            live,
                        };
                        b.push(
                            node,
                            &object,
                            &vol.owner,
                            op,
                            Symbol::Live,
                            why,
                            vec![grow],
                            &[pool_key],
                        );
                    } else if size == backend::SizeCheck::Above {
                        b.notice(NoticeKind::Forbidden, &object, node, "shrinking a volume would cut the guest's data: virtkube only grows volumes", vec![Change::new("capacity", render::bytes(o.capacity), render::bytes(capacity))]);
                    }
                }
            }
        }
    }

    // Networks, on every node.
    for net in &desired.networks {
        let object = ObjectRef::new(ObjectKind::Network, &net.name, &net.name);
        for node in nodes.iter().filter(|n| net.placed_on(n)) {
            let host = &observed.hosts[node];
            match host.networks.get(&net.name) {
                None => {
                    let mut changes = vec![Change::new("mode", "(none)", &net.mode)];
                    if let Some((addr, prefix)) = &net.ip {
                        changes.push(Change::new("ip", "(none)", format!("{addr}/{prefix}")));
                    }
                    let mut steps = vec![
                        step(
                            Op::DefineNetwork(Box::new(net.clone())),
                            "not on the host",
                            changes,
                        ),
                        step(Op::StartNetwork, "make it usable", vec![]),
                    ];
                    steps.extend(autostart_step(
                        Op::SetNetworkAutostart,
                        false,
                        net.autostart,
                    ));
                    b.chain(node, &object, &net.owner, Symbol::Create, steps);
                }
                Some(o)
                    if !o
                        .owner
                        .as_ref()
                        .is_some_and(|m| m.same_resource(&net.owner)) =>
                {
                    b.notice(
                        NoticeKind::Conflict,
                        &object,
                        node,
                        clash_message(&object.to_string(), &net.origin, "network", node, &o.owner),
                        vec![],
                    );
                }
                Some(o) => {
                    if o.mode != net.mode {
                        b.notice(
                            NoticeKind::Forbidden,
                            &object,
                            node,
                            "a network's mode is immutable: create a new network",
                            vec![Change::new("mode", &o.mode, &net.mode)],
                        );
                    }
                    let mut redefine = Vec::new();
                    if net.bridge.is_some() && o.bridge != net.bridge {
                        redefine.push(Change::new("bridge", opt(&o.bridge), opt(&net.bridge)));
                    }
                    let want_ip = net.ip.as_ref().map(|(a, p)| format!("{a}/{p}"));
                    let have_ip = o.ip.as_ref().map(|(a, p)| format!("{a}/{p}"));
                    if want_ip != have_ip {
                        redefine.push(Change::new("ip", opt(&have_ip), opt(&want_ip)));
                    }
                    // Ranges change live (network_updates): libvirt restarts dnsmasq with
                    // the new configuration, DHCP turned on or off included.
                    if net.dhcp.is_empty()
                        && o.dhcp.is_empty()
                        && o.dhcp_hosts.is_empty() != net.dhcp_hosts.is_empty()
                    {
                        // Without ranges, the first or last lease turns DHCP itself on or off:
                        // dnsmasq reads that only when it starts.
                        redefine.push(Change::new(
                            "ip.dhcp.hosts",
                            o.dhcp_hosts.len(),
                            net.dhcp_hosts.len(),
                        ));
                    }
                    let recreating = !redefine.is_empty();
                    if recreating {
                        // libvirt applies a network's bridge and addresses only when it starts:
                        // recreate it, but never under a running guest (it would lose its link).
                        let users: Vec<&str> = host
                            .domains
                            .iter()
                            .filter(|(_, d)| {
                                d.power.is_active()
                                    && d.interfaces
                                        .iter()
                                        .any(|i| i.network.as_deref() == Some(net.name.as_str()))
                            })
                            .map(|(n, _)| n.as_str())
                            .collect();
                        if users.is_empty() {
                            let why = "recreated: libvirt applies a network's bridge and addresses when it starts";
                            let mut steps = vec![
                                step(Op::DeleteNetwork, why, redefine),
                                step(Op::DefineNetwork(Box::new(net.clone())), why, vec![]),
                                step(Op::StartNetwork, why, vec![]),
                            ];
                            if net.autostart {
                                steps.push(step(
                                    Op::SetNetworkAutostart(true),
                                    "spec.autostart",
                                    vec![],
                                ));
                            }
                            b.chain(node, &object, &net.owner, Symbol::Restart, steps);
                            continue;
                        }
                        b.notice(
                            NoticeKind::RestartPending,
                            &object,
                            node,
                            format!("recreated once no running domain uses it (now: {}): recreating it would cut their link", users.join(", ")),
                            redefine,
                        );
                    }
                    let mut steps = if !recreating {
                        network_updates(o, net)
                    } else {
                        // Pending recreation brings the new entries with it.
                        vec![]
                    };
                    steps.extend(keep_usable(
                        "network",
                        Op::StartNetwork,
                        o.active,
                        Op::SetNetworkAutostart,
                        (o.autostart, net.autostart),
                    ));
                    b.chain(node, &object, &net.owner, Symbol::Live, steps);
                }
            }
        }
    }

    // Domains.
    for dom in &desired.domains {
        domain::plan_domain(&mut b, dom, desired, observed);
    }

    // Deletions: owned objects from local manifests that the manifests no longer describe.
    if options.prune {
        let mut targets = Vec::new();
        let wanted_domains: BTreeSet<&str> =
            desired.domains.iter().map(|d| d.name.as_str()).collect();
        let wanted_networks: BTreeSet<&str> =
            desired.networks.iter().map(|n| n.name.as_str()).collect();
        let wanted_pools: BTreeSet<&str> = desired.pools.iter().map(|p| p.name.as_str()).collect();
        for (node, host) in &observed.hosts {
            for (name, d) in &host.domains {
                if d.owner.as_ref().is_some_and(OwnerMark::is_local)
                    && !wanted_domains.contains(name.as_str())
                {
                    targets.push(DeleteTarget::domain(node, name, d.owner.clone()));
                }
            }
            for (name, n) in &host.networks {
                if n.owner.as_ref().is_some_and(OwnerMark::is_local)
                    && !wanted_networks.contains(name.as_str())
                {
                    targets.push(DeleteTarget::network(node, name, n.owner.clone()));
                }
            }
            for ((pool, name), v) in &host.volumes {
                let wanted = desired_volume_names.contains_key(&(node.clone(), name.clone()));
                let pool_is_local = host
                    .pools
                    .get(pool)
                    .and_then(|p| p.owner.as_ref())
                    .is_some_and(OwnerMark::is_local);
                if v.owned && pool_is_local && !wanted {
                    targets.push(DeleteTarget::volume(node, pool, name, None));
                }
            }
            for (name, p) in &host.pools {
                if p.owner.as_ref().is_some_and(OwnerMark::is_local)
                    && !wanted_pools.contains(name.as_str())
                {
                    targets.push(DeleteTarget::pool(node, name, p.owner.clone()));
                }
            }
        }
        plan_deletions(
            &mut b,
            targets,
            observed,
            "absent from the manifests (--prune)",
        );
    }
    b.finish()
}

/// Plans deleting what `desired` describes (`virtkube delete -f`), in reverse dependency
/// order, keeping retained and still-used volumes.
pub fn plan_delete(desired: &DesiredState, observed: &ObservedState) -> Plan {
    let mut b = Builder::default();
    let mut targets = Vec::new();
    for (node, host) in &observed.hosts {
        let mut found = Deletions {
            b: &mut b,
            targets: &mut targets,
            node,
        };
        for d in &desired.domains {
            if let Some(o) = host.domains.get(&d.name) {
                let object = ObjectRef::new(ObjectKind::Domain, &d.name, &d.display);
                found.marked(object, &d.origin, "domain", &d.owner, &o.owner);
            }
        }
        for n in &desired.networks {
            if let Some(o) = host.networks.get(&n.name) {
                let object = ObjectRef::new(ObjectKind::Network, &n.name, &n.name);
                found.marked(object, &n.origin, "network", &n.owner, &o.owner);
            }
        }
        for v in desired.volumes.iter().filter(|v| &v.node == node) {
            if let Some(o) = host.volumes.get(&(v.pool.clone(), v.name.clone())) {
                let foreign_pool = host.pools.get(&v.pool).is_some_and(|p| p.owner.is_none());
                if foreign_pool {
                    let object = ObjectRef::new(ObjectKind::Volume, &v.name, &v.display);
                    found.b.notice(NoticeKind::Retained, &object, node, format!("pool {} is not virtkube's: virtkube never deletes an image from a pool it did not make, whatever the reclaimPolicy; the image stays ({})", v.pool, o.path), vec![]);
                } else if o.owned {
                    found.targets.push(DeleteTarget::volume(
                        node,
                        &v.pool,
                        &v.name,
                        Some(v.retain),
                    ));
                } else {
                    let object = ObjectRef::new(ObjectKind::Volume, &v.name, &v.display);
                    found.b.notice(NoticeKind::Conflict, &object, node, format!("Volume {} from {} names volume {} in pool {}, which virtkube did not create: virtkube leaves it alone", v.display, v.origin, v.name, v.pool), vec![]);
                }
            }
        }
        for p in &desired.pools {
            if let Some(o) = host.pools.get(&p.name) {
                let object = ObjectRef::new(ObjectKind::StoragePool, &p.name, &p.name);
                found.marked(object, &p.origin, "storage pool", &p.owner, &o.owner);
            }
        }
    }
    plan_deletions(&mut b, targets, observed, "deleted by `virtkube delete`");
    b.finish()
}

/// What `virtkube delete` found on one node: owned objects to delete, clashes to report.
struct Deletions<'a> {
    b: &'a mut Builder,
    targets: &'a mut Vec<DeleteTarget>,
    node: &'a str,
}

impl Deletions<'_> {
    /// A domain, network or pool the manifests name: deleted when its mark is `wanted`'s
    /// resource, otherwise reported as a clash and left alone.
    fn marked(
        &mut self,
        object: ObjectRef,
        origin: &str,
        what: &str,
        wanted: &OwnerMark,
        found: &Option<OwnerMark>,
    ) {
        if found.as_ref().is_some_and(|m| m.same_resource(wanted)) {
            self.targets.push(DeleteTarget::marked(
                object.kind,
                self.node,
                &object.name,
                found.clone(),
            ));
        } else {
            let message = clash_message(&object.to_string(), origin, what, self.node, found);
            self.b
                .notice(NoticeKind::Conflict, &object, self.node, message, vec![]);
        }
    }
}

/// An owned object to delete.
struct DeleteTarget {
    kind: ObjectKind,
    node: String,
    name: String,
    pool: String,
    owner: Option<OwnerMark>,
    /// For volumes: `Some(policy is Retain)`, `None` when the policy is unknown.
    retain: Option<bool>,
}

impl DeleteTarget {
    /// A domain, network or pool: objects that carry virtkube's mark.
    fn marked(kind: ObjectKind, node: &str, name: &str, owner: Option<OwnerMark>) -> Self {
        Self {
            kind,
            node: node.into(),
            name: name.into(),
            pool: String::new(),
            owner,
            retain: None,
        }
    }
    fn domain(node: &str, name: &str, owner: Option<OwnerMark>) -> Self {
        Self::marked(ObjectKind::Domain, node, name, owner)
    }
    fn network(node: &str, name: &str, owner: Option<OwnerMark>) -> Self {
        Self::marked(ObjectKind::Network, node, name, owner)
    }
    fn pool(node: &str, name: &str, owner: Option<OwnerMark>) -> Self {
        Self::marked(ObjectKind::StoragePool, node, name, owner)
    }
    fn volume(node: &str, pool: &str, name: &str, retain: Option<bool>) -> Self {
        Self {
            kind: ObjectKind::Volume,
            node: node.into(),
            name: name.into(),
            pool: pool.into(),
            owner: None,
            retain,
        }
    }
}

fn display_of(kind: ObjectKind, name: &str, owner: &Option<OwnerMark>) -> String {
    match owner {
        Some(o) if kind != ObjectKind::Volume => match &o.namespace {
            Some(ns) => format!("{ns}/{}", o.name),
            None => o.name.clone(),
        },
        _ => match virtkube_crds::names::split_host_name(name) {
            Some((ns, n)) if matches!(kind, ObjectKind::Domain | ObjectKind::Volume) => {
                format!("{ns}/{n}")
            }
            _ => name.to_string(),
        },
    }
}

fn volume_owner(name: &str) -> OwnerMark {
    let (ns, short) = virtkube_crds::names::split_host_name(name).unwrap_or(("default", name));
    OwnerMark::for_resource("Volume", Some(ns), short, None)
}

/// Whether this plan already redefines `domain` on `node` (stopped, or restarted) into a
/// definition that no longer uses the object: then a deletion waits for that step instead of
/// being blocked until the next apply.
fn released_by_plan(
    b: &Builder,
    node: &str,
    domain: &str,
    still_uses: &dyn Fn(&DesiredDomain) -> bool,
) -> bool {
    b.actions
        .iter()
        .rev()
        .find_map(|a| match &a.op {
            Op::DefineDomain { domain: d, .. } | Op::RestartDomain { domain: d, .. }
                if a.node == node
                    && a.object.kind == ObjectKind::Domain
                    && a.object.name == domain =>
            {
                Some(!still_uses(d))
            }
            _ => None,
        })
        .unwrap_or(false)
}

/// What a deletion on one node may rely on going away first, in this very plan.
struct Going<'a> {
    /// Every deletion target, by (kind, node, name).
    targets: &'a BTreeSet<ObjKey>,
    /// Volumes this plan deletes (policy `Delete`): (node, pool, name).
    volumes: &'a BTreeSet<(String, String, String)>,
}

impl Going<'_> {
    fn domain(&self, node: &str, name: &str) -> bool {
        self.targets
            .contains(&(ObjectKind::Domain, node.to_string(), name.to_string()))
    }
}

/// The users of an object a deletion would remove that stay: neither deleted by this plan
/// nor redefined by it into a definition without the object (`still_uses`). When any stay,
/// the deletion waits: a [`NoticeKind::Blocked`] notice names them (the CLI retries at the
/// next apply, the agent at its next reconcile). Otherwise returns the dependency keys the
/// deletion runs after (the users' own deletions).
fn wait_for_users(
    b: &mut Builder,
    object: &ObjectRef,
    node: &str,
    users: &[dependents::User],
    going: &Going<'_>,
    still_uses: &dyn Fn(&DesiredDomain) -> bool,
) -> Option<Vec<ObjKey>> {
    let staying: Vec<&dependents::User> = users
        .iter()
        .filter(|u| match u {
            dependents::User::Domain { name, .. } => {
                !going.domain(node, name) && !released_by_plan(b, node, name, still_uses)
            }
            dependents::User::Volume { pool, name, .. } => {
                !going
                    .volumes
                    .contains(&(node.to_string(), pool.clone(), name.clone()))
            }
        })
        .collect();
    if !staying.is_empty() {
        b.notice(
            NoticeKind::Blocked,
            object,
            node,
            format!(
                "not deleted: still used by {}; deleted once they are gone",
                dependents::describe(&staying)
            ),
            vec![],
        );
        if let Some(n) = b.notices.last_mut() {
            n.users = staying.iter().map(ToString::to_string).collect();
        }
        return None;
    }
    Some(
        users
            .iter()
            .map(|u| match u {
                dependents::User::Domain { name, .. } => {
                    (ObjectKind::Domain, node.to_string(), name.clone())
                }
                dependents::User::Volume { name, .. } => {
                    (ObjectKind::Volume, node.to_string(), name.clone())
                }
            })
            .collect(),
    )
}

/// Plans the deletion of `targets`, each decided against its node's whole dependency view
/// ([`dependents::NodeView`]): domains first, then networks, volumes (overlays before the
/// images under them) and pools, each after the deletions of its users in this plan.
fn plan_deletions(
    b: &mut Builder,
    mut targets: Vec<DeleteTarget>,
    observed: &ObservedState,
    reason: &str,
) {
    let views: BTreeMap<&String, dependents::NodeView<'_>> = observed
        .hosts
        .iter()
        .map(|(node, host)| (node, dependents::NodeView::new(host)))
        .collect();
    let all: BTreeSet<ObjKey> = targets
        .iter()
        .map(|t| (t.kind, t.node.clone(), t.name.clone()))
        .collect();
    let deleted: BTreeSet<(String, String, String)> = targets
        .iter()
        .filter(|t| t.kind == ObjectKind::Volume && t.retain == Some(false))
        .map(|t| (t.node.clone(), t.pool.clone(), t.name.clone()))
        .collect();
    let going = Going {
        targets: &all,
        volumes: &deleted,
    };
    // Overlays before what they are built on: the deepest chain first.
    let depth = |t: &DeleteTarget| {
        views
            .get(&t.node)
            .map_or(0, |v| v.volume_chain(&t.pool, &t.name).len())
    };
    targets.sort_by_key(|t| std::cmp::Reverse(depth(t)));
    // Deleted-volume keys, so pools wait for them.
    let mut deleted_volumes: Vec<(String, String, String)> = Vec::new();
    for kind in [
        ObjectKind::Domain,
        ObjectKind::Network,
        ObjectKind::Volume,
        ObjectKind::StoragePool,
    ] {
        for t in targets.iter().filter(|t| t.kind == kind) {
            let (Some(host), Some(view)) = (observed.hosts.get(&t.node), views.get(&t.node)) else {
                continue;
            };
            let object = ObjectRef::new(kind, &t.name, &display_of(kind, &t.name, &t.owner));
            match kind {
                ObjectKind::Domain => {
                    let Some(owner) = &t.owner else { continue };
                    b.push(
                        &t.node,
                        &object,
                        owner,
                        Op::DeleteDomain,
                        Symbol::Delete,
                        reason,
                        vec![],
                        &[],
                    );
                }
                ObjectKind::Network => {
                    let Some(owner) = &t.owner else { continue };
                    let users = view.network_users(&t.name);
                    let still_uses =
                        |d: &DesiredDomain| d.interfaces.iter().any(|i| i.network == t.name);
                    let Some(deps) =
                        wait_for_users(b, &object, &t.node, &users, &going, &still_uses)
                    else {
                        continue;
                    };
                    b.push(
                        &t.node,
                        &object,
                        owner,
                        Op::DeleteNetwork,
                        Symbol::Delete,
                        reason,
                        vec![],
                        &deps,
                    );
                }
                ObjectKind::Volume => {
                    let Some(v) = host.volumes.get(&(t.pool.clone(), t.name.clone())) else {
                        continue;
                    };
                    match t.retain {
                        Some(false) => {}
                        Some(true) => {
                            b.notice(
                                NoticeKind::Retained,
                                &object,
                                &t.node,
                                format!(
                                    "reclaimPolicy Retain: the image stays in pool {} ({})",
                                    t.pool, v.path
                                ),
                                vec![],
                            );
                            continue;
                        }
                        None => {
                            b.notice(NoticeKind::Retained, &object, &t.node, format!("absent from the manifests, so its reclaimPolicy is unknown: the image stays in pool {} ({}); delete it with `virtkube delete -f` and reclaimPolicy Delete", t.pool, v.path), vec![]);
                            continue;
                        }
                    }
                    let users = view.volume_users(&t.pool, &t.name);
                    // A domain redefined by this plan lets go of the chain only if none of
                    // its disks names the volume or a volume built on it.
                    let chain_names: BTreeSet<&str> = std::iter::once(t.name.as_str())
                        .chain(users.iter().filter_map(|u| match u {
                            dependents::User::Volume { name, .. } => Some(name.as_str()),
                            dependents::User::Domain { .. } => None,
                        }))
                        .collect();
                    let still_uses = |d: &DesiredDomain| {
                        d.disks.iter().any(|disk| {
                            matches!(&disk.source, desired::DesiredDiskSource::Volume { volume, .. } if chain_names.contains(volume.as_str()))
                        })
                    };
                    let Some(deps) =
                        wait_for_users(b, &object, &t.node, &users, &going, &still_uses)
                    else {
                        continue;
                    };
                    let op = Op::DeleteVolume {
                        pool: t.pool.clone(),
                        key: v.key.clone(),
                    };
                    b.push(
                        &t.node,
                        &object,
                        &volume_owner(&t.name),
                        op,
                        Symbol::Delete,
                        reason,
                        vec![],
                        &deps,
                    );
                    deleted_volumes.push((t.node.clone(), t.pool.clone(), t.name.clone()));
                }
                ObjectKind::StoragePool => {
                    let Some(owner) = &t.owner else { continue };
                    let users = view.pool_users(&t.name);
                    // A pool's volumes are named by the domains' disks: only their removal
                    // releases it (a redefinition elsewhere in this plan does not count).
                    let Some(_) = wait_for_users(b, &object, &t.node, &users, &going, &|_| true)
                    else {
                        continue;
                    };
                    let deps: Vec<ObjKey> = deleted_volumes
                        .iter()
                        .filter(|(n, p, _)| n == &t.node && p == &t.name)
                        .map(|(n, _, v)| (ObjectKind::Volume, n.clone(), v.clone()))
                        .collect();
                    b.push(
                        &t.node,
                        &object,
                        owner,
                        Op::DeletePool,
                        Symbol::Delete,
                        format!("{reason}; its image files stay on disk"),
                        vec![],
                        &deps,
                    );
                }
            }
        }
    }
}
