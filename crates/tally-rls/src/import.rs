//! envoyproxy/ratelimit's YAML config → tally limits (`tally import envoy-ratelimit`).
//!
//! [`parse`] reads one config file (`domain`, nested `descriptors`); [`plan`] turns it
//! into the rules of [`crate::rules`], one limit per leaf with a `rate_limit`, and says
//! per descriptor what tally does with each field. Nothing here writes: the caller
//! validates the whole plan first (all or nothing) and then applies it.
//!
//! Field by field:
//! - `key`, `value` (or no `value`: every value, each counted apart), nested
//!   `descriptors`: the rule's path; a leaf is matched only by a descriptor of exactly
//!   its depth, as in ratelimit.
//! - `rate_limit{unit, requests_per_unit}`: a `requests` limit of that max over one
//!   calendar-aligned UTC unit. `SECOND`..`DAY` are ratelimit's windows exactly; `WEEK`
//!   starts on Monday (ratelimit: 7-day blocks from 1970-01-01, a Thursday); `MONTH` and
//!   `YEAR` are calendar months and years (ratelimit: 30 and 365 days).
//! - `rate_limit.name`, `replaces`: honoured by the service (a replaced rule is skipped
//!   when its replacer applies in the same request).
//! - `unlimited`, `shadow_mode`: honoured (see [`crate::rules::Flags`]).
//! - `share_threshold`: only valid with `*` values (as in ratelimit), which are skipped.
//! - `detailed_metric`, `value_to_metric`, `metadata`, `quota_mode`: not expressible;
//!   reported as ignored (`quota_mode` rules then limit like ordinary rules).
//! - Values with `*` (ratelimit's prefix and infix wildcards): not expressible; the
//!   descriptor is skipped and reported, the rest of the file is imported.

use serde::Deserialize;
use serde::de::IgnoredAny;
use tally_core::units::COUNT_MAX;
use tally_core::{LimitInput, Metric, Period};

use crate::rules::{self, Flags, RlsUnit, RuleMeta};

/// Largest config accepted (bytes), and most rules in one.
pub const CONFIG_BYTES_MAX: usize = 1 << 20;
pub const RULES_MAX: usize = 10_000;
/// Deepest nesting of descriptors (ratelimit has no bound; tally's search is 2^depth).
pub const DEPTH_MAX: usize = rules::ENTRIES_MAX;

/// Why a config was refused as a whole.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ImportError {
    #[error("the config is not valid ratelimit YAML: {0}")]
    Syntax(String),
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
    #[error("the config is larger than {CONFIG_BYTES_MAX} bytes")]
    TooLarge,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RatelimitConfig {
    #[serde(default)]
    pub domain: String,
    #[serde(default)]
    pub descriptors: Vec<YamlDescriptor>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct YamlDescriptor {
    #[serde(default)]
    pub key: String,
    #[serde(default)]
    pub value: Option<String>,
    #[serde(default)]
    pub rate_limit: Option<YamlRateLimit>,
    #[serde(default)]
    pub descriptors: Vec<YamlDescriptor>,
    #[serde(default)]
    pub shadow_mode: bool,
    #[serde(default)]
    pub quota_mode: bool,
    #[serde(default)]
    pub detailed_metric: bool,
    #[serde(default)]
    pub value_to_metric: bool,
    #[serde(default)]
    pub share_threshold: bool,
    #[serde(default)]
    pub metadata: Option<IgnoredAny>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct YamlRateLimit {
    #[serde(default)]
    pub requests_per_unit: u64,
    #[serde(default)]
    pub unit: Option<String>,
    #[serde(default)]
    pub unlimited: bool,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub replaces: Vec<YamlReplaces>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct YamlReplaces {
    #[serde(default)]
    pub name: String,
}

/// Reads a config from YAML (JSON is YAML too).
pub fn parse(text: &str) -> Result<RatelimitConfig, ImportError> {
    if text.len() > CONFIG_BYTES_MAX {
        return Err(ImportError::TooLarge);
    }
    serde_norway::from_str(text).map_err(|e| ImportError::Syntax(e.to_string()))
}

/// One rule the config defines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedRule {
    /// The limit id ([`rules::rule_id`]).
    pub id: String,
    /// The descriptor path ([`rules::encode_path`]).
    pub descriptor: String,
    pub input: LimitInput,
    pub meta: RuleMeta,
    /// What tally does differently from ratelimit for this rule, or ignores.
    pub notes: Vec<String>,
}

/// A descriptor of the config that becomes no limit, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    pub descriptor: String,
    pub reason: String,
}

/// Everything a config becomes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub domain: String,
    pub rules: Vec<PlannedRule>,
    pub skipped: Vec<Skipped>,
}

fn invalid(path: &str, message: impl Into<String>) -> ImportError {
    ImportError::Invalid {
        path: if path.is_empty() {
            "<root>".into()
        } else {
            path.into()
        },
        message: message.into(),
    }
}

/// Validates a whole config and plans its rules; any invalid field refuses it all.
pub fn plan(config: &RatelimitConfig) -> Result<Plan, ImportError> {
    if config.domain.is_empty() {
        return Err(invalid("", "config file cannot have empty domain"));
    }
    tally_core::units::validate_attribute_value(&config.domain).map_err(|_| {
        invalid(
            "",
            "domain must be 1 to 128 bytes of printable text (a tally attribute value)",
        )
    })?;
    let mut plan = Plan {
        domain: config.domain.clone(),
        rules: Vec::new(),
        skipped: Vec::new(),
    };
    walk(
        &config.domain,
        &config.descriptors,
        &mut Vec::new(),
        &mut plan,
    )?;
    if plan.rules.len() > RULES_MAX {
        return Err(invalid(
            "",
            format!("more than {RULES_MAX} rules in one config; split it"),
        ));
    }
    Ok(plan)
}

fn walk(
    domain: &str,
    descriptors: &[YamlDescriptor],
    path: &mut Vec<rules::PathEntry>,
    plan: &mut Plan,
) -> Result<(), ImportError> {
    let here = |p: &[rules::PathEntry]| {
        rules::encode_path(p.iter().map(|(k, v)| (k.as_str(), v.as_deref())))
    };
    let mut seen = std::collections::BTreeSet::new();
    for d in descriptors {
        if d.key.is_empty() {
            return Err(invalid(&here(path), "descriptor has empty key"));
        }
        // ratelimit treats an empty value as no value.
        let value = d.value.clone().filter(|v| !v.is_empty());
        path.push((d.key.clone(), value.clone()));
        let at = here(path);
        if path.len() > DEPTH_MAX {
            return Err(invalid(
                &at,
                format!("descriptors nest deeper than {DEPTH_MAX}"),
            ));
        }
        if !seen.insert((d.key.clone(), value.clone())) {
            return Err(invalid(&at, "duplicate descriptor composite key"));
        }
        let pattern = value.as_deref().is_some_and(|v| v.contains('*'));
        if let Some(rl) = &d.rate_limit {
            let rule = rule(domain, d, rl, path, &at)?;
            if pattern {
                plan.skipped.push(Skipped {
                    descriptor: at.clone(),
                    reason: "values with '*' (ratelimit's prefix/infix wildcards) are not expressible in tally; no limit was created for this descriptor".into(),
                });
            } else {
                plan.rules.push(rule);
            }
        }
        if d.share_threshold && !pattern {
            return Err(invalid(
                &at,
                "share_threshold can only be used with wildcard values (containing '*')",
            ));
        }
        if pattern && !d.descriptors.is_empty() {
            plan.skipped.push(Skipped {
                descriptor: format!("{at}/..."),
                reason: "nested under a '*' value, which tally cannot express".into(),
            });
        } else {
            walk(domain, &d.descriptors, path, plan)?;
        }
        path.pop();
    }
    Ok(())
}

fn rule(
    domain: &str,
    d: &YamlDescriptor,
    rl: &YamlRateLimit,
    path: &[rules::PathEntry],
    at: &str,
) -> Result<PlannedRule, ImportError> {
    let unit = match rl.unit.as_deref() {
        Some(u) => Some(
            RlsUnit::parse(u)
                .ok_or_else(|| invalid(at, format!("invalid rate limit unit '{u}'")))?,
        ),
        None => None,
    };
    if rl.unlimited && unit.is_some() {
        return Err(invalid(
            at,
            "should not specify rate limit unit when unlimited",
        ));
    }
    if !rl.unlimited && unit.is_none() {
        return Err(invalid(at, "invalid rate limit unit ''"));
    }
    if rl.requests_per_unit > u64::from(u32::MAX) {
        return Err(invalid(at, "requests_per_unit must fit in 32 bits"));
    }
    let mut replaces = Vec::new();
    for r in &rl.replaces {
        if r.name.is_empty() {
            return Err(invalid(at, "should not have an empty replaces entry"));
        }
        if rl.name.as_deref() == Some(r.name.as_str()) {
            return Err(invalid(
                at,
                "replaces should not contain name of same descriptor",
            ));
        }
        if r.name.contains(',') {
            return Err(invalid(at, "a replaced name must not contain ','"));
        }
        replaces.push(r.name.clone());
    }
    let wildcard = path.iter().any(|(_, v)| v.is_none());
    let meta = RuleMeta {
        domain: domain.to_string(),
        descriptor: at.to_string(),
        name: rl.name.clone().filter(|n| !n.is_empty()),
        replaces,
        flags: Flags {
            shadow: d.shadow_mode,
            unlimited: rl.unlimited,
        },
    };
    let scope = meta.to_scope().map_err(|m| invalid(at, m))?;
    let (max, period) = match unit.and_then(RlsUnit::period) {
        Some(p) => (rl.requests_per_unit, p),
        None => (COUNT_MAX, Period::Never),
    };
    let mut notes = Vec::new();
    match unit {
        Some(RlsUnit::Week) => notes.push(
            "WEEK: tally's week starts on Monday 00:00 UTC (ratelimit: 7-day blocks from 1970-01-01, a Thursday)".to_string(),
        ),
        Some(RlsUnit::Month) => notes.push(
            "MONTH: tally counts calendar months in UTC (ratelimit: 30-day blocks)".to_string(),
        ),
        Some(RlsUnit::Year) => notes.push(
            "YEAR: tally counts calendar years in UTC (ratelimit: 365-day blocks)".to_string(),
        ),
        _ => {}
    }
    if wildcard {
        notes.push(
            "wildcard: each value is counted in its own limit (rlsv.*), created on first use"
                .to_string(),
        );
    }
    for (on, what) in [
        (
            d.detailed_metric,
            "detailed_metric ignored: tally reports usage per limit (and per wildcard value, as its own limit)",
        ),
        (
            d.value_to_metric,
            "value_to_metric ignored: tally has no per-value stats names",
        ),
        (
            d.metadata.is_some(),
            "metadata ignored: tally does not send dynamic metadata",
        ),
        (
            d.quota_mode,
            "quota_mode ignored: this rule limits like an ordinary rate limit",
        ),
    ] {
        if on {
            notes.push(what.to_string());
        }
    }
    let input = LimitInput {
        scope,
        metric: Metric::Requests,
        max,
        period,
        calendar_aligned: true,
        timezone: "UTC".into(),
        mode: Default::default(),
        members: Vec::new(),
    };
    let id = rules::rule_id(domain, at);
    input
        .validate(&id)
        .map_err(|e| invalid(at, e.to_string()))?;
    Ok(PlannedRule {
        id,
        descriptor: at.to_string(),
        input,
        meta,
        notes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn planned(yaml: &str) -> Plan {
        plan(&parse(yaml).unwrap()).unwrap()
    }

    fn refused(yaml: &str) -> String {
        match parse(yaml) {
            Ok(c) => plan(&c).unwrap_err().to_string(),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn nested_wildcards_and_flags() {
        let p = planned(
            r#"
domain: edge
descriptors:
  - key: remote_address
    rate_limit: {unit: minute, requests_per_unit: 20, name: per-ip}
  - key: generic_key
    value: foo
    descriptors:
      - key: user
        rate_limit: {unit: hour, requests_per_unit: 10}
        shadow_mode: true
      - key: user
        value: admin
        rate_limit: {unlimited: true}
  - key: path
    value: "/api/*"
    rate_limit: {unit: second, requests_per_unit: 5}
  - key: tenant
    detailed_metric: true
    rate_limit: {unit: month, requests_per_unit: 1000, replaces: [{name: per-ip}]}
"#,
        );
        assert_eq!(p.domain, "edge");
        let d: Vec<&str> = p.rules.iter().map(|r| r.descriptor.as_str()).collect();
        assert_eq!(
            d,
            [
                "remote_address",
                "generic_key=foo/user",
                "generic_key=foo/user=admin",
                "tenant"
            ]
        );
        let r = &p.rules[0];
        assert_eq!(r.id, rules::rule_id("edge", "remote_address"));
        assert_eq!(r.input.max, 20);
        assert_eq!(r.input.period, "1m".parse().unwrap());
        assert!(r.input.calendar_aligned);
        assert_eq!(r.input.metric, Metric::Requests);
        assert_eq!(r.meta.name.as_deref(), Some("per-ip"));
        assert_eq!(r.input.scope.get(rules::DOMAIN).unwrap(), "edge");
        assert!(r.notes[0].starts_with("wildcard"), "{:?}", r.notes);
        assert!(p.rules[1].meta.flags.shadow);
        assert!(p.rules[2].meta.flags.unlimited);
        assert_eq!(p.rules[2].input.period, Period::Never);
        let t = &p.rules[3];
        assert_eq!(t.meta.replaces, ["per-ip"]);
        assert!(t.notes.iter().any(|n| n.starts_with("MONTH")));
        assert!(t.notes.iter().any(|n| n.starts_with("detailed_metric")));
        assert_eq!(p.skipped.len(), 1);
        assert_eq!(p.skipped[0].descriptor, "path=%2Fapi%2F%2A");
    }

    /// ratelimit's own refusals (test/config/*.yaml of envoyproxy/ratelimit), ported.
    #[test]
    fn invalid_configs_are_refused_whole() {
        for (yaml, says) in [
            ("descriptors: []", "empty domain"),
            ("domain: d\ndescriptors: [{value: v}]", "empty key"),
            (
                "domain: d\ndescriptors: [{key: k, rate_limit: {unit: fortnight, requests_per_unit: 1}}]",
                "invalid rate limit unit 'fortnight'",
            ),
            (
                "domain: d\ndescriptors: [{key: k, rate_limit: {unit: second, unlimited: true}}]",
                "should not specify rate limit unit when unlimited",
            ),
            (
                "domain: d\ndescriptors: [{key: k, value: v}, {key: k, value: v}]",
                "duplicate descriptor composite key",
            ),
            (
                "domain: d\ndescriptors: [{key: k, rate_limit: {unit: second, requests_per_unit: 1, name: a, replaces: [{name: a}]}}]",
                "same descriptor",
            ),
            (
                "domain: d\ndescriptors: [{key: k, rate_limit: {unit: second, requests_per_unit: 1, replaces: [{}]}}]",
                "empty replaces",
            ),
            (
                "domain: d\ndescriptors: [{key: k, ratelimit: {}}]",
                "unknown field",
            ),
            (
                "domain: d\ndescriptors: [{key: k, rate_limit: {requests_per_unit: 1}}]",
                "unit ''",
            ),
            (
                "domain: d\ndescriptors: [{key: k, value: v, share_threshold: true}]",
                "share_threshold can only be used with wildcard values",
            ),
            ("domain: [x]", "not valid ratelimit YAML"),
        ] {
            let e = refused(yaml);
            assert!(e.contains(says), "{yaml}: {e}");
        }
    }

    #[test]
    fn json_is_accepted() {
        let p = planned(
            r#"{"domain":"d","descriptors":[{"key":"k","value":"v","rate_limit":{"unit":"SECOND","requests_per_unit":50}}]}"#,
        );
        assert_eq!(p.rules.len(), 1);
        assert_eq!(p.rules[0].descriptor, "k=v");
        assert_eq!(p.rules[0].input.max, 50);
    }
}

/// What applying a plan did (or, in a dry run, would do) to each rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Created,
    Updated,
    Unchanged,
    Deleted,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Created => "created",
            Action::Updated => "updated",
            Action::Unchanged => "unchanged",
            Action::Deleted => "deleted",
        }
    }
}

/// The outcome of [`apply`]: an action per rule id (planned rules in plan order, then
/// deleted ones), and how many wildcard instances of deleted rules went with them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    pub actions: Vec<(String, String, Action)>,
    pub instances_deleted: usize,
}

/// Makes the node's rules of `plan.domain` exactly the plan's: creates and updates its
/// rules, deletes the domain's rules the config no longer has (and their wildcard
/// instances). Idempotent: applying the same plan again changes nothing. Each limit is
/// its own durable write; a failure part way leaves the rules written so far, and
/// applying again finishes the job. With `dry_run`, only says what it would do.
pub async fn apply(
    node: &tally_node::Node,
    plan: &Plan,
    dry_run: bool,
) -> Result<Applied, tally_node::NodeError> {
    let filter: tally_core::Scope = [(rules::DOMAIN.to_string(), plan.domain.clone())].into();
    let existing = node.limits(&filter);
    let mut actions = Vec::new();
    for r in &plan.rules {
        let held = existing.iter().find(|l| l.report.id == r.id);
        let action = match held {
            None => Action::Created,
            Some(l) if l.input == r.input => Action::Unchanged,
            Some(_) => Action::Updated,
        };
        if !dry_run && action != Action::Unchanged {
            node.put_limit(&r.id, r.input.clone()).await?;
        }
        actions.push((r.id.clone(), r.descriptor.clone(), action));
    }
    let mut instances_deleted = 0;
    for l in &existing {
        let Some(meta) = RuleMeta::from_scope(&l.input.scope) else {
            continue;
        };
        if plan.rules.iter().any(|r| r.id == l.report.id) {
            continue;
        }
        let instances: tally_core::Scope =
            [(rules::TEMPLATE.to_string(), l.report.id.clone())].into();
        for i in node.limits(&instances) {
            if !dry_run {
                node.delete_limit(&i.report.id).await?;
            }
            instances_deleted += 1;
        }
        if !dry_run {
            node.delete_limit(&l.report.id).await?;
        }
        actions.push((l.report.id.clone(), meta.descriptor, Action::Deleted));
    }
    Ok(Applied {
        actions,
        instances_deleted,
    })
}
