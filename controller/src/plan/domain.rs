//! Planning one domain: create, compare field by field (live or restart-required), power
//! state by run strategy, and moves between nodes (live migration).

use virtkube_crds::cpuset::CpuSet;
use virtkube_crds::domain::{PowerState, RunStrategy};

use super::desired::{DesiredDiskSource, DesiredDomain, DesiredState};
use super::observed::{
    CpuTune, DiskRef, ObservedDomain, ObservedHost, ObservedState, PowerObserved,
};
use super::render::kib;
use super::{
    Builder, Change, NoticeKind, ObjKey, ObjectKind, ObjectRef, Op, Preserve, Step, Symbol,
    autostart_step, clash_message, opt, step,
};

/// The dependencies of a domain on its node: the volumes and networks it uses.
fn dependencies(dom: &DesiredDomain) -> Vec<ObjKey> {
    let mut deps = Vec::new();
    for disk in &dom.disks {
        if let DesiredDiskSource::Volume { volume, .. } = &disk.source {
            deps.push((ObjectKind::Volume, dom.node.clone(), volume.clone()));
        }
    }
    for nic in &dom.interfaces {
        deps.push((ObjectKind::Network, dom.node.clone(), nic.network.clone()));
    }
    // A pool created in the same plan is covered through the volume's own dependency on it.
    deps
}

/// The pool of a disk's volume: from the manifests, or found on the host.
fn disk_pool(source: &DesiredDiskSource, host: &ObservedHost) -> Option<String> {
    match source {
        DesiredDiskSource::Volume { pool: Some(p), .. } => Some(p.clone()),
        DesiredDiskSource::Volume {
            volume, pool: None, ..
        } => host
            .volumes
            .keys()
            .find(|(_, v)| v == volume)
            .map(|(p, _)| p.clone()),
        DesiredDiskSource::Path(_) => None,
    }
}

/// Whether the machine type libvirt reports is what the user asked for (libvirt expands the
/// aliases `pc` and `q35` to versioned names).
pub(crate) fn machine_matches(wanted: &str, observed: Option<&str>) -> bool {
    match observed {
        None => false,
        Some(o) if o == wanted => true,
        Some(o) => match wanted {
            "pc" => o.starts_with("pc-i440fx-"),
            "q35" => o.starts_with("pc-q35-"),
            _ => false,
        },
    }
}

fn describe_disk_source(source: &DesiredDiskSource) -> String {
    match source {
        DesiredDiskSource::Volume { volume, .. } => format!("volume {volume}"),
        DesiredDiskSource::Path(p) => p.clone(),
    }
}

fn describe_observed_disk(d: &super::observed::ObservedDisk) -> String {
    let source = match &d.source {
        DiskRef::Volume { volume, .. } => format!("volume {volume}"),
        DiskRef::Path(p) => p.clone(),
        DiskRef::Other => "(no source)".into(),
    };
    format!(
        "{} {} on {}",
        d.target,
        source,
        d.bus.as_deref().unwrap_or("?")
    )
}

/// Whether an affinity lets a thread run on every online CPU: what libvirt reports for a
/// vCPU that is not pinned (every online CPU on QEMU, every present CPU on the test
/// driver), so it is no difference. An affinity the planner cannot read counts as floating:
/// a pin is never changed on a guess.
fn floats(affinity: &str, online: &str) -> bool {
    match (affinity.parse::<CpuSet>(), online.parse::<CpuSet>()) {
        (Ok(have), Ok(online)) => online.iter().all(|cpu| have.contains(cpu)),
        _ => true,
    }
}

/// Whether a disk can be plugged into (or out of) a running guest: a hard disk on a bus
/// QEMU hotplugs (virtio, SCSI, USB); SATA, IDE and CD-ROM drives cannot, and a boot order
/// only matters at boot.
fn disk_hotpluggable(bus: Option<&str>, device: &str) -> bool {
    device == "disk" && matches!(bus, Some("virtio" | "scsi" | "usb"))
}

/// The key of a device in the live unplug note (as the engine writes it).
fn disk_key(target: &str) -> String {
    format!("disk/{target}")
}

fn nic_key(mac: &str) -> String {
    format!("interface/{}", mac.to_ascii_lowercase())
}

/// For each desired NIC, the observed NIC that is it: the one carrying its name as libvirt
/// alias, or (for NICs defined before virtkube wrote aliases) the one at its place when
/// that one has no alias.
pub(crate) fn match_nics(d: &DesiredDomain, o: &ObservedDomain) -> Vec<Option<usize>> {
    let mut taken = vec![false; o.interfaces.len()];
    let mut out: Vec<Option<usize>> = d
        .interfaces
        .iter()
        .map(|nic| {
            let j = o
                .interfaces
                .iter()
                .position(|x| x.alias.as_deref() == Some(nic.name.as_str()))?;
            taken[j] = true;
            Some(j)
        })
        .collect();
    for (i, m) in out.iter_mut().enumerate() {
        if m.is_none() && o.interfaces.get(i).is_some_and(|x| x.alias.is_none()) && !taken[i] {
            taken[i] = true;
            *m = Some(i);
        }
    }
    out
}

fn describe_nic(on: &super::observed::ObservedNic) -> String {
    format!(
        "{} ({}){}",
        on.network.as_deref().unwrap_or("?"),
        on.model.as_deref().unwrap_or("default"),
        on.mac.as_ref().map(|m| format!(" {m}")).unwrap_or_default()
    )
}

pub(crate) const UNPLUG_PENDING: &str =
    "unplug requested, the guest has not released it: it leaves at the next restart";

/// Disks: plugged in or out live where the host and the bus allow, otherwise (and for any
/// change of an existing disk) at the next restart.
fn diff_disks(d: &DesiredDomain, o: &ObservedDomain, host: &ObservedHost, diff: &mut Diff) {
    let live = host.device_hotplug && o.power.is_active();
    let pending = |target: &str| o.pending_unplug.contains(&disk_key(target));
    for disk in &d.disks {
        let field = format!("disks[name={}]", disk.name);
        let want = format!(
            "{} {} on {}",
            disk.target,
            describe_disk_source(&disk.source),
            disk.bus
        );
        let Some(od) = o.disks.iter().find(|x| x.target == disk.target) else {
            let change = Change::new(&field, "(none)", want);
            if live && disk_hotpluggable(Some(&disk.bus), &disk.device) && disk.boot_order.is_none()
            {
                diff.live
                    .push((Op::AttachDisk(Box::new(disk.clone())), vec![change]));
            } else {
                diff.restart.push(change);
            }
            continue;
        };
        if pending(&od.target) {
            // Asked back while its unplug is pending: the definition has it again after the
            // restart that completes the unplug.
            diff.restart.push(Change::new(
                &field,
                format!("{} ({UNPLUG_PENDING})", describe_observed_disk(od)),
                want,
            ));
            continue;
        }
        let source_ok = match (&disk.source, &od.source) {
            (DesiredDiskSource::Volume { volume, .. }, DiskRef::Volume { pool, volume: ov }) => {
                volume == ov && disk_pool(&disk.source, host).is_none_or(|p| &p == pool)
            }
            (DesiredDiskSource::Path(p), DiskRef::Path(op)) => p == op,
            _ => false,
        };
        let same = source_ok
            && od.bus.as_ref().is_none_or(|b| b == &disk.bus)
            && od.device == disk.device
            && od.read_only == disk.read_only
            && od.boot_order == disk.boot_order;
        if !same {
            diff.restart
                .push(Change::new(&field, describe_observed_disk(od), want));
        }
    }
    for od in &o.disks {
        if d.disks.iter().any(|x| x.target == od.target) {
            continue;
        }
        let field = format!("disks[target={}]", od.target);
        if pending(&od.target) {
            diff.restart.push(Change::new(
                &field,
                format!("{} ({UNPLUG_PENDING})", describe_observed_disk(od)),
                "(none)",
            ));
        } else if live && disk_hotpluggable(od.bus.as_deref(), &od.device) {
            diff.push_live((
                Op::DetachDisk {
                    target: od.target.clone(),
                },
                Change::new(&field, describe_observed_disk(od), "(none)"),
            ));
        } else {
            diff.restart
                .push(Change::new(&field, describe_observed_disk(od), "(none)"));
        }
    }
}

/// NICs: plugged in or out live where the host allows; a changed NIC waits for a restart.
fn diff_nics(d: &DesiredDomain, o: &ObservedDomain, host: &ObservedHost, diff: &mut Diff) {
    let live = host.device_hotplug && o.power.is_active();
    let pending =
        |mac: Option<&String>| mac.is_some_and(|m| o.pending_unplug.contains(&nic_key(m)));
    let matched = match_nics(d, o);
    for (nic, m) in d.interfaces.iter().zip(&matched) {
        let field = format!("interfaces[name={}]", nic.name);
        let want = format!(
            "{} ({}){}",
            nic.network,
            nic.model,
            nic.mac
                .as_ref()
                .map(|m| format!(" {m}"))
                .unwrap_or_default()
        );
        let Some(on) = m.map(|j| &o.interfaces[j]) else {
            let change = Change::new(&field, "(none)", want);
            if live {
                diff.live
                    .push((Op::AttachInterface(Box::new(nic.clone())), vec![change]));
            } else {
                diff.restart.push(change);
            }
            continue;
        };
        if pending(on.mac.as_ref()) {
            diff.restart.push(Change::new(
                &field,
                format!("{} ({UNPLUG_PENDING})", describe_nic(on)),
                want,
            ));
            continue;
        }
        let same = on.network.as_deref() == Some(nic.network.as_str())
            && on.model.as_ref().is_none_or(|m| m == &nic.model)
            && nic
                .mac
                .as_ref()
                .is_none_or(|m| on.mac.as_ref().is_some_and(|om| om.eq_ignore_ascii_case(m)));
        if !same {
            diff.restart
                .push(Change::new(&field, describe_nic(on), want));
        }
    }
    for (j, on) in o.interfaces.iter().enumerate() {
        if matched.contains(&Some(j)) {
            continue;
        }
        let field = match (&on.alias, &on.mac) {
            (Some(name), _) => format!("interfaces[name={name}]"),
            (None, Some(mac)) => format!("interfaces[mac={mac}]"),
            (None, None) => format!("interfaces[{j}]"),
        };
        match &on.mac {
            _ if pending(on.mac.as_ref()) => diff.restart.push(Change::new(
                &field,
                format!("{} ({UNPLUG_PENDING})", describe_nic(on)),
                "(none)",
            )),
            Some(mac) if live => diff.push_live((
                Op::DetachInterface { mac: mac.clone() },
                Change::new(&field, describe_nic(on), "(none)"),
            )),
            _ => diff
                .restart
                .push(Change::new(&field, describe_nic(on), "(none)")),
        }
    }
}

/// A whole-guest limit as users write it (`1500m`) from a quota and period.
fn show_limit(quota: Option<i64>, period: Option<u64>) -> String {
    match (quota, period) {
        (Some(q), Some(p)) if q > 0 && p > 0 => {
            virtkube_crds::domain::format_cpu_limit(q.unsigned_abs() * 1000 / p)
        }
        _ => "(unlimited)".into(),
    }
}

/// CPU weight and bandwidth: the fields the manifest sets are compared; a weight or a
/// quota removed from the manifest goes back to libvirt's default (weight 1024, no limit),
/// as a removed pin floats again; periods without a quota are not compared. Live where the
/// host allows (QEMU), otherwise at the next restart.
fn diff_cpu_tune(d: &DesiredDomain, o: &ObservedDomain, host: &ObservedHost, diff: &mut Diff) {
    let (want, have) = (&d.cpu_tune, &o.cpu_tune);
    let mut set = CpuTune::default();
    let mut changes = Vec::new();
    match want.shares {
        Some(w) if have.shares != Some(w) => {
            set.shares = Some(w);
            changes.push(Change::new("cpu.shares", opt(&have.shares), w));
        }
        None if have.shares.is_some_and(|h| h != CpuTune::DEFAULT_SHARES) => {
            set.shares = Some(CpuTune::DEFAULT_SHARES);
            changes.push(Change::new(
                "cpu.shares",
                opt(&have.shares),
                format!("{} (libvirt's default)", CpuTune::DEFAULT_SHARES),
            ));
        }
        _ => {}
    }
    let limited = |q: Option<i64>| q.is_some_and(|q| q > 0);
    // The whole-guest limit: period and quota together.
    if want.global_quota.is_some()
        && (have.global_quota != want.global_quota || have.global_period != want.global_period)
    {
        set.global_period = want.global_period;
        set.global_quota = want.global_quota;
        changes.push(Change::new(
            "cpu.limit",
            show_limit(have.global_quota, have.global_period),
            show_limit(want.global_quota, want.global_period),
        ));
    } else if want.global_quota.is_none() && limited(have.global_quota) {
        set.global_quota = Some(-1);
        changes.push(Change::new(
            "cpu.limit",
            show_limit(have.global_quota, have.global_period),
            "(unlimited)",
        ));
    }
    for (field, w, h, slot) in [
        ("cpu.period", want.period, have.period, &mut set.period),
        (
            "cpu.emulatorPeriod",
            want.emulator_period,
            have.emulator_period,
            &mut set.emulator_period,
        ),
    ] {
        if let Some(w) = w
            && h != Some(w)
        {
            *slot = Some(w);
            changes.push(Change::new(field, opt(&h), w));
        }
    }
    for (field, w, h, slot) in [
        ("cpu.quota", want.quota, have.quota, &mut set.quota),
        (
            "cpu.emulatorQuota",
            want.emulator_quota,
            have.emulator_quota,
            &mut set.emulator_quota,
        ),
    ] {
        match w {
            Some(w) if h != Some(w) => {
                *slot = Some(w);
                changes.push(Change::new(field, opt(&h), w));
            }
            None if limited(h) => {
                *slot = Some(-1);
                changes.push(Change::new(field, opt(&h), "(unlimited)"));
            }
            _ => {}
        }
    }
    if changes.is_empty() {
        return;
    }
    if host.cpu_tune_live || !o.power.is_active() {
        // One libvirt call sets every field; the plan shows each change.
        diff.live.push((Op::SetCpuTune(set), changes));
    } else {
        diff.restart.extend(changes);
    }
}

/// Differences split by how they can be applied.
#[derive(Default)]
pub(crate) struct Diff {
    /// Applied live on a running domain: each operation with the field changes it makes.
    pub live: Vec<(Op, Vec<Change>)>,
    /// Need a restart (or a redefinition while stopped).
    pub restart: Vec<Change>,
}

impl Diff {
    /// A live operation changing one field.
    fn push_live(&mut self, (op, change): (Op, Change)) {
        self.live.push((op, vec![change]));
    }
}

/// Compares what the user set with what libvirt reports.
pub(crate) fn diff_domain(d: &DesiredDomain, o: &ObservedDomain, host: &ObservedHost) -> Diff {
    let mut diff = Diff::default();
    let max_changes = d.max_vcpus != o.max_vcpus;
    if max_changes {
        diff.restart
            .push(Change::new("cpu.maxVcpus", o.max_vcpus, d.max_vcpus));
    }
    if d.vcpus != o.vcpus {
        let change = Change::new("cpu.vcpus", o.vcpus, d.vcpus);
        if !max_changes && d.vcpus <= o.max_vcpus {
            diff.push_live((Op::SetVcpus(d.vcpus), change));
        } else {
            diff.restart.push(change);
        }
    }
    let max_mem_changes = d.max_memory_kib != o.max_memory_kib;
    if max_mem_changes {
        diff.restart.push(Change::new(
            "memory.max",
            kib(o.max_memory_kib),
            kib(d.max_memory_kib),
        ));
    }
    if d.memory_kib != o.memory_kib {
        let change = Change::new("memory.size", kib(o.memory_kib), kib(d.memory_kib));
        if !max_mem_changes && d.memory_kib <= o.max_memory_kib {
            diff.push_live((Op::SetMemory(d.memory_kib), change));
        } else {
            diff.restart.push(change);
        }
    }
    for (vcpu, cpuset) in &d.pinning {
        if o.pinning.get(vcpu) != Some(cpuset) {
            let change = Change::new(
                &format!("cpu.pinning[vcpu={vcpu}].cpuset"),
                opt(&o.pinning.get(vcpu)),
                cpuset,
            );
            if *vcpu < o.max_vcpus {
                diff.push_live((
                    Op::PinVcpu {
                        vcpu: *vcpu,
                        cpuset: cpuset.clone(),
                    },
                    change,
                ));
            } else {
                diff.restart.push(change);
            }
        }
    }
    if let Some(e) = &d.emulator_cpuset
        && o.emulator_cpuset.as_ref() != Some(e)
    {
        diff.push_live((
            Op::PinEmulator(e.clone()),
            Change::new("cpu.emulatorCpuset", opt(&o.emulator_cpuset), e),
        ));
    }
    // A pin removed from the manifest: let the vCPU (or the emulator) float again by pinning
    // it to every online CPU, live and in the config. Without the host's CPU map the pin is
    // left as it is.
    if let Some(online) = &host.online_cpus {
        let unpinned = format!("{online} (every online CPU)");
        for (vcpu, have) in &o.pinning {
            if !d.pinning.contains_key(vcpu) && *vcpu < o.max_vcpus && !floats(have, online) {
                diff.push_live((
                    Op::PinVcpu {
                        vcpu: *vcpu,
                        cpuset: online.clone(),
                    },
                    Change::new(&format!("cpu.pinning[vcpu={vcpu}].cpuset"), have, &unpinned),
                ));
            }
        }
        if d.emulator_cpuset.is_none()
            && let Some(have) = &o.emulator_cpuset
            && !floats(have, online)
        {
            diff.push_live((
                Op::PinEmulator(online.clone()),
                Change::new("cpu.emulatorCpuset", have, &unpinned),
            ));
        }
    }
    if d.cpu_mode.is_some() && d.cpu_mode != o.cpu_mode {
        diff.restart
            .push(Change::new("cpu.mode", opt(&o.cpu_mode), opt(&d.cpu_mode)));
    }
    if d.cpu_model.is_some() && d.cpu_model != o.cpu_model {
        diff.restart.push(Change::new(
            "cpu.model",
            opt(&o.cpu_model),
            opt(&d.cpu_model),
        ));
    }
    if let Some(t) = d.topology
        && Some(t) != o.topology
    {
        let show = |t: Option<(u32, u32, u32)>| match t {
            Some((s, c, th)) => format!("{s}x{c}x{th}"),
            None => "(none)".into(),
        };
        diff.restart
            .push(Change::new("cpu.topology", show(o.topology), show(Some(t))));
    }
    if d.hugepage_kib.is_some() && d.hugepage_kib != o.hugepage_kib {
        diff.restart.push(Change::new(
            "memory.hugepages.pageSize",
            o.hugepage_kib.map(kib).unwrap_or_else(|| "(none)".into()),
            d.hugepage_kib.map(kib).unwrap_or_default(),
        ));
    }
    if let Some(m) = &d.machine
        && !machine_matches(m, o.machine.as_deref())
    {
        diff.restart
            .push(Change::new("os.machine", opt(&o.machine), m));
    }
    if d.arch.is_some() && d.arch != o.arch {
        diff.restart
            .push(Change::new("os.arch", opt(&o.arch), opt(&d.arch)));
    }
    if let Some(f) = &d.firmware {
        let have = o.firmware.clone().unwrap_or_else(|| "bios".into());
        if &have != f {
            diff.restart.push(Change::new("os.firmware", have, f));
        }
    }
    // libvirt refuses `<os><boot>` beside per-disk boot order: with a disk `bootOrder` the
    // definition omits `os.boot`, so it is not compared either.
    let disk_boot = d.disks.iter().any(|disk| disk.boot_order.is_some());
    if !d.boot.is_empty() && !disk_boot && d.boot != o.boot {
        diff.restart
            .push(Change::new("os.boot", o.boot.join(","), d.boot.join(",")));
    }
    for (field, want, have) in [
        ("os.kernel", &d.kernel, &o.kernel),
        ("os.initrd", &d.initrd, &o.initrd),
        ("os.cmdline", &d.cmdline, &o.cmdline),
    ] {
        if want.is_some() && want != have {
            diff.restart.push(Change::new(field, opt(have), opt(want)));
        }
    }
    diff_cpu_tune(d, o, host, &mut diff);
    diff_disks(d, o, host, &mut diff);
    diff_nics(d, o, host, &mut diff);
    super::host_devices::diff_host_devices(d, o, host, &mut diff);
    diff
}

/// What to keep from an existing definition: its UUID, and the MACs libvirt generated for
/// NICs whose MAC the user did not set.
pub(crate) fn preserve(d: &DesiredDomain, o: &ObservedDomain) -> Preserve {
    let matched = match_nics(d, o);
    Preserve {
        uuid: Some(o.uuid.clone()),
        macs: d
            .interfaces
            .iter()
            .zip(&matched)
            .map(|(nic, m)| match &nic.mac {
                Some(_) => None,
                // Keep a generated MAC only for the same NIC (same name or place, same
                // network), so inserting a NIC does not hand the guest's old address to
                // another network.
                None => m
                    .map(|j| &o.interfaces[j])
                    .filter(|x| x.network.as_deref() == Some(nic.network.as_str()))
                    .and_then(|x| x.mac.clone()),
            })
            .collect(),
        start_owed: o.start_owed,
    }
}

/// Power actions for a domain that exists, by run strategy and desired state.
fn power_ops(d: &DesiredDomain, power: PowerObserved, reason: &str, start_owed: bool) -> Vec<Step> {
    let mut ops = Vec::new();
    let mut change = |op: Op, why: &str, after: &str| {
        ops.push(step(
            op,
            why,
            vec![Change::new("state", power.as_str(), after)],
        ));
    };
    let wants_paused = d.state == PowerState::Paused;
    let start_then = |change: &mut dyn FnMut(Op, &str, &str), recover: bool, why: &str| {
        change(Op::StartDomain { recover }, why, "running");
        if wants_paused {
            change(Op::SuspendDomain, "spec.state is Paused", "paused");
        }
    };
    let keep_running_or_paused = |change: &mut dyn FnMut(Op, &str, &str)| match (power, d.state) {
        (PowerObserved::Running, PowerState::Paused) => {
            change(Op::SuspendDomain, "spec.state is Paused", "paused")
        }
        (PowerObserved::Paused, PowerState::Running) => {
            change(Op::ResumeDomain, "spec.state is Running", "running")
        }
        _ => {}
    };
    // Defined to be started and never started: the start after the definition was lost
    // (a crash between the two). Owed whatever the strategy, as at creation.
    if start_owed
        && power == PowerObserved::Shutoff
        && d.state != PowerState::Stopped
        && d.run_strategy != RunStrategy::Halted
    {
        start_then(
            &mut change,
            false,
            "its first start after the definition never happened (interrupted): started now",
        );
        return ops;
    }
    match d.run_strategy {
        RunStrategy::Halted => {
            if power.is_active() {
                change(
                    Op::StopDomain,
                    "runStrategy Halted keeps it stopped",
                    "shutoff",
                );
            }
        }
        RunStrategy::Always => match power {
            PowerObserved::Shutoff => start_then(
                &mut change,
                false,
                &format!("runStrategy Always restarts it (it stopped: {reason})"),
            ),
            PowerObserved::Crashed => start_then(
                &mut change,
                true,
                "runStrategy Always restarts it after a crash",
            ),
            _ => keep_running_or_paused(&mut change),
        },
        RunStrategy::RerunOnFailure => match power {
            PowerObserved::Shutoff if reason == "crashed" => start_then(
                &mut change,
                false,
                "runStrategy RerunOnFailure restarts it after a crash",
            ),
            PowerObserved::Shutoff => {}
            PowerObserved::Crashed => start_then(
                &mut change,
                true,
                "runStrategy RerunOnFailure restarts it after a crash",
            ),
            _ => keep_running_or_paused(&mut change),
        },
        RunStrategy::Manual => {
            // Manual enforces an explicit state between running and paused, and stops on
            // request; it never starts a stopped domain after creation.
            if d.explicit_state {
                match (power, d.state) {
                    (PowerObserved::Running | PowerObserved::Paused, PowerState::Stopped) => {
                        change(Op::StopDomain, "spec.state is Stopped", "shutoff")
                    }
                    _ => keep_running_or_paused(&mut change),
                }
            }
        }
    }
    ops
}

/// Power actions right after creation.
fn initial_power_ops(d: &DesiredDomain) -> Vec<Step> {
    match d.state {
        PowerState::Running => vec![step(
            Op::StartDomain { recover: false },
            "spec.state is Running",
            vec![Change::new("state", "(none)", "running")],
        )],
        PowerState::Paused => vec![
            step(
                Op::StartDomain { recover: false },
                "spec.state is Paused: start, then suspend",
                vec![Change::new("state", "(none)", "running")],
            ),
            step(
                Op::SuspendDomain,
                "spec.state is Paused",
                vec![Change::new("state", "running", "paused")],
            ),
        ],
        PowerState::Stopped => vec![],
    }
}

fn definition_changes(d: &DesiredDomain) -> Vec<Change> {
    let mut changes = vec![
        Change::new(
            "cpu.vcpus",
            "(none)",
            format!("{} (max {})", d.vcpus, d.max_vcpus),
        ),
        Change::new(
            "memory.size",
            "(none)",
            format!("{} (max {})", kib(d.memory_kib), kib(d.max_memory_kib)),
        ),
    ];
    for (vcpu, cpuset) in &d.pinning {
        changes.push(Change::new(
            &format!("cpu.pinning[vcpu={vcpu}].cpuset"),
            "(none)",
            cpuset,
        ));
    }
    if let Some(e) = &d.emulator_cpuset {
        changes.push(Change::new("cpu.emulatorCpuset", "(none)", e));
    }
    for disk in &d.disks {
        changes.push(Change::new(
            &format!("disks[name={}]", disk.name),
            "(none)",
            format!("{} {}", disk.target, describe_disk_source(&disk.source)),
        ));
    }
    for nic in &d.interfaces {
        changes.push(Change::new(
            &format!("interfaces[name={}]", nic.name),
            "(none)",
            &nic.network,
        ));
    }
    for dev in &d.host_devices {
        changes.push(Change::new(
            &format!("hostDevices[name={}]", dev.name),
            "(none)",
            &dev.address,
        ));
    }
    changes
}

/// Plans one domain.
pub(crate) fn plan_domain(
    b: &mut Builder,
    d: &DesiredDomain,
    desired: &DesiredState,
    observed: &ObservedState,
) {
    let object = ObjectRef::new(ObjectKind::Domain, &d.name, &d.display);
    let Some(host) = observed.hosts.get(&d.node) else {
        b.notice(
            NoticeKind::Invalid,
            &object,
            &d.node,
            format!("{}: node {} is not connected", d.origin, d.node),
            vec![],
        );
        return;
    };
    for disk in &d.disks {
        if matches!(disk.source, DesiredDiskSource::Volume { .. })
            && disk_pool(&disk.source, host).is_none()
        {
            b.notice(
                NoticeKind::Invalid,
                &object,
                &d.node,
                format!(
                    "{}: spec.disks[name={}].volume: {} is neither in the manifests nor on node {}",
                    d.origin,
                    disk.name,
                    describe_disk_source(&disk.source),
                    d.node
                ),
                vec![],
            );
            return;
        }
    }
    for nic in &d.interfaces {
        let known = desired
            .networks
            .iter()
            .any(|n| n.name == nic.network && n.placed_on(&d.node))
            || host.networks.contains_key(&nic.network);
        if !known {
            b.notice(NoticeKind::Invalid, &object, &d.node, format!("{}: spec.interfaces[name={}].network: Network {} is neither in the manifests nor on node {}", d.origin, nic.name, nic.network, d.node), vec![]);
            return;
        }
    }
    if !d.host_devices.is_empty() {
        let used = super::host_devices::in_use(host);
        let problems = super::host_devices::check(d, &d.node, host.pci_devices.as_ref(), &used);
        if let Some(p) = problems.first() {
            let kind = match p {
                super::host_devices::HostDeviceProblem::Missing { .. } => NoticeKind::Invalid,
                super::host_devices::HostDeviceProblem::InUse { .. } => NoticeKind::Conflict,
            };
            b.notice(kind, &object, &d.node, format!("{}: {p}", d.origin), vec![]);
            return;
        }
    }
    let deps = dependencies(d);
    let here = host.domains.get(&d.name);
    // The same resource elsewhere: a move (live migration when it runs).
    let elsewhere: Vec<(&String, &ObservedDomain)> = observed
        .hosts
        .iter()
        .filter(|(n, _)| **n != d.node)
        .filter_map(|(n, h)| h.domains.get(&d.name).map(|o| (n, o)))
        .filter(|(_, o)| o.owner.as_ref().is_some_and(|m| m.same_resource(&d.owner)))
        .collect();

    if let Some(o) = here
        && !o.owner.as_ref().is_some_and(|m| m.same_resource(&d.owner))
    {
        b.notice(
            NoticeKind::Conflict,
            &object,
            &d.node,
            clash_message(&object.to_string(), &d.origin, "domain", &d.node, &o.owner),
            vec![],
        );
        return;
    }

    match here {
        None => {
            if let Some((src, o)) = elsewhere.first() {
                if o.power.is_active() && !(d.host_devices.is_empty() && o.host_devices.is_empty())
                {
                    b.notice(NoticeKind::Forbidden, &object, src, format!("{}: spec.nodeName changed while it runs, but a domain with host devices cannot live-migrate (libvirt refuses): stop it to move it, or remove spec.hostDevices", d.origin), vec![]);
                    return;
                }
                if o.power.is_active() {
                    let op = Op::MigrateDomain {
                        to: d.node.clone(),
                        migration: d.migration.clone(),
                    };
                    let change = Change::new("nodeName", src, &d.node);
                    b.push(
                        src,
                        &object,
                        &d.owner,
                        op,
                        Symbol::Live,
                        "spec.nodeName changed while it runs: live migration",
                        vec![change],
                        &deps,
                    );
                    return;
                }
                // Stopped: define on the new node under the same UUID, then remove the old.
                let pres = preserve(d, o);
                b.push(
                    &d.node,
                    &object,
                    &d.owner,
                    Op::DefineDomain {
                        domain: Box::new(d.clone()),
                        preserve: pres,
                    },
                    Symbol::Live,
                    "spec.nodeName changed while it is stopped: move the definition",
                    vec![Change::new("nodeName", src, &d.node)],
                    &deps,
                );
                let moved = (ObjectKind::Domain, d.node.clone(), d.name.clone());
                b.push(
                    src,
                    &object,
                    &d.owner,
                    Op::DeleteDomain,
                    Symbol::Live,
                    format!("moved to node {}", d.node),
                    vec![],
                    &[moved],
                );
                let steps = autostart_step(Op::SetDomainAutostart, false, d.autostart)
                    .into_iter()
                    .chain(power_ops(
                        d,
                        PowerObserved::Shutoff,
                        &o.reason,
                        o.start_owed,
                    ));
                b.chain(&d.node, &object, &d.owner, Symbol::Live, steps);
                return;
            }
            b.push(
                &d.node,
                &object,
                &d.owner,
                Op::DefineDomain {
                    domain: Box::new(d.clone()),
                    // Noted in the definition until the start below happens, so a crash
                    // between the two is not taken for a guest that stopped on its own.
                    preserve: Preserve {
                        start_owed: d.state != PowerState::Stopped,
                        ..Preserve::default()
                    },
                },
                Symbol::Create,
                "not on the host",
                definition_changes(d),
                &deps,
            );
            let steps = autostart_step(Op::SetDomainAutostart, false, d.autostart)
                .into_iter()
                .chain(initial_power_ops(d));
            b.chain(&d.node, &object, &d.owner, Symbol::Create, steps);
        }
        Some(o) => {
            for (src, other) in &elsewhere {
                if other.power.is_active() {
                    b.notice(NoticeKind::Conflict, &object, src, format!("{} is defined on node {} and also runs on node {src}: virtkube never runs a domain twice; stop the copy on {src}", object, d.node), vec![]);
                    return;
                }
                b.push(
                    src,
                    &object,
                    &d.owner,
                    Op::DeleteDomain,
                    Symbol::Delete,
                    format!("a stale copy: the domain lives on node {}", d.node),
                    vec![],
                    &[],
                );
            }
            let diff = diff_domain(d, o, host);
            let mut power = o.power;
            if !o.power.is_active() {
                let mut changes: Vec<Change> = diff.live.into_iter().flat_map(|(_, c)| c).collect();
                changes.extend(diff.restart);
                if !changes.is_empty() {
                    b.push(
                        &d.node,
                        &object,
                        &d.owner,
                        Op::DefineDomain {
                            domain: Box::new(d.clone()),
                            preserve: preserve(d, o),
                        },
                        Symbol::Live,
                        "the domain is stopped: its definition is updated in place",
                        changes,
                        &deps,
                    );
                }
            } else {
                let restart_now = !diff.restart.is_empty() && d.restart_now;
                if !diff.restart.is_empty() && !restart_now {
                    b.notice(NoticeKind::RestartPending, &object, &d.node, "needs a restart: applied at the next stop (updatePolicy Deferred; set updatePolicy Restart to restart now)", diff.restart.clone());
                }
                if restart_now {
                    let mut changes = diff.restart.clone();
                    changes.extend(diff.live.iter().flat_map(|(_, c)| c.clone()));
                    b.push(
                        &d.node,
                        &object,
                        &d.owner,
                        Op::RestartDomain {
                            domain: Box::new(d.clone()),
                            preserve: preserve(d, o),
                        },
                        Symbol::Restart,
                        "updatePolicy Restart: shut down, redefine, start",
                        changes,
                        &deps,
                    );
                    power = PowerObserved::Running;
                } else {
                    for (op, changes) in diff.live {
                        let why = match op {
                            Op::AttachDisk(_)
                            | Op::AttachInterface(_)
                            | Op::AttachHostDevice(_) => "plugged in live",
                            Op::DetachDisk { .. }
                            | Op::DetachInterface { .. }
                            | Op::DetachHostDevice { .. } => {
                                "unplugged live (the guest must release it)"
                            }
                            _ => "applied live",
                        };
                        // A plugged-in disk may use a volume this plan creates.
                        b.push(
                            &d.node,
                            &object,
                            &d.owner,
                            op,
                            Symbol::Live,
                            why,
                            changes,
                            &deps,
                        );
                    }
                }
            }
            let steps = autostart_step(Op::SetDomainAutostart, o.autostart, d.autostart)
                .into_iter()
                .chain(power_ops(d, power, &o.reason, o.start_owed));
            b.chain(&d.node, &object, &d.owner, Symbol::Live, steps);
        }
    }
}
