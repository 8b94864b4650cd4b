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

/// How long a tombstone is kept before it may be forgotten (DESIGN.md §2).
pub const TOMBSTONE_RETENTION_MS: i64 = 7 * 24 * 3_600_000;

/// What an admin writes for a limit.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LimitInput {
    pub scope: Scope,
    pub metric: Metric,
    /// In micro-USD for `cost`, a count otherwise.
    pub max: u64,
    pub period: Period,
    pub calendar_aligned: bool,
    pub timezone: String,
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
    pub fn same_counting(&self, other: &LimitInput) -> bool {
        self.metric == other.metric
            && self.period == other.period
            && self.calendar_aligned == other.calendar_aligned
            && self.timezone == other.timezone
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
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct EntityRecord {
    pub dimension: String,
    pub value: String,
    pub version: Version,
    pub parents: Option<Scope>,
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
        Ok(())
    }
}
