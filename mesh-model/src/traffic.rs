//! Cluster labels and `TrafficPolicy` (`fleetmesh.io/v1alpha1`): the share of a global service's new
//! connections that each group of clusters receives.
//!
//! ```yaml
//! apiVersion: fleetmesh.io/v1alpha1
//! kind: TrafficPolicy
//! metadata: {name: api, namespace: shop}
//! spec:
//!   service: api                                  # a global Service in this namespace
//!   weights:
//!     - clusters: {matchLabels: {stage: canary}}  # a label selector over cluster labels, or
//!       weight: 10
//!     - clusters: {names: [west]}                 # explicit cluster names
//!       weight: 90
//! ```
//!
//! A cluster belongs to the first group whose selector matches it; clusters of no group get no new connections.
//! Groups without a ready backend are left out and the others share their weight. Inside a group, backends share
//! by capacity (pod annotation [`ANNOTATION_CAPACITY`], default 1). A policy steers the clients of the cluster
//! it is written in.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::cluster::validate_cluster_name;

/// apiVersion of fleetmesh's own objects.
pub const API_VERSION: &str = "fleetmesh.io/v1alpha1";
/// Pod annotation: the backend's capacity relative to its peers (1-1000, default 1).
pub const ANNOTATION_CAPACITY: &str = "fleetmesh.io/capacity";
/// Largest capacity a backend may announce.
pub const MAX_CAPACITY: u32 = 1000;
/// Largest weight of a group.
pub const MAX_WEIGHT: u32 = 1_000_000;

/// Selects clusters by their labels or by name (one of the two).
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClusterSelector {
    /// Every label must be present with this value.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub match_labels: BTreeMap<String, String>,
    /// Every expression must hold (Kubernetes label selector semantics).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub match_expressions: Vec<LabelRequirement>,
    /// Cluster names.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub names: Vec<String>,
}

/// One `matchExpressions` entry.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LabelRequirement {
    pub key: String,
    pub operator: LabelOperator,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
}

impl LabelRequirement {
    /// Whether `labels` satisfy this requirement (Kubernetes label selector semantics).
    #[must_use]
    pub fn holds(&self, labels: &BTreeMap<String, String>) -> bool {
        let value = labels.get(&self.key);
        match self.operator {
            LabelOperator::In => value.is_some_and(|v| self.values.contains(v)),
            LabelOperator::NotIn => value.is_none_or(|v| !self.values.contains(v)),
            LabelOperator::Exists => value.is_some(),
            LabelOperator::DoesNotExist => value.is_none(),
        }
    }
}

/// Operators of a label requirement.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LabelOperator {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

/// One group of clusters and its weight.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WeightGroup {
    pub clusters: ClusterSelector,
    pub weight: u32,
}

/// The spec of a `TrafficPolicy`.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TrafficPolicySpec {
    /// A Service in the policy's namespace.
    pub service: String,
    pub weights: Vec<WeightGroup>,
}

/// A validated `TrafficPolicy`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TrafficPolicy {
    pub namespace: String,
    pub name: String,
    pub spec: TrafficPolicySpec,
}

/// Checks a label key (`[prefix/]name`, Kubernetes rules).
pub(crate) fn valid_label_key(key: &str) -> bool {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    prefix.is_none_or(|p| {
        !p.is_empty()
            && p.len() <= 253
            && p.split('.').all(|l| {
                !l.is_empty()
                    && l.len() <= 63
                    && l.chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                    && !l.starts_with('-')
                    && !l.ends_with('-')
            })
    }) && !name.is_empty()
        && valid_label_value(name)
}

/// Checks a label value (empty, or at most 63 alphanumerics, '-', '_', '.', alphanumeric at both ends).
pub(crate) fn valid_label_value(v: &str) -> bool {
    v.is_empty()
        || (v.len() <= 63
            && v.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            && v.starts_with(|c: char| c.is_ascii_alphanumeric())
            && v.ends_with(|c: char| c.is_ascii_alphanumeric()))
}

/// Validates cluster labels (as given to the daemons or in `lab.yaml`).
///
/// # Errors
/// The first key or value that breaks the Kubernetes label rules.
pub fn validate_labels(labels: &BTreeMap<String, String>) -> Result<(), String> {
    for (k, v) in labels {
        if !valid_label_key(k) {
            return Err(format!(
                "label key {k:?} is not a valid label key ([prefix/]name)"
            ));
        }
        if !valid_label_value(v) {
            return Err(format!(
                "label {k}: value {v:?} is not a valid label value (at most 63 of [A-Za-z0-9-_.], alphanumeric at \
                 both ends)"
            ));
        }
    }
    Ok(())
}

/// Parses `KEY=VALUE` (a cluster label given on a command line).
///
/// # Errors
/// Without `=`, or with an invalid key or value.
pub fn parse_label(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: a label is KEY=VALUE"))?;
    let one: BTreeMap<String, String> = [(k.to_owned(), v.to_owned())].into();
    validate_labels(&one)?;
    Ok((k.to_owned(), v.to_owned()))
}

impl ClusterSelector {
    /// Checks the selector; the message names the offending part (relative to the selector).
    ///
    /// # Errors
    /// Names and labels mixed, invalid names, keys or values, operators with the wrong number of values.
    pub fn validate(&self) -> Result<(), (String, String)> {
        let has_labels = !self.match_labels.is_empty() || !self.match_expressions.is_empty();
        if has_labels && !self.names.is_empty() {
            return Err((
                String::new(),
                "select clusters either by names or by labels (matchLabels/matchExpressions), not both"
                    .into(),
            ));
        }
        for (i, n) in self.names.iter().enumerate() {
            validate_cluster_name(n).map_err(|e| (format!("names[{i}]"), e.to_string()))?;
        }
        validate_labels(&self.match_labels).map_err(|e| ("matchLabels".to_owned(), e))?;
        for (i, r) in self.match_expressions.iter().enumerate() {
            let at = format!("matchExpressions[{i}]");
            if !valid_label_key(&r.key) {
                return Err((
                    format!("{at}.key"),
                    format!("{:?} is not a valid label key", r.key),
                ));
            }
            match r.operator {
                LabelOperator::In | LabelOperator::NotIn if r.values.is_empty() => {
                    return Err((format!("{at}.values"), format!("{:?} needs values", r.operator)));
                }
                LabelOperator::Exists | LabelOperator::DoesNotExist if !r.values.is_empty() => {
                    return Err((
                        format!("{at}.values"),
                        format!("{:?} takes no values", r.operator),
                    ));
                }
                _ => {}
            }
            if let Some(v) = r.values.iter().find(|v| !valid_label_value(v)) {
                return Err((
                    format!("{at}.values"),
                    format!("{v:?} is not a valid label value"),
                ));
            }
        }
        Ok(())
    }

    /// Whether the cluster `name` with `labels` is selected. An empty selector selects every cluster.
    #[must_use]
    pub fn matches(&self, name: &str, labels: &BTreeMap<String, String>) -> bool {
        if !self.names.is_empty() {
            return self.names.iter().any(|n| n == name);
        }
        self.match_labels.iter().all(|(k, v)| labels.get(k) == Some(v))
            && self.match_expressions.iter().all(|r| r.holds(labels))
    }
}

impl TrafficPolicySpec {
    /// Checks the spec; errors name the field (`spec.…`).
    ///
    /// # Errors
    /// No service, no weights, weights out of range or summing to 0, invalid selectors.
    pub fn validate(&self) -> Result<(), (String, String)> {
        if self.service.is_empty() {
            return Err(("spec.service".into(), "missing service name".into()));
        }
        if self.weights.is_empty() {
            return Err(("spec.weights".into(), "at least one group is needed".into()));
        }
        for (i, g) in self.weights.iter().enumerate() {
            if g.weight > MAX_WEIGHT {
                return Err((
                    format!("spec.weights[{i}].weight"),
                    format!("{} is above the largest weight {MAX_WEIGHT}", g.weight),
                ));
            }
            g.clusters.validate().map_err(|(field, m)| {
                let base = format!("spec.weights[{i}].clusters");
                (
                    if field.is_empty() {
                        base
                    } else {
                        format!("{base}.{field}")
                    },
                    m,
                )
            })?;
        }
        if self.weights.iter().all(|g| g.weight == 0) {
            return Err((
                "spec.weights".into(),
                "the weights sum to 0: no cluster would get traffic".into(),
            ));
        }
        Ok(())
    }

    /// The group index of a cluster: the first group that selects it.
    #[must_use]
    pub fn group_of(&self, cluster: &str, labels: &BTreeMap<String, String>) -> Option<usize> {
        self.weights
            .iter()
            .position(|g| g.clusters.matches(cluster, labels))
    }
}

/// The gate of a rollout step.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Gate {
    /// Largest tolerated share of failed connections to the `to` clusters' backends (resets from a backend over
    /// new connections to those backends), 0 to 1.
    pub max_failure_ratio: f64,
}

impl Eq for Gate {}

/// The spec of a `StagedRollout`: move a global service's new connections from the `from` clusters to the `to`
/// clusters in steps, holding each step while the gate holds.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StagedRolloutSpec {
    /// A Service in the rollout's namespace.
    pub service: String,
    /// Clusters that carry the traffic now.
    pub from: ClusterSelector,
    /// Clusters that should carry it at the end (a cluster selected by both counts as `to`).
    pub to: ClusterSelector,
    /// Percent of new connections sent to `to` at each step: 1-100, increasing.
    pub steps: Vec<u32>,
    /// Observation time per step, 1-86400.
    pub hold_seconds: u32,
    pub gate: Gate,
}

/// A validated `StagedRollout`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StagedRollout {
    pub namespace: String,
    pub name: String,
    pub spec: StagedRolloutSpec,
}

impl StagedRolloutSpec {
    /// Checks the spec; errors name the field (`spec.…`).
    ///
    /// # Errors
    /// No service, bad selectors, steps empty / out of 1-100 / not increasing, hold out of range, gate outside 0-1.
    pub fn validate(&self) -> Result<(), (String, String)> {
        if self.service.is_empty() {
            return Err(("spec.service".into(), "missing service name".into()));
        }
        for (field, sel) in [("spec.from", &self.from), ("spec.to", &self.to)] {
            sel.validate().map_err(|(f, m)| {
                (
                    if f.is_empty() {
                        field.to_owned()
                    } else {
                        format!("{field}.{f}")
                    },
                    m,
                )
            })?;
        }
        if self.steps.is_empty() {
            return Err(("spec.steps".into(), "at least one step is needed".into()));
        }
        for (i, s) in self.steps.iter().enumerate() {
            if !(1..=100).contains(s) {
                return Err((
                    format!("spec.steps[{i}]"),
                    format!("{s} is not a percentage from 1 to 100"),
                ));
            }
            if i > 0 && *s <= self.steps[i - 1] {
                return Err((
                    format!("spec.steps[{i}]"),
                    format!("steps must increase ({} after {})", s, self.steps[i - 1]),
                ));
            }
        }
        if !(1..=86_400).contains(&self.hold_seconds) {
            return Err((
                "spec.holdSeconds".into(),
                format!("{} is not from 1 to 86400", self.hold_seconds),
            ));
        }
        let r = self.gate.max_failure_ratio;
        if !(0.0..=1.0).contains(&r) {
            return Err((
                "spec.gate.maxFailureRatio".into(),
                format!("{r} is not from 0 to 1"),
            ));
        }
        Ok(())
    }

    /// The weights of step `percent`: `to` first (so that a cluster in both counts as `to`), then `from`.
    #[must_use]
    pub fn weights_at(&self, percent: u32) -> Vec<WeightGroup> {
        vec![
            WeightGroup {
                clusters: self.to.clone(),
                weight: percent.min(100),
            },
            WeightGroup {
                clusters: self.from.clone(),
                weight: 100 - percent.min(100),
            },
        ]
    }
}

/// Reads a pod's capacity annotation.
///
/// # Errors
/// When the value is not an integer in 1..=[`MAX_CAPACITY`].
pub fn capacity(annotations: &BTreeMap<String, String>) -> Result<u32, String> {
    match annotations.get(ANNOTATION_CAPACITY) {
        None => Ok(1),
        Some(v) => v
            .trim()
            .parse::<u32>()
            .ok()
            .filter(|c| (1..=MAX_CAPACITY).contains(c))
            .ok_or_else(|| {
                format!("annotation {ANNOTATION_CAPACITY}: {v:?} is not an integer from 1 to {MAX_CAPACITY}")
            }),
    }
}

/// Splits `total` slots over `shares` (non-negative) in proportion, by largest remainder: the result sums to
/// `total` when any share is positive; a positive share may get 0 slots only when `total` is too small.
#[must_use]
pub fn apportion(total: u32, shares: &[f64]) -> Vec<u32> {
    let sum: f64 = shares.iter().filter(|s| **s > 0.0).sum();
    if sum <= 0.0 || shares.is_empty() {
        return vec![0; shares.len()];
    }
    let exact: Vec<f64> = shares
        .iter()
        .map(|s| s.max(0.0) / sum * f64::from(total))
        .collect();
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "floor of a value in 0..=total, which fits u32"
    )]
    let mut out: Vec<u32> = exact.iter().map(|e| e.floor() as u32).collect();
    let given: u32 = out.iter().sum();
    let mut order: Vec<usize> = (0..shares.len()).filter(|i| shares[*i] > 0.0).collect();
    order.sort_by(|a, b| {
        let (ra, rb) = (exact[*a] - exact[*a].floor(), exact[*b] - exact[*b].floor());
        rb.total_cmp(&ra).then(a.cmp(b))
    });
    for i in order
        .into_iter()
        .cycle()
        .take(total.saturating_sub(given) as usize)
    {
        out[i] += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::test_util::labels;

    fn group(sel: ClusterSelector, weight: u32) -> WeightGroup {
        WeightGroup {
            clusters: sel,
            weight,
        }
    }

    #[test]
    fn selectors_match_by_labels_expressions_and_names() {
        let canary = ClusterSelector {
            match_labels: labels(&[("stage", "canary")]),
            ..Default::default()
        };
        assert!(canary.matches("east", &labels(&[("stage", "canary"), ("region", "eu")])));
        assert!(!canary.matches("east", &labels(&[("stage", "prod")])));
        let names = ClusterSelector {
            names: vec!["west".into()],
            ..Default::default()
        };
        assert!(names.matches("west", &BTreeMap::new()));
        assert!(!names.matches("east", &labels(&[("stage", "canary")])));
        let expr = |op, values: &[&str]| ClusterSelector {
            match_expressions: vec![LabelRequirement {
                key: "region".into(),
                operator: op,
                values: values.iter().map(|v| (*v).to_owned()).collect(),
            }],
            ..Default::default()
        };
        let eu = labels(&[("region", "eu")]);
        assert!(expr(LabelOperator::In, &["eu", "us"]).matches("a", &eu));
        assert!(!expr(LabelOperator::NotIn, &["eu"]).matches("a", &eu));
        assert!(expr(LabelOperator::NotIn, &["eu"]).matches("a", &BTreeMap::new()));
        assert!(expr(LabelOperator::Exists, &[]).matches("a", &eu));
        assert!(expr(LabelOperator::DoesNotExist, &[]).matches("a", &BTreeMap::new()));
        assert!(ClusterSelector::default().matches("any", &BTreeMap::new()));
    }

    #[test]
    fn invalid_specs_are_refused_with_the_field() {
        let ok = TrafficPolicySpec {
            service: "api".into(),
            weights: vec![group(
                ClusterSelector {
                    names: vec!["west".into()],
                    ..Default::default()
                },
                90,
            )],
        };
        assert_eq!(ok.validate(), Ok(()));
        let field = |s: TrafficPolicySpec| s.validate().unwrap_err().0;
        let mut zero = ok.clone();
        zero.weights[0].weight = 0;
        assert_eq!(field(zero), "spec.weights");
        let mut empty = ok.clone();
        empty.weights.clear();
        assert_eq!(field(empty), "spec.weights");
        let mut bad_name = ok.clone();
        bad_name.weights[0].clusters.names = vec!["West!".into()];
        assert_eq!(field(bad_name), "spec.weights[0].clusters.names[0]");
        let mut both = ok.clone();
        both.weights[0].clusters.match_labels = labels(&[("stage", "canary")]);
        assert_eq!(field(both), "spec.weights[0].clusters");
        let mut bad_label = ok.clone();
        bad_label.weights[0].clusters = ClusterSelector {
            match_labels: labels(&[("stage", "-x-")]),
            ..Default::default()
        };
        assert_eq!(field(bad_label), "spec.weights[0].clusters.matchLabels");
        let mut bad_op = ok.clone();
        bad_op.weights[0].clusters = ClusterSelector {
            match_expressions: vec![LabelRequirement {
                key: "stage".into(),
                operator: LabelOperator::In,
                values: vec![],
            }],
            ..Default::default()
        };
        assert_eq!(
            field(bad_op),
            "spec.weights[0].clusters.matchExpressions[0].values"
        );
        let mut huge = ok.clone();
        huge.weights[0].weight = MAX_WEIGHT + 1;
        assert_eq!(field(huge), "spec.weights[0].weight");
        let mut no_service = ok;
        no_service.service.clear();
        assert_eq!(field(no_service), "spec.service");
    }

    #[test]
    fn first_matching_group_wins() {
        let spec = TrafficPolicySpec {
            service: "api".into(),
            weights: vec![
                group(
                    ClusterSelector {
                        match_labels: labels(&[("stage", "canary")]),
                        ..Default::default()
                    },
                    10,
                ),
                group(ClusterSelector::default(), 90),
            ],
        };
        assert_eq!(spec.group_of("a", &labels(&[("stage", "canary")])), Some(0));
        assert_eq!(spec.group_of("b", &labels(&[("stage", "prod")])), Some(1));
    }

    #[test]
    fn labels_and_capacity_parse_or_explain() {
        assert_eq!(parse_label("stage=canary"), Ok(("stage".into(), "canary".into())));
        assert_eq!(
            parse_label("fleetmesh.io/track=v2"),
            Ok(("fleetmesh.io/track".into(), "v2".into()))
        );
        assert!(parse_label("stage").is_err());
        assert!(parse_label("st age=x").is_err());
        assert!(parse_label("stage=-x").is_err());
        assert_eq!(capacity(&BTreeMap::new()), Ok(1));
        assert_eq!(capacity(&labels(&[(ANNOTATION_CAPACITY, "4")])), Ok(4));
        for bad in ["0", "1001", "x", "-1"] {
            assert!(capacity(&labels(&[(ANNOTATION_CAPACITY, bad)])).is_err(), "{bad}");
        }
    }

    #[test]
    fn apportion_sums_to_total_and_follows_shares() {
        assert_eq!(apportion(10, &[1.0, 1.0]), vec![5, 5]);
        assert_eq!(apportion(1000, &[10.0, 90.0]), vec![100, 900]);
        let three = apportion(1000, &[1.0, 1.0, 1.0]);
        assert_eq!(three.iter().sum::<u32>(), 1000);
        assert!(three.iter().all(|s| (333..=334).contains(s)));
        assert_eq!(apportion(100, &[0.0, 3.0]), vec![0, 100]);
        assert_eq!(apportion(100, &[0.0, 0.0]), vec![0, 0]);
        assert_eq!(apportion(100, &[]), Vec::<u32>::new());
    }

    fn rollout() -> StagedRolloutSpec {
        StagedRolloutSpec {
            service: "api".into(),
            from: ClusterSelector {
                match_labels: labels(&[("stage", "prod")]),
                ..Default::default()
            },
            to: ClusterSelector {
                match_labels: labels(&[("track", "v2")]),
                ..Default::default()
            },
            steps: vec![10, 50, 100],
            hold_seconds: 30,
            gate: Gate {
                max_failure_ratio: 0.02,
            },
        }
    }

    #[test]
    fn rollout_specs_are_checked() {
        assert_eq!(rollout().validate(), Ok(()));
        let field = |f: &dyn Fn(&mut StagedRolloutSpec)| {
            let mut s = rollout();
            f(&mut s);
            s.validate().unwrap_err().0
        };
        assert_eq!(field(&|s| s.steps = vec![50, 10]), "spec.steps[1]");
        assert_eq!(field(&|s| s.steps = vec![0]), "spec.steps[0]");
        assert_eq!(field(&|s| s.steps = vec![101]), "spec.steps[0]");
        assert_eq!(field(&|s| s.steps.clear()), "spec.steps");
        assert_eq!(field(&|s| s.hold_seconds = 0), "spec.holdSeconds");
        assert_eq!(
            field(&|s| s.gate.max_failure_ratio = 1.5),
            "spec.gate.maxFailureRatio"
        );
        assert_eq!(field(&|s| s.to.names = vec!["BAD".into()]), "spec.to");
        let w = rollout().weights_at(10);
        assert_eq!((w[0].weight, w[1].weight), (10, 90));
        let spec = TrafficPolicySpec {
            service: "api".into(),
            weights: w,
        };
        // A cluster in both groups counts as `to`.
        assert_eq!(
            spec.group_of("n", &labels(&[("stage", "prod"), ("track", "v2")])),
            Some(0)
        );
    }
}
