//! Printing a plan the way a reviewer wants to read it: one block per object, a mark per
//! step (`+` create, `~` live change, `!` restart, `-` delete), field-level before → after.

use std::fmt::Write as _;

use super::{Plan, Symbol};

/// A size in KiB, in the largest binary unit that divides it (`512Mi`, `1Gi`).
pub fn kib(kib: u64) -> String {
    bytes(kib.saturating_mul(1024))
}

/// A size in bytes, in the largest binary unit that divides it.
pub fn bytes(b: u64) -> String {
    const UNITS: [(&str, u64); 5] = [
        ("Pi", 1 << 50),
        ("Ti", 1 << 40),
        ("Gi", 1 << 30),
        ("Mi", 1 << 20),
        ("Ki", 1 << 10),
    ];
    for (unit, size) in UNITS {
        if b >= size && b.is_multiple_of(size) {
            return format!("{}{unit}", b / size);
        }
    }
    b.to_string()
}

/// Counts by mark.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Summary {
    /// Objects created.
    pub create: usize,
    /// Objects changed live.
    pub live: usize,
    /// Objects restarted.
    pub restart: usize,
    /// Objects deleted.
    pub delete: usize,
}

impl Plan {
    /// Objects per mark (an object counts once, under its strongest mark).
    pub fn summary(&self) -> Summary {
        let mut s = Summary::default();
        for (symbol, _) in self.grouped() {
            match symbol {
                Symbol::Create => s.create += 1,
                Symbol::Live => s.live += 1,
                Symbol::Restart => s.restart += 1,
                Symbol::Delete => s.delete += 1,
            }
        }
        s
    }

    /// Actions grouped per (node, object), in plan order of first appearance, with the mark
    /// of the group.
    fn grouped(&self) -> Vec<(Symbol, Vec<&super::Action>)> {
        let mut groups: Vec<(Symbol, Vec<&super::Action>)> = Vec::new();
        let mut index = std::collections::HashMap::new();
        for action in &self.actions {
            let key = (
                action.node.clone(),
                action.object.clone(),
                action.symbol == Symbol::Delete,
            );
            match index.get(&key) {
                Some(&i) => {
                    let (symbol, list): &mut (Symbol, Vec<&super::Action>) = &mut groups[i];
                    list.push(action);
                    if *symbol == Symbol::Live && action.symbol == Symbol::Restart {
                        *symbol = Symbol::Restart;
                    }
                }
                None => {
                    index.insert(key, groups.len());
                    groups.push((action.symbol, vec![action]));
                }
            }
        }
        groups
    }

    /// The plan as text; `multi_node` adds the node to each object.
    pub fn render(&self, multi_node: bool) -> String {
        let mut out = String::new();
        for (symbol, actions) in self.grouped() {
            let first = actions[0];
            let node = if multi_node {
                format!("  (node {})", first.node)
            } else {
                String::new()
            };
            let _ = writeln!(out, "{} {}{node}", symbol.mark(), first.object);
            for a in actions {
                let _ = writeln!(out, "    {} {}: {}", a.symbol.mark(), a.op.verb(), a.reason);
                for c in &a.changes {
                    let _ = writeln!(out, "        {}: {} → {}", c.field, c.before, c.after);
                }
            }
        }
        for n in &self.notices {
            let mark = match n.kind {
                super::NoticeKind::RestartPending => '!',
                k if k.is_error() => 'x',
                _ => '=',
            };
            let node = if multi_node && !n.node.is_empty() {
                format!("  (node {})", n.node)
            } else {
                String::new()
            };
            let _ = writeln!(
                out,
                "{mark} {}{node}: {}: {}",
                n.object,
                n.kind.label(),
                n.message
            );
            for c in &n.changes {
                let _ = writeln!(out, "        {}: {} → {}", c.field, c.before, c.after);
            }
        }
        let s = self.summary();
        let pending = self
            .notices
            .iter()
            .filter(|n| n.kind == super::NoticeKind::RestartPending)
            .count();
        let errors = self.notices.iter().filter(|n| n.kind.is_error()).count();
        let notes_only = self
            .notices
            .iter()
            .all(|n| n.kind == super::NoticeKind::Note);
        if self.actions.is_empty() && notes_only {
            out.push_str("No changes: the hosts match the manifests.\n");
        } else {
            let _ = writeln!(
                out,
                "Plan: {} to create, {} to change live, {} to restart, {} to delete; {} waiting for a restart; {} error{}.",
                s.create,
                s.live,
                s.restart,
                s.delete,
                pending,
                errors,
                if errors == 1 { "" } else { "s" }
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_print_in_the_largest_exact_unit() {
        assert_eq!(kib(512 * 1024), "512Mi");
        assert_eq!(kib(1024 * 1024), "1Gi");
        assert_eq!(bytes(1536), "1536");
        assert_eq!(bytes(4 << 30), "4Gi");
        assert_eq!(bytes(1000), "1000");
    }
}
