//! Status samples for the GitOps health checks, taken from the agent's own output: the
//! scenarios of `agent_scenarios` run the real reconcilers (the real engine on
//! `test:///default` underneath) against kube's mock API server, and the statuses they patch
//! are kept with the objects they belong to. The Argo CD health checks (Lua), the kstatus
//! rules and Flux's health expressions are tested against these samples by
//! `tests/gitops/check.py`, so they judge what the agent really writes.
//!
//! The samples are committed under `tests/gitops/samples/` and compared here after
//! normalization (timestamps, UUIDs and libvirt ids that change per run); a change in what the
//! agent writes fails this test until the samples are regenerated:
//!
//! ```sh
//! VIRTKUBE_UPDATE_SAMPLES=1 cargo nextest run -p virtkube --test status_samples
//! ```

mod agent_scenarios;
mod agent_support;

use std::collections::BTreeSet;
use std::path::PathBuf;

use serde_json::{Value, json};

/// Where the samples live.
fn samples_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/gitops/samples")
}

/// Replaces what changes from run to run with fixed words, so a sample compares equal
/// across runs while every field the health checks read stays as the agent wrote it.
fn normalize(value: &mut Value) {
    match value {
        Value::Object(map) => {
            for (key, v) in map.iter_mut() {
                match key.as_str() {
                    "lastTransitionTime" | "heartbeatTime" | "startTime" | "endTime" => {
                        *v = json!("2026-01-01T00:00:00Z")
                    }
                    "uuid" => *v = json!("00000000-0000-4000-8000-000000000000"),
                    "id" if v.is_number() => *v = json!(1),
                    _ => normalize(v),
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(normalize),
        Value::String(text) => *text = without_uuids(text),
        _ => {}
    }
}

/// `text` with every UUID (8-4-4-4-12 hex digits) in it replaced by a fixed one: libvirt
/// picks a new one per run and condition messages quote it.
fn without_uuids(text: &str) -> String {
    const SHAPE: [usize; 5] = [8, 4, 4, 4, 12];
    let is_uuid = |s: &str| {
        let parts: Vec<&str> = s.split('-').collect();
        parts.len() == 5
            && parts
                .iter()
                .zip(SHAPE)
                .all(|(p, n)| p.len() == n && p.chars().all(|c| c.is_ascii_hexdigit()))
    };
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(candidate) = rest.get(..36) {
        if is_uuid(candidate) {
            out.push_str("00000000-0000-4000-8000-000000000000");
            rest = &rest[36..];
        } else {
            let next = rest.chars().next().map_or(1, char::len_utf8);
            out.push_str(&rest[..next]);
            rest = &rest[next..];
        }
    }
    out.push_str(rest);
    out
}

/// The object as a GitOps tool would read it: apiVersion, kind, metadata and the status
/// the agent wrote last.
fn sample(object: &Value, status: &Value) -> Value {
    let mut s = json!({
        "apiVersion": object["apiVersion"],
        "kind": object["kind"],
        "metadata": object["metadata"],
        "status": status,
    });
    normalize(&mut s);
    s
}

/// Compares `sample` with the committed `NAME.json`, or writes it when
/// `VIRTKUBE_UPDATE_SAMPLES=1`.
fn check_sample(name: &str, sample: &Value) {
    let path = samples_dir().join(format!("{name}.json"));
    let text = serde_json::to_string_pretty(sample).unwrap() + "\n";
    if std::env::var("VIRTKUBE_UPDATE_SAMPLES").as_deref() == Ok("1") {
        std::fs::create_dir_all(samples_dir()).unwrap();
        std::fs::write(&path, text).unwrap();
        return;
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}; generate it with VIRTKUBE_UPDATE_SAMPLES=1 cargo nextest run -p virtkube --test status_samples",
            path.display()
        )
    });
    assert_eq!(
        committed, text,
        "the agent's status for sample {name} changed; if that is intended, regenerate with \
         VIRTKUBE_UPDATE_SAMPLES=1 cargo nextest run -p virtkube --test status_samples and check \
         tests/gitops/check.py still passes"
    );
}

#[tokio::test]
async fn samples_match_what_the_agent_writes() {
    let outputs = agent_scenarios::run().await;
    let mut names = BTreeSet::new();
    for s in &outputs.samples {
        assert!(names.insert(s.name), "sample {} recorded twice", s.name);
        check_sample(s.name, &sample(&s.object, &s.status));
    }
    // No stale sample: every committed file comes from a scenario.
    for entry in std::fs::read_dir(samples_dir()).unwrap() {
        let file = entry.unwrap().file_name().to_string_lossy().to_string();
        if let Some(name) = file.strip_suffix(".json") {
            assert!(
                names.contains(name),
                "{file}: no scenario produces it any more; delete it"
            );
        }
    }
}
