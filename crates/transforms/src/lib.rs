//! Built-in transforms, applied in order between source and sink (`transforms:` in a
//! pipeline). Each is pure and deterministic, so a replayed batch transforms the same.
//!
//! - `select` (`columns: [..]`) keeps only the listed columns; `drop` (`columns: [..]`)
//!   removes them — e.g. personal data that must not reach a cache. Neither may remove a
//!   primary-key column: every sink keys rows by it.
//! - `rename` (`columns: {old: new}`) renames columns, the primary key included.
//! - `filter` (`column` and one of `equals`, `not_equals`, `in`, `is_null`) keeps the
//!   rows whose column matches, comparing the value's text form (`Value::render`:
//!   `true`/`false`, exact decimals, JSON text). An update after which a row no longer
//!   matches becomes a delete; one after which it matches again writes the whole row. It
//!   reads whole rows, so it needs `replica: full` on the source (validation says so).
//!
//! The column transforms also transform the shape's schema ([`Transform::schema`]), so
//! table sinks create their tables and Redis its keys from the columns that arrive. A
//! column named in a transform but missing from the shape stops the pipeline at the first
//! batch with an error naming it.

use std::collections::BTreeMap;

use serde::Deserialize;
use shapesync_core::{
    Change, ColumnName, ConfigError, Operation, Registry, Row, Schema, Transform, TransformConfig,
    TransformError, Value,
};

/// Registers `select`, `drop`, `rename` and `filter`.
pub fn register(registry: &mut Registry) {
    registry.transform::<SelectConfig>("select");
    registry.transform::<DropConfig>("drop");
    registry.transform::<RenameConfig>("rename");
    registry.transform::<FilterConfig>("filter");
}

/// Fails when `column` is not in `schema`, naming the columns it has.
fn must_exist(schema: &Schema, column: &str, transform: &str) -> Result<(), TransformError> {
    if schema.0.contains_key(column) {
        return Ok(());
    }
    let have: Vec<&str> = schema.0.keys().map(|c| &**c).collect();
    Err(TransformError::Schema(format!(
        "`{transform}` names column `{column}`, which the shape lacks (it has {have:?})"
    )))
}

/// Settings of `select`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SelectConfig {
    /// The columns to keep.
    pub columns: Vec<String>,
}

/// Settings of `drop`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DropConfig {
    /// The columns to remove.
    pub columns: Vec<String>,
}

/// Keeps (`select`) or removes (`drop`) a set of columns.
struct Columns {
    name: &'static str,
    columns: Vec<String>,
    keep: bool,
}

impl Columns {
    fn kept(&self, column: &str) -> bool {
        self.columns.iter().any(|c| c == column) == self.keep
    }
}

fn non_empty(columns: &[String]) -> Result<(), ConfigError> {
    if columns.is_empty() {
        return Err(ConfigError::new("columns", "expected at least one column"));
    }
    Ok(())
}

impl TransformConfig for SelectConfig {
    fn build(self) -> Result<Box<dyn Transform>, ConfigError> {
        non_empty(&self.columns)?;
        Ok(Box::new(Columns { name: "select", columns: self.columns, keep: true }))
    }
}

impl TransformConfig for DropConfig {
    fn build(self) -> Result<Box<dyn Transform>, ConfigError> {
        non_empty(&self.columns)?;
        Ok(Box::new(Columns { name: "drop", columns: self.columns, keep: false }))
    }
}

impl Transform for Columns {
    fn apply(&self, mut change: Change, out: &mut Vec<Change>) -> Result<(), TransformError> {
        retain(&mut change.value, |c| self.kept(c));
        if let Some(old) = &mut change.old_value {
            retain(old, |c| self.kept(c));
        }
        out.push(change);
        Ok(())
    }

    fn schema(&self, input: &Schema) -> Result<Option<Schema>, TransformError> {
        for column in &self.columns {
            must_exist(input, column, self.name)?;
        }
        if let Some(pk) = input.primary_key().into_iter().find(|c| !self.kept(c)) {
            return Err(TransformError::Schema(format!(
                "`{}` would remove primary-key column `{pk}`, which every sink keys rows by",
                self.name
            )));
        }
        let mut output = input.clone();
        output.0.retain(|c, _| self.kept(c));
        Ok(Some(output))
    }
}

fn retain(row: &mut Row, keep: impl Fn(&str) -> bool) {
    let removed: Vec<String> = row.keys().filter(|c| !keep(c)).map(str::to_owned).collect();
    for column in removed {
        row.remove(&column);
    }
}

/// Settings of `rename`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RenameConfig {
    /// Old name → new name.
    pub columns: BTreeMap<String, String>,
}

struct Rename {
    columns: Vec<(String, ColumnName)>,
}

impl TransformConfig for RenameConfig {
    fn build(self) -> Result<Box<dyn Transform>, ConfigError> {
        if self.columns.is_empty() {
            return Err(ConfigError::new("columns", "expected at least one `old: new` pair"));
        }
        let mut targets: Vec<&String> = self.columns.values().collect();
        targets.sort();
        if let Some(w) = targets.windows(2).find(|w| w[0] == w[1]) {
            return Err(ConfigError::new("columns", format!("two columns would both be named `{}`", w[0])));
        }
        if let Some(empty) = self.columns.iter().find(|(_, new)| new.is_empty()) {
            return Err(ConfigError::new(format!("columns.{}", empty.0), "expected a new, non-empty name"));
        }
        Ok(Box::new(Rename {
            columns: self.columns.into_iter().map(|(old, new)| (old, new.into())).collect(),
        }))
    }
}

impl Rename {
    fn rename(&self, row: &mut Row) {
        let moved: Vec<(ColumnName, Value)> = self
            .columns
            .iter()
            .filter_map(|(old, new)| row.remove(old).map(|value| (new.clone(), value)))
            .collect();
        for (new, value) in moved {
            row.insert(new, value);
        }
    }
}

impl Transform for Rename {
    fn apply(&self, mut change: Change, out: &mut Vec<Change>) -> Result<(), TransformError> {
        self.rename(&mut change.value);
        if let Some(old) = &mut change.old_value {
            self.rename(old);
        }
        out.push(change);
        Ok(())
    }

    fn schema(&self, input: &Schema) -> Result<Option<Schema>, TransformError> {
        let mut output = input.clone();
        let mut moved = Vec::new();
        for (old, new) in &self.columns {
            must_exist(input, old, "rename")?;
            moved.push((new.clone(), output.0.remove(old.as_str()).expect("checked above")));
        }
        for (new, column) in moved {
            if output.0.contains_key(&new) {
                return Err(TransformError::Schema(format!(
                    "`rename` would give two columns the name `{new}`; rename the other one too"
                )));
            }
            output.0.insert(new, column);
        }
        Ok(Some(output))
    }
}

/// A literal in a filter condition: compared by its text (`true`, `42`, `open`).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Literal {
    /// `true` / `false`.
    Bool(bool),
    /// An integer.
    Int(i64),
    /// A number with a fraction.
    Float(f64),
    /// Text.
    Text(String),
}

impl Literal {
    fn text(&self) -> String {
        match self {
            Literal::Bool(b) => b.to_string(),
            Literal::Int(i) => i.to_string(),
            Literal::Float(f) => Value::Float(*f).render().map(|t| t.into_owned()).unwrap_or_default(),
            Literal::Text(t) => t.clone(),
        }
    }
}

/// Settings of `filter`: `column` and exactly one condition.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilterConfig {
    /// The column tested.
    pub column: String,
    /// Keep rows whose value is this.
    #[serde(default)]
    pub equals: Option<Literal>,
    /// Keep rows whose value is not this (NULL included).
    #[serde(default)]
    pub not_equals: Option<Literal>,
    /// Keep rows whose value is one of these.
    #[serde(default, rename = "in")]
    pub one_of: Option<Vec<Literal>>,
    /// Keep rows whose value is NULL (`true`) or not NULL (`false`).
    #[serde(default)]
    pub is_null: Option<bool>,
}

enum Condition {
    OneOf(Vec<String>),
    NotEquals(String),
    IsNull(bool),
}

struct Filter {
    column: String,
    condition: Condition,
}

impl TransformConfig for FilterConfig {
    fn needs_full_rows(&self) -> bool {
        true
    }

    fn build(self) -> Result<Box<dyn Transform>, ConfigError> {
        let given =
            [self.equals.is_some(), self.not_equals.is_some(), self.one_of.is_some(), self.is_null.is_some()];
        if given.iter().filter(|g| **g).count() != 1 {
            return Err(ConfigError::new(
                "",
                "expected exactly one of `equals`, `not_equals`, `in`, `is_null` beside `column`",
            ));
        }
        let condition = if let Some(v) = self.equals {
            Condition::OneOf(vec![v.text()])
        } else if let Some(v) = self.not_equals {
            Condition::NotEquals(v.text())
        } else if let Some(values) = self.one_of {
            Condition::OneOf(values.iter().map(Literal::text).collect())
        } else {
            Condition::IsNull(self.is_null.unwrap_or_default())
        };
        Ok(Box::new(Filter { column: self.column, condition }))
    }
}

impl Filter {
    fn matches(&self, row: &Row) -> bool {
        let text = row.get(&self.column).and_then(Value::render);
        match &self.condition {
            Condition::OneOf(values) => text.is_some_and(|t| values.iter().any(|v| *v == *t)),
            Condition::NotEquals(value) => text.is_none_or(|t| *value != *t),
            Condition::IsNull(null) => text.is_none() == *null,
        }
    }
}

impl Transform for Filter {
    fn apply(&self, mut change: Change, out: &mut Vec<Change>) -> Result<(), TransformError> {
        match change.op {
            Operation::Delete => out.push(change),
            Operation::Insert if self.matches(&change.value) => out.push(change),
            Operation::Insert => {}
            Operation::Update if self.matches(&change.value) => out.push(change),
            Operation::Update => {
                // The row leaves the filtered set; deleting a row a sink never had is fine.
                change.op = Operation::Delete;
                change.old_value = None;
                out.push(change);
            }
        }
        Ok(())
    }

    fn schema(&self, input: &Schema) -> Result<Option<Schema>, TransformError> {
        must_exist(input, &self.column, "filter")?;
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use shapesync_testkit::fixtures::{row, schema};

    use super::*;

    fn users() -> Schema {
        schema(
            r#"{"id":{"type":"int8","pk_index":0},"name":{"type":"text"},"email":{"type":"text"},"active":{"type":"bool"}}"#,
        )
    }

    fn user(id: i64, name: &str, active: bool) -> Row {
        row(&[
            ("id", Value::Int(id)),
            ("name", Value::Text(name.into())),
            ("email", Value::Text(format!("{name}@example.com"))),
            ("active", Value::Bool(active)),
        ])
    }

    fn run(t: &dyn Transform, change: Change) -> Vec<Change> {
        let mut out = Vec::new();
        t.apply(change, &mut out).unwrap();
        out
    }

    fn columns(schema: &Schema) -> Vec<&str> {
        schema.0.keys().map(|c| &**c).collect()
    }

    #[test]
    fn drop_and_select_remove_columns_from_rows_and_schema_but_never_the_key() {
        let drop = DropConfig { columns: vec!["email".into()] }.build().unwrap();
        assert_eq!(columns(&drop.schema(&users()).unwrap().unwrap()), ["active", "id", "name"]);
        let out = run(&*drop, Change::insert("k1", user(1, "ann", true)));
        assert_eq!(out[0].value.keys().collect::<Vec<_>>(), ["active", "id", "name"]);

        let select = SelectConfig { columns: vec!["id".into(), "name".into()] }.build().unwrap();
        assert_eq!(columns(&select.schema(&users()).unwrap().unwrap()), ["id", "name"]);
        let mut update =
            Change::update("k1", row(&[("id", Value::Int(1)), ("email", Value::Text("x".into()))]));
        update.old_value = Some(row(&[("email", Value::Text("y".into()))]));
        let out = run(&*select, update);
        assert_eq!(out[0].value.keys().collect::<Vec<_>>(), ["id"]);
        assert!(out[0].old_value.as_ref().unwrap().is_empty());

        let keyless = SelectConfig { columns: vec!["name".into()] }.build().unwrap();
        let err = keyless.schema(&users()).unwrap_err().to_string();
        assert!(err.contains("primary-key column `id`"), "{err}");
        let typo = DropConfig { columns: vec!["emial".into()] }.build().unwrap();
        let err = typo.schema(&users()).unwrap_err().to_string();
        assert!(err.contains("`emial`") && err.contains("email"), "{err}");
        assert_eq!(SelectConfig { columns: vec![] }.build().err().unwrap().key, "columns");
    }

    #[test]
    fn rename_moves_values_and_schema_entries_the_key_included() {
        let columns_map =
            BTreeMap::from([("id".to_owned(), "user_id".to_owned()), ("name".into(), "title".into())]);
        let rename = RenameConfig { columns: columns_map }.build().unwrap();
        let renamed = rename.schema(&users()).unwrap().unwrap();
        assert_eq!(columns(&renamed), ["active", "email", "title", "user_id"]);
        assert_eq!(renamed.primary_key(), ["user_id"]);
        let out = run(&*rename, Change::insert("k1", user(1, "ann", true)));
        assert_eq!(out[0].value.get("title"), Some(&Value::Text("ann".into())));
        assert_eq!(out[0].value.get("name"), None);

        let clash = RenameConfig { columns: BTreeMap::from([("name".to_owned(), "email".to_owned())]) };
        let err = clash.build().unwrap().schema(&users()).unwrap_err().to_string();
        assert!(err.contains("two columns the name `email`"), "{err}");
        let twice = RenameConfig {
            columns: BTreeMap::from([("a".to_owned(), "x".to_owned()), ("b".into(), "x".into())]),
        };
        assert_eq!(twice.build().err().unwrap().key, "columns");
    }

    #[test]
    fn filter_keeps_matching_rows_and_turns_an_update_that_leaves_into_a_delete() {
        let filter = FilterConfig {
            column: "active".into(),
            equals: Some(Literal::Bool(true)),
            not_equals: None,
            one_of: None,
            is_null: None,
        }
        .build()
        .unwrap();
        assert!(run(&*filter, Change::insert("k2", user(2, "bob", false))).is_empty());
        assert_eq!(run(&*filter, Change::insert("k1", user(1, "ann", true))).len(), 1);
        let left = run(&*filter, Change::update("k1", user(1, "ann", false)));
        assert_eq!(left[0].op, Operation::Delete);
        assert_eq!(left[0].value.get("id"), Some(&Value::Int(1)));
        let back = run(&*filter, Change::update("k1", user(1, "ann", true)));
        assert_eq!((back[0].op, back[0].value.len()), (Operation::Update, 4), "the whole row comes back");
        assert_eq!(run(&*filter, Change::delete("k1", row(&[("id", Value::Int(1))]))).len(), 1);

        let names = FilterConfig {
            column: "name".into(),
            equals: None,
            not_equals: None,
            one_of: Some(vec![Literal::Text("ann".into()), Literal::Int(7)]),
            is_null: None,
        }
        .build()
        .unwrap();
        assert_eq!(run(&*names, Change::insert("k1", user(1, "ann", true))).len(), 1);
        assert!(run(&*names, Change::insert("k3", user(3, "cy", true))).is_empty());
        let both = FilterConfig {
            column: "name".into(),
            equals: Some(Literal::Int(1)),
            not_equals: None,
            one_of: None,
            is_null: Some(true),
        };
        assert!(both.build().is_err(), "exactly one condition");
        let missing = FilterConfig {
            column: "nope".into(),
            equals: None,
            not_equals: None,
            one_of: None,
            is_null: Some(true),
        };
        assert!(missing.build().unwrap().schema(&users()).is_err());
    }
}
