//! Field descriptions as prose.
//!
//! Descriptions come from doc comments, whose lines are broken at the source's width.
//! `kubectl explain` prints a description's line breaks as they are and wraps the lines
//! again itself, so kept breaks cut sentences in the middle ("A vCPU not / listed floats…").
//! [`as_prose`] joins the lines of each paragraph; paragraphs and list items stay apart.

/// `text` with the line breaks inside each paragraph replaced by a space: a blank line still
/// separates paragraphs, a line starting with `- `, `* ` or `1. ` still starts a list item (its
/// continuation lines join it), and a fenced code block (```` ``` ````) is kept as written.
pub fn as_prose(text: &str) -> String {
    let mut paragraphs: Vec<String> = Vec::new();
    let mut lines = text.lines().peekable();
    while lines.peek().is_some() {
        // Skip the blank lines between paragraphs.
        while lines.next_if(|l| l.trim().is_empty()).is_some() {}
        let Some(first) = lines.next() else { break };
        if first.trim_start().starts_with("```") {
            let mut block = vec![first];
            for line in lines.by_ref() {
                block.push(line);
                if line.trim_start().starts_with("```") {
                    break;
                }
            }
            paragraphs.push(block.join("\n"));
            continue;
        }
        let mut items = vec![first.trim().to_string()];
        while let Some(line) = lines.next_if(|l| !l.trim().is_empty()) {
            let line = line.trim();
            if starts_list_item(line) {
                items.push(line.to_string());
            } else if let Some(last) = items.last_mut() {
                last.push(' ');
                last.push_str(line);
            }
        }
        paragraphs.push(items.join("\n"));
    }
    paragraphs.join("\n\n")
}

/// Whether `description` reads as prose: no line break inside a paragraph except before a
/// list item or inside a code block. Returns the first offending line.
pub fn broken_line(description: &str) -> Option<&str> {
    let mut in_code = false;
    let mut previous_blank = true;
    for line in description.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with("```") {
            in_code = !in_code;
        } else if !in_code && !trimmed.is_empty() && !previous_blank && !starts_list_item(trimmed) {
            return Some(line);
        }
        previous_blank = trimmed.is_empty();
    }
    None
}

fn starts_list_item(line: &str) -> bool {
    if line.starts_with("- ") || line.starts_with("* ") {
        return true;
    }
    let digits = line.chars().take_while(char::is_ascii_digit).count();
    digits > 0 && line[digits..].starts_with(". ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn joins_lines_and_keeps_paragraphs() {
        let doc = "Per-vCPU pinning to host CPUs, keyed by `vcpu`. A vCPU not\nlisted floats over the host's CPUs.\n\nExample: vCPU 0 on host CPU 2,\nvCPU 1 on 3.";
        assert_eq!(
            as_prose(doc),
            "Per-vCPU pinning to host CPUs, keyed by `vcpu`. A vCPU not listed floats over the host's CPUs.\n\nExample: vCPU 0 on host CPU 2, vCPU 1 on 3."
        );
        assert_eq!(
            broken_line(doc),
            Some("listed floats over the host's CPUs.")
        );
        assert_eq!(broken_line(&as_prose(doc)), None);
    }

    #[test]
    fn keeps_list_items_on_their_own_lines() {
        let doc = "What the drain does:\n- `LiveMigrate`: the drain waits\n  for a migration;\n* `Shutdown`: stops it.\n1. numbered\n\n\n\nAfter.";
        let prose = as_prose(doc);
        assert_eq!(
            prose,
            "What the drain does:\n- `LiveMigrate`: the drain waits for a migration;\n* `Shutdown`: stops it.\n1. numbered\n\nAfter."
        );
        assert_eq!(broken_line(&prose), None);
    }

    #[test]
    fn keeps_code_blocks_and_single_lines() {
        let doc = "Set it like this:\n\n```yaml\ncpu:\n  vcpus: 2\n```\nThen apply.";
        assert_eq!(
            as_prose(doc),
            "Set it like this:\n\n```yaml\ncpu:\n  vcpus: 2\n```\n\nThen apply."
        );
        assert_eq!(broken_line(&as_prose(doc)), None);
        assert_eq!(as_prose("One line."), "One line.");
        assert_eq!(as_prose(""), "");
    }
}
