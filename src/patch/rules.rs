//! The rules: what each one matches and what it writes, as read from `patches/rules.toml`.
//!
//! Owns the rule format and its validation (every query compiles against tree-sitter-python,
//! every action has what it needs). Knows nothing of files on disk or of the caches.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use serde::Deserialize;
use tree_sitter::Query;

use super::version::VersionRange;

pub const RULES_FORMAT: u32 = 1;

/// What a rule does at the node its query captures as `@target`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Replace the target node with `text`.
    Replace,
    /// Put `text` on its own line(s) after the target statement, at its indentation.
    InsertAfter,
    /// Put `text` as the first statement of the target block (after a docstring).
    PrependBody,
    /// Put `text` as the last statement of the target block.
    AppendBody,
    /// Add `text` as a further base class of the target class definition.
    AddBase,
    /// In the target `from M import ...`: names listed in `names` are imported in a
    /// `try`/`except ImportError` with the given fallback expression (an empty fallback drops the
    /// name). With `module_optional`, the whole statement moves into the `try`.
    OptionalImport,
    /// Wrap the target statement in `try:` and put `text` in `except ImportError as _ocrp_err:`.
    WrapTry,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    pub id: String,
    /// The breakage of `breakages.md` this rule fixes (several rules may fix one breakage).
    pub breakage: String,
    pub title: String,
    /// Releases of transformers on which the unpatched code hits this breakage.
    #[serde(default)]
    pub affects: String,
    /// The remote-code file(s) it edits (a name or a list of names).
    #[serde(deserialize_with = "one_or_many")]
    pub file: Vec<String>,
    pub query: String,
    pub action: Action,
    #[serde(default)]
    pub text: String,
    #[serde(default)]
    pub names: BTreeMap<String, String>,
    #[serde(default)]
    pub module_optional: bool,
    /// How many matches a pinned upstream file must give (default: at least one).
    #[serde(default)]
    pub expect: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RulesFile {
    format: u32,
    ruleset: String,
    #[serde(rename = "rule")]
    rules: Vec<RuleSpec>,
}

/// A rule ready to run: its spec, its parsed range, and its query, compiled at first use (most
/// runs of `apply` meet only files the lock already knows as patched, and compiling the 23
/// queries was most of their start-up).
#[derive(Debug)]
pub struct Rule {
    pub spec: RuleSpec,
    pub affects: VersionRange,
    compiled: OnceLock<Compiled>,
}

#[derive(Debug)]
struct Compiled {
    query: Query,
    target_capture: u32,
}

impl Rule {
    /// The compiled query. [`RuleSet::parse`] has compiled every rule once, so this cannot fail
    /// for a rule set it returned.
    pub fn query(&self) -> &Query {
        &self.compiled().query
    }

    /// The index of the `@target` capture in [`Rule::query`].
    pub fn target_capture(&self) -> u32 {
        self.compiled().target_capture
    }

    fn compiled(&self) -> &Compiled {
        self.compiled.get_or_init(|| {
            compile(&self.spec).unwrap_or_else(|e| unreachable!("rule {} was validated when parsed: {e}", self.spec.id))
        })
    }
}

/// Compiles a rule's query and checks it against its action's text.
fn compile(spec: &RuleSpec) -> Result<Compiled, RulesError> {
    let invalid = |message: String| RulesError::Invalid { id: spec.id.clone(), message };
    let query = Query::new(&python(), &spec.query).map_err(|e| invalid(format!("query does not compile: {e}")))?;
    let target_capture = query.capture_index_for_name("target").ok_or_else(|| invalid("query has no @target capture".into()))?;
    for capture in template_captures(&spec.text) {
        if query.capture_index_for_name(&capture).is_none() {
            return Err(invalid(format!("text uses {{{{{capture}}}}} but the query has no @{capture}")));
        }
    }
    Ok(Compiled { query, target_capture })
}

#[derive(Debug)]
pub struct RuleSet {
    pub name: String,
    /// The rules text as given (fingerprinted into locks).
    pub source: String,
    pub rules: Vec<Rule>,
    pub prelude: String,
}

#[derive(Debug, thiserror::Error)]
pub enum RulesError {
    #[error("{origin}: not a valid rules file: {message}")]
    Parse { origin: String, message: String },
    #[error("{origin}: rules format {found} is not supported (this ocr-patch reads format {RULES_FORMAT})")]
    Format { origin: String, found: u32 },
    #[error("rule {id}: {message}")]
    Invalid { id: String, message: String },
}

pub(crate) fn python() -> tree_sitter::Language {
    tree_sitter_python::LANGUAGE.into()
}

impl RuleSet {
    /// Parses and validates a rules file: every query is compiled and checked.
    pub fn parse(rules_toml: &str, prelude: &str, origin: &str) -> Result<RuleSet, RulesError> {
        let set = RuleSet::parse_lazy(rules_toml, prelude, origin)?;
        for rule in &set.rules {
            let compiled = compile(&rule.spec)?;
            let _ = rule.compiled.set(compiled);
        }
        Ok(set)
    }

    /// Parses a rules file whose queries are known to compile (the one compiled into the binary,
    /// which a test parses with [`RuleSet::parse`]); each query is compiled at its first use.
    pub(crate) fn parse_lazy(rules_toml: &str, prelude: &str, origin: &str) -> Result<RuleSet, RulesError> {
        let file: RulesFile = toml::from_str(rules_toml)
            .map_err(|e| RulesError::Parse { origin: origin.to_string(), message: e.to_string() })?;
        if file.format != RULES_FORMAT {
            return Err(RulesError::Format { origin: origin.to_string(), found: file.format });
        }
        let mut seen = std::collections::HashSet::new();
        let rules = file
            .rules
            .into_iter()
            .map(|spec| {
                let invalid = |message: String| RulesError::Invalid { id: spec.id.clone(), message };
                if !seen.insert(spec.id.clone()) {
                    return Err(invalid("the id is used twice".into()));
                }
                let affects = VersionRange::parse(&spec.affects).map_err(|e| invalid(e.to_string()))?;
                let needs_text = !matches!(spec.action, Action::OptionalImport);
                if needs_text && spec.text.trim().is_empty() {
                    return Err(invalid(format!("action {:?} needs `text`", spec.action)));
                }
                if spec.action == Action::OptionalImport && spec.names.is_empty() && !spec.module_optional {
                    return Err(invalid("optional_import needs `names` or `module_optional`".into()));
                }
                Ok(Rule { spec, affects, compiled: OnceLock::new() })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(RuleSet { name: file.ruleset, source: rules_toml.to_string(), rules, prelude: prelude.to_string() })
    }

    pub fn for_file<'a>(&'a self, file_name: &str) -> impl Iterator<Item = &'a Rule> + 'a {
        let file_name = file_name.to_string();
        self.rules.iter().filter(move |r| r.spec.file.iter().any(|f| *f == file_name))
    }

    /// Every file name some rule targets, sorted, without repeats.
    pub fn file_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.rules.iter().flat_map(|r| r.spec.file.iter().cloned()).collect();
        names.sort();
        names.dedup();
        names
    }

    pub fn targets(&self, file_name: &str) -> bool {
        self.for_file(file_name).next().is_some()
    }
}

fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(name) => vec![name],
        OneOrMany::Many(names) => names,
    })
}

/// The capture names a template refers to: `{{name}}` or `{{name|filter}}`.
pub(crate) fn template_captures(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find("{{") {
        let after = &rest[start + 2..];
        let Some(end) = after.find("}}") else { break };
        let name = after[..end].split('|').next().unwrap_or("").trim().to_string();
        if !name.is_empty() {
            out.push(name);
        }
        rest = &after[end + 2..];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(rule: &str) -> Result<RuleSet, RulesError> {
        RuleSet::parse(&format!("format = 1\nruleset = \"t\"\n[[rule]]\n{rule}"), "", "test")
    }

    #[test]
    fn rejects_rules_that_cannot_run() {
        let base = "id='x'\nbreakage='A'\ntitle='t'\nfile='a.py'\n";
        let err = one(&format!("{base}query='(identifier) @nope'\naction='replace'\ntext='y'")).unwrap_err();
        assert!(err.to_string().contains("no @target"), "{err}");
        let err = one(&format!("{base}query='(identifer) @target'\naction='replace'\ntext='y'")).unwrap_err();
        assert!(err.to_string().contains("does not compile"), "{err}");
        let err = one(&format!("{base}query='(identifier) @target'\naction='replace'\ntext=''")).unwrap_err();
        assert!(err.to_string().contains("needs `text`"), "{err}");
        let err = one(&format!("{base}query='(identifier) @target'\naction='replace'\ntext='{{{{other}}}}'")).unwrap_err();
        assert!(err.to_string().contains("@other"), "{err}");
        let err = one(&format!("{base}query='(identifier) @target'\naction='replace'\ntext='y'\naffects='~4'")).unwrap_err();
        assert!(err.to_string().contains("version range"), "{err}");
        assert!(one(&format!("{base}query='(identifier) @target'\naction='replace'\ntext='y'")).is_ok());
    }

    #[test]
    fn the_embedded_rules_all_compile() {
        // Engine::embedded() compiles queries lazily; this is where they are all checked.
        let set = RuleSet::parse(super::super::RULES_TOML, super::super::PRELUDE_PY, "patches/rules.toml").unwrap();
        assert!(set.rules.len() >= 20);
        let lazy = RuleSet::parse_lazy(super::super::RULES_TOML, super::super::PRELUDE_PY, "patches/rules.toml").unwrap();
        assert!(lazy.rules.iter().all(|r| r.compiled.get().is_none()));
        assert_eq!(lazy.rules[0].target_capture(), set.rules[0].target_capture());
    }

    #[test]
    fn finds_template_captures() {
        assert_eq!(template_captures("a {{obj}}.x({{args|inner}}) {{ b }}"), vec!["obj", "args", "b"]);
        assert!(template_captures("no captures {single}").is_empty());
    }
}
