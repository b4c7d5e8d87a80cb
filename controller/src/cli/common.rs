//! What the local commands share: which hosts to talk to, reading manifests, and the tokio
//! runtime.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use virtkube_crds::manifest::{self, Manifest};
use virtkube_engine::EngineConfig;

use crate::host::{HostSpec, Hosts};

/// The URI used when neither `--connect` nor `--host` says otherwise: libvirt's in-process
/// test driver, so a first run needs nothing installed.
pub const DEFAULT_URI: &str = "test:///default";

/// Which libvirt hosts a command works on.
#[derive(clap::Args, Debug, Clone)]
pub struct HostArgs {
    /// libvirt URI of the host (`qemu:///system`, `qemu+ssh://root@node/system`). Ignored
    /// when `--host` is given.
    #[arg(long, short = 'c', value_name = "URI", default_value = DEFAULT_URI, env = "VIRTKUBE_CONNECT")]
    pub connect: String,
    /// The node name of the `--connect` host (what `spec.nodeName` may say).
    #[arg(long, value_name = "NAME", default_value = "local")]
    pub node_name: String,
    /// A node and its libvirt URI, repeatable; the first one takes objects without a
    /// `nodeName`. A domain's `spec.nodeName` picks its host; changing it live-migrates.
    #[arg(long = "host", value_name = "NAME=URI")]
    pub hosts: Vec<String>,
    /// The URI the *source* libvirtd uses to reach NAME in a peer-to-peer migration (when it
    /// differs from NAME's `--host` URI), repeatable.
    #[arg(long = "p2p-uri", value_name = "NAME=URI")]
    pub p2p_uris: Vec<String>,
    /// An explicit migration data URI for NAME (`tcp://10.99.0.2`), repeatable.
    #[arg(long = "migration-uri", value_name = "NAME=URI")]
    pub migration_uris: Vec<String>,
    /// Seconds a guest gets to shut down gracefully before it is destroyed.
    #[arg(long, value_name = "SECONDS", default_value_t = 30)]
    pub shutdown_timeout: u64,
    /// Encrypt live migrations with TLS (libvirt's `VIR_MIGRATE_TLS`; both daemons need
    /// QEMU's x509 certificates in qemu.conf).
    #[arg(long)]
    pub migration_tls: bool,
}

fn split_pair(text: &str, flag: &str) -> anyhow::Result<(String, String)> {
    match text.split_once('=') {
        Some((name, uri)) if !name.is_empty() && !uri.is_empty() => {
            Ok((name.to_string(), uri.to_string()))
        }
        _ => bail!("{flag} {text}: expected NAME=URI"),
    }
}

impl HostArgs {
    /// The hosts to connect to.
    pub fn specs(&self) -> anyhow::Result<Vec<HostSpec>> {
        let mut specs: Vec<HostSpec> = if self.hosts.is_empty() {
            vec![HostSpec {
                node: self.node_name.clone(),
                uri: self.connect.clone(),
                p2p_uri: None,
                migration_uri: None,
            }]
        } else {
            let mut specs = Vec::new();
            for h in &self.hosts {
                let (node, uri) = split_pair(h, "--host")?;
                if specs.iter().any(|s: &HostSpec| s.node == node) {
                    bail!("--host {node} is given twice");
                }
                specs.push(HostSpec {
                    node,
                    uri,
                    p2p_uri: None,
                    migration_uri: None,
                });
            }
            specs
        };
        for (flag, list, p2p) in [
            ("--p2p-uri", &self.p2p_uris, true),
            ("--migration-uri", &self.migration_uris, false),
        ] {
            for item in list {
                let (node, uri) = split_pair(item, flag)?;
                let spec = specs
                    .iter_mut()
                    .find(|s| s.node == node)
                    .with_context(|| format!("{flag} {item}: no host named {node}"))?;
                if p2p {
                    spec.p2p_uri = Some(uri);
                } else {
                    spec.migration_uri = Some(uri);
                }
            }
        }
        Ok(specs)
    }

    /// Connects to every host.
    pub async fn connect(&self) -> anyhow::Result<Hosts> {
        let specs = self.specs()?;
        let mut hosts = Hosts::connect(&specs, EngineConfig::default())
            .await
            .context("connecting to libvirt")?;
        hosts.shutdown_deadline = Duration::from_secs(self.shutdown_timeout);
        hosts.migration_tls = self.migration_tls;
        Ok(hosts)
    }
}

/// `-f PATH`, repeatable.
#[derive(clap::Args, Debug, Clone)]
pub struct FileArgs {
    /// A manifest file or a directory of `.yaml` files (read recursively, in name order).
    #[arg(short = 'f', long = "filename", value_name = "PATH", required = true)]
    pub files: Vec<PathBuf>,
}

impl FileArgs {
    /// Reads and validates every manifest; every refusal names file, document, object and
    /// field.
    pub fn load(&self) -> anyhow::Result<Vec<Manifest>> {
        manifest::load(&self.files).map_err(|errors| {
            anyhow::anyhow!(
                "the manifests were refused ({} problem{}):\n{errors}",
                errors.0.len(),
                if errors.0.len() == 1 { "" } else { "s" }
            )
        })
    }
}

/// A runtime for one command. Logs (the engine's libvirt calls, reconnects) go to stderr,
/// filtered by `RUST_LOG` (e.g. `RUST_LOG=virtkube_engine=debug`); quiet by default.
pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .try_init();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}
