//! Status samples for the GitOps health checks, taken from the agent's own output: the
//! scenarios of `agent_scenarios` run the real reconcilers (the real engine on
//! `test:///default` underneath) against the strict in-memory API server, with Domains bound
//! and moves approved as the cluster controller does it, and keep each object as the server
//! stores it. The Argo CD health checks (Lua), the kstatus rules and Flux's health
//! expressions are tested against these samples by `tests/gitops/check.py`, so they judge
//! what the agent really writes. Samples whose claim or conditions the test wrote in the
//! cluster controller's place say so in their `samples.virtkube.io/source` annotation.
//!
//! The samples are committed under `tests/gitops/samples/` and compared here after
//! normalization (timestamps, UUIDs, libvirt ids and the host name, which change per run or
//! machine); a change in what the agent writes fails this test until the samples are
//! regenerated:
//!
//! ```sh
//! VIRTKUBE_UPDATE_SAMPLES=1 cargo nextest run -p virtkube --test status_samples
//! scripts/check-gitops
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
                    "lastTransitionTime" | "heartbeatTime" | "startTime" | "endTime"
                    | "updateTime" => *v = json!("2026-01-01T00:00:00Z"),
                    "hostname" => *v = json!("node-host"),
                    "uuid" => *v = json!("00000000-0000-4000-8000-000000000000"),
                    "id" if v.is_number() => *v = json!(1),
                    _ => normalize(v),
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(normalize),
        Value::String(text) => *text = without_elapsed_seconds(&without_uuids(text)),
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

/// `text` with every elapsed time written as ` in Ns` replaced by ` in 0s`: a move's message
/// says how long it took, which is 0 or 1 s here depending on when the second turned.
fn without_elapsed_seconds(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find(" in ") {
        let (before, after) = rest.split_at(at + 4);
        out.push_str(before);
        let digits = after.chars().take_while(char::is_ascii_digit).count();
        let unit = after[digits..].strip_prefix('s');
        let word_ends = unit.is_some_and(|u| !u.starts_with(|c: char| c.is_alphanumeric()));
        if digits > 0 && word_ends {
            out.push('0');
            rest = &after[digits..];
        } else {
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

#[test]
fn elapsed_seconds_are_normalized_and_nothing_else() {
    assert_eq!(
        without_elapsed_seconds("moved from node a to node b in 12s, downtime 3 ms"),
        "moved from node a to node b in 0s, downtime 3 ms"
    );
    assert_eq!(
        without_elapsed_seconds("in 5 s in 7seconds"),
        "in 5 s in 7seconds"
    );
    assert_eq!(
        without_elapsed_seconds("kept in 4 pools"),
        "kept in 4 pools"
    );
    assert_eq!(without_elapsed_seconds("ends in 3s"), "ends in 0s");
}

/// The object as a GitOps tool reads it, without what the server fills in per run (uid,
/// resourceVersion, creationTimestamp, managedFields): apiVersion, kind, the metadata the
/// health checks and a reader need, the spec and the status, with `source` as an
/// annotation.
fn sample(object: &Value, source: &str) -> Value {
    let meta = &object["metadata"];
    let mut metadata = serde_json::Map::new();
    for key in [
        "name",
        "namespace",
        "generation",
        "labels",
        "finalizers",
        "deletionTimestamp",
    ] {
        if !meta[key].is_null() {
            metadata.insert(key.into(), meta[key].clone());
        }
    }
    metadata.insert(
        "annotations".into(),
        json!({ agent_scenarios::SOURCE_ANNOTATION: source }),
    );
    let mut s = json!({
        "apiVersion": object["apiVersion"],
        "kind": object["kind"],
        "metadata": metadata,
        "spec": object["spec"],
        "status": object["status"],
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
         that scripts/check-gitops still passes"
    );
}

#[tokio::test]
async fn samples_match_what_the_agent_writes() {
    let samples = agent_scenarios::run().await;
    let mut names = BTreeSet::new();
    for s in &samples {
        assert!(names.insert(s.name), "sample {} recorded twice", s.name);
        check_sample(s.name, &sample(&s.object, s.source));
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
