//! Generated manifests for the hostile-input tests (`hostile_input.rs`: no panic, no XML
//! injection, and whatever validation accepts, libvirt's `test:///default` accepts).
//!
//! A [`Case`] is a *shape* (which objects and fields are set, how many disks and NICs) and,
//! for every string the user controls, two values: a benign one that is valid for its field,
//! and a hostile one — XML metacharacters, markup meant to add an element or an attribute,
//! entities, CDATA ends, control characters, non-characters, bidi overrides, very long text,
//! `..` paths, or arbitrary Unicode — often after a valid prefix so it survives a pattern's
//! anchor. Rendering the same shape with each set lets the tests compare the libvirt XML
//! the two produce: markup in a string must change text, never structure.

#![allow(dead_code)]

use proptest::prelude::*;
use serde_json::{Value, json};

/// The namespace of every generated namespaced object.
pub const NAMESPACE: &str = "fuzz";

/// One disk of the domain.
#[derive(Debug, Clone)]
pub struct DiskShape {
    /// From a host path (else from the generated Volume).
    pub host_path: bool,
    /// Bus index into [`BUSES`].
    pub bus: usize,
    /// A CD-ROM.
    pub cdrom: bool,
    /// Read-only.
    pub read_only: bool,
}

/// Buses a disk may use.
pub const BUSES: [&str; 4] = ["virtio", "sata", "scsi", "ide"];

/// Which objects and fields a case sets.
#[derive(Debug, Clone)]
pub struct Shape {
    /// vCPUs.
    pub vcpus: u32,
    /// Memory in MiB.
    pub memory_mib: u64,
    /// Direct kernel boot (with initrd and command line).
    pub kernel: bool,
    /// A CPU model (mode custom).
    pub cpu_model: bool,
    /// A machine type.
    pub machine: bool,
    /// Disks.
    pub disks: Vec<DiskShape>,
    /// NICs; `true`: with an explicit MAC.
    pub nics: Vec<bool>,
    /// Network mode index into [`MODES`].
    pub mode: usize,
    /// A network bridge name.
    pub bridge: bool,
    /// A copy-on-write overlay Volume on the first.
    pub overlay: bool,
    /// CPU tuning: vCPU 0 and the emulator pinned, a CPU limit.
    pub tuning: bool,
}

/// Network modes generated (bridge needs an existing host bridge: left out).
pub const MODES: [&str; 3] = ["isolated", "nat", "route"];

/// Every user-controlled string of a case.
#[derive(Debug, Clone)]
pub struct Strings {
    /// Object names (domain, pool, network, volume).
    pub names: [String; 4],
    /// The pool's target path.
    pub pool_path: String,
    /// Kernel, initrd, command line.
    pub kernel: String,
    /// Initrd path.
    pub initrd: String,
    /// Kernel command line.
    pub cmdline: String,
    /// CPU model.
    pub cpu_model: String,
    /// Machine type.
    pub machine: String,
    /// Host paths, one per disk.
    pub host_paths: Vec<String>,
    /// MACs, one per NIC.
    pub macs: Vec<String>,
    /// The bridge name.
    pub bridge: String,
    /// The cpuset vCPU 0 and the emulator are pinned to.
    pub cpuset: String,
    /// The CPU limit.
    pub cpu_limit: String,
    /// The network's DHCP lease: its MAC and host name.
    pub lease_mac: String,
    /// The lease's host name.
    pub lease_name: String,
    /// The network's static DNS name.
    pub dns_name: String,
}

/// One generated case: a shape and its two sets of strings.
#[derive(Debug, Clone)]
pub struct Case {
    /// The shape.
    pub shape: Shape,
    /// Valid for every field.
    pub benign: Strings,
    /// The same slots, attacked.
    pub hostile: Strings,
}

/// Payloads meant to break out of an attribute or a text node, or to make invalid XML.
pub const PAYLOADS: &[&str] = &[
    "'/><disk type='file' device='disk'><source file='/etc/shadow'/><target dev='vdz'/></disk><x a='",
    "\"/><interface type='bridge'><source bridge='br0'/></interface><x a=\"",
    "</cmdline><kernel>/tmp/evil</kernel><cmdline>",
    "]]><![CDATA[",
    "<!-- -->",
    "<!DOCTYPE d [<!ENTITY e SYSTEM 'file:///etc/passwd'>]>",
    "&e; &amp; &#60; &#x3c; &lt;",
    "\u{0}",
    "\u{1}\u{8}\u{b}\u{c}\u{1b}",
    "\r\n\t",
    "\u{fffe}\u{ffff}",
    "\u{202e}gnp.exe",
    "\u{feff}",
    "/../../etc/passwd",
    "/./x",
    "'",
    "\"",
    "<",
    ">",
    "&",
    "${HOME} $(reboot) `id`",
    "%s%n%x",
    "\\",
    "99999999999999999999",
    "-1",
    ",^0",
    "-0",
    ".0001",
    "e9",
    " ",
    "\u{3000}",
    "\u{a0}",
    "",
];

/// A hostile value for a slot whose valid form is `valid`.
pub fn hostile(valid: &'static str) -> impl Strategy<Value = String> {
    let payload = prop::sample::select(PAYLOADS);
    prop_oneof![
        2 => Just(valid.to_string()),
        4 => payload.clone().prop_map(move |p| format!("{valid}{p}")),
        2 => payload.prop_map(str::to_string),
        1 => "\\PC{0,40}".prop_map(move |s| format!("{valid}{s}")),
        1 => any::<String>().prop_map(|s| s.chars().take(60).collect()),
        1 => (1usize..5000).prop_map(move |n| format!("{valid}{}", "a".repeat(n))),
    ]
}

fn strings_of(
    shape: &Shape,
    pick: impl Fn(&'static str) -> BoxedStrategy<String>,
) -> BoxedStrategy<Strings> {
    let disks = shape.disks.len();
    let nics = shape.nics.len();
    (
        (
            pick("vm"),
            pick("pool"),
            pick("net"),
            pick("data"),
            pick("/var/lib/virtkube/pools/fuzz"),
        ),
        (
            pick("/boot/vmlinuz"),
            pick("/boot/initrd.img"),
            pick("console=ttyS0 root=/dev/vda1"),
            pick("qemu64"),
            pick("pc"),
        ),
        proptest::collection::vec(pick("/var/lib/images/disk.img"), disks),
        proptest::collection::vec(pick("52:54:00:12:34:56"), nics),
        (pick("virbr-fz0"), pick("0"), pick("500m")),
        (
            pick("52:54:00:aa:bb:01"),
            pick("db"),
            pick("files.lab.example"),
        ),
    )
        .prop_map(
            |(
                (dom, pool, net, vol, pool_path),
                (kernel, initrd, cmdline, cpu_model, machine),
                host_paths,
                macs,
                (bridge, cpuset, cpu_limit),
                (lease_mac, lease_name, dns_name),
            )| Strings {
                names: [dom, pool, net, vol],
                pool_path,
                kernel,
                initrd,
                cmdline,
                cpu_model,
                machine,
                host_paths,
                macs,
                bridge,
                cpuset,
                cpu_limit,
                lease_mac,
                lease_name,
                dns_name,
            },
        )
        .boxed()
}

/// The benign value of a slot: its valid form, made unique per index where several exist.
fn benign_strings(shape: &Shape) -> Strings {
    Strings {
        names: ["vm".into(), "pool".into(), "net".into(), "data".into()],
        pool_path: "/var/lib/virtkube/pools/fuzz".into(),
        kernel: "/boot/vmlinuz".into(),
        initrd: "/boot/initrd.img".into(),
        cmdline: "console=ttyS0 root=/dev/vda1".into(),
        cpu_model: "qemu64".into(),
        machine: "pc".into(),
        host_paths: (0..shape.disks.len())
            .map(|i| format!("/var/lib/images/disk{i}.img"))
            .collect(),
        macs: (0..shape.nics.len())
            .map(|i| format!("52:54:00:12:34:{i:02x}"))
            .collect(),
        bridge: "virbr-fz0".into(),
        cpuset: "0".into(),
        cpu_limit: "500m".into(),
        lease_mac: "52:54:00:aa:bb:01".into(),
        lease_name: "db".into(),
        dns_name: "files.lab.example".into(),
    }
}

/// Shapes: a domain with up to 4 disks and 3 NICs, a pool, a network, one or two volumes.
pub fn shape() -> impl Strategy<Value = Shape> {
    (
        (
            1u32..4,
            64u64..512,
            any::<bool>(),
            any::<bool>(),
            any::<bool>(),
        ),
        proptest::collection::vec(
            (
                any::<bool>(),
                0usize..BUSES.len(),
                any::<bool>(),
                any::<bool>(),
            )
                .prop_map(|(host_path, bus, cdrom, read_only)| DiskShape {
                    host_path,
                    bus,
                    cdrom,
                    read_only,
                }),
            0..4,
        ),
        proptest::collection::vec(any::<bool>(), 0..3),
        (
            0usize..MODES.len(),
            any::<bool>(),
            any::<bool>(),
            any::<bool>(),
        ),
    )
        .prop_map(
            |(
                (vcpus, memory_mib, kernel, cpu_model, machine),
                disks,
                nics,
                (mode, bridge, overlay, tuning),
            )| Shape {
                vcpus,
                memory_mib,
                kernel,
                cpu_model,
                machine,
                disks,
                nics,
                mode,
                bridge,
                overlay,
                tuning,
            },
        )
}

impl Strings {
    /// Every slot, in a fixed order.
    fn slots_mut(&mut self) -> Vec<&mut String> {
        let mut slots: Vec<&mut String> = self.names.iter_mut().collect();
        slots.extend([
            &mut self.pool_path,
            &mut self.kernel,
            &mut self.initrd,
            &mut self.cmdline,
            &mut self.cpu_model,
            &mut self.machine,
            &mut self.bridge,
            &mut self.cpuset,
            &mut self.cpu_limit,
            &mut self.lease_mac,
            &mut self.lease_name,
            &mut self.dns_name,
        ]);
        slots.extend(self.host_paths.iter_mut());
        slots.extend(self.macs.iter_mut());
        slots
    }

    /// Whether each slot of [`Strings::slots_mut`] is written into the manifests of
    /// `shape` (an attack on a slot the shape leaves out would test nothing).
    fn live(shape: &Shape) -> Vec<bool> {
        let mut live = vec![true; 5];
        live.extend([
            shape.kernel,
            shape.kernel,
            shape.kernel,
            shape.cpu_model,
            shape.machine,
            shape.bridge,
            shape.tuning,
            shape.tuning,
            true,
            true,
            true,
        ]);
        live.extend(shape.disks.iter().map(|d| d.host_path));
        live.extend(shape.nics.iter().copied());
        live
    }

    /// `benign` with the slots `attacked` picks (among those `shape` writes) taken from
    /// `attack`: a case attacks a few slots at once, so the others pass validation and the
    /// attacked ones reach the XML.
    fn mixed(
        shape: &Shape,
        benign: &Strings,
        attack: &Strings,
        attacked: &[prop::sample::Index],
    ) -> Strings {
        let mut out = benign.clone();
        let mut attack = attack.clone();
        let from: Vec<String> = attack.slots_mut().into_iter().map(|s| s.clone()).collect();
        let live: Vec<usize> = Self::live(shape)
            .iter()
            .enumerate()
            .filter(|(_, l)| **l)
            .map(|(i, _)| i)
            .collect();
        let mut slots = out.slots_mut();
        assert_eq!(slots.len(), Self::live(shape).len());
        for pick in attacked {
            let i = live[pick.index(live.len())];
            *slots[i] = from[i].clone();
        }
        out
    }
}

/// Cases whose hostile strings are drawn from [`hostile`], one to three slots attacked.
pub fn case() -> impl Strategy<Value = Case> {
    shape().prop_flat_map(|shape| {
        let benign = benign_strings(&shape);
        (
            strings_of(&shape, |valid| hostile(valid).boxed()),
            proptest::collection::vec(any::<prop::sample::Index>(), 1..4),
        )
            .prop_map(move |(attack, attacked)| Case {
                shape: shape.clone(),
                benign: benign.clone(),
                hostile: Strings::mixed(&shape, &benign, &attack, &attacked),
            })
    })
}

/// Cases with mild hostility only (text a user may legitimately write: markup characters,
/// quotes, Unicode, spaces, long values), for the test that libvirt accepts what
/// validation accepts.
pub fn plausible_case() -> impl Strategy<Value = Case> {
    let mild = |valid: &'static str| -> BoxedStrategy<String> {
        prop_oneof![
            3 => Just(valid.to_string()),
            2 => prop::sample::select(&["<", ">", "&", "'", "\"", " x", "é", "漢字", "&amp;", "]]>", " ", "\u{a0}"][..])
                .prop_map(move |p| format!("{valid}{p}")),
            1 => "[a-zA-Z0-9 ._=,:/<>&'\"-]{0,30}".prop_map(move |s| format!("{valid}{s}")),
        ]
        .boxed()
    };
    shape().prop_flat_map(move |shape| {
        let benign = benign_strings(&shape);
        (
            strings_of(&shape, mild),
            proptest::collection::vec(any::<prop::sample::Index>(), 1..4),
        )
            .prop_map(move |(attack, attacked)| Case {
                shape: shape.clone(),
                benign: benign.clone(),
                hostile: Strings::mixed(&shape, &benign, &attack, &attacked),
            })
    })
}

/// The manifests of `shape` with `s`, as YAML text (JSON documents are YAML), for node
/// `node`.
pub fn render(shape: &Shape, s: &Strings, node: &str) -> String {
    let [dom, pool, net, vol] = &s.names;
    let mut docs: Vec<Value> = Vec::new();
    docs.push(json!({
        "apiVersion": "virtkube.io/v1alpha1", "kind": "StoragePool",
        "metadata": { "name": pool },
        "spec": { "type": "dir", "target": { "path": s.pool_path } }
    }));
    let mut net_spec = json!({
        "mode": MODES[shape.mode],
        "ip": { "address": "10.170.0.1", "prefix": 24, "dhcp": { "hosts": [
            { "mac": s.lease_mac, "ip": "10.170.0.5", "name": s.lease_name }
        ] } },
        "dns": { "hosts": [{ "ip": "10.170.0.6", "hostnames": [s.dns_name] }] }
    });
    if shape.bridge {
        net_spec["bridge"] = json!(s.bridge);
    }
    docs.push(json!({
        "apiVersion": "virtkube.io/v1alpha1", "kind": "Network",
        "metadata": { "name": net }, "spec": net_spec
    }));
    docs.push(json!({
        "apiVersion": "virtkube.io/v1alpha1", "kind": "Volume",
        "metadata": { "name": vol, "namespace": NAMESPACE },
        "spec": { "pool": pool, "capacity": "16Mi", "nodeName": node, "reclaimPolicy": "Delete" }
    }));
    if shape.overlay {
        docs.push(json!({
            "apiVersion": "virtkube.io/v1alpha1", "kind": "Volume",
            "metadata": { "name": format!("{vol}-ov"), "namespace": NAMESPACE },
            "spec": { "pool": pool, "capacity": "16Mi", "nodeName": node, "reclaimPolicy": "Delete",
                      "source": { "backingVolume": vol } }
        }));
    }
    let mut used_targets = std::collections::BTreeMap::<&str, u8>::new();
    let disks: Vec<Value> = shape
        .disks
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let bus = BUSES[d.bus];
            let prefix = if bus == "virtio" {
                "vd"
            } else if bus == "ide" {
                "hd"
            } else {
                "sd"
            };
            let n = used_targets.entry(prefix).or_insert(0);
            let target = format!("{prefix}{}", (b'a' + *n) as char);
            *n += 1;
            let mut disk = json!({ "name": format!("d{i}"), "bus": bus, "target": target,
                                   "readOnly": d.read_only || d.cdrom,
                                   "device": if d.cdrom { "cdrom" } else { "disk" } });
            if d.host_path {
                disk["hostPath"] = json!(s.host_paths[i]);
            } else if shape.overlay && i % 2 == 1 {
                disk["volume"] = json!(format!("{vol}-ov"));
            } else {
                disk["volume"] = json!(vol);
            }
            disk
        })
        .collect();
    let nics: Vec<Value> = shape
        .nics
        .iter()
        .enumerate()
        .map(|(i, with_mac)| {
            let mut nic = json!({ "name": format!("eth{i}"), "network": net });
            if *with_mac {
                nic["macAddress"] = json!(s.macs[i]);
            }
            nic
        })
        .collect();
    let mut spec = json!({
        "nodeName": node, "runStrategy": "Halted",
        "cpu": { "vcpus": shape.vcpus },
        "memory": { "size": format!("{}Mi", shape.memory_mib) },
        "disks": disks, "interfaces": nics
    });
    if shape.cpu_model {
        spec["cpu"]["mode"] = json!("custom");
        spec["cpu"]["model"] = json!(s.cpu_model);
    }
    if shape.tuning {
        spec["cpu"]["pinning"] = json!([{ "vcpu": 0, "cpuset": s.cpuset }]);
        spec["cpu"]["emulatorCpuset"] = json!(s.cpuset);
        spec["cpu"]["limit"] = json!(s.cpu_limit);
    }
    let mut os = json!({});
    if shape.machine {
        os["machine"] = json!(s.machine);
    }
    if shape.kernel {
        os["kernel"] = json!(s.kernel);
        os["initrd"] = json!(s.initrd);
        os["cmdline"] = json!(s.cmdline);
    }
    spec["os"] = os;
    docs.push(json!({
        "apiVersion": "virtkube.io/v1alpha1", "kind": "Domain",
        "metadata": { "name": dom, "namespace": NAMESPACE }, "spec": spec
    }));
    docs.iter()
        .map(|d| serde_json::to_string(d).unwrap_or_default())
        .collect::<Vec<_>>()
        .join("\n---\n")
}

/// Edits of a valid manifest's text meant to confuse a YAML parser (anchors, aliases, tags,
/// merge keys, flow collections, tabs, deep nesting), at byte positions.
pub fn text_edits() -> impl Strategy<Value = Vec<(prop::sample::Index, &'static str)>> {
    proptest::collection::vec(
        (
            any::<prop::sample::Index>(),
            prop::sample::select(
                &[
                    "&a ",
                    "*a",
                    "!!binary ",
                    "!!python/object:os.system ",
                    "<<: *a\n",
                    "{",
                    "}",
                    "[",
                    "]",
                    "\t",
                    "\n- ",
                    ": ",
                    "'",
                    "\"",
                    "#",
                    "---\n",
                    "...\n",
                    "%YAML 1.1\n",
                    "? ",
                    "|\n",
                    ">-\n",
                    "\u{0}",
                    "\u{feff}",
                    "[[[[[[[[[[[[[[[[",
                    "~",
                    "!!",
                ][..],
            ),
        ),
        1..6,
    )
}

/// `text` with `edits` inserted (each at its index, on a character boundary).
pub fn apply_edits(text: &str, edits: &[(prop::sample::Index, &'static str)]) -> String {
    let mut out = text.to_string();
    for (at, insert) in edits {
        let boundaries: Vec<usize> = (0..=out.len())
            .filter(|i| out.is_char_boundary(*i))
            .collect();
        let pos = boundaries[at.index(boundaries.len())];
        out.insert_str(pos, insert);
    }
    out
}
