//! Key templates: `project:{id}`, `{org_id}:{id}`; `{{` and `}}` are literal braces.
//! The default key escapes its values so that distinct primary keys never share a key.

use shapesync_core::{Row, Value};

/// A parsed key template.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyTemplate {
    parts: Vec<Part>,
    /// Escape `\` and `:` in values (the default key), so values cannot forge separators.
    escape: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Part {
    Literal(String),
    Column(String),
}

/// Why a row has no key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyError {
    /// The row does not carry the column.
    Missing(String),
    /// The column is SQL NULL.
    Null(String),
}

impl KeyTemplate {
    /// Parses a template; the error says what is wrong with it.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut parts = Vec::new();
        let mut literal = String::new();
        let mut chars = text.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '{' if chars.peek() == Some(&'{') => {
                    chars.next();
                    literal.push('{');
                }
                '}' if chars.peek() == Some(&'}') => {
                    chars.next();
                    literal.push('}');
                }
                '{' => {
                    let mut column = String::new();
                    loop {
                        match chars.next() {
                            Some('}') => break,
                            Some('{') | None => {
                                return Err("unclosed `{` (write `{{` for a literal brace)".into());
                            }
                            Some(c) => column.push(c),
                        }
                    }
                    if column.is_empty() {
                        return Err("empty `{}` placeholder: name a column, e.g. `{id}`".into());
                    }
                    if !literal.is_empty() {
                        parts.push(Part::Literal(std::mem::take(&mut literal)));
                    }
                    parts.push(Part::Column(column));
                }
                '}' => return Err("unmatched `}` (write `}}` for a literal brace)".into()),
                c => literal.push(c),
            }
        }
        if !literal.is_empty() {
            parts.push(Part::Literal(literal));
        }
        if !parts.iter().any(|p| matches!(p, Part::Column(_))) {
            return Err(
                "the template names no column, so every row would get the same key; add e.g. `{id}`".into()
            );
        }
        Ok(KeyTemplate { parts, escape: false })
    }

    /// The fixed text every key rendered by this template starts with.
    pub fn literal_prefix(&self) -> &str {
        match self.parts.first() {
            Some(Part::Literal(text)) => text,
            _ => "",
        }
    }

    /// `<prefix>` followed by the given columns joined by `:`, each value escaped
    /// (`\` → `\\`, `:` → `\:`), so distinct values always give distinct keys.
    pub fn joined(prefix: &str, columns: &[&str]) -> Self {
        let mut parts = Vec::new();
        if !prefix.is_empty() {
            parts.push(Part::Literal(prefix.to_owned()));
        }
        for (i, column) in columns.iter().enumerate() {
            if i > 0 {
                parts.push(Part::Literal(":".into()));
            }
            parts.push(Part::Column((*column).to_owned()));
        }
        KeyTemplate { parts, escape: true }
    }

    /// A `SCAN … MATCH` pattern for every key this template can render: its literals
    /// (glob characters escaped) with `*` for each column.
    pub fn glob(&self) -> String {
        self.parts
            .iter()
            .map(|part| match part {
                Part::Literal(text) => escape_glob(text),
                Part::Column(_) => "*".to_owned(),
            })
            .collect()
    }

    /// The columns the template reads.
    pub fn columns(&self) -> impl Iterator<Item = &str> {
        self.parts.iter().filter_map(|p| match p {
            Part::Column(c) => Some(c.as_str()),
            Part::Literal(_) => None,
        })
    }

    /// The key of `row`: literals as written, columns by [`Value::render`] (escaped in
    /// the default key).
    pub fn render(&self, row: &Row) -> Result<String, KeyError> {
        let mut key = String::new();
        for part in &self.parts {
            match part {
                Part::Literal(s) => key.push_str(s),
                Part::Column(c) => {
                    let value = row.get(c).ok_or_else(|| KeyError::Missing(c.clone()))?;
                    let text = Value::render(value).ok_or_else(|| KeyError::Null(c.clone()))?;
                    if self.escape {
                        for ch in text.chars() {
                            if matches!(ch, '\\' | ':') {
                                key.push('\\');
                            }
                            key.push(ch);
                        }
                    } else {
                        key.push_str(&text);
                    }
                }
            }
        }
        Ok(key)
    }
}

/// `text` as a glob (`SCAN … MATCH`) that matches only itself.
pub fn escape_glob(text: &str) -> String {
    let mut pattern = String::with_capacity(text.len());
    for ch in text.chars() {
        if matches!(ch, '*' | '?' | '[' | ']' | '\\') {
            pattern.push('\\');
        }
        pattern.push(ch);
    }
    pattern
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(pairs: &[(&str, Value)]) -> Row {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), v.clone())).collect()
    }

    #[test]
    fn renders_composite_keys_and_escaped_braces() {
        let t = KeyTemplate::parse("org:{org}:{{x}}:{id}").unwrap();
        assert_eq!(t.columns().collect::<Vec<_>>(), ["org", "id"]);
        let r = row(&[("org", Value::Text("acme".into())), ("id", Value::Int(7))]);
        assert_eq!(t.render(&r).unwrap(), "org:acme:{x}:7");
    }

    #[test]
    fn globs_match_every_key_a_template_renders() {
        let t = KeyTemplate::parse("org:{org}:p[{{x}}]*:{id}").unwrap();
        assert_eq!(t.glob(), r"org:*:p\[{x}\]\*:*");
        assert_eq!(KeyTemplate::joined("items:", &["a", "b"]).glob(), "items:*:*");
    }

    #[test]
    fn rejects_bad_templates() {
        for bad in ["p:{id", "p:}", "p:{}", "static", "{a{b}}"] {
            assert!(KeyTemplate::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn missing_and_null_columns_are_errors() {
        let t = KeyTemplate::joined("items:", &["a", "b"]);
        assert_eq!(t.render(&row(&[("a", Value::Int(1))])), Err(KeyError::Missing("b".into())));
        let r = row(&[("a", Value::Int(1)), ("b", Value::Null)]);
        assert_eq!(t.render(&r), Err(KeyError::Null("b".into())));
        let r = row(&[("a", Value::Int(1)), ("b", Value::Bool(true))]);
        assert_eq!(t.render(&r).unwrap(), "items:1:true");
    }

    #[test]
    fn default_keys_escape_separators_and_templates_do_not() {
        let t = KeyTemplate::joined("t:", &["a", "b"]);
        let text = |a: &str, b: &str| row(&[("a", Value::Text(a.into())), ("b", Value::Text(b.into()))]);
        assert_eq!(t.render(&text("a:b", "c")).unwrap(), r"t:a\:b:c");
        assert_eq!(t.render(&text("a", "b:c")).unwrap(), r"t:a:b\:c");
        assert_eq!(t.render(&text(r"a\", "b")).unwrap(), r"t:a\\:b");
        assert_eq!(t.render(&text("a", r"\:b")).unwrap(), r"t:a:\\\:b");
        let user = KeyTemplate::parse("t:{a}:{b}").unwrap();
        assert_eq!(user.render(&text("a:b", r"c\")).unwrap(), r"t:a:b:c\");
    }
}
