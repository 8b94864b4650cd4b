//! Hybrid logical clock: versions for config records and ids for resets that are monotone
//! even when the wall clock goes back, and that respect causality across nodes (a node
//! that has seen version v only issues versions greater than v).

use std::fmt;

/// An HLC timestamp: wall-clock milliseconds in the high 48 bits, a logical counter in the
/// low 16. Plain `u64` order is the clock's order.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Default,
    serde::Serialize,
    serde::Deserialize,
)]
pub struct Hlc(pub u64);

const LOGICAL_BITS: u32 = 16;

impl Hlc {
    pub fn wall_ms(self) -> i64 {
        (self.0 >> LOGICAL_BITS) as i64
    }

    pub fn from_wall_ms(wall_ms: i64) -> Hlc {
        Hlc((wall_ms.max(0) as u64) << LOGICAL_BITS)
    }
}

impl fmt::Display for Hlc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.wall_ms(), self.0 & 0xffff)
    }
}

/// The clock of one node.
#[derive(Debug, Clone, Default)]
pub struct HlcClock {
    last: Hlc,
}

impl HlcClock {
    /// A new timestamp, strictly greater than every one issued or observed before.
    pub fn now(&mut self, wall_ms: i64) -> Hlc {
        let next = Hlc::from_wall_ms(wall_ms).max(Hlc(self.last.0 + 1));
        debug_assert!(next > self.last, "the HLC never goes back");
        self.last = next;
        next
    }

    /// Takes in a timestamp seen from elsewhere, so later ones are greater.
    pub fn observe(&mut self, seen: Hlc) {
        self.last = self.last.max(seen);
    }

    pub fn last(&self) -> Hlc {
        self.last
    }
}

/// A config version: an HLC timestamp with the writing node as tie-break, so any two
/// versions written anywhere are ordered the same way on every node.
#[derive(
    Debug,
    Clone,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Default,
    serde::Serialize,
    serde::Deserialize,
)]
pub struct Version {
    pub hlc: Hlc,
    pub node: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn monotone_when_wall_clock_goes_back() {
        let mut c = HlcClock::default();
        let a = c.now(10_000);
        let b = c.now(9_000);
        let d = c.now(10_000);
        assert!(a < b && b < d);
        assert_eq!(b.wall_ms(), 10_000);
        let e = c.now(20_000);
        assert_eq!(e, Hlc::from_wall_ms(20_000));
    }

    #[test]
    fn observe_orders_after_remote() {
        let mut c = HlcClock::default();
        c.observe(Hlc::from_wall_ms(50_000));
        let a = c.now(1_000);
        assert!(a > Hlc::from_wall_ms(50_000));
        assert_eq!(a.wall_ms(), 50_000);
    }

    #[test]
    fn versions_tie_break_on_node() {
        let a = Version {
            hlc: Hlc(5),
            node: "a".into(),
        };
        let b = Version {
            hlc: Hlc(5),
            node: "b".into(),
        };
        assert!(a < b);
    }
}
