//! `StagedRollout` (fleetmesh.io/v1alpha1): moves a global service's new connections from the `from` clusters to
//! the `to` clusters step by step, each step held for `holdSeconds` while its gate holds.
//!
//! Every agent runs the rollouts of its cluster for the clients on its node: the weights of the current step
//! steer its datapath, and the gate is judged on what its datapath counted for the `to` clusters' backends
//! (per-backend statistics: new flows, and TCP resets sent by the backends). When the failure ratio of the step
//! (resets / new flows to `to` backends since the step began) exceeds `gate.maxFailureRatio`, the rollout halts
//! and every new connection goes back to `from` at the next reconcile (the agent reconciles every
//! [`FAST_TICK`] while a rollout progresses). A step advances only after a full hold time without breach.
//!
//! The state of every rollout is written to a file (`--state-dir`) on every change, so an agent restart resumes
//! a rollout where it was, hold time served included; a rollout whose spec changes starts over from its first
//! step. `pause`, `resume` and `abort` come from `meshctl rollout` through the agent API.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use mesh_k8s::crd::{NodeProgress, RolloutPhase};
use mesh_k8s::progress::NodeRollouts;
use mesh_model::ClusterState;
use mesh_model::traffic::{StagedRollout, TrafficPolicy, TrafficPolicySpec};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::lb::FlowStats;

/// Reconcile interval while a rollout progresses (a gate breach is acted on within about this).
pub const FAST_TICK: Duration = Duration::from_millis(200);

/// Where a rollout is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Phase {
    /// Holding a step; advances when the hold time is served with the gate held.
    Progressing,
    /// Held by `meshctl rollout pause`: the step's weights stay, its hold time stops.
    Paused,
    /// The gate failed: every new connection goes to `from`.
    Halted,
    /// Every step held: the last step's weights stay.
    Completed,
    /// Stopped by `meshctl rollout abort`: every new connection goes to `from`.
    Aborted,
}

impl From<Phase> for RolloutPhase {
    fn from(p: Phase) -> Self {
        match p {
            Phase::Progressing => Self::Progressing,
            Phase::Paused => Self::Paused,
            Phase::Halted => Self::Halted,
            Phase::Completed => Self::Completed,
            Phase::Aborted => Self::Aborted,
        }
    }
}

/// A user's command for a rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Command {
    Pause,
    Resume,
    Abort,
}

impl std::str::FromStr for Command {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "pause" => Ok(Self::Pause),
            "resume" => Ok(Self::Resume),
            "abort" => Ok(Self::Abort),
            other => Err(format!(
                "unknown rollout command {other:?} (pause, resume, abort)"
            )),
        }
    }
}

/// The state of one rollout, as persisted and reported.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RolloutState {
    pub namespace: String,
    pub name: String,
    pub service: String,
    /// The spec this state belongs to (JSON); a different spec starts the rollout over.
    pub spec: String,
    pub phase: Phase,
    /// Index of the current step.
    pub step: usize,
    /// Percent of new connections sent to `to` now.
    pub percent: u32,
    /// Unix ms when the current step (or its resumption after a pause) began.
    pub step_started_ms: u64,
    /// Hold time served in this step before the last pause, ms.
    pub held_ms: u64,
    /// Statistics of the `to` backends when the step began.
    pub baseline: FlowStats,
    /// Statistics of the `to` backends during this step (since `baseline`).
    pub observed: FlowStats,
    /// Why the rollout halted, or other news.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Unix ms of the last phase or step change.
    pub changed_ms: u64,
}

impl RolloutState {
    fn new(r: &StagedRollout, spec: String, now_ms: u64, to: FlowStats) -> Self {
        Self {
            namespace: r.namespace.clone(),
            name: r.name.clone(),
            service: r.spec.service.clone(),
            spec,
            phase: Phase::Progressing,
            step: 0,
            percent: r.spec.steps[0],
            step_started_ms: now_ms,
            held_ms: 0,
            baseline: to,
            observed: FlowStats::default(),
            message: None,
            changed_ms: now_ms,
        }
    }

    /// Hold time served in the current step.
    #[must_use]
    pub fn held(&self, now_ms: u64) -> u64 {
        match self.phase {
            Phase::Progressing => self.held_ms + now_ms.saturating_sub(self.step_started_ms),
            _ => self.held_ms,
        }
    }

    /// The failure ratio of the current step (0 without connections).
    #[must_use]
    pub fn failure_ratio(&self) -> f64 {
        if self.observed.new_flows == 0 {
            0.0
        } else {
            #[expect(clippy::cast_precision_loss, reason = "counts far below 2^52")]
            let r = self.observed.resets as f64 / self.observed.new_flows as f64;
            r
        }
    }
}

/// The rollouts of this node: their states, the file they persist in, and the commands waiting for them.
#[derive(Debug, Default)]
pub struct Rollouts {
    states: BTreeMap<(String, String), RolloutState>,
    file: Option<PathBuf>,
    pending: Vec<((String, String), Command)>,
}

fn spec_json(r: &StagedRollout) -> String {
    serde_json::to_string(&r.spec).unwrap_or_default()
}

impl Rollouts {
    /// Loads the states persisted in `file` (none when it does not exist). A file that cannot be read starts
    /// every rollout over from its first step (the safe direction: less traffic on `to`), with a warning.
    #[must_use]
    pub fn load(file: PathBuf) -> Self {
        let states = match std::fs::read(&file) {
            Ok(bytes) => match serde_json::from_slice::<Vec<RolloutState>>(&bytes) {
                Ok(list) => {
                    info!(file = %file.display(), rollouts = list.len(), "resuming rollouts");
                    list.into_iter()
                        .map(|s| ((s.namespace.clone(), s.name.clone()), s))
                        .collect()
                }
                Err(e) => {
                    warn!(file = %file.display(), error = %e, "rollout state unreadable: rollouts start over");
                    BTreeMap::new()
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => {
                warn!(file = %file.display(), error = %e, "rollout state unreadable: rollouts start over");
                BTreeMap::new()
            }
        };
        Self {
            states,
            file: Some(file),
            pending: Vec::new(),
        }
    }

    /// Queues a command; it takes effect at the next [`Rollouts::tick`].
    ///
    /// # Errors
    /// When no rollout of that name is known.
    pub fn command(&mut self, namespace: &str, name: &str, cmd: Command) -> Result<(), String> {
        let key = (namespace.to_owned(), name.to_owned());
        if !self.states.contains_key(&key) {
            return Err(format!("no StagedRollout {namespace}/{name} on this node"));
        }
        self.pending.push((key, cmd));
        Ok(())
    }

    /// Whether a rollout is progressing (the reconciler then ticks every [`FAST_TICK`]).
    #[must_use]
    pub fn active(&self) -> bool {
        self.states.values().any(|s| s.phase == Phase::Progressing)
    }

    /// Every rollout's state.
    #[must_use]
    pub fn states(&self) -> Vec<RolloutState> {
        self.states.values().cloned().collect()
    }

    /// Advances every rollout of `local`: applies commands, judges the gate on `to_stats` (the current
    /// statistics of a rollout's `to` backends, `None` when unknown yet), moves steps, forgets deleted rollouts,
    /// and persists any change.
    pub fn tick(
        &mut self,
        local: &ClusterState,
        now_ms: u64,
        to_stats: &dyn Fn(&StagedRollout) -> Option<FlowStats>,
    ) {
        let before = self.states.clone();
        self.states.retain(|k, _| local.rollouts.contains_key(k));
        for (key, r) in &local.rollouts {
            let spec = spec_json(r);
            let stats = to_stats(r);
            let st = match self.states.get_mut(key) {
                Some(st) if st.spec == spec => st,
                _ => {
                    let fresh = RolloutState::new(r, spec, now_ms, stats.unwrap_or_default());
                    info!(rollout = %format!("{}/{}", r.namespace, r.name), percent = fresh.percent, "rollout started");
                    self.states.insert(key.clone(), fresh);
                    continue;
                }
            };
            for (_, cmd) in self.pending.iter().filter(|(k, _)| k == key) {
                apply_command(st, *cmd, now_ms, stats);
            }
            if st.phase != Phase::Progressing {
                continue;
            }
            if let Some(now) = stats {
                st.observed = FlowStats {
                    new_flows: now.new_flows.saturating_sub(st.baseline.new_flows),
                    resets: now.resets.saturating_sub(st.baseline.resets),
                };
            }
            let ratio = st.failure_ratio();
            if ratio > r.spec.gate.max_failure_ratio {
                let msg = format!(
                    "gate failed at step {} ({}%): {} of {} new connections to the `to` clusters failed ({:.3} > {})",
                    st.step + 1,
                    st.percent,
                    st.observed.resets,
                    st.observed.new_flows,
                    ratio,
                    r.spec.gate.max_failure_ratio
                );
                warn!(rollout = %format!("{}/{}", r.namespace, r.name), "{msg}; every new connection goes back to `from`");
                st.held_ms = st.held(now_ms);
                st.phase = Phase::Halted;
                st.percent = 0;
                st.message = Some(msg);
                st.changed_ms = now_ms;
                continue;
            }
            if st.held(now_ms) >= u64::from(r.spec.hold_seconds) * 1000 {
                if st.step + 1 < r.spec.steps.len() {
                    st.step += 1;
                    st.percent = r.spec.steps[st.step];
                    st.step_started_ms = now_ms;
                    st.held_ms = 0;
                    st.baseline = stats.unwrap_or(st.baseline);
                    st.observed = FlowStats::default();
                    st.changed_ms = now_ms;
                    info!(rollout = %format!("{}/{}", r.namespace, r.name), step = st.step + 1, percent = st.percent, "rollout step");
                } else {
                    st.held_ms = st.held(now_ms);
                    st.phase = Phase::Completed;
                    st.changed_ms = now_ms;
                    info!(rollout = %format!("{}/{}", r.namespace, r.name), percent = st.percent, "rollout completed");
                }
            }
        }
        self.pending.clear();
        if self.states != before {
            self.persist();
        }
    }

    fn persist(&self) {
        let Some(file) = &self.file else { return };
        if let Err(e) = write_atomically(file, &self.states()) {
            warn!(file = %file.display(), error = %e, "persisting rollout state");
        }
    }

    /// What this node reports of every rollout it runs (its entry in its `MeshNode`'s `status.rollouts`, see
    /// [`mesh_k8s::progress`]): hold time in whole seconds, so that it changes at most once a second.
    #[must_use]
    pub fn progress(&self, local: &ClusterState, now_ms: u64) -> NodeRollouts {
        self.states
            .iter()
            .map(|(key, st)| {
                let steps = local
                    .rollouts
                    .get(key)
                    .map_or(st.step + 1, |r| r.spec.steps.len());
                let progress = NodeProgress {
                    phase: st.phase.into(),
                    step: u32::try_from(st.step + 1).unwrap_or(u32::MAX),
                    steps: u32::try_from(steps).unwrap_or(u32::MAX),
                    percent: st.percent,
                    held_seconds: st.held(now_ms) / 1000,
                    failure_ratio: st.failure_ratio(),
                    new_flows: st.observed.new_flows,
                    resets: st.observed.resets,
                    message: st.message.clone(),
                    updated_at: None,
                };
                (key.clone(), progress)
            })
            .collect()
    }

    /// The weights a rollout puts on its service now, as a policy (`None` when no rollout steers it).
    #[must_use]
    pub fn policy_for(&self, local: &ClusterState, namespace: &str, service: &str) -> Option<TrafficPolicy> {
        let st = self
            .states
            .values()
            .find(|s| s.namespace == namespace && s.service == service)?;
        let r = local.rollouts.get(&(st.namespace.clone(), st.name.clone()))?;
        Some(TrafficPolicy {
            namespace: r.namespace.clone(),
            name: format!("rollout:{}", r.name),
            spec: TrafficPolicySpec {
                service: r.spec.service.clone(),
                weights: r.spec.weights_at(st.percent),
            },
        })
    }
}

fn apply_command(st: &mut RolloutState, cmd: Command, now_ms: u64, stats: Option<FlowStats>) {
    match (cmd, st.phase) {
        (Command::Pause, Phase::Progressing) => {
            st.held_ms = st.held(now_ms);
            st.phase = Phase::Paused;
            st.message = Some("paused by the user".into());
        }
        (Command::Resume, Phase::Paused) => {
            st.phase = Phase::Progressing;
            st.step_started_ms = now_ms;
            st.message = None;
        }
        (Command::Resume, Phase::Halted) => {
            // Resuming a halted rollout repeats the failed step with a fresh gate.
            st.phase = Phase::Progressing;
            st.step_started_ms = now_ms;
            st.held_ms = 0;
            st.baseline = stats.unwrap_or(st.baseline);
            st.observed = FlowStats::default();
            st.message = Some("resumed after a halt: the step starts over".into());
        }
        (Command::Abort, Phase::Progressing | Phase::Paused | Phase::Halted | Phase::Completed) => {
            st.held_ms = st.held(now_ms);
            st.phase = Phase::Aborted;
            st.percent = 0;
            st.message = Some("aborted by the user: every new connection goes to `from`".into());
        }
        _ => return,
    }
    st.changed_ms = now_ms;
}

fn write_atomically(file: &Path, states: &[RolloutState]) -> std::io::Result<()> {
    if let Some(dir) = file.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = file.with_extension("json.tmp");
    let bytes = serde_json::to_vec_pretty(states).map_err(std::io::Error::other)?;
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, file)
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use mesh_model::traffic::{ClusterSelector, Gate, StagedRolloutSpec};

    use super::*;

    fn rollout(steps: Vec<u32>) -> StagedRollout {
        StagedRollout {
            namespace: "demo".into(),
            name: "v2".into(),
            spec: StagedRolloutSpec {
                service: "echo".into(),
                from: ClusterSelector {
                    names: vec!["west".into()],
                    ..Default::default()
                },
                to: ClusterSelector {
                    names: vec!["north".into()],
                    ..Default::default()
                },
                steps,
                hold_seconds: 10,
                gate: Gate {
                    max_failure_ratio: 0.1,
                },
            },
        }
    }

    fn state_with(r: &StagedRollout) -> ClusterState {
        let mut st = ClusterState::default();
        st.rollouts
            .insert((r.namespace.clone(), r.name.clone()), r.clone());
        st
    }

    fn key() -> (String, String) {
        ("demo".into(), "v2".into())
    }

    #[test]
    fn steps_advance_after_the_hold_and_complete() {
        let r = rollout(vec![10, 50, 100]);
        let local = state_with(&r);
        let mut ro = Rollouts::default();
        let stats = Cell::new(FlowStats::default());
        let get = |_: &StagedRollout| Some(stats.get());
        ro.tick(&local, 1_000, &get);
        assert_eq!(ro.states[&key()].percent, 10);
        let p = ro.policy_for(&local, "demo", "echo").expect("policy");
        assert_eq!((p.spec.weights[0].weight, p.spec.weights[1].weight), (10, 90));
        stats.set(FlowStats {
            new_flows: 100,
            resets: 5,
        });
        ro.tick(&local, 10_999, &get);
        assert_eq!(
            (ro.states[&key()].step, ro.states[&key()].percent),
            (0, 10),
            "hold not served yet"
        );
        ro.tick(&local, 11_000, &get);
        assert_eq!((ro.states[&key()].step, ro.states[&key()].percent), (1, 50));
        assert_eq!(
            ro.states[&key()].baseline.new_flows,
            100,
            "new step, new baseline"
        );
        ro.tick(&local, 21_000, &get);
        ro.tick(&local, 31_000, &get);
        assert_eq!(ro.states[&key()].phase, Phase::Completed);
        assert_eq!(ro.states[&key()].percent, 100);
        assert_eq!(
            ro.states[&key()].held_ms,
            10_000,
            "the last step's hold is reported"
        );
        // Deleted: forgotten.
        ro.tick(&ClusterState::default(), 32_000, &get);
        assert!(ro.states().is_empty());
    }

    #[test]
    fn progress_reports_each_rollout_from_step_one() {
        let r = rollout(vec![10, 50, 100]);
        let local = state_with(&r);
        let mut ro = Rollouts::default();
        let stats = Cell::new(FlowStats::default());
        let get = |_: &StagedRollout| Some(stats.get());
        ro.tick(&local, 1_000, &get);
        stats.set(FlowStats {
            new_flows: 40,
            resets: 2,
        });
        ro.tick(&local, 8_500, &get);
        let p = &ro.progress(&local, 8_500)[&key()];
        assert_eq!(p.phase, RolloutPhase::Progressing);
        assert_eq!((p.step, p.steps, p.percent), (1, 3, 10));
        assert_eq!(p.held_seconds, 7, "whole seconds");
        assert_eq!((p.new_flows, p.resets), (40, 2));
        assert!((p.failure_ratio - 0.05).abs() < 1e-9, "{p:?}");
        ro.tick(&local, 11_000, &get);
        let p = &ro.progress(&local, 11_000)[&key()];
        assert_eq!((p.step, p.percent, p.held_seconds), (2, 50, 0));
        ro.tick(&ClusterState::default(), 12_000, &get);
        assert!(
            ro.progress(&ClusterState::default(), 12_000).is_empty(),
            "deleted: no entry"
        );
    }

    #[test]
    fn a_failing_gate_halts_and_sends_everything_back_to_from() {
        let r = rollout(vec![10, 100]);
        let local = state_with(&r);
        let mut ro = Rollouts::default();
        let stats = Cell::new(FlowStats {
            new_flows: 1000,
            resets: 900,
        });
        let get = |_: &StagedRollout| Some(stats.get());
        ro.tick(&local, 0, &get);
        stats.set(FlowStats {
            new_flows: 1020,
            resets: 910,
        });
        ro.tick(&local, 1_000, &get);
        let st = &ro.states[&key()];
        assert_eq!((st.phase, st.percent), (Phase::Halted, 0), "{st:?}");
        assert!(
            st.message.as_deref().unwrap_or_default().contains("10 of 20"),
            "{st:?}"
        );
        let p = ro.policy_for(&local, "demo", "echo").expect("policy");
        assert_eq!((p.spec.weights[0].weight, p.spec.weights[1].weight), (0, 100));
        let reported = &ro.progress(&local, 1_000)[&key()];
        assert_eq!((reported.phase, reported.percent), (RolloutPhase::Halted, 0));
        assert!(
            reported
                .message
                .as_deref()
                .unwrap_or_default()
                .contains("gate failed"),
            "{reported:?}"
        );
        // Halted stays halted, whatever time passes.
        ro.tick(&local, 100_000, &get);
        assert_eq!(ro.states[&key()].phase, Phase::Halted);
    }

    #[test]
    fn pause_stops_the_hold_resume_continues_abort_returns_to_from() {
        let r = rollout(vec![10, 100]);
        let local = state_with(&r);
        let mut ro = Rollouts::default();
        let get = |_: &StagedRollout| Some(FlowStats::default());
        ro.tick(&local, 0, &get);
        ro.command("demo", "v2", Command::Pause).expect("known");
        ro.tick(&local, 6_000, &get);
        assert_eq!(ro.states[&key()].phase, Phase::Paused);
        ro.tick(&local, 60_000, &get);
        assert_eq!(ro.states[&key()].step, 0, "no hold while paused");
        ro.command("demo", "v2", Command::Resume).expect("known");
        ro.tick(&local, 60_000, &get);
        ro.tick(&local, 63_999, &get);
        assert_eq!(ro.states[&key()].step, 0, "6 s + 3.999 s held");
        ro.tick(&local, 64_000, &get);
        assert_eq!(ro.states[&key()].percent, 100);
        ro.command("demo", "v2", Command::Abort).expect("known");
        ro.tick(&local, 65_000, &get);
        assert_eq!(
            (ro.states[&key()].phase, ro.states[&key()].percent),
            (Phase::Aborted, 0)
        );
        assert!(ro.command("demo", "nope", Command::Pause).is_err());
    }

    #[test]
    fn state_survives_a_restart_and_a_new_spec_starts_over() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("rollouts.json");
        let r = rollout(vec![10, 50, 100]);
        let local = state_with(&r);
        let get = |_: &StagedRollout| Some(FlowStats::default());
        let mut ro = Rollouts::load(file.clone());
        ro.tick(&local, 0, &get);
        ro.tick(&local, 10_000, &get);
        assert_eq!(ro.states[&key()].percent, 50);
        drop(ro);
        let mut again = Rollouts::load(file.clone());
        assert_eq!(again.states[&key()].percent, 50, "resumed at step 2");
        again.tick(&local, 15_000, &get);
        assert_eq!(again.states[&key()].percent, 50, "no jump");
        again.tick(&local, 20_000, &get);
        assert_eq!(again.states[&key()].percent, 100);
        let mut changed = r;
        changed.spec.steps = vec![20, 100];
        again.tick(&state_with(&changed), 21_000, &get);
        assert_eq!(again.states[&key()].percent, 20, "new spec, first step");
        std::fs::write(&file, b"{garbage").expect("write");
        assert!(Rollouts::load(file).states().is_empty());
    }
}
