//! Relation names and identifier lists read as Postgres (and Electric's `table` and
//! `columns` parameters) read them: unquoted parts in lower case, quoted ones exactly.
//! Shared by the shape server, which parses shape requests, and the SQL-table sinks,
//! which name their tables after the shape's.

/// Splits a possibly schema-qualified, possibly quoted relation name into its schema and
/// table, as Postgres reads them; `None` when it is not one (see [`split_identifiers`];
/// more than two parts).
pub fn parse_relation(name: &str) -> Option<(Option<String>, String)> {
    let mut parts = split_identifiers(name, '.')?;
    let table = parts.pop()?;
    match parts.len() {
        0 => Some((None, table)),
        1 => Some((parts.pop(), table)),
        _ => None,
    }
}

/// Splits a `sep`-separated list of identifiers (`a.b`, `id, "Name"`) as Postgres reads
/// them: `"quoted"` parts exactly (`""` is a quote), unquoted ones trimmed and in lower
/// case, made only of letters, digits, `_` and `$` (not first). `None` for anything else:
/// an empty part, an unclosed quote, text after a closing quote, other characters.
pub fn split_identifiers(list: &str, sep: char) -> Option<Vec<String>> {
    let mut parts = Vec::new();
    let mut chars = list.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut part = String::new();
        if chars.next_if_eq(&'"').is_some() {
            loop {
                match chars.next()? {
                    '"' if chars.next_if_eq(&'"').is_some() => part.push('"'),
                    '"' => break,
                    c => part.push(c),
                }
            }
            if part.is_empty() {
                return None;
            }
        } else {
            while let Some(c) = chars.next_if(|c| *c != sep && !c.is_whitespace()) {
                let allowed =
                    c.is_alphabetic() || c == '_' || (!part.is_empty() && (c.is_ascii_digit() || c == '$'));
                if !allowed {
                    return None;
                }
                part.extend(c.to_lowercase());
            }
            if part.is_empty() {
                return None;
            }
        }
        parts.push(part);
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        match chars.next() {
            None => return Some(parts),
            Some(c) if c == sep => {}
            Some(_) => return None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relations_and_identifier_lists_read_quotes_as_postgres_does() {
        assert_eq!(
            parse_relation("Items"),
            Some((None, "items".into())),
            "unquoted names fold to lower case"
        );
        assert_eq!(
            parse_relation(r#"public."we.ird ""t""""#),
            Some((Some("public".into()), r#"we.ird "t""#.into()))
        );
        assert_eq!(parse_relation(r#""unclosed"#), None);
        assert_eq!(parse_relation("a.b.c"), None);
        assert_eq!(parse_relation("a..b"), None);
        assert_eq!(
            split_identifiers(r#"id, "Na,me" ,x"#, ','),
            Some(vec!["id".into(), "Na,me".into(), "x".into()])
        );
        assert_eq!(split_identifiers("id,,x", ','), None);
        assert_eq!(split_identifiers(r#""""#, ','), None);
    }
}
