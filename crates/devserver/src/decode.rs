//! Parsing of the `test_decoding` output plugin's lines: transaction boundaries and row
//! changes with their columns' values in Postgres text form.

/// One line of `test_decoding` output.
#[derive(Debug, PartialEq)]
pub enum Line {
    /// `BEGIN <xid>` (the 32-bit transaction id; `None` when the plugin leaves it out).
    Begin(Option<u32>),
    /// `COMMIT <xid>`.
    Commit,
    /// A row change of table `schema.table`.
    Change {
        /// The table's schema.
        schema: String,
        /// The table's name.
        table: String,
        /// What happened.
        change: RowChange,
    },
    /// `TRUNCATE` of one or more tables (test_decoding names them all in one line).
    Truncate(Vec<(String, String)>),
}

/// Column name → value (`None` = NULL); columns whose value did not change and was not
/// logged (TOASTed) are left out.
pub type Columns = Vec<(String, Option<String>)>;

/// A row change.
#[derive(Debug, PartialEq)]
pub enum RowChange {
    /// A new row, every column.
    Insert(Columns),
    /// The new row; `old_key` holds the old key columns when the key changed (or, under
    /// `REPLICA IDENTITY FULL`, the old row); `unchanged` names the columns left out of
    /// `new` because their TOASTed value did not change.
    Update { old_key: Option<Columns>, new: Columns, unchanged: Vec<String> },
    /// The key columns of the removed row (`None`: the table has no replica identity).
    Delete(Option<Columns>),
}

/// Why a line could not be read.
#[derive(Debug, thiserror::Error)]
#[error("cannot read test_decoding line {line:?}: {reason}")]
pub struct DecodeError {
    line: String,
    reason: &'static str,
}

/// Parses one line.
pub fn parse_line(line: &str) -> Result<Line, DecodeError> {
    let err = |reason| DecodeError { line: line.to_owned(), reason };
    if let Some(rest) = line.strip_prefix("BEGIN") {
        return Ok(Line::Begin(rest.trim().parse().ok()));
    }
    if line.starts_with("COMMIT") {
        return Ok(Line::Commit);
    }
    let rest = line.strip_prefix("table ").ok_or_else(|| err("expected BEGIN, COMMIT or table"))?;
    let mut cursor = Cursor { text: rest };
    let mut tables = vec![cursor.qualified_name().ok_or_else(|| err("bad table name"))?];
    while cursor.eat(", ") {
        tables.push(cursor.qualified_name().ok_or_else(|| err("bad table name"))?);
    }
    if !cursor.eat(": ") {
        return Err(err("expected `: ` after the table name"));
    }
    if cursor.eat("TRUNCATE:") {
        return Ok(Line::Truncate(tables));
    }
    let (schema, table) = tables.remove(0);
    let change = if cursor.eat("INSERT: ") {
        RowChange::Insert(cursor.columns().ok_or_else(|| err("bad columns"))?)
    } else if cursor.eat("UPDATE: ") {
        let old_key = match cursor.eat("old-key: ") {
            true => Some(cursor.columns_until("new-tuple: ").ok_or_else(|| err("bad old key"))?.0),
            false => None,
        };
        let (new, unchanged) = cursor.tuple().ok_or_else(|| err("bad new tuple"))?;
        RowChange::Update { old_key, new, unchanged }
    } else if cursor.eat("DELETE: ") {
        if cursor.eat("(no-tuple-data)") {
            RowChange::Delete(None)
        } else {
            RowChange::Delete(Some(cursor.columns().ok_or_else(|| err("bad key"))?))
        }
    } else {
        return Err(err("unknown operation"));
    };
    Ok(Line::Change { schema, table, change })
}

struct Cursor<'a> {
    text: &'a str,
}

impl Cursor<'_> {
    fn eat(&mut self, prefix: &str) -> bool {
        match self.text.strip_prefix(prefix) {
            Some(rest) => {
                self.text = rest;
                true
            }
            None => false,
        }
    }

    /// Text in `quote`s with doubled quotes inside (`"a""b"`, `'it''s'`), or `None` when
    /// the text does not start with `quote` or never closes.
    fn quoted(&mut self, quote: char) -> Option<String> {
        let rest = self.text.strip_prefix(quote)?;
        let mut out = String::new();
        let mut chars = rest.char_indices();
        while let Some((i, c)) = chars.next() {
            if c != quote {
                out.push(c);
            } else if rest[i + 1..].starts_with(quote) {
                out.push(quote);
                chars.next();
            } else {
                self.text = &rest[i + 1..];
                return Some(out);
            }
        }
        None
    }

    /// An identifier, quoted (`"a""b"`) or bare (up to `stop`).
    fn identifier(&mut self, stop: &[char]) -> Option<String> {
        if self.text.starts_with('"') {
            return self.quoted('"');
        }
        let end = self.text.find(stop).unwrap_or(self.text.len());
        let (name, rest) = self.text.split_at(end);
        self.text = rest;
        (!name.is_empty()).then(|| name.to_owned())
    }

    fn qualified_name(&mut self) -> Option<(String, String)> {
        let schema = self.identifier(&['.'])?;
        if !self.eat(".") {
            return None;
        }
        let table = self.identifier(&[':', ','])?;
        Some((schema, table))
    }

    /// `name[type]:value` pairs separated by spaces, to the end of the line (without
    /// the unchanged TOASTed ones, which only updates have).
    fn columns(&mut self) -> Option<Columns> {
        self.tuple().map(|(columns, _)| columns)
    }

    /// The pairs to the end of the line, and the names of the unchanged TOASTed ones.
    fn tuple(&mut self) -> Option<(Columns, Vec<String>)> {
        self.columns_until("\u{0}")
    }

    /// Pairs up to (and past) `end`, or to the end of the line, and the names of those
    /// whose value is test_decoding's bare `unchanged-toast-datum`.
    fn columns_until(&mut self, end: &str) -> Option<(Columns, Vec<String>)> {
        let (mut columns, mut unchanged) = (Vec::new(), Vec::new());
        loop {
            self.eat(" ");
            if self.text.is_empty() || self.eat(end) {
                return Some((columns, unchanged));
            }
            let name = self.identifier(&['['])?;
            // The type, in brackets; it may hold spaces and brackets of its own (`text[]`).
            let rest = self.text.strip_prefix('[')?;
            let close = rest.find("]:")?;
            let scalar_bits = rest[..close].starts_with("bit") && !rest[..close].contains("[]");
            self.text = &rest[close + 2..];
            if scalar_bits {
                // test_decoding writes a bit string as `B'101'`; its text form is `101`.
                self.eat("B");
            }
            match self.value()? {
                Value::Unchanged => unchanged.push(name),
                Value::Given(value) => columns.push((name, value)),
            }
        }
    }

    /// `null`, a quoted literal (`'it''s'`), a bare token (numbers, booleans), or the
    /// bare marker of an unchanged TOASTed value (a quoted one is text like any other).
    fn value(&mut self) -> Option<Value> {
        if self.text.starts_with('\'') {
            return self.quoted('\'').map(|text| Value::Given(Some(text)));
        }
        let end = self.text.find(' ').unwrap_or(self.text.len());
        let (token, rest) = self.text.split_at(end);
        self.text = rest;
        Some(match token {
            UNCHANGED_TOAST => Value::Unchanged,
            "null" => Value::Given(None),
            _ => Value::Given(Some(token.to_owned())),
        })
    }
}

/// One column's value in a tuple.
enum Value {
    /// A value (`None`: NULL).
    Given(Option<String>),
    /// A TOASTed value the update did not change, so not logged.
    Unchanged,
}

/// What test_decoding prints for a TOASTed value an update did not change.
const UNCHANGED_TOAST: &str = "unchanged-toast-datum";

#[cfg(test)]
mod tests {
    use super::*;

    fn cols(pairs: &[(&str, Option<&str>)]) -> Columns {
        pairs.iter().map(|(n, v)| ((*n).to_owned(), v.map(str::to_owned))).collect()
    }

    #[test]
    fn reads_every_line_test_decoding_writes() {
        assert_eq!(parse_line("BEGIN 123").unwrap(), Line::Begin(Some(123)));
        assert_eq!(parse_line("COMMIT 123").unwrap(), Line::Commit);
        let line = r#"table public.items: INSERT: id[bigint]:1 title[text]:'it''s a [b]: c' tags[text[]]:'{a,"b c"}' n[numeric]:null ok[boolean]:true at[timestamp with time zone]:'2026-11-26 10:00:00+00'"#;
        let Line::Change { schema, table, change } = parse_line(line).unwrap() else { panic!() };
        assert_eq!((schema.as_str(), table.as_str()), ("public", "items"));
        assert_eq!(
            change,
            RowChange::Insert(cols(&[
                ("id", Some("1")),
                ("title", Some("it's a [b]: c")),
                ("tags", Some("{a,\"b c\"}")),
                ("n", None),
                ("ok", Some("true")),
                ("at", Some("2026-11-26 10:00:00+00")),
            ]))
        );
        let line = r#"table "my schema"."we""ird": UPDATE: old-key: id[integer]:1 new-tuple: id[integer]:2 "a b"[text]:unchanged-toast-datum"#;
        let Line::Change { schema, table, change } = parse_line(line).unwrap() else { panic!() };
        assert_eq!((schema.as_str(), table.as_str()), ("my schema", "we\"ird"));
        assert_eq!(
            change,
            RowChange::Update {
                old_key: Some(cols(&[("id", Some("1"))])),
                new: cols(&[("id", Some("2"))]),
                unchanged: vec!["a b".into()]
            }
        );
        let line = "table public.t: INSERT: b[bit(3)]:B'101' v[bit varying(5)]:B'1' a[bit[]]:'{101}'";
        let Line::Change { change: RowChange::Insert(new), .. } = parse_line(line).unwrap() else { panic!() };
        assert_eq!(new, cols(&[("b", Some("101")), ("v", Some("1")), ("a", Some("{101}"))]));
        // Only the bare marker means unchanged; quoted, it is a text like any other.
        let line = "table public.t: UPDATE: id[integer]:1 note[text]:'unchanged-toast-datum'";
        let Line::Change { change: RowChange::Update { new, unchanged, .. }, .. } = parse_line(line).unwrap()
        else {
            panic!()
        };
        assert_eq!(
            (new, unchanged),
            (cols(&[("id", Some("1")), ("note", Some("unchanged-toast-datum"))]), vec![])
        );
        assert_eq!(
            parse_line("table public.items: DELETE: id[bigint]:7").unwrap(),
            Line::Change {
                schema: "public".into(),
                table: "items".into(),
                change: RowChange::Delete(Some(cols(&[("id", Some("7"))])))
            }
        );
        assert!(matches!(parse_line("table public.items: TRUNCATE: (no-flags)").unwrap(), Line::Truncate(_)));
        assert!(parse_line("table public.items: MERGE: x").is_err());
    }
}
