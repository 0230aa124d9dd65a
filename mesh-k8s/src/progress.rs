//! A `StagedRollout`'s progress in its status subresource, for `kubectl get`:
//!
//! - every agent (`--source kubernetes`) writes its own node's entry, `status.nodes.<node>` ([`NodeProgress`]),
//!   for the rollouts it runs ([`NodeProgressWriter`]): at once when the phase or the step changes, otherwise at
//!   most every [`REFRESH`] while something else changes (hold time served, counters), and not at all while
//!   nothing changes. When the node stops running a rollout its entry is set to `null` (removed);
//! - the clustermesh-apiserver (one writer per cluster) summarizes the entries of the nodes that exist into
//!   `status.progress` ([`RolloutProgress`], rule in [`summarize`]) when the summary changes, and removes the
//!   entries of nodes that no longer exist ([`RolloutSummaries`]).
//!
//! Each writer merge-patches only its own keys of `status` (the validity fields `observedGeneration`, `phase` and
//! `message` are [`crate::status`]'s), so they never clobber each other. A failed patch is retried with a backoff
//! (per rollout, from [`RETRY_MIN`] doubling to [`RETRY_MAX`]); the writers run as their own tasks fed by watch
//! channels and never hold up the agent's reconcile loop or the source.
//!
//! Write load: per rollout, each node writes on its phase and step changes and at most once per [`REFRESH`] while
//! it progresses (a cluster of N nodes: about N / 30 patches per second per progressing rollout, N at each step),
//! the apiserver once per change of the summary.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::StreamExt as _;
use kube::Client;
use kube::api::{Api, DynamicObject, Patch, PatchParams};
use kube::runtime::WatchStreamExt as _;
use kube::runtime::watcher::{self, Event};
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, instrument, warn};

use crate::crd::{NodeProgress, RolloutPhase, RolloutProgress};
use crate::status::{StatusError, StatusKind};

/// How often at most an agent rewrites its node's entry of a rollout when neither its phase nor its step changed.
pub const REFRESH: Duration = Duration::from_secs(30);
/// First retry of a failed patch.
pub const RETRY_MIN: Duration = Duration::from_secs(1);
/// Longest wait between retries of a failed patch.
pub const RETRY_MAX: Duration = Duration::from_secs(60);
/// How many halted nodes the summary names (`nodesHalted` counts them all).
pub const HALTED_NODES_SHOWN: usize = 10;

/// A rollout: (namespace, name).
pub type RolloutKey = (String, String);
/// What a node reports of the rollouts it runs (`updatedAt` is left to the writer).
pub type NodeRollouts = BTreeMap<RolloutKey, NodeProgress>;

/// A node's entry that could not be written.
#[derive(Debug, thiserror::Error)]
#[error(
    "cannot write status.nodes.{node} of StagedRollout {namespace}/{name} (does the agent's role grant `patch` on \
     `stagedrollouts/status`?)"
)]
pub struct NodeProgressError {
    pub node: String,
    pub namespace: String,
    pub name: String,
    #[source]
    pub source: kube::Error,
}

/// Retries of one rollout's failed patches.
#[derive(Debug, Clone, Copy)]
struct Backoff {
    failures: u32,
    retry_at: Instant,
}

impl Backoff {
    fn after(previous: Option<Backoff>, now: Instant) -> Self {
        let failures = previous.map_or(0, |b| b.failures).saturating_add(1);
        let wait = RETRY_MIN
            .saturating_mul(2u32.saturating_pow(failures - 1))
            .min(RETRY_MAX);
        Self {
            failures,
            retry_at: now + wait,
        }
    }
}

fn is_not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 404)
}

fn now_rfc3339() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let secs = i64::try_from(secs).unwrap_or(i64::MAX);
    k8s_openapi::jiff::Timestamp::from_second(secs)
        .map(|t| t.to_string())
        .unwrap_or_default()
}

/// `value` (an object) with `null` for each of `keys` it lacks, so that a merge patch removes them.
fn with_nulls(mut value: Value, keys: &[&str]) -> Value {
    if let Some(map) = value.as_object_mut() {
        for k in keys {
            map.entry(*k).or_insert(Value::Null);
        }
    }
    value
}

/// What one writer got done in one pass.
#[derive(Debug)]
pub struct Synced<E> {
    /// Patches sent and accepted.
    pub patched: usize,
    /// Patches that failed (retried after a backoff).
    pub failures: Vec<E>,
    /// When the writer has something to write next without a change of its input.
    pub next: Option<Instant>,
}

impl<E> Default for Synced<E> {
    fn default() -> Self {
        Self {
            patched: 0,
            failures: Vec::new(),
            next: None,
        }
    }
}

/// What the writer last wrote of one rollout.
#[derive(Debug, Clone)]
struct Written {
    progress: NodeProgress,
    at: Instant,
}

/// An agent's writer of its node's entries (`status.nodes.<node>`), see the module documentation.
pub struct NodeProgressWriter {
    client: Client,
    node: String,
    refresh: Duration,
    written: HashMap<RolloutKey, Written>,
    failing: HashMap<RolloutKey, Backoff>,
}

impl std::fmt::Debug for NodeProgressWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeProgressWriter")
            .field("node", &self.node)
            .field("refresh", &self.refresh)
            .field("written", &self.written.len())
            .field("failing", &self.failing.len())
            .finish_non_exhaustive()
    }
}

impl NodeProgressWriter {
    #[must_use]
    pub fn new(client: Client, node: impl Into<String>) -> Self {
        Self {
            client,
            node: node.into(),
            refresh: REFRESH,
            written: HashMap::new(),
            failing: HashMap::new(),
        }
    }

    /// Another bound than [`REFRESH`] for rewrites without a phase or step change (tests).
    #[must_use]
    pub fn with_refresh(mut self, refresh: Duration) -> Self {
        self.refresh = refresh;
        self
    }

    /// When the entry of `key` is due to become `progress` (`None`: nothing to write; `now`: at once).
    fn due(&self, key: &RolloutKey, progress: &NodeProgress, now: Instant) -> Option<Instant> {
        let due = match self.written.get(key) {
            None => None,
            Some(w) if w.progress == *progress => return None,
            Some(w) if w.progress.phase != progress.phase || w.progress.step != progress.step => None,
            Some(w) => Some(w.at + self.refresh),
        };
        let retry = self.failing.get(key).map(|b| b.retry_at);
        match (due, retry) {
            (Some(d), Some(r)) => Some(d.max(r)),
            (d, r) => Some(d.or(r).unwrap_or(now)),
        }
    }

    /// Writes the entries that are due: new rollouts and phase or step changes at once, other changes once
    /// [`REFRESH`] has passed since the last write, removals (a rollout no longer in `current`) at once; failed
    /// ones after their backoff.
    #[instrument(skip_all, fields(node = %self.node, rollouts = current.len()))]
    pub async fn sync(&mut self, current: &NodeRollouts, now: Instant) -> Synced<NodeProgressError> {
        let mut out = Synced::default();
        self.failing
            .retain(|k, _| current.contains_key(k) || self.written.contains_key(k));
        let mut work: Vec<(RolloutKey, Option<NodeProgress>)> = Vec::new();
        for (key, progress) in current {
            let mut progress = progress.clone();
            progress.updated_at = None;
            if let Some(at) = self.due(key, &progress, now) {
                if at <= now {
                    work.push((key.clone(), Some(progress)));
                } else {
                    out.next = Some(out.next.map_or(at, |n: Instant| n.min(at)));
                }
            }
        }
        for key in self.written.keys().filter(|k| !current.contains_key(*k)) {
            match self.failing.get(key).map(|b| b.retry_at) {
                Some(at) if at > now => out.next = Some(out.next.map_or(at, |n| n.min(at))),
                _ => work.push((key.clone(), None)),
            }
        }
        for (key, progress) in work {
            match self.patch(&key, progress.as_ref()).await {
                Ok(()) => {
                    debug!(rollout = %format!("{}/{}", key.0, key.1), phase = ?progress.as_ref().map(|p| p.phase), "node progress written");
                    self.failing.remove(&key);
                    match progress {
                        Some(progress) => {
                            self.written.insert(key, Written { progress, at: now });
                        }
                        None => {
                            self.written.remove(&key);
                        }
                    }
                    out.patched += 1;
                }
                Err(e) => {
                    let b = Backoff::after(self.failing.get(&key).copied(), now);
                    out.next = Some(out.next.map_or(b.retry_at, |n| n.min(b.retry_at)));
                    self.failing.insert(key, b);
                    out.failures.push(e);
                }
            }
        }
        out
    }

    /// A merge patch of `status.nodes.<node>` only: the entry (every field, `null` for the absent ones), or
    /// `null` to remove it. An object that is gone needs nothing.
    async fn patch(
        &self,
        key: &RolloutKey,
        progress: Option<&NodeProgress>,
    ) -> Result<(), NodeProgressError> {
        let entry = match progress {
            Some(p) => {
                let mut p = p.clone();
                p.updated_at = Some(now_rfc3339());
                with_nulls(serde_json::to_value(&p).unwrap_or(Value::Null), &["message"])
            }
            None => Value::Null,
        };
        let body = json!({"status": {"nodes": {self.node.as_str(): entry}}});
        let ar = StatusKind::StagedRollout.api_resource();
        let api = Api::<DynamicObject>::namespaced_with(self.client.clone(), &key.0, &ar);
        match api
            .patch_status(&key.1, &PatchParams::default(), &Patch::Merge(&body))
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            Err(source) => Err(NodeProgressError {
                node: self.node.clone(),
                namespace: key.0.clone(),
                name: key.1.clone(),
                source,
            }),
        }
    }

    /// Writes after every change of `rollouts` and whenever something is due, until the sender is gone.
    /// Failures are logged and retried, never returned.
    #[instrument(skip_all, fields(node = %self.node))]
    pub async fn run(mut self, mut rollouts: watch::Receiver<NodeRollouts>) {
        let mut next: Option<Instant> = None;
        loop {
            match next {
                Some(at) => tokio::select! {
                    r = rollouts.changed() => if r.is_err() { return },
                    () = tokio::time::sleep_until(at) => {}
                },
                None => {
                    if rollouts.changed().await.is_err() {
                        return;
                    }
                }
            }
            let current = rollouts.borrow_and_update().clone();
            let out = self.sync(&current, Instant::now()).await;
            for e in &out.failures {
                warn!(error = %e, source = %std::error::Error::source(e).map(ToString::to_string).unwrap_or_default(),
                      "rollout progress not written; retrying later");
            }
            next = out.next;
        }
    }
}

/// How serious a phase is for the summary (lower wins).
fn severity(p: RolloutPhase) -> u8 {
    match p {
        RolloutPhase::Halted => 0,
        RolloutPhase::Aborted => 1,
        RolloutPhase::Paused => 2,
        RolloutPhase::Progressing => 3,
        RolloutPhase::Completed => 4,
    }
}

/// The cluster's summary of the node entries of a rollout (the nodes that exist), `None` without any:
/// - `phase`: the most serious phase of any node: `Halted` if any node halted, else `Aborted` if any node
///   aborted, else `Paused` if any is paused, else `Progressing` if any progresses, else `Completed` (every node
///   completed). Every node steers its own clients, so one halted node is a halted rollout for its clients;
/// - `step`: the lowest step of any node (a halted node counts at the step it halted at), `steps` the highest
///   step count reported;
/// - `nodes`, `nodesHalted`: how many nodes report it, how many of them halted; `haltedNodes`: the first
///   [`HALTED_NODES_SHOWN`] of those by name.
#[must_use]
pub fn summarize<'a>(
    entries: impl IntoIterator<Item = (&'a str, &'a NodeProgress)>,
) -> Option<RolloutProgress> {
    let mut summary: Option<RolloutProgress> = None;
    let mut halted: BTreeSet<&str> = BTreeSet::new();
    for (node, p) in entries {
        if p.phase == RolloutPhase::Halted {
            halted.insert(node);
        }
        let s = summary.get_or_insert(RolloutProgress {
            phase: p.phase,
            step: p.step,
            steps: p.steps,
            nodes: 0,
            nodes_halted: 0,
            halted_nodes: Vec::new(),
        });
        if severity(p.phase) < severity(s.phase) {
            s.phase = p.phase;
        }
        s.step = s.step.min(p.step);
        s.steps = s.steps.max(p.steps);
        s.nodes = s.nodes.saturating_add(1);
    }
    let mut summary = summary?;
    summary.nodes_halted = u32::try_from(halted.len()).unwrap_or(u32::MAX);
    summary.halted_nodes = halted
        .into_iter()
        .take(HALTED_NODES_SHOWN)
        .map(str::to_owned)
        .collect();
    Some(summary)
}

/// What a rollout's status holds of the progress.
#[derive(Debug, Clone, Default, PartialEq)]
struct Reported {
    /// Every node entry by node name; `None` when it does not read as a [`NodeProgress`] (left out of the summary).
    nodes: BTreeMap<String, Option<NodeProgress>>,
    /// The summary it carries (`None`: none, or not readable).
    progress: Option<RolloutProgress>,
}

impl Reported {
    fn of(object: &DynamicObject) -> Self {
        let status = object.data.get("status");
        let nodes = status
            .and_then(|s| s.get("nodes"))
            .and_then(Value::as_object)
            .map(|m| {
                m.iter()
                    .filter(|(_, v)| !v.is_null())
                    .map(|(k, v)| (k.clone(), serde_json::from_value(v.clone()).ok()))
                    .collect()
            })
            .unwrap_or_default();
        let progress = status
            .and_then(|s| s.get("progress"))
            .and_then(|v| serde_json::from_value(v.clone()).ok());
        Self { nodes, progress }
    }
}

/// The clustermesh-apiserver's writer of `status.progress`, see the module documentation.
pub struct RolloutSummaries {
    client: Client,
    rollouts: BTreeMap<RolloutKey, Reported>,
    dirty: BTreeSet<RolloutKey>,
    failing: HashMap<RolloutKey, Backoff>,
}

impl std::fmt::Debug for RolloutSummaries {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RolloutSummaries")
            .field("rollouts", &self.rollouts.len())
            .field("dirty", &self.dirty)
            .field("failing", &self.failing.len())
            .finish_non_exhaustive()
    }
}

impl RolloutSummaries {
    #[must_use]
    pub fn new(client: Client) -> Self {
        Self {
            client,
            rollouts: BTreeMap::new(),
            dirty: BTreeSet::new(),
            failing: HashMap::new(),
        }
    }

    fn observe(&mut self, object: &DynamicObject) {
        let (Some(ns), Some(name)) = (object.metadata.namespace.clone(), object.metadata.name.clone()) else {
            return;
        };
        let key = (ns, name);
        let reported = Reported::of(object);
        if self.rollouts.get(&key) != Some(&reported) {
            self.rollouts.insert(key.clone(), reported);
            self.dirty.insert(key);
        }
    }

    /// Patches every rollout whose summary over the nodes in `nodes` differs from what it carries, or that has
    /// entries of nodes not in `nodes` (removed). Rollouts whose last patch failed wait for their backoff.
    #[instrument(skip_all, fields(rollouts = self.rollouts.len(), nodes = nodes.len()))]
    pub async fn sync(&mut self, nodes: &BTreeSet<String>, now: Instant) -> Synced<StatusError> {
        let mut out = Synced::default();
        self.failing.retain(|k, _| self.rollouts.contains_key(k));
        self.dirty.retain(|k| self.rollouts.contains_key(k));
        for (key, b) in &self.failing {
            if b.retry_at <= now {
                self.dirty.insert(key.clone());
            } else {
                out.next = Some(out.next.map_or(b.retry_at, |n: Instant| n.min(b.retry_at)));
            }
        }
        let dirty: Vec<RolloutKey> = self
            .dirty
            .iter()
            .filter(|k| self.failing.get(*k).is_none_or(|b| b.retry_at <= now))
            .cloned()
            .collect();
        for key in dirty {
            self.dirty.remove(&key);
            let Some(reported) = self.rollouts.get(&key) else {
                continue;
            };
            let gone: Vec<String> = reported
                .nodes
                .keys()
                .filter(|n| !nodes.contains(*n))
                .cloned()
                .collect();
            let summary = summarize(
                reported
                    .nodes
                    .iter()
                    .filter(|(n, _)| nodes.contains(*n))
                    .filter_map(|(n, p)| Some((n.as_str(), p.as_ref()?))),
            );
            if gone.is_empty() && summary == reported.progress {
                self.failing.remove(&key);
                continue;
            }
            match self.patch(&key, summary.as_ref(), &gone).await {
                Ok(()) => {
                    debug!(rollout = %format!("{}/{}", key.0, key.1), phase = ?summary.as_ref().map(|s| s.phase), removed = gone.len(), "rollout progress summarized");
                    self.failing.remove(&key);
                    if let Some(r) = self.rollouts.get_mut(&key) {
                        r.progress = summary;
                        r.nodes.retain(|n, _| nodes.contains(n));
                    }
                    out.patched += 1;
                }
                Err(e) => {
                    let b = Backoff::after(self.failing.get(&key).copied(), now);
                    out.next = Some(out.next.map_or(b.retry_at, |n| n.min(b.retry_at)));
                    self.failing.insert(key, b);
                    out.failures.push(e);
                }
            }
        }
        out
    }

    /// A merge patch of `status.progress` (every field, `null` for the absent ones; `null` without node entries)
    /// and of `status.nodes.<gone>` = `null` for each node that no longer exists.
    async fn patch(
        &self,
        key: &RolloutKey,
        summary: Option<&RolloutProgress>,
        gone: &[String],
    ) -> Result<(), StatusError> {
        let progress = summary.map_or(Value::Null, |s| {
            with_nulls(serde_json::to_value(s).unwrap_or(Value::Null), &["haltedNodes"])
        });
        let mut status = json!({"progress": progress});
        if !gone.is_empty() {
            status["nodes"] = gone.iter().map(|n| (n.clone(), Value::Null)).collect();
        }
        let body = json!({ "status": status });
        let ar = StatusKind::StagedRollout.api_resource();
        let api = Api::<DynamicObject>::namespaced_with(self.client.clone(), &key.0, &ar);
        match api
            .patch_status(&key.1, &PatchParams::default(), &Patch::Merge(&body))
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            Err(source) => Err(StatusError::Patch {
                kind: StatusKind::StagedRollout,
                namespace: key.0.clone(),
                name: key.1.clone(),
                source,
            }),
        }
    }

    /// Watches every `StagedRollout` and summarizes after every change of one and of the node set (`None` until
    /// the source has listed the nodes: nothing is written before), until the node set's sender is gone.
    /// Failures are logged and retried, never returned.
    #[instrument(skip_all)]
    pub async fn run(mut self, mut nodes: watch::Receiver<Option<BTreeSet<String>>>) {
        let ar = StatusKind::StagedRollout.api_resource();
        let api = Api::<DynamicObject>::all_with(self.client.clone(), &ar);
        let mut events = std::pin::pin!(watcher::watcher(api, watcher::Config::default()).default_backoff());
        let mut relist: Option<BTreeMap<RolloutKey, Reported>> = None;
        let mut next: Option<Instant> = None;
        let mut watch_failing = false;
        loop {
            tokio::select! {
                event = events.next() => match event {
                    None => return,
                    Some(Ok(event)) => {
                        watch_failing = false;
                        match event {
                            Event::Apply(o) => self.observe(&o),
                            Event::Delete(o) => {
                                if let (Some(ns), Some(name)) = (o.metadata.namespace, o.metadata.name) {
                                    self.rollouts.remove(&(ns, name));
                                }
                            }
                            Event::Init => relist = Some(BTreeMap::new()),
                            Event::InitApply(o) => {
                                if let (Some(ns), Some(name)) = (o.metadata.namespace.clone(), o.metadata.name.clone()) {
                                    relist.get_or_insert_default().insert((ns, name), Reported::of(&o));
                                }
                            }
                            Event::InitDone => {
                                self.rollouts = relist.take().unwrap_or_default();
                                self.dirty = self.rollouts.keys().cloned().collect();
                            }
                        }
                    }
                    Some(Err(e)) => {
                        if !watch_failing {
                            warn!(error = %e, "watching StagedRollouts for their progress; retrying with backoff");
                        }
                        watch_failing = true;
                        continue;
                    }
                },
                r = nodes.changed() => {
                    if r.is_err() {
                        return;
                    }
                    self.dirty = self.rollouts.keys().cloned().collect();
                }
                () = async { if let Some(at) = next { tokio::time::sleep_until(at).await } else { std::future::pending().await } } => {}
            }
            let Some(node_set) = nodes.borrow().clone() else {
                continue;
            };
            let out = self.sync(&node_set, Instant::now()).await;
            for e in &out.failures {
                warn!(error = %e, source = %std::error::Error::source(e).map(ToString::to_string).unwrap_or_default(),
                      "rollout progress summary not written; retrying later");
            }
            next = out.next;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(phase: RolloutPhase, step: u32) -> NodeProgress {
        NodeProgress {
            phase,
            step,
            steps: 3,
            percent: 10,
            held_seconds: 5,
            failure_ratio: 0.0,
            new_flows: 10,
            resets: 0,
            message: None,
            updated_at: None,
        }
    }

    #[test]
    fn summary_rule() {
        use RolloutPhase::{Aborted, Completed, Halted, Paused, Progressing};
        assert_eq!(summarize([]), None, "no node reports it");
        let cases: &[(&[RolloutPhase], RolloutPhase)] = &[
            (&[Completed, Completed], Completed),
            (&[Completed, Progressing], Progressing),
            (&[Progressing, Paused, Completed], Paused),
            (&[Paused, Aborted, Progressing], Aborted),
            (&[Aborted, Halted, Paused, Completed], Halted),
        ];
        for (phases, want) in cases {
            let entries: Vec<(String, NodeProgress)> = phases
                .iter()
                .enumerate()
                .map(|(i, p)| (format!("n{i}"), entry(*p, 2)))
                .collect();
            let s = summarize(entries.iter().map(|(n, p)| (n.as_str(), p))).expect("summary");
            assert_eq!(s.phase, *want, "{phases:?}");
            assert_eq!(s.nodes as usize, phases.len());
        }
    }

    #[test]
    fn summary_counts_halted_nodes_names_the_first_and_takes_the_lowest_step() {
        let mut entries: Vec<(String, NodeProgress)> = (0..15)
            .map(|i| (format!("node-{i:02}"), entry(RolloutPhase::Halted, 2)))
            .collect();
        entries.push(("a-late".into(), entry(RolloutPhase::Progressing, 1)));
        entries.push((
            "z-ahead".into(),
            NodeProgress {
                steps: 4,
                ..entry(RolloutPhase::Progressing, 3)
            },
        ));
        let s = summarize(entries.iter().map(|(n, p)| (n.as_str(), p))).expect("summary");
        assert_eq!(s.phase, RolloutPhase::Halted);
        assert_eq!((s.step, s.steps), (1, 4));
        assert_eq!((s.nodes, s.nodes_halted), (17, 15));
        assert_eq!(s.halted_nodes.len(), HALTED_NODES_SHOWN);
        assert_eq!(s.halted_nodes[0], "node-00");
        assert_eq!(s.halted_nodes[9], "node-09");
    }

    /// A client of a port where nothing listens: every patch fails at once.
    fn unreachable_client() -> Client {
        let port = mesh_testkit::free_port();
        let url = format!("http://127.0.0.1:{port}").parse().expect("url");
        Client::try_from(kube::Config::new(url)).expect("client")
    }

    #[tokio::test]
    async fn writes_are_due_at_once_on_phase_or_step_changes_else_after_the_refresh() {
        let w = NodeProgressWriter::new(unreachable_client(), "n1");
        let mut w = w.with_refresh(Duration::from_secs(30));
        let key = ("shop".to_owned(), "r".to_owned());
        let t0 = Instant::now();
        let p = entry(RolloutPhase::Progressing, 1);
        assert_eq!(w.due(&key, &p, t0), Some(t0), "never written: at once");
        w.written.insert(
            key.clone(),
            Written {
                progress: p.clone(),
                at: t0,
            },
        );
        let later = t0 + Duration::from_secs(5);
        assert_eq!(w.due(&key, &p, later), None, "unchanged: nothing");
        let counters = NodeProgress {
            new_flows: 99,
            held_seconds: 9,
            ..p
        };
        assert_eq!(
            w.due(&key, &counters, later),
            Some(t0 + Duration::from_secs(30)),
            "counters: after the refresh"
        );
        let step = entry(RolloutPhase::Progressing, 2);
        assert_eq!(w.due(&key, &step, later), Some(later), "a step: at once");
        let halted = entry(RolloutPhase::Halted, 1);
        assert_eq!(w.due(&key, &halted, later), Some(later), "a phase: at once");
        w.failing.insert(
            key.clone(),
            Backoff {
                failures: 1,
                retry_at: later + RETRY_MIN,
            },
        );
        assert_eq!(
            w.due(&key, &halted, later),
            Some(later + RETRY_MIN),
            "a failed one waits for its backoff"
        );
    }

    #[tokio::test]
    async fn failed_patches_are_retried_after_a_growing_backoff() {
        let mut w = NodeProgressWriter::new(unreachable_client(), "n1");
        let key = ("shop".to_owned(), "r".to_owned());
        let current = NodeRollouts::from([(key, entry(RolloutPhase::Progressing, 1))]);
        let t0 = Instant::now();
        let out = w.sync(&current, t0).await;
        assert_eq!((out.patched, out.failures.len()), (0, 1));
        let text = out.failures[0].to_string();
        assert!(
            text.contains("status.nodes.n1")
                && text.contains("shop/r")
                && text.contains("stagedrollouts/status"),
            "{text}"
        );
        assert_eq!(out.next, Some(t0 + RETRY_MIN));
        let out = w.sync(&current, t0 + RETRY_MIN / 2).await;
        assert_eq!(
            (out.patched, out.failures.len(), out.next),
            (0, 0, Some(t0 + RETRY_MIN)),
            "not before the backoff"
        );
        let t1 = t0 + RETRY_MIN;
        let out = w.sync(&current, t1).await;
        assert_eq!(out.failures.len(), 1, "retried");
        assert_eq!(out.next, Some(t1 + RETRY_MIN * 2), "the backoff doubled");
    }

    #[test]
    fn backoff_doubles_up_to_the_max() {
        let now = Instant::now();
        let mut b = Backoff::after(None, now);
        assert_eq!(b.retry_at - now, RETRY_MIN);
        b = Backoff::after(Some(b), now);
        assert_eq!(b.retry_at - now, RETRY_MIN * 2);
        for _ in 0..40 {
            b = Backoff::after(Some(b), now);
        }
        assert_eq!(b.retry_at - now, RETRY_MAX);
    }

    #[test]
    fn reported_reads_entries_and_skips_unreadable_ones() {
        let o: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "fleetmesh.io/v1alpha1", "kind": "StagedRollout",
            "metadata": {"name": "r", "namespace": "shop"},
            "status": {"phase": "Valid", "nodes": {
                "n1": {"phase": "Halted", "step": 2, "steps": 3, "percent": 0, "heldSeconds": 4,
                       "failureRatio": 0.5, "newFlows": 10, "resets": 5, "message": "gate failed"},
                "n2": {"phase": "Sideways"}
            }}
        }))
        .expect("object");
        let r = Reported::of(&o);
        assert_eq!(r.nodes.len(), 2);
        assert_eq!(
            r.nodes["n1"].as_ref().map(|p| p.phase),
            Some(RolloutPhase::Halted)
        );
        assert!(r.nodes["n2"].is_none());
        assert!(r.progress.is_none());
    }
}
