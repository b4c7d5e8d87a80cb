//! Reading manifests: the examples parse into the typed API, and bad input is refused with the
//! file, document, object and field named.

use std::path::{Path, PathBuf};

use virtkube_crds::domain::{PowerState, RunStrategy};
use virtkube_crds::manifest::{self, Object};
use virtkube_crds::volume::ReclaimPolicy;

fn examples() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples")
}

#[test]
fn every_example_parses_into_the_typed_api() {
    let manifests =
        manifest::load(&[examples()]).unwrap_or_else(|e| panic!("examples must parse:\n{e}"));
    let names: Vec<String> = manifests.iter().map(|m| m.object.display_name()).collect();
    assert_eq!(
        names,
        [
            "StoragePool images",
            "Network vk-nat",
            "Network vk-isolated",
            "Volume default/base",
            "Volume default/web-root",
            "Volume default/scratch",
            "Domain default/web",
            "Domain default/worker",
            "Domain default/spare",
        ]
    );
    let domain = |name: &str| {
        manifests
            .iter()
            .find_map(|m| match &m.object {
                Object::Domain(d) if d.metadata.name.as_deref() == Some(name) => Some(d.clone()),
                _ => None,
            })
            .unwrap()
    };
    let web = domain("web");
    assert!(web.spec.autostart);
    assert_eq!(web.spec.cpu.pinning.len(), 2);
    assert_eq!(web.spec.cpu.effective_max_vcpus(), 4);
    assert_eq!(web.spec.memory.size.bytes(), Ok(512 << 20));
    assert_eq!(
        web.spec
            .disks
            .iter()
            .map(|d| d.volume.as_deref().unwrap())
            .collect::<Vec<_>>(),
        ["web-root", "scratch"]
    );
    assert_eq!(domain("worker").spec.effective_state(), PowerState::Paused);
    let spare = domain("spare");
    assert_eq!(spare.spec.run_strategy, RunStrategy::Halted);
    assert_eq!(spare.spec.effective_state(), PowerState::Stopped);
    let base = manifests.iter().find_map(|m| match &m.object {
        Object::Volume(v) if v.metadata.name.as_deref() == Some("base") => Some(v.clone()),
        _ => None,
    });
    assert_eq!(base.unwrap().spec.reclaim_policy, ReclaimPolicy::Retain);
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

fn errors_of(text: &str) -> Vec<String> {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "bad.yaml", text);
    match manifest::load(&[path]) {
        Ok(found) => panic!("expected a refusal, parsed {} objects", found.len()),
        Err(errors) => errors
            .0
            .iter()
            .map(|e| {
                e.to_string()
                    .replace(&dir.path().display().to_string(), "DIR")
            })
            .collect(),
    }
}

const GOOD_DOMAIN: &str = "apiVersion: virtkube.io/v1alpha1\nkind: Domain\nmetadata:\n  name: ok\nspec:\n  memory:\n    size: 1Gi\n";

#[test]
fn unknown_field_names_file_document_object_and_field() {
    let text = format!(
        "{GOOD_DOMAIN}---\napiVersion: virtkube.io/v1alpha1\nkind: Domain\nmetadata:\n  name: web\n  namespace: prod\nspec:\n  memory:\n    size: 1Gi\n  cpu:\n    vcpu: 2\n"
    );
    let errors = errors_of(&text);
    assert_eq!(
        errors,
        [
            "DIR/bad.yaml (document 2) Domain prod/web: spec.cpu.vcpu: unknown field `vcpu` (did you mean `vcpus`?)"
        ]
    );
}

#[test]
fn wrong_type_and_missing_required_field_are_named() {
    let errors = errors_of(
        "apiVersion: virtkube.io/v1alpha1\nkind: Domain\nmetadata:\n  name: web\nspec:\n  cpu:\n    vcpus: two\n",
    );
    assert!(errors.contains(&"DIR/bad.yaml (document 1) Domain default/web: spec.cpu.vcpus: must be an integer, found a string".to_string()), "{errors:?}");
    assert!(
        errors.contains(
            &"DIR/bad.yaml (document 1) Domain default/web: spec.memory: required field is missing"
                .to_string()
        ),
        "{errors:?}"
    );
}

#[test]
fn patterns_ranges_and_enums_are_checked_like_the_api_server() {
    let errors = errors_of(
        "apiVersion: virtkube.io/v1alpha1\nkind: Domain\nmetadata:\n  name: web\nspec:\n  runStrategy: Sometimes\n  memory:\n    size: lots\n  cpu:\n    vcpus: 0\n    pinning:\n      - vcpu: 0\n        cpuset: zero\n",
    );
    let joined = errors.join("\n");
    for expected in [
        "spec.runStrategy: unsupported value \"Sometimes\": must be one of Always, RerunOnFailure, Manual, Halted",
        "spec.memory.size: `lots` does not match",
        "spec.cpu.vcpus: must be at least 1",
        "spec.cpu.pinning[0].cpuset: `zero` does not match",
    ] {
        assert!(
            joined.contains(expected),
            "missing `{expected}` in:\n{joined}"
        );
    }
}

#[test]
fn cel_rules_run_without_a_cluster() {
    let errors = errors_of(
        "apiVersion: virtkube.io/v1alpha1\nkind: Domain\nmetadata:\n  name: web\nspec:\n  memory:\n    size: 1Gi\n  cpu:\n    vcpus: 4\n    maxVcpus: 2\n",
    );
    assert!(
        errors
            .iter()
            .any(|e| e.contains("Domain default/web")
                && e.contains("maxVcpus must be at least vcpus")),
        "{errors:?}"
    );
}

#[test]
fn semantic_rules_catch_what_the_schema_cannot() {
    let errors = errors_of(
        "apiVersion: virtkube.io/v1alpha1\nkind: Domain\nmetadata:\n  name: web\nspec:\n  memory:\n    size: 2Gi\n    max: 1Gi\n  cpu:\n    vcpus: 2\n    pinning:\n      - vcpu: 0\n        cpuset: 5-2\n",
    );
    let joined = errors.join("\n");
    assert!(
        joined.contains("spec.memory.max: max 1Gi is below size 2Gi"),
        "{joined}"
    );
    assert!(
        joined.contains("spec.cpu.pinning[vcpu=0].cpuset: cpuset range `5-2` runs backwards"),
        "{joined}"
    );
}

#[test]
fn wrong_api_version_kind_and_scope_are_refused() {
    let errors = errors_of("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: x\n");
    assert_eq!(
        errors,
        [
            "DIR/bad.yaml (document 1): apiVersion: `v1` is not virtkube's API: write `virtkube.io/v1alpha1`"
        ]
    );
    let errors =
        errors_of("apiVersion: virtkube.io/v1alpha1\nkind: Domian\nmetadata:\n  name: x\n");
    assert!(
        errors[0].contains("`Domian` is not a virtkube kind"),
        "{errors:?}"
    );
    let errors = errors_of(
        "apiVersion: virtkube.io/v1alpha1\nkind: Network\nmetadata:\n  name: net1\n  namespace: default\nspec:\n  mode: isolated\n",
    );
    assert!(
        errors[0].contains("metadata.namespace: this kind is cluster-scoped"),
        "{errors:?}"
    );
    let errors = errors_of(
        "apiVersion: virtkube.io/v1alpha1\nkind: Network\nmetadata:\n  name: Bad_Name\nspec:\n  mode: isolated\n",
    );
    assert!(
        errors[0].contains("metadata.name: `Bad_Name` is not a valid name"),
        "{errors:?}"
    );
    // YAML 1.1 reads a bare `n` as false; the error says to quote it.
    let errors = errors_of(
        "apiVersion: virtkube.io/v1alpha1\nkind: Network\nmetadata:\n  name: n\nspec:\n  mode: isolated\n",
    );
    assert!(
        errors[0].contains("metadata.name: must be a string, found false: quote it"),
        "{errors:?}"
    );
    let errors = errors_of(
        "apiVersion: virtkube.io/v1alpha1\nkind: HypervisorNode\nmetadata:\n  name: n\nspec: {}\n",
    );
    assert!(
        errors[0].contains("written by each node's agent"),
        "{errors:?}"
    );
}

#[test]
fn invalid_yaml_names_the_file() {
    let errors = errors_of("apiVersion: [unclosed\n");
    assert!(
        errors[0].starts_with("DIR/bad.yaml: not valid YAML"),
        "{errors:?}"
    );
}

#[test]
fn directories_are_read_recursively_in_order_and_duplicates_refused() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("sub")).unwrap();
    write(dir.path(), "b.yaml", GOOD_DOMAIN);
    write(
        &dir.path().join("sub"),
        "a.yml",
        &GOOD_DOMAIN.replace("name: ok", "name: other"),
    );
    write(dir.path(), "notes.txt", "not yaml: [");
    write(dir.path(), ".hidden.yaml", "not yaml: [");
    write(dir.path(), "empty.yaml", "---\n# only a comment\n");
    let found = manifest::load(&[dir.path().to_path_buf()]).unwrap();
    let names: Vec<String> = found.iter().map(|m| m.object.display_name()).collect();
    assert_eq!(names, ["Domain default/ok", "Domain default/other"]);
    assert_eq!(found[1].source.document, 1);
    assert!(found[1].source.file.ends_with("sub/a.yml"));

    write(dir.path(), "c.yaml", GOOD_DOMAIN);
    let errors = manifest::load(&[dir.path().to_path_buf()])
        .unwrap_err()
        .to_string();
    assert!(
        errors.contains("c.yaml (document 1) Domain default/ok: defined twice: first in"),
        "{errors}"
    );

    let missing = manifest::load(&[dir.path().join("nope")])
        .unwrap_err()
        .to_string();
    assert!(missing.contains("nope: cannot read"), "{missing}");
}
