//! Stream positions, exactly as the Electric protocol prints and orders them.

use std::cmp::Ordering;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A position in a shape log: `-1` (before everything), `<tx>_<op>` or `<tx>_inf`.
///
/// Offsets are only ever copied from `electric-offset` headers; shapesync never
/// invents one. `now` is a request-only value and so is not an `Offset`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Offset {
    /// `-1`: the start of the shape, before the snapshot.
    Start,
    /// `<tx>_<op>`: snapshot chunk `0_N`, or commit LSN and op position of a change.
    At {
        /// Transaction part: `0` inside the snapshot, otherwise the commit LSN.
        tx: u64,
        /// Operation part.
        op: OpPart,
    },
}

/// The operation half of an offset.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum OpPart {
    /// A concrete op position.
    Num(u64),
    /// `inf`: after every op of this transaction.
    Inf,
}

impl Offset {
    /// `0_inf`: the snapshot is complete and no change has been seen yet.
    pub const SNAPSHOT_END: Offset = Offset::At { tx: 0, op: OpPart::Inf };

    /// Builds `<tx>_<op>`.
    pub fn new(tx: u64, op: u64) -> Self {
        Offset::At { tx, op: OpPart::Num(op) }
    }

    /// True for offsets inside the initial snapshot (`-1` and `0_N`).
    ///
    /// Snapshot chunks are not transactions, so the runner may commit after each one.
    pub fn is_snapshot(&self) -> bool {
        matches!(self, Offset::Start | Offset::At { tx: 0, op: OpPart::Num(_) })
    }
}

impl Ord for Offset {
    fn cmp(&self, other: &Self) -> Ordering {
        match (self, other) {
            (Offset::Start, Offset::Start) => Ordering::Equal,
            (Offset::Start, _) => Ordering::Less,
            (_, Offset::Start) => Ordering::Greater,
            (Offset::At { tx: a, op: x }, Offset::At { tx: b, op: y }) => a.cmp(b).then(x.cmp(y)),
        }
    }
}

impl PartialOrd for Offset {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Display for Offset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Offset::Start => f.write_str("-1"),
            Offset::At { tx, op: OpPart::Num(op) } => write!(f, "{tx}_{op}"),
            Offset::At { tx, op: OpPart::Inf } => write!(f, "{tx}_inf"),
        }
    }
}

/// An offset string that is not `-1`, `<u64>_<u64>` or `<u64>_inf`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid offset {0:?}: expected -1, <u64>_<u64> or <u64>_inf")]
pub struct ParseOffsetError(pub String);

impl FromStr for Offset {
    type Err = ParseOffsetError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "-1" {
            return Ok(Offset::Start);
        }
        let err = || ParseOffsetError(s.chars().take(64).collect());
        let (tx, op) = s.split_once('_').ok_or_else(err)?;
        let digits = |p: &str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit());
        if !digits(tx) {
            return Err(err());
        }
        let tx = tx.parse().map_err(|_| err())?;
        let op = if op == "inf" {
            OpPart::Inf
        } else if digits(op) {
            OpPart::Num(op.parse().map_err(|_| err())?)
        } else {
            return Err(err());
        };
        Ok(Offset::At { tx, op })
    }
}

impl Serialize for Offset {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Offset {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn o(s: &str) -> Offset {
        s.parse().unwrap()
    }

    #[test]
    fn parses_and_prints_every_spec_form() {
        for s in ["-1", "0_0", "0_7", "0_inf", "24008184_0", "24008184_4", "18446744073709551615_inf"] {
            assert_eq!(o(s).to_string(), s);
        }
        assert_eq!(o("0_inf"), Offset::SNAPSHOT_END);
        assert_eq!(o("5_2"), Offset::new(5, 2));
    }

    #[test]
    fn orders_as_the_spec_example() {
        let ordered = ["-1", "0_0", "0_7", "0_inf", "24008184_0", "24008184_4"];
        for pair in ordered.windows(2) {
            assert!(o(pair[0]) < o(pair[1]), "{} < {}", pair[0], pair[1]);
        }
        assert!(o("1_inf") > o("1_99999999"));
        assert!(o("2_0") > o("1_inf"));
        assert!(o("10_0") > o("9_0"), "numeric, not lexical");
    }

    #[test]
    fn rejects_malformed_offsets() {
        for s in [
            "",
            "now",
            "10",
            "-2",
            "_1",
            "1_",
            "1_-1",
            "a_1",
            "1_infinity",
            "1_2_3",
            "+1_2",
            "1 _2",
            "99999999999999999999_0",
        ] {
            assert!(s.parse::<Offset>().is_err(), "{s:?} should be rejected");
        }
    }

    #[test]
    fn snapshot_offsets_are_recognised() {
        assert!(o("-1").is_snapshot());
        assert!(o("0_3").is_snapshot());
        assert!(!o("0_inf").is_snapshot());
        assert!(!o("7_0").is_snapshot());
    }

    #[test]
    fn serde_round_trips_as_a_string() {
        let json = serde_json::to_string(&o("12_inf")).unwrap();
        assert_eq!(json, "\"12_inf\"");
        assert_eq!(serde_json::from_str::<Offset>(&json).unwrap(), o("12_inf"));
    }
}
