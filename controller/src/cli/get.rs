//! `virtkube get [KIND] [NAME]`: observed state, as a table or as objects with status.

use std::process::ExitCode;

use anyhow::bail;

use crate::plan::desired::DesiredState;
use crate::plan::{self, PlanOptions};

use super::common::{HostArgs, runtime};
use super::status;

/// Output formats.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// YAML documents.
    Yaml,
    /// A JSON list.
    Json,
}

/// Arguments of `virtkube get`.
#[derive(clap::Args, Debug)]
pub struct GetArgs {
    /// `domain`, `volume`, `network` or `storagepool` (short: dom, vol, vnet, pool); all
    /// kinds when unset.
    kind: Option<String>,
    /// Only this object (`name` or `namespace/name`).
    name: Option<String>,
    /// Print objects with their status, as the operator would write them.
    #[arg(short = 'o', long, value_enum)]
    output: Option<Output>,
    /// Manifests to show status for (otherwise objects are rebuilt from the hosts).
    #[arg(short = 'f', long = "filename", value_name = "PATH")]
    files: Vec<std::path::PathBuf>,
    /// Include libvirt objects virtkube does not own.
    #[arg(long, short = 'A')]
    all: bool,
    #[command(flatten)]
    hosts: HostArgs,
}

fn kind_of(word: &str) -> anyhow::Result<&'static str> {
    Ok(match word.to_ascii_lowercase().as_str() {
        "domain" | "domains" | "dom" => "Domain",
        "volume" | "volumes" | "vol" => "Volume",
        "network" | "networks" | "vnet" | "net" => "Network",
        "storagepool" | "storagepools" | "pool" | "pools" => "StoragePool",
        other => bail!("unknown kind `{other}`: use domain, volume, network or storagepool"),
    })
}

fn matches(kind: Option<&str>, name: Option<&str>, obj_kind: &str, obj_name: &str) -> bool {
    kind.is_none_or(|k| k == obj_kind)
        && name.is_none_or(|n| n == obj_name || obj_name.rsplit('/').next() == Some(n))
}

/// Runs `virtkube get`.
pub fn run(args: &GetArgs) -> anyhow::Result<ExitCode> {
    let kind = args.kind.as_deref().map(kind_of).transpose()?;
    let manifests = if args.files.is_empty() {
        Vec::new()
    } else {
        virtkube_crds::manifest::load(&args.files)
            .map_err(|e| anyhow::anyhow!("the manifests were refused:\n{e}"))?
    };
    runtime()?.block_on(async {
        let hosts = args.hosts.connect().await?;
        let observed = hosts.observe().await?;
        match args.output {
            None => {
                let rows: Vec<status::Row> = status::observed_rows(&observed, args.all)
                    .into_iter()
                    .filter(|r| matches(kind, args.name.as_deref(), &r.kind, &r.name))
                    .collect();
                print!("{}", status::table(&rows));
            }
            Some(format) => {
                let objects = if manifests.is_empty() {
                    status::reconstructed(&observed)
                } else {
                    let (desired, notices) =
                        DesiredState::from_manifests(&manifests, &hosts.nodes());
                    let mut p = plan::plan(&desired, &observed, &PlanOptions::default());
                    p.notices.extend(notices);
                    status::with_status(&manifests, &desired, &observed, &p)
                };
                let objects: Vec<serde_json::Value> = objects
                    .into_iter()
                    .filter(|o| {
                        let k = o["kind"].as_str().unwrap_or_default();
                        let n = match o["metadata"]["namespace"].as_str() {
                            Some(ns) => format!(
                                "{ns}/{}",
                                o["metadata"]["name"].as_str().unwrap_or_default()
                            ),
                            None => o["metadata"]["name"]
                                .as_str()
                                .unwrap_or_default()
                                .to_string(),
                        };
                        matches(kind, args.name.as_deref(), k, &n)
                    })
                    .collect();
                match format {
                    Output::Json => println!("{}", serde_json::to_string_pretty(&objects)?),
                    Output::Yaml => {
                        for o in &objects {
                            println!("---");
                            print!("{}", serde_saphyr::to_string(o)?);
                        }
                    }
                }
            }
        }
        hosts.close().await?;
        Ok(ExitCode::SUCCESS)
    })
}
