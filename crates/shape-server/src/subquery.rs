//! Scripted subquery `where` clauses: DNF positions, their member values, and the per-row
//! `tags` / `active_conditions` metadata Electric puts on messages of subquery shapes.
//!
//! The shape of the metadata follows the Electric sync service:
//! - `shapes/shape.ex` `get_row_metadata` / `compute_active_conditions` / `compute_tags` /
//!   `compute_inclusion`: one tag string per disjunct, one `/`-separated slot per DNF position
//!   (an empty slot for positions outside that disjunct), one active condition per position,
//!   and a row is included iff all positions of some disjunct are active;
//! - `shapes/subquery_tags.ex` `make_value_hash` / `namespace_value`: the slot value is a hash
//!   of the namespaced value (`v:<text>`, or `NULL`). Electric uses md5 over the stack id,
//!   shape handle and namespaced value; this server uses a stable 64-bit FNV-1a of the
//!   namespaced value alone ([`tag_hash`]), so tests can compute expected tags without the
//!   shape handle. Clients only compare tag strings with move patterns of the same shape, so
//!   the difference is invisible to them.

use std::collections::HashSet;

use crate::table::TableDef;

/// The tag slot value (and move-pattern `value`) this server uses for a column value:
/// 16 lowercase hex digits of FNV-1a-64 over `v:<value>`, or over `NULL` for SQL NULL
/// (namespacing as in Electric's `SubqueryTags.namespace_value`).
pub fn tag_hash(value: Option<&str>) -> String {
    let namespaced = match value {
        Some(v) => format!("v:{v}"),
        None => "NULL".to_string(),
    };
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in namespaced.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{hash:016x}")
}

/// A subquery `where` registered with [`crate::TableHandle::register_subquery_dnf`] (or one
/// of its shorthands): columns per DNF position, disjuncts, and the values currently in
/// each position's subquery.
#[derive(Clone, Debug)]
pub(crate) struct SubqueryWhere {
    /// Column index (in table order) tested by each position.
    pub columns: Vec<usize>,
    /// Positions of each disjunct (an OR of ANDs).
    pub disjuncts: Vec<Vec<usize>>,
    /// Values currently returned by each position's subquery.
    pub members: Vec<HashSet<String>>,
}

/// A row's metadata in one subquery shape at one point in time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct RowMeta {
    pub included: bool,
    pub tags: Vec<String>,
    pub active_conditions: Vec<bool>,
}

impl SubqueryWhere {
    /// Validates and builds a subquery where.
    ///
    /// # Panics
    /// On unknown columns, positions out of range, empty disjuncts, or a `members` list
    /// whose length differs from `positions` (scripting mistakes).
    pub fn new(def: &TableDef, positions: &[&str], disjuncts: &[&[usize]], members: &[&[&str]]) -> Self {
        assert!(!positions.is_empty(), "a subquery where needs at least one position");
        assert_eq!(members.len(), positions.len(), "members needs one list of initial values per position");
        assert!(!disjuncts.is_empty(), "a subquery where needs at least one disjunct");
        let columns = positions
            .iter()
            .map(|c| {
                def.column_index(c)
                    .unwrap_or_else(|| panic!("table {}.{} has no column {c:?}", def.schema, def.name))
            })
            .collect();
        let disjuncts = disjuncts
            .iter()
            .map(|d| {
                assert!(!d.is_empty(), "a disjunct needs at least one position");
                for &p in *d {
                    assert!(
                        p < positions.len(),
                        "disjunct position {p} is not one of the {} positions",
                        positions.len()
                    );
                }
                d.to_vec()
            })
            .collect();
        let members = members.iter().map(|m| m.iter().map(|v| v.to_string()).collect()).collect();
        SubqueryWhere { columns, disjuncts, members }
    }

    /// Number of DNF positions.
    pub fn positions(&self) -> usize {
        self.columns.len()
    }

    /// The row's inclusion, tags and active conditions under the current members
    /// (Electric `shape.ex` `get_row_metadata`). A NULL value is never a member.
    pub fn meta(&self, row: &[Option<String>]) -> RowMeta {
        let active_conditions: Vec<bool> = self
            .columns
            .iter()
            .zip(&self.members)
            .map(|(&c, members)| row[c].as_ref().is_some_and(|v| members.contains(v)))
            .collect();
        let tags = self
            .disjuncts
            .iter()
            .map(|d| {
                (0..self.positions())
                    .map(|p| {
                        if d.contains(&p) { tag_hash(row[self.columns[p]].as_deref()) } else { String::new() }
                    })
                    .collect::<Vec<_>>()
                    .join("/")
            })
            .collect();
        let included = self.disjuncts.iter().any(|d| d.iter().all(|&p| active_conditions[p]));
        RowMeta { included, tags, active_conditions }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Row;
    use crate::table::Column;

    fn def() -> TableDef {
        TableDef::new("t")
            .column(Column::new("id", "int8").primary_key())
            .column(Column::new("a", "text"))
            .column(Column::new("b", "text"))
    }

    fn row(a: Option<&str>, b: Option<&str>) -> Row {
        vec![Some("1".into()), a.map(str::to_string), b.map(str::to_string)]
    }

    #[test]
    fn tag_hash_is_stable_and_distinguishes_null_from_the_text_null() {
        assert_eq!(tag_hash(Some("x")), tag_hash(Some("x")));
        assert_eq!(tag_hash(Some("x")).len(), 16);
        assert_ne!(tag_hash(Some("x")), tag_hash(Some("y")));
        assert_ne!(tag_hash(None), tag_hash(Some("NULL")));
    }

    #[test]
    fn one_position_gives_flat_tags() {
        let s = SubqueryWhere::new(&def(), &["a"], &[&[0]], &[&["x"]]);
        let m = s.meta(&row(Some("x"), None));
        assert_eq!(
            m,
            RowMeta { included: true, tags: vec![tag_hash(Some("x"))], active_conditions: vec![true] }
        );
        assert!(!s.meta(&row(Some("y"), None)).included);
        assert!(!s.meta(&row(None, None)).included, "NULL is never IN a subquery");
    }

    #[test]
    fn disjunction_has_one_tag_per_disjunct_with_empty_slots() {
        let s = SubqueryWhere::new(&def(), &["a", "b"], &[&[0], &[1]], &[&["x"], &["z"]]);
        let m = s.meta(&row(Some("y"), Some("z")));
        let (ha, hb) = (tag_hash(Some("y")), tag_hash(Some("z")));
        assert_eq!(m.tags, vec![format!("{ha}/"), format!("/{hb}")]);
        assert_eq!(m.active_conditions, vec![false, true]);
        assert!(m.included);
    }

    #[test]
    fn conjunction_needs_every_position() {
        let s = SubqueryWhere::new(&def(), &["a", "b"], &[&[0, 1]], &[&["x"], &[]]);
        let m = s.meta(&row(Some("x"), Some("z")));
        assert_eq!(m.tags, vec![format!("{}/{}", tag_hash(Some("x")), tag_hash(Some("z")))]);
        assert_eq!(m.active_conditions, vec![true, false]);
        assert!(!m.included);
    }
}
