//! A `StagedRollout`'s progress, for `kubectl get`, written where it costs the least watch traffic:
//!
//! - every agent (`--source kubernetes`) reports the rollouts it runs in its own node's `MeshNode` (cluster-scoped,
//!   named after the node, owned by its `Node` so that Kubernetes deletes it with the node): `status.rollouts`
//!   maps `<namespace>/<name>` to the node's entry ([`NodeProgress`]). [`NodeProgressWriter`] creates the object
//!   when it is missing and merge-patches its status: at once when a rollout appears or its phase or step
//!   changes, otherwise at most every [`REFRESH`] while something else changes (hold time served, counters), and
//!   not at all while nothing changes. A rollout the node no longer runs loses its entry (`null`);
//! - the clustermesh-apiserver (one writer per cluster) is the only one that watches `MeshNode`s. It summarizes
//!   the entries of the nodes that exist into each rollout's `status.progress` ([`RolloutProgress`], rule in
//!   [`summarize`]) with [`RolloutSummaries`]: only when the summary changes, and at most once per
//!   [`SUMMARY_INTERVAL`] (changes within it are written together, when it ends); a summary that turns `Halted`
//!   is written at once.
//!
//! Why not each node's entry in the `StagedRollout` itself: every agent watches `StagedRollout`s (its source), so
//! each node's patch there would be a watch event carrying the whole object (about 250 bytes per node) to every
//! agent: N patches × N watchers × N entries per step, hundreds of GB at 1,000 nodes. A `MeshNode` patch goes to
//! one watcher, and a step across N nodes becomes a handful of `StagedRollout` patches.
//!
//! Each writer merge-patches only its own keys (the validity fields of a `StagedRollout`'s status,
//! `observedGeneration`, `phase` and `message`, are [`crate::status`]'s), so they never clobber each other. A
//! failed write is retried with a backoff (from [`RETRY_MIN`] doubling to [`RETRY_MAX`]); the writers run as
//! their own tasks fed by watch channels and never hold up the agent's reconcile loop or the source.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::WatchStreamExt as _;
use kube::runtime::watcher::{self, Event};
use kube::{Client, Resource as _};
use serde::Deserialize as _;
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, info, instrument, warn};

use crate::crd::{
    MeshNode, MeshNodeSpec, MeshNodeStatus, NodeProgress, RolloutPhase, RolloutProgress, StagedRollout,
    StagedRolloutStatus,
};
use crate::lenient::Lenient;
use crate::status::{StatusError, StatusKind};

/// How often at most an agent rewrites a rollout's entry when neither its phase nor its step changed.
pub const REFRESH: Duration = Duration::from_secs(30);
/// How often at most the clustermesh-apiserver rewrites a rollout's summary (except when it turns `Halted`), and
/// how long it gathers changes before writing them.
pub const SUMMARY_INTERVAL: Duration = Duration::from_secs(5);
/// First retry of a failed write.
pub const RETRY_MIN: Duration = Duration::from_secs(1);
/// Longest wait between retries of a failed write.
pub const RETRY_MAX: Duration = Duration::from_secs(60);
/// How many halted nodes the summary names (`nodesHalted` counts them all).
pub const HALTED_NODES_SHOWN: usize = 10;

/// A rollout: (namespace, name).
pub type RolloutKey = (String, String);
/// What a node reports of the rollouts it runs (`updatedAt` is left to the writer).
pub type NodeRollouts = BTreeMap<RolloutKey, NodeProgress>;

/// The key of a rollout's entry in a `MeshNode`'s `status.rollouts`: `<namespace>/<name>`.
#[must_use]
pub fn entry_key(rollout: &RolloutKey) -> String {
    format!("{}/{}", rollout.0, rollout.1)
}

/// The rollout an entry key names (`None` unless `<namespace>/<name>`, both non-empty).
#[must_use]
pub fn parse_entry_key(key: &str) -> Option<RolloutKey> {
    let (ns, name) = key.split_once('/')?;
    (!ns.is_empty() && !name.is_empty() && !name.contains('/')).then(|| (ns.to_owned(), name.to_owned()))
}

/// The entries of a `MeshNode`'s `status.rollouts` by key; `None` for one that does not read as a
/// [`NodeProgress`] (left out of summaries), `updatedAt` dropped. Read entry by entry (the status as a
/// `MeshNodeStatus<Value>`): one that does not read hides no other.
fn stored_entries(object: &Lenient<MeshNode>) -> BTreeMap<String, Option<NodeProgress>> {
    let Some(status) = object.status::<MeshNodeStatus<Value>>() else {
        return BTreeMap::new();
    };
    status
        .rollouts
        .into_iter()
        .filter(|(_, v)| !v.is_null())
        .map(|(k, v)| {
            let entry = NodeProgress::deserialize(v).ok().map(|mut p| {
                p.updated_at = None;
                p
            });
            (k, entry)
        })
        .collect()
}

/// A node's report that could not be written.
#[derive(Debug, thiserror::Error)]
pub enum NodeProgressError {
    #[error(
        "cannot read Node {node}, the owner of its MeshNode (is --node-name the Kubernetes node's name, and does \
         the agent's role grant `get` on `nodes`?)"
    )]
    Node {
        node: String,
        #[source]
        source: kube::Error,
    },
    #[error("Node {node} has no metadata.uid to own its MeshNode")]
    NoUid { node: String },
    #[error(
        "cannot read or create MeshNode {node} (does the agent's role grant `get` and `create` on `meshnodes`?)"
    )]
    MeshNode {
        node: String,
        #[source]
        source: kube::Error,
    },
    #[error(
        "cannot write status.rollouts of MeshNode {node} (does the agent's role grant `patch` on \
         `meshnodes/status`?)"
    )]
    Patch {
        node: String,
        #[source]
        source: kube::Error,
    },
}

const RETRY: backon::ExponentialBuilder = backon::ExponentialBuilder::new()
    .with_min_delay(RETRY_MIN)
    .with_max_delay(RETRY_MAX)
    .without_max_times();

/// Retries of failed writes.
#[derive(Debug)]
struct Backoff {
    delays: backon::ExponentialBackoff,
    retry_at: Instant,
}

impl Backoff {
    /// The retry after one more failure (the first when `previous` is `None`).
    fn after(previous: Option<Backoff>, now: Instant) -> Self {
        use backon::BackoffBuilder as _;
        let mut delays = previous.map_or_else(|| RETRY.build(), |b| b.delays);
        let wait = delays.next().unwrap_or(RETRY_MAX);
        Self {
            delays,
            retry_at: now + wait,
        }
    }
}

fn is_not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 404)
}

fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
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

fn earliest(a: Option<Instant>, b: Instant) -> Option<Instant> {
    Some(a.map_or(b, |a| a.min(b)))
}

/// What one writer got done in one pass.
#[derive(Debug)]
pub struct Synced<E> {
    /// Patches sent and accepted.
    pub patched: usize,
    /// Writes that failed (retried after a backoff).
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

/// What the writer last wrote (or found) of one entry; `progress` is `None` for an entry it found unreadable.
#[derive(Debug, Clone)]
struct Written {
    progress: Option<NodeProgress>,
    at: Instant,
}

/// An agent's writer of its node's `MeshNode`, see the module documentation.
pub struct NodeProgressWriter {
    client: Client,
    node: String,
    refresh: Duration,
    /// Whether the `MeshNode` exists (created or found, and `written` read from it).
    ready: bool,
    /// By entry key (`<namespace>/<name>`).
    written: HashMap<String, Written>,
    failing: Option<Backoff>,
}

impl std::fmt::Debug for NodeProgressWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeProgressWriter")
            .field("node", &self.node)
            .field("refresh", &self.refresh)
            .field("ready", &self.ready)
            .field("written", &self.written.len())
            .field("failing", &self.failing)
            .finish_non_exhaustive()
    }
}

/// A patch that failed; `gone` when the `MeshNode` no longer exists (it is created again).
struct PatchFailure {
    gone: bool,
    error: NodeProgressError,
}

impl NodeProgressWriter {
    #[must_use]
    pub fn new(client: Client, node: impl Into<String>) -> Self {
        Self {
            client,
            node: node.into(),
            refresh: REFRESH,
            ready: false,
            written: HashMap::new(),
            failing: None,
        }
    }

    /// Another bound than [`REFRESH`] for rewrites without a phase or step change (tests).
    #[must_use]
    pub fn with_refresh(mut self, refresh: Duration) -> Self {
        self.refresh = refresh;
        self
    }

    /// When the entry `key` is due to become `progress` (`None`: nothing to write; `now`: at once).
    fn due(&self, key: &str, progress: &NodeProgress, now: Instant) -> Option<Instant> {
        match self.written.get(key) {
            None => Some(now),
            Some(w) => match &w.progress {
                Some(p) if p == progress => None,
                Some(p) if p.phase == progress.phase && p.step == progress.step => Some(w.at + self.refresh),
                _ => Some(now),
            },
        }
    }

    /// Makes sure the `MeshNode` exists: reads what it holds (so that a restarted agent neither rewrites what is
    /// there nor leaves entries of rollouts it no longer runs), or creates it owned by the `Node`.
    #[instrument(skip_all, fields(node = %self.node))]
    async fn ensure(&mut self, now: Instant) -> Result<(), NodeProgressError> {
        let api = Api::<Lenient<MeshNode>>::all(self.client.clone());
        let mesh_node_error = |source| NodeProgressError::MeshNode {
            node: self.node.clone(),
            source,
        };
        // Not `get_opt`: it looks for the reason `NotFound`, the code is what every server sends.
        let existing = match api.get(&self.node).await {
            Ok(o) => o,
            Err(e) if !is_not_found(&e) => return Err(mesh_node_error(e)),
            Err(_) => {
                let owner = Api::<Node>::all(self.client.clone())
                    .get(&self.node)
                    .await
                    .map_err(|source| NodeProgressError::Node {
                        node: self.node.clone(),
                        source,
                    })?;
                let uid = owner.metadata.uid.ok_or_else(|| NodeProgressError::NoUid {
                    node: self.node.clone(),
                })?;
                let mut object = MeshNode::new(&self.node, MeshNodeSpec {});
                object.metadata = ObjectMeta {
                    name: Some(self.node.clone()),
                    owner_references: Some(vec![OwnerReference {
                        api_version: Node::api_version(&()).into_owned(),
                        kind: Node::kind(&()).into_owned(),
                        name: self.node.clone(),
                        uid,
                        ..OwnerReference::default()
                    }]),
                    ..ObjectMeta::default()
                };
                let typed = Api::<MeshNode>::all(self.client.clone());
                match typed.create(&PostParams::default(), &object).await {
                    Ok(_) => {
                        info!("MeshNode created");
                        self.written.clear();
                        self.ready = true;
                        return Ok(());
                    }
                    // Created meanwhile (another agent process of this node): read it.
                    Err(e) if is_conflict(&e) => api.get(&self.node).await.map_err(mesh_node_error)?,
                    Err(e) => return Err(mesh_node_error(e)),
                }
            }
        };
        self.written = stored_entries(&existing)
            .into_iter()
            .map(|(k, progress)| (k, Written { progress, at: now }))
            .collect();
        self.ready = true;
        Ok(())
    }

    /// Writes what is due in one patch of the `MeshNode`'s status (created first when missing): new rollouts,
    /// phase or step changes and removals (a rollout no longer in `current`) at once, other changes once
    /// [`REFRESH`] has passed since the entry was last written. A patch carries every entry that changed. After
    /// a failure nothing is tried before its backoff.
    #[instrument(skip_all, fields(node = %self.node, rollouts = current.len()))]
    pub async fn sync(&mut self, current: &NodeRollouts, now: Instant) -> Synced<NodeProgressError> {
        let mut out = Synced::default();
        if let Some(b) = &self.failing
            && b.retry_at > now
        {
            out.next = Some(b.retry_at);
            return out;
        }
        let current: BTreeMap<String, NodeProgress> = current
            .iter()
            .map(|(k, p)| {
                let mut p = p.clone();
                p.updated_at = None;
                (entry_key(k), p)
            })
            .collect();
        // A second round when the MeshNode turned out to be gone: created again, with every entry.
        for _ in 0..2 {
            if !self.ready
                && let Err(e) = self.ensure(now).await
            {
                self.fail(e, now, &mut out);
                return out;
            }
            let mut due: Option<Instant> = None;
            let mut changes: BTreeMap<String, Option<NodeProgress>> = BTreeMap::new();
            for (key, progress) in &current {
                if let Some(at) = self.due(key, progress, now) {
                    due = earliest(due, at);
                    changes.insert(key.clone(), Some(progress.clone()));
                }
            }
            for key in self.written.keys().filter(|k| !current.contains_key(*k)) {
                due = Some(now);
                changes.insert(key.clone(), None);
            }
            match due {
                None => return out,
                Some(at) if at > now => {
                    out.next = Some(at);
                    return out;
                }
                Some(_) => {}
            }
            match self.patch(&changes).await {
                Ok(()) => {
                    debug!(entries = changes.len(), "node progress written");
                    self.failing = None;
                    for (key, progress) in changes {
                        match progress {
                            Some(p) => {
                                self.written.insert(
                                    key,
                                    Written {
                                        progress: Some(p),
                                        at: now,
                                    },
                                );
                            }
                            None => {
                                self.written.remove(&key);
                            }
                        }
                    }
                    out.patched += 1;
                    return out;
                }
                Err(PatchFailure { gone: true, .. }) if self.ready => {
                    warn!("MeshNode gone; creating it again");
                    self.ready = false;
                    self.written.clear();
                }
                Err(PatchFailure { error, .. }) => {
                    self.fail(error, now, &mut out);
                    return out;
                }
            }
        }
        out
    }

    fn fail(&mut self, e: NodeProgressError, now: Instant, out: &mut Synced<NodeProgressError>) {
        let b = Backoff::after(self.failing.take(), now);
        out.next = Some(b.retry_at);
        self.failing = Some(b);
        out.failures.push(e);
    }

    /// A merge patch of `status.rollouts` only: each changed entry (every field, `null` for the absent ones), or
    /// `null` to remove it.
    async fn patch(&self, changes: &BTreeMap<String, Option<NodeProgress>>) -> Result<(), PatchFailure> {
        let updated_at = now_rfc3339();
        let rollouts: serde_json::Map<String, Value> = changes
            .iter()
            .map(|(k, p)| {
                let entry = p.as_ref().map_or(Value::Null, |p| {
                    let mut p = p.clone();
                    p.updated_at = Some(updated_at.clone());
                    with_nulls(serde_json::to_value(&p).unwrap_or(Value::Null), &["message"])
                });
                (k.clone(), entry)
            })
            .collect();
        let body = json!({"status": {"rollouts": rollouts}});
        let api = Api::<Lenient<MeshNode>>::all(self.client.clone());
        api.patch_status(&self.node, &PatchParams::default(), &Patch::Merge(&body))
            .await
            .map(|_| ())
            .map_err(|source| PatchFailure {
                gone: is_not_found(&source),
                error: NodeProgressError::Patch {
                    node: self.node.clone(),
                    source,
                },
            })
    }

    /// Creates the `MeshNode` at once, then writes after every change of `rollouts` and whenever something is
    /// due, until the sender is gone. Failures are logged and retried, never returned.
    #[instrument(skip_all, fields(node = %self.node))]
    pub async fn run(mut self, mut rollouts: watch::Receiver<NodeRollouts>) {
        let mut first = true;
        let mut next: Option<Instant> = None;
        loop {
            if !std::mem::take(&mut first) {
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

/// A rollout's summary waiting to be written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Pending {
    /// The first change not yet written: the summary is written [`SUMMARY_INTERVAL`] after it.
    since: Instant,
    /// A node's entry turned `Halted`: if the summary turns `Halted` it is written at once.
    halting: bool,
}

/// The clustermesh-apiserver's writer of `status.progress`, see the module documentation.
pub struct RolloutSummaries {
    client: Client,
    interval: Duration,
    /// Every `StagedRollout` and the summary its status carries (`None`: none, or not readable).
    carried: BTreeMap<RolloutKey, Option<RolloutProgress>>,
    /// Each `MeshNode`'s entries (by node name), as last seen.
    reports: BTreeMap<String, BTreeMap<RolloutKey, Option<NodeProgress>>>,
    /// The same entries by rollout, then node name.
    entries: BTreeMap<RolloutKey, BTreeMap<String, Option<NodeProgress>>>,
    pending: BTreeMap<RolloutKey, Pending>,
    failing: HashMap<RolloutKey, Backoff>,
}

impl std::fmt::Debug for RolloutSummaries {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RolloutSummaries")
            .field("interval", &self.interval)
            .field("rollouts", &self.carried.len())
            .field("reports", &self.reports.len())
            .field("pending", &self.pending)
            .field("failing", &self.failing.len())
            .finish_non_exhaustive()
    }
}

impl RolloutSummaries {
    #[must_use]
    pub fn new(client: Client) -> Self {
        Self {
            client,
            interval: SUMMARY_INTERVAL,
            carried: BTreeMap::new(),
            reports: BTreeMap::new(),
            entries: BTreeMap::new(),
            pending: BTreeMap::new(),
            failing: HashMap::new(),
        }
    }

    /// Another interval than [`SUMMARY_INTERVAL`] (tests).
    #[must_use]
    pub fn with_interval(mut self, interval: Duration) -> Self {
        self.interval = interval;
        self
    }

    fn mark(&mut self, key: &RolloutKey, now: Instant, halting: bool) {
        let p = self.pending.entry(key.clone()).or_insert(Pending {
            since: now,
            halting: false,
        });
        p.halting |= halting;
    }

    /// A `MeshNode`'s entries (by entry key; unreadable ones `None`) as they are now; an empty map when it is gone.
    /// Marks the rollouts whose entry of this node changed.
    fn report(&mut self, node: &str, entries: BTreeMap<String, Option<NodeProgress>>, now: Instant) {
        let new: BTreeMap<RolloutKey, Option<NodeProgress>> = entries
            .into_iter()
            .filter_map(|(k, p)| Some((parse_entry_key(&k)?, p)))
            .collect();
        let old = if new.is_empty() {
            self.reports.remove(node).unwrap_or_default()
        } else {
            self.reports
                .insert(node.to_owned(), new.clone())
                .unwrap_or_default()
        };
        let keys: BTreeSet<&RolloutKey> = old.keys().chain(new.keys()).collect();
        for key in keys {
            let (before, after) = (old.get(key), new.get(key));
            if before == after {
                continue;
            }
            let is_halted = |p: Option<&Option<NodeProgress>>| {
                p.and_then(Option::as_ref)
                    .is_some_and(|p| p.phase == RolloutPhase::Halted)
            };
            let halting = is_halted(after) && !is_halted(before);
            match after {
                Some(p) => {
                    self.entries
                        .entry(key.clone())
                        .or_default()
                        .insert(node.to_owned(), p.clone());
                }
                None => {
                    if let Some(m) = self.entries.get_mut(key) {
                        m.remove(node);
                        if m.is_empty() {
                            self.entries.remove(key);
                        }
                    }
                }
            }
            self.mark(key, now, halting);
        }
    }

    /// Every `MeshNode` as a relist found them: the ones not among them are gone.
    fn relist_reports(
        &mut self,
        all: BTreeMap<String, BTreeMap<String, Option<NodeProgress>>>,
        now: Instant,
    ) {
        let gone: Vec<String> = self
            .reports
            .keys()
            .filter(|n| !all.contains_key(*n))
            .cloned()
            .collect();
        for node in gone {
            self.report(&node, BTreeMap::new(), now);
        }
        for (node, entries) in all {
            self.report(&node, entries, now);
        }
    }

    /// A `StagedRollout` and the summary it carries.
    fn rollout(&mut self, key: RolloutKey, progress: Option<RolloutProgress>, now: Instant) {
        if self.carried.get(&key) != Some(&progress) {
            self.mark(&key, now, false);
            self.carried.insert(key, progress);
        }
    }

    fn rollout_gone(&mut self, key: &RolloutKey) {
        self.carried.remove(key);
        self.pending.remove(key);
        self.failing.remove(key);
    }

    /// Every `StagedRollout` as a relist found them.
    fn relist_rollouts(&mut self, all: BTreeMap<RolloutKey, Option<RolloutProgress>>, now: Instant) {
        let gone: Vec<RolloutKey> = self
            .carried
            .keys()
            .filter(|k| !all.contains_key(*k))
            .cloned()
            .collect();
        for key in &gone {
            self.rollout_gone(key);
        }
        for (key, progress) in all {
            self.rollout(key, progress, now);
        }
    }

    /// The set of nodes changed: every summary may change.
    fn nodes_changed(&mut self, now: Instant) {
        let keys: Vec<RolloutKey> = self.carried.keys().cloned().collect();
        for key in &keys {
            self.mark(key, now, false);
        }
    }

    /// The summary of `key` over the entries of the nodes in `nodes`.
    fn summary(&self, key: &RolloutKey, nodes: &BTreeSet<String>) -> Option<RolloutProgress> {
        summarize(
            self.entries
                .get(key)
                .into_iter()
                .flatten()
                .filter(|(n, _)| nodes.contains(*n))
                .filter_map(|(n, p)| Some((n.as_str(), p.as_ref()?))),
        )
    }

    /// Writes the summaries that are due and differ from what the rollouts carry: [`SUMMARY_INTERVAL`] after the
    /// first change not yet written, at once when it turns `Halted`; a rollout whose last patch failed waits for
    /// its backoff. Only the nodes in `nodes` count.
    #[instrument(skip_all, fields(rollouts = self.carried.len(), pending = self.pending.len(), nodes = nodes.len()))]
    pub async fn sync(&mut self, nodes: &BTreeSet<String>, now: Instant) -> Synced<StatusError> {
        let mut out = Synced::default();
        let keys: Vec<RolloutKey> = self.pending.keys().cloned().collect();
        for key in keys {
            let Some(p) = self.pending.get(&key).copied() else {
                continue;
            };
            let Some(carried) = self.carried.get(&key) else {
                // No such StagedRollout (yet): marked again when it appears.
                self.pending.remove(&key);
                continue;
            };
            let window_end = p.since + self.interval;
            let retry_at = self.failing.get(&key).map(|b| b.retry_at);
            if !p.halting && window_end.max(retry_at.unwrap_or(window_end)) > now {
                out.next = earliest(out.next, window_end.max(retry_at.unwrap_or(window_end)));
                continue;
            }
            let summary = self.summary(&key, nodes);
            if summary == *carried {
                self.pending.remove(&key);
                self.failing.remove(&key);
                continue;
            }
            let halts = summary.as_ref().is_some_and(|s| s.phase == RolloutPhase::Halted)
                && carried.as_ref().is_none_or(|c| c.phase != RolloutPhase::Halted);
            let due = if halts { now } else { window_end }.max(retry_at.unwrap_or(now));
            if due > now {
                if let Some(p) = self.pending.get_mut(&key) {
                    p.halting = false;
                }
                out.next = earliest(out.next, due);
                continue;
            }
            match self.patch(&key, summary.as_ref()).await {
                Ok(()) => {
                    debug!(rollout = %entry_key(&key), phase = ?summary.as_ref().map(|s| s.phase), "rollout progress summarized");
                    self.pending.remove(&key);
                    self.failing.remove(&key);
                    self.carried.insert(key, summary);
                    out.patched += 1;
                }
                Err(e) => {
                    let b = Backoff::after(self.failing.remove(&key), now);
                    out.next = earliest(out.next, b.retry_at);
                    self.failing.insert(key, b);
                    out.failures.push(e);
                }
            }
        }
        out
    }

    /// A merge patch of `status.progress` only (every field, `null` for the absent ones; `null` without entries).
    async fn patch(&self, key: &RolloutKey, summary: Option<&RolloutProgress>) -> Result<(), StatusError> {
        let progress = summary.map_or(Value::Null, |s| {
            with_nulls(serde_json::to_value(s).unwrap_or(Value::Null), &["haltedNodes"])
        });
        let body = json!({"status": {"progress": progress}});
        let api = Api::<Lenient<StagedRollout>>::namespaced(self.client.clone(), &key.0);
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

    /// Watches every `MeshNode` (the agents' reports) and every `StagedRollout` (the summary it carries), and
    /// summarizes after every change of them and of the node set, and when a summary is due. Nothing is written
    /// before both are listed and the source has listed the nodes (`None` until then). Runs until the node set's
    /// sender is gone; failures are logged and retried, never returned.
    #[instrument(skip_all)]
    pub async fn run(mut self, mut nodes: watch::Receiver<Option<BTreeSet<String>>>) {
        let rollouts_api = Api::<Lenient<StagedRollout>>::all(self.client.clone());
        let reports_api = Api::<Lenient<MeshNode>>::all(self.client.clone());
        let mut rollout_events =
            std::pin::pin!(watcher::watcher(rollouts_api, watcher::Config::default()).default_backoff());
        let mut report_events =
            std::pin::pin!(watcher::watcher(reports_api, watcher::Config::default()).default_backoff());
        let mut rollouts_relist: Option<BTreeMap<RolloutKey, Option<RolloutProgress>>> = None;
        let mut reports_relist: Option<BTreeMap<String, BTreeMap<String, Option<NodeProgress>>>> = None;
        let (mut rollouts_listed, mut reports_listed) = (false, false);
        let (mut rollouts_failing, mut reports_failing) = (false, false);
        let mut next: Option<Instant> = None;
        loop {
            tokio::select! {
                event = rollout_events.next() => match event {
                    None => return,
                    Some(Ok(event)) => {
                        rollouts_failing = false;
                        let now = Instant::now();
                        match event {
                            Event::Apply(o) => {
                                if let Some(key) = rollout_key(&o) {
                                    self.rollout(key, carried_progress(&o), now);
                                }
                            }
                            Event::Delete(o) => {
                                if let Some(key) = rollout_key(&o) {
                                    self.rollout_gone(&key);
                                }
                            }
                            Event::Init => rollouts_relist = Some(BTreeMap::new()),
                            Event::InitApply(o) => {
                                if let Some(key) = rollout_key(&o) {
                                    rollouts_relist.get_or_insert_default().insert(key, carried_progress(&o));
                                }
                            }
                            Event::InitDone => {
                                self.relist_rollouts(rollouts_relist.take().unwrap_or_default(), now);
                                rollouts_listed = true;
                            }
                        }
                    }
                    Some(Err(e)) => {
                        if !rollouts_failing {
                            warn!(error = %e, "watching StagedRollouts for their progress; retrying with backoff");
                        }
                        rollouts_failing = true;
                        continue;
                    }
                },
                event = report_events.next() => match event {
                    None => return,
                    Some(Ok(event)) => {
                        reports_failing = false;
                        let now = Instant::now();
                        match event {
                            Event::Apply(o) => {
                                if let Some(name) = o.metadata.name.clone() {
                                    self.report(&name, stored_entries(&o), now);
                                }
                            }
                            Event::Delete(o) => {
                                if let Some(name) = o.metadata.name.clone() {
                                    self.report(&name, BTreeMap::new(), now);
                                }
                            }
                            Event::Init => reports_relist = Some(BTreeMap::new()),
                            Event::InitApply(o) => {
                                if let Some(name) = o.metadata.name.clone() {
                                    reports_relist.get_or_insert_default().insert(name, stored_entries(&o));
                                }
                            }
                            Event::InitDone => {
                                self.relist_reports(reports_relist.take().unwrap_or_default(), now);
                                reports_listed = true;
                            }
                        }
                    }
                    Some(Err(e)) => {
                        if !reports_failing {
                            warn!(error = %e, "watching MeshNodes for the nodes' rollout progress; retrying with backoff");
                        }
                        reports_failing = true;
                        continue;
                    }
                },
                r = nodes.changed() => {
                    if r.is_err() {
                        return;
                    }
                    self.nodes_changed(Instant::now());
                }
                () = async { if let Some(at) = next { tokio::time::sleep_until(at).await } else { std::future::pending().await } } => {}
            }
            if !(rollouts_listed && reports_listed) {
                continue;
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

fn rollout_key(o: &Lenient<StagedRollout>) -> Option<RolloutKey> {
    Some((o.metadata.namespace.clone()?, o.metadata.name.clone()?))
}

/// The summary a `StagedRollout`'s status carries (`None`: none, or not readable). Only the status is read: a
/// rollout whose spec is refused keeps its summary.
fn carried_progress(o: &Lenient<StagedRollout>) -> Option<RolloutProgress> {
    o.status::<StagedRolloutStatus>()?.progress
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
        let key = "shop/r";
        let t0 = Instant::now();
        let p = entry(RolloutPhase::Progressing, 1);
        assert_eq!(w.due(key, &p, t0), Some(t0), "never written: at once");
        w.written.insert(
            key.to_owned(),
            Written {
                progress: Some(p.clone()),
                at: t0,
            },
        );
        let later = t0 + Duration::from_secs(5);
        assert_eq!(w.due(key, &p, later), None, "unchanged: nothing");
        let counters = NodeProgress {
            new_flows: 99,
            held_seconds: 9,
            ..p.clone()
        };
        assert_eq!(
            w.due(key, &counters, later),
            Some(t0 + Duration::from_secs(30)),
            "counters: after the refresh"
        );
        let step = entry(RolloutPhase::Progressing, 2);
        assert_eq!(w.due(key, &step, later), Some(later), "a step: at once");
        let halted = entry(RolloutPhase::Halted, 1);
        assert_eq!(w.due(key, &halted, later), Some(later), "a phase: at once");
        w.written.insert(
            key.to_owned(),
            Written {
                progress: None,
                at: t0,
            },
        );
        assert_eq!(w.due(key, &p, later), Some(later), "found unreadable: at once");
    }

    #[tokio::test]
    async fn failed_writes_are_retried_after_a_growing_backoff() {
        let mut w = NodeProgressWriter::new(unreachable_client(), "n1");
        let key = ("shop".to_owned(), "r".to_owned());
        let current = NodeRollouts::from([(key, entry(RolloutPhase::Progressing, 1))]);
        let t0 = Instant::now();
        let out = w.sync(&current, t0).await;
        assert_eq!((out.patched, out.failures.len()), (0, 1));
        let text = out.failures[0].to_string();
        assert!(
            text.contains("MeshNode n1") && text.contains("`meshnodes`"),
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
        let mut waits = vec![(b.retry_at - now).as_secs()];
        for _ in 0..40 {
            b = Backoff::after(Some(b), now);
            waits.push((b.retry_at - now).as_secs());
        }
        assert_eq!(waits[..8], [1, 2, 4, 8, 16, 32, 60, 60]);
        assert_eq!(b.retry_at - now, RETRY_MAX);
    }

    #[test]
    fn entry_keys_name_namespace_and_rollout() {
        let key = ("shop".to_owned(), "api-v2".to_owned());
        assert_eq!(entry_key(&key), "shop/api-v2");
        assert_eq!(parse_entry_key("shop/api-v2"), Some(key));
        for bad in ["shop", "/r", "shop/", "a/b/c", ""] {
            assert_eq!(parse_entry_key(bad), None, "{bad}");
        }
    }

    #[test]
    fn stored_entries_are_read_and_unreadable_ones_kept_as_such() {
        let o: Lenient<MeshNode> = serde_json::from_value(json!({
            "apiVersion": "fleetmesh.io/v1alpha1", "kind": "MeshNode",
            "metadata": {"name": "n1"},
            "status": {"rollouts": {
                "shop/r": {"phase": "Halted", "step": 2, "steps": 3, "percent": 0, "heldSeconds": 4,
                           "failureRatio": 0.5, "newFlows": 10, "resets": 5, "message": "gate failed",
                           "updatedAt": "2026-01-01T00:00:00Z"},
                "shop/odd": {"phase": "Sideways"},
                "shop/gone": null
            }}
        }))
        .expect("object");
        let e = stored_entries(&o);
        assert_eq!(e.len(), 2, "{e:?}");
        let r = e["shop/r"].as_ref().expect("readable");
        assert_eq!((r.phase, r.updated_at.as_deref()), (RolloutPhase::Halted, None));
        assert!(e["shop/odd"].is_none());
    }

    fn entries(list: &[(&str, Option<NodeProgress>)]) -> BTreeMap<String, Option<NodeProgress>> {
        list.iter().map(|(k, p)| ((*k).to_owned(), p.clone())).collect()
    }

    fn nodes(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|n| (*n).to_owned()).collect()
    }

    /// A node's report marks only the rollouts whose entry of that node changed; a summary is due an interval
    /// after the first change, except when it turns `Halted`.
    #[tokio::test]
    async fn summaries_are_due_after_the_interval_or_at_once_when_halting() {
        let interval = Duration::from_secs(5);
        let mut s = RolloutSummaries::new(unreachable_client()).with_interval(interval);
        let (a, b) = (
            ("shop".to_owned(), "a".to_owned()),
            ("shop".to_owned(), "b".to_owned()),
        );
        let t0 = Instant::now();
        s.relist_rollouts(BTreeMap::from([(a.clone(), None), (b.clone(), None)]), t0);
        s.pending.clear();
        let all = nodes(&["n1", "n2"]);
        s.report(
            "n1",
            entries(&[("shop/a", Some(entry(RolloutPhase::Progressing, 1)))]),
            t0,
        );
        assert_eq!(
            s.pending.keys().collect::<Vec<_>>(),
            [&a],
            "only a's entry changed"
        );
        let t1 = t0 + Duration::from_secs(2);
        s.report(
            "n2",
            entries(&[("shop/a", Some(entry(RolloutPhase::Progressing, 2)))]),
            t1,
        );
        let out = s.sync(&all, t1).await;
        assert_eq!(
            (out.patched, out.failures.len(), out.next),
            (0, 0, Some(t0 + interval)),
            "gathered until the interval after the first change"
        );
        let out = s.sync(&all, t0 + interval).await;
        assert_eq!(out.failures.len(), 1, "tried at the end of the interval");
        assert_eq!(s.summary(&a, &all).map(|p| (p.step, p.nodes)), Some((1, 2)));

        // b: a node halts, the summary turns Halted: at once.
        s.report(
            "n1",
            entries(&[("shop/b", Some(entry(RolloutPhase::Halted, 1)))]),
            t1,
        );
        let out = s.sync(&nodes(&["n1"]), t1).await;
        assert!(
            out.failures.iter().any(|e| e.to_string().contains("shop/b")),
            "b at once: {:?}",
            out.failures
        );
        // A halted node that no longer exists does not count: the summary waits for the interval.
        let mut s = RolloutSummaries::new(unreachable_client()).with_interval(interval);
        s.relist_rollouts(BTreeMap::from([(b.clone(), None)]), t0);
        s.pending.clear();
        s.report(
            "n9",
            entries(&[("shop/b", Some(entry(RolloutPhase::Halted, 1)))]),
            t0,
        );
        s.report(
            "n1",
            entries(&[("shop/b", Some(entry(RolloutPhase::Progressing, 1)))]),
            t0,
        );
        let out = s.sync(&nodes(&["n1"]), t0).await;
        assert_eq!((out.failures.len(), out.next), (0, Some(t0 + interval)));
        assert_eq!(
            s.summary(&b, &nodes(&["n1"])).map(|p| (p.phase, p.nodes)),
            Some((RolloutPhase::Progressing, 1))
        );
        // Entries of a rollout that does not exist are not written.
        s.report(
            "n1",
            entries(&[("other/x", Some(entry(RolloutPhase::Halted, 1)))]),
            t0,
        );
        let out = s.sync(&nodes(&["n1"]), t0 + interval).await;
        assert!(
            out.failures.iter().all(|e| !e.to_string().contains("other/x")),
            "{:?}",
            out.failures
        );
        assert!(!s.pending.contains_key(&("other".to_owned(), "x".to_owned())));
    }

    /// A summary equal to what the rollout carries is not written; a MeshNode gone takes its entries along.
    #[tokio::test]
    async fn unchanged_summaries_are_not_written_and_gone_reports_drop_out() {
        let mut s = RolloutSummaries::new(unreachable_client()).with_interval(Duration::ZERO);
        let a = ("shop".to_owned(), "a".to_owned());
        let t0 = Instant::now();
        let all = nodes(&["n1", "n2"]);
        s.report(
            "n1",
            entries(&[("shop/a", Some(entry(RolloutPhase::Progressing, 1)))]),
            t0,
        );
        let carried = s.summary(&a, &all);
        s.relist_rollouts(BTreeMap::from([(a.clone(), carried)]), t0);
        let out = s.sync(&all, t0).await;
        assert_eq!((out.patched, out.failures.len(), out.next), (0, 0, None));
        assert!(s.pending.is_empty());
        s.relist_reports(BTreeMap::new(), t0);
        assert!(s.entries.is_empty() && s.reports.is_empty());
        assert_eq!(s.summary(&a, &all), None);
        let out = s.sync(&all, t0).await;
        assert_eq!(
            out.failures.len(),
            1,
            "the summary goes: written (and failed here)"
        );
    }
}
