//! Closed epochs as history: reading a limit's epochs back, newest first, and dropping
//! those older than the retention a bounded number of rows at a time.
//!
//! History lives in the slot tables themselves (`own_slots`, `peer_slots`), plus
//! `epoch_baselines`: the usage an epoch started with (a set-usage reset), kept per epoch
//! because the reset register holds only the latest one. What is old enough to drop is
//! decided by the caller (tally-core knows periods); this module only walks the tables:
//! per limit (per origin and limit for peers), from the oldest epoch, deleting while the
//! caller says "expired" and moving to the next limit at the first epoch it keeps.

use std::collections::BTreeMap;

use redb::{ReadableTable, TableDefinition, WriteTransaction};
use tally_core::Epoch;

use crate::{OWN_SLOTS, PEER_SLOTS, StoreError};

/// (limit id, period, reset) → the baseline of that epoch.
pub(crate) const BASELINES: TableDefinition<(&str, i64, u64), u64> =
    TableDefinition::new("epoch_baselines");

/// Where a history sweep resumes: one table after the other, limit by limit.
#[derive(Debug, Clone, Default)]
pub struct SweepCursor {
    table: SweepTable,
    /// The first key of the next group (limit id, or origin and limit id).
    limit: String,
    origin: String,
}

impl SweepCursor {
    /// Whether the next pass starts a new sweep (the last one reached the end).
    pub fn is_at_start(&self) -> bool {
        self.table == SweepTable::Own && self.limit.is_empty() && self.origin.is_empty()
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum SweepTable {
    #[default]
    Own,
    Peer,
    Baselines,
}

/// The smallest string greater than `s`: the start of the next group.
fn after(s: &str) -> String {
    format!("{s}\0")
}

/// One pass of the sweep: reads at most `rows_max` rows, deletes those of epochs
/// `expired(limit, epoch)` says may go. Returns the rows deleted.
pub(crate) fn sweep(
    txn: &WriteTransaction,
    cursor: &mut SweepCursor,
    rows_max: usize,
    expired: &mut dyn FnMut(&str, Epoch) -> bool,
) -> Result<usize, StoreError> {
    let mut budget = rows_max;
    let mut deleted = 0;
    while budget > 0 {
        let done = match cursor.table {
            SweepTable::Own => {
                sweep_by_limit(txn, OWN_SLOTS, cursor, &mut budget, &mut deleted, expired)?
            }
            SweepTable::Baselines => {
                sweep_by_limit(txn, BASELINES, cursor, &mut budget, &mut deleted, expired)?
            }
            SweepTable::Peer => sweep_peers(txn, cursor, &mut budget, &mut deleted, expired)?,
        };
        if !done {
            break;
        }
        let next = match cursor.table {
            SweepTable::Own => SweepTable::Peer,
            SweepTable::Peer => SweepTable::Baselines,
            SweepTable::Baselines => {
                // A whole sweep is over; the next pass starts again.
                *cursor = SweepCursor::default();
                break;
            }
        };
        *cursor = SweepCursor {
            table: next,
            ..SweepCursor::default()
        };
    }
    Ok(deleted)
}

/// Sweeps a table keyed (limit, period, reset). Returns whether it reached the end.
fn sweep_by_limit(
    txn: &WriteTransaction,
    def: TableDefinition<(&str, i64, u64), u64>,
    cursor: &mut SweepCursor,
    budget: &mut usize,
    deleted: &mut usize,
    expired: &mut dyn FnMut(&str, Epoch) -> bool,
) -> Result<bool, StoreError> {
    let mut t = txn.open_table(def)?;
    loop {
        let Some(first) = t.range((cursor.limit.as_str(), i64::MIN, 0)..)?.next() else {
            return Ok(true);
        };
        let limit = first?.0.value().0.to_string();
        let mut doomed = Vec::new();
        let mut finished = false;
        for row in t.range((limit.as_str(), i64::MIN, 0)..=(limit.as_str(), i64::MAX, u64::MAX))? {
            if *budget == 0 {
                break;
            }
            *budget -= 1;
            let (_, period, reset) = row?.0.value();
            if !expired(&limit, Epoch { period, reset }) {
                finished = true;
                break;
            }
            doomed.push((period, reset));
        }
        let whole_group = finished || *budget > 0;
        for (period, reset) in &doomed {
            t.remove((limit.as_str(), *period, *reset))?;
        }
        *deleted += doomed.len();
        if !whole_group {
            cursor.limit = limit;
            return Ok(false);
        }
        cursor.limit = after(&limit);
        if *budget == 0 {
            return Ok(false);
        }
    }
}

/// Sweeps `peer_slots`, keyed (origin, limit, period, reset), by (origin, limit).
fn sweep_peers(
    txn: &WriteTransaction,
    cursor: &mut SweepCursor,
    budget: &mut usize,
    deleted: &mut usize,
    expired: &mut dyn FnMut(&str, Epoch) -> bool,
) -> Result<bool, StoreError> {
    let mut t = txn.open_table(PEER_SLOTS)?;
    loop {
        let start = (cursor.origin.as_str(), cursor.limit.as_str(), i64::MIN, 0);
        let Some(first) = t.range(start..)?.next() else {
            return Ok(true);
        };
        let (origin, limit) = {
            let k = first?.0;
            let (o, l, _, _) = k.value();
            (o.to_string(), l.to_string())
        };
        let group = (origin.as_str(), limit.as_str(), i64::MIN, 0)
            ..=(origin.as_str(), limit.as_str(), i64::MAX, u64::MAX);
        let mut doomed = Vec::new();
        let mut finished = false;
        for row in t.range(group)? {
            if *budget == 0 {
                break;
            }
            *budget -= 1;
            let (_, _, period, reset) = row?.0.value();
            if !expired(&limit, Epoch { period, reset }) {
                finished = true;
                break;
            }
            doomed.push((period, reset));
        }
        let whole_group = finished || *budget > 0;
        for (period, reset) in &doomed {
            t.remove((origin.as_str(), limit.as_str(), *period, *reset))?;
        }
        *deleted += doomed.len();
        if !whole_group {
            cursor.origin = origin;
            cursor.limit = limit;
            return Ok(false);
        }
        cursor.origin = origin;
        cursor.limit = after(&limit);
        if *budget == 0 {
            return Ok(false);
        }
    }
}

/// What a history read does with an epoch it meets, going back in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HistoryScan {
    Take,
    Skip,
    /// This epoch and every older one are out of range.
    Stop,
}

/// The rows of one epoch of a limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EpochRows {
    pub epoch: Epoch,
    /// This node's slot, if it has one.
    pub own: Option<u64>,
    /// Other origins' slots as last heard.
    pub peers: Vec<(String, u64)>,
    pub baseline: Option<u64>,
}

/// Most rows one history read looks at in each table (per origin for peers), skipped
/// ones included.
const HISTORY_ROWS_SCANNED_MAX: usize = 100_000;

/// The newest `epochs_max` epochs of `limit` that started at or before `until_period`
/// and that `scan` takes, newest first.
pub(crate) fn read(
    txn: &redb::ReadTransaction,
    limit: &str,
    until_period: i64,
    epochs_max: usize,
    scan: &mut dyn FnMut(Epoch) -> HistoryScan,
) -> Result<Vec<EpochRows>, StoreError> {
    let mut out: BTreeMap<Epoch, EpochRows> = BTreeMap::new();
    let range = (limit, i64::MIN, 0)..=(limit, until_period, u64::MAX);
    // Each source contributes its newest `epochs_max` taken epochs: the newest
    // `epochs_max` of the union are among them, with every source's value.
    let mut take = |out: &mut BTreeMap<Epoch, EpochRows>,
                    rows: &mut dyn Iterator<Item = Result<(Epoch, u64), StoreError>>,
                    put: &mut dyn FnMut(&mut EpochRows, u64)|
     -> Result<(), StoreError> {
        let mut taken = 0;
        for row in rows.take(HISTORY_ROWS_SCANNED_MAX) {
            let (epoch, value) = row?;
            match scan(epoch) {
                HistoryScan::Skip => continue,
                HistoryScan::Stop => break,
                HistoryScan::Take => {}
            }
            let rows = out.entry(epoch).or_insert_with(|| EpochRows {
                epoch,
                own: None,
                peers: Vec::new(),
                baseline: None,
            });
            put(rows, value);
            taken += 1;
            if taken == epochs_max {
                break;
            }
        }
        Ok(())
    };
    let own = txn.open_table(OWN_SLOTS)?;
    let mut rows = own.range(range.clone())?.rev().map(|r| {
        let (k, v) = r?;
        let (_, period, reset) = k.value();
        Ok((Epoch { period, reset }, v.value()))
    });
    take(&mut out, &mut rows, &mut |e, v| e.own = Some(v))?;
    let baselines = txn.open_table(BASELINES)?;
    let mut rows = baselines.range(range)?.rev().map(|r| {
        let (k, v) = r?;
        let (_, period, reset) = k.value();
        Ok((Epoch { period, reset }, v.value()))
    });
    take(&mut out, &mut rows, &mut |e, v| e.baseline = Some(v))?;
    // Peers: one range per origin, jumping from origin to origin.
    let peers = txn.open_table(PEER_SLOTS)?;
    let mut origin = String::new();
    loop {
        let next = peers.range((origin.as_str(), "", i64::MIN, 0)..)?.next();
        let Some(first) = next else { break };
        origin = first?.0.value().0.to_string();
        let range = (origin.as_str(), limit, i64::MIN, 0)
            ..=(origin.as_str(), limit, until_period, u64::MAX);
        let mut rows = peers.range(range)?.rev().map(|r| {
            let (k, v) = r?;
            let (_, _, period, reset) = k.value();
            Ok((Epoch { period, reset }, v.value()))
        });
        let name = origin.clone();
        take(&mut out, &mut rows, &mut |e, v| {
            e.peers.push((name.clone(), v))
        })?;
        origin = after(&origin);
    }
    Ok(out.into_values().rev().take(epochs_max).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Store;
    use tally_core::{Hlc, ResetRegister, Version};

    fn e(period: i64, reset: u64) -> Epoch {
        Epoch { period, reset }
    }

    /// Own slots of limits a and b at periods 1..=5, peers p and q for a at 1..=5, and a
    /// baseline of a at period 2.
    fn fill(s: &mut Store) {
        let mut b = s.batch().unwrap();
        for p in 1..=5 {
            b.put_own_slot("a", e(p, 0), 10 * p as u64).unwrap();
            b.put_own_slot("b", e(p, 0), p as u64).unwrap();
            b.merge_peer_slot("p", "a", e(p, 0), 100 * p as u64)
                .unwrap();
            b.merge_peer_slot("q", "a", e(p, 0), 1000 * p as u64)
                .unwrap();
        }
        let reg = ResetRegister {
            spec_gen: Hlc(0),
            period: 2,
            reset: Version {
                hlc: Hlc(0),
                node: "n".into(),
            },
            baseline: 7,
        };
        b.put_reset("a", &reg).unwrap();
        b.commit().unwrap();
    }

    #[test]
    fn history_reads_every_source_newest_first() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(dir.path()).unwrap();
        fill(&mut s);
        let all = s
            .history("a", i64::MAX, 10, &mut |_| HistoryScan::Take)
            .unwrap();
        assert_eq!(all.len(), 5);
        assert_eq!(
            all[3],
            EpochRows {
                epoch: e(2, 0),
                own: Some(20),
                peers: vec![("p".into(), 200), ("q".into(), 2000)],
                baseline: Some(7),
            }
        );
        assert_eq!(
            all.iter().map(|r| r.epoch.period).collect::<Vec<_>>(),
            vec![5, 4, 3, 2, 1]
        );
        // until, a page size, a skip and a stop.
        let page = s
            .history("a", 4, 2, &mut |e| match e.period {
                3 => HistoryScan::Skip,
                1 => HistoryScan::Stop,
                _ => HistoryScan::Take,
            })
            .unwrap();
        assert_eq!(
            page.iter().map(|r| r.epoch.period).collect::<Vec<_>>(),
            vec![4, 2]
        );
        assert!(
            s.history("zz", i64::MAX, 10, &mut |_| HistoryScan::Take)
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn sweep_drops_expired_epochs_in_bounded_passes() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(dir.path()).unwrap();
        fill(&mut s);
        // Epochs up to period 3 of a, and every epoch of b, expire; period 2 of a is
        // kept (as if still needed), which keeps 3 too: a limit's sweep stops there.
        let mut expired = |l: &str, e: Epoch| l == "b" || (e.period <= 3 && e.period != 2);
        let mut cursor = SweepCursor::default();
        let mut passes = 0;
        let mut deleted = 0;
        loop {
            let mut b = s.batch().unwrap();
            let n = b.sweep_history(&mut cursor, 2, &mut expired).unwrap();
            b.commit().unwrap();
            passes += 1;
            deleted += n;
            if cursor.table == SweepTable::Own && cursor.limit.is_empty() && passes > 1 {
                break;
            }
            assert!(passes < 100);
        }
        // a/1 own, b/1-5 own, p/a/1 and q/a/1: 8 rows.
        assert_eq!(deleted, 8);
        assert!(passes > 4, "2 rows a pass: {passes}");
        let left = s
            .history("a", i64::MAX, 10, &mut |_| HistoryScan::Take)
            .unwrap();
        assert_eq!(
            left.iter().map(|r| r.epoch.period).collect::<Vec<_>>(),
            vec![5, 4, 3, 2]
        );
        assert_eq!(left[3].peers.len(), 2);
        assert!(
            s.history("b", i64::MAX, 10, &mut |_| HistoryScan::Take)
                .unwrap()
                .is_empty()
        );
        // Everything expires: the baseline goes too.
        let mut b = s.batch().unwrap();
        let mut cursor = SweepCursor::default();
        assert_eq!(
            b.sweep_history(&mut cursor, 1000, &mut |_, _| true)
                .unwrap(),
            13
        );
        b.commit().unwrap();
        assert!(
            s.history("a", i64::MAX, 10, &mut |_| HistoryScan::Take)
                .unwrap()
                .is_empty()
        );
    }
}
