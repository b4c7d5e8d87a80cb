//! The resource types the server serves, registered at start: virtkube's five kinds (names,
//! scope, status subresource and schema taken from `virtkube_crds::crd::all()`, the same CRDs
//! the chart installs) and the built-in kinds virtkube touches.

use std::sync::Arc;

use serde_json::Value;

/// One served resource type.
#[derive(Debug, Clone, PartialEq)]
pub struct ResourceType {
    /// API group; empty for the core group.
    pub group: String,
    /// API version within the group.
    pub version: String,
    /// `kind`.
    pub kind: String,
    /// URL path segment (`domains`).
    pub plural: String,
    /// `singularName` in discovery.
    pub singular: String,
    /// Short names (`dom`).
    pub short_names: Vec<String>,
    /// Categories (`virtkube`).
    pub categories: Vec<String>,
    /// Namespaced or cluster-scoped.
    pub namespaced: bool,
    /// Whether `/status` is a subresource (main-resource writes then ignore status and
    /// status writes change nothing else).
    pub status_subresource: bool,
    /// The structural schema (`openAPIV3Schema`) of a custom resource; `None` for built-in
    /// kinds, which are neither validated nor defaulted here. Shared: every request holds a
    /// copy of its type, and the schema checker caches what it compiled from it by identity.
    pub schema: Option<Arc<Value>>,
    /// The root schema server-side apply tracks field ownership under (the schema with
    /// ObjectMeta's, [`crate::ssa::tracking_schema`]), made once.
    pub tracking: Arc<Value>,
    /// Custom resources follow apiextensions-apiserver's strategy: `resourceVersion`
    /// required on update, strategic merge patch refused, `generation` tracked.
    pub custom: bool,
}

impl ResourceType {
    /// `group/version`, or `version` alone for the core group.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// Whether `metadata.generation` is maintained. Custom resources always; among the
    /// built-in kinds here, only CustomResourceDefinition.
    pub fn tracks_generation(&self) -> bool {
        self.custom || self.kind == "CustomResourceDefinition"
    }

    fn builtin(
        group: &str,
        version: &str,
        kind: &str,
        plural: &str,
        short: &[&str],
        namespaced: bool,
        status: bool,
    ) -> Self {
        ResourceType {
            group: group.into(),
            version: version.into(),
            kind: kind.into(),
            plural: plural.into(),
            singular: kind.to_lowercase(),
            short_names: short.iter().map(|s| s.to_string()).collect(),
            categories: Vec::new(),
            namespaced,
            status_subresource: status,
            schema: None,
            tracking: Arc::new(crate::ssa::tracking_schema(None)),
            custom: false,
        }
    }
}

/// Every served type, looked up by group, version and plural.
#[derive(Debug, Clone)]
pub struct Registry {
    types: Vec<ResourceType>,
}

impl Registry {
    /// The built-in kinds, plus virtkube's CRDs when `with_crds` (the switch that lets a test
    /// see the agent's "CRDs are not installed" message).
    pub fn new(with_crds: bool) -> Self {
        let mut types = vec![
            ResourceType::builtin("", "v1", "Namespace", "namespaces", &["ns"], false, true),
            ResourceType::builtin("", "v1", "Node", "nodes", &["no"], false, true),
            ResourceType::builtin("", "v1", "Event", "events", &["ev"], true, false),
            ResourceType::builtin(
                "coordination.k8s.io",
                "v1",
                "Lease",
                "leases",
                &[],
                true,
                false,
            ),
            ResourceType::builtin(
                "events.k8s.io",
                "v1",
                "Event",
                "events",
                &["ev"],
                true,
                false,
            ),
            ResourceType::builtin(
                "apiextensions.k8s.io",
                "v1",
                "CustomResourceDefinition",
                "customresourcedefinitions",
                &["crd", "crds"],
                false,
                true,
            ),
        ];
        if with_crds {
            types.extend(virtkube_types());
        }
        Registry { types }
    }

    /// The type served at `group/version/plural`.
    pub fn find(&self, group: &str, version: &str, plural: &str) -> Option<&ResourceType> {
        self.types
            .iter()
            .find(|t| t.group == group && t.version == version && t.plural == plural)
    }

    /// The type of a `kind` in `apiVersion`.
    pub fn by_kind(&self, api_version: &str, kind: &str) -> Option<&ResourceType> {
        self.types
            .iter()
            .find(|t| t.api_version() == api_version && t.kind == kind)
    }

    /// The type with this plural, in any group (virtkube's plurals are unique).
    pub fn by_plural(&self, plural: &str) -> Option<&ResourceType> {
        self.types.iter().find(|t| t.plural == plural)
    }

    /// Every type, in registration order.
    pub fn all(&self) -> &[ResourceType] {
        &self.types
    }
}

/// virtkube's kinds as their CRDs declare them.
fn virtkube_types() -> Vec<ResourceType> {
    virtkube_crds::crd::all()
        .into_iter()
        .filter_map(|crd| {
            let version = crd.spec.versions.iter().find(|v| v.served)?;
            let schema = version
                .schema
                .as_ref()
                .and_then(|s| s.open_api_v3_schema.as_ref())
                .and_then(|s| serde_json::to_value(s).ok());
            let tracking = Arc::new(crate::ssa::tracking_schema(schema.as_ref()));
            let names = &crd.spec.names;
            Some(ResourceType {
                group: crd.spec.group.clone(),
                version: version.name.clone(),
                kind: names.kind.clone(),
                plural: names.plural.clone(),
                singular: names.singular.clone().unwrap_or_default(),
                short_names: names.short_names.clone().unwrap_or_default(),
                categories: names.categories.clone().unwrap_or_default(),
                namespaced: crd.spec.scope == "Namespaced",
                status_subresource: version
                    .subresources
                    .as_ref()
                    .is_some_and(|s| s.status.is_some()),
                schema: schema.map(Arc::new),
                tracking,
                custom: true,
            })
        })
        .collect()
}

/// virtkube's CRDs as objects, for the CustomResourceDefinition store.
pub fn virtkube_crd_objects() -> Vec<Value> {
    virtkube_crds::crd::all()
        .into_iter()
        .filter_map(|crd| serde_json::to_value(crd).ok())
        .collect()
}
