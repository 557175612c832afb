//! Table definitions: columns with Postgres types, primary keys and the `electric-schema` JSON.

use serde_json::{Map, Value as Json};

/// One column of a scripted table.
#[derive(Clone, Debug)]
pub struct Column {
    pub(crate) name: String,
    pub(crate) pg_type: String,
    pub(crate) primary_key: bool,
    pub(crate) not_null: bool,
    pub(crate) dims: u32,
    pub(crate) extra: Map<String, Json>,
}

impl Column {
    /// A nullable column; `pg_type` is the Postgres type name (`int8`, `text`, …), for arrays
    /// the element type together with [`Column::dims`].
    pub fn new(name: impl Into<String>, pg_type: impl Into<String>) -> Self {
        Column {
            name: name.into(),
            pg_type: pg_type.into(),
            primary_key: false,
            not_null: false,
            dims: 0,
            extra: Map::new(),
        }
    }

    /// Makes the column part of the primary key (in the order columns are marked); implies NOT NULL.
    pub fn primary_key(mut self) -> Self {
        self.primary_key = true;
        self.not_null = true;
        self
    }

    /// Marks the column NOT NULL (`"not_null":true` in the schema).
    pub fn not_null(mut self) -> Self {
        self.not_null = true;
        self
    }

    /// Array dimensions (`"dims"` in the schema); the type stays the element type.
    pub fn dims(mut self, dims: u32) -> Self {
        self.dims = dims;
        self
    }

    /// Any other schema field, e.g. `("precision", 10)` or `("max_length", 255)`.
    pub fn schema_field(mut self, key: impl Into<String>, value: impl Into<Json>) -> Self {
        self.extra.insert(key.into(), value.into());
        self
    }
}

/// A table: schema, name and columns. Build with [`TableDef::new`] and [`TableDef::column`].
#[derive(Clone, Debug)]
pub struct TableDef {
    pub(crate) schema: String,
    pub(crate) name: String,
    pub(crate) columns: Vec<Column>,
}

impl TableDef {
    /// A table `name` in schema `public`.
    pub fn new(name: impl Into<String>) -> Self {
        TableDef { schema: "public".into(), name: name.into(), columns: Vec::new() }
    }

    /// Puts the table in another Postgres schema.
    pub fn in_schema(mut self, schema: impl Into<String>) -> Self {
        self.schema = schema.into();
        self
    }

    /// Appends a column.
    pub fn column(mut self, column: Column) -> Self {
        self.columns.push(column);
        self
    }

    pub(crate) fn column_index(&self, name: &str) -> Option<usize> {
        self.columns.iter().position(|c| c.name == name)
    }

    /// Column indexes forming the key: the PK in PK order, or all columns sorted by name.
    pub(crate) fn key_columns(&self) -> Vec<usize> {
        let pk: Vec<usize> = (0..self.columns.len()).filter(|&i| self.columns[i].primary_key).collect();
        if !pk.is_empty() {
            return pk;
        }
        let mut all: Vec<usize> = (0..self.columns.len()).collect();
        all.sort_by(|&a, &b| self.columns[a].name.cmp(&self.columns[b].name));
        all
    }

    pub(crate) fn has_primary_key(&self) -> bool {
        self.columns.iter().any(|c| c.primary_key)
    }

    /// The `electric-schema` JSON for the selected columns (indexes in table order).
    pub(crate) fn schema_json(&self, selected: &[usize]) -> String {
        let pk: Vec<usize> = (0..self.columns.len()).filter(|&i| self.columns[i].primary_key).collect();
        let mut out = Map::new();
        for &i in selected {
            let c = &self.columns[i];
            let mut field = Map::new();
            field.insert("type".into(), c.pg_type.clone().into());
            if let Some(pos) = pk.iter().position(|&p| p == i) {
                field.insert("pk_index".into(), pos.into());
            }
            if c.not_null {
                field.insert("not_null".into(), true.into());
            }
            if c.dims > 0 {
                field.insert("dims".into(), c.dims.into());
            }
            for (k, v) in &c.extra {
                field.insert(k.clone(), v.clone());
            }
            out.insert(c.name.clone(), Json::Object(field));
        }
        Json::Object(out).to_string()
    }

    /// The message key for a row: `"schema"."table"/"pk"…` per spec §4.1.
    pub(crate) fn key_of(&self, row: &[Option<String>]) -> String {
        let escape_name = |s: &str| s.replace('/', "//").replace('.', "..");
        let mut key = format!("\"{}\".\"{}\"", escape_name(&self.schema), escape_name(&self.name));
        for i in self.key_columns() {
            match &row[i] {
                Some(v) => {
                    key.push_str("/\"");
                    key.push_str(&v.replace('/', "//"));
                    key.push('"');
                }
                None => key.push_str("/_"),
            }
        }
        key
    }

    /// Parses a JSON object of column -> string|null into a row; missing columns are null.
    ///
    /// # Panics
    /// On unknown columns or values that are not strings or null (a scripting mistake).
    pub(crate) fn row_from_json(&self, values: &Json) -> Vec<Option<String>> {
        let mut row = vec![None; self.columns.len()];
        for (name, value) in self.json_fields(values) {
            row[name] = value;
        }
        row
    }

    /// The (column index, value) pairs of a JSON object, validated.
    pub(crate) fn json_fields(&self, values: &Json) -> Vec<(usize, Option<String>)> {
        let Json::Object(map) = values else {
            panic!("row values must be a JSON object of column -> string|null, got {values}");
        };
        map.iter()
            .map(|(name, v)| {
                let i = self
                    .column_index(name)
                    .unwrap_or_else(|| panic!("table {}.{} has no column {name:?}", self.schema, self.name));
                let v = match v {
                    Json::Null => None,
                    Json::String(s) => Some(s.clone()),
                    other => panic!(
                        "column {name:?}: values are Postgres text strings or null (wire format), got {other}"
                    ),
                };
                (i, v)
            })
            .collect()
    }
}

/// Read access to a row for `where` predicates registered with
/// [`crate::TableHandle::register_where`].
pub struct RowView<'a> {
    pub(crate) def: &'a TableDef,
    pub(crate) row: &'a [Option<String>],
    pub(crate) params: &'a [(String, String)],
}

impl RowView<'_> {
    /// The text value of `column`, or `None` for NULL or an unknown column.
    pub fn get(&self, column: &str) -> Option<&str> {
        self.def.column_index(column).and_then(|i| self.row[i].as_deref())
    }

    /// The value of placeholder `$n` (`params[n]`, or `params` of a subset), e.g. `param("1")`.
    pub fn param(&self, n: &str) -> Option<&str> {
        self.params.iter().find(|(k, _)| k == n).map(|(_, v)| v.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_escape_slashes_dots_and_nulls() {
        let def = TableDef::new("my.t/x")
            .column(Column::new("a", "text").primary_key())
            .column(Column::new("b", "text").primary_key());
        let key = def.key_of(&[Some("a/b".into()), None]);
        assert_eq!(key, r#""public"."my..t//x"/"a//b"/_"#);
    }

    #[test]
    fn schema_lists_pk_index_not_null_and_dims() {
        let def = TableDef::new("t")
            .column(Column::new("id", "int4").primary_key())
            .column(Column::new("tags", "text").dims(1))
            .column(Column::new("amt", "numeric").schema_field("precision", 10));
        let schema: Json = serde_json::from_str(&def.schema_json(&[0, 1, 2])).unwrap();
        assert_eq!(
            schema,
            serde_json::json!({"id":{"type":"int4","pk_index":0,"not_null":true},
                "tags":{"type":"text","dims":1},"amt":{"type":"numeric","precision":10}})
        );
    }
}
