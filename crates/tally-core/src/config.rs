//! Replicated configuration: limits and entities as last-writer-wins registers versioned by
//! HLC, deletes as tombstones, and the per-limit reset register.

use std::collections::BTreeMap;

use crate::hlc::{Hlc, Version};
use crate::period::Period;
use crate::units::{
    ATTRIBUTES_MAX, COUNT_MAX, MICROS_MAX, Metric, NameError, validate_attribute_value,
    validate_dimension, validate_id,
};

/// A map of dimension → value: a limit's scope, an entity's parents, or a request's
/// attributes. Sorted, so its canonical form is its iteration order.
pub type Scope = BTreeMap<String, String>;

/// Largest encoded config record: its gossip value (base64, plus the MAC tag) must stay
/// within tally-gossip's 4 096-byte value bound, or it could not replicate.
pub const RECORD_BYTES_MAX: usize = 2900;

/// Refuses a record whose encoding would not fit a gossip value.
pub fn check_record_size<T: crate::codec::Record>(
    rec: &T,
    what: &'static str,
) -> Result<(), ConfigError> {
    let bytes = rec.to_bytes().len();
    if bytes > RECORD_BYTES_MAX {
        return Err(ConfigError::RecordTooLarge { what, bytes });
    }
    Ok(())
}

/// How long a tombstone is kept before it may be forgotten (DESIGN.md §2).
pub const TOMBSTONE_RETENTION_MS: i64 = 7 * 24 * 3_600_000;

/// How a limit is enforced (DESIGN.md I6, I7).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize,
)]
pub enum Mode {
    /// Each node enforces on the usage it knows: overshoot is bounded by the spend rate
    /// times the propagation delay, and two sides of a partition may each spend the budget.
    #[default]
    Soft,
    /// An escrow: each node spends only rights it holds (its share of `max`, plus what
    /// others granted it, minus what it granted away), so `Σ used <= max` on every side of
    /// any partition (see [`crate::rights`]).
    Hard,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Soft => "soft",
            Mode::Hard => "hard",
        }
    }

    pub fn parse(s: &str) -> Option<Mode> {
        match s {
            "soft" => Some(Mode::Soft),
            "hard" => Some(Mode::Hard),
            _ => None,
        }
    }
}

/// A node holding a share of a hard limit's rights, in proportion to its weight.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Member {
    pub node: String,
    pub weight: u32,
}

/// Most members of a hard limit (a row of grants must stay a small gossip value).
pub const MEMBERS_MAX: usize = 64;
/// Largest weight of a member.
pub const WEIGHT_MAX: u32 = 1_000_000;

/// What an admin writes for a limit.
///
/// `mode` and `members` are not part of the serde form: records encode them as a
/// trailing extension (`codec::Record`), so a soft limit has exactly the bytes it
/// had before hard mode existed and nodes of either version read each other's.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LimitInput {
    pub scope: Scope,
    pub metric: Metric,
    /// In micro-USD for `cost`, a count otherwise.
    pub max: u64,
    pub period: Period,
    pub calendar_aligned: bool,
    pub timezone: String,
    #[serde(skip)]
    pub mode: Mode,
    /// Hard limits: who holds rights, sorted by node id (frozen into the generation).
    #[serde(skip)]
    pub members: Vec<Member>,
}

impl LimitInput {
    /// A soft limit (no members).
    pub fn soft(
        scope: Scope,
        metric: Metric,
        max: u64,
        period: Period,
        calendar_aligned: bool,
        timezone: impl Into<String>,
    ) -> LimitInput {
        LimitInput {
            scope,
            metric,
            max,
            period,
            calendar_aligned,
            timezone: timezone.into(),
            mode: Mode::Soft,
            members: Vec::new(),
        }
    }
}

/// A limit as replicated: the input plus when its counting started.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LimitSpec {
    pub input: LimitInput,
    /// Origin of rolling periods: when this spec's counting began.
    pub anchor_ms: i64,
    /// Changes whenever the counting changes meaning (metric, period, alignment, zone, or
    /// re-creation): epochs of another generation never share counters with this one.
    pub spec_gen: Hlc,
}

impl LimitInput {
    /// Whether replacing `self` with `other` changes what the counters mean (a reset).
    /// A change of mode or members is one too: a hard limit's allocation is a function of
    /// its members, frozen into the generation so every node computes the same shares.
    pub fn same_counting(&self, other: &LimitInput) -> bool {
        self.metric == other.metric
            && self.period == other.period
            && self.calendar_aligned == other.calendar_aligned
            && self.timezone == other.timezone
            && self.mode == other.mode
            && self.members == other.members
    }
}

/// A limit record: a live spec or a tombstone.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LimitRecord {
    pub id: String,
    pub version: Version,
    pub spec: Option<LimitSpec>,
}

impl LimitRecord {
    /// The generation a record competes in: its spec's generation, or for a tombstone the
    /// instant of the delete (deleting, like re-creating, ends a generation).
    pub fn generation(&self) -> Hlc {
        self.spec.as_ref().map_or(self.version.hlc, |s| s.spec_gen)
    }

    /// Last-writer-wins order of limit records: generation first, then version. A change
    /// of what a limit counts (metric, period, alignment, zone: a reset, DESIGN.md §2)
    /// therefore wins over a concurrent edit that kept the older counting, so a reset is
    /// never undone by a concurrent write and a limit's epochs only move forward (I5).
    /// Sequential edits are unaffected: an edit either keeps the generation or starts a
    /// newer one, so the newest edit always has the greatest (generation, version).
    pub fn supersedes(&self, other: &LimitRecord) -> bool {
        (self.generation(), &self.version) > (other.generation(), &other.version)
    }
}

/// An entity record: its parents, or a tombstone.
///
/// `rules` is not part of the serde form: records carry it as a trailing extension
/// (`codec::Record`) only when it is not the default, so an entity without rules has
/// exactly the bytes it had before rules existed.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct EntityRecord {
    pub dimension: String,
    pub value: String,
    pub version: Version,
    pub parents: Option<Scope>,
    #[serde(skip)]
    pub rules: AccessRules,
}

/// Most values one `allow` rule may list.
pub const ALLOW_VALUES_MAX: usize = 64;

/// Access rules of an entity (a virtual key, a team, ...): every request whose attributes
/// reach the entity (directly or through parents) must satisfy them, or its check is
/// denied (usage is still recorded: it is a fact).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AccessRules {
    /// `false`: every check reaching the entity is denied.
    pub active: bool,
    /// From this instant (ms since the epoch) on, every check reaching it is denied.
    pub expires_at_ms: Option<i64>,
    /// Per attribute name, the values a request may have (sorted, distinct); a request
    /// without the attribute is denied too.
    pub allow: BTreeMap<String, Vec<String>>,
}

impl Default for AccessRules {
    fn default() -> AccessRules {
        AccessRules {
            active: true,
            expires_at_ms: None,
            allow: BTreeMap::new(),
        }
    }
}

impl AccessRules {
    pub fn is_default(&self) -> bool {
        *self == AccessRules::default()
    }

    /// Sorts and dedups the allowed values, then checks names, values and sizes.
    pub fn normalize(mut self) -> Result<AccessRules, ConfigError> {
        if self.allow.len() > ATTRIBUTES_MAX {
            return Err(ConfigError::TooMany {
                what: "allow",
                count: self.allow.len(),
                max: ATTRIBUTES_MAX,
            });
        }
        for (name, values) in &mut self.allow {
            validate_dimension(name)?;
            values.sort_unstable();
            values.dedup();
            if values.is_empty() || values.len() > ALLOW_VALUES_MAX {
                return Err(ConfigError::Rules(format!(
                    "allow.{name} must list 1 to {ALLOW_VALUES_MAX} values"
                )));
            }
            for v in values.iter() {
                validate_attribute_value(v)?;
            }
        }
        Ok(self)
    }

    /// The first rule a request breaks: `attr` looks up the value of an attribute of the
    /// (expanded) request.
    pub fn broken<'a>(
        &self,
        now_ms: i64,
        attr: impl Fn(&str) -> Option<&'a str>,
    ) -> Option<BrokenRule> {
        if !self.active {
            return Some(BrokenRule::Inactive);
        }
        if let Some(at) = self.expires_at_ms.filter(|&at| now_ms >= at) {
            return Some(BrokenRule::Expired { expires_at_ms: at });
        }
        for (name, values) in &self.allow {
            let given = attr(name);
            if given.is_none_or(|g| values.binary_search_by(|v| v.as_str().cmp(g)).is_err()) {
                return Some(BrokenRule::Allow {
                    attribute: name.clone(),
                    given: given.map(str::to_string),
                });
            }
        }
        None
    }
}

/// Which access rule a request broke.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BrokenRule {
    Inactive,
    Expired {
        expires_at_ms: i64,
    },
    Allow {
        attribute: String,
        given: Option<String>,
    },
}

impl BrokenRule {
    pub fn as_str(&self) -> &'static str {
        match self {
            BrokenRule::Inactive => "inactive",
            BrokenRule::Expired { .. } => "expired",
            BrokenRule::Allow { .. } => "allow",
        }
    }
}

/// A check denied by an access rule of the entity `dimension/value`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessDenial {
    pub dimension: String,
    pub value: String,
    pub rule: BrokenRule,
}

/// The reset register of a limit: the winner opens epoch `(period, reset.hlc)` with
/// `baseline` already used, if that is later than the limit's generation (a spec change
/// after the reset is itself a reset). Ordered by (spec_gen, period, reset) so a reset in
/// a later period, or under a newer spec, wins everywhere (DESIGN.md §2).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ResetRegister {
    pub spec_gen: Hlc,
    pub period: i64,
    pub reset: Version,
    pub baseline: u64,
}

impl ResetRegister {
    pub fn supersedes(&self, other: &ResetRegister) -> bool {
        (self.spec_gen, self.period, &self.reset) > (other.spec_gen, other.period, &other.reset)
    }
}

/// Why a config write was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    #[error(transparent)]
    Name(#[from] NameError),
    #[error("{what} has {count} entries; at most {max} are allowed")]
    TooMany {
        what: &'static str,
        count: usize,
        max: usize,
    },
    #[error("max must be at most {max} for metric {metric}")]
    MaxTooLarge { metric: &'static str, max: u64 },
    #[error(transparent)]
    Period(#[from] crate::period::PeriodError),
    #[error("entity {dimension}/{value} cannot have parents that lead back to itself ({path})")]
    Cycle {
        dimension: String,
        value: String,
        path: String,
    },
    #[error("an entity cannot name its own dimension {0:?} as a parent")]
    SelfDimension(String),
    #[error("{0}")]
    Members(String),
    #[error("{0}")]
    Rules(String),
    #[error(
        "this {what} encodes to {bytes} bytes; at most 2900 fit a gossip value (use fewer or shorter names)"
    )]
    RecordTooLarge { what: &'static str, bytes: usize },
}

/// Checks every name and value of a scope-like map.
pub fn validate_scope(scope: &Scope, what: &'static str) -> Result<(), ConfigError> {
    if scope.len() > ATTRIBUTES_MAX {
        return Err(ConfigError::TooMany {
            what,
            count: scope.len(),
            max: ATTRIBUTES_MAX,
        });
    }
    for (k, v) in scope {
        validate_dimension(k)?;
        validate_attribute_value(v)?;
    }
    Ok(())
}

impl LimitInput {
    /// Checks everything about a limit that does not depend on other state.
    pub fn validate(&self, id: &str) -> Result<(), ConfigError> {
        validate_id(id, "limit id")?;
        validate_scope(&self.scope, "scope")?;
        let max = if self.metric == Metric::Cost {
            MICROS_MAX
        } else {
            COUNT_MAX
        };
        if self.max > max {
            return Err(ConfigError::MaxTooLarge {
                metric: self.metric.as_str(),
                max,
            });
        }
        crate::period::PeriodSpec::new(self.period, self.calendar_aligned, &self.timezone, 0)?;
        self.validate_members()
    }

    fn validate_members(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Members(m));
        match self.mode {
            Mode::Soft if !self.members.is_empty() => {
                bad("members apply to hard limits only; add \"mode\": \"hard\"".into())
            }
            Mode::Soft => Ok(()),
            Mode::Hard => {
                if self.members.is_empty() {
                    return bad("a hard limit needs at least one member".into());
                }
                if self.members.len() > MEMBERS_MAX {
                    return bad(format!(
                        "members has {} entries; at most {MEMBERS_MAX} are allowed",
                        self.members.len()
                    ));
                }
                for m in &self.members {
                    validate_id(&m.node, "member node id")?;
                    if m.weight == 0 || m.weight > WEIGHT_MAX {
                        return bad(format!(
                            "member {}: weight must be between 1 and {WEIGHT_MAX}",
                            m.node
                        ));
                    }
                }
                if !self.members.windows(2).all(|w| w[0].node < w[1].node) {
                    return bad("members must be distinct node ids, sorted".into());
                }
                Ok(())
            }
        }
    }
}

/// An operator's statement that a node is gone for good (a partition looks like a crash,
/// so only an operator may say this): its unspent rights of hard limits pass to
/// `successor`, nobody grants to it any more, and it may not serve again under that id.
/// Last writer wins; a decommission is never undone.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DecommissionRecord {
    pub node: String,
    pub successor: String,
    pub version: Version,
}
