//! `virtkube-testapi`: the in-memory API server as a process, for CI scripts (e.g. an agent
//! in a container talking to it over the host network). Prints its address and runs until
//! killed.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use virtkube_testapi::{ADMIN, Authorizer, Config, TestApi};

/// An in-memory Kubernetes API server serving virtkube's kinds.
#[derive(Parser)]
struct Args {
    /// Where to listen.
    #[arg(long, default_value = "127.0.0.1:0")]
    addr: SocketAddr,
    /// Write a kubeconfig here: one user per identity (the RBAC files' subjects, then
    /// `admin`), the first current unless --user says otherwise.
    #[arg(long)]
    kubeconfig_out: Option<PathBuf>,
    /// Enforce the RBAC in these YAML files (Roles, ClusterRoles and bindings; e.g. the
    /// rendered Helm chart). `admin` may do everything.
    #[arg(long)]
    rbac: Vec<PathBuf>,
    /// Enforce the ValidatingAdmissionPolicies (with their bindings) in these YAML files
    /// (e.g. the rendered Helm chart; other kinds in them are ignored).
    #[arg(long)]
    admission_policies: Vec<PathBuf>,
    /// The kubeconfig's current user (a bearer token: `USER` or `USER|EXTRA-KEY=VALUE`,
    /// e.g. a service account bound to a node).
    #[arg(long)]
    user: Option<String>,
    /// Start without virtkube's CRDs.
    #[arg(long)]
    without_crds: bool,
    /// Seconds between watch bookmarks.
    #[arg(long, default_value_t = 5)]
    bookmark_seconds: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut identities: Vec<String> = Vec::new();
    let authorizer = if args.rbac.is_empty() {
        None
    } else {
        let texts = args
            .rbac
            .iter()
            .map(|p| std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display())))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let mut authorizer = Authorizer::new(&[ADMIN]);
        identities = authorizer.load_yaml(&texts)?;
        Some(authorizer)
    };
    identities.push(ADMIN.to_string());
    if let Some(user) = &args.user {
        identities.retain(|i| i != user);
        identities.insert(0, user.clone());
    }
    let mut policy_docs = Vec::new();
    for path in &args.admission_policies {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let docs: Vec<serde_json::Value> = serde_saphyr::from_str_multiple(&text)
            .with_context(|| format!("{} is not YAML", path.display()))?;
        policy_docs.extend(docs);
    }
    let admission = virtkube_testapi::admission::Policies::from_documents(&policy_docs)?;
    let config = Config {
        admission: std::sync::Arc::new(admission),
        addr: args.addr,
        with_crds: !args.without_crds,
        bookmark_interval: std::time::Duration::from_secs(args.bookmark_seconds.max(1)),
        authorizer,
        ..Config::default()
    };
    let api = TestApi::start_with(config).await?;
    if let Some(path) = &args.kubeconfig_out {
        let ids: Vec<&str> = identities.iter().map(String::as_str).collect();
        api.write_kubeconfig(path, &ids)?;
    }
    println!("virtkube-testapi listening on {}", api.url());
    tokio::signal::ctrl_c()
        .await
        .context("waiting for a signal")?;
    api.stop().await;
    Ok(())
}
