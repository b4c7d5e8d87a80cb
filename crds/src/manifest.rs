//! Strict reading of manifests from files and directories, for `virtkube apply -f`.
//!
//! A manifest goes through the same gates the API server would put in front of it, in the
//! same order: YAML syntax, `apiVersion`/`kind`, metadata, the CRD schema (unknown fields,
//! types, enums, patterns, ranges), the CEL rules, then virtkube's own cross-field rules.
//! Every refusal names the file, the document (1-based, as editors count), the object and the
//! field, and all refusals are collected so a user fixes them in one pass.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::schema_validate::SchemaValidator;
use crate::validation::Validate;
use crate::{API_VERSION, Domain, Network, StoragePool, Volume};

/// A virtkube object read from a manifest.
#[derive(Debug, Clone, PartialEq)]
pub enum Object {
    /// A `Domain`.
    Domain(Box<Domain>),
    /// A `Volume`.
    Volume(Box<Volume>),
    /// A `Network`.
    Network(Box<Network>),
    /// A `StoragePool`.
    StoragePool(Box<StoragePool>),
}

impl Object {
    /// The object's kind.
    pub fn kind(&self) -> &'static str {
        match self {
            Object::Domain(_) => "Domain",
            Object::Volume(_) => "Volume",
            Object::Network(_) => "Network",
            Object::StoragePool(_) => "StoragePool",
        }
    }

    /// `Kind namespace/name` or `Kind name`, as messages write it.
    pub fn display_name(&self) -> String {
        let meta = match self {
            Object::Domain(o) => &o.metadata,
            Object::Volume(o) => &o.metadata,
            Object::Network(o) => &o.metadata,
            Object::StoragePool(o) => &o.metadata,
        };
        object_label(
            self.kind(),
            meta.namespace.as_deref(),
            meta.name.as_deref().unwrap_or(""),
        )
    }
}

fn object_label(kind: &str, namespace: Option<&str>, name: &str) -> String {
    match namespace {
        Some(ns) => format!("{kind} {ns}/{name}"),
        None => format!("{kind} {name}"),
    }
}

/// Where an object came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    /// The file.
    pub file: PathBuf,
    /// The YAML document in that file, from 1.
    pub document: usize,
}

/// An object and where it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct Manifest {
    /// Where it came from.
    pub source: Source,
    /// The object, with defaults applied and validated.
    pub object: Object,
}

/// One refusal, naming the file, the document, the object and the field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestError {
    /// The file.
    pub file: PathBuf,
    /// The YAML document, from 1; `None` for errors about the whole file.
    pub document: Option<usize>,
    /// `Kind namespace/name`, when known.
    pub object: Option<String>,
    /// The field path, when the error is about one field.
    pub field: Option<String>,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(document) = self.document {
            write!(f, " (document {document})")?;
        }
        if let Some(object) = &self.object {
            write!(f, " {object}")?;
        }
        if let Some(field) = &self.field {
            write!(f, ": {field}")?;
        }
        write!(f, ": {}", self.message)
    }
}

/// Every refusal from one load, in file and document order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestErrors(pub Vec<ManifestError>);

impl fmt::Display for ManifestErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, error) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{error}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ManifestErrors {}

/// The YAML files a path names: the file itself, or every `.yaml`/`.yml` file under a
/// directory (recursively, sorted, hidden entries skipped).
pub fn yaml_files(path: &Path) -> Result<Vec<PathBuf>, ManifestError> {
    let io_error = |path: &Path, e: std::io::Error| ManifestError {
        file: path.to_path_buf(),
        document: None,
        object: None,
        field: None,
        message: format!("cannot read: {e}"),
    };
    let metadata = std::fs::metadata(path).map_err(|e| io_error(path, e))?;
    if metadata.is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut files = Vec::new();
    let mut entries: Vec<_> = std::fs::read_dir(path)
        .map_err(|e| io_error(path, e))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .collect();
    entries.sort();
    for entry in entries {
        let hidden = entry
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with('.'));
        if hidden {
            continue;
        }
        if entry.is_dir() {
            files.extend(yaml_files(&entry)?);
        } else if entry
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| e == "yaml" || e == "yml")
        {
            files.push(entry);
        }
    }
    Ok(files)
}

/// Reads every object under `paths` (files or directories). All refusals are returned
/// together; no object is returned when any is refused, so nothing half-valid is applied.
pub fn load(paths: &[PathBuf]) -> Result<Vec<Manifest>, ManifestErrors> {
    let (manifests, errors) = read_all(paths, Reader::new());
    if errors.is_empty() {
        Ok(manifests)
    } else {
        Err(ManifestErrors(errors))
    }
}

/// Reads every manifest under `paths` with `reader`, keeping what passed beside what was
/// refused (for a preview that reports each refusal at its object and still shows the rest).
pub fn read_all(paths: &[PathBuf], mut reader: Reader) -> (Vec<Manifest>, Vec<ManifestError>) {
    let mut manifests = Vec::new();
    let mut errors = Vec::new();
    for path in paths {
        match yaml_files(path) {
            Ok(files) if files.is_empty() => errors.push(ManifestError {
                file: path.clone(),
                document: None,
                object: None,
                field: None,
                message: "no .yaml or .yml file here".into(),
            }),
            Ok(files) => {
                for file in files {
                    match std::fs::read_to_string(&file) {
                        Ok(text) => match reader.parse(&file, &text) {
                            Ok(found) => manifests.extend(found),
                            Err(e) => errors.extend(e.0),
                        },
                        Err(e) => errors.push(ManifestError {
                            file: file.clone(),
                            document: None,
                            object: None,
                            field: None,
                            message: format!("cannot read: {e}"),
                        }),
                    }
                }
            }
            Err(e) => errors.push(e),
        }
    }
    check_duplicates(&manifests, &mut errors);
    (manifests, errors)
}

fn check_duplicates(manifests: &[Manifest], errors: &mut Vec<ManifestError>) {
    let mut seen: std::collections::BTreeMap<String, &Source> = Default::default();
    for m in manifests {
        let name = m.object.display_name();
        if let Some(first) = seen.get(&name) {
            errors.push(ManifestError {
                file: m.source.file.clone(),
                document: Some(m.source.document),
                object: Some(name.clone()),
                field: None,
                message: format!(
                    "defined twice: first in {} (document {})",
                    first.file.display(),
                    first.document
                ),
            });
        } else {
            seen.insert(name, &m.source);
        }
    }
}

/// Parses manifests, keeping the CRD schemas and compiled patterns between files.
pub struct Reader {
    schemas: Vec<(String, Value, bool)>,
    validator: SchemaValidator,
    cel: kube::core::cel::Validator,
    spec_rules: bool,
}

impl Default for Reader {
    fn default() -> Self {
        Self::new()
    }
}

impl Reader {
    /// A reader for every virtkube kind a user may apply.
    pub fn new() -> Self {
        let schemas = crate::crd::all()
            .into_iter()
            .map(|crd| {
                let schema = crd
                    .spec
                    .versions
                    .first()
                    .and_then(|v| v.schema.as_ref())
                    .and_then(|s| s.open_api_v3_schema.as_ref())
                    .map(|s| serde_json::to_value(s).unwrap_or(Value::Null))
                    .unwrap_or(Value::Null);
                (
                    crd.spec.names.kind.clone(),
                    schema,
                    crd.spec.scope == "Namespaced",
                )
            })
            .collect();
        Self {
            schemas,
            validator: SchemaValidator::new(),
            cel: kube::core::cel::Validator::new(),
            spec_rules: true,
        }
    }

    /// A reader that stops at the gates the API server itself applies (schema and CEL) and
    /// leaves virtkube's own cross-field rules ([`Validate`]) to the caller: an object the
    /// API server accepts but the agent would refuse is then read, so a preview can report
    /// it the way the agent does.
    pub fn without_spec_rules(mut self) -> Self {
        self.spec_rules = false;
        self
    }

    /// Parses every document of one file's text; `file` is only used in messages.
    pub fn parse(&mut self, file: &Path, text: &str) -> Result<Vec<Manifest>, ManifestErrors> {
        let error = |document: Option<usize>,
                     object: Option<String>,
                     field: Option<String>,
                     message: String| ManifestError {
            file: file.to_path_buf(),
            document,
            object,
            field,
            message,
        };
        let documents: Vec<Value> = serde_saphyr::from_str_multiple(text).map_err(|e| {
            ManifestErrors(vec![error(
                None,
                None,
                None,
                format!("not valid YAML: {e}"),
            )])
        })?;
        let mut manifests = Vec::new();
        let mut errors = Vec::new();
        for (index, document) in documents.into_iter().enumerate() {
            let number = index + 1;
            if document.is_null() {
                continue;
            }
            match self.parse_document(document) {
                Ok(object) => manifests.push(Manifest {
                    source: Source {
                        file: file.to_path_buf(),
                        document: number,
                    },
                    object,
                }),
                Err((object, problems)) => {
                    errors.extend(problems.into_iter().map(|(field, message)| {
                        error(Some(number), object.clone(), field, message)
                    }))
                }
            }
        }
        if errors.is_empty() {
            Ok(manifests)
        } else {
            Err(ManifestErrors(errors))
        }
    }

    #[allow(clippy::type_complexity)]
    fn parse_document(
        &mut self,
        mut document: Value,
    ) -> Result<Object, (Option<String>, Vec<(Option<String>, String)>)> {
        let one = |field: &str, message: String| (None, vec![(Some(field.to_string()), message)]);
        let Some(fields) = document.as_object() else {
            return Err((None, vec![(None, "a manifest document must be a mapping with apiVersion, kind, metadata and spec".into())]));
        };
        let api_version = fields
            .get("apiVersion")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let kind = fields
            .get("kind")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        if api_version != API_VERSION {
            return Err(one(
                "apiVersion",
                format!("`{api_version}` is not virtkube's API: write `{API_VERSION}`"),
            ));
        }
        let Some((_, schema, namespaced)) =
            self.schemas.iter().find(|(k, _, _)| *k == kind).cloned()
        else {
            return Err(one(
                "kind",
                format!(
                    "`{kind}` is not a virtkube kind: use Domain, Volume, Network or StoragePool"
                ),
            ));
        };
        if kind == "HypervisorNode" {
            return Err(one(
                "kind",
                "HypervisorNode is written by each node's agent, not applied from manifests".into(),
            ));
        }
        let name = document
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let label_namespace = document
            .pointer("/metadata/namespace")
            .and_then(Value::as_str)
            .map(str::to_string);
        let label = object_label(
            &kind,
            if namespaced {
                Some(label_namespace.as_deref().unwrap_or("default"))
            } else {
                label_namespace.as_deref()
            },
            &name,
        );
        let mut problems = metadata_problems(&document, namespaced);
        if namespaced
            && label_namespace.is_none()
            && let Some(meta) = document.get_mut("metadata").and_then(Value::as_object_mut)
        {
            meta.insert("namespace".into(), Value::String("default".into()));
        }
        problems.extend(
            self.validator
                .validate(&schema, &document)
                .into_iter()
                .map(|e| (Some(e.path), e.message)),
        );
        if problems.is_empty()
            && let Err(cel) = self.cel.validate(&schema, &document, None)
        {
            problems.extend(cel.iter().map(|e| {
                (
                    Some(if e.field_path.is_empty() {
                        "(root)".to_string()
                    } else {
                        e.field_path.clone()
                    }),
                    e.message.clone(),
                )
            }));
        }
        if !problems.is_empty() {
            return Err((Some(label), problems));
        }
        let typed =
            match kind.as_str() {
                "Domain" => typed::<Domain>(document)
                    .map(|o| (o.spec.validate(), Object::Domain(Box::new(o)))),
                "Volume" => typed::<Volume>(document)
                    .map(|o| (o.spec.validate(), Object::Volume(Box::new(o)))),
                "Network" => typed::<Network>(document)
                    .map(|o| (o.spec.validate(), Object::Network(Box::new(o)))),
                _ => typed::<StoragePool>(document)
                    .map(|o| (o.spec.validate(), Object::StoragePool(Box::new(o)))),
            };
        match typed {
            Ok((errors, object)) if errors.is_empty() || !self.spec_rules => Ok(object),
            Ok((errors, _)) => Err((
                Some(label),
                errors
                    .0
                    .into_iter()
                    .map(|e| (Some(e.path), e.message))
                    .collect(),
            )),
            Err((field, message)) => Err((Some(label), vec![(Some(field), message)])),
        }
    }
}

fn typed<T: DeserializeOwned>(document: Value) -> Result<T, (String, String)> {
    serde_path_to_error::deserialize(document)
        .map_err(|e| (e.path().to_string(), e.inner().to_string()))
}

fn metadata_problems(document: &Value, namespaced: bool) -> Vec<(Option<String>, String)> {
    let mut problems = Vec::new();
    let field = |f: &str| Some(f.to_string());
    match document.pointer("/metadata/name") {
        None | Some(Value::Null) => problems.push((field("metadata.name"), "required field is missing".to_string())),
        Some(Value::String(n)) if !crate::names::is_object_name(n) => problems.push((
            field("metadata.name"),
            format!("`{n}` is not a valid name: lower-case letters, digits, `-` and `.`, starting and ending with a letter or digit"),
        )),
        Some(Value::String(_)) => {}
        Some(other) => problems.push((field("metadata.name"), format!("must be a string, found {other}: quote it"))),
    }
    match (
        document
            .pointer("/metadata/namespace")
            .and_then(Value::as_str),
        namespaced,
    ) {
        (Some(_), false) => problems.push((
            field("metadata.namespace"),
            "this kind is cluster-scoped: remove namespace".to_string(),
        )),
        (Some(ns), true) if !crate::names::is_dns_label(ns) => problems.push((
            field("metadata.namespace"),
            format!("`{ns}` is not a valid namespace (a DNS label)"),
        )),
        _ => {}
    }
    problems
}
