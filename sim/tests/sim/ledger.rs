//! What the clients did and what the fleet must therefore show: the oracle for I1 and I2.
//!
//! Every attempt to record usage is written down with its outcome and, per limit, the
//! epoch the receiving node called current just before the request and just after the
//! reply. A node's current epoch never goes back, so when both readings agree the record
//! was planned into that epoch; when they differ (a reset or a period boundary landed in
//! between), or the outcome is unknown (crash, timeout), the record may be in any epoch in
//! the range. From that, for every (limit, epoch, origin node) the ledger gives a lower
//! bound (records acknowledged as applied and surely in that epoch) and an upper bound
//! (records that may have been applied there, each id once per node). After heal every
//! node's slot for that origin must lie within the bounds:
//!
//! - below the lower bound = acknowledged usage lost (I1);
//! - above the upper bound = something counted twice or invented (I2).
//!
//! Records that a reset or a period change legitimately discarded are simply in an older
//! epoch: they constrain that epoch, not the current one. Without unknown outcomes and
//! without epoch changes during a request, lower == upper: the check is exact.

use std::collections::{BTreeMap, BTreeSet};

use tally_core::Epoch;

/// How one attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Acknowledged: `true` applied now, `false` the node had applied this id before.
    Acked(bool),
    /// Refused (4xx) or never delivered: surely not applied.
    NotApplied,
    /// May or may not have been applied.
    Unknown,
}

/// Where an attempt may count for one limit.
#[derive(Debug, Clone)]
pub struct Placement {
    pub limit: String,
    /// The node's current epoch before sending (`None`: node down or limit unknown).
    pub pre: Option<Epoch>,
    /// … and after the reply (`None` when the outcome is not an acknowledgement).
    pub post: Option<Epoch>,
    /// For records with an explicit `at`: the period index the oracle assigns it.
    pub at_period: Option<i64>,
}

impl Placement {
    /// Surely planned into this epoch (only meaningful for an applied acknowledgement).
    fn certain(&self) -> Option<Epoch> {
        let (pre, post) = (self.pre?, self.post?);
        match self.at_period {
            // A record with `at` goes to its own period; without resets on this limit the
            // reset part is the spec generation, which pre and post show.
            Some(period) if pre.reset == post.reset => Some(Epoch {
                period,
                reset: pre.reset,
            }),
            Some(_) => None,
            None => (pre == post).then_some(pre),
        }
    }

    fn possible(&self, e: Epoch, unknown: bool) -> bool {
        // Epochs of one spec generation are ordered in time; across a spec change (a
        // period edit) the order of `Epoch` says nothing, so any epoch of another
        // generation than `pre`'s is possible once the fate or the end is unknown.
        let after_pre = |p: Epoch| p <= e || p.reset != e.reset;
        match self.at_period {
            Some(period) => {
                period == e.period
                    && (unknown
                        || self.pre.is_none()
                        || self.post.is_none()
                        || self.pre.is_some_and(|p| p.reset <= e.reset)
                            && self.post.is_some_and(|q| e.reset <= q.reset))
            }
            None if unknown => self.pre.is_none_or(after_pre),
            None => match (self.pre, self.post) {
                (Some(p), Some(q)) if p.reset == q.reset => p <= e && e <= q,
                // A reset or spec change landed during the request: any epoch it passed.
                (Some(_), Some(_)) => true,
                (Some(p), None) => after_pre(p),
                (None, _) => true,
            },
        }
    }
}

#[derive(Debug, Clone)]
pub struct Attempt {
    pub id: String,
    /// The node (name = node id) the request went to.
    pub origin: String,
    /// Per limit metric: tokens for `tokens` limits, 1 for `requests` limits.
    pub tokens: u64,
    pub outcome: Outcome,
    pub placements: Vec<Placement>,
    /// Simulated ms when it was sent, for failure reports.
    pub sent_ms: i64,
}

/// Per limit: how much one record counts (`tokens` or `requests` metric).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    Tokens,
    Requests,
}

#[derive(Debug, Default)]
pub struct Ledger {
    pub attempts: Vec<Attempt>,
    /// Checks that said no (gated traffic not sent).
    pub denied: u64,
    /// Records sent again to another node after an acknowledgement (counted twice by
    /// design: deduplication is per node, DESIGN.md I2).
    pub cross_node_retries: u64,
    /// Hard limit: tokens acknowledged as spent beyond the node's rights (`overrun`).
    pub overrun: u64,
    /// Hard limit: checks denied for `rights` / for `budget`.
    pub denied_rights: u64,
    pub denied_budget: u64,
    /// Hard limit: its `used` in the first check it denied (utilisation at first denial).
    pub first_denial_used: Option<u64>,
    /// Gated records not sent because their check got no answer (fail closed).
    pub check_failed: u64,
    /// Records the client gave up on (never acknowledged within its attempts).
    pub given_up: u64,
}

/// Bounds for one (limit, epoch, origin).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Bounds {
    pub lower: u64,
    pub upper: u64,
}

impl Ledger {
    pub fn push(&mut self, a: Attempt) {
        self.attempts.push(a);
    }

    pub fn acked(&self) -> usize {
        self.attempts
            .iter()
            .filter(|a| matches!(a.outcome, Outcome::Acked(_)))
            .count()
    }

    /// Distinct record ids acknowledged at least once.
    pub fn acked_ids(&self) -> usize {
        self.attempts
            .iter()
            .filter(|a| matches!(a.outcome, Outcome::Acked(_)))
            .map(|a| a.id.as_str())
            .collect::<BTreeSet<_>>()
            .len()
    }

    pub fn unknown(&self) -> usize {
        self.attempts
            .iter()
            .filter(|a| a.outcome == Outcome::Unknown)
            .count()
    }

    /// Origins that took at least one attempt that may have been applied.
    pub fn origins(&self) -> BTreeSet<String> {
        self.attempts
            .iter()
            .filter(|a| a.outcome != Outcome::NotApplied)
            .map(|a| a.origin.clone())
            .collect()
    }

    /// Lower and upper bound of origin `origin`'s slot of `limit` in epoch `e`.
    pub fn bounds(&self, limit: &str, unit: Unit, e: Epoch, origin: &str) -> Bounds {
        // Per id: surely in e / maybe in e.
        let mut per_id: BTreeMap<&str, (bool, bool, u64)> = BTreeMap::new();
        for a in self.attempts.iter().filter(|a| a.origin == origin) {
            let Some(p) = a.placements.iter().find(|p| p.limit == limit) else {
                continue;
            };
            let amount = match unit {
                Unit::Tokens => a.tokens,
                Unit::Requests => 1,
            };
            let entry = per_id.entry(&a.id).or_insert((false, false, amount));
            match a.outcome {
                Outcome::Acked(true) => {
                    entry.0 |= p.certain() == Some(e);
                    entry.1 |= p.possible(e, false);
                }
                Outcome::Unknown => entry.1 |= p.possible(e, true),
                Outcome::Acked(false) | Outcome::NotApplied => {}
            }
        }
        let mut b = Bounds::default();
        for (sure, maybe, amount) in per_id.into_values() {
            if sure {
                b.lower += amount;
            }
            if sure || maybe {
                b.upper += amount;
            }
        }
        b
    }

    /// I2 as the clients see it: per node, an id is acknowledged as applied at most once,
    /// and a "duplicate" reply only follows an attempt that may have applied it.
    pub fn check_dedup(&self) -> Result<(), String> {
        let mut seen: BTreeMap<(&str, &str), (u32, bool)> = BTreeMap::new();
        for a in &self.attempts {
            let e = seen.entry((&a.origin, &a.id)).or_insert((0, false));
            match a.outcome {
                Outcome::Acked(true) => {
                    e.0 += 1;
                    if e.0 > 1 {
                        return Err(format!(
                            "I2: record {} was acknowledged as applied twice by {} (second at {} ms)",
                            a.id, a.origin, a.sent_ms
                        ));
                    }
                    e.1 = true;
                }
                Outcome::Acked(false) if !e.1 => {
                    return Err(format!(
                        "I2: {} answered 'already applied' for record {} that no earlier attempt there could have applied (at {} ms)",
                        a.origin, a.id, a.sent_ms
                    ));
                }
                Outcome::Unknown => e.1 = true,
                _ => {}
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(period: i64, reset: u64) -> Epoch {
        Epoch { period, reset }
    }

    fn attempt(id: &str, outcome: Outcome, pre: Option<Epoch>, post: Option<Epoch>) -> Attempt {
        Attempt {
            id: id.into(),
            origin: "n1".into(),
            tokens: 10,
            outcome,
            placements: vec![Placement {
                limit: "l".into(),
                pre,
                post,
                at_period: None,
            }],
            sent_ms: 0,
        }
    }

    #[test]
    fn bounds_follow_epochs_and_outcomes() {
        let (e1, e2) = (ep(0, 1), ep(0, 2));
        let mut l = Ledger::default();
        l.push(attempt("a", Outcome::Acked(true), Some(e1), Some(e1)));
        l.push(attempt("b", Outcome::Acked(true), Some(e1), Some(e2)));
        l.push(attempt("c", Outcome::Unknown, Some(e2), None));
        l.push(attempt("c", Outcome::Acked(false), Some(e2), Some(e2)));
        l.push(attempt("d", Outcome::NotApplied, Some(e2), None));
        // b straddled a reset; c's fate is unknown and its epoch has another reset part.
        let b1 = l.bounds("l", Unit::Tokens, e1, "n1");
        assert_eq!(
            b1,
            Bounds {
                lower: 10,
                upper: 30
            }
        );
        let b2 = l.bounds("l", Unit::Tokens, e2, "n1");
        assert_eq!(
            b2,
            Bounds {
                lower: 0,
                upper: 20
            }
        );
        assert_eq!(l.bounds("l", Unit::Requests, e2, "n1").upper, 2);
        assert!(l.check_dedup().is_ok());
        l.push(attempt("a", Outcome::Acked(true), Some(e1), Some(e1)));
        assert!(l.check_dedup().is_err());
    }
}
