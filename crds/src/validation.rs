//! Semantic validation shared by the API server's schema and virtkube itself.
//!
//! The CRD schema refuses what it can (types, ranges, patterns, enums, CEL rules), but CEL is
//! off by default on Kubernetes 1.24 and cannot compare quantities before 1.29. Every
//! cross-field rule is therefore checked again here, by code the planner, the agent and the
//! local CLI all call, and reported with the field path that is wrong.

use std::fmt;

/// One problem in a spec: the field path (`spec.cpu.pinning[vcpu=3].cpuset`) and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// A JSON-path-like location, starting at `spec`.
    pub path: String,
    /// What is wrong and, where it helps, what to write instead.
    pub message: String,
}

impl FieldError {
    /// A problem at `path`.
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// All problems of one object, in field order; empty means valid.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FieldErrors(pub Vec<FieldError>);

impl FieldErrors {
    /// Records a problem at `path`.
    pub fn push(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.push(FieldError::new(path, message));
    }

    /// Whether no problem was found.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// `Ok(())` when empty, the errors otherwise.
    pub fn into_result(self) -> Result<(), FieldErrors> {
        if self.is_empty() { Ok(()) } else { Err(self) }
    }
}

impl fmt::Display for FieldErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, error) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{error}")?;
        }
        Ok(())
    }
}

impl std::error::Error for FieldErrors {}

/// A spec that can check its own cross-field rules.
pub trait Validate {
    /// Every problem found; an empty list means the spec can be realized as far as the spec
    /// alone can tell (what the host lacks is found later, by the planner).
    fn validate(&self) -> FieldErrors;
}

/// Checks that `names` holds no duplicate; the API server's map lists enforce this too, but a
/// local manifest has no API server in front of it.
pub(crate) fn check_unique<'a>(
    errors: &mut FieldErrors,
    path: &str,
    key: &str,
    names: impl IntoIterator<Item = &'a str>,
) {
    let mut seen = std::collections::BTreeSet::new();
    for name in names {
        if !seen.insert(name) {
            errors.push(
                format!("{path}[{key}={name}]"),
                format!("duplicate {key} `{name}`: each entry needs its own {key}"),
            );
        }
    }
}
