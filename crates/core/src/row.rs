//! [`Row`]: a compact, ordered map of column name → value.

use std::fmt;
use std::ops::Index;
use std::sync::Arc;

use serde::ser::{Serialize, SerializeMap, Serializer};

use crate::Value;

/// A column name. Parsers intern names through [`crate::Schema::intern`], so a million
/// rows share one allocation per column instead of holding a copy each.
pub type ColumnName = Arc<str>;

/// Column name → value, ordered by name. Under `replica: default` an update holds only
/// the key columns and the columns that changed.
///
/// A sorted vector rather than a tree: rows have a handful of columns, and at a million
/// rows in flight the per-row overhead of a `BTreeMap` was most of the memory.
#[derive(Clone, Default, PartialEq)]
pub struct Row {
    columns: Vec<(ColumnName, Value)>,
}

impl Row {
    /// An empty row.
    pub fn new() -> Self {
        Row::default()
    }

    /// An empty row with room for `n` columns.
    pub fn with_capacity(n: usize) -> Self {
        Row { columns: Vec::with_capacity(n) }
    }

    fn position(&self, name: &str) -> Result<usize, usize> {
        self.columns.binary_search_by(|(c, _)| (**c).cmp(name))
    }

    /// Number of columns.
    pub fn len(&self) -> usize {
        self.columns.len()
    }

    /// No columns at all.
    pub fn is_empty(&self) -> bool {
        self.columns.is_empty()
    }

    /// The value of a column.
    pub fn get(&self, name: &str) -> Option<&Value> {
        self.position(name).ok().map(|i| &self.columns[i].1)
    }

    /// The column is present (possibly NULL).
    pub fn contains_key(&self, name: &str) -> bool {
        self.position(name).is_ok()
    }

    /// Sets a column, returning its previous value.
    pub fn insert(&mut self, name: impl Into<ColumnName>, value: Value) -> Option<Value> {
        let name = name.into();
        match self.position(&name) {
            Ok(i) => Some(std::mem::replace(&mut self.columns[i].1, value)),
            Err(i) => {
                self.columns.insert(i, (name, value));
                None
            }
        }
    }

    /// Removes a column, returning its value.
    pub fn remove(&mut self, name: &str) -> Option<Value> {
        self.position(name).ok().map(|i| self.columns.remove(i).1)
    }

    /// Columns in name order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = (&str, &Value)> {
        self.columns.iter().map(|(c, v)| (&**c, v))
    }

    /// Column names in order.
    pub fn keys(&self) -> impl ExactSizeIterator<Item = &str> {
        self.columns.iter().map(|(c, _)| &**c)
    }

    /// Values in column-name order.
    pub fn values(&self) -> impl ExactSizeIterator<Item = &Value> {
        self.columns.iter().map(|(_, v)| v)
    }

    /// Sets every column of `other` (an update's merge), sharing its column names.
    pub fn merge(&mut self, other: &Row) {
        for (name, value) in &other.columns {
            self.insert(name.clone(), value.clone());
        }
    }
}

impl<K: Into<ColumnName>> Extend<(K, Value)> for Row {
    fn extend<I: IntoIterator<Item = (K, Value)>>(&mut self, iter: I) {
        for (k, v) in iter {
            self.insert(k, v);
        }
    }
}

impl<K: Into<ColumnName>> FromIterator<(K, Value)> for Row {
    fn from_iter<I: IntoIterator<Item = (K, Value)>>(iter: I) -> Self {
        let mut row = Row::new();
        row.extend(iter);
        row
    }
}

impl<K: Into<ColumnName>, const N: usize> From<[(K, Value); N]> for Row {
    fn from(pairs: [(K, Value); N]) -> Self {
        pairs.into_iter().collect()
    }
}

impl Index<&str> for Row {
    type Output = Value;

    /// Panics if the column is absent, like a map's index.
    fn index(&self, name: &str) -> &Value {
        self.get(name).unwrap_or_else(|| panic!("row has no column {name:?}"))
    }
}

impl<'a> IntoIterator for &'a Row {
    type Item = (&'a str, &'a Value);
    type IntoIter = std::iter::Map<
        std::slice::Iter<'a, (ColumnName, Value)>,
        fn(&'a (ColumnName, Value)) -> (&'a str, &'a Value),
    >;

    fn into_iter(self) -> Self::IntoIter {
        self.columns.iter().map(|(c, v)| (&**c, v))
    }
}

impl IntoIterator for Row {
    type Item = (ColumnName, Value);
    type IntoIter = std::vec::IntoIter<(ColumnName, Value)>;

    fn into_iter(self) -> Self::IntoIter {
        self.columns.into_iter()
    }
}

impl fmt::Debug for Row {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

/// Serializes as a JSON object with keys in name order.
impl Serialize for Row {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.len()))?;
        for (k, v) in self {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_columns_sorted_and_unique() {
        let mut row: Row = [("b", Value::Int(2)), ("a", Value::Int(1))].into();
        assert_eq!(row.keys().collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(row.insert("a", Value::Null), Some(Value::Int(1)));
        assert_eq!(row.len(), 2);
        assert_eq!(row["b"], Value::Int(2));
        assert_eq!(row.remove("b"), Some(Value::Int(2)));
        assert!(!row.contains_key("b"));
    }

    #[test]
    fn merge_overwrites_given_columns_only() {
        let mut row: Row = [("id", Value::Int(1)), ("t", Value::Text("a".into()))].into();
        row.merge(&[("t", Value::Text("b".into())), ("n", Value::Null)].into());
        assert_eq!(serde_json::to_string(&row).unwrap(), r#"{"id":1,"n":null,"t":"b"}"#);
    }
}
