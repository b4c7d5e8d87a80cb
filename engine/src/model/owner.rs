//! The ownership mark virtkube puts on every libvirt object it creates.
//!
//! | Object | Where the mark lives |
//! |---|---|
//! | domain | `<metadata><virtkube:owner xmlns:virtkube="https://virtkube.io/xmlns/owner/v1" …/></metadata>` |
//! | network | the same `<metadata>` element (libvirt ≥ 9.0 keeps network metadata) |
//! | storage pool | `<source><vendor name="virtkube.io"/><product name="kind=…;uid=…;name=…"/></source>` — pool XML has no `<metadata>`; a dir pool keeps vendor/product verbatim |
//! | storage volume | no mark in libvirt: ownership is the volume key the caller recorded at creation |

use std::fmt;

use super::xml::Element;

/// XML namespace of virtkube's ownership element.
pub const OWNER_NS: &str = "https://virtkube.io/xmlns/owner/v1";
/// Prefix used when virtkube writes the element.
pub const OWNER_PREFIX: &str = "virtkube";
/// Vendor name written in a storage pool's `<source>` to mark it as virtkube's.
pub const POOL_MARK_VENDOR: &str = "virtkube.io";

/// The Kubernetes resource (or local manifest) a libvirt object belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Owner {
    /// Resource kind (`Domain`, `Network`, `StoragePool`, `Volume`).
    pub kind: String,
    /// Resource UID: the identity that is compared.
    pub uid: String,
    /// Namespace for namespaced kinds.
    pub namespace: Option<String>,
    /// Resource name.
    pub name: String,
    /// `metadata.generation` last applied, if recorded.
    pub generation: Option<i64>,
}

impl Owner {
    /// A new owner without generation.
    pub fn new(
        kind: impl Into<String>,
        uid: impl Into<String>,
        namespace: Option<&str>,
        name: impl Into<String>,
    ) -> Self {
        Self {
            kind: kind.into(),
            uid: uid.into(),
            namespace: namespace.map(str::to_string),
            name: name.into(),
            generation: None,
        }
    }

    /// The libvirt name for this resource: `<namespace>.<name>` for namespaced kinds (a
    /// namespace holds no dots, so the mapping is unambiguous), the plain name otherwise.
    pub fn libvirt_name(&self) -> String {
        match &self.namespace {
            Some(ns) => format!("{ns}.{}", self.name),
            None => self.name.clone(),
        }
    }

    /// Whether `other` is the same resource: same kind and UID (names and generation are
    /// informative only).
    pub fn same_resource(&self, other: &Owner) -> bool {
        self.kind == other.kind && self.uid == other.uid
    }

    /// The `<virtkube:owner>` element placed in `<metadata>`.
    pub fn to_element(&self) -> Element {
        Element::new(format!("{OWNER_PREFIX}:owner"))
            .attr(&format!("xmlns:{OWNER_PREFIX}"), OWNER_NS)
            .attr("kind", &self.kind)
            .attr("uid", &self.uid)
            .attr_opt("namespace", self.namespace.as_ref())
            .attr("name", &self.name)
            .attr_opt("generation", self.generation)
    }

    /// Reads an owner element (any prefix, as long as it declares virtkube's namespace).
    pub fn from_element(el: &Element) -> Option<Owner> {
        if el.local_name() != "owner" || el.declared_namespace() != Some(OWNER_NS) {
            return None;
        }
        Some(Owner {
            kind: el.get("kind")?.to_string(),
            uid: el.get("uid")?.to_string(),
            namespace: el.get("namespace").map(str::to_string),
            name: el.get("name")?.to_string(),
            generation: el.get_parsed("generation"),
        })
    }

    /// Finds the owner among the children of a `<metadata>` element.
    pub fn from_metadata(metadata: &Element) -> Option<Owner> {
        metadata.children.iter().find_map(Owner::from_element)
    }

    /// The `product` string of a storage pool's mark: `kind=…;uid=…;name=…` with `;`, `=`
    /// and `%` percent-escaped.
    pub fn to_pool_product(&self) -> String {
        let mut s = format!(
            "kind={};uid={};name={}",
            pct(&self.kind),
            pct(&self.uid),
            pct(&self.name)
        );
        if let Some(ns) = &self.namespace {
            s.push_str(&format!(";namespace={}", pct(ns)));
        }
        if let Some(g) = self.generation {
            s.push_str(&format!(";generation={g}"));
        }
        s
    }

    /// Reads a storage pool's mark from its vendor and product strings.
    pub fn from_pool_mark(vendor: Option<&str>, product: Option<&str>) -> Option<Owner> {
        if vendor? != POOL_MARK_VENDOR {
            return None;
        }
        let mut o = Owner::new("", "", None, "");
        for part in product?.split(';') {
            let (k, v) = part.split_once('=')?;
            let v = unpct(v);
            match k {
                "kind" => o.kind = v,
                "uid" => o.uid = v,
                "name" => o.name = v,
                "namespace" => o.namespace = Some(v),
                "generation" => o.generation = v.parse().ok(),
                _ => {}
            }
        }
        (!o.kind.is_empty() && !o.uid.is_empty()).then_some(o)
    }
}

fn pct(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '%' | ';' | '=' => out.push_str(&format!("%{:02X}", c as u32)),
            c => out.push(c),
        }
    }
    out
}

fn unpct(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '%' {
            let hex: String = chars.by_ref().take(2).collect();
            match u8::from_str_radix(&hex, 16) {
                Ok(b) => out.push(b as char),
                Err(_) => {
                    out.push('%');
                    out.push_str(&hex);
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

impl fmt::Display for Owner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.namespace {
            Some(ns) => write!(f, "{} {ns}/{} (uid {})", self.kind, self.name, self.uid),
            None => write!(f, "{} {} (uid {})", self.kind, self.name, self.uid),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn element_round_trip() {
        let mut o = Owner::new("Domain", "1234-5678", Some("team-a"), "web<1>");
        o.generation = Some(7);
        let el = o.to_element();
        let back = Owner::from_element(&crate::model::xml::parse(&el.to_xml()).unwrap());
        assert_eq!(back, Some(o));
    }

    #[test]
    fn foreign_namespace_is_not_ours() {
        let el = crate::model::xml::parse(
            "<x:owner xmlns:x='urn:other' kind='Domain' uid='u' name='n'/>",
        )
        .unwrap();
        assert_eq!(Owner::from_element(&el), None);
    }

    #[test]
    fn pool_mark_round_trip() {
        let o = Owner::new("StoragePool", "u;=%1", None, "images");
        let back = Owner::from_pool_mark(Some(POOL_MARK_VENDOR), Some(&o.to_pool_product()));
        assert_eq!(back, Some(o));
        assert_eq!(
            Owner::from_pool_mark(Some("ACME"), Some("kind=x;uid=y;name=z")),
            None
        );
    }

    #[test]
    fn libvirt_names() {
        assert_eq!(
            Owner::new("Domain", "u", Some("ns"), "vm").libvirt_name(),
            "ns.vm"
        );
        assert_eq!(
            Owner::new("Network", "u", None, "lan").libvirt_name(),
            "lan"
        );
    }
}
