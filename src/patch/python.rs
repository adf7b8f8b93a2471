//! Python source, losslessly edited: parse with tree-sitter, turn rule matches into edits
//! (byte range + replacement text), splice them into the original bytes, re-parse the result.
//!
//! Owns: the syntax tree, indentation, templates, the edit list and its overlap check. Every byte
//! outside an edit's range stays as it was. Knows nothing of hashes, locks or files on disk.

use std::collections::HashMap;

use streaming_iterator::StreamingIterator;
use tree_sitter::{Node, Parser, QueryCursor, Tree};

use super::rules::{python, Action, Rule};

/// A change to the source: replace `start..end` with `text` (an insertion when `start == end`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Edit {
    pub start: usize,
    pub end: usize,
    pub text: String,
    /// The rule (or `prelude` / `marker`) that asked for it.
    pub rule: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EditError {
    #[error("line {line}, column {column}: Python syntax error")]
    Syntax { line: usize, column: usize },
    #[error("rules {first} and {second} edit overlapping bytes ({start}..{end})")]
    Overlap { first: String, second: String, start: usize, end: usize },
    #[error("rule {rule}: {message}")]
    Rule { rule: String, message: String },
}

pub fn parse(src: &[u8]) -> Result<Tree, EditError> {
    let mut parser = Parser::new();
    parser
        .set_language(&python())
        .map_err(|e| EditError::Rule { rule: "parser".into(), message: e.to_string() })?;
    let tree = parser.parse(src, None).ok_or(EditError::Syntax { line: 1, column: 1 })?;
    if let Some(bad) = first_error(tree.root_node()) {
        let p = bad.start_position();
        return Err(EditError::Syntax { line: p.row + 1, column: p.column + 1 });
    }
    Ok(tree)
}

fn first_error(node: Node) -> Option<Node> {
    if !node.has_error() {
        return None;
    }
    if node.is_error() || node.is_missing() {
        return Some(node);
    }
    let mut cursor = node.walk();
    let children: Vec<Node> = node.children(&mut cursor).collect();
    children.into_iter().find_map(first_error).or(Some(node))
}

fn text<'a>(src: &'a [u8], node: Node) -> &'a str {
    std::str::from_utf8(&src[node.byte_range()]).unwrap_or("")
}

/// The whitespace that starts the line holding `byte`.
fn line_indent(src: &[u8], byte: usize) -> String {
    let line_start = src[..byte].iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    src[line_start..].iter().take_while(|&&b| b == b' ' || b == b'\t').map(|&b| b as char).collect()
}

/// Where to insert after `node` so that its trailing comment stays with it: the end of its line
/// when only whitespace or a comment follows it there, else right after the node.
fn after_line_of(src: &[u8], node: Node) -> usize {
    let end = node.end_byte();
    let line_end = src[end..].iter().position(|&b| b == b'\n').map_or(src.len(), |i| end + i);
    let rest = String::from_utf8_lossy(&src[end..line_end]);
    let rest = rest.trim_start();
    if rest.is_empty() || rest.starts_with('#') {
        end + src[end..line_end].iter().rposition(|b| !b.is_ascii_whitespace()).map_or(0, |i| i + 1)
    } else {
        end
    }
}

/// Prefixes every line but the first with `indent` (blank lines stay blank).
fn reindent(text: &str, indent: &str) -> String {
    let mut out = String::with_capacity(text.len() + 16);
    for (i, line) in text.trim_end_matches('\n').split('\n').enumerate() {
        if i > 0 {
            out.push('\n');
            if !line.trim().is_empty() {
                out.push_str(indent);
            }
        }
        out.push_str(line);
    }
    out
}

/// Fills `{{capture}}` and `{{capture|inner}}` (the text without its first and last character,
/// e.g. an argument list without parentheses).
fn render(template: &str, captures: &HashMap<String, String>) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = template.trim_end_matches('\n');
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after.find("}}").ok_or("unclosed {{ in text")?;
        let mut parts = after[..end].split('|').map(str::trim);
        let name = parts.next().unwrap_or("");
        let value = captures.get(name).ok_or_else(|| format!("no capture @{name}"))?;
        match parts.next() {
            None => out.push_str(value),
            Some("inner") if value.len() >= 2 => out.push_str(&value[1..value.len() - 1]),
            Some(filter) => return Err(format!("unknown template filter `{filter}`")),
        }
        rest = &after[end + 2..];
    }
    out.push_str(rest);
    Ok(out)
}

/// The statements of a block, without comments.
fn statements(block: Node) -> Vec<Node> {
    let mut cursor = block.walk();
    block.named_children(&mut cursor).filter(|n| n.kind() != "comment").collect()
}

fn is_docstring(node: Node) -> bool {
    node.kind() == "expression_statement"
        && node.named_child_count() == 1
        && node.named_child(0).is_some_and(|c| c.kind() == "string")
}

fn body_block(node: Node) -> Option<Node> {
    if node.kind() == "block" {
        Some(node)
    } else {
        node.child_by_field_name("body").filter(|b| b.kind() == "block")
    }
}

/// Where a module-level prelude goes: before the first statement that is not the module
/// docstring or a `from __future__` import.
pub fn prelude_offset(tree: &Tree, src: &[u8]) -> usize {
    let root = tree.root_node();
    statements(root)
        .into_iter()
        .find(|s| {
            !is_docstring(*s)
                && !(s.kind() == "future_import_statement"
                    || (s.kind() == "import_from_statement" && text(src, *s).starts_with("from __future__")))
        })
        .map_or(src.len(), |s| s.start_byte())
}

/// The edits one rule asks for on this tree, and how many places it matched.
pub fn rule_edits(rule: &Rule, tree: &Tree, src: &[u8]) -> Result<(Vec<Edit>, usize), EditError> {
    let fail = |message: String| EditError::Rule { rule: rule.spec.id.clone(), message };
    let query = rule.query();
    let names = query.capture_names();
    let mut cursor = QueryCursor::new();
    let mut matches = cursor.matches(query, tree.root_node(), src);
    let mut edits = Vec::new();
    let mut targets_seen = std::collections::HashSet::new();
    while let Some(m) = matches.next() {
        let mut captures = HashMap::new();
        let mut target = None;
        for c in m.captures {
            captures.entry(names[c.index as usize].to_string()).or_insert_with(|| text(src, c.node).to_string());
            if c.index == rule.target_capture() {
                target = Some(c.node);
            }
        }
        let Some(target) = target else { continue };
        if !targets_seen.insert(target.byte_range()) {
            continue;
        }
        let edit = action_edit(rule, target, &captures, src).map_err(fail)?;
        if let Some(edit) = edit {
            edits.push(edit);
        }
    }
    let count = edits.len();
    Ok((edits, count))
}

fn action_edit(
    rule: &Rule,
    target: Node,
    captures: &HashMap<String, String>,
    src: &[u8],
) -> Result<Option<Edit>, String> {
    let spec = &rule.spec;
    let indent = line_indent(src, target.start_byte());
    let edit = |start: usize, end: usize, text: String| Some(Edit { start, end, text, rule: spec.id.clone() });
    let rendered = || render(&spec.text, captures);
    Ok(match spec.action {
        Action::Replace => edit(target.start_byte(), target.end_byte(), reindent(&rendered()?, &indent)),
        Action::InsertAfter => {
            let body = reindent(&rendered()?, &indent);
            let at = after_line_of(src, target);
            edit(at, at, format!("\n{indent}{body}"))
        }
        Action::PrependBody | Action::AppendBody => {
            let block = body_block(target).ok_or("the target has no indented body")?;
            let stmts = statements(block);
            let first = stmts.iter().copied().find(|s| !is_docstring(*s)).ok_or("the body is empty")?;
            let inner = line_indent(src, first.start_byte());
            if first.start_position().row == target.start_position().row {
                return Err("the body is on the same line as its header".into());
            }
            let body = reindent(&rendered()?, &inner);
            if spec.action == Action::PrependBody {
                edit(first.start_byte(), first.start_byte(), format!("{body}\n{inner}"))
            } else {
                let last = *stmts.last().ok_or("the body is empty")?;
                let at = after_line_of(src, last);
                edit(at, at, format!("\n{inner}{body}"))
            }
        }
        Action::AddBase => {
            if target.kind() != "class_definition" {
                return Err(format!("add_base needs a class_definition, got {}", target.kind()));
            }
            let base = rendered()?;
            match target.child_by_field_name("superclasses") {
                Some(list) if list.named_child_count() > 0 => {
                    edit(list.end_byte() - 1, list.end_byte() - 1, format!(", {base}"))
                }
                Some(list) => edit(list.start_byte(), list.end_byte(), format!("({base})")),
                None => {
                    let name = target.child_by_field_name("name").ok_or("class without a name")?;
                    edit(name.end_byte(), name.end_byte(), format!("({base})"))
                }
            }
        }
        Action::OptionalImport => optional_import(rule, target, src, &indent)?
            .map(|text| Edit { start: target.start_byte(), end: target.end_byte(), text, rule: spec.id.clone() }),
        Action::WrapTry => {
            let stmt = reindent(text(src, target), &format!("{indent}    "));
            let handler = reindent(&rendered()?, &format!("{indent}    "));
            edit(
                target.start_byte(),
                target.end_byte(),
                format!("try:\n{indent}    {stmt}\n{indent}except ImportError as _ocrp_err:\n{indent}    {handler}"),
            )
        }
    })
}

/// Rewrites `from M import a, b, c` so that the names the rule lists are imported only if they
/// exist, with a fallback otherwise. Returns None when the statement imports none of them.
fn optional_import(rule: &Rule, stmt: Node, src: &[u8], indent: &str) -> Result<Option<String>, String> {
    if stmt.kind() != "import_from_statement" {
        return Err(format!("optional_import needs an import_from_statement, got {}", stmt.kind()));
    }
    let spec = &rule.spec;
    let module = stmt.child_by_field_name("module_name").map(|m| text(src, m)).ok_or("import without a module")?;
    let mut cursor = stmt.walk();
    let imported: Vec<(String, String)> = stmt
        .children_by_field_name("name", &mut cursor)
        .map(|n| {
            // `x as y` binds y; plain `x` binds x.
            let bound = n.child_by_field_name("alias").or(n.child_by_field_name("name")).unwrap_or(n);
            (text(src, n).to_string(), text(src, bound).to_string())
        })
        .collect();
    let fallback = |bound: &str| spec.names.get(bound);
    let guard = |what: &str, name: &str, value: &str| {
        format!("try:\n{indent}    {what}\n{indent}except ImportError:\n{indent}    {name} = {value}")
    };
    if spec.module_optional {
        let mut missing = Vec::new();
        let mut assigns = Vec::new();
        for (_, bound) in &imported {
            match fallback(bound) {
                Some(v) if !v.is_empty() => assigns.push(format!("{indent}    {bound} = {v}")),
                _ => missing.push(bound.clone()),
            }
        }
        if !missing.is_empty() {
            return Err(format!("module_optional needs a fallback for {}", missing.join(", ")));
        }
        let body = reindent(text(src, stmt), &format!("{indent}    "));
        return Ok(Some(format!("try:\n{indent}    {body}\n{indent}except ImportError:\n{}", assigns.join("\n"))));
    }
    if !imported.iter().any(|(_, bound)| fallback(bound).is_some()) {
        return Ok(None);
    }
    let kept: Vec<&str> =
        imported.iter().filter(|(_, bound)| fallback(bound).is_none()).map(|(full, _)| full.as_str()).collect();
    let mut parts = Vec::new();
    if !kept.is_empty() {
        let parenthesised = text(src, stmt).contains('(');
        parts.push(if parenthesised {
            let lines: String = kept.iter().map(|k| format!("{indent}    {k},\n")).collect();
            format!("from {module} import (\n{lines}{indent})")
        } else {
            format!("from {module} import {}", kept.join(", "))
        });
    }
    for (full, bound) in &imported {
        if let Some(value) = fallback(bound).filter(|v| !v.is_empty()) {
            parts.push(guard(&format!("from {module} import {full}"), bound, value));
        }
    }
    if parts.is_empty() {
        parts.push(format!("pass  # ocr-patch {}: nothing left to import from {module}", spec.id));
    }
    Ok(Some(parts.join(&format!("\n{indent}"))))
}

/// Applies the edits to `src`. Identical edits collapse into one; overlapping ones are an error.
/// Insertions at one offset keep the order they were given in.
pub fn splice(src: &[u8], mut edits: Vec<Edit>) -> Result<Vec<u8>, EditError> {
    // Stable sort keeps the given order among insertions at the same offset.
    edits.sort_by_key(|e| (e.start, e.end));
    edits.dedup_by(|b, a| a.start == b.start && a.end == b.end && a.text == b.text);
    for pair in edits.windows(2) {
        let (a, b) = (&pair[0], &pair[1]);
        let both_replace_from_one_offset = a.start == b.start && a.end > a.start && b.end > b.start;
        if b.start < a.end || both_replace_from_one_offset {
            return Err(EditError::Overlap {
                first: a.rule.clone(),
                second: b.rule.clone(),
                start: b.start,
                end: a.end.max(b.end),
            });
        }
    }
    let mut out = Vec::with_capacity(src.len() + edits.iter().map(|e| e.text.len()).sum::<usize>());
    let mut at = 0;
    for e in &edits {
        out.extend_from_slice(&src[at..e.start]);
        out.extend_from_slice(e.text.as_bytes());
        at = e.end;
    }
    out.extend_from_slice(&src[at..]);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(start: usize, end: usize, text: &str, rule: &str) -> Edit {
        Edit { start, end, text: text.into(), rule: rule.into() }
    }

    #[test]
    fn splice_keeps_untouched_bytes() {
        let out = splice(b"abcdef", vec![e(1, 2, "X", "r1"), e(4, 4, "--", "r2")]).unwrap();
        assert_eq!(out, b"aXcd--ef");
    }

    #[test]
    fn identical_edits_apply_once_overlapping_ones_fail() {
        let out = splice(b"abc", vec![e(0, 1, "Z", "r1"), e(0, 1, "Z", "r1")]).unwrap();
        assert_eq!(out, b"Zbc");
        let err = splice(b"abcdef", vec![e(0, 3, "Z", "r1"), e(2, 4, "Y", "r2")]).unwrap_err();
        assert!(matches!(err, EditError::Overlap { .. }), "{err:?}");
        let err = splice(b"abcdef", vec![e(0, 3, "Z", "r1"), e(0, 3, "Y", "r2")]).unwrap_err();
        assert!(matches!(err, EditError::Overlap { .. }), "{err:?}");
    }

    #[test]
    fn insertions_at_one_offset_keep_their_order() {
        let out = splice(b"ab", vec![e(1, 1, "1", "a"), e(1, 1, "2", "b"), e(1, 2, "B", "c")]).unwrap();
        assert_eq!(out, b"a12B");
    }

    #[test]
    fn parse_reports_where_the_syntax_breaks() {
        assert!(parse(b"def f():\n    return 1\n").is_ok());
        let err = parse(b"def f(:\n    return 1\n").unwrap_err();
        assert!(matches!(err, EditError::Syntax { line: 1, .. }), "{err:?}");
    }

    #[test]
    fn render_fills_captures_and_filters() {
        let caps: HashMap<String, String> =
            [("obj".to_string(), "cache".to_string()), ("args".to_string(), "(a, b)".to_string())].into();
        assert_eq!(render("f({{obj}}, {{args|inner}})", &caps).unwrap(), "f(cache, a, b)");
        assert!(render("{{nope}}", &caps).is_err());
        assert!(render("{{obj|upper}}", &caps).is_err());
    }

    #[test]
    fn reindent_leaves_blank_lines_blank() {
        assert_eq!(reindent("a\n\nb\n", "    "), "a\n\n    b");
    }
}
