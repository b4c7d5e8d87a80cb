//! `scripts/cargo-paths`, which the end-to-end suite and `scripts/apply-examples` use to find the
//! binary they just built: it must follow cargo wherever `CARGO_TARGET_DIR` puts the build,
//! where a fixed `target/debug/…` fails with "No such file or directory". Runs real cargo on a
//! throwaway one-file project (no dependencies, about a second to build).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/cargo-paths")
}

/// A package named `hello` with `main` (when `bin`) or only a library.
fn project(dir: &Path, bin: bool) {
    std::fs::create_dir_all(dir.join("src")).unwrap();
    std::fs::write(
        dir.join("Cargo.toml"),
        "[package]\nname = \"hello\"\nversion = \"0.1.0\"\nedition = \"2021\"\n\n[workspace]\n",
    )
    .unwrap();
    if bin {
        std::fs::write(
            dir.join("src/main.rs"),
            "fn main() { println!(\"hello from cargo-paths\"); }\n",
        )
        .unwrap();
    } else {
        std::fs::write(dir.join("src/lib.rs"), "pub fn hello() {}\n").unwrap();
    }
}

fn cargo_paths(project: &Path, target_dir: &Path, args: &[&str]) -> Output {
    let mut command = Command::new("bash");
    command
        .arg(script())
        .args(args)
        .current_dir(project)
        .env("CARGO_TARGET_DIR", target_dir)
        .env_remove("CARGO_BUILD_TARGET_DIR");
    command.output().unwrap()
}

fn stdout(output: &Output) -> String {
    assert!(
        output.status.success(),
        "cargo-paths failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout.clone())
        .unwrap()
        .trim()
        .to_string()
}

#[test]
fn follows_cargo_target_dir_to_the_binary_it_built() {
    let project_dir = tempfile::tempdir().unwrap();
    let target_dir = tempfile::tempdir().unwrap();
    project(project_dir.path(), true);

    let reported = stdout(&cargo_paths(
        project_dir.path(),
        target_dir.path(),
        &["target-dir"],
    ));
    assert_eq!(Path::new(&reported), target_dir.path());

    let binary = stdout(&cargo_paths(
        project_dir.path(),
        target_dir.path(),
        &["build", "--offline", "--quiet"],
    ));
    assert_eq!(
        Path::new(&binary),
        target_dir.path().join("debug/hello"),
        "the executable cargo reports"
    );
    let ran = Command::new(&binary).output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&ran.stdout),
        "hello from cargo-paths\n"
    );
    assert!(
        !project_dir.path().join("target").exists(),
        "nothing was built where a fixed target/ path would look"
    );
}

#[test]
fn refuses_a_build_that_made_no_single_executable() {
    let project_dir = tempfile::tempdir().unwrap();
    let target_dir = tempfile::tempdir().unwrap();
    project(project_dir.path(), false);
    let output = cargo_paths(
        project_dir.path(),
        target_dir.path(),
        &["build", "--offline", "--quiet"],
    );
    assert!(!output.status.success());
    assert!(output.stdout.is_empty());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("built 0 executables, expected one (pass --bin NAME)"),
        "{stderr}"
    );
}
