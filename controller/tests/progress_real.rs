//! `virtkube apply`'s progress on the private libvirtd daemons with QEMU
//! (`scripts/libvirt-nodes.sh up`, then source its env file; `--ignored`), in plain-line mode
//! (its output is a pipe here): a live migration whose data moves while the lines are printed,
//! and the graceful shutdown countdown of a guest that ignores ACPI.
//!
//! The migrating guest needs memory that is not zero (QEMU sends zero pages as flags, so an
//! empty guest migrates at once): a 12-byte multiboot kernel that halts, with a 64 MiB random
//! module that QEMU's multiboot loader puts in the guest's memory.

use std::path::Path;
use std::process::{Command, Output};

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: run scripts/libvirt-nodes.sh up and source its env file")
    })
}

/// A multiboot image (a.out kludge: loaded at 1 MiB, entry after the header) that halts.
fn write_guest(dir: &Path) {
    let (magic, flags, load) = (0x1BAD_B002_u32, 0x0001_0000_u32, 0x0010_0000_u32);
    let mut kernel = Vec::new();
    for word in [
        magic,
        flags,
        0u32.wrapping_sub(magic.wrapping_add(flags)),
        load,
        load,
        0,
        0,
        load + 32,
    ] {
        kernel.extend_from_slice(&word.to_le_bytes());
    }
    kernel.extend_from_slice(&[0xfa, 0xf4, 0xeb, 0xfd]); // cli; hlt; jmp back to hlt
    std::fs::write(dir.join("kernel.bin"), kernel).unwrap();
    // 64 MiB that do not compress to zero pages.
    let mut state = 0x9E37_79B9_7F4A_7C15_u64;
    let module: Vec<u8> = (0..64 << 20)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect();
    std::fs::write(dir.join("module.bin"), module).unwrap();
}

fn domain(dir: &Path, node: &str, deaf_state: &str) -> std::path::PathBuf {
    let path = dir.join("progress.yaml");
    std::fs::write(
        &path,
        format!(
            r#"apiVersion: virtkube.io/v1alpha1
kind: Domain
metadata: {{name: progress, namespace: vk-progress}}
spec:
  nodeName: {node}
  runStrategy: Manual
  state: Running
  memory: {{size: 256Mi}}
  os: {{kernel: {d}/kernel.bin, initrd: {d}/module.bin}}
  migration: {{bandwidth: 16Mi}}
---
apiVersion: virtkube.io/v1alpha1
kind: Domain
metadata: {{name: deaf, namespace: vk-progress}}
spec:
  nodeName: node-a
  runStrategy: Manual
  state: {deaf}
  memory: {{size: 64Mi}}
"#,
            d = dir.display(),
            deaf = deaf_state
        ),
    )
    .unwrap();
    path
}

fn apply(file: &Path, extra: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_virtkube"))
        .arg("apply")
        .arg("-f")
        .arg(file)
        .args([
            "--host",
            &format!("node-a={}", env("VIRTKUBE_TEST_NODE_A_URI")),
            "--host",
            &format!("node-b={}", env("VIRTKUBE_TEST_NODE_B_URI")),
            // No --p2p-uri: virtkube derives the peer URI of a qemu:///?socket= host.
            "--migration-uri",
            &format!("node-a={}", env("VIRTKUBE_TEST_NODE_A_MIGRATION_URI")),
            "--migration-uri",
            &format!("node-b={}", env("VIRTKUBE_TEST_NODE_B_MIGRATION_URI")),
        ])
        .args(extra)
        .output()
        .expect("virtkube runs")
}

/// Waits until the guest runs the kernel's halt loop (its instruction pointer in the 12
/// bytes at 1 MiB + 32): the firmware has then copied the module into the guest's memory,
/// which takes SeaBIOS several seconds under TCG.
fn wait_for_the_kernel(uri: &str, domain: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        let out = Command::new("virsh")
            .args([
                "-c",
                uri,
                "qemu-monitor-command",
                "--hmp",
                domain,
                "info registers",
            ])
            .output()
            .expect("virsh runs");
        let text = String::from_utf8_lossy(&out.stdout);
        if ["EIP=00100021", "EIP=00100022", "EIP=00100023"]
            .iter()
            .any(|ip| text.contains(ip))
        {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the guest never reached its kernel: {text}"
        );
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
}

fn delete(file: &Path) -> Output {
    delete_within(file, "1")
}

fn delete_within(file: &Path, shutdown_seconds: &str) -> Output {
    Command::new(env!("CARGO_BIN_EXE_virtkube"))
        .args(["delete", "-f"])
        .arg(file)
        .args([
            "--host",
            &format!("node-a={}", env("VIRTKUBE_TEST_NODE_A_URI")),
            "--host",
            &format!("node-b={}", env("VIRTKUBE_TEST_NODE_B_URI")),
            "--shutdown-timeout",
            shutdown_seconds,
        ])
        .output()
        .expect("virtkube runs")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr)
}

/// The bytes moved in a migration progress line (`migrating: 43.2MiB of 256.5MiB …`).
fn moved(line: &str) -> f64 {
    let rest = &line[line.find("migrating: ").expect("a migration line") + 11..];
    let number: String = rest
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    let unit = &rest[number.len()..];
    let scale = if unit.starts_with("GiB") {
        1024.0 * 1024.0
    } else if unit.starts_with("MiB") {
        1024.0
    } else if unit.starts_with("KiB") {
        1.0
    } else {
        1.0 / 1024.0
    };
    number.parse::<f64>().expect("a number") * scale
}

/// The seconds left in a countdown line.
fn seconds_left(line: &str) -> u64 {
    let rest = &line[line.find("shutting down: ").expect("a countdown line") + 15..];
    rest.split('s').next().unwrap().parse().unwrap()
}

#[test]
#[ignore = "needs the private libvirtd daemons"]
fn a_live_migration_and_a_shutdown_show_their_progress() {
    let dir = tempfile::tempdir().unwrap();
    write_guest(dir.path());
    // What an earlier, interrupted run may have left on either node goes first.
    let _ = delete(&domain(dir.path(), "node-a", "Running"));
    let out = apply(&domain(dir.path(), "node-a", "Running"), &[]);
    assert!(out.status.success(), "{}", stdout(&out));
    wait_for_the_kernel(&env("VIRTKUBE_TEST_NODE_A_URI"), "vk-progress.progress");

    // The migration, in lines of data moved, at most one every 2 s.
    let out = apply(&domain(dir.path(), "node-b", "Running"), &[]);
    let text = stdout(&out);
    assert!(out.status.success(), "{text}");
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| {
            l.starts_with("  ..   ~ Domain vk-progress/progress") && l.contains("migrating: ")
        })
        .collect();
    assert!(lines.len() >= 2, "at least two progress lines:\n{text}");
    let bytes: Vec<f64> = lines.iter().map(|l| moved(l)).collect();
    assert!(
        bytes.windows(2).all(|w| w[1] > w[0]),
        "the data moved grows: {bytes:?}\n{text}"
    );
    for part in [
        "of 256.5MiB",
        "MiB/s",
        "left",
        "iteration",
        "expected downtime",
    ] {
        assert!(lines[0].contains(part), "{part:?} in {}", lines[0]);
    }
    assert!(
        text.contains(
            "the source libvirtd reached node node-b through qemu+unix:///system?socket="
        ) && text.contains("(derived:"),
        "the derived peer URI is said: {text}"
    );

    // The countdown: a guest with no OS ignores ACPI, so it waits out the deadline.
    let out = apply(
        &domain(dir.path(), "node-b", "Stopped"),
        &["--shutdown-timeout", "7"],
    );
    let text = stdout(&out);
    assert!(out.status.success(), "{text}");
    let left: Vec<u64> = text
        .lines()
        .filter(|l| {
            l.starts_with("  ..   ~ Domain vk-progress/deaf") && l.contains("shutting down: ")
        })
        .map(seconds_left)
        .collect();
    assert!(left.len() >= 2, "at least two countdown lines:\n{text}");
    assert!(left.windows(2).all(|w| w[1] < w[0]), "{left:?}\n{text}");
    assert!(text.contains("before power-off"), "{text}");
    assert!(
        text.contains("destroyed"),
        "powered off at the deadline: {text}"
    );

    // `delete` counts down too: the migrated guest ignores ACPI as well.
    let out = delete_within(&domain(dir.path(), "node-b", "Stopped"), "5");
    let text = stdout(&out);
    assert!(out.status.success(), "{text}");
    let left: Vec<u64> = text
        .lines()
        .filter(|l| {
            l.starts_with("  ..   - Domain vk-progress/progress") && l.contains("shutting down: ")
        })
        .map(seconds_left)
        .collect();
    assert!(left.len() >= 2, "at least two countdown lines:\n{text}");
    assert!(left.windows(2).all(|w| w[1] < w[0]), "{left:?}\n{text}");
}
