//! `meshctl status --context CTX`: one cluster's agents, the remote clusters as they see them (state, last answer,
//! entry counts) and their errors, summarised from every agent's `GET /v1/summary`.
//!
//! The agents serve that read-only endpoint on their status port (the chart's `agent.statusPort`, the container
//! port named `status` of the agent DaemonSet); meshctl reaches each agent pod through the API server's pod proxy
//! (`GET /api/v1/namespaces/NS/pods/POD:PORT/proxy/v1/summary`, RBAC `get` on `pods/proxy`), at most
//! [`CONCURRENCY`] at a time, each bounded by [`AGENT_TIMEOUT`]. An agent that does not answer is listed with the
//! reason, never fatal.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Result, bail};
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::Pod;
use kube::api::ListParams;
use serde::{Deserialize, Serialize};

use crate::clustermesh::PeerInfo;
use crate::kubemesh::{Cluster, table};

/// Name of the agent container's port that serves `/v1/summary`.
pub const STATUS_PORT_NAME: &str = "status";
/// The agent container of the DaemonSet.
pub const AGENT_CONTAINER: &str = "mesh-agent";
/// Agents asked at the same time.
pub const CONCURRENCY: usize = 16;
/// How long one agent may take to answer.
pub const AGENT_TIMEOUT: Duration = Duration::from_secs(5);

/// What an agent's `GET /v1/summary` says (the fields meshctl uses).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentSummary {
    #[serde(default)]
    pub node: String,
    #[serde(default)]
    pub ready: bool,
    /// The agent's clock when it answered (ages are computed against it, not against meshctl's clock).
    #[serde(default)]
    pub now_ms: u64,
    #[serde(default)]
    pub clusters: Vec<RemoteBrief>,
    #[serde(default)]
    pub errors: usize,
    #[serde(default)]
    pub error_messages: Vec<String>,
}

/// One remote cluster as one agent sees it.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RemoteBrief {
    pub name: String,
    #[serde(default)]
    pub own: bool,
    #[serde(default)]
    pub state: RemoteState,
    #[serde(default = "yes")]
    pub usable: bool,
    #[serde(default)]
    pub nodes: u64,
    #[serde(default)]
    pub services: u64,
    #[serde(default)]
    pub identities: u64,
    #[serde(default)]
    pub ips: u64,
    #[serde(default)]
    pub decode_errors: u64,
    #[serde(default)]
    pub last_alive_ms: Option<u64>,
}

fn yes() -> bool {
    true
}

/// `{"state": "synced", "since_ms": N, "reason": "..."}` as the agent writes it.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct RemoteState {
    #[serde(default)]
    pub state: String,
    #[serde(default)]
    pub reason: Option<String>,
}

/// One agent pod and what it answered.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentRow {
    pub pod: String,
    pub node: String,
    /// The pod's phase (`Running`, `Pending`, ...).
    pub phase: String,
    /// Why the agent did not answer (`None`: it answered).
    pub unreachable: Option<String>,
    pub summary: Option<AgentSummary>,
}

/// A range of values across agents (equal when they agree).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct MinMax {
    pub min: u64,
    pub max: u64,
}

impl MinMax {
    fn add(&mut self, v: u64, first: bool) {
        if first {
            *self = Self { min: v, max: v };
        } else {
            self.min = self.min.min(v);
            self.max = self.max.max(v);
        }
    }
}

impl std::fmt::Display for MinMax {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.min == self.max {
            write!(f, "{}", self.min)
        } else {
            write!(f, "{}-{}", self.min, self.max)
        }
    }
}

/// One remote cluster over all agents that answered.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RemoteRow {
    pub name: String,
    /// This cluster's own etcd (the agents' `--kvstore-config`), not a peer.
    pub own: bool,
    /// Agents that know the cluster.
    pub agents: usize,
    /// Agents synced with it.
    pub synced: usize,
    /// Agents per state.
    pub states: BTreeMap<String, usize>,
    /// Disconnection reasons, with how many agents gave each.
    pub reasons: BTreeMap<String, usize>,
    /// Agents that may not use its data (identity conflict).
    pub unusable: usize,
    /// Longest time since an agent last heard from the cluster's etcd, in ms.
    pub oldest_answer_ms: Option<u64>,
    pub nodes: MinMax,
    pub services: MinMax,
    pub identities: MinMax,
    pub ips: MinMax,
    /// Values skipped as malformed, summed over agents.
    pub decode_errors: u64,
}

/// An error message and the nodes whose agents report it.
#[derive(Debug, Clone, Serialize)]
pub struct ErrorRow {
    pub message: String,
    pub nodes: Vec<String>,
}

/// `meshctl status --context` as JSON.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterStatus {
    pub context: String,
    pub namespace: String,
    pub cluster: PeerInfo,
    pub daemonset: String,
    pub desired: i32,
    pub ready: i32,
    /// The agents' status port (`None`: the DaemonSet declares none; upgrade the chart).
    pub status_port: Option<i32>,
    pub agents: Vec<AgentRow>,
    pub remote_clusters: Vec<RemoteRow>,
    pub errors: Vec<ErrorRow>,
    /// What is wrong, one line each; empty when all is well.
    pub problems: Vec<String>,
}

/// The `status` container port of the agent DaemonSet.
fn status_port(ds: &DaemonSet) -> Option<i32> {
    let pod = ds.spec.template.spec.as_ref()?;
    pod.containers
        .iter()
        .filter(|c| c.name == AGENT_CONTAINER)
        .flat_map(|c| c.ports.iter().flatten())
        .find(|p| p.name.as_deref() == Some(STATUS_PORT_NAME))
        .map(|p| p.container_port)
}

/// `k=v,k2=v2` of the DaemonSet's `matchLabels`.
fn selector(ds: &DaemonSet) -> BTreeMap<String, String> {
    ds.spec.selector.match_labels.clone().unwrap_or_default()
}

/// Asks one agent pod for its summary through the API server's pod proxy.
async fn ask(client: &kube::Client, namespace: &str, pod: &str, port: i32) -> Result<AgentSummary, String> {
    let path = format!("/api/v1/namespaces/{namespace}/pods/{pod}:{port}/proxy/v1/summary");
    let req = http::Request::get(&path)
        .body(Vec::new())
        .map_err(|e| format!("request {path}: {e}"))?;
    let text = match tokio::time::timeout(AGENT_TIMEOUT, client.request_text(req)).await {
        Err(_) => return Err(format!("no answer within {}s", AGENT_TIMEOUT.as_secs())),
        Ok(Err(kube::Error::Api(s))) => {
            return Err(format!("pod proxy: HTTP {}: {}", s.code, s.message.trim()));
        }
        Ok(Err(e)) => return Err(format!("pod proxy: {e}")),
        Ok(Ok(t)) => t,
    };
    serde_json::from_str(&text).map_err(|e| {
        format!("its /v1/summary is not what meshctl reads ({e}); is meshctl older than the agent?")
    })
}

/// Reads the status of every agent of one cluster and summarises it.
///
/// # Errors
/// Unreachable cluster, chart not installed.
pub async fn status(c: &Cluster) -> Result<ClusterStatus> {
    let cluster = c.identity().await?;
    let ds = c.agent_daemonset().await?;
    let port = status_port(&ds);
    let labels = selector(&ds);
    let mut problems = Vec::new();
    let st = ds.status.clone().unwrap_or_default();
    let (desired, ready) = (st.desired_number_scheduled, st.number_ready);
    if desired == 0 {
        problems.push(format!("DaemonSet {}: no agent scheduled yet", c.agent_name()));
    } else if ready < desired {
        problems.push(format!(
            "DaemonSet {}: {ready} of {desired} agents ready",
            c.agent_name()
        ));
    }
    let sel = labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",");
    let pods = c
        .api::<Pod>()
        .list(&ListParams::default().labels(&sel))
        .await
        .map_err(|e| c.err(&e, &format!("list the agent pods ({sel}) in {}", c.namespace)))?;
    // The label selector again, on our side (some servers ignore it; a wrong pod must not count as an agent).
    let mut pods: Vec<Pod> = pods
        .items
        .into_iter()
        .filter(|p| {
            let l = p.metadata.labels.clone().unwrap_or_default();
            labels.iter().all(|(k, v)| l.get(k) == Some(v))
        })
        .collect();
    pods.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    if port.is_none() {
        problems.push(format!(
            "DaemonSet {} has no container port named {STATUS_PORT_NAME:?}: upgrade the chart (agent.statusPort) \
             to see the agents' view here",
            c.agent_name()
        ));
    }

    let client = c.proxy_client().clone();
    let sem = Arc::new(tokio::sync::Semaphore::new(CONCURRENCY));
    let mut tasks = tokio::task::JoinSet::new();
    for (i, p) in pods.iter().enumerate() {
        let name = p.metadata.name.clone().unwrap_or_default();
        let phase = p
            .status
            .as_ref()
            .and_then(|s| s.phase.clone())
            .unwrap_or_default();
        let node = p
            .spec
            .as_ref()
            .and_then(|s| s.node_name.clone())
            .unwrap_or_default();
        let (client, sem, ns) = (client.clone(), sem.clone(), c.namespace.clone());
        tasks.spawn(async move {
            let answer = match port {
                None => Err("no status port".to_owned()),
                Some(_) if phase != "Running" => Err(format!(
                    "pod is {}",
                    if phase.is_empty() {
                        "without a phase"
                    } else {
                        &phase
                    }
                )),
                Some(port) => {
                    let _permit = sem.acquire().await;
                    ask(&client, &ns, &name, port).await
                }
            };
            let (unreachable, summary) = match answer {
                Ok(s) => (None, Some(s)),
                Err(e) => (Some(e), None),
            };
            (
                i,
                AgentRow {
                    pod: name,
                    node,
                    phase,
                    unreachable,
                    summary,
                },
            )
        });
    }
    let mut agents: Vec<(usize, AgentRow)> = Vec::with_capacity(pods.len());
    while let Some(r) = tasks.join_next().await {
        match r {
            Ok(row) => agents.push(row),
            Err(e) => bail!("asking the agents: {e}"),
        }
    }
    agents.sort_by_key(|(i, _)| *i);
    let agents: Vec<AgentRow> = agents.into_iter().map(|(_, a)| a).collect();
    let (remote_clusters, errors) = summarise(&agents);

    for a in &agents {
        if let Some(why) = &a.unreachable
            && port.is_some()
        {
            problems.push(format!(
                "agent {} on {}: {why}",
                a.pod,
                node_or_unscheduled(&a.node)
            ));
        }
        if let Some(s) = &a.summary
            && !s.ready
        {
            problems.push(format!(
                "agent {} on {}: not ready",
                a.pod,
                node_or_unscheduled(&a.node)
            ));
        }
    }
    for r in &remote_clusters {
        let what = if r.own {
            format!("own etcd ({})", r.name)
        } else {
            format!("remote cluster {}", r.name)
        };
        if r.synced < r.agents {
            let mut line = format!("{what}: synced on {} of {} agents", r.synced, r.agents);
            if let Some((reason, n)) = r.reasons.iter().max_by_key(|(_, n)| **n) {
                let _ = write!(line, " ({n}: {reason})");
            }
            problems.push(line);
        }
        if r.unusable > 0 {
            problems.push(format!(
                "{what}: unusable on {} agents (identity conflict; see the agents' logs)",
                r.unusable
            ));
        }
        if r.decode_errors > 0 {
            problems.push(format!("{what}: {} malformed values skipped", r.decode_errors));
        }
    }
    for e in &errors {
        problems.push(format!("{} agent(s) report: {}", e.nodes.len(), e.message));
    }
    Ok(ClusterStatus {
        context: c.context.clone(),
        namespace: c.namespace.clone(),
        cluster,
        daemonset: c.agent_name(),
        desired,
        ready,
        status_port: port,
        agents,
        remote_clusters,
        errors,
        problems,
    })
}

fn node_or_unscheduled(node: &str) -> &str {
    if node.is_empty() { "no node yet" } else { node }
}

/// Remote clusters and errors over every agent that answered.
#[must_use]
pub fn summarise(agents: &[AgentRow]) -> (Vec<RemoteRow>, Vec<ErrorRow>) {
    let mut remotes: BTreeMap<(bool, String), RemoteRow> = BTreeMap::new();
    let mut errors: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for a in agents {
        let Some(s) = &a.summary else { continue };
        for c in &s.clusters {
            let r = remotes
                .entry((c.own, c.name.clone()))
                .or_insert_with(|| RemoteRow {
                    name: c.name.clone(),
                    own: c.own,
                    ..RemoteRow::default()
                });
            let first = r.agents == 0;
            r.agents += 1;
            if c.state.state == "synced" {
                r.synced += 1;
            }
            *r.states.entry(c.state.state.clone()).or_default() += 1;
            if let Some(reason) = &c.state.reason {
                *r.reasons.entry(reason.clone()).or_default() += 1;
            }
            if !c.usable {
                r.unusable += 1;
            }
            if let Some(t) = c.last_alive_ms {
                let age = s.now_ms.saturating_sub(t);
                r.oldest_answer_ms = Some(r.oldest_answer_ms.map_or(age, |o| o.max(age)));
            }
            r.nodes.add(c.nodes, first);
            r.services.add(c.services, first);
            r.identities.add(c.identities, first);
            r.ips.add(c.ips, first);
            r.decode_errors += c.decode_errors;
        }
        for m in &s.error_messages {
            errors.entry(m.clone()).or_default().push(a.node.clone());
        }
        if s.errors > s.error_messages.len() {
            errors
                .entry(format!(
                    "{} more errors (see `meshctl status` on the node)",
                    s.errors - s.error_messages.len()
                ))
                .or_default()
                .push(a.node.clone());
        }
    }
    let errors = errors
        .into_iter()
        .map(|(message, nodes)| ErrorRow { message, nodes })
        .collect();
    (remotes.into_values().collect(), errors)
}

impl ClusterStatus {
    /// What `--wait` waits for: every scheduled agent ready and answering, every remote cluster synced on every
    /// agent.
    #[must_use]
    pub fn waiting_for(&self) -> Vec<String> {
        let mut w = Vec::new();
        let answered = self.agents.iter().filter(|a| a.summary.is_some()).count();
        let ready = self
            .agents
            .iter()
            .filter(|a| a.summary.as_ref().is_some_and(|s| s.ready))
            .count();
        if self.desired == 0 || self.ready < self.desired {
            w.push(format!(
                "the agents of DaemonSet {} ({}/{} ready)",
                self.daemonset, self.ready, self.desired
            ));
        } else if answered < self.agents.len() || ready < self.agents.len() {
            w.push(format!(
                "agents to answer and be ready ({ready} of {} are)",
                self.agents.len()
            ));
        }
        for r in &self.remote_clusters {
            if r.synced < r.agents {
                w.push(format!(
                    "{} to sync ({} of {} agents synced)",
                    r.name, r.synced, r.agents
                ));
            }
        }
        w
    }

    /// The human table.
    #[must_use]
    pub fn table(&self) -> String {
        let mut s = String::new();
        let answered = self.agents.iter().filter(|a| a.summary.is_some()).count();
        let _ = writeln!(
            s,
            "Cluster:  {} (id {})   context {}, namespace {}",
            self.cluster.name, self.cluster.id, self.context, self.namespace
        );
        let port = self
            .status_port
            .map_or_else(|| "no status port".to_owned(), |p| format!("status port {p}"));
        let _ = writeln!(
            s,
            "Agents:   DaemonSet {}: {}/{} ready; {answered} of {} pods answered ({port})",
            self.daemonset,
            self.ready,
            self.desired,
            self.agents.len()
        );
        if self.remote_clusters.is_empty() {
            let _ = writeln!(s, "Clusters: none known to the agents");
        } else {
            let _ = writeln!(s, "Clusters (as the agents see them):");
            let head = [
                "CLUSTER",
                "SYNCED",
                "STATES",
                "LAST ANSWER",
                "NODES",
                "SERVICES",
                "IDENTITIES",
                "IPS",
                "SKIPPED",
            ];
            let rows: Vec<Vec<String>> = self
                .remote_clusters
                .iter()
                .map(|r| {
                    vec![
                        if r.own {
                            format!("{} (own etcd)", r.name)
                        } else {
                            r.name.clone()
                        },
                        format!("{}/{}", r.synced, r.agents),
                        r.states
                            .iter()
                            .map(|(k, v)| format!("{k} {v}"))
                            .collect::<Vec<_>>()
                            .join(", "),
                        r.oldest_answer_ms.map_or_else(
                            || "never".to_owned(),
                            |ms| format!("{:.1}s ago", ms as f64 / 1000.0),
                        ),
                        r.nodes.to_string(),
                        r.services.to_string(),
                        r.identities.to_string(),
                        r.ips.to_string(),
                        r.decode_errors.to_string(),
                    ]
                })
                .collect();
            table(&mut s, "  ", &head, &rows);
        }
        let silent: Vec<&AgentRow> = self.agents.iter().filter(|a| a.summary.is_none()).collect();
        if !silent.is_empty() {
            let _ = writeln!(s, "Agents not answering:");
            for a in silent {
                let _ = writeln!(
                    s,
                    "  - {} on {}: {}",
                    a.pod,
                    node_or_unscheduled(&a.node),
                    a.unreachable.as_deref().unwrap_or("-")
                );
            }
        }
        if self.errors.is_empty() {
            let _ = writeln!(s, "Errors:   none reported by the agents");
        } else {
            let _ = writeln!(s, "Errors:");
            for e in &self.errors {
                let _ = writeln!(s, "  - {} ({})", e.message, e.nodes.join(", "));
            }
        }
        if self.problems.is_empty() {
            let _ = writeln!(s, "Problems: none");
        } else {
            let _ = writeln!(s, "Problems:");
            for p in &self.problems {
                let _ = writeln!(s, "  - {p}");
            }
        }
        s
    }
}

/// One `StagedRollout` as the cluster reports it: the clustermesh-apiserver's validity verdict and its summary of
/// every node's progress (`status.progress`, from the nodes' `MeshNode`s).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RolloutRow {
    pub namespace: String,
    pub name: String,
    pub service: String,
    /// `Valid` or `Invalid` (`None`: not judged yet, e.g. no clustermesh-apiserver with `source: kubernetes`).
    pub valid: Option<String>,
    /// Why it is invalid.
    pub message: Option<String>,
    /// `status.progress` as written (`None`: no node reported yet).
    pub progress: Option<serde_json::Value>,
}

/// The `StagedRollout`s of `namespace` (all namespaces when `None`), or the one named `name`.
///
/// # Errors
/// Unreachable cluster, CRD not installed, no rollout of that name.
pub async fn rollouts(c: &Cluster, namespace: Option<&str>, name: Option<&str>) -> Result<Vec<RolloutRow>> {
    use kube::api::{Api, ApiResource, DynamicObject};
    let ar = ApiResource {
        group: "fleetmesh.io".into(),
        version: "v1alpha1".into(),
        api_version: "fleetmesh.io/v1alpha1".into(),
        kind: "StagedRollout".into(),
        plural: "stagedrollouts".into(),
    };
    let api: Api<DynamicObject> = match namespace {
        Some(ns) => Api::namespaced_with(c.client().clone(), ns, &ar),
        None => Api::all_with(c.client().clone(), &ar),
    };
    let where_ = namespace.map_or_else(|| "any namespace".to_owned(), |ns| format!("namespace {ns}"));
    let items = match name {
        Some(n) => match api.get(n).await {
            Ok(o) => vec![o],
            // No such object, or no such resource: a list tells them apart (servers word the two differently).
            Err(kube::Error::Api(s)) if s.code == 404 => {
                match api.list(&ListParams::default().limit(1)).await {
                    Err(kube::Error::Api(s)) if s.code == 404 => bail!(not_installed(c)),
                    _ => bail!("context {:?}: no StagedRollout {n} in {where_}", c.context),
                }
            }
            Err(e) => return Err(c.err(&e, &format!("get StagedRollout {n}"))),
        },
        None => match api.list(&ListParams::default()).await {
            Ok(l) => l.items,
            Err(kube::Error::Api(s)) if s.code == 404 => bail!(not_installed(c)),
            Err(e) => return Err(c.err(&e, &format!("list StagedRollouts in {where_}"))),
        },
    };
    let mut rows: Vec<RolloutRow> = items
        .into_iter()
        .map(|o| {
            let text = |v: &serde_json::Value| v.as_str().map(str::to_owned);
            RolloutRow {
                namespace: o.metadata.namespace.clone().unwrap_or_default(),
                name: o.metadata.name.clone().unwrap_or_default(),
                service: text(&o.data["spec"]["service"]).unwrap_or_default(),
                valid: text(&o.data["status"]["phase"]),
                message: text(&o.data["status"]["message"]),
                progress: Some(o.data["status"]["progress"].clone()).filter(|p| p.is_object()),
            }
        })
        .collect();
    rows.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    Ok(rows)
}

fn not_installed(c: &Cluster) -> String {
    format!(
        "context {:?}: the API server does not serve StagedRollouts (fleetmesh.io/v1alpha1): install the chart, \
         whose crds/ define them",
        c.context
    )
}

/// The human table of [`rollouts`].
#[must_use]
pub fn rollouts_table(rows: &[RolloutRow]) -> String {
    let mut s = String::new();
    if rows.is_empty() {
        let _ = writeln!(s, "No StagedRollouts.");
        return s;
    }
    let num = |p: &Option<serde_json::Value>, k: &str| {
        p.as_ref()
            .and_then(|p| p[k].as_u64())
            .map_or_else(|| "-".to_owned(), |n| n.to_string())
    };
    let head = [
        "NAMESPACE",
        "NAME",
        "SERVICE",
        "VALID",
        "PHASE",
        "STEP",
        "NODES",
        "HALTED",
    ];
    let body: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let step = match (
                num(&r.progress, "step").as_str(),
                num(&r.progress, "steps").as_str(),
            ) {
                ("-", _) => "-".to_owned(),
                (a, b) => format!("{a}/{b}"),
            };
            vec![
                r.namespace.clone(),
                r.name.clone(),
                r.service.clone(),
                r.valid.clone().unwrap_or_else(|| "-".to_owned()),
                r.progress
                    .as_ref()
                    .and_then(|p| p["phase"].as_str())
                    .unwrap_or("no report yet")
                    .to_owned(),
                step,
                num(&r.progress, "nodes"),
                num(&r.progress, "nodesHalted"),
            ]
        })
        .collect();
    // Flush left: the rollouts table is the whole output.
    table(&mut s, "", &head, &body);
    for r in rows {
        if let Some(m) = &r.message {
            let _ = writeln!(s, "{}/{} is invalid: {m}", r.namespace, r.name);
        }
        let halted: Vec<&str> = r
            .progress
            .as_ref()
            .and_then(|p| p["haltedNodes"].as_array())
            .into_iter()
            .flatten()
            .filter_map(serde_json::Value::as_str)
            .collect();
        if !halted.is_empty() {
            let _ = writeln!(
                s,
                "{}/{} halted on: {} (see `meshctl rollout status {}` on those nodes for the gate's figures)",
                r.namespace,
                r.name,
                halted.join(", "),
                r.name
            );
        }
    }
    s
}

/// Polls [`status`] until nothing is waited for, or fails after `timeout`.
///
/// # Errors
/// Timeout (naming what is missing), unreachable cluster.
pub async fn wait(c: &Cluster, timeout: Duration, interval: Duration) -> Result<ClusterStatus> {
    let hint = format!("`meshctl status --context {}` shows the details", c.context);
    crate::kubemesh::poll_until(
        c,
        timeout,
        interval,
        &hint,
        || status(c),
        ClusterStatus::waiting_for,
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent(node: &str, clusters: Vec<RemoteBrief>, errors: &[&str]) -> AgentRow {
        AgentRow {
            pod: format!("agent-{node}"),
            node: node.to_owned(),
            phase: "Running".to_owned(),
            unreachable: None,
            summary: Some(AgentSummary {
                node: node.to_owned(),
                ready: true,
                now_ms: 10_000,
                clusters,
                errors: errors.len(),
                error_messages: errors.iter().map(|e| (*e).to_owned()).collect(),
            }),
        }
    }

    fn remote(name: &str, state: &str, nodes: u64, last_alive_ms: u64) -> RemoteBrief {
        RemoteBrief {
            name: name.to_owned(),
            state: RemoteState {
                state: state.to_owned(),
                reason: (state == "disconnected").then(|| "connection refused".to_owned()),
            },
            usable: true,
            nodes,
            last_alive_ms: Some(last_alive_ms),
            ..RemoteBrief::default()
        }
    }

    #[test]
    fn remote_clusters_and_errors_are_summed_over_agents() {
        let agents = vec![
            agent(
                "n1",
                vec![
                    remote("west", "synced", 2, 9_500),
                    remote("north", "synced", 3, 9_900),
                ],
                &["e1"],
            ),
            agent(
                "n2",
                vec![
                    remote("west", "disconnected", 1, 4_000),
                    remote("north", "synced", 3, 9_800),
                ],
                &["e1", "e2"],
            ),
            AgentRow {
                pod: "agent-n3".to_owned(),
                node: "n3".to_owned(),
                phase: "Pending".to_owned(),
                unreachable: Some("pod is Pending".to_owned()),
                summary: None,
            },
        ];
        let (remotes, errors) = summarise(&agents);
        let west = remotes.iter().find(|r| r.name == "west").expect("west");
        assert_eq!((west.agents, west.synced), (2, 1));
        assert_eq!(west.nodes, MinMax { min: 1, max: 2 });
        assert_eq!(
            west.oldest_answer_ms,
            Some(6_000),
            "ages use each agent's own clock"
        );
        assert_eq!(west.reasons.get("connection refused"), Some(&1));
        let north = remotes.iter().find(|r| r.name == "north").expect("north");
        assert_eq!(
            (north.agents, north.synced, north.nodes.to_string()),
            (2, 2, "3".to_owned())
        );
        assert_eq!(errors.len(), 2);
        assert_eq!(errors[0].message, "e1");
        assert_eq!(errors[0].nodes, vec!["n1", "n2"]);
    }

    #[test]
    fn errors_beyond_the_listed_ones_are_counted() {
        let mut a = agent("n1", vec![], &["e1"]);
        if let Some(s) = a.summary.as_mut() {
            s.errors = 25;
        }
        let (_, errors) = summarise(&[a]);
        assert!(
            errors.iter().any(|e| e.message.starts_with("24 more errors")),
            "{errors:?}"
        );
    }
}
