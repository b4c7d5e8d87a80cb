//! The `virtkube` binary as a user runs it. Each command is its own process, so each starts
//! from an empty `test:///default`.

use std::path::PathBuf;
use std::process::{Command, Output};

fn virtkube(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_virtkube"))
        .args(args)
        .env_remove("VIRTKUBE_CONNECT")
        .output()
        .expect("virtkube runs")
}

fn examples() -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../examples")
        .display()
        .to_string()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn plan_on_a_fresh_host_exits_2_and_shows_creations_field_by_field() {
    let out = virtkube(&["plan", "-f", &examples()]);
    let t = text(&out);
    assert_eq!(out.status.code(), Some(2), "{t}");
    assert!(t.contains("+ Domain default/web"), "{t}");
    assert!(t.contains("cpu.pinning[vcpu=0].cpuset: (none) → 0"), "{t}");
    assert!(t.contains("+ StoragePool images"), "{t}");
}

#[test]
fn apply_examples_converges_in_one_process_and_prints_the_table() {
    let out = virtkube(&["apply", "-f", &examples()]);
    let t = text(&out);
    assert_eq!(out.status.code(), Some(0), "{t}");
    assert!(
        t.contains("Converged:") && t.contains("a new plan is empty"),
        "{t}"
    );
    assert!(
        t.contains("KIND") && t.contains("PHASE") && t.contains("DETAILS"),
        "{t}"
    );
    for (name, phase) in [
        ("default/web", "Running"),
        ("default/worker", "Paused"),
        ("default/spare", "Stopped"),
    ] {
        let line = t
            .lines()
            .find(|l| l.starts_with("Domain") && l.contains(name))
            .unwrap_or_else(|| panic!("{name} in {t}"));
        assert!(line.contains(phase), "{line}");
    }
}

#[test]
fn get_on_the_test_driver_shows_its_own_objects_only_with_all() {
    let out = virtkube(&["get", "--all"]);
    let t = text(&out);
    assert_eq!(out.status.code(), Some(0), "{t}");
    assert!(t.contains("Domain") && t.contains("test"), "{t}");
    let out = virtkube(&["get", "-o", "json"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "[]");
}

#[test]
fn get_with_manifests_prints_objects_with_status() {
    let out = virtkube(&["get", "-f", &examples(), "-o", "yaml"]);
    let t = text(&out);
    assert_eq!(out.status.code(), Some(0), "{t}");
    assert!(
        t.contains("kind: Domain") && t.contains("status:") && t.contains("NotDefined"),
        "{t}"
    );
}

#[test]
fn a_refused_manifest_exits_1_naming_file_document_object_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.yaml");
    std::fs::write(
        &path,
        "apiVersion: virtkube.io/v1alpha1\nkind: Domain\nmetadata: {name: vm}\nspec:\n  cpu: {vcpus: 4, maxVcpus: 2}\n  memory: {size: 1Gi}\n",
    )
    .unwrap();
    let out = virtkube(&["plan", "-f", &path.display().to_string()]);
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    assert!(
        t.contains("bad.yaml")
            && t.contains("document 1")
            && t.contains("Domain default/vm")
            && t.contains("maxVcpus"),
        "{t}"
    );
}

#[test]
fn every_command_has_an_example_in_its_help() {
    for cmd in ["plan", "apply", "get", "delete"] {
        let out = virtkube(&[cmd, "--help"]);
        let t = text(&out);
        assert!(out.status.success(), "{cmd}: {t}");
        assert!(
            t.contains("Examples:") && t.contains(&format!("virtkube {cmd}")),
            "{cmd}: {t}"
        );
    }
}

#[test]
fn a_clash_with_a_foreign_object_shows_in_the_status_conditions() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("net.yaml");
    std::fs::write(
        &path,
        "apiVersion: virtkube.io/v1alpha1\nkind: Network\nmetadata: {name: default}\nspec: {mode: isolated}\n",
    )
    .unwrap();
    let file = path.display().to_string();
    let out = virtkube(&["get", "-f", &file, "-o", "json"]);
    let t = text(&out);
    assert_eq!(out.status.code(), Some(0), "{t}");
    let objects: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let conditions = objects[0]["status"]["conditions"].as_array().unwrap();
    let ready = conditions.iter().find(|c| c["type"] == "Ready").unwrap();
    assert_eq!(ready["status"], "False");
    assert_eq!(ready["reason"], "NameConflict");
    assert!(
        ready["message"].as_str().unwrap().contains("net.yaml"),
        "{ready}"
    );
    // apply refuses to touch it and says so.
    let out = virtkube(&["apply", "-f", &file]);
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    assert!(
        t.contains("conflict") && t.contains("no virtkube ownership mark"),
        "{t}"
    );
}
