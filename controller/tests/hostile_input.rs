//! Hostile input on the manifest → typed API → libvirt XML path: generated manifests whose
//! every user-controlled string is attacked (see `hostile/mod.rs`), text-level edits of valid
//! manifests, and a committed corpus (`hostile/corpus/`) run every time.
//!
//! Properties, for every input:
//! - **No panic**, anywhere on the path (reading, validation, planning, building the
//!   definitions, writing and reading back their XML).
//! - **Refused where it is read, saying where**: a refusal comes from the reader (YAML,
//!   schema) or the validation, names the field (or the YAML line), and holds no control
//!   character from the input (it is printed to a terminal).
//! - **Refused or well-formed**: what the validation accepts yields XML 1.0 whose every
//!   character is allowed by the XML specification (libvirt's parser refuses the others).
//! - **No injection**: markup in a string changes text, never structure — the XML of the
//!   hostile strings has the same elements and attributes as the XML of the benign ones for
//!   the same shape; and every string reads back from the XML exactly as it was written
//!   (XML normalizes raw whitespace in attributes and raw carriage returns: a value that
//!   reads back differently would name another file than the one validated).
//! - **Libvirt accepts it**: the definitions are given to `test:///default` (pools defined
//!   and started, networks defined, volumes created, domains defined), libvirt's stored XML
//!   holds the same strings, and everything is removed again.
//!
//! The number of generated cases is bounded for CI (`PROPTEST_CASES` raises it); failures
//! proptest found are kept in `hostile_input.proptest-regressions` and replayed first.

mod hostile;

use std::collections::BTreeMap;
use std::path::Path;

use proptest::prelude::*;
use virtkube::host::{DefTarget, domain_def, network_def, pool_def, to_owner, volume_def};
use virtkube::plan::desired::{DesiredDiskSource, DesiredState, Nodes, VolumeOrigin};
use virtkube::plan::observed::ObservedState;
use virtkube::plan::{self, Op, PlanOptions, Preserve};
use virtkube_crds::manifest::{Object, Reader};
use virtkube_crds::validation::Validate;
use virtkube_engine::model::xml::{self, Element};
use virtkube_engine::model::{
    BackingStore, DomainDef, DomainObserved, NetworkDef, NetworkObserved, Owner, PoolDef,
    PoolObserved, VolumeDef, VolumeFormat, VolumeObserved,
};
use virtkube_engine::{Engine, EngineConfig};

const NODE: &str = "local";

/// One libvirt definition the path produced: what it is, and its XML.
#[derive(Debug, Clone)]
struct Defined {
    kind: &'static str,
    def: Def,
    xml: String,
}

/// The engine's definition, to give to libvirt.
#[derive(Debug, Clone)]
enum Def {
    Pool(PoolDef),
    Network(NetworkDef),
    Volume { pool: String, def: VolumeDef },
    Domain(Box<DomainDef>),
}

/// What the path made of one manifest text: refused somewhere (with where and why), or the
/// definitions of every object it would create.
#[derive(Debug)]
enum Outcome {
    Refused(Refusal),
    Defined(Vec<Defined>),
    /// Accepted, but what libvirt would read is not what was written.
    Broken(String),
}

/// Where the path refused an input, and the message.
#[derive(Debug)]
struct Refusal {
    /// `reader` (YAML, schema), `validation`, `desired state`, `plan`, or the engine's
    /// `definition`.
    at: &'static str,
    message: String,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.at, self.message)
    }
}

/// The outcome of an input refused at `at`.
fn refused(at: &'static str, message: impl std::fmt::Display) -> Outcome {
    Outcome::Refused(Refusal {
        at,
        message: message.to_string(),
    })
}

impl Refusal {
    /// Whether the refusal says where: a field path (`spec.…`, `metadata.…`), or, for text
    /// that is not YAML at all, a line and column; and whether it can be printed safely (no
    /// control character from the input but line breaks between errors).
    fn says_where(&self) -> bool {
        let m = &self.message;
        matches!(self.at, "reader" | "validation")
            && !m.chars().any(|c| c.is_control() && c != '\n')
            && (m.contains("spec.")
                || m.contains("metadata.")
                || (m.contains("not valid YAML") && m.contains("line ")))
    }
}

/// The whole path, as `virtkube apply` runs it up to libvirt.
fn through(text: &str) -> Outcome {
    // One reader per thread, as `virtkube apply` keeps one for all its files (the CRD
    // schemas and compiled patterns are costly to build).
    thread_local! {
        static READER: std::cell::RefCell<Reader> = std::cell::RefCell::new(Reader::new());
    }
    let manifests = match READER.with(|r| r.borrow_mut().parse(Path::new("fuzz.yaml"), text)) {
        Ok(m) => m,
        Err(e) => return refused("reader", e),
    };
    for m in &manifests {
        let errors = match &m.object {
            Object::Domain(d) => d.spec.validate(),
            Object::Volume(v) => v.spec.validate(),
            Object::Network(n) => n.spec.validate(),
            Object::StoragePool(p) => p.spec.validate(),
        };
        if !errors.is_empty() {
            return refused("validation", errors);
        }
    }
    let (desired, notices) = DesiredState::from_manifests(&manifests, &Nodes::single(NODE));
    if let Some(n) = notices.first() {
        return refused("desired state", &n.message);
    }
    let mut observed = ObservedState::default();
    observed.host_mut(NODE);
    let p = plan::plan(&desired, &observed, &PlanOptions::default());
    if p.has_errors() {
        return refused("plan", p.render(false));
    }
    let pools: BTreeMap<String, String> = desired
        .volumes
        .iter()
        .map(|v| (v.name.clone(), v.pool.clone()))
        .collect();
    let on = DefTarget {
        node: NODE,
        virt_type: "test",
        test_driver: true,
    };
    let mut defined = Vec::new();
    for a in &p.actions {
        let (kind, def, xml) = match &a.op {
            Op::DefinePool(pool) => match pool_def(pool) {
                Ok(def) => match def.validate() {
                    Ok(()) => ("pool", Def::Pool(def.clone()), def.to_xml()),
                    Err(e) => return refused("definition", format!("pool: {e}")),
                },
                Err(e) => return refused("definition", format!("pool: {e}")),
            },
            Op::DefineNetwork(net) => {
                let def = network_def(net);
                if let Err(e) = def.validate() {
                    return refused("definition", format!("network: {e}"));
                }
                ("network", Def::Network(def.clone()), def.to_xml())
            }
            Op::CreateVolume {
                pool,
                capacity,
                format,
                source,
            } => {
                let backing = match source {
                    VolumeOrigin::Backing(b) => Some(b.as_str()),
                    _ => None,
                };
                let def = volume_def(&a.object.name, capacity.unwrap_or(1 << 20), format, backing);
                if let Err(e) = def.validate() {
                    return refused("definition", format!("volume: {e}"));
                }
                let store = backing.map(|b| BackingStore {
                    path: format!("/pools/images/{b}"),
                    format: VolumeFormat::Qcow2,
                });
                let xml = def.to_xml(store.as_ref());
                let def = Def::Volume {
                    pool: pool.clone(),
                    def,
                };
                ("volume", def, xml)
            }
            Op::DefineDomain { domain, .. } => {
                match domain_def(domain, &Preserve::default(), on, &pools) {
                    Ok(def) => match def.validate() {
                        Ok(()) => ("domain", Def::Domain(Box::new(def.clone())), def.to_xml()),
                        Err(e) => return refused("definition", format!("domain: {e}")),
                    },
                    Err(e) => return refused("definition", format!("domain: {e}")),
                }
            }
            _ => continue,
        };
        defined.push(Defined { kind, def, xml });
    }
    // Every user string reads back from the XML exactly as the desired state holds it.
    for x in &defined {
        let back = match &x.def {
            Def::Domain(def) => desired
                .domains
                .iter()
                .find(|d| d.name == def.name)
                .map(|d| domain_reads_back(&x.xml, d)),
            Def::Pool(def) => Some(pool_reads_back(&x.xml, def)),
            Def::Network(def) => Some(network_reads_back(&x.xml, def)),
            Def::Volume { def, .. } => Some(
                VolumeObserved::from_xml(&x.xml)
                    .map_err(|e| e.to_string())
                    .and_then(|o| same("volume name", Some(&def.name), Some(&o.name))),
            ),
        };
        if let Some(Err(e)) = back {
            return Outcome::Broken(format!("{} does not read back: {e}\n{}", x.kind, x.xml));
        }
    }
    Outcome::Defined(defined)
}

/// Whether a string read back is the one written, exactly: the planner compares the
/// desired strings with the ones read back from libvirt, so any difference (a space the
/// reader trims, an empty text read as none) is a change planned on every reconcile.
fn same(what: &str, want: Option<&String>, got: Option<&String>) -> Result<(), String> {
    if want == got {
        Ok(())
    } else {
        Err(format!("{what}: wrote {want:?}, reads {got:?}"))
    }
}

/// The owner mark (in `<metadata>`) reads back.
fn owner_reads_back(want: &Owner, got: Option<&Owner>) -> Result<(), String> {
    match got {
        Some(got)
            if got.uid == want.uid && got.name == want.name && got.namespace == want.namespace =>
        {
            Ok(())
        }
        other => Err(format!("owner: wrote {want:?}, reads {other:?}")),
    }
}

fn pool_reads_back(xml_text: &str, def: &PoolDef) -> Result<(), String> {
    let o = PoolObserved::from_xml(xml_text).map_err(|e| e.to_string())?;
    same("pool name", Some(&def.name), Some(&o.name))?;
    same("pool path", Some(&def.target_path), o.target_path.as_ref())?;
    owner_reads_back(&def.owner, o.owner.as_ref())
}

fn network_reads_back(xml_text: &str, def: &NetworkDef) -> Result<(), String> {
    let o = NetworkObserved::from_xml(xml_text).map_err(|e| e.to_string())?;
    same("network name", Some(&def.name), Some(&o.name))?;
    same("bridge", def.bridge.as_ref(), o.bridge.as_ref())?;
    let leases = |ip: Option<&virtkube_engine::model::IpDef>| ip.map(|ip| ip.hosts.clone());
    if leases(def.ip.as_ref()) != leases(o.ip.as_ref()) || def.dns_hosts != o.dns_hosts {
        return Err(format!(
            "DHCP and DNS hosts: wrote {:?} {:?}, reads {:?} {:?}",
            leases(def.ip.as_ref()),
            def.dns_hosts,
            leases(o.ip.as_ref()),
            o.dns_hosts
        ));
    }
    owner_reads_back(&def.owner, o.owner.as_ref())
}

/// Whether `c` may appear in an XML 1.0 document (the `Char` production).
fn xml_char(c: char) -> bool {
    matches!(c, '\u{9}' | '\u{a}' | '\u{d}' | '\u{20}'..='\u{d7ff}' | '\u{e000}'..='\u{fffd}' | '\u{10000}'..='\u{10ffff}')
}

/// The XML's structure: element names and attribute names, nested, without any text or
/// attribute value.
fn skeleton(el: &Element) -> String {
    let mut keys: Vec<&str> = el.attrs.iter().map(|(k, _)| k.as_str()).collect();
    keys.sort();
    let children: Vec<String> = el.children.iter().map(skeleton).collect();
    format!("<{} {}>{}</>", el.name, keys.join(","), children.join(""))
}

/// The strings of `d` that the domain XML carries, read back through the engine's reader
/// (which normalizes as XML 1.0 requires, as libvirt's does).
fn domain_reads_back(
    xml_text: &str,
    d: &virtkube::plan::desired::DesiredDomain,
) -> Result<(), String> {
    let o = DomainObserved::from_xml(xml_text).map_err(|e| e.to_string())?;
    same("domain name", Some(&d.name), Some(&o.name))?;
    owner_reads_back(&to_owner(&d.owner), o.owner.as_ref())?;
    same("kernel", d.kernel.as_ref(), o.os.kernel.as_ref())?;
    same("initrd", d.initrd.as_ref(), o.os.initrd.as_ref())?;
    same("cmdline", d.cmdline.as_ref(), o.os.cmdline.as_ref())?;
    same("machine", d.machine.as_ref(), o.os.machine.as_ref())?;
    same(
        "cpu model",
        d.cpu_model.as_ref(),
        o.cpu.as_ref().and_then(|c| c.model.as_ref()),
    )?;
    if d.disks.len() != o.disks.len() || d.interfaces.len() != o.interfaces.len() {
        return Err(format!(
            "{} disks and {} NICs written, {} and {} read",
            d.disks.len(),
            d.interfaces.len(),
            o.disks.len(),
            o.interfaces.len()
        ));
    }
    for (want, got) in d.disks.iter().zip(&o.disks) {
        let got_source = match &got.source {
            virtkube_engine::model::DiskSource::File { path } => Some(path.clone()),
            virtkube_engine::model::DiskSource::Volume { volume, .. } => Some(volume.clone()),
            _ => None,
        };
        let want_source = match &want.source {
            DesiredDiskSource::Path(p) => Some(p.clone()),
            DesiredDiskSource::Volume { volume, .. } => Some(volume.clone()),
        };
        if got_source != want_source {
            return Err(format!(
                "disk {}: wrote {want_source:?}, reads {got_source:?}",
                want.name
            ));
        }
        alias_reads_back(&want.name, got.alias.as_deref())?;
    }
    for (want, got) in d.interfaces.iter().zip(&o.interfaces) {
        if want.mac.is_some()
            && want.mac.as_ref().map(|m| m.to_ascii_lowercase())
                != got.mac.as_ref().map(|m| m.to_ascii_lowercase())
        {
            return Err(format!("MAC: wrote {:?}, reads {:?}", want.mac, got.mac));
        }
        if Some(&want.network) != got.network.as_ref() {
            return Err(format!(
                "network: wrote {:?}, reads {:?}",
                want.network, got.network
            ));
        }
        alias_reads_back(&want.name, got.alias.as_deref())?;
    }
    Ok(())
}

/// A device's name reads back from its alias (`ua-<name>`).
fn alias_reads_back(name: &str, alias: Option<&str>) -> Result<(), String> {
    if alias.map(|a| a.strip_prefix("ua-").unwrap_or(a)) == Some(name) {
        Ok(())
    } else {
        Err(format!("device {name}: reads alias {alias:?}"))
    }
}

/// Every definition is XML 1.0 made of allowed characters, and parses.
fn well_formed(defined: &[Defined]) -> Result<Vec<Element>, String> {
    defined
        .iter()
        .map(|d| {
            if let Some(c) = d.xml.chars().find(|c| !xml_char(*c)) {
                return Err(format!(
                    "{} XML holds {c:?}, which XML 1.0 forbids:\n{}",
                    d.kind, d.xml
                ));
            }
            let tree = xml::parse(&d.xml)
                .map_err(|e| format!("{} XML does not parse: {e}\n{}", d.kind, d.xml))?;
            if let Def::Domain(def) = &d.def {
                hotplug_matches_definition(def, &tree)?;
            }
            Ok(tree)
        })
        .collect()
}

/// The device XML a hotplug sends (`virDomainAttachDevice`) is, for every disk and NIC,
/// exactly the element of the full definition: the same escaping, so what the definitions'
/// properties prove holds for hotplug too.
fn hotplug_matches_definition(def: &DomainDef, tree: &Element) -> Result<(), String> {
    use virtkube_engine::model::Device;
    let devices = tree
        .find("devices")
        .ok_or_else(|| "domain XML without <devices>".to_string())?;
    let pairs = def
        .disks
        .iter()
        .map(|d| Device::Disk(d.clone()))
        .zip(devices.find_all("disk"))
        .chain(
            def.interfaces
                .iter()
                .map(|i| Device::Interface(i.clone()))
                .zip(devices.find_all("interface")),
        );
    for (device, element) in pairs {
        let hotplug = device.to_xml();
        let parsed = xml::parse(&hotplug)
            .map_err(|e| format!("hotplug XML does not parse: {e}\n{hotplug}"))?;
        if &parsed != element {
            return Err(format!(
                "hotplug XML differs from the definition's element:\n{hotplug}\nvs\n{}",
                element.to_xml()
            ));
        }
    }
    Ok(())
}

/// The properties for one generated case.
fn check(case: &hostile::Case) -> Result<(), TestCaseError> {
    let benign = through(&hostile::render(&case.shape, &case.benign, NODE));
    if let Outcome::Broken(why) = &benign {
        return Err(TestCaseError::fail(why.clone()));
    }
    let Outcome::Defined(benign) = benign else {
        return Err(TestCaseError::fail(format!(
            "the benign manifests are refused: {benign:?}\n{}",
            hostile::render(&case.shape, &case.benign, NODE)
        )));
    };
    let benign_trees = well_formed(&benign).map_err(TestCaseError::fail)?;
    let text = hostile::render(&case.shape, &case.hostile, NODE);
    let defined = match through(&text) {
        Outcome::Defined(defined) => defined,
        Outcome::Refused(r) if r.says_where() => return Ok(()),
        Outcome::Refused(r) => {
            return Err(TestCaseError::fail(format!(
                "refused late or without saying where: {r:?}\n{text}"
            )));
        }
        Outcome::Broken(why) => return Err(TestCaseError::fail(why)),
    };
    let trees = well_formed(&defined).map_err(TestCaseError::fail)?;
    prop_assert_eq!(trees.len(), benign_trees.len(), "{}", text);
    for ((tree, benign_tree), d) in trees.iter().zip(&benign_trees).zip(&defined) {
        prop_assert_eq!(
            skeleton(tree),
            skeleton(benign_tree),
            "the {} XML's structure changed with the strings:\n{}",
            d.kind,
            d.xml
        );
    }
    Ok(())
}

/// The user strings of a domain as read from XML (the engine's reader), to compare the
/// definition with what libvirt stored. The machine type is left out: libvirt may expand an
/// alias (`pc`) to the versioned type it stands for.
fn domain_strings(o: &DomainObserved) -> Vec<Option<String>> {
    let mut out = vec![
        Some(o.name.clone()),
        o.os.kernel.clone(),
        o.os.initrd.clone(),
        o.os.cmdline.clone().filter(|c| !c.trim().is_empty()),
        o.cpu.as_ref().and_then(|c| c.model.clone()),
        o.owner.as_ref().map(|w| format!("{w:?}")),
    ];
    // libvirt orders the disks by bus and target: compared as a set.
    let mut disks: Vec<Option<String>> = o
        .disks
        .iter()
        .map(|d| Some(format!("{:?} {:?}", d.alias, d.source)))
        .collect();
    disks.sort();
    out.extend(disks);
    for n in &o.interfaces {
        out.push(n.network.clone());
        out.push(n.mac.as_ref().map(|m| m.to_ascii_lowercase()));
        out.push(n.alias.clone());
    }
    out
}

/// Gives the definitions to libvirt (`test:///default`): pools are defined and started,
/// networks defined, volumes created, domains defined; then reads back what libvirt stored
/// and checks the user strings are the ones written.
async fn in_libvirt(e: &Engine, defined: &[Defined]) -> Result<(), String> {
    for x in defined {
        let fail = |what: &str, err: &dyn std::fmt::Display| {
            format!("libvirt refused the {} ({what}): {err}\n{}", x.kind, x.xml)
        };
        match &x.def {
            Def::Pool(def) => {
                e.pool_define(def)
                    .await
                    .map_err(|err| fail("define", &err))?;
                e.pool_start(&def.name, &def.owner)
                    .await
                    .map_err(|err| fail("start", &err))?;
                let o = e
                    .pool_observe(&def.name)
                    .await
                    .map_err(|err| fail("read", &err))?;
                same(
                    "pool path in libvirt",
                    Some(&def.target_path),
                    o.and_then(|o| o.target_path).as_ref(),
                )?;
            }
            Def::Network(def) => {
                e.network_define(def)
                    .await
                    .map_err(|err| fail("define", &err))?;
                let o = e
                    .network_observe(&def.name)
                    .await
                    .map_err(|err| fail("read", &err))?;
                same(
                    "bridge in libvirt",
                    def.bridge.as_ref(),
                    o.and_then(|o| o.bridge).as_ref(),
                )?;
            }
            Def::Volume { pool, def } => {
                let o = e
                    .volume_create(pool, def)
                    .await
                    .map_err(|err| fail("create", &err))?;
                same("volume name in libvirt", Some(&def.name), Some(&o.name))?;
            }
            Def::Domain(def) => {
                e.domain_define(def)
                    .await
                    .map_err(|err| fail("define", &err))?;
                let stored = e
                    .domain_xml(&def.name, true)
                    .await
                    .map_err(|err| fail("read", &err))?;
                let mut stored =
                    DomainObserved::from_xml(&stored).map_err(|err| fail("parse", &err))?;
                let written =
                    DomainObserved::from_xml(&x.xml).map_err(|err| fail("parse", &err))?;
                // libvirt generates the MACs not written.
                for (s, w) in stored.interfaces.iter_mut().zip(&written.interfaces) {
                    if w.mac.is_none() {
                        s.mac = None;
                    }
                }
                if domain_strings(&stored) != domain_strings(&written) {
                    return Err(format!(
                        "libvirt stored other strings than written:\n{:?}\n{:?}\n{}",
                        domain_strings(&written),
                        domain_strings(&stored),
                        x.xml
                    ));
                }
            }
        }
    }
    Ok(())
}

/// Removes what [`in_libvirt`] made, whatever it got to (errors ignored: a case that failed
/// half-way leaves some of them undefined).
async fn clean_libvirt(e: &Engine, defined: &[Defined]) {
    for x in defined.iter().rev() {
        match &x.def {
            Def::Domain(def) => {
                let _ = e.domain_undefine(&def.name, &def.owner).await;
            }
            Def::Volume { pool, def } => {
                if let Ok(Some(v)) = e.volume_observe(pool, &def.name).await {
                    let _ = e.volume_delete(pool, &def.name, &v.key).await;
                }
            }
            Def::Network(def) => {
                let _ = e.network_undefine(&def.name, &def.owner).await;
            }
            Def::Pool(def) => {
                let _ = e.pool_stop(&def.name, &def.owner).await;
                let _ = e.pool_undefine(&def.name, &def.owner).await;
            }
        }
    }
}

/// One case against libvirt: if the validation accepts the manifests, libvirt accepts their
/// definitions and stores the strings as written.
fn check_libvirt(
    rt: &tokio::runtime::Runtime,
    e: &Engine,
    text: &str,
) -> Result<(), TestCaseError> {
    let defined = match through(text) {
        Outcome::Defined(defined) => defined,
        Outcome::Refused(_) => return Ok(()),
        Outcome::Broken(why) => return Err(TestCaseError::fail(why)),
    };
    rt.block_on(async {
        clean_libvirt(e, &defined).await;
        let result = in_libvirt(e, &defined).await;
        clean_libvirt(e, &defined).await;
        result
    })
    .map_err(|why| TestCaseError::fail(format!("{why}\nmanifests:\n{text}")))
}

/// A connection to `test:///default` (its state lives as long as the process).
fn libvirt() -> (tokio::runtime::Runtime, Engine) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let e = rt
        .block_on(Engine::connect("test:///default", EngineConfig::default()))
        .unwrap();
    (rt, e)
}

/// Cases per property: bounded for CI, `PROPTEST_CASES` for a longer campaign. With the
/// attribute escaping removed from the engine, 1,000 cases of the hostile strings fail
/// within seconds but 128 may not: the corpus is what catches such a regression every time.
fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: cases(256),
        max_shrink_iters: 512,
        .. ProptestConfig::default()
    })]

    #[test]
    fn hostile_strings_are_refused_or_stay_text(case in hostile::case()) {
        check(&case)?;
    }

    #[test]
    fn edited_manifest_text_never_panics(
        case in hostile::case(),
        edits in hostile::text_edits(),
    ) {
        let text = hostile::apply_edits(&hostile::render(&case.shape, &case.benign, NODE), &edits);
        match through(&text) {
            Outcome::Defined(defined) => {
                well_formed(&defined).map_err(TestCaseError::fail)?;
            }
            Outcome::Broken(why) => return Err(TestCaseError::fail(why)),
            Outcome::Refused(_) => {}
        }
    }
}

/// Whatever the validation accepts, libvirt (`test:///default`) accepts: pools defined and
/// started, networks defined, volumes created, domains defined, with the strings stored as
/// written; then all undefined. Run by hand rather than by `proptest!` to count the cases
/// that reached libvirt: a generator that made every case invalid would prove nothing.
#[test]
fn what_validation_accepts_libvirt_accepts() {
    use std::sync::atomic::{AtomicU32, Ordering};
    let (rt, e) = libvirt();
    let config = ProptestConfig {
        cases: cases(128),
        max_shrink_iters: 256,
        source_file: Some(file!()),
        ..ProptestConfig::default()
    };
    let total = config.cases;
    let mut runner = proptest::test_runner::TestRunner::new(config);
    let reached = AtomicU32::new(0);
    let strategy = prop_oneof![hostile::plausible_case(), hostile::case()];
    let result = runner.run(&strategy, |case| {
        let text = hostile::render(&case.shape, &case.hostile, NODE);
        if matches!(through(&text), Outcome::Defined(_)) {
            reached.fetch_add(1, Ordering::Relaxed);
        }
        check_libvirt(&rt, &e, &text)
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    let reached = reached.load(Ordering::Relaxed);
    // About a third reach libvirt (31 to 48 of 128 seen over runs: the seed is random); an
    // eighth is five standard deviations below that, so only a generator gone vacuous
    // fails here.
    assert!(
        reached * 8 >= total,
        "only {reached} of {total} cases reached libvirt"
    );
    eprintln!("{reached} of {total} cases reached libvirt");
}

/// The corpus (`hostile/corpus/*.yaml`): inputs found by the campaign or written against a
/// known attack. Each file's first line says `# accepted` or `# refused`; an accepted one
/// must give well-formed XML that reads back and that libvirt accepts, a refused one must be
/// refused where the input is read or validated, naming the field.
#[test]
fn the_committed_corpus_is_refused_or_stays_text() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/hostile/corpus");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 8, "{files:?}");
    let (rt, e) = libvirt();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        let started = std::time::Instant::now();
        let outcome = through(&text);
        assert!(
            started.elapsed() < std::time::Duration::from_secs(20),
            "{}: took {:?}",
            file.display(),
            started.elapsed()
        );
        let expect_refused = text.starts_with("# refused");
        let name = file.file_name().unwrap_or_default().to_string_lossy();
        match &outcome {
            Outcome::Refused(why) => {
                eprintln!("{name}: {}", why.to_string().lines().next().unwrap_or(""))
            }
            Outcome::Defined(d) => eprintln!("{name}: {} definitions", d.len()),
            Outcome::Broken(_) => eprintln!("{name}: broken"),
        }
        assert!(
            expect_refused || text.starts_with("# accepted"),
            "{}: the first line says neither `# accepted` nor `# refused`",
            file.display()
        );
        match outcome {
            Outcome::Refused(why) => {
                assert!(
                    expect_refused,
                    "{}: refused, but the corpus says it is accepted: {why}",
                    file.display()
                );
                assert!(
                    why.says_where(),
                    "{}: refused late or without naming the field: {why}",
                    file.display()
                );
            }
            Outcome::Defined(defined) => {
                assert!(
                    !expect_refused,
                    "{}: accepted, but the corpus says refused",
                    file.display()
                );
                if let Err(e) = well_formed(&defined) {
                    panic!("{}: {e}", file.display());
                }
                if let Err(e) = check_libvirt(&rt, &e, &text) {
                    panic!("{}: {e}", file.display());
                }
            }
            Outcome::Broken(why) => panic!("{}: {why}", file.display()),
        }
    }
}

/// What becomes of generated hostile cases, by outcome (for tuning the generators:
/// `cargo nextest run -p virtkube --test hostile_input --run-ignored all -E 'test(outcomes)' --no-capture`).
#[test]
#[ignore = "prints the distribution of outcomes; not a check"]
fn outcomes() {
    use proptest::strategy::ValueTree;
    let mut runner = proptest::test_runner::TestRunner::default();
    let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
    for _ in 0..200 {
        let case = hostile::case().new_tree(&mut runner).unwrap().current();
        let text = hostile::render(&case.shape, &case.hostile, NODE);
        let key = match through(&text) {
            Outcome::Refused(why) => why.to_string().chars().take(90).collect(),
            Outcome::Defined(_) => "DEFINED".to_string(),
            Outcome::Broken(why) => format!("BROKEN {why}"),
        };
        *reasons.entry(key).or_default() += 1;
    }
    for (k, v) in reasons {
        println!("{v:4} {k}");
    }
}
