//! The stream position a sink stores beside its data.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{Offset, Schema};

/// Where a pipeline stands, written by the sink in the same atomic unit as the rows
/// it covers, and read back from the sink at start-up: the sink is the only source
/// of truth for progress.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Checkpoint {
    /// Hash of the shape definition; a mismatch at start-up forces a resync.
    pub shape_hash: String,
    /// Electric shape handle the offset belongs to.
    pub handle: String,
    /// Last `electric-offset` whose changes are all applied.
    pub offset: Offset,
    /// The `electric-schema` in force at that offset.
    pub schema: Schema,
    /// Resync generation: bumped on every must-refetch. Rows written while it is
    /// current carry it, so a sweep can delete exactly the rows that vanished.
    #[serde(default)]
    pub generation: u64,
    /// A resync is under way: rows of older generations await the sweep.
    #[serde(default)]
    pub resyncing: bool,
}

impl Checkpoint {
    /// The JSON form sinks store.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("checkpoints always serialize")
    }

    /// Reads the JSON form back; an error means the stored checkpoint is damaged.
    pub fn from_json(s: &str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(s)
    }
}

/// A stable hash of a shape definition, from its parts in a fixed order.
///
/// Sources pass every identity-relevant parameter (table, where, params, columns,
/// replica, log mode); changing any of them makes stored checkpoints stale.
pub fn definition_hash(parts: &[(&str, &str)]) -> String {
    let mut h = Sha256::new();
    for (k, v) in parts {
        h.update((k.len() as u64).to_le_bytes());
        h.update(k.as_bytes());
        h.update((v.len() as u64).to_le_bytes());
        h.update(v.as_bytes());
    }
    h.finalize().iter().take(12).map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_round_trip() {
        let cp = Checkpoint {
            shape_hash: definition_hash(&[("table", "items")]),
            handle: "123-456".into(),
            offset: "26800_4".parse().unwrap(),
            schema: serde_json::from_str(r#"{"id":{"type":"int8","pk_index":0}}"#).unwrap(),
            generation: 3,
            resyncing: true,
        };
        assert_eq!(Checkpoint::from_json(&cp.to_json()).unwrap(), cp);
    }

    #[test]
    fn definition_hash_separates_fields() {
        assert_ne!(definition_hash(&[("a", "bc")]), definition_hash(&[("ab", "c")]));
        assert_eq!(definition_hash(&[("t", "x")]), definition_hash(&[("t", "x")]));
        assert_eq!(definition_hash(&[("t", "x")]).len(), 24);
    }
}
