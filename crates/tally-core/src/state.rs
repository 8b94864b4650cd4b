//! The whole replicated state of one node and the decisions made on it.
//!
//! `State` is a plain value: config registers, reset registers and G-counter slots, with
//! the scope index and per-limit cached windows derived from them. Inputs are records
//! (applied by LWW or max merge, in any order, any number of times); outputs are check
//! decisions and the slot increments a record implies. No I/O, no clock: `now_ms` is an
//! argument, so the simulator and the tests drive time.

use std::collections::HashMap;

use foldhash::fast::FixedState;

use crate::config::{
    AccessDenial, AccessRules, ConfigError, DecommissionRecord, EntityRecord, LimitInput,
    LimitRecord, LimitSpec, Member, Mode, ResetRegister, Scope, TOMBSTONE_RETENTION_MS,
    check_record_size, validate_scope,
};
use crate::counter::{Epoch, EpochCounter, LimitCounters, OriginIdx};
use crate::hlc::{Hlc, HlcClock, Version};
use crate::period::{PeriodSpec, Window};
use crate::prices::{Price, PriceRecord};
use crate::rights::Rights;
use crate::scope::{Attrs, IdxBuf, LimitIdx, ScopeIndex, pair_hash};
use crate::units::{Amounts, Metric};

/// String interner: dense indices for limit ids and node ids on the hot path.
#[derive(Debug, Default)]
struct Interner {
    names: Vec<Box<str>>,
    index: HashMap<Box<str>, u32, FixedState>,
}

impl Interner {
    fn intern(&mut self, name: &str) -> u32 {
        if let Some(i) = self.index.get(name) {
            return *i;
        }
        let i = u32::try_from(self.names.len()).expect("fewer than 2^32 names");
        self.names.push(name.into());
        self.index.insert(name.into(), i);
        i
    }

    fn get(&self, name: &str) -> Option<u32> {
        self.index.get(name).copied()
    }

    fn name(&self, i: u32) -> &str {
        &self.names[i as usize]
    }
}

/// A live limit, compiled for the hot path.
#[derive(Debug)]
struct Compiled {
    /// Copied out of the record (which owns the spec) for the hot path.
    metric: Metric,
    max: u64,
    spec_gen: Hlc,
    period: PeriodSpec,
    /// Scope pairs with their pair hashes, for fast verification.
    scope: Vec<(Box<str>, Box<str>, u64)>,
    /// The window of the last `tick`; checks recompute when `now` is outside it.
    cached: Window,
    /// Hard limits: who holds rights (sorted by node id). Empty for soft limits.
    members: Box<[Member]>,
}

impl Compiled {
    fn hard(&self) -> bool {
        !self.members.is_empty()
    }
}

#[derive(Debug, Default)]
struct LimitSlot {
    record: Option<LimitRecord>,
    live: Option<Compiled>,
    reset: Option<ResetRegister>,
    counters: LimitCounters,
}

/// Everything known about one applicable limit, as a check reply needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitStatus {
    pub limit: LimitIdx,
    pub metric: Metric,
    pub used: u64,
    pub max: u64,
    pub remaining: u64,
    pub epoch: Epoch,
    pub period_start_ms: i64,
    /// `i64::MAX` for `never`.
    pub resets_at_ms: i64,
    /// This limit alone would deny the request.
    pub denied: bool,
    pub mode: Mode,
    /// Hard limits: the rights this node may still spend before this request (negative:
    /// debt), after what it holds for reservations and writes in flight. 0 for soft.
    pub free: i64,
    /// Why a hard limit denies.
    pub reason: Option<DenyReason>,
}

/// Why a hard limit denies a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DenyReason {
    /// The budget is spent, as far as this node knows.
    Budget,
    /// This node holds too few rights now; others may grant it more.
    Rights,
}

impl DenyReason {
    pub fn as_str(self) -> &'static str {
        match self {
            DenyReason::Budget => "budget",
            DenyReason::Rights => "rights",
        }
    }
}

/// What a node holds back from the free rights of hard limits (reservations, writes in
/// flight), and whether it may spend rights at all now (a fence after an unclean
/// restart, or after being decommissioned). The node keeps these in memory; the state
/// only asks.
pub trait Holds {
    fn held(&self, limit: LimitIdx, epoch: Epoch) -> u64;
    fn fenced(&self) -> bool {
        false
    }
}

/// Nothing held, not fenced.
pub struct NoHolds;

impl Holds for NoHolds {
    fn held(&self, _: LimitIdx, _: Epoch) -> u64 {
        0
    }
}

/// Why a grant was not made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum GrantError {
    #[error("{0} is not a live hard limit")]
    NotHard(String),
    #[error("a node never grants to itself")]
    ToSelf,
    #[error("node {0} is decommissioned")]
    Decommissioned(String),
    #[error("only {free} rights are free, {amount} asked")]
    TooFew { free: i128, amount: u64 },
}

/// The answer to a check.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Decision {
    pub allowed: bool,
    pub limits: Vec<LimitStatus>,
    /// The access rule of an entity that the request breaks (a denial of its own kind,
    /// whatever the limits say).
    pub access: Option<AccessDenial>,
}

/// One slot increment implied by a record: raise this node's slot of (limit, epoch) by
/// `delta`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Increment {
    pub limit: LimitIdx,
    pub epoch: Epoch,
    pub delta: u64,
}

/// A limit with its usage now, for the limit view.
#[derive(Debug, Clone, PartialEq)]
pub struct LimitView<'a> {
    pub id: &'a str,
    pub spec: &'a LimitSpec,
    pub status: LimitStatus,
    /// Per-origin slot values of the current epoch (the baseline belongs to no node).
    pub nodes: Vec<(&'a str, u64)>,
    pub baseline: u64,
    /// Hard limits: every node's rights in the current epoch (members, and nodes that
    /// used, gave or received any), sorted by node id; its free rights are
    /// `Rights::free(0)` plus what it adopted from decommissioned nodes, in `adopted`.
    pub rights: Vec<(&'a str, Rights, i128)>,
}

/// How a live limit's periods fall, and which epochs count what it counts now.
#[derive(Debug, Clone)]
pub struct LimitCalendar {
    pub metric: Metric,
    /// Epochs with an older reset id belong to an earlier generation of the limit: it
    /// counted another metric, or other periods.
    pub spec_gen: Hlc,
    pub period: PeriodSpec,
    pub current: Epoch,
    pub current_window: Window,
    pub current_baseline: u64,
}

impl LimitCalendar {
    /// The window of an epoch of the current generation; `None` for an epoch of an earlier
    /// generation, whose window the current spec cannot tell.
    pub fn window_of(&self, epoch: Epoch) -> Option<Window> {
        if epoch.reset < self.spec_gen.0 {
            return None;
        }
        let w = self.period.window(epoch.period);
        (w.index == epoch.period).then_some(w)
    }
}

/// Errors of operations that look things up.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StateError {
    #[error("no limit with id {0:?}")]
    UnknownLimit(String),
    #[error("no entity {0}/{1}")]
    UnknownEntity(String, String),
    #[error("no price for model {0:?}")]
    UnknownPrice(String),
    #[error(transparent)]
    Price(#[from] crate::prices::PriceError),
    #[error(transparent)]
    Config(#[from] ConfigError),
}

/// Tombstones forgotten by [`State::gc_tombstones`]: limit ids, entities, models.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Forgotten {
    pub limits: Vec<String>,
    pub entities: Vec<(String, String)>,
    pub prices: Vec<String>,
}

/// Parents of one entity, for expansion; keyed by the entity's pair hash.
type EntityEntry = (Box<str>, Box<str>, Vec<(Box<str>, Box<str>)>);

/// The replicated state of one node.
#[derive(Debug)]
pub struct State {
    node_id: String,
    me: OriginIdx,
    origins: Interner,
    limit_ids: Interner,
    limits: Vec<LimitSlot>,
    index: ScopeIndex,
    entities: HashMap<(String, String), EntityRecord, FixedState>,
    parents: HashMap<u64, Vec<EntityEntry>, FixedState>,
    clock: HlcClock,
    /// Earliest end of any cached window: `tick` has nothing to do before it.
    next_tick_ms: i64,
    /// Decommissioned nodes (LWW by version; never undone).
    decommissions: HashMap<String, DecommissionRecord, FixedState>,
    /// Access rules of live entities that have some, keyed by the entity's pair hash.
    rules: HashMap<u64, Vec<RulesEntry>, FixedState>,
    /// Price records (live or tombstones) by model.
    prices: HashMap<String, PriceRecord, FixedState>,
}

/// Access rules of one entity, for checks; keyed by the entity's pair hash.
type RulesEntry = (Box<str>, Box<str>, AccessRules);

impl State {
    pub fn new(node_id: &str) -> State {
        let mut origins = Interner::default();
        let me = origins.intern(node_id);
        State {
            node_id: node_id.to_string(),
            me,
            origins,
            limit_ids: Interner::default(),
            limits: Vec::new(),
            index: ScopeIndex::default(),
            entities: HashMap::default(),
            parents: HashMap::default(),
            clock: HlcClock::default(),
            next_tick_ms: i64::MIN,
            decommissions: HashMap::default(),
            rules: HashMap::default(),
            prices: HashMap::default(),
        }
    }

    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    pub fn me(&self) -> OriginIdx {
        self.me
    }

    pub fn origin_idx(&mut self, node: &str) -> OriginIdx {
        self.origins.intern(node)
    }

    pub fn origin_name(&self, idx: OriginIdx) -> &str {
        self.origins.name(idx)
    }

    pub fn limit_idx(&self, id: &str) -> Option<LimitIdx> {
        self.limit_ids.get(id)
    }

    pub fn limit_id(&self, idx: LimitIdx) -> &str {
        self.limit_ids.name(idx)
    }

    fn slot_mut(&mut self, id: &str) -> (LimitIdx, &mut LimitSlot) {
        let idx = self.limit_ids.intern(id);
        if self.limits.len() <= idx as usize {
            self.limits
                .resize_with(idx as usize + 1, LimitSlot::default);
        }
        (idx, &mut self.limits[idx as usize])
    }

    /// A fresh HLC timestamp.
    pub fn hlc_now(&mut self, now_ms: i64) -> Hlc {
        self.clock.now(now_ms)
    }

    fn version(&mut self, now_ms: i64) -> Version {
        Version {
            hlc: self.clock.now(now_ms),
            node: self.node_id.clone(),
        }
    }

    // ----- config -------------------------------------------------------------------

    /// The record a `PUT /v1/limits/{id}` writes. Replacing a limit without changing what
    /// it counts keeps its generation and anchor (changing `max` is not a reset); any other
    /// change starts a new generation (DESIGN.md §2).
    pub fn prepare_limit_put(
        &mut self,
        id: &str,
        input: LimitInput,
        now_ms: i64,
    ) -> Result<LimitRecord, ConfigError> {
        input.validate(id)?;
        let version = self.version(now_ms);
        let current = self
            .limit_idx(id)
            .and_then(|i| self.limits[i as usize].record.as_ref())
            .and_then(|r| r.spec.as_ref())
            .filter(|s| s.input.same_counting(&input));
        let (anchor_ms, spec_gen) = match current {
            Some(s) => (s.anchor_ms, s.spec_gen),
            None => (now_ms, version.hlc),
        };
        let rec = LimitRecord {
            id: id.to_string(),
            version,
            spec: Some(LimitSpec {
                input,
                anchor_ms,
                spec_gen,
            }),
        };
        check_record_size(&rec, "limit")?;
        Ok(rec)
    }

    /// The record of a *derived* limit: one whose counting is a pure function of another
    /// record (its template), so that every node that creates it on its own, at any time,
    /// writes the same generation and anchor and their counters share epochs (I4, I5).
    /// Envoy's rate limit service creates one such limit per value of a wildcard
    /// descriptor; two nodes seeing the same new value concurrently must not split its
    /// usage into two generations, which ordinary puts (generation = the writer's HLC)
    /// would do.
    ///
    /// The generation is `pinned_gen` unless the record held for `id` forbids it: a
    /// tombstone or a live spec with other counting at or above it is superseded by the
    /// next HLC value after its generation, which every node holding that record computes
    /// alike. A live spec with the same counting keeps its generation and anchor.
    pub fn prepare_limit_put_pinned(
        &mut self,
        id: &str,
        input: LimitInput,
        anchor_ms: i64,
        pinned_gen: Hlc,
        now_ms: i64,
    ) -> Result<LimitRecord, ConfigError> {
        input.validate(id)?;
        let version = self.version(now_ms);
        let held = self
            .limit_idx(id)
            .and_then(|i| self.limits[i as usize].record.as_ref());
        let (anchor_ms, spec_gen) = match held {
            Some(r) => match &r.spec {
                Some(s) if s.input.same_counting(&input) => (s.anchor_ms, s.spec_gen),
                _ if r.generation() >= pinned_gen => (anchor_ms, Hlc(r.generation().0 + 1)),
                _ => (anchor_ms, pinned_gen),
            },
            None => (anchor_ms, pinned_gen),
        };
        Ok(LimitRecord {
            id: id.to_string(),
            version,
            spec: Some(LimitSpec {
                input,
                anchor_ms,
                spec_gen,
            }),
        })
    }

    /// The tombstone a `DELETE /v1/limits/{id}` writes.
    pub fn prepare_limit_delete(
        &mut self,
        id: &str,
        now_ms: i64,
    ) -> Result<LimitRecord, StateError> {
        if self.limit(id).is_none() {
            return Err(StateError::UnknownLimit(id.to_string()));
        }
        Ok(LimitRecord {
            id: id.to_string(),
            version: self.version(now_ms),
            spec: None,
        })
    }

    /// Applies a limit record if it supersedes the one held (LWW by generation, then
    /// version: [`LimitRecord::supersedes`]). Returns whether it changed.
    pub fn apply_limit(&mut self, rec: LimitRecord, now_ms: i64) -> bool {
        self.clock.observe(rec.version.hlc);
        let (idx, slot) = self.slot_mut(&rec.id);
        if slot.record.as_ref().is_some_and(|r| !rec.supersedes(r)) {
            return false;
        }
        let old = slot.live.take();
        let new = rec.spec.as_ref().and_then(|spec| {
            let i = &spec.input;
            // A zone this build does not know (from a newer peer) leaves the limit inert
            // here rather than counting it wrongly.
            let period =
                PeriodSpec::new(i.period, i.calendar_aligned, &i.timezone, spec.anchor_ms).ok()?;
            let cached = period.window(now_ms);
            Some(Compiled {
                metric: i.metric,
                max: i.max,
                spec_gen: spec.spec_gen,
                scope: i
                    .scope
                    .iter()
                    .map(|(k, v)| (k.as_str().into(), v.as_str().into(), pair_hash(k, v)))
                    .collect(),
                period,
                cached,
                members: match i.mode {
                    Mode::Hard => i.members.clone().into_boxed_slice(),
                    Mode::Soft => Box::default(),
                },
            })
        });
        slot.record = Some(rec);
        if let Some(c) = &new {
            self.next_tick_ms = self.next_tick_ms.min(c.cached.end_ms);
        }
        let slot = &mut self.limits[idx as usize];
        slot.live = new;
        if let Some(old) = &old {
            self.index
                .remove(idx, old.scope.iter().map(|(k, v, _)| (&**k, &**v)));
        }
        if let Some(new) = &self.limits[idx as usize].live {
            self.index
                .insert(idx, new.scope.iter().map(|(k, v, _)| (&**k, &**v)));
        }
        true
    }

    /// The live limit with this id.
    pub fn limit(&self, id: &str) -> Option<&LimitSpec> {
        let idx = self.limit_idx(id)?;
        let slot = &self.limits[idx as usize];
        slot.live.as_ref()?;
        slot.record.as_ref()?.spec.as_ref()
    }

    /// Every limit record known, live or tombstone (for persistence and gossip).
    pub fn limit_records(&self) -> impl Iterator<Item = &LimitRecord> {
        self.limits.iter().filter_map(|s| s.record.as_ref())
    }

    /// Ids of live limits, sorted.
    pub fn live_limit_ids(&self) -> Vec<&str> {
        let mut ids: Vec<&str> = self
            .limits
            .iter()
            .enumerate()
            .filter(|(_, s)| s.live.is_some())
            .map(|(i, _)| self.limit_ids.name(i as u32))
            .collect();
        ids.sort_unstable();
        ids
    }

    /// The record a `PUT /v1/entities/{dimension}/{value}` writes; refuses cycles.
    pub fn prepare_entity_put(
        &mut self,
        dimension: &str,
        value: &str,
        parents: Scope,
        rules: AccessRules,
        now_ms: i64,
    ) -> Result<EntityRecord, ConfigError> {
        crate::units::validate_dimension(dimension).map_err(ConfigError::from)?;
        crate::units::validate_attribute_value(value).map_err(ConfigError::from)?;
        validate_scope(&parents, "parents")?;
        // A cycle first: an entity naming itself as its parent is the shortest cycle
        // (409), not merely a parent of its own dimension (400).
        self.find_cycle(dimension, value, &parents)?;
        if parents.contains_key(dimension) {
            return Err(ConfigError::SelfDimension(dimension.to_string()));
        }
        let rules = rules.normalize()?;
        let rec = EntityRecord {
            dimension: dimension.to_string(),
            value: value.to_string(),
            version: self.version(now_ms),
            parents: Some(parents),
            rules,
        };
        check_record_size(&rec, "entity")?;
        Ok(rec)
    }

    fn find_cycle(&self, dimension: &str, value: &str, parents: &Scope) -> Result<(), ConfigError> {
        // Depth-first over the parent graph with the new edges in place.
        let mut stack: Vec<(String, String, String)> = parents
            .iter()
            .map(|(d, v)| {
                (
                    d.clone(),
                    v.clone(),
                    format!("{dimension}/{value} -> {d}/{v}"),
                )
            })
            .collect();
        let mut seen = std::collections::HashSet::new();
        while let Some((d, v, path)) = stack.pop() {
            if d == dimension && v == value {
                return Err(ConfigError::Cycle {
                    dimension: dimension.to_string(),
                    value: value.to_string(),
                    path,
                });
            }
            if !seen.insert((d.clone(), v.clone())) {
                continue;
            }
            if let Some(ps) = self.entities.get(&(d, v)).and_then(|e| e.parents.as_ref()) {
                for (pd, pv) in ps {
                    stack.push((pd.clone(), pv.clone(), format!("{path} -> {pd}/{pv}")));
                }
            }
        }
        Ok(())
    }

    pub fn prepare_entity_delete(
        &mut self,
        dimension: &str,
        value: &str,
        now_ms: i64,
    ) -> Result<EntityRecord, StateError> {
        if self.entity(dimension, value).is_none() {
            return Err(StateError::UnknownEntity(dimension.into(), value.into()));
        }
        Ok(EntityRecord {
            dimension: dimension.to_string(),
            value: value.to_string(),
            version: self.version(now_ms),
            parents: None,
            rules: AccessRules::default(),
        })
    }

    /// Applies an entity record if newer (LWW). Returns whether it changed.
    pub fn apply_entity(&mut self, rec: EntityRecord) -> bool {
        self.clock.observe(rec.version.hlc);
        let key = (rec.dimension.clone(), rec.value.clone());
        if self
            .entities
            .get(&key)
            .is_some_and(|e| e.version >= rec.version)
        {
            return false;
        }
        let h = pair_hash(&rec.dimension, &rec.value);
        let list = self.parents.entry(h).or_default();
        list.retain(|(d, v, _)| !(**d == *rec.dimension && **v == *rec.value));
        if let Some(ps) = &rec.parents {
            let ps = ps
                .iter()
                .map(|(k, v)| (k.as_str().into(), v.as_str().into()))
                .collect();
            list.push((rec.dimension.as_str().into(), rec.value.as_str().into(), ps));
        }
        if list.is_empty() {
            self.parents.remove(&h);
        }
        let list = self.rules.entry(h).or_default();
        list.retain(|(d, v, _)| !(**d == *rec.dimension && **v == *rec.value));
        if rec.parents.is_some() && !rec.rules.is_default() {
            list.push((
                rec.dimension.as_str().into(),
                rec.value.as_str().into(),
                rec.rules.clone(),
            ));
        }
        if list.is_empty() {
            self.rules.remove(&h);
        }
        self.entities.insert(key, rec);
        true
    }

    /// The access rule of some entity that expanded attributes break, if any: the
    /// request's own attributes first, then inherited ones, each entity's rules in the
    /// order inactive, expired, allow (by attribute name).
    fn access(&self, attrs: &Attrs<'_>, now_ms: i64) -> Option<AccessDenial> {
        if self.rules.is_empty() {
            return None;
        }
        for &(d, v, h) in attrs.as_slice() {
            let Some(list) = self.rules.get(&h) else {
                continue;
            };
            for (ed, ev, rules) in list {
                if **ed == *d && **ev == *v {
                    if let Some(rule) = rules.broken(now_ms, |name| attrs.get(name)) {
                        return Some(AccessDenial {
                            dimension: d.to_string(),
                            value: v.to_string(),
                            rule,
                        });
                    }
                }
            }
        }
        None
    }

    // ----- prices --------------------------------------------------------------------

    /// The record a `PUT /v1/prices/{model}` writes.
    pub fn prepare_price_put(
        &mut self,
        model: &str,
        price: Price,
        now_ms: i64,
    ) -> Result<PriceRecord, StateError> {
        crate::prices::validate_model(model)?;
        price.validate()?;
        Ok(PriceRecord {
            model: model.to_string(),
            version: self.version(now_ms),
            price: Some(price),
        })
    }

    /// The tombstone a `DELETE /v1/prices/{model}` writes; unknown models are refused.
    pub fn prepare_price_delete(
        &mut self,
        model: &str,
        now_ms: i64,
    ) -> Result<PriceRecord, StateError> {
        if self.price(model).is_none() {
            return Err(StateError::UnknownPrice(model.into()));
        }
        Ok(PriceRecord {
            model: model.to_string(),
            version: self.version(now_ms),
            price: None,
        })
    }

    /// Applies a price record if newer (LWW). Returns whether it changed.
    pub fn apply_price(&mut self, rec: PriceRecord) -> bool {
        self.clock.observe(rec.version.hlc);
        if self
            .prices
            .get(&rec.model)
            .is_some_and(|p| p.version >= rec.version)
        {
            return false;
        }
        self.prices.insert(rec.model.clone(), rec);
        true
    }

    /// The live price of a model.
    pub fn price(&self, model: &str) -> Option<&Price> {
        self.prices.get(model).and_then(|p| p.price.as_ref())
    }

    /// The record (live or tombstone) of a model's price.
    pub fn price_record(&self, model: &str) -> Option<&PriceRecord> {
        self.prices.get(model)
    }

    pub fn price_records(&self) -> impl Iterator<Item = &PriceRecord> {
        self.prices.values()
    }

    /// The parents of a live entity.
    pub fn entity(&self, dimension: &str, value: &str) -> Option<&Scope> {
        self.entities
            .get(&(dimension.to_string(), value.to_string()))
            .and_then(|e| e.parents.as_ref())
    }

    pub fn entity_records(&self) -> impl Iterator<Item = &EntityRecord> {
        self.entities.values()
    }

    /// Forgets tombstones older than the retention. Returns the keys forgotten, so the
    /// store can drop them too.
    pub fn gc_tombstones(&mut self, now_ms: i64) -> Forgotten {
        let cutoff = now_ms - TOMBSTONE_RETENTION_MS;
        let mut limits = Vec::new();
        for slot in &mut self.limits {
            if slot
                .record
                .as_ref()
                .is_some_and(|r| r.spec.is_none() && r.version.hlc.wall_ms() < cutoff)
            {
                limits.push(slot.record.take().expect("checked").id);
            }
        }
        let entities: Vec<(String, String)> = self
            .entities
            .iter()
            .filter(|(_, e)| e.parents.is_none() && e.version.hlc.wall_ms() < cutoff)
            .map(|(k, _)| k.clone())
            .collect();
        for k in &entities {
            self.entities.remove(k);
        }
        let prices: Vec<String> = self
            .prices
            .values()
            .filter(|p| p.price.is_none() && p.version.hlc.wall_ms() < cutoff)
            .map(|p| p.model.clone())
            .collect();
        for m in &prices {
            self.prices.remove(m);
        }
        Forgotten {
            limits,
            entities,
            prices,
        }
    }

    // ----- resets --------------------------------------------------------------------

    /// The register a reset (or set-usage, with `baseline`) of `id` writes: a new epoch
    /// in the current period.
    pub fn prepare_reset(
        &mut self,
        id: &str,
        baseline: u64,
        now_ms: i64,
    ) -> Result<ResetRegister, StateError> {
        let idx = self
            .limit_idx(id)
            .ok_or_else(|| StateError::UnknownLimit(id.into()))?;
        let c = self.limits[idx as usize]
            .live
            .as_ref()
            .ok_or_else(|| StateError::UnknownLimit(id.into()))?;
        let (spec_gen, period) = (c.spec_gen, c.period.window(now_ms).index);
        let reset = self.version(now_ms);
        Ok(ResetRegister {
            spec_gen,
            period,
            reset,
            baseline,
        })
    }

    /// Applies a reset register if it supersedes the current one.
    pub fn apply_reset(&mut self, id: &str, reg: ResetRegister) -> bool {
        self.clock.observe(reg.reset.hlc);
        let (_, slot) = self.slot_mut(id);
        if slot.reset.as_ref().is_some_and(|r| !reg.supersedes(r)) {
            return false;
        }
        slot.reset = Some(reg);
        true
    }

    pub fn reset_registers(&self) -> impl Iterator<Item = (&str, &ResetRegister)> {
        self.limits
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.reset.as_ref().map(|r| (self.limit_ids.name(i as u32), r)))
    }

    // ----- counters ------------------------------------------------------------------

    /// Raises `origin`'s slot of (limit, epoch) to `value` (max merge).
    pub fn merge_slot(
        &mut self,
        limit_id: &str,
        epoch: Epoch,
        origin: OriginIdx,
        value: u64,
    ) -> bool {
        let (_, slot) = self.slot_mut(limit_id);
        slot.counters.merge(epoch, origin, value)
    }

    /// Like [`State::merge_slot`] for an interned limit.
    pub fn merge_slot_idx(
        &mut self,
        limit: LimitIdx,
        epoch: Epoch,
        origin: OriginIdx,
        value: u64,
    ) -> bool {
        self.limits[limit as usize]
            .counters
            .merge(epoch, origin, value)
    }

    /// This node's slot of (limit, epoch), if memory holds it. `None` means "ask the
    /// store": the epoch may have been dropped from memory as history.
    pub fn own_slot(&self, limit: LimitIdx, epoch: Epoch) -> Option<u64> {
        self.limits
            .get(limit as usize)?
            .counters
            .get(epoch)?
            .slots()
            .iter()
            .find(|(o, _)| *o == self.me)
            .map(|(_, v)| *v)
    }

    /// `origin`'s slot of (limit, epoch) as held in memory (0 when unknown).
    pub fn slot(&self, limit_id: &str, epoch: Epoch, origin: &str) -> u64 {
        let (Some(l), Some(o)) = (self.limit_idx(limit_id), self.origins.get(origin)) else {
            return 0;
        };
        self.limits[l as usize]
            .counters
            .get(epoch)
            .map_or(0, |c| c.slot(o))
    }

    /// The record (live or tombstone) of a limit, if any.
    pub fn limit_record(&self, id: &str) -> Option<&LimitRecord> {
        self.limits
            .get(self.limit_idx(id)? as usize)?
            .record
            .as_ref()
    }

    /// The record (live or tombstone) of an entity, if any.
    pub fn entity_record(&self, dimension: &str, value: &str) -> Option<&EntityRecord> {
        self.entities
            .get(&(dimension.to_string(), value.to_string()))
    }

    /// The reset register of a limit, if any.
    pub fn reset_register(&self, id: &str) -> Option<&ResetRegister> {
        self.limits
            .get(self.limit_idx(id)? as usize)?
            .reset
            .as_ref()
    }

    /// Whether (limit, epoch) still counts, now or later: the limit is live and the epoch
    /// is the one the limit assigns to its own period, in the current period or a later
    /// one (a record whose `at` is slightly ahead lands in the next period). Epochs of
    /// earlier periods are closed, and so are epochs superseded by a reset or a spec change
    /// (both only move forward, so a superseded epoch never opens again).
    pub fn is_open(&self, limit_id: &str, epoch: Epoch, now_ms: i64) -> bool {
        let Some(idx) = self.limit_idx(limit_id) else {
            return false;
        };
        let slot = &self.limits[idx as usize];
        let Some(c) = slot.live.as_ref() else {
            return false;
        };
        let (current, _, _) = Self::epoch_at(slot, c, now_ms);
        // The period index is the period's start instant, so it names its own period.
        epoch.period >= current.index && Self::epoch_at(slot, c, epoch.period).1 == epoch
    }

    /// Whether the stored slots of (limit, epoch) may be dropped from history at `now_ms`
    /// when `keep_ms` of closed history is kept: the epoch is not open (no record can be
    /// counted in it any more) and it ended at or before `now_ms - keep_ms`. The end of an
    /// epoch of the limit's current generation is its window's end; an epoch this node
    /// cannot place (the limit was deleted, or changed what it counts, so no record reaches
    /// the epoch again) is dated by its start. The caller keeps `keep_ms` at least the
    /// dedup window: a record's `at` may be that old, and its epoch's own slot is read back
    /// before it is raised (dropping it would let the slot go down, I3).
    pub fn history_expired(&self, limit_id: &str, epoch: Epoch, now_ms: i64, keep_ms: i64) -> bool {
        let cutoff = now_ms.saturating_sub(keep_ms);
        // The period index is the period's start: a later start means a later end.
        if epoch.period > cutoff || self.is_open(limit_id, epoch, now_ms) {
            return false;
        }
        let end = self
            .calendar(limit_id, now_ms)
            .and_then(|c| c.window_of(epoch))
            .map_or(epoch.period, |w| w.end_ms);
        end <= cutoff
    }

    /// How a live limit's epochs fall, for reading its history.
    pub fn calendar(&self, limit_id: &str, now_ms: i64) -> Option<LimitCalendar> {
        let slot = &self.limits[self.limit_idx(limit_id)? as usize];
        let c = slot.live.as_ref()?;
        let (window, current, baseline) = Self::epoch_at(slot, c, now_ms);
        Some(LimitCalendar {
            metric: c.metric,
            spec_gen: c.spec_gen,
            period: c.period.clone(),
            current,
            current_window: window,
            current_baseline: baseline,
        })
    }

    /// Every (limit, epoch, counter) in memory.
    pub fn counters(&self) -> impl Iterator<Item = (&str, Epoch, &EpochCounter)> {
        self.limits.iter().enumerate().flat_map(move |(i, s)| {
            let id = self.limit_ids.name(i as u32);
            s.counters.epochs().map(move |(e, c)| (id, e, c))
        })
    }

    pub fn slot_count(&self) -> usize {
        self.limits.iter().map(|s| s.counters.slot_count()).sum()
    }

    /// The epoch of instant `t_ms` for a live limit, and its baseline: the reset register
    /// opens its epoch only in its own period, and only if the reset is later than the
    /// limit's generation (I5: a function of the spec, the register and the instant,
    /// nothing node-local). Both the generation and the register only grow, so a limit's
    /// epoch for a period never goes back, whichever concurrent writes win.
    fn epoch_at(slot: &LimitSlot, c: &Compiled, t_ms: i64) -> (Window, Epoch, u64) {
        let w = if c.cached.contains(t_ms) {
            c.cached
        } else {
            c.period.window(t_ms)
        };
        match &slot.reset {
            Some(r) if r.period == w.index && r.reset.hlc > c.spec_gen => (
                w,
                Epoch {
                    period: w.index,
                    reset: r.reset.hlc.0,
                },
                r.baseline,
            ),
            _ => (
                w,
                Epoch {
                    period: w.index,
                    reset: c.spec_gen.0,
                },
                0,
            ),
        }
    }

    /// The epoch a limit assigns to instant `t_ms` (I5).
    pub fn epoch_of(&self, limit_id: &str, t_ms: i64) -> Option<Epoch> {
        let slot = &self.limits[self.limit_idx(limit_id)? as usize];
        Some(Self::epoch_at(slot, slot.live.as_ref()?, t_ms).1)
    }

    /// Advances cached windows past `now_ms` and drops closed epochs from memory (they are
    /// history, kept by the store). Cheap when no window ended.
    pub fn tick(&mut self, now_ms: i64) {
        if now_ms < self.next_tick_ms {
            return;
        }
        let mut next = i64::MAX;
        for slot in &mut self.limits {
            if let Some(c) = &mut slot.live {
                if !c.cached.contains(now_ms) {
                    let w = c.period.window(now_ms);
                    debug_assert!(w.index >= c.cached.index || now_ms < c.cached.start_ms);
                    c.cached = w;
                    let current = w.index;
                    slot.counters.retain(|e| e.period >= current);
                }
                next = next.min(c.cached.end_ms);
            }
        }
        self.next_tick_ms = next;
    }

    // ----- decisions -----------------------------------------------------------------

    /// Expands request attributes through entity parents (transitively; a dimension the
    /// request already has is never overridden, which also ends any cycle).
    pub fn expand<'a>(&'a self, attributes: &[(&'a str, &'a str)]) -> Attrs<'a> {
        let mut attrs = Attrs::new();
        for &(d, v) in attributes {
            attrs.push(d, v);
        }
        if self.parents.is_empty() {
            return attrs;
        }
        let mut i = 0;
        while i < attrs.len() {
            let (d, v, h) = attrs.as_slice()[i];
            if let Some(list) = self.parents.get(&h) {
                for (ed, ev, ps) in list {
                    if **ed == *d && **ev == *v {
                        for (pd, pv) in ps {
                            attrs.push(pd, pv);
                        }
                    }
                }
            }
            i += 1;
        }
        attrs
    }

    /// Every live limit that applies to (expanded) `attrs`.
    fn applicable(&self, attrs: &Attrs<'_>, out: &mut IdxBuf) {
        self.index.candidates(attrs, out);
        out.retain(|i| {
            self.limits[i as usize]
                .live
                .as_ref()
                .is_some_and(|c| attrs.covers(c.scope.iter().map(|(k, v, h)| (&**k, &**v, *h))))
        });
        out.dedup();
    }

    fn status(
        &self,
        limit: LimitIdx,
        now_ms: i64,
        requested: Amounts,
        holds: &dyn Holds,
    ) -> LimitStatus {
        let slot = &self.limits[limit as usize];
        let c = slot.live.as_ref().expect("applicable limits are live");
        let (w, epoch, baseline) = Self::epoch_at(slot, c, now_ms);
        let used = baseline.saturating_add(slot.counters.get(epoch).map_or(0, EpochCounter::total));
        let metric = c.metric;
        let max = c.max;
        let want = requested.of(metric);
        let over_budget = if want == 0 {
            used >= max
        } else {
            used.saturating_add(want) > max
        };
        let (mode, free, reason) = if c.hard() {
            let free = self.free_of(slot, c, epoch, baseline, self.me, holds.held(limit, epoch));
            let short = if want == 0 {
                free <= 0
            } else {
                free < i128::from(want)
            };
            let reason = if over_budget {
                Some(DenyReason::Budget)
            } else if short || holds.fenced() {
                Some(DenyReason::Rights)
            } else {
                None
            };
            let free = i64::try_from(free).unwrap_or(if free < 0 { i64::MIN } else { i64::MAX });
            (Mode::Hard, free, reason)
        } else {
            (Mode::Soft, 0, None)
        };
        LimitStatus {
            limit,
            metric,
            used,
            max,
            remaining: max.saturating_sub(used),
            epoch,
            period_start_ms: w.start_ms,
            resets_at_ms: w.end_ms,
            denied: over_budget || reason.is_some(),
            mode,
            free,
            reason,
        }
    }

    // ----- hard limits ---------------------------------------------------------------

    /// `node`'s rights in a hard limit's epoch (module `rights`).
    fn rights_in(
        &self,
        slot: &LimitSlot,
        c: &Compiled,
        epoch: Epoch,
        baseline: u64,
        node: &str,
    ) -> Rights {
        let alloc = crate::rights::alloc(c.max.saturating_sub(baseline), &c.members, node);
        let (Some(o), Some(ctr)) = (self.origins.get(node), slot.counters.get(epoch)) else {
            return Rights {
                alloc,
                ..Rights::default()
            };
        };
        Rights {
            alloc,
            received: ctr.received(o),
            given: ctr.given(o),
            used: ctr.slot(o),
        }
    }

    /// What `node` may spend: its own free rights after `held`, plus the remaining rights
    /// of every decommissioned node whose rights pass to it. A decommissioned node itself
    /// may spend nothing.
    fn free_of(
        &self,
        slot: &LimitSlot,
        c: &Compiled,
        epoch: Epoch,
        baseline: u64,
        node: OriginIdx,
        held: u64,
    ) -> i128 {
        let name = self.origins.name(node);
        let own = self.rights_in(slot, c, epoch, baseline, name).free(held);
        if self.decommissions.contains_key(name) {
            return own.min(0);
        }
        own + self.adopted(slot, c, epoch, baseline, name)
    }

    /// Σ remaining rights of the nodes decommissioned in favour of `node`.
    fn adopted(
        &self,
        slot: &LimitSlot,
        c: &Compiled,
        epoch: Epoch,
        baseline: u64,
        node: &str,
    ) -> i128 {
        if self.decommissions.is_empty() {
            return 0;
        }
        self.decommissions
            .keys()
            .filter(|d| self.successor_of(d) == node)
            .map(|d| self.rights_in(slot, c, epoch, baseline, d).free(0))
            .sum()
    }

    /// Where a node's rights end up: itself, or the end of its chain of successors.
    pub fn successor_of<'a>(&'a self, node: &'a str) -> &'a str {
        let mut at = node;
        for _ in 0..=self.decommissions.len() {
            match self.decommissions.get(at) {
                Some(r) if r.successor != at => at = &r.successor,
                _ => return at,
            }
        }
        at // a cycle of decommissions (concurrent operators): stop anywhere, stably
    }

    /// This node's free rights in a hard limit's epoch after `held`; `None` if the limit
    /// is not a live hard limit.
    pub fn hard_free(&self, limit: LimitIdx, epoch: Epoch, held: u64) -> Option<i128> {
        let slot = self.limits.get(limit as usize)?;
        let c = slot.live.as_ref().filter(|c| c.hard())?;
        let baseline = self.baseline_of(slot, c, epoch);
        Some(self.free_of(slot, c, epoch, baseline, self.me, held))
    }

    /// Every live hard limit with its current epoch at `now_ms` and its max.
    pub fn hard_limits(&self, now_ms: i64) -> Vec<(LimitIdx, Epoch, u64)> {
        self.limits
            .iter()
            .enumerate()
            .filter_map(|(i, slot)| {
                let c = slot.live.as_ref().filter(|c| c.hard())?;
                let (_, epoch, _) = Self::epoch_at(slot, c, now_ms);
                Some((i as LimitIdx, epoch, c.max))
            })
            .collect()
    }

    /// Whether a live limit is hard.
    pub fn is_hard(&self, limit: LimitIdx) -> bool {
        self.limits
            .get(limit as usize)
            .and_then(|s| s.live.as_ref())
            .is_some_and(Compiled::hard)
    }

    /// The baseline an epoch of a live limit started with.
    fn baseline_of(&self, slot: &LimitSlot, c: &Compiled, epoch: Epoch) -> u64 {
        let (_, e, baseline) = Self::epoch_at(slot, c, epoch.period);
        if e == epoch { baseline } else { 0 }
    }

    /// Every node's rights in an epoch of a hard limit, with what each could spend
    /// (nothing held): members, and nodes that used, gave or received rights.
    pub fn rights_table(&self, limit: LimitIdx, epoch: Epoch) -> Vec<(&str, Rights, i128)> {
        let Some(slot) = self.limits.get(limit as usize) else {
            return Vec::new();
        };
        let Some(c) = slot.live.as_ref().filter(|c| c.hard()) else {
            return Vec::new();
        };
        let baseline = self.baseline_of(slot, c, epoch);
        let mut names: Vec<&str> = c.members.iter().map(|m| m.node.as_str()).collect();
        if let Some(ctr) = slot.counters.get(epoch) {
            names.extend(ctr.slots().iter().map(|&(o, _)| self.origins.name(o)));
            for &(f, t, _) in ctr.grants() {
                names.push(self.origins.name(f));
                names.push(self.origins.name(t));
            }
        }
        names.sort_unstable();
        names.dedup();
        names
            .into_iter()
            .map(|n| {
                let r = self.rights_in(slot, c, epoch, baseline, n);
                let free = match self.origins.get(n) {
                    Some(o) => self.free_of(slot, c, epoch, baseline, o, 0),
                    None if self.decommissions.contains_key(n) => 0,
                    None => r.free(0) + self.adopted(slot, c, epoch, baseline, n),
                };
                (n, r, free)
            })
            .collect()
    }

    /// What `from` has granted `to` in total in an epoch.
    pub fn grant(&self, limit: LimitIdx, epoch: Epoch, from: &str, to: &str) -> u64 {
        let (Some(slot), Some(f), Some(t)) = (
            self.limits.get(limit as usize),
            self.origins.get(from),
            self.origins.get(to),
        ) else {
            return 0;
        };
        slot.counters.get(epoch).map_or(0, |c| c.grant(f, t))
    }

    /// Every grant `from` made in an epoch, as (to, total).
    pub fn grant_row(&self, limit: LimitIdx, epoch: Epoch, from: &str) -> Vec<(&str, u64)> {
        let (Some(slot), Some(f)) = (self.limits.get(limit as usize), self.origins.get(from))
        else {
            return Vec::new();
        };
        let mut row: Vec<(&str, u64)> = slot
            .counters
            .get(epoch)
            .map(|c| {
                c.grants()
                    .iter()
                    .filter(|g| g.0 == f)
                    .map(|&(_, t, v)| (self.origins.name(t), v))
                    .collect()
            })
            .unwrap_or_default();
        row.sort_unstable();
        row
    }

    /// Raises `from`'s grant to `to` (max merge). Own grants come only from this node's
    /// disk, like its slots.
    pub fn merge_grant(
        &mut self,
        limit_id: &str,
        epoch: Epoch,
        from: &str,
        to: &str,
        value: u64,
    ) -> bool {
        let f = self.origins.intern(from);
        let t = self.origins.intern(to);
        let (_, slot) = self.slot_mut(limit_id);
        slot.counters.merge_grant(epoch, f, t, value)
    }

    /// The new total of this node's grant to `to` if it gives `amount` more, checked
    /// against its free rights after `held`.
    pub fn prepare_grant(
        &self,
        limit: LimitIdx,
        epoch: Epoch,
        to: &str,
        amount: u64,
        held: u64,
    ) -> Result<u64, GrantError> {
        let id = || self.limit_id(limit).to_string();
        if to == self.node_id {
            return Err(GrantError::ToSelf);
        }
        if self.decommissions.contains_key(to) || self.decommissions.contains_key(&self.node_id) {
            return Err(GrantError::Decommissioned(to.to_string()));
        }
        let free = self
            .hard_free(limit, epoch, held)
            .ok_or_else(|| GrantError::NotHard(id()))?;
        if free < i128::from(amount) {
            return Err(GrantError::TooFew { free, amount });
        }
        Ok(self
            .grant(limit, epoch, &self.node_id, to)
            .saturating_add(amount))
    }

    // ----- decommissions -------------------------------------------------------------

    /// The record a decommission of `node` in favour of `successor` writes.
    pub fn prepare_decommission(
        &mut self,
        node: &str,
        successor: &str,
        now_ms: i64,
    ) -> Result<DecommissionRecord, ConfigError> {
        crate::units::validate_id(node, "node id")?;
        crate::units::validate_id(successor, "successor node id")?;
        if node == successor {
            return Err(ConfigError::Members(
                "a node cannot be its own successor".into(),
            ));
        }
        if self.decommissions.contains_key(successor) {
            return Err(ConfigError::Members(format!(
                "the successor {successor} is decommissioned itself"
            )));
        }
        Ok(DecommissionRecord {
            node: node.to_string(),
            successor: successor.to_string(),
            version: self.version(now_ms),
        })
    }

    /// Applies a decommission record if newer (LWW). Returns whether it changed.
    pub fn apply_decommission(&mut self, rec: DecommissionRecord) -> bool {
        self.clock.observe(rec.version.hlc);
        if self
            .decommissions
            .get(&rec.node)
            .is_some_and(|r| r.version >= rec.version)
        {
            return false;
        }
        self.decommissions.insert(rec.node.clone(), rec);
        true
    }

    pub fn decommission(&self, node: &str) -> Option<&DecommissionRecord> {
        self.decommissions.get(node)
    }

    pub fn decommission_records(&self) -> impl Iterator<Item = &DecommissionRecord> {
        self.decommissions.values()
    }

    /// May a request with these attributes and estimates proceed? Allowed iff for every
    /// applicable limit `used + requested <= max` (with nothing requested: `used < max`).
    /// A request counts 1 against `requests` limits.
    pub fn check(&self, attributes: &[(&str, &str)], estimate: Amounts, now_ms: i64) -> Decision {
        let mut d = Decision::default();
        self.check_into(attributes, estimate, now_ms, &mut d);
        d
    }

    /// [`State::check_into`] with this node's holds on hard limits taken into account.
    pub fn check_held(
        &self,
        attributes: &[(&str, &str)],
        estimate: Amounts,
        now_ms: i64,
        holds: &dyn Holds,
        out: &mut Decision,
    ) {
        let attrs = self.expand(attributes);
        let requested = Amounts {
            requests: 1,
            ..estimate
        };
        out.limits.clear();
        let mut idx = IdxBuf::new();
        self.applicable(&attrs, &mut idx);
        out.limits
            .extend(idx.iter().map(|i| self.status(i, now_ms, requested, holds)));
        out.access = self.access(&attrs, now_ms);
        out.allowed = out.access.is_none() && out.limits.iter().all(|l| !l.denied);
    }

    /// [`State::check`] into a reused decision, so a caller that keeps one allocates
    /// nothing per check.
    pub fn check_into(
        &self,
        attributes: &[(&str, &str)],
        estimate: Amounts,
        now_ms: i64,
        out: &mut Decision,
    ) {
        self.check_held(attributes, estimate, now_ms, &NoHolds, out);
    }

    /// The increments to this node's slots that recording `amounts` at instant `at_ms`
    /// implies: one per applicable limit with a non-zero amount of its metric, in the epoch
    /// of `at_ms`.
    pub fn plan_record(
        &self,
        attributes: &[(&str, &str)],
        amounts: Amounts,
        at_ms: i64,
        out: &mut Vec<Increment>,
    ) {
        let attrs = self.expand(attributes);
        let mut idx = IdxBuf::new();
        self.applicable(&attrs, &mut idx);
        for i in idx.iter() {
            let slot = &self.limits[i as usize];
            let c = slot.live.as_ref().expect("applicable limits are live");
            let delta = amounts.of(c.metric);
            if delta > 0 {
                let (_, epoch, _) = Self::epoch_at(slot, c, at_ms);
                out.push(Increment {
                    limit: i,
                    epoch,
                    delta,
                });
            }
        }
    }

    /// Applies increments to this node's own slots in memory. The caller has made the new
    /// values durable first (I3: only durable values are visible).
    pub fn apply_increments(&mut self, increments: &[Increment]) {
        let me = self.me;
        for inc in increments {
            let counter = self.limits[inc.limit as usize]
                .counters
                .get_mut_or_default(inc.epoch);
            let before = counter.slot(me);
            counter.merge(me, before.saturating_add(inc.delta));
        }
    }

    /// Status of every limit applying to `attributes` without requesting anything.
    pub fn statuses(&self, attributes: &[(&str, &str)], now_ms: i64) -> Vec<LimitStatus> {
        self.check(attributes, Amounts::default(), now_ms).limits
    }

    /// The view of one live limit.
    pub fn limit_view(&self, id: &str, now_ms: i64) -> Option<LimitView<'_>> {
        let idx = self.limit_idx(id)?;
        let slot = &self.limits[idx as usize];
        let c = slot.live.as_ref()?;
        let status = self.status(idx, now_ms, Amounts::default(), &NoHolds);
        let (_, epoch, baseline) = Self::epoch_at(slot, c, now_ms);
        let mut nodes: Vec<(&str, u64)> = slot
            .counters
            .get(epoch)
            .map(|ctr| {
                ctr.slots()
                    .iter()
                    .map(|&(o, v)| (self.origins.name(o), v))
                    .collect()
            })
            .unwrap_or_default();
        nodes.sort_unstable();
        Some(LimitView {
            id: self.limit_ids.name(idx),
            spec: slot.record.as_ref()?.spec.as_ref()?,
            status,
            nodes,
            baseline,
            rights: self.rights_table(idx, epoch),
        })
    }
}

#[cfg(test)]
mod tests;
