//! Name patterns and the mapping from Kubernetes names to libvirt names.
//!
//! libvirt names are host-global. A namespaced object maps to `<namespace>.<name>`: a
//! namespace is a DNS label and holds no dot, so the first dot splits the two unambiguously.
//! Cluster-scoped objects keep their name.

/// A DNS-1123 label: lower-case alphanumerics and `-`, at most 63 characters. Used for list
/// entry names (disks, interfaces) and namespaces.
pub const DNS_LABEL_PATTERN: &str = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$";

/// A DNS-1123 subdomain, the shape of a Kubernetes object name. Used for references to other
/// objects (a disk's volume, an interface's network, a volume's pool).
pub const OBJECT_NAME_PATTERN: &str =
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$";

/// A unicast Ethernet address written with colons (`52:54:00:12:34:56`).
pub const MAC_PATTERN: &str = r"^[0-9a-fA-F][02468aceACE](:[0-9a-fA-F]{2}){5}$";

/// A guest device name libvirt accepts as a disk target (`vda`, `sdb`, `hdc`).
pub const DISK_TARGET_PATTERN: &str = r"^(vd|sd|hd|xvd)[a-z]{1,2}$";

/// An absolute path without control characters, empty components (`//`), a trailing `/` or
/// trailing whitespace (libvirt rewrites the first ones and reads element text back trimmed,
/// and the path it reports would then never match the one asked for). `.` and `..`
/// components are refused by [`is_clean_absolute_path`], not by the pattern, to keep the
/// pattern readable.
pub const ABSOLUTE_PATH_PATTERN: &str =
    r"^/(([^/\x00-\x1f\x7f]+/)*[^/\x00-\x1f\x7f]*[^/\s\x00-\x1f\x7f])?$";

/// Text without control characters.
pub const PLAIN_TEXT_PATTERN: &str = r"^[^\x00-\x1f\x7f]*$";

/// A kernel command line: plain text ([`PLAIN_TEXT_PATTERN`]), not empty, not beginning or
/// ending with whitespace (libvirt reads it back trimmed: the planner would see a change on
/// every reconcile).
pub const CMDLINE_PATTERN: &str = r"^[^\s\x00-\x1f\x7f]([^\x00-\x1f\x7f]*[^\s\x00-\x1f\x7f])?$";

/// Whether `text` can be carried in libvirt's XML and read back the same: only characters
/// XML 1.0 allows, and no control character (XML refuses most, and rewrites tabs, line feeds
/// and carriage returns in attributes to spaces: a path holding one would name another
/// file once libvirt read it).
pub fn is_plain_text(text: &str) -> bool {
    text.chars()
        .all(|c| !c.is_control() && !matches!(c, '\u{fffe}' | '\u{ffff}'))
}

/// `text` as an error message may show it: control characters (which could move a
/// terminal's cursor, clear its screen or forge a line of output) written as escapes, and
/// text beyond `max` characters cut with `…` (a 4 KiB value repeated in a message helps
/// nobody).
pub fn shown(text: &str, max: usize) -> String {
    let mut out = String::new();
    for (i, c) in text.chars().enumerate() {
        if i == max {
            out.push('…');
            break;
        }
        if c.is_control() || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}') {
            out.extend(c.escape_unicode());
        } else {
            out.push(c);
        }
    }
    out
}

/// The rule [`is_clean_absolute_path`] checks, for field errors.
pub const CLEAN_ABSOLUTE_PATH: &str = "must be an absolute path without `.` or `..` components, `//`, a trailing `/`, trailing whitespace or control characters";

/// Whether `path` is absolute, has no `.` or `..` component (so it cannot climb out of the
/// directory it names), no empty component and no trailing `/` (libvirt would report the
/// path rewritten: `/a//b/` as `/a/b`), no trailing whitespace (paths in element text are
/// read back trimmed), and is plain text ([`is_plain_text`]).
pub fn is_clean_absolute_path(path: &str) -> bool {
    path.starts_with('/')
        && is_plain_text(path)
        && path.trim_end() == path
        && (path == "/"
            || path
                .split('/')
                .skip(1)
                .all(|c| !c.is_empty() && c != ".." && c != "."))
}

/// Whether `text` is a DNS-1123 label ([`DNS_LABEL_PATTERN`], at most 63 characters).
pub fn is_dns_label(text: &str) -> bool {
    let bytes = text.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 63
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        && bytes[0] != b'-'
        && bytes[bytes.len() - 1] != b'-'
}

/// Whether `text` is a Kubernetes object name ([`OBJECT_NAME_PATTERN`], at most 253 characters).
pub fn is_object_name(text: &str) -> bool {
    text.len() <= 253 && text.split('.').all(is_dns_label)
}

/// The libvirt name of a namespaced object: `<namespace>.<name>`.
pub fn host_name(namespace: Option<&str>, name: &str) -> String {
    match namespace {
        Some(ns) => format!("{ns}.{name}"),
        None => name.to_string(),
    }
}

/// Splits a libvirt name made by [`host_name`] for a namespaced kind back into
/// `(namespace, name)`; `None` when it holds no dot.
pub fn split_host_name(host_name: &str) -> Option<(&str, &str)> {
    host_name.split_once('.')
}

#[cfg(test)]
mod tests {
    #[test]
    fn shown_escapes_control_characters_and_cuts_long_text() {
        assert_eq!(
            super::shown("/boot/a\u{1b}[2J\n", 80),
            "/boot/a\\u{1b}[2J\\u{a}"
        );
        assert_eq!(super::shown("\u{202e}gnp", 80), "\\u{202e}gnp");
        assert_eq!(super::shown("abcdef", 3), "abc…");
        assert_eq!(super::shown("vm-1", 80), "vm-1");
    }

    use super::*;

    #[test]
    fn namespaced_names_round_trip_even_with_dots_in_the_name() {
        let host = host_name(Some("team-a"), "web.01");
        assert_eq!(host, "team-a.web.01");
        assert_eq!(split_host_name(&host), Some(("team-a", "web.01")));
        assert_eq!(host_name(None, "default"), "default");
    }

    #[test]
    fn patterns_accept_and_refuse_what_they_should() {
        let re = |p: &str| regex::Regex::new(p).unwrap();
        let label = re(DNS_LABEL_PATTERN);
        assert!(
            label.is_match("root-disk")
                && label.is_match("a")
                && !label.is_match("Root")
                && !label.is_match("-a")
                && !label.is_match("a.b")
        );
        let object = re(OBJECT_NAME_PATTERN);
        assert!(
            object.is_match("web.01") && !object.is_match("web..01") && !object.is_match("Web")
        );
        let mac = re(MAC_PATTERN);
        assert!(mac.is_match("52:54:00:ab:CD:ef"));
        assert!(!mac.is_match("01:00:5e:00:00:01"), "multicast is refused");
        assert!(!mac.is_match("52-54-00-ab-cd-ef"));
        let target = re(DISK_TARGET_PATTERN);
        assert!(
            target.is_match("vda")
                && target.is_match("sdab")
                && !target.is_match("vd")
                && !target.is_match("nvme0")
        );
        let path = re(ABSOLUTE_PATH_PATTERN);
        assert!(
            path.is_match("/var/lib/virtkube/pools/default")
                && path.is_match("/")
                && !path.is_match("relative/path")
                && !path.is_match("/var//lib")
                && !path.is_match("/var/lib/")
                && !path.is_match("/var/l\tib")
                && !path.is_match("/boot/vmlinuz ")
                && path.is_match("/boot/my kernel")
                && path.is_match("/a")
        );
        let cmdline = re(CMDLINE_PATTERN);
        assert!(
            cmdline.is_match("console=ttyS0 root=/dev/vda1")
                && cmdline.is_match("q")
                && !cmdline.is_match("")
                && !cmdline.is_match(" quiet")
                && !cmdline.is_match("quiet ")
                && !cmdline.is_match("a\nb")
        );
        assert!(
            is_clean_absolute_path("/var/lib/x")
                && is_clean_absolute_path("/")
                && !is_clean_absolute_path("/var/../etc")
                && !is_clean_absolute_path("x/y")
                && !is_clean_absolute_path("/var//lib")
                && !is_clean_absolute_path("/var/lib/")
                && !is_clean_absolute_path("/var/l\nib")
                && !is_clean_absolute_path("/boot/vmlinuz ")
                && !is_clean_absolute_path("/boot/vmlinuz\u{3000}")
        );
    }
}
