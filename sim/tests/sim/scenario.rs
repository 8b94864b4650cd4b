//! Scenarios as data: a [`Plan`] is a fleet, its clocks, its limits and a list of [`Op`]s
//! that one executor (`fleet.rs`) runs. Each scenario is a function from a seeded RNG to a
//! plan, so a seed names one concrete run and the failing plan can be printed.
//!
//! Every plan has a fault phase (partitions, loss, crashes, skew, resets, edits, retries)
//! under continuous safety checks, then `Heal`, after which the fleet must converge (I4)
//! to exactly what the clients were told (I1, I2), then `BadInput` (I8).

use sim::Rng;
use tally_node::StorageHealth;

/// Node-to-node latency when nothing else is set (ms).
pub const LATENCY_MS: u64 = 5;

/// A limit the plan creates (tokens or requests metric, so amounts are exact integers).
#[derive(Debug, Clone)]
pub struct LimitDef {
    pub id: &'static str,
    /// `tokens` or `requests`.
    pub metric: &'static str,
    pub max: u64,
    pub period: &'static str,
    pub aligned: bool,
    pub timezone: &'static str,
    /// A hard limit (I7) whose scope only reserved, gated traffic matches (`gate=hard`).
    pub hard: bool,
}

impl LimitDef {
    pub fn body(&self) -> serde_json::Value {
        let mut b = serde_json::json!({
            "scope": {"team": "eng"},
            "metric": self.metric,
            "max": self.max,
            "period": self.period,
            "calendar_aligned": self.aligned,
            "timezone": self.timezone,
        });
        if self.hard {
            b["scope"]["gate"] = "hard".into();
            b["mode"] = "hard".into();
        }
        b
    }

    /// The hard limit every plan has: the same budget as `budget`, spent only by gated
    /// traffic, which reserves before it records.
    pub fn hard(max: u64) -> LimitDef {
        LimitDef {
            id: "hard",
            metric: "tokens",
            max,
            period: "never",
            aligned: false,
            timezone: "UTC",
            hard: true,
        }
    }
}

/// What a client does when a record's fate is unknown, or after it was acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// Retry the same id at the same node until acknowledged (a careful gateway).
    UntilAcked,
    /// After the acknowledgement, send the same id to the same node again (lost reply).
    DuplicateSame,
    /// After the acknowledgement, send the same id to another node (a failover).
    OtherNode,
}

/// Client traffic, run in the background by the simulated gateway.
#[derive(Debug, Clone)]
pub struct Traffic {
    /// Prefix of record ids (unique per plan).
    pub tag: String,
    /// Node indexes the records go to (chosen per record by `seed`).
    pub nodes: Vec<usize>,
    pub count: u32,
    pub tokens: (u64, u64),
    /// Pause between records; 0 sends them all at once (concurrently).
    pub spacing_ms: u64,
    /// Ask `/v1/check` first and send only if allowed (measures overshoot).
    pub gated: bool,
    pub retry: Retry,
    /// Give every record an explicit `at` this many ms before (negative: after) the
    /// receiving node's clock, drawn in this range; `None` lets the node stamp it.
    pub at_back_ms: Option<(i64, i64)>,
    pub seed: u64,
}

#[derive(Debug, Clone)]
pub enum Op {
    Traffic(Traffic),
    /// Wait until all background traffic is done.
    Drain,
    Wait(u64),
    /// Cut every link between the two sides (both directions).
    Partition(Vec<usize>, Vec<usize>),
    /// Cut only `from → to`.
    OneWay(usize, usize),
    /// Repair every node-to-node link (no convergence check).
    Repair,
    /// Hold messages between two sides (delivered at `Release`).
    Hold(Vec<usize>, Vec<usize>),
    Release(Vec<usize>, Vec<usize>),
    /// Message loss rate on every node-to-node link.
    Loss(f64),
    /// Maximum latency on every node-to-node link (random below it: reordering).
    Latency(u64),
    /// Partition and repair two sides alternately.
    Flap {
        a: Vec<usize>,
        b: Vec<usize>,
        every_ms: u64,
        times: u32,
    },
    Crash(usize),
    Restart(usize),
    /// Send `records` records at once to the node and crash it while its writer is busy
    /// with them (in the middle of a group commit), then keep it down.
    CrashMidCommit {
        node: usize,
        records: u32,
        seed: u64,
    },
    /// Cut the node's power while its writer is inside the sync of a group commit: syncs
    /// are held, a burst of `records` is sent, and once the writer waits in its sync the
    /// power goes. Unsynced writes are lost; `torn`: a random prefix of them reached the
    /// disk and the next one only up to a random byte. The node stays down.
    PowerLossMidCommit {
        node: usize,
        records: u32,
        torn: bool,
        seed: u64,
    },
    /// The node's next `count` syncs fail with an I/O error (`None`: all, until `FixDisk`).
    FailSyncs {
        node: usize,
        count: Option<u32>,
    },
    /// No free block left on the node's disk. `copy_on_write`: the file system allocates on
    /// every write (btrfs, ZFS), so the next commit fails; otherwise rewriting allocated
    /// blocks still works (tmpfs, ext4), so a restart can recover the database.
    FillDisk {
        node: usize,
        copy_on_write: bool,
    },
    /// The node's disk gets its space back and syncs work again (an operator fixed it).
    FixDisk(usize),
    /// Step until the node reports this storage health (fail after `within_ms`).
    ExpectStorage {
        node: usize,
        want: StorageHealth,
        within_ms: u64,
    },
    /// Crash the node for good (a power loss; it never comes back).
    Remove(usize),
    /// Start a node that was not running yet (a spare).
    Join(usize),
    /// Create or edit a limit through a node's HTTP API.
    PutLimit {
        node: usize,
        def: LimitDef,
    },
    /// Reset a limit through a node's HTTP API (`used`: a set-usage).
    Reset {
        node: usize,
        id: &'static str,
        used: Option<u64>,
    },
    /// Wait until every running node shows the same state (no fault is active).
    Settle,
    /// Repair every link, restart every crashed node, then measure convergence (I4) and
    /// check it against the ledger (I1, I2).
    Heal,
    /// Malformed requests through the router change nothing (I8).
    BadInput(usize),
    /// An operator decommissions `node` through `via`'s API, naming `via` its successor.
    Decommission {
        node: usize,
        via: usize,
    },
}

#[derive(Debug, Clone)]
pub struct Plan {
    pub nodes: usize,
    /// Extra hosts that start only at `Join`.
    pub spares: usize,
    /// Where the node clocks start (plus simulated time, plus skew).
    pub start: &'static str,
    pub skews_ms: Vec<i64>,
    pub limits: Vec<LimitDef>,
    pub ops: Vec<Op>,
}

/// The limits every plan has: an all-time total, a budget the gated traffic exhausts
/// (overshoot), and a daily request count.
fn base_limits(budget: u64) -> Vec<LimitDef> {
    vec![
        LimitDef {
            id: "total",
            metric: "tokens",
            max: 1_000_000_000,
            period: "never",
            aligned: false,
            timezone: "UTC",
            hard: false,
        },
        LimitDef {
            id: "budget",
            metric: "tokens",
            max: budget,
            period: "never",
            aligned: false,
            timezone: "UTC",
            hard: false,
        },
        LimitDef {
            id: "daily",
            metric: "requests",
            max: 1_000_000,
            period: "1d",
            aligned: true,
            timezone: "UTC",
            hard: false,
        },
        LimitDef::hard(budget),
    ]
}

fn traffic(rng: &mut Rng, tag: &str, nodes: Vec<usize>, count: u32, gated: bool) -> Traffic {
    Traffic {
        tag: tag.to_string(),
        nodes,
        count,
        tokens: (1, 100),
        spacing_ms: rng.range(20, 60),
        gated,
        retry: Retry::UntilAcked,
        at_back_ms: None,
        seed: rng.next_u64(),
    }
}

/// Splits `0..n` into two non-empty random sides.
fn split(rng: &mut Rng, n: usize) -> (Vec<usize>, Vec<usize>) {
    let mut all: Vec<usize> = (0..n).collect();
    rng.shuffle(&mut all);
    let k = rng.range(1, n as u64 - 1) as usize;
    let (a, b) = all.split_at(k);
    (a.to_vec(), b.to_vec())
}

fn finish(rng: &mut Rng, n: usize, mut ops: Vec<Op>) -> Vec<Op> {
    ops.push(Op::Drain);
    ops.push(Op::Heal);
    ops.push(Op::BadInput(rng.below(n as u64) as usize));
    ops
}

const START: &str = "2025-03-14T12:00:00Z";

/// A plan of `n` nodes with synchronised clocks from [`START`], the base limits and
/// `ops`, finished by the heal and bad-input steps.
fn plan(rng: &mut Rng, n: usize, budget: u64, ops: Vec<Op>) -> Plan {
    Plan {
        nodes: n,
        spares: 0,
        start: START,
        skews_ms: vec![0; n],
        limits: base_limits(budget),
        ops: finish(rng, n, ops),
    }
}

/// The fleet cut in two with gated traffic on both sides, then healed.
pub fn split_brain(rng: &mut Rng) -> Plan {
    let n = rng.range(3, 5) as usize;
    let (a, b) = split(rng, n);
    let mut ops = vec![
        Op::Traffic(traffic(rng, "pre", (0..n).collect(), 10, true)),
        Op::Wait(rng.range(200, 800)),
        Op::Partition(a.clone(), b.clone()),
    ];
    ops.push(Op::Traffic(traffic(rng, "a", a, 60, true)));
    ops.push(Op::Traffic(traffic(rng, "b", b, 60, true)));
    ops.push(Op::Wait(rng.range(1500, 3000)));
    plan(rng, n, 2_500, ops)
}

/// Asymmetric and flapping links, message loss, delay and reordering, held messages.
pub fn flaky_links(rng: &mut Rng) -> Plan {
    let n = rng.range(3, 4) as usize;
    let (a, b) = split(rng, n);
    let x = rng.below(n as u64) as usize;
    let y = (x + 1 + rng.below(n as u64 - 1) as usize) % n;
    let mut ops = vec![
        Op::Traffic(Traffic {
            spacing_ms: rng.range(30, 60),
            ..traffic(rng, "t", (0..n).collect(), 90, true)
        }),
        Op::Latency(rng.range(50, 250)),
        Op::Loss([0.1, 0.3, 0.5][rng.below(3) as usize]),
        Op::Wait(rng.range(300, 800)),
        Op::OneWay(x, y),
        Op::Wait(rng.range(300, 800)),
    ];
    if rng.chance(0.5) {
        ops.push(Op::Hold(a.clone(), b.clone()));
        ops.push(Op::Wait(rng.range(300, 800)));
        ops.push(Op::Release(a.clone(), b.clone()));
    } else {
        ops.push(Op::Flap {
            a: a.clone(),
            b: b.clone(),
            every_ms: rng.range(100, 400),
            times: rng.range(2, 5) as u32,
        });
    }
    ops.push(Op::Wait(rng.range(200, 600)));
    plan(rng, n, 3_000, ops)
}

/// A crash in the middle of a group commit, a restart, and clients retrying the same ids
/// at the restarted node.
pub fn crash_commit(rng: &mut Rng) -> Plan {
    let n = 3;
    let victim = rng.below(n as u64) as usize;
    let other = (victim + 1 + rng.below(2) as usize) % n;
    let mut ops = vec![
        Op::Traffic(traffic(rng, "bg", (0..n).collect(), 40, false)),
        Op::Wait(rng.range(100, 500)),
        Op::CrashMidCommit {
            node: victim,
            records: rng.range(5, 40) as u32,
            seed: rng.next_u64(),
        },
        Op::Wait(rng.range(100, 1500)),
        Op::Restart(victim),
        Op::Wait(rng.range(200, 800)),
    ];
    if rng.chance(0.5) {
        ops.push(Op::Crash(other));
        ops.push(Op::Wait(rng.range(200, 1000)));
        ops.push(Op::Restart(other));
    }
    plan(rng, n, 1_000_000, ops)
}

/// Power cut inside a group commit (every page written, the sync not done): the unsynced
/// writes are lost; the node restarts from what was synced while clients retry.
pub fn power_loss(rng: &mut Rng) -> Plan {
    cut_mid_commit(rng, false)
}

/// Like [`power_loss`], but part of the unsynced writes reached the disk and the next
/// one was torn (a random prefix of its bytes): redb must recover the previous commit or
/// the complete new one, never a mix.
pub fn torn_write(rng: &mut Rng) -> Plan {
    cut_mid_commit(rng, true)
}

fn cut_mid_commit(rng: &mut Rng, torn: bool) -> Plan {
    let n = 3;
    let victim = rng.below(n as u64) as usize;
    let mut ops = vec![
        Op::Traffic(traffic(rng, "bg", (0..n).collect(), 40, false)),
        Op::Wait(rng.range(100, 500)),
    ];
    for _ in 0..rng.range(1, 2) {
        ops.extend([
            Op::PowerLossMidCommit {
                node: victim,
                records: rng.range(5, 40) as u32,
                torn,
                seed: rng.next_u64(),
            },
            Op::Wait(rng.range(100, 1500)),
            Op::Restart(victim),
            Op::Wait(rng.range(200, 800)),
        ]);
    }
    plan(rng, n, 1_000_000, ops)
}

/// A sync fails under load: the node must not acknowledge that commit, must stop writing
/// and report it (fsyncgate), until the operator fixes the disk and restarts it (a power
/// cycle: only what was synced survives).
pub fn sync_error(rng: &mut Rng) -> Plan {
    let n = 3;
    let victim = rng.below(n as u64) as usize;
    let count = if rng.chance(0.5) {
        Some(rng.range(1, 3) as u32)
    } else {
        None
    };
    let ops = vec![
        Op::Traffic(Traffic {
            spacing_ms: rng.range(10, 30),
            ..traffic(rng, "t", (0..n).collect(), 80, false)
        }),
        Op::Wait(rng.range(100, 800)),
        Op::FailSyncs {
            node: victim,
            count,
        },
        Op::ExpectStorage {
            node: victim,
            want: StorageHealth::Failed,
            within_ms: 10_000,
        },
        Op::Wait(rng.range(200, 1500)),
        Op::FixDisk(victim),
        Op::Crash(victim),
        Op::Wait(rng.range(100, 500)),
        Op::Restart(victim),
        Op::ExpectStorage {
            node: victim,
            want: StorageHealth::Ok,
            within_ms: 1_000,
        },
        Op::Wait(rng.range(200, 800)),
    ];
    plan(rng, n, 1_000_000, ops)
}

/// A node's disk fills under load: its writes are refused (503) while checks answer and
/// the others go on; when space returns it writes again by itself, without a restart.
/// Some runs also restart it while the disk is full.
pub fn disk_full(rng: &mut Rng) -> Plan {
    let n = 3;
    let victim = rng.below(n as u64) as usize;
    let mut ops = vec![
        Op::Traffic(Traffic {
            spacing_ms: rng.range(10, 30),
            ..traffic(rng, "t", (0..n).collect(), 80, false)
        }),
        Op::Traffic(Traffic {
            spacing_ms: rng.range(20, 40),
            ..traffic(rng, "v", vec![victim], 60, false)
        }),
        Op::Wait(rng.range(100, 800)),
        Op::FillDisk {
            node: victim,
            copy_on_write: true,
        },
        Op::ExpectStorage {
            node: victim,
            want: StorageHealth::Full,
            within_ms: 10_000,
        },
        Op::Wait(rng.range(200, 1500)),
    ];
    if rng.chance(0.3) {
        // A node restarted on a full disk starts if opening needs no new block (redb's
        // recovery rewrites pages in place); where even that fails (a full copy-on-write
        // file system) it exits saying the disk is full, and starts once there is room.
        ops.extend([
            Op::Crash(victim),
            Op::FillDisk {
                node: victim,
                copy_on_write: false,
            },
            Op::Wait(rng.range(100, 500)),
            Op::Restart(victim),
            Op::Wait(rng.range(200, 800)),
        ]);
    }
    ops.extend([
        Op::FixDisk(victim),
        Op::ExpectStorage {
            node: victim,
            want: StorageHealth::Ok,
            within_ms: 5_000,
        },
        Op::Wait(rng.range(200, 800)),
    ]);
    plan(rng, n, 1_000_000, ops)
}

/// A node lost for good (with its disk) after its usage spread, and a new node joining:
/// the new node must count the lost node's usage (relays, I1).
pub fn replace_node(rng: &mut Rng) -> Plan {
    let n = rng.range(3, 4) as usize;
    let lost = rng.below(n as u64) as usize;
    let rest: Vec<usize> = (0..n).filter(|&i| i != lost).collect();
    let ops = vec![
        Op::Traffic(traffic(rng, "pre", (0..n).collect(), 30, false)),
        Op::Drain,
        Op::Settle,
        Op::Remove(lost),
        Op::Traffic(traffic(rng, "mid", rest.clone(), 20, false)),
        Op::Wait(rng.range(500, 2500)),
        Op::Join(n),
        Op::Traffic(traffic(
            rng,
            "post",
            rest.iter().copied().chain([n]).collect(),
            20,
            false,
        )),
    ];
    Plan {
        nodes: n,
        spares: 1,
        start: START,
        skews_ms: vec![0; n + 1],
        limits: base_limits(1_000_000),
        ops: finish(rng, n, ops),
    }
}

/// Calendar boundaries a few seconds after the start: (start, label).
const BOUNDARIES: [&str; 5] = [
    // Month end and midnight UTC.
    "2025-01-31T23:59:57Z",
    // Midnight in Berlin into the day its clocks spring forward: that day has 23 hours
    // (day_berlin must reset at 22:00Z, not 23:00Z).
    "2025-03-29T22:59:57Z",
    // Year end.
    "2024-12-31T23:59:57Z",
    // New York falls back at 06:00Z: the 01:00 hour repeats.
    "2024-11-03T05:59:57Z",
    // New York springs forward at 07:00Z: 02:00 local does not exist.
    "2024-03-10T06:59:57Z",
];

/// Clocks a few seconds apart across midnight, month end or a DST change, with records
/// stamped by the node and records carrying their own `at` (in the receiving node's past).
pub fn clock_skew(rng: &mut Rng) -> Plan {
    skewed(rng, (0, 2500))
}

/// Records whose `at` lies in the node's next period (a client clock a few seconds
/// ahead, accepted up to 5 min), sent to a node cut off from the others until its clock
/// has passed the boundary. The node must keep the slot of the not-yet-current epoch
/// published (it once unpublished it for good: a pinned regression in main.rs).
pub fn clock_skew_future_at(rng: &mut Rng) -> Plan {
    let n = 3;
    let x = rng.below(n as u64) as usize;
    let rest: Vec<usize> = (0..n).filter(|&i| i != x).collect();
    let mut plan = skewed(rng, (0, 0));
    plan.skews_ms = vec![0; n];
    plan.nodes = n;
    // The boundary is 3 s after the start; these records are stamped 3.5–4.5 s ahead.
    let ahead = Traffic {
        spacing_ms: 100,
        at_back_ms: Some((-4500, -3500)),
        ..traffic(rng, "ahead", vec![x], 10, false)
    };
    let ops = vec![
        Op::Partition(vec![x], rest),
        Op::Traffic(ahead),
        Op::Drain,
        Op::Wait(3000),
    ];
    plan.ops = finish(rng, n, ops);
    plan
}

fn skewed(rng: &mut Rng, at_back_ms: (i64, i64)) -> Plan {
    let n = rng.range(3, 4) as usize;
    let start = *rng.pick(&BOUNDARIES);
    let skews_ms: Vec<i64> = (0..n).map(|_| rng.range(0, 6000) as i64 - 3000).collect();
    let mut limits = base_limits(1_000_000);
    limits.extend([
        LimitDef {
            id: "month",
            metric: "tokens",
            max: 1_000_000_000,
            period: "1M",
            aligned: true,
            timezone: "UTC",
            hard: false,
        },
        LimitDef {
            id: "hour_ny",
            metric: "tokens",
            max: 1_000_000_000,
            period: "1h",
            aligned: true,
            timezone: "America/New_York",
            hard: false,
        },
        LimitDef {
            id: "day_berlin",
            metric: "requests",
            max: 1_000_000,
            period: "1d",
            aligned: true,
            timezone: "Europe/Berlin",
            hard: false,
        },
    ]);
    let (a, b) = split(rng, n);
    let ops = vec![
        Op::Traffic(Traffic {
            spacing_ms: 40,
            ..traffic(rng, "own", (0..n).collect(), 100, false)
        }),
        Op::Traffic(Traffic {
            spacing_ms: 50,
            at_back_ms: Some(at_back_ms),
            ..traffic(rng, "at", (0..n).collect(), 80, false)
        }),
        Op::Wait(rng.range(500, 1500)),
        Op::Partition(a.clone(), b.clone()),
        Op::Wait(rng.range(1000, 2500)),
        Op::Repair,
        Op::Wait(rng.range(1000, 2000)),
    ];
    Plan {
        nodes: n,
        spares: 0,
        start,
        skews_ms,
        limits,
        ops: finish(rng, n, ops),
    }
}

/// A manual reset and a set-usage on one side while records arrive on the other; some
/// runs reset concurrently on both sides.
pub fn reset_race(rng: &mut Rng) -> Plan {
    let n = rng.range(3, 4) as usize;
    let (a, b) = split(rng, n);
    let mut limits = base_limits(1_000_000);
    limits.push(LimitDef {
        id: "resettable",
        metric: "tokens",
        max: 1_000_000_000,
        period: "1d",
        aligned: true,
        timezone: "UTC",
        hard: false,
    });
    let used = |rng: &mut Rng| rng.chance(0.5).then(|| rng.range(1, 5000));
    let mut ops = vec![
        Op::Traffic(traffic(rng, "pre", (0..n).collect(), 15, false)),
        Op::Drain,
        Op::Partition(a.clone(), b.clone()),
        Op::Traffic(traffic(rng, "a", a.clone(), 30, false)),
        Op::Traffic(traffic(rng, "b", b.clone(), 30, false)),
        Op::Wait(rng.range(200, 600)),
        Op::Reset {
            node: *rng.pick(&a),
            id: "resettable",
            used: used(rng),
        },
    ];
    if rng.chance(0.4) {
        ops.push(Op::Wait(rng.range(0, 300)));
        ops.push(Op::Reset {
            node: *rng.pick(&b),
            id: "resettable",
            used: used(rng),
        });
    }
    ops.push(Op::Wait(rng.range(500, 1500)));
    ops.push(Op::Drain);
    ops.push(Op::Heal);
    // After convergence every node knows the winning reset: these count in full.
    ops.push(Op::Traffic(traffic(
        rng,
        "post",
        (0..n).collect(),
        15,
        false,
    )));
    Plan {
        nodes: n,
        spares: 0,
        start: START,
        skews_ms: vec![0; n],
        limits,
        ops: finish(rng, n, ops),
    }
}

/// Concurrent edits of the same limit's `max` (not a reset) on both sides of a partition.
pub fn config_race(rng: &mut Rng) -> Plan {
    config_edits(rng, false)
}

/// Concurrent edits on both sides of a partition where one side also changes the period
/// (a reset) while the other edits only `max`: the period change must win everywhere and
/// no node's epoch may go back (it once did: pinned regressions in main.rs).
pub fn config_race_period(rng: &mut Rng) -> Plan {
    config_edits(rng, true)
}

fn config_edits(rng: &mut Rng, period_edits: bool) -> Plan {
    let n = rng.range(3, 4) as usize;
    let (a, b) = split(rng, n);
    let mut limits = base_limits(1_000_000);
    let edited = LimitDef {
        id: "edited",
        metric: "tokens",
        max: 1_000_000,
        period: "1d",
        aligned: true,
        timezone: "UTC",
        hard: false,
    };
    limits.push(edited.clone());
    let period = |rng: &mut Rng| {
        if period_edits && rng.chance(0.5) {
            *rng.pick(&["1h", "1M"])
        } else {
            "1d"
        }
    };
    let mut ops = vec![
        Op::Traffic(traffic(rng, "pre", (0..n).collect(), 10, false)),
        Op::Drain,
        Op::Partition(a.clone(), b.clone()),
        Op::Traffic(traffic(rng, "a", a.clone(), 25, false)),
        Op::Traffic(traffic(rng, "b", b.clone(), 25, false)),
        Op::Wait(rng.range(100, 500)),
    ];
    let edits = rng.range(1, 3);
    for _ in 0..edits {
        let (first, second) = if rng.chance(0.5) { (&a, &b) } else { (&b, &a) };
        ops.push(Op::PutLimit {
            node: *rng.pick(first),
            def: LimitDef {
                max: rng.range(1_000, 2_000_000),
                period: period(rng),
                ..edited.clone()
            },
        });
        ops.push(Op::PutLimit {
            node: *rng.pick(second),
            def: LimitDef {
                max: rng.range(1_000, 2_000_000),
                period: period(rng),
                ..edited.clone()
            },
        });
        ops.push(Op::Wait(rng.range(100, 600)));
    }
    Plan {
        nodes: n,
        spares: 0,
        start: START,
        skews_ms: vec![0; n],
        limits,
        ops: finish(rng, n, ops),
    }
}

/// Clients sending the same id twice to the same node, and again to another node, while
/// gossip is slow.
pub fn client_retries(rng: &mut Rng) -> Plan {
    let n = 3;
    let (a, b) = split(rng, n);
    let ops = vec![
        Op::Latency(rng.range(20, 150)),
        Op::Traffic(Traffic {
            retry: Retry::DuplicateSame,
            ..traffic(rng, "same", (0..n).collect(), 30, false)
        }),
        Op::Traffic(Traffic {
            retry: Retry::OtherNode,
            ..traffic(rng, "other", (0..n).collect(), 20, false)
        }),
        Op::Wait(rng.range(200, 600)),
        Op::Hold(a.clone(), b.clone()),
        Op::Wait(rng.range(300, 900)),
        Op::Release(a, b),
    ];
    plan(rng, n, 1_000_000, ops)
}

// ----- hard limits (I7) ------------------------------------------------------------------

/// The fleet cut in two for long enough that both sides spend every right they hold;
/// neither side may spend the other's.
pub fn hard_split_brain(rng: &mut Rng) -> Plan {
    let n = rng.range(3, 5) as usize;
    let (a, b) = split(rng, n);
    let mut ops = vec![
        Op::Traffic(traffic(rng, "pre", (0..n).collect(), 10, true)),
        Op::Wait(rng.range(200, 800)),
        Op::Partition(a.clone(), b.clone()),
    ];
    ops.push(Op::Traffic(traffic(rng, "a", a, 100, true)));
    ops.push(Op::Traffic(traffic(rng, "b", b, 100, true)));
    ops.push(Op::Drain);
    ops.push(Op::Wait(rng.range(500, 1500)));
    plan(rng, n, 3_000, ops)
}

/// A healthy fleet with all traffic on one node: rights must move to it, so it spends
/// nearly all of `max` before its first denial (utilisation at first denial).
pub fn hard_one_node(rng: &mut Rng) -> Plan {
    let n = 3;
    let busy = rng.below(n as u64) as usize;
    let ops = vec![Op::Traffic(Traffic {
        tokens: (20, 60),
        ..traffic(rng, "one", vec![busy], 200, true)
    })];
    plan(rng, n, 3_000, ops)
}

/// A node crashes with open reservations and comes back: it must not spend the same
/// rights twice (fenced), while the others go on.
pub fn hard_restart(rng: &mut Rng) -> Plan {
    let n = 3;
    let victim = rng.below(n as u64) as usize;
    let ops = vec![
        Op::Traffic(Traffic {
            spacing_ms: 0,
            ..traffic(rng, "burst", vec![victim], 20, true)
        }),
        Op::Traffic(traffic(rng, "all", (0..n).collect(), 80, true)),
        Op::Wait(rng.range(50, 300)),
        Op::Crash(victim),
        Op::Wait(rng.range(200, 800)),
        Op::Restart(victim),
        Op::Traffic(traffic(rng, "after", (0..n).collect(), 40, true)),
    ];
    plan(rng, n, 3_000, ops)
}

/// A node is gone for good; an operator decommissions it, and its unspent rights pass to
/// a survivor.
pub fn hard_decommission(rng: &mut Rng) -> Plan {
    let n = 3;
    let gone = rng.below(n as u64) as usize;
    let heir = (gone + 1 + rng.below(n as u64 - 1) as usize) % n;
    let rest: Vec<usize> = (0..n).filter(|&i| i != gone).collect();
    let ops = vec![
        Op::Traffic(traffic(rng, "pre", (0..n).collect(), 20, true)),
        Op::Drain,
        // What a node acknowledged but never published is lost with its disk: an operator
        // decommissions a node whose usage the fleet has (README, "Soft and hard limits").
        Op::Settle,
        Op::Remove(gone),
        Op::Wait(rng.range(100, 500)),
        Op::Decommission {
            node: gone,
            via: heir,
        },
        Op::Traffic(traffic(rng, "post", rest, 120, true)),
    ];
    plan(rng, n, 3_000, ops)
}

/// `max` of the hard limit lowered and raised again while traffic runs.
pub fn hard_max_edit(rng: &mut Rng) -> Plan {
    let n = rng.range(3, 4) as usize;
    let mut ops = vec![
        Op::Traffic(traffic(rng, "t", (0..n).collect(), 120, true)),
        Op::Wait(rng.range(300, 1200)),
    ];
    let edits = rng.range(1, 3);
    for _ in 0..edits {
        ops.push(Op::PutLimit {
            node: rng.below(n as u64) as usize,
            def: LimitDef::hard(rng.range(500, 4_000)),
        });
        ops.push(Op::Wait(rng.range(200, 800)));
    }
    plan(rng, n, 3_000, ops)
}
