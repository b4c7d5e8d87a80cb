//! Kubeconfigs and kube clients for the server: one user per identity, whose bearer token is
//! the identity itself (the server's whole notion of authentication).

use std::path::Path;

use crate::Error;

/// A kubeconfig naming `url`, with one user and context per identity; the first is current.
pub fn text(url: &str, identities: &[&str]) -> String {
    // JSON strings are valid YAML scalars: every value is quoted that way.
    let q = |s: &str| serde_json::Value::String(s.to_string()).to_string();
    let mut out = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: testapi\n  cluster:\n    server: {}\nusers:\n",
        q(url)
    );
    for id in identities {
        out.push_str(&format!(
            "- name: {}\n  user:\n    token: {}\n",
            q(id),
            q(id)
        ));
    }
    out.push_str("contexts:\n");
    for id in identities {
        out.push_str(&format!(
            "- name: {}\n  context:\n    cluster: testapi\n    user: {}\n",
            q(id),
            q(id)
        ));
    }
    if let Some(first) = identities.first() {
        out.push_str(&format!("current-context: {}\n", q(first)));
    }
    out
}

/// Writes [`text`] to `path`.
pub fn write(path: &Path, url: &str, identities: &[&str]) -> Result<(), Error> {
    std::fs::write(path, text(url, identities))
        .map_err(|e| Error::Kubeconfig(format!("writing {}: {e}", path.display())))
}

/// A kube client for `url` as `identity`.
pub async fn client(url: &str, identity: &str) -> Result<kube::Client, Error> {
    let kubeconfig = kube::config::Kubeconfig::from_yaml(&text(url, &[identity]))
        .map_err(|e| Error::Kubeconfig(e.to_string()))?;
    let config = kube::Config::from_custom_kubeconfig(
        kubeconfig,
        &kube::config::KubeConfigOptions::default(),
    )
    .await
    .map_err(|e| Error::Kubeconfig(e.to_string()))?;
    Ok(kube::Client::try_from(config)?)
}
