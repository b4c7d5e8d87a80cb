//! Reading a cluster for `virtkube plan --kubeconfig`: which cluster (kubeconfig and
//! context), and one `list` per virtkube kind. Nothing is written: the plan needs only the
//! read-only role in `gitops/ci/plan-reader.yaml`.

use std::path::PathBuf;

use kube::api::{Api, ListParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use serde::de::DeserializeOwned;
use virtkube_crds::{Domain, HypervisorNode, Network, StoragePool, Volume};

use crate::plan::reported::ClusterState;

/// Where the plan reads the cluster from.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ClusterArgs {
    /// Plan against a cluster (what its agents report) instead of libvirt hosts. Implied by
    /// `--kubeconfig` and `--context`, and by running as the kubectl plugin
    /// (`kubectl virtkube plan`). The kubeconfig is `--kubeconfig`, else `KUBECONFIG`,
    /// else `~/.kube/config`.
    #[arg(long)]
    pub cluster: bool,
    /// The kubeconfig file of the cluster to plan against.
    #[arg(long, value_name = "PATH")]
    pub kubeconfig: Option<PathBuf>,
    /// The kubeconfig context to use (default: its current context).
    #[arg(long, value_name = "NAME")]
    pub context: Option<String>,
}

/// Why the cluster could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// No usable kubeconfig.
    #[error(
        "cannot load the kubeconfig ({source}): give --kubeconfig PATH, set KUBECONFIG, or create ~/.kube/config"
    )]
    Kubeconfig {
        /// kube's reason.
        #[source]
        source: kube::config::KubeconfigError,
    },
    /// The client could not be built from it.
    #[error("cannot build a client for the cluster: {0}")]
    Client(#[source] kube::Error),
    /// The CRDs are not installed.
    #[error(
        "the cluster does not serve {resource}.virtkube.io: virtkube's CRDs are not installed (`virtkube crd | kubectl apply --server-side -f -`)"
    )]
    NoCrds {
        /// The resource asked for.
        resource: &'static str,
    },
    /// RBAC refused a list.
    #[error(
        "the cluster refuses to list {resource}.virtkube.io to this identity ({message}): bind it to the read-only role in gitops/ci/plan-reader.yaml"
    )]
    Forbidden {
        /// The resource asked for.
        resource: &'static str,
        /// The API server's words.
        message: String,
    },
    /// Any other failure of a list.
    #[error("listing {resource}.virtkube.io: {source}")]
    List {
        /// The resource asked for.
        resource: &'static str,
        /// kube's error.
        #[source]
        source: kube::Error,
    },
}

impl ClusterArgs {
    /// Whether to plan against a cluster (`kubectl_plugin`: run as `kubectl-virtkube`).
    pub fn enabled(&self, kubectl_plugin: bool) -> bool {
        self.cluster || self.kubeconfig.is_some() || self.context.is_some() || kubectl_plugin
    }

    /// A client for the chosen cluster and context, and the context's name.
    pub async fn client(&self) -> Result<(Client, String), ReadError> {
        let kubeconfig = match &self.kubeconfig {
            Some(path) => Kubeconfig::read_from(path),
            None => Kubeconfig::read(),
        }
        .map_err(|source| ReadError::Kubeconfig { source })?;
        let context = self
            .context
            .clone()
            .or_else(|| kubeconfig.current_context.clone())
            .unwrap_or_default();
        let options = KubeConfigOptions {
            context: self.context.clone(),
            ..KubeConfigOptions::default()
        };
        let config = Config::from_custom_kubeconfig(kubeconfig, &options)
            .await
            .map_err(|source| ReadError::Kubeconfig { source })?;
        let client = Client::try_from(config).map_err(ReadError::Client)?;
        Ok((client, context))
    }
}

async fn list<K>(client: &Client, resource: &'static str) -> Result<Vec<K>, ReadError>
where
    K: kube::Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug,
{
    let api: Api<K> = Api::all(client.clone());
    match api.list(&ListParams::default()).await {
        Ok(list) => Ok(list.items),
        Err(kube::Error::Api(status)) if status.code == 404 => Err(ReadError::NoCrds { resource }),
        Err(kube::Error::Api(status)) if status.code == 403 => Err(ReadError::Forbidden {
            resource,
            message: status.message.clone(),
        }),
        Err(source) => Err(ReadError::List { resource, source }),
    }
}

/// Reads every virtkube object and every HypervisorNode: five lists, nothing else.
pub async fn read(client: &Client) -> Result<ClusterState, ReadError> {
    Ok(ClusterState {
        nodes: list::<HypervisorNode>(client, "hypervisornodes").await?,
        pools: list::<StoragePool>(client, "storagepools").await?,
        networks: list::<Network>(client, "networks").await?,
        volumes: list::<Volume>(client, "volumes").await?,
        domains: list::<Domain>(client, "domains").await?,
    })
}
