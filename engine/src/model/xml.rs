//! A small element tree over quick-xml: enough to read libvirt's XML (which never relies on
//! mixed content) and to write it back with every attribute and text escaped.
//!
//! Reading goes through a tree rather than serde so that unknown elements, namespaced
//! `<metadata>` children and libvirt's expanded defaults are all tolerated in one place.

use std::fmt::Write as _;

use quick_xml::XmlVersion;
use quick_xml::escape::{escape, resolve_predefined_entity};
use quick_xml::events::Event;
use quick_xml::reader::Reader;

/// An XML document could not be parsed, or lacked what a model needs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("XML: {0}")]
pub struct XmlError(pub String);

/// One XML element: name (with its prefix, as written), attributes, child elements and the
/// concatenated text directly inside it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Element {
    /// Qualified name as written (`virtkube:owner`).
    pub name: String,
    /// Attributes in document order, unescaped.
    pub attrs: Vec<(String, String)>,
    /// Child elements in document order.
    pub children: Vec<Element>,
    /// Text directly inside this element, unescaped (whitespace-only text is dropped).
    pub text: String,
}

impl Element {
    /// A new element with no attributes or children.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            ..Self::default()
        }
    }

    /// Builder: adds an attribute.
    pub fn attr(mut self, key: &str, value: impl ToString) -> Self {
        self.attrs.push((key.to_string(), value.to_string()));
        self
    }

    /// Builder: adds an attribute when `value` is `Some`.
    pub fn attr_opt(self, key: &str, value: Option<impl ToString>) -> Self {
        match value {
            Some(v) => self.attr(key, v),
            None => self,
        }
    }

    /// Builder: adds a child element.
    pub fn child(mut self, child: Element) -> Self {
        self.children.push(child);
        self
    }

    /// Builder: adds a child element when `child` is `Some`.
    pub fn child_opt(mut self, child: Option<Element>) -> Self {
        if let Some(c) = child {
            self.children.push(c);
        }
        self
    }

    /// Builder: sets the text.
    pub fn text(mut self, text: impl ToString) -> Self {
        self.text = text.to_string();
        self
    }

    /// The local part of the name (`owner` for `virtkube:owner`).
    pub fn local_name(&self) -> &str {
        self.name.rsplit(':').next().unwrap_or(&self.name)
    }

    /// An attribute's value.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.attrs
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// An attribute parsed as a number (or any `FromStr`).
    pub fn get_parsed<T: std::str::FromStr>(&self, key: &str) -> Option<T> {
        self.get(key).and_then(|v| v.trim().parse().ok())
    }

    /// The first child with this (qualified) name.
    pub fn find(&self, name: &str) -> Option<&Element> {
        self.children.iter().find(|c| c.name == name)
    }

    /// All children with this (qualified) name.
    pub fn find_all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Element> + 'a {
        self.children.iter().filter(move |c| c.name == name)
    }

    /// Follows a `/`-separated path of child names.
    pub fn path(&self, path: &str) -> Option<&Element> {
        path.split('/').try_fold(self, |el, seg| {
            if seg.is_empty() {
                Some(el)
            } else {
                el.find(seg)
            }
        })
    }

    /// The trimmed text of the element at `path`, when present and non-empty.
    pub fn path_text(&self, path: &str) -> Option<String> {
        self.path(path)
            .map(|e| e.text.trim().to_string())
            .filter(|t| !t.is_empty())
    }

    /// The namespace URI this element declares for its own prefix (`xmlns:p` or `xmlns`).
    pub fn declared_namespace(&self) -> Option<&str> {
        let key = match self.name.split_once(':') {
            Some((prefix, _)) => format!("xmlns:{prefix}"),
            None => "xmlns".to_string(),
        };
        self.get(&key)
    }

    /// Serialises this element (and its subtree) as XML with two-space indentation; every
    /// attribute value and text is escaped.
    pub fn to_xml(&self) -> String {
        let mut out = String::new();
        self.write(&mut out, 0);
        out
    }

    fn write(&self, out: &mut String, depth: usize) {
        let pad = "  ".repeat(depth);
        let _ = write!(out, "{pad}<{}", self.name);
        for (k, v) in &self.attrs {
            let _ = write!(out, " {k}=\"{}\"", escape_attribute(v));
        }
        if self.children.is_empty() && self.text.is_empty() {
            out.push_str("/>\n");
        } else if self.children.is_empty() {
            let _ = writeln!(out, ">{}</{}>", escape_text(&self.text), self.name);
        } else {
            out.push_str(">\n");
            if !self.text.is_empty() {
                let _ = writeln!(out, "{pad}  {}", escape_text(&self.text));
            }
            for c in &self.children {
                c.write(out, depth + 1);
            }
            let _ = writeln!(out, "{pad}</{}>", self.name);
        }
    }
}

/// `value` escaped for a double-quoted attribute: the markup characters, and the whitespace a
/// reader would otherwise turn into spaces (XML's attribute-value normalization), so the
/// value reads back exactly as written.
fn escape_attribute(value: &str) -> String {
    escape(value)
        .replace('\t', "&#9;")
        .replace('\n', "&#10;")
        .replace('\r', "&#13;")
}

/// `text` escaped for element content: the markup characters, and carriage returns (which a
/// reader would otherwise turn into line feeds).
fn escape_text(text: &str) -> String {
    escape(text).replace('\r', "&#13;")
}

/// Parses a whole document and returns its root element.
pub fn parse(xml: &str) -> Result<Element, XmlError> {
    parse_until(xml, None)
}

/// Parses a document up to the first child of the root named `stop` and returns the root
/// with the children before it: for reading a few leading fields of a long document (a
/// domain's sizes come before its `<devices>`) without building all of it.
pub fn parse_head(xml: &str, stop: &str) -> Result<Element, XmlError> {
    parse_until(xml, Some(stop))
}

fn parse_until(xml: &str, stop: Option<&str>) -> Result<Element, XmlError> {
    let mut reader = Reader::from_str(xml);
    let mut stack: Vec<Element> = Vec::new();
    let err = |e: &dyn std::fmt::Display| XmlError(e.to_string());
    loop {
        let ev = reader.read_event().map_err(|e| err(&e))?;
        match ev {
            Event::Start(ref s) | Event::Empty(ref s) => {
                let name = s.name().as_ref().to_string();
                if stack.len() == 1 && stop == Some(name.as_str()) {
                    return stack
                        .pop()
                        .ok_or_else(|| XmlError("no root element".into()));
                }
                let mut el = Element::new(name);
                for a in s.attributes() {
                    let a = a.map_err(|e| err(&e))?;
                    let key = a.key.as_ref().to_string();
                    let value = a
                        .normalized_value(XmlVersion::Implicit1_0)
                        .map_err(|e| err(&e))?
                        .into_owned();
                    el.attrs.push((key, value));
                }
                if matches!(ev, Event::Empty(_)) {
                    if stack.is_empty() {
                        return Ok(el);
                    }
                    attach(&mut stack, el)?;
                } else {
                    stack.push(el);
                }
            }
            Event::End(_) => {
                let mut el = stack
                    .pop()
                    .ok_or_else(|| XmlError("unbalanced end tag".into()))?;
                if el.text.trim().is_empty() {
                    el.text.clear();
                }
                if stack.is_empty() {
                    return Ok(el);
                }
                attach(&mut stack, el)?;
            }
            Event::Text(t) => {
                if let Some(top) = stack.last_mut() {
                    top.text.push_str(&t.xml10_content());
                }
            }
            Event::CData(t) => {
                if let Some(top) = stack.last_mut() {
                    top.text.push_str(&t.xml10_content());
                }
            }
            Event::GeneralRef(r) => {
                if let Some(top) = stack.last_mut() {
                    if let Some(c) = r.resolve_char_ref().map_err(|e| err(&e))? {
                        top.text.push(c);
                    } else if let Some(s) = resolve_predefined_entity(&r) {
                        top.text.push_str(s);
                    } else {
                        return Err(XmlError(format!("unknown entity &{};", &*r)));
                    }
                }
            }
            Event::Eof => return Err(XmlError("document ended before its root closed".into())),
            _ => {}
        }
    }
}

fn attach(stack: &mut [Element], el: Element) -> Result<(), XmlError> {
    match stack.last_mut() {
        Some(parent) => {
            parent.children.push(el);
            Ok(())
        }
        None => Err(XmlError(format!(
            "stray element <{}> at top level",
            el.name
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_escapes_everything() {
        let el = Element::new("a")
            .attr("x", "1 < 2 & \"q\" 'r'")
            .child(Element::new("b").text("<script>&amp;"));
        let xml = el.to_xml();
        assert!(!xml.contains("<script>"));
        let back = parse(&xml).unwrap();
        assert_eq!(back.get("x"), Some("1 < 2 & \"q\" 'r'"));
        assert_eq!(back.find("b").unwrap().text, "<script>&amp;");
    }

    #[test]
    fn namespaces_and_paths() {
        let doc = parse(
            "<domain><metadata><vk:owner xmlns:vk='urn:x' uid='u'/></metadata><os><type arch='x86_64'>hvm</type></os></domain>",
        )
        .unwrap();
        let owner = doc.path("metadata/vk:owner").unwrap();
        assert_eq!(owner.local_name(), "owner");
        assert_eq!(owner.declared_namespace(), Some("urn:x"));
        assert_eq!(doc.path_text("os/type").as_deref(), Some("hvm"));
    }

    #[test]
    fn single_empty_root_and_truncation() {
        assert_eq!(parse("<a k='v'/>").unwrap().get("k"), Some("v"));
        assert!(parse("<a>").is_err());
    }

    #[test]
    fn whitespace_and_markup_read_back_exactly() {
        let nasty = "a\tb\nc\r\nd <x a='1'/> & \" ' ]]>";
        let doc = Element::new("root")
            .attr("v", nasty)
            .child(Element::new("t").text(nasty));
        let back = parse(&doc.to_xml()).unwrap();
        assert_eq!(back.get("v"), Some(nasty));
        assert_eq!(back.find("t").map(|t| t.text.as_str()), Some(nasty));
        assert_eq!(back.children.len(), 1);
    }
}
