//! tally-node: one tally node, embeddable (DESIGN.md §4).
//!
//! [`Node`] wires the pure state of tally-core to the durable store of tally-store.
//! Checks read the in-memory state under a short read lock and never touch disk. Records
//! and config changes go through one bounded queue to a single writer thread that does
//! group commit: it drains what is queued, writes it in one redb transaction, commits
//! durably (one fsync), then updates memory and replies (I1, I3: nothing is acknowledged
//! or visible before it is durable). When the queue is full callers wait up to
//! `queue_wait`, then get [`NodeError::Overloaded`], never a silent drop.
//!
//! This crate knows no HTTP or JSON (tally-server) and no redb (tally-store).

pub mod clock;
mod cluster;
pub mod denials;
mod escrow;
pub mod metrics;
mod rights;
mod writer;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use parking_lot::RwLock;
use tally_core::config::ConfigError;
use tally_core::{
    Amounts, Decision, DenyReason, LimitInput, LimitSpec, LimitStatus, Metric, Mode, Rights, Scope,
    State, StateError,
};
use tally_store::{Location, Store, StoreError};
use tokio::sync::{Semaphore, oneshot};

pub use clock::{Clock, SystemClock};
pub use cluster::{ClusterConfig, ClusterError};
pub use denials::{DENIALS_MAX, Denial};
pub use metrics::Metrics;
pub use tally_gossip::{ClusterKey, GossipNetwork, GossipStats, Member};
/// The fault-injecting disk a node can run on instead of `data_dir` ([`NodeConfig::disk`]).
pub use tally_store::faults;
use writer::{ConfigChange, Op};

/// How a node is set up.
#[derive(Clone)]
pub struct NodeConfig {
    pub data_dir: PathBuf,
    /// Stable id; generated and persisted on first start when absent.
    pub node_id: Option<String>,
    /// How long a record id is remembered for deduplication (I2).
    pub dedup_window_ms: i64,
    /// Most records in one group commit.
    pub batch_records_max: usize,
    /// Most records (config changes count 1) queued for the writer.
    pub queue_records_max: usize,
    /// How long a caller waits for queue space before `Overloaded`.
    pub queue_wait: Duration,
    /// How far in the future a record's `at` may be.
    pub future_skew_ms: i64,
    /// How long closed epochs are kept as history after they end. The node keeps at
    /// least the dedup window plus `future_skew_ms`, whatever this says: a record may be
    /// that late, and its epoch's slot must still be on disk to be raised.
    pub history_retention_ms: i64,
    pub clock: Arc<dyn Clock>,
    /// Simulator and tests: keep the database on this fault-injecting disk instead of in
    /// `data_dir`.
    pub disk: Option<faults::Mount>,
    /// Longest lifetime of a reservation on hard limits; also how long a node refuses to
    /// spend rights after an unclean restart (its reservations were lost with memory).
    pub reservation_ttl_max_ms: i64,
    /// Count denials per denying limit for at most this many distinct limits
    /// ([`Node::denials_by_limit`]); 0 counts none (the default: it costs a lock per
    /// denial and memory per limit).
    pub denials_by_limit_max: usize,
}

// The node's defaults: `NodeConfig::new` and `tally serve`'s defaults (tally-server
// `config.rs`, API.md) both read these, so they cannot drift apart.

/// Default time a record id is remembered for deduplication: one day.
pub const DEDUP_WINDOW_DEFAULT_MS: i64 = 24 * 3_600_000;
/// Default largest number of records in one group commit.
pub const BATCH_RECORDS_MAX_DEFAULT: usize = 4_096;
/// Default capacity of the writer's queue, in records.
pub const QUEUE_RECORDS_MAX_DEFAULT: usize = 65_536;
/// Default time a caller waits for queue space before `Unavailable`.
pub const QUEUE_WAIT_DEFAULT_MS: u64 = 2_000;
/// A reservation lives this long unless the check says otherwise.
pub const RESERVATION_TTL_DEFAULT_MS: i64 = 120_000;
/// Default cap on a reservation's lifetime (`--reservation-ttl-max-secs`).
pub const RESERVATION_TTL_MAX_DEFAULT_MS: i64 = 300_000;
/// Most reservations open at once on one node.
pub const RESERVATIONS_MAX: usize = 1_000_000;

/// Closed epochs are kept 35 days by default: a calendar month of history and some days
/// to read it after the month ends.
pub const HISTORY_RETENTION_DEFAULT_MS: i64 = 35 * 86_400_000;
/// Most epochs one history read returns.
pub const HISTORY_EPOCHS_MAX: usize = 1000;

impl NodeConfig {
    /// The history actually kept: the retention, but never less than a late record needs.
    pub(crate) fn history_keep_ms(&self) -> i64 {
        self.history_retention_ms
            .max(self.dedup_window_ms + self.future_skew_ms)
    }

    pub fn new(data_dir: impl Into<PathBuf>) -> NodeConfig {
        NodeConfig {
            data_dir: data_dir.into(),
            node_id: None,
            dedup_window_ms: DEDUP_WINDOW_DEFAULT_MS,
            batch_records_max: BATCH_RECORDS_MAX_DEFAULT,
            queue_records_max: QUEUE_RECORDS_MAX_DEFAULT,
            queue_wait: Duration::from_millis(QUEUE_WAIT_DEFAULT_MS),
            future_skew_ms: 5 * 60_000,
            history_retention_ms: HISTORY_RETENTION_DEFAULT_MS,
            clock: Arc::new(SystemClock),
            disk: None,
            reservation_ttl_max_ms: RESERVATION_TTL_MAX_DEFAULT_MS,
            denials_by_limit_max: 0,
        }
    }

    /// Where the store lives.
    pub fn location(&self) -> Location {
        match &self.disk {
            Some(mount) => Location::Simulated(mount.clone()),
            None => Location::Dir(self.data_dir.clone()),
        }
    }
}

/// Whether the node can store writes (ARCHITECTURE.md, "Storage faults").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
#[repr(u8)]
pub enum StorageHealth {
    Ok = 0,
    /// The disk is full: writes get `DiskFull` until space is freed, then resume.
    Full = 1,
    /// A sync or the disk failed: writes get `StorageFailed` until the node is restarted.
    Failed = 2,
}

/// Why an operation failed: what kind of failure, and a message for a person that says
/// what to do. The server maps every variant to its API error code (`tally-server`
/// `http.rs`, exhaustively); callers that retry tell a full disk from a bad request by the
/// variant, never by the text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NodeError {
    /// Bad input; nothing changed. `field` names the part of the request that was wrong,
    /// where one does.
    #[error("{message}")]
    InvalidArgument {
        field: Option<&'static str>,
        message: String,
    },
    /// An unknown limit, entity, price or reservation.
    #[error("{0}")]
    NotFound(String),
    /// The state does not allow it (a cycle of entities; a grant the donor cannot make; a
    /// write a concurrent one superseded).
    #[error("{0}")]
    Conflict(String),
    /// The write queue stayed full for `queue_wait`, or too many reservations are open:
    /// retry later.
    #[error("{0}")]
    Overloaded(String),
    /// The disk holding the data directory is full (or the directory cannot be opened
    /// for now): writes are refused until space is freed, then resume by themselves.
    /// Nothing refused was acknowledged.
    #[error("{0}")]
    DiskFull(String),
    /// This one write transaction failed and nothing of it is durable; the store is
    /// usable: retry.
    #[error("{0}")]
    WriteFailed(String),
    /// Storage failed (a sync or I/O error): writes are stopped until the node is
    /// restarted. Nothing refused was acknowledged.
    #[error("{0}")]
    StorageFailed(String),
    /// After a crash, hard limits are fenced for a while (their rights may not move).
    #[error("{0}")]
    Fenced(String),
    /// The node is shutting down.
    #[error("the node is shutting down")]
    ShuttingDown,
}

impl NodeError {
    /// Bad input not tied to one field.
    pub fn invalid(message: impl Into<String>) -> NodeError {
        NodeError::InvalidArgument {
            field: None,
            message: message.into(),
        }
    }

    /// Bad input in `field`.
    pub fn invalid_field(field: &'static str, message: impl Into<String>) -> NodeError {
        NodeError::InvalidArgument {
            field: Some(field),
            message: message.into(),
        }
    }

    /// Whether retrying the same operation later may succeed (the input was fine).
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            NodeError::Overloaded(_)
                | NodeError::DiskFull(_)
                | NodeError::StorageFailed(_)
                | NodeError::WriteFailed(_)
                | NodeError::Fenced(_)
                | NodeError::ShuttingDown
        )
    }
}

impl From<ConfigError> for NodeError {
    fn from(e: ConfigError) -> Self {
        let field = match &e {
            ConfigError::Cycle { .. } => return NodeError::Conflict(e.to_string()),
            ConfigError::Name(tally_core::units::NameError::Pattern { what, .. }) => Some(*what),
            ConfigError::TooMany { what, .. } => Some(*what),
            ConfigError::MaxTooLarge { .. } => Some("max"),
            ConfigError::Period(_) => Some("period"),
            ConfigError::SelfDimension(_) => Some("parents"),
            ConfigError::Members(_) => Some("members"),
            ConfigError::Rules(_) => Some("allow"),
            _ => None,
        };
        NodeError::InvalidArgument {
            field,
            message: e.to_string(),
        }
    }
}

impl From<StateError> for NodeError {
    fn from(e: StateError) -> Self {
        match e {
            StateError::UnknownLimit(_)
            | StateError::UnknownEntity(..)
            | StateError::UnknownPrice(_) => NodeError::NotFound(e.to_string()),
            StateError::Config(c) => c.into(),
            StateError::Price(_) => NodeError::invalid_field("price", e.to_string()),
            e => NodeError::invalid(e.to_string()),
        }
    }
}

/// A failure to start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot start the writer thread: {0}")]
    Thread(std::io::Error),
    #[error("{0}")]
    NodeId(String),
}

/// One usage record as a client sends it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageRecord {
    pub id: String,
    pub attributes: Vec<(String, String)>,
    pub amounts: Amounts,
    /// When the usage happened; `None` = now.
    pub at_ms: Option<i64>,
    /// The reservation this usage settles (hard limits), if any.
    pub reservation: Option<String>,
}

/// What became of one usage record.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RecordOutcome {
    /// `false` if its id was already applied on this node (I2).
    pub applied: bool,
    /// Hard limits this record spent beyond the rights this node held, by limit id: the
    /// only way `Σ used` passes `max` (usage is a fact and is always counted).
    pub overrun: Vec<(String, u64)>,
}

/// One applicable limit in a check or record reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitReport {
    pub id: String,
    pub metric: Metric,
    pub used: u64,
    pub max: u64,
    pub remaining: u64,
    pub period_start_ms: i64,
    /// `None` for `never`.
    pub resets_at_ms: Option<i64>,
    pub denied: bool,
    pub mode: Mode,
    /// Hard limits: rights this node may still spend (after what it holds); 0 for soft.
    pub free: i64,
    /// Hard limits: why this limit denies.
    pub reason: Option<DenyReason>,
    /// Hard limits denied for `rights`: when asking again may succeed.
    pub retry_after_ms: Option<u64>,
}

/// An open reservation on hard limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReservationInfo {
    pub id: String,
    pub expires_at_ms: i64,
}

/// A check's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckReply {
    pub allowed: bool,
    /// The node has not caught up with the fleet yet (DESIGN.md §4 readiness).
    pub stale: bool,
    pub limits: Vec<LimitReport>,
    /// When the check asked to reserve and was allowed.
    pub reservation: Option<ReservationInfo>,
    /// The access rule the request breaks (then `allowed` is false).
    pub access: Option<tally_core::AccessDenial>,
}

/// One node's share of a hard limit in the current epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRights {
    pub node: String,
    pub rights: Rights,
    /// What it may spend (nothing held; with rights adopted from decommissioned nodes).
    pub free: i64,
    pub decommissioned: bool,
}

/// A limit with its current usage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitDetails {
    pub input: LimitInput,
    pub report: LimitReport,
    /// Usage per origin node in the current epoch.
    pub nodes: Vec<(String, u64)>,
    /// The current epoch: `used = baseline + Σ nodes` counts in it (the simulator checks
    /// epochs and slots per epoch, I3/I5).
    pub epoch: tally_core::Epoch,
    /// Usage the epoch started with (a set-usage reset), not owned by any node.
    pub baseline: u64,
    /// Hard limits: every node's rights now.
    pub rights: Vec<NodeRights>,
}

/// Which epochs of a limit's history to read: those overlapping `[since_ms, until_ms)`,
/// newest first, at most `epochs_max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistoryQuery {
    pub since_ms: Option<i64>,
    pub until_ms: Option<i64>,
    pub epochs_max: usize,
}

/// One epoch of a limit's history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EpochHistory {
    pub epoch: tally_core::Epoch,
    pub period_start_ms: i64,
    /// `None` for `never`.
    pub period_end_ms: Option<i64>,
    /// `baseline + Σ nodes`.
    pub used: u64,
    pub baseline: u64,
    /// Usage per origin node, sorted by node id.
    pub nodes: Vec<(String, u64)>,
    /// The epoch checks count against now.
    pub current: bool,
}

/// A limit's history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitHistory {
    pub metric: Metric,
    pub never: bool,
    pub epochs: Vec<EpochHistory>,
}

/// An entity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntityDetails {
    pub dimension: String,
    pub value: String,
    pub parents: Scope,
    pub rules: tally_core::AccessRules,
}

/// What pricing a request by its tokens charged, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Priced {
    pub model: String,
    /// The exact cost in femto-USD.
    pub femto: u128,
    /// What limits count: the exact cost rounded up to the micro-USD.
    pub cost: tally_core::Micros,
    pub prices: tally_core::prices::Resolved,
}

pub(crate) struct Shared {
    pub(crate) state: RwLock<State>,
    pub(crate) metrics: Metrics,
    pub(crate) denials: denials::DenialRing,
    /// Denials per denying limit, when [`NodeConfig::denials_by_limit_max`] is not 0.
    pub(crate) denials_by_limit: parking_lot::Mutex<DenialCounts>,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) config: NodeConfig,
    pub(crate) node_id: String,
    pub(crate) cluster: std::sync::OnceLock<cluster::ClusterHandle>,
    /// A [`StorageHealth`], set by the writer.
    pub(crate) storage: std::sync::atomic::AtomicU8,
    /// Ops handed to the writer that it has not finished (see [`Node::writer_idle`]).
    pub(crate) writer_ops: std::sync::atomic::AtomicUsize,
    /// Holds on hard limits: reservations and writes in flight.
    pub(crate) escrow: escrow::Escrow,
    /// How long the last demands for rights took to be answered (ms), newest last.
    pub(crate) rights_waits: parking_lot::Mutex<std::collections::VecDeque<i64>>,
}

/// Denials counted per denying limit, for at most [`NodeConfig::denials_by_limit_max`]
/// limits (the first that denied); denials by any other limit are only summed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct DenialCounts {
    pub by_limit: std::collections::HashMap<String, u64>,
    /// Denials by limits past the cap.
    pub untracked: u64,
}

/// A live limit's usage now, in its own units (micro-USD for cost).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitUsage {
    pub id: String,
    pub metric: Metric,
    pub used: u64,
    pub max: u64,
}

/// A running node. Cheap to clone; all clones share one state and one writer.
#[derive(Clone)]
pub struct Node {
    shared: Arc<Shared>,
    queue: Arc<Semaphore>,
    tx: std::sync::mpsc::Sender<Op>,
}

/// How long a check denied for `rights` should wait before asking again: through the
/// fence, or a round of asking and granting.
fn retry_after(s: &LimitStatus, fenced_until_ms: i64, now_ms: i64) -> Option<u64> {
    (s.reason == Some(DenyReason::Rights)).then(|| {
        if fenced_until_ms > now_ms {
            (fenced_until_ms - now_ms) as u64
        } else {
            RIGHTS_RETRY_AFTER_MS
        }
    })
}

/// A demand for rights is answered within a few gossip rounds while the fleet is healthy.
pub const RIGHTS_RETRY_AFTER_MS: u64 = 1_000;

fn report(state: &State, s: &LimitStatus) -> LimitReport {
    LimitReport {
        id: state.limit_id(s.limit).to_string(),
        metric: s.metric,
        used: s.used,
        max: s.max,
        remaining: s.remaining,
        period_start_ms: s.period_start_ms,
        resets_at_ms: (s.resets_at_ms != i64::MAX).then_some(s.resets_at_ms),
        denied: s.denied,
        mode: s.mode,
        free: s.free,
        reason: s.reason,
        retry_after_ms: None,
    }
}

impl Node {
    /// Opens the store, restores state from it, and starts the writer thread.
    pub fn open(config: NodeConfig) -> Result<Node, OpenError> {
        let store = Store::open_at(&config.location())?;
        if let Some(id) = &config.node_id {
            tally_core::units::validate_id(id, "node id")
                .map_err(|e| OpenError::NodeId(e.to_string()))?;
        }
        let node_id = store.node_id(config.node_id.as_deref(), generate_node_id)?;
        let now = config.clock.now_ms();
        let recovered = store.recover()?;
        let mut state = State::new(&node_id);
        let (limits, entities, resets) = (
            recovered.limits.len(),
            recovered.entities.len(),
            recovered.resets.len(),
        );
        for rec in recovered.limits {
            state.apply_limit(rec, now);
        }
        for rec in recovered.entities {
            state.apply_entity(rec);
        }
        for rec in recovered.prices {
            state.apply_price(rec);
        }
        for (id, reg) in recovered.resets {
            state.apply_reset(&id, reg);
        }
        let me = state.me();
        let own = recovered.own_slots.len();
        for (limit, epoch, value) in recovered.own_slots {
            state.merge_slot(&limit, epoch, me, value);
        }
        let peer = recovered.peer_slots.len();
        for (origin, limit, epoch, value) in recovered.peer_slots {
            let o = state.origin_idx(&origin);
            state.merge_slot(&limit, epoch, o, value);
        }
        for (limit, epoch, to, total) in recovered.own_grants {
            state.merge_grant(&limit, epoch, &node_id, &to, total);
        }
        for (from, limit, epoch, to, total) in recovered.peer_grants {
            state.merge_grant(&limit, epoch, &from, &to, total);
        }
        for rec in recovered.decommissions {
            state.apply_decommission(rec);
        }
        state.tick(now);
        let mut escrow = escrow::Inner::default();
        match &recovered.clean_shutdown {
            Some(rows) => {
                escrow.mark_pending = true;
                let mut open: std::collections::BTreeMap<&str, (Vec<escrow::Item>, i64)> =
                    Default::default();
                for (id, limit, period, reset, amount, expires) in rows {
                    if *expires <= now {
                        continue;
                    }
                    if let Some(l) = state.limit_idx(limit) {
                        let e = open.entry(id.as_str()).or_default();
                        e.0.push((
                            l,
                            tally_core::Epoch {
                                period: *period,
                                reset: *reset,
                            },
                            *amount,
                        ));
                        e.1 = *expires;
                    }
                }
                for (id, (items, expires)) in open {
                    escrow.insert(id.to_string(), items, expires);
                }
            }
            None if !recovered.fresh => {
                // The last run stopped without a clean shutdown: reservations it granted
                // were lost with its memory and their clients may still spend them.
                escrow.fenced_until_ms = now + config.reservation_ttl_max_ms;
                if state.hard_limits(now).is_empty() {
                    tracing::info!("the last run did not stop cleanly");
                } else {
                    tracing::warn!(
                        fence_ms = config.reservation_ttl_max_ms,
                        "the last run did not stop cleanly: hard limits are not spent on this node until the reservations it may have granted have expired (--reservation-ttl-max-secs); other nodes may grant it rights after that"
                    );
                }
            }
            None => {}
        }
        tracing::info!(
            node = %node_id, limits, entities, resets, own_slots = own, peer_slots = peer,
            dedup_ids = recovered.dedup_ids, dedup_index_bytes = recovered.dedup_bytes, path = %store.path().display(),
            "state restored"
        );
        let shared = Arc::new(Shared {
            state: RwLock::new(state),
            metrics: Metrics::default(),
            denials: denials::DenialRing::default(),
            denials_by_limit: parking_lot::Mutex::new(DenialCounts::default()),
            clock: config.clock.clone(),
            node_id,
            config,
            cluster: std::sync::OnceLock::new(),
            storage: std::sync::atomic::AtomicU8::new(StorageHealth::Ok as u8),
            writer_ops: std::sync::atomic::AtomicUsize::new(0),
            escrow: escrow::Escrow(parking_lot::Mutex::new(escrow)),
            rights_waits: Default::default(),
        });
        let queue = Arc::new(Semaphore::new(shared.config.queue_records_max));
        let (tx, rx) = std::sync::mpsc::channel();
        let w = shared.clone();
        std::thread::Builder::new()
            .name("tally-writer".into())
            .spawn(move || writer::run(w, store, rx))
            .map_err(OpenError::Thread)?;
        Ok(Node { shared, queue, tx })
    }

    pub fn node_id(&self) -> &str {
        &self.shared.node_id
    }

    pub fn metrics(&self) -> &Metrics {
        &self.shared.metrics
    }

    pub fn now_ms(&self) -> i64 {
        self.shared.clock.now_ms()
    }

    /// Records queued for the writer right now.
    pub fn queue_depth(&self) -> usize {
        self.shared.config.queue_records_max - self.queue.available_permits()
    }

    /// Number of (limit, epoch, origin) slots in memory.
    pub fn slot_count(&self) -> usize {
        self.shared.state.read().slot_count()
    }

    /// May a request proceed? Reads memory only.
    pub fn check(&self, attributes: &[(&str, &str)], estimate: Amounts) -> CheckReply {
        self.check_reserve(attributes, estimate, None)
            .expect("a check without a reservation does not fail")
    }

    /// [`Node::check`] that, with `reserve` (a lifetime in ms, capped by
    /// [`NodeConfig::reservation_ttl_max_ms`]) and when allowed, holds the estimate on
    /// every applicable hard limit until the reservation is settled by usage, cancelled or
    /// expires. Memory only. Fails only when too many reservations are open.
    pub fn check_reserve(
        &self,
        attributes: &[(&str, &str)],
        estimate: Amounts,
        reserve: Option<i64>,
    ) -> Result<CheckReply, NodeError> {
        let now = self.now_ms();
        let mut d = Decision::default();
        let state = self.shared.state.read();
        // The escrow is locked only if a hard limit applies (state → escrow order).
        let holds = LazyHolds {
            escrow: &self.shared.escrow,
            guard: std::cell::OnceCell::new(),
            now_ms: now,
        };
        state.check_held(attributes, estimate, now, &holds, &mut d);
        let mut reservation = None;
        let mut limits: Vec<LimitReport> = d.limits.iter().map(|s| report(&state, s)).collect();
        if let Some(mut esc) = holds.guard.into_inner() {
            for (r, s) in limits.iter_mut().zip(&d.limits) {
                r.retry_after_ms = retry_after(s, esc.fenced_until_ms, now);
                if s.reason == Some(DenyReason::Rights) {
                    let want = estimate.of(s.metric).max(1);
                    let short = i128::from(want) - i128::from(s.free.max(0));
                    esc.note_shortfall(s.limit, short.clamp(1, i128::from(u64::MAX)) as u64);
                }
            }
            if let (true, Some(ttl)) = (d.allowed, reserve) {
                if esc.open_reservations() >= RESERVATIONS_MAX {
                    return Err(NodeError::Overloaded(format!(
                        "{RESERVATIONS_MAX} reservations are open on this node; settle or cancel some, or reserve with a shorter ttl_s"
                    )));
                }
                let expires = now + ttl.clamp(1, self.shared.config.reservation_ttl_max_ms);
                let items: Vec<escrow::Item> = d
                    .limits
                    .iter()
                    .filter(|s| s.mode == Mode::Hard)
                    .map(|s| (s.limit, s.epoch, estimate.of(s.metric)))
                    .collect();
                for &(l, _, a) in &items {
                    esc.note_spent(l, a);
                }
                let id = esc.reserve(&self.shared.node_id, items, expires);
                reservation = Some(ReservationInfo {
                    id,
                    expires_at_ms: expires,
                });
            }
        } else if let (true, Some(ttl)) = (d.allowed, reserve) {
            // No hard limit applies: nothing to hold, and nothing to remember (settling an
            // id this node does not hold is a no-op).
            let expires = now + ttl.clamp(1, self.shared.config.reservation_ttl_max_ms);
            reservation = Some(ReservationInfo {
                id: format!("{}~{expires:x}~0", self.shared.node_id),
                expires_at_ms: expires,
            });
        }
        drop(state);
        Metrics::add(&self.shared.metrics.checks_total, 1);
        if !d.allowed {
            Metrics::add(&self.shared.metrics.checks_denied_total, 1);
            let cap = self.shared.config.denials_by_limit_max;
            if cap > 0 {
                let mut c = self.shared.denials_by_limit.lock();
                for l in limits.iter().filter(|l| l.denied) {
                    if let Some(n) = c.by_limit.get_mut(l.id.as_str()) {
                        *n += 1;
                    } else if c.by_limit.len() < cap {
                        c.by_limit.insert(l.id.clone(), 1);
                    } else {
                        c.untracked += 1;
                    }
                }
            }
            self.shared.denials.record(
                now,
                attributes,
                limits.iter().filter(|l| l.denied).map(|l| l.id.as_str()),
                estimate,
            );
        }
        Ok(CheckReply {
            allowed: d.allowed,
            stale: !self.caught_up(),
            limits,
            reservation,
            access: d.access,
        })
    }

    /// Releases an open reservation; whether it was open.
    pub fn cancel_reservation(&self, id: &str) -> bool {
        let _state = self.shared.state.read();
        self.shared.escrow.0.lock().cancel(id)
    }

    /// How long this node's last demands for rights (at most 1000) waited for a grant, in
    /// ms, oldest first.
    pub fn rights_waits_ms(&self) -> Vec<i64> {
        self.shared.rights_waits.lock().iter().copied().collect()
    }

    /// Reservations open now.
    pub fn open_reservations(&self) -> usize {
        self.shared.escrow.0.lock().open_reservations()
    }

    /// Denials per denying limit since start (empty unless
    /// [`NodeConfig::denials_by_limit_max`] is set). A check denied by two limits counts
    /// once for each.
    pub fn denials_by_limit(&self) -> DenialCounts {
        self.shared.denials_by_limit.lock().clone()
    }

    /// [`NodeConfig::denials_by_limit_max`]: also how many limits get their own series in
    /// tally-server's /metrics.
    pub fn denials_by_limit_max(&self) -> usize {
        self.shared.config.denials_by_limit_max
    }

    /// Every live limit's usage now, sorted by id. Reads the state in chunks, so a node
    /// with many limits does not hold the lock writers need for long.
    pub fn limit_usages(&self) -> Vec<LimitUsage> {
        const CHUNK: usize = 1024;
        let now = self.now_ms();
        let ids: Vec<String> = {
            let state = self.shared.state.read();
            state
                .live_limit_ids()
                .into_iter()
                .map(str::to_string)
                .collect()
        };
        let mut out = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(CHUNK) {
            let state = self.shared.state.read();
            for id in chunk {
                if let Some(v) = state.limit_view(id, now) {
                    out.push(LimitUsage {
                        id: id.clone(),
                        metric: v.status.metric,
                        used: v.status.used,
                        max: v.status.max,
                    });
                }
            }
        }
        out
    }

    /// Per peer whose hellos this node merged: the gossip lag of the newest one (see
    /// [`Metrics::gossip_lag_seconds`]), sorted by peer id; empty when not clustered.
    pub fn gossip_lags(&self) -> Vec<(String, Duration)> {
        let Some(c) = self.shared.cluster.get() else {
            return Vec::new();
        };
        let mut out: Vec<(String, Duration)> = c
            .hellos
            .lock()
            .iter()
            .map(|(peer, h)| (peer.clone(), Duration::from_millis(h.lag_ms() as u64)))
            .collect();
        out.sort();
        out
    }

    /// Up to `max` of the most recent denied checks, newest first (memory only, at most
    /// [`DENIALS_MAX`]).
    pub fn recent_denials(&self, max: usize) -> Vec<Denial> {
        self.shared.denials.recent(max)
    }

    /// Denied checks not kept in the ring because it was busy at that instant.
    pub fn denials_skipped(&self) -> u64 {
        self.shared.denials.skipped()
    }

    /// Every limit applying to `attributes`, with usage now.
    pub fn statuses(&self, attributes: &[(&str, &str)]) -> Vec<LimitReport> {
        let now = self.now_ms();
        let state = self.shared.state.read();
        state
            .statuses(attributes, now)
            .iter()
            .map(|s| report(&state, s))
            .collect()
    }

    /// Records usage; replies once every record is durable. Per record: `true` if
    /// applied, `false` if its id was already applied on this node (I2). All records are
    /// validated before any is queued (all or nothing).
    pub async fn record(&self, records: Vec<UsageRecord>) -> Result<Vec<bool>, NodeError> {
        self.record_returning(records).await.0
    }

    /// [`Node::record`] that also hands the records back (for a caller that still needs
    /// them, e.g. to report the limits they touched, without copying them first).
    pub async fn record_returning(
        &self,
        records: Vec<UsageRecord>,
    ) -> (Result<Vec<bool>, NodeError>, Vec<UsageRecord>) {
        let (r, records) = self.record_outcomes(records).await;
        (
            r.map(|o| o.into_iter().map(|o| o.applied).collect()),
            records,
        )
    }

    /// [`Node::record_returning`] with what became of each record, overruns included.
    pub async fn record_outcomes(
        &self,
        records: Vec<UsageRecord>,
    ) -> (Result<Vec<RecordOutcome>, NodeError>, Vec<UsageRecord>) {
        if let Err(e) = self.validate_records(&records) {
            return (Err(e), records);
        }
        let n = records.len().max(1);
        let (reply, rx) = oneshot::channel();
        let queued = self
            .submit(n, |permit| Op::Records {
                records,
                reply,
                _permit: permit,
            })
            .await;
        if let Err(e) = queued {
            // The records were dropped with the op that could not be queued.
            return (Err(e), Vec::new());
        }
        rx.await
            .unwrap_or_else(|_| (Err(NodeError::ShuttingDown), Vec::new()))
    }

    fn validate_records(&self, records: &[UsageRecord]) -> Result<(), NodeError> {
        validate_records(records, self.now_ms(), &self.shared.config)
    }

    /// Queues an op for the writer once `n` records' worth of queue space is free.
    async fn submit(
        &self,
        n: usize,
        op: impl FnOnce(tokio::sync::OwnedSemaphorePermit) -> Op,
    ) -> Result<(), NodeError> {
        let cap = self.shared.config.queue_records_max;
        if n > cap {
            return Err(NodeError::invalid_field(
                "records",
                format!("at most {cap} records may be queued at once"),
            ));
        }
        let permit = tokio::time::timeout(
            self.shared.config.queue_wait,
            self.queue.clone().acquire_many_owned(n as u32),
        )
        .await
        .map_err(|_| {
            Metrics::add(&self.shared.metrics.queue_rejected_total, 1);
            NodeError::Overloaded(format!(
                "the write queue stayed full for {} ms; retry later or add nodes",
                self.shared.config.queue_wait.as_millis()
            ))
        })?
        .map_err(|_| NodeError::ShuttingDown)?;
        self.shared.writer_ops.fetch_add(1, Ordering::SeqCst);
        self.tx.send(op(permit)).map_err(|_| {
            self.shared.writer_ops.fetch_sub(1, Ordering::SeqCst);
            NodeError::ShuttingDown
        })
    }

    async fn change(&self, change: ConfigChange) -> Result<(), NodeError> {
        let (reply, rx) = oneshot::channel();
        self.submit(1, |permit| Op::Config {
            change,
            reply,
            _permit: permit,
        })
        .await?;
        rx.await.map_err(|_| NodeError::ShuttingDown)?
    }

    /// Creates or replaces a limit; durable when this returns. A hard limit without
    /// members keeps those of the hard limit it replaces, or else gets every live node of
    /// the fleet that holds the cluster key (this node alone when not clustered), weight 1.
    pub async fn put_limit(
        &self,
        id: &str,
        mut input: LimitInput,
    ) -> Result<LimitDetails, NodeError> {
        if input.mode == Mode::Hard && input.members.is_empty() {
            input.members = match self.limit_spec(id) {
                Some(s) if s.input.mode == Mode::Hard => s.input.members,
                _ => self.default_members().await,
            };
        }
        input.validate(id)?;
        self.change(ConfigChange::PutLimit(id.to_string(), input))
            .await?;
        self.limit(id)
            .ok_or_else(|| NodeError::NotFound(format!("limit {id:?} was deleted concurrently")))
    }

    /// Creates or updates a *derived* limit, whose counting is a function of a template
    /// limit: it gets the template's generation and anchor (`template`, from
    /// [`Node::limit_spec`]), so nodes that create it independently count in the same
    /// epochs (see `State::prepare_limit_put_pinned`). Durable when this returns.
    pub async fn put_limit_derived(
        &self,
        id: &str,
        input: LimitInput,
        template: &LimitSpec,
    ) -> Result<(), NodeError> {
        input.validate(id)?;
        self.change(ConfigChange::PutLimitPinned(
            id.to_string(),
            input,
            template.anchor_ms,
            template.spec_gen,
        ))
        .await
    }

    /// The replicated spec of a live limit (input, anchor, generation), without usage.
    pub fn limit_spec(&self, id: &str) -> Option<LimitSpec> {
        self.shared.state.read().limit(id).cloned()
    }

    /// Whether a live limit with this id exists (a hash lookup; no copies).
    pub fn has_limit(&self, id: &str) -> bool {
        self.shared.state.read().limit(id).is_some()
    }

    pub async fn delete_limit(&self, id: &str) -> Result<(), NodeError> {
        self.change(ConfigChange::DeleteLimit(id.to_string())).await
    }

    /// Starts a new epoch for the limit in the current period, with `baseline` already used.
    pub async fn reset_limit(&self, id: &str, baseline: u64) -> Result<LimitDetails, NodeError> {
        self.change(ConfigChange::Reset(id.to_string(), baseline))
            .await?;
        self.limit(id)
            .ok_or_else(|| NodeError::NotFound(format!("no limit with id {id:?}")))
    }

    /// A live limit and its usage now.
    pub fn limit(&self, id: &str) -> Option<LimitDetails> {
        let now = self.now_ms();
        let state = self.shared.state.read();
        let v = state.limit_view(id, now)?;
        Some(LimitDetails {
            input: v.spec.input.clone(),
            report: report(&state, &v.status),
            nodes: v.nodes.iter().map(|(n, u)| (n.to_string(), *u)).collect(),
            epoch: v.status.epoch,
            baseline: v.baseline,
            rights: v
                .rights
                .iter()
                .map(|(n, r, free)| NodeRights {
                    node: n.to_string(),
                    rights: *r,
                    free: i64::try_from(*free).unwrap_or(if *free < 0 {
                        i64::MIN
                    } else {
                        i64::MAX
                    }),
                    decommissioned: state.decommission(n).is_some(),
                })
                .collect(),
        })
    }

    /// The epochs of a live limit's current generation (closed ones kept by the retention,
    /// and the current one), newest first. Read by the writer, so it sees exactly what is
    /// durable.
    pub async fn history(&self, id: &str, query: HistoryQuery) -> Result<LimitHistory, NodeError> {
        if query.epochs_max == 0 || query.epochs_max > HISTORY_EPOCHS_MAX {
            return Err(NodeError::invalid_field(
                "limit",
                format!("limit must be between 1 and {HISTORY_EPOCHS_MAX}"),
            ));
        }
        if let (Some(since), Some(until)) = (query.since_ms, query.until_ms) {
            if since >= until {
                return Err(NodeError::invalid_field(
                    "since",
                    "since must be before until",
                ));
            }
        }
        let (reply, rx) = oneshot::channel();
        self.submit(1, |permit| Op::History {
            id: id.to_string(),
            query,
            reply,
            _permit: permit,
        })
        .await?;
        rx.await.map_err(|_| NodeError::ShuttingDown)?
    }

    /// Runs the writer's maintenance now, whatever its schedule: dedup expiry and
    /// bucket closing, tombstone collection, and a full history sweep. For tests and
    /// tools that drive the clock faster than real time.
    pub async fn maintain_now(&self) -> Result<(), NodeError> {
        let (reply, rx) = oneshot::channel();
        self.submit(1, |permit| Op::Maintain {
            reply,
            _permit: permit,
        })
        .await?;
        rx.await.map_err(|_| NodeError::ShuttingDown)?
    }

    /// Every live limit whose scope contains all of `filter`, sorted by id.
    pub fn limits(&self, filter: &Scope) -> Vec<LimitDetails> {
        let ids: Vec<String> = {
            let state = self.shared.state.read();
            state
                .live_limit_ids()
                .into_iter()
                .filter(|id| {
                    state.limit(id).is_some_and(|s| {
                        filter.iter().all(|(k, v)| s.input.scope.get(k) == Some(v))
                    })
                })
                .map(str::to_string)
                .collect()
        };
        ids.iter().filter_map(|id| self.limit(id)).collect()
    }

    pub async fn put_entity(
        &self,
        dimension: &str,
        value: &str,
        parents: Scope,
        rules: tally_core::AccessRules,
    ) -> Result<EntityDetails, NodeError> {
        self.change(ConfigChange::PutEntity(
            dimension.into(),
            value.into(),
            parents,
            rules,
        ))
        .await?;
        // What was written (rules normalized), unless a newer write already replaced it.
        self.entity(dimension, value).ok_or_else(|| {
            NodeError::NotFound(format!(
                "entity {dimension}/{value} was deleted by a concurrent write"
            ))
        })
    }

    pub fn entity(&self, dimension: &str, value: &str) -> Option<EntityDetails> {
        let state = self.shared.state.read();
        let rec = state.entity_record(dimension, value)?;
        Some(EntityDetails {
            dimension: dimension.into(),
            value: value.into(),
            parents: rec.parents.clone()?,
            rules: rec.rules.clone(),
        })
    }

    /// Writes prices (`None` deletes) in one durable commit, all or nothing.
    pub async fn put_prices(
        &self,
        prices: Vec<(String, Option<tally_core::Price>)>,
    ) -> Result<(), NodeError> {
        self.change(ConfigChange::Prices(prices)).await
    }

    /// The live price of a model.
    pub fn price(&self, model: &str) -> Option<tally_core::Price> {
        self.shared.state.read().price(model).copied()
    }

    /// Every live price, by model.
    pub fn prices(&self) -> Vec<(String, tally_core::Price)> {
        let state = self.shared.state.read();
        let mut out: Vec<(String, tally_core::Price)> = state
            .price_records()
            .filter_map(|r| Some((r.model.clone(), r.price?)))
            .collect();
        out.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// The cost of `tokens` of `model` at its price: exact, charged rounded up to the
    /// micro-USD. A model without a price is an invalid argument (the caller may give
    /// `cost` instead).
    pub fn price_tokens(
        &self,
        model: Option<&str>,
        tokens: &tally_core::TokenKinds,
    ) -> Result<Priced, NodeError> {
        let Some(model) = model else {
            return Err(NodeError::invalid_field(
                "attributes.model",
                "token counts by kind need a \"model\" attribute to be priced, or an explicit \"cost\"",
            ));
        };
        let price = self.price(model).ok_or_else(|| {
            NodeError::invalid_field("attributes.model", format!(
                "no price for model {model:?}: put one with PUT /v1/prices/{{model}} (or tally prices import), or give \"cost\""
            ))
        })?;
        let femto = price.cost_femto(tokens);
        let cost = tally_core::prices::charge_micros(femto).ok_or_else(|| {
            NodeError::invalid_field("cost", format!(
                "the tokens of this request cost {} USD at the price of {model:?}, more than the 1000000000 USD a request may cost",
                tally_core::prices::femto_to_usd_string(femto)
            ))
        })?;
        Ok(Priced {
            model: model.to_string(),
            femto,
            cost: tally_core::Micros(cost),
            prices: price.resolved(),
        })
    }

    pub async fn delete_entity(&self, dimension: &str, value: &str) -> Result<(), NodeError> {
        self.change(ConfigChange::DeleteEntity(dimension.into(), value.into()))
            .await
    }

    /// Joins a fleet by gossip. Without this the node is a fleet of one.
    pub async fn start_cluster(&self, config: ClusterConfig) -> Result<(), ClusterError> {
        cluster::start(self.shared.clone(), self.tx.clone(), config).await
    }

    /// Caught up with the fleet (always, for a node without gossip): checks say `stale`
    /// when not.
    pub fn caught_up(&self) -> bool {
        self.shared
            .cluster
            .get()
            .is_none_or(|c| c.caught_up.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// Ready to take traffic (`/readyz`): caught up with the fleet, and able to store
    /// writes ([`Node::storage_ok`]).
    pub fn ready(&self) -> bool {
        self.caught_up() && self.storage_ok()
    }

    /// Whether the writer has finished every record, config change and peer value handed
    /// to it. The simulator waits for this before it moves simulated time on: the writer
    /// is a real thread, and a busy machine would otherwise run clients' deadlines out
    /// while it waits for a core.
    pub fn writer_idle(&self) -> bool {
        self.shared.writer_ops.load(Ordering::SeqCst) == 0
    }

    /// Whether writes can be stored now: not while the disk is full, nor after the disk
    /// failed (until a restart).
    pub fn storage_ok(&self) -> bool {
        self.storage_health() == StorageHealth::Ok
    }

    pub fn storage_health(&self) -> StorageHealth {
        match self
            .shared
            .storage
            .load(std::sync::atomic::Ordering::SeqCst)
        {
            0 => StorageHealth::Ok,
            1 => StorageHealth::Full,
            _ => StorageHealth::Failed,
        }
    }

    /// Who holds a new hard limit's rights when its members are not given: every live
    /// verified node of the fleet and this one, weight 1, sorted.
    async fn default_members(&self) -> Vec<tally_core::Member> {
        let mut ids: Vec<String> = match self.members().await {
            Some(fleet) => fleet
                .into_iter()
                .filter(|m| m.live && m.verified)
                .map(|m| m.node_id)
                .collect(),
            None => Vec::new(),
        };
        ids.push(self.shared.node_id.clone());
        ids.sort();
        ids.dedup();
        let state = self.shared.state.read();
        ids.retain(|n| state.decommission(n).is_none());
        ids.truncate(tally_core::config::MEMBERS_MAX);
        ids.into_iter()
            .map(|node| tally_core::Member { node, weight: 1 })
            .collect()
    }

    /// Says that `node` is gone for good: its unspent rights of hard limits pass to
    /// `successor` (default: this node). Durable when this returns; never undone.
    pub async fn decommission(
        &self,
        node: &str,
        successor: Option<&str>,
    ) -> Result<tally_core::DecommissionRecord, NodeError> {
        let successor = successor.unwrap_or(&self.shared.node_id).to_string();
        if successor == node {
            return Err(NodeError::invalid_field(
                "successor",
                format!(
                    "{node} cannot be its own successor; send this to another node, or name a successor"
                ),
            ));
        }
        self.change(ConfigChange::Decommission(node.to_string(), successor))
            .await?;
        self.shared
            .state
            .read()
            .decommission(node)
            .cloned()
            .ok_or_else(|| {
                NodeError::Conflict(
                    "the decommission was not applied: a newer write replaced it".into(),
                )
            })
    }

    /// Whether this node was decommissioned (it may not spend hard limits again).
    pub fn decommissioned(&self) -> Option<tally_core::DecommissionRecord> {
        self.shared
            .state
            .read()
            .decommission(&self.shared.node_id)
            .cloned()
    }

    /// The fleet as this node sees it; `None` when not clustered.
    pub async fn members(&self) -> Option<Vec<Member>> {
        Some(self.shared.cluster.get()?.gossip.members().await)
    }

    /// Gossip counters; `None` when not clustered.
    pub fn gossip_stats(&self) -> Option<&GossipStats> {
        self.shared.cluster.get().map(|c| c.gossip.stats())
    }

    /// Commits everything queued before this call, stops the writer and waits for it.
    pub async fn shutdown(&self) {
        let (reply, rx) = oneshot::channel();
        if self.tx.send(Op::Shutdown { reply }).is_ok() {
            let _ = rx.await;
        }
        self.queue.close();
    }
}

/// Checks record ids and `at` against `now_ms`: at most `future_skew_ms` ahead, and inside
/// the dedup window (an older record could not be deduplicated, so accepting it would risk
/// a double count). The writer checks again with its own clock when it applies the records,
/// since time passes in the queue.
pub(crate) fn validate_records(
    records: &[UsageRecord],
    now: i64,
    config: &NodeConfig,
) -> Result<(), NodeError> {
    let (window, skew) = (config.dedup_window_ms, config.future_skew_ms);
    for r in records {
        tally_core::units::validate_id(&r.id, "record id")
            .map_err(|e| NodeError::invalid_field("id", e.to_string()))?;
        if let Some(at) = r.at_ms {
            if at > now + skew {
                return Err(NodeError::invalid_field(
                    "at",
                    format!(
                        "record {}: at is more than {} s in the future; check the client's clock",
                        r.id,
                        skew / 1000
                    ),
                ));
            }
            if at <= now - window {
                return Err(NodeError::invalid_field(
                    "at",
                    format!(
                        "record {}: at is older than the {} s deduplication window and could be counted twice; record usage promptly",
                        r.id,
                        window / 1000
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// The escrow as the state sees it during one check: locked at the first hard limit.
struct LazyHolds<'a> {
    escrow: &'a escrow::Escrow,
    guard: std::cell::OnceCell<parking_lot::MutexGuard<'a, escrow::Inner>>,
    now_ms: i64,
}

impl tally_core::Holds for LazyHolds<'_> {
    fn held(&self, limit: tally_core::LimitIdx, epoch: tally_core::Epoch) -> u64 {
        self.guard
            .get_or_init(|| self.escrow.0.lock())
            .held(limit, epoch)
    }

    fn fenced(&self) -> bool {
        self.guard
            .get_or_init(|| self.escrow.0.lock())
            .fenced(self.now_ms)
    }
}

fn generate_node_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.write_u32(std::process::id());
    format!("n-{:012x}", h.finish() & 0xffff_ffff_ffff)
}

#[cfg(test)]
mod tests;
