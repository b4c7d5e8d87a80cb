//! Hostile input on the manifest → typed API → libvirt XML path: generated manifests whose
//! every user-controlled string is attacked (see `hostile/mod.rs`), text-level edits of valid
//! manifests, and a committed corpus (`hostile/corpus/`) run every time.
//!
//! Properties, for every input:
//! - **No panic**, anywhere on the path (reading, validation, planning, building the
//!   definitions, writing and reading back their XML).
//! - **Refused or well-formed**: what the validation accepts yields XML 1.0 whose every
//!   character is allowed by the XML specification (libvirt's parser refuses the others).
//! - **No injection**: markup in a string changes text, never structure — the XML of the
//!   hostile strings has the same elements and attributes as the XML of the benign ones for
//!   the same shape; and every string reads back from the XML exactly as it was written
//!   (XML normalizes raw whitespace in attributes and raw carriage returns: a value that
//!   reads back differently would name another file than the one validated).
//!
//! The number of generated cases is bounded for CI (`PROPTEST_CASES` raises it); failures
//! proptest found are kept in `hostile_input.proptest-regressions` and replayed first.

mod hostile;

use std::collections::BTreeMap;
use std::path::Path;

use proptest::prelude::*;
use virtkube::host::{DefTarget, domain_def, network_def, pool_def, volume_def};
use virtkube::plan::desired::{DesiredDiskSource, DesiredState, Nodes, VolumeOrigin};
use virtkube::plan::observed::ObservedState;
use virtkube::plan::{self, Op, PlanOptions, Preserve};
use virtkube_crds::manifest::{Object, Reader};
use virtkube_crds::validation::Validate;
use virtkube_engine::model::xml::{self, Element};
use virtkube_engine::model::{BackingStore, DomainObserved, VolumeFormat};

const NODE: &str = "local";

/// One libvirt definition the path produced: its kind, and its XML.
#[derive(Debug, Clone)]
struct Defined {
    kind: &'static str,
    xml: String,
}

/// What the path made of one manifest text: refused somewhere (with where and why), or the
/// definitions of every object it would create.
#[derive(Debug)]
enum Outcome {
    Refused(String),
    Defined(Vec<Defined>),
    /// Accepted, but what libvirt would read is not what was written.
    Broken(String),
}

/// The whole path, as `virtkube apply` runs it up to libvirt.
fn through(text: &str) -> Outcome {
    let mut reader = Reader::new();
    let manifests = match reader.parse(Path::new("fuzz.yaml"), text) {
        Ok(m) => m,
        Err(e) => return Outcome::Refused(format!("reader: {e}")),
    };
    for m in &manifests {
        let errors = match &m.object {
            Object::Domain(d) => d.spec.validate(),
            Object::Volume(v) => v.spec.validate(),
            Object::Network(n) => n.spec.validate(),
            Object::StoragePool(p) => p.spec.validate(),
        };
        if !errors.is_empty() {
            return Outcome::Refused(format!("validation: {errors}"));
        }
    }
    let (desired, notices) = DesiredState::from_manifests(&manifests, &Nodes::single(NODE));
    if let Some(n) = notices.first() {
        return Outcome::Refused(format!("desired state: {}", n.message));
    }
    let mut observed = ObservedState::default();
    observed.host_mut(NODE);
    let p = plan::plan(&desired, &observed, &PlanOptions::default());
    if p.has_errors() {
        return Outcome::Refused(format!("plan: {}", p.render(false)));
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
        let (kind, xml) = match &a.op {
            Op::DefinePool(pool) => match pool_def(pool) {
                Ok(def) => match def.validate() {
                    Ok(()) => ("pool", def.to_xml()),
                    Err(e) => return Outcome::Refused(format!("pool definition: {e}")),
                },
                Err(e) => return Outcome::Refused(format!("pool definition: {e}")),
            },
            Op::DefineNetwork(net) => ("network", network_def(net).to_xml()),
            Op::CreateVolume {
                capacity,
                format,
                source,
                ..
            } => {
                let backing = match source {
                    VolumeOrigin::Backing(b) => Some(b.as_str()),
                    _ => None,
                };
                let def = volume_def(&a.object.name, capacity.unwrap_or(1 << 20), format, backing);
                if let Err(e) = def.validate() {
                    return Outcome::Refused(format!("volume definition: {e}"));
                }
                let store = backing.map(|b| BackingStore {
                    path: format!("/pools/images/{b}"),
                    format: VolumeFormat::Qcow2,
                });
                ("volume", def.to_xml(store.as_ref()))
            }
            Op::DefineDomain { domain, .. } => {
                match domain_def(domain, &Preserve::default(), on, &pools) {
                    Ok(def) => match def.validate() {
                        Ok(()) => ("domain", def.to_xml()),
                        Err(e) => return Outcome::Refused(format!("domain definition: {e}")),
                    },
                    Err(e) => return Outcome::Refused(format!("domain definition: {e}")),
                }
            }
            _ => continue,
        };
        defined.push(Defined { kind, xml });
    }
    // The desired strings the XML must carry exactly.
    for d in &desired.domains {
        if let Some(x) = defined.iter().find(|x| x.kind == "domain")
            && let Err(e) = reads_back(&x.xml, d)
        {
            return Outcome::Broken(format!("domain {} does not read back: {e}\n{}", d.name, x.xml));
        }
    }
    Outcome::Defined(defined)
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
fn reads_back(xml_text: &str, d: &virtkube::plan::desired::DesiredDomain) -> Result<(), String> {
    let o = DomainObserved::from_xml(xml_text).map_err(|e| e.to_string())?;
    // Text is compared trimmed, and empty text as none (`<cmdline></cmdline>` is no command
    // line), as libvirt reads them.
    let same = |what: &str, want: Option<&String>, got: Option<&String>| {
        let want = want.map(|s| s.trim().to_string()).filter(|s| !s.is_empty());
        let got = got.map(|s| s.trim().to_string()).filter(|s| !s.is_empty());
        if want == got {
            Ok(())
        } else {
            Err(format!("{what}: wrote {want:?}, reads {got:?}"))
        }
    };
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
            return Err(format!("disk {}: wrote {want_source:?}, reads {got_source:?}", want.name));
        }
    }
    for (want, got) in d.interfaces.iter().zip(&o.interfaces) {
        if want.mac.is_some() && want.mac.as_ref().map(|m| m.to_ascii_lowercase()) != got.mac.as_ref().map(|m| m.to_ascii_lowercase()) {
            return Err(format!("MAC: wrote {:?}, reads {:?}", want.mac, got.mac));
        }
        if Some(&want.network) != got.network.as_ref() {
            return Err(format!("network: wrote {:?}, reads {:?}", want.network, got.network));
        }
    }
    Ok(())
}

/// Every definition is XML 1.0 made of allowed characters, and parses.
fn well_formed(defined: &[Defined]) -> Result<Vec<Element>, String> {
    defined
        .iter()
        .map(|d| {
            if let Some(c) = d.xml.chars().find(|c| !xml_char(*c)) {
                return Err(format!("{} XML holds {c:?}, which XML 1.0 forbids:\n{}", d.kind, d.xml));
            }
            xml::parse(&d.xml).map_err(|e| format!("{} XML does not parse: {e}\n{}", d.kind, d.xml))
        })
        .collect()
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
        Outcome::Refused(_) => return Ok(()),
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

/// Cases per property: bounded for CI, `PROPTEST_CASES` for a longer campaign.
fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: cases(128),
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
        match outcome {
            Outcome::Refused(why) => assert!(
                expect_refused,
                "{}: refused, but the corpus says it is accepted: {why}",
                file.display()
            ),
            Outcome::Defined(defined) => {
                assert!(!expect_refused, "{}: accepted, but the corpus says refused", file.display());
                if let Err(e) = well_formed(&defined) {
                    panic!("{}: {e}", file.display());
                }
            }
            Outcome::Broken(why) => panic!("{}: {why}", file.display()),
        }
    }
}

#[test]
fn debug_stats() {
    use proptest::strategy::ValueTree;
    let mut runner = proptest::test_runner::TestRunner::default();
    let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
    for _ in 0..200 {
        let case = hostile::case().new_tree(&mut runner).unwrap().current();
        let text = hostile::render(&case.shape, &case.hostile, NODE);
        let key = match through(&text) {
            Outcome::Refused(why) => why.chars().take(90).collect(),
            Outcome::Defined(_) => "DEFINED".to_string(),
            Outcome::Broken(why) => format!("BROKEN {why}"),
        };
        *reasons.entry(key).or_default() += 1;
    }
    for (k, v) in reasons { println!("{v:4} {k}"); }
}
