//! Hard limits: rights move to where the traffic is (ARCHITECTURE.md, "Hard limits").
//!
//! Every gossip round this node looks at each live hard limit:
//! - **Asking.** When its free rights would last less than [`ASK_BELOW_SECS`] at its
//!   recent spend rate, or a check was just denied for want of rights, it publishes a
//!   demand `w/{limit}/{epoch}` naming one donor (the live member with the most free
//!   rights as far as this node knows) and how much it wants: the shortfall, or
//!   [`ASK_SECS`] of its spend rate, or 1% of `max`, whichever is most. It asks again with
//!   a new sequence number once a grant arrived, or after [`ASK_AGAIN_MS`] without one,
//!   and withdraws the demand when it has enough.
//! - **Granting.** For each demand naming this node it has not answered, it gives what
//!   it can spare: the amount asked, up to its free rights minus [`KEEP_SECS`] of its own
//!   spend rate. A grant is a durable row (writer, `Op::Grant`) before it is published.
//!   A node does not grant to a node that granted to it within [`NO_REGRANT_MS`], so
//!   rights do not ping-pong between two busy nodes.
//!
//! Nothing here decides safety: a node spends only rights the state says it holds, and a
//! grant is checked against the donor's free rights when the writer commits it. This
//! only decides where rights should go.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use tally_core::{Epoch, LimitIdx};
use tally_gossip::{Demand, GossipKey, Member, encode_demand};

use crate::cluster::ClusterHandle;
use crate::writer::Op;
use crate::{Metrics, Shared};

/// Ask when free rights would last less than this at the current spend rate.
pub(crate) const ASK_BELOW_SECS: f64 = 2.0;
/// Ask for this much of the spend rate.
pub(crate) const ASK_SECS: f64 = 5.0;
/// A donor keeps this much of its own spend rate.
pub(crate) const KEEP_SECS: f64 = 10.0;
/// Ask again (maybe another donor) when a demand went unanswered this long.
pub(crate) const ASK_AGAIN_MS: i64 = 2_000;
/// Do not grant to a node that granted to this one this recently.
pub(crate) const NO_REGRANT_MS: i64 = 5_000;
/// A donor that left a demand unanswered is not asked again for this long (it may be
/// cut off while still looking live).
pub(crate) const SILENT_DONOR_MS: i64 = 10_000;

struct Ask {
    key: String,
    donor: String,
    at_ms: i64,
    /// What this node had received in total when it asked.
    received: u64,
}

pub(crate) struct RightsTask {
    seq: u64,
    asks: HashMap<(LimitIdx, Epoch), Ask>,
    /// Demands answered: (asker, limit, epoch) → sequence number.
    answered: HashMap<(String, String, Epoch), u64>,
    /// Grants to this node: (limit, epoch, from) → (total, when it last rose).
    received: HashMap<(LimitIdx, Epoch, String), (u64, i64)>,
    /// Donors that left a demand unanswered, and when.
    silent: HashMap<String, i64>,
}

/// What one round decided: gossip to publish, keys to withdraw, grants for the writer.
pub(crate) type Round = (Vec<(GossipKey, String)>, Vec<String>, Vec<Op>);

impl RightsTask {
    pub(crate) fn new(now_ms: i64) -> RightsTask {
        RightsTask {
            // Sequence numbers grow across restarts, so donors never take a new demand
            // for one they already answered.
            seq: now_ms.max(0) as u64,
            asks: HashMap::new(),
            answered: HashMap::new(),
            received: HashMap::new(),
            silent: HashMap::new(),
        }
    }

    pub(crate) fn round(
        &mut self,
        s: &Shared,
        c: &ClusterHandle,
        members: &[Member],
        every: Duration,
    ) -> Round {
        let now = s.clock.now_ms();
        let me = s.node_id.as_str();
        let live: HashSet<&str> = members
            .iter()
            .filter(|m| m.live && m.verified && m.node_id != me)
            .map(|m| m.node_id.as_str())
            .collect();
        let shortfall = s.escrow.0.lock().sample(every.as_secs_f64());
        let mut publish = Vec::new();
        let mut unpublish = Vec::new();
        let mut grants = Vec::new();
        let state = s.state.read();
        let esc = s.escrow.0.lock();
        let hard = state.hard_limits(now);
        let current: HashMap<LimitIdx, Epoch> = hard.iter().map(|&(l, e, _)| (l, e)).collect();
        let retired = state.decommission(me).is_some();
        let mut asked = 0u64;

        for &(idx, epoch, max) in &hard {
            let table = state.rights_table(idx, epoch);
            for (name, _, _) in &table {
                if *name == me {
                    continue;
                }
                let v = state.grant(idx, epoch, name, me);
                let e = self
                    .received
                    .entry((idx, epoch, name.to_string()))
                    .or_insert((0, i64::MIN));
                if v > e.0 {
                    *e = (v, now);
                }
            }
            if retired {
                continue;
            }
            let free = state
                .hard_free(idx, epoch, esc.held(idx, epoch))
                .unwrap_or(0);
            let rate = esc.rate(idx);
            let short = shortfall.get(&idx).copied();
            let low = short.is_some() || free < (ASK_BELOW_SECS * rate).ceil() as i128;
            let received = table
                .iter()
                .find(|(n, _, _)| *n == me)
                .map_or(0, |(_, r, _)| r.received);
            if let Some(a) = self
                .asks
                .get(&(idx, epoch))
                .filter(|a| received > a.received)
            {
                // Answered (this round replaces or withdraws the demand).
                let mut w = s.rights_waits.lock();
                if w.len() == 1000 {
                    w.pop_front();
                }
                w.push_back(now.saturating_sub(a.at_ms));
            }
            if !low || esc.fenced(now) {
                if let Some(a) = self.asks.remove(&(idx, epoch)) {
                    unpublish.push(a.key);
                }
                continue;
            }
            if let Some(a) = self.asks.get(&(idx, epoch)) {
                if received == a.received {
                    if now.saturating_sub(a.at_ms) < ASK_AGAIN_MS {
                        continue; // still waiting for an answer
                    }
                    self.silent.insert(a.donor.clone(), now);
                }
            }
            self.silent
                .retain(|_, at| now.saturating_sub(*at) < SILENT_DONOR_MS);
            let donor = table
                .iter()
                .filter(|(n, _, f)| {
                    *n != me
                        && *f > 0
                        && live.contains(n)
                        && !self.silent.contains_key(*n)
                        && state.decommission(n).is_none()
                })
                .max_by(|a, b| a.2.cmp(&b.2).then(b.0.cmp(a.0)));
            let Some((donor, _, _)) = donor else {
                if let Some(a) = self.asks.remove(&(idx, epoch)) {
                    unpublish.push(a.key);
                }
                continue;
            };
            let want = short
                .unwrap_or(0)
                .max((ASK_SECS * rate).ceil() as u64)
                .max(max / 100)
                .max(1);
            self.seq += 1;
            let key = GossipKey::Demand {
                limit: state.limit_id(idx).to_string(),
                epoch,
            };
            let demand = Demand {
                donor: donor.to_string(),
                want,
                seq: self.seq,
            };
            tracing::debug!(limit = %state.limit_id(idx), %epoch, donor = %demand.donor, want, free, rate, "asking for rights");
            self.asks.insert(
                (idx, epoch),
                Ask {
                    key: key.encode(),
                    donor: demand.donor.clone(),
                    at_ms: now,
                    received,
                },
            );
            publish.push((key, encode_demand(&demand)));
            asked = asked.saturating_add(want);
        }
        // Demands of epochs no longer current are withdrawn.
        self.asks.retain(|(l, e), a| {
            let keep = current.get(l) == Some(e);
            if !keep {
                unpublish.push(a.key.clone());
            }
            keep
        });
        self.received
            .retain(|(l, e, _), _| current.get(l) == Some(e));

        // Answer demands naming this node.
        let mut demands = c.demands.lock();
        demands.retain(|(_, limit, epoch), _| {
            state
                .limit_idx(limit)
                .is_some_and(|l| current.get(&l) == Some(epoch))
        });
        self.answered.retain(|k, _| demands.contains_key(k));
        if !retired && !esc.fenced(now) {
            let mut given: HashMap<LimitIdx, u64> = HashMap::new();
            for ((from, limit, epoch), d) in demands.iter() {
                if d.donor != me {
                    continue;
                }
                let key = (from.clone(), limit.clone(), *epoch);
                if self.answered.get(&key).is_some_and(|&seq| seq >= d.seq) {
                    continue;
                }
                self.answered.insert(key, d.seq);
                if !live.contains(from.as_str()) || state.decommission(from).is_some() {
                    continue;
                }
                let Some(idx) = state.limit_idx(limit) else {
                    continue;
                };
                if self
                    .received
                    .get(&(idx, *epoch, from.clone()))
                    .is_some_and(|&(_, at)| now.saturating_sub(at) < NO_REGRANT_MS)
                {
                    continue;
                }
                let already = given.get(&idx).copied().unwrap_or(0);
                let free = state
                    .hard_free(idx, *epoch, esc.held(idx, *epoch).saturating_add(already))
                    .unwrap_or(0);
                let keep = (KEEP_SECS * esc.rate(idx)).ceil() as i128;
                let give = (free - keep).min(i128::from(d.want));
                if give <= 0 {
                    continue;
                }
                let give = give as u64;
                *given.entry(idx).or_default() += give;
                grants.push(Op::Grant {
                    limit: limit.clone(),
                    epoch: *epoch,
                    to: from.clone(),
                    amount: give,
                    reply: None,
                });
            }
        }
        drop(demands);
        drop(esc);
        drop(state);
        if asked > 0 {
            Metrics::add(&s.metrics.rights_asked_total, asked);
        }
        (publish, unpublish, grants)
    }
}
