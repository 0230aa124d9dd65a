//! The agent's local API: HTTP on a Unix socket (`GET /v1/status`, `GET /v1/summary`, `GET /metrics`,
//! `GET /healthz`, `GET /readyz`, `POST /v1/rollouts/{namespace}/{name}/{pause|resume|abort}`, `GET /v1/flows` (NDJSON, optionally
//! following), `GET /v1/policy/{namespace}/{pod}`), for meshctl and the lab; and
//! `GET /metrics` alone on a TCP address ([`serve_metrics`]) for Prometheus, and `GET /healthz` and
//! `GET /v1/summary` on another ([`serve_status`]) for `meshctl status --context`.

use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};

use axum::extract::Path as UrlPath;
use axum::http::StatusCode;
use axum::routing::post;
use axum::{Json, Router, extract::State, routing::get};
use serde::Serialize;

use crate::datapath::CountersReader;
use crate::reconcile::DatapathStatus;
use crate::remote::{RemoteCluster, Remotes};
use crate::rollout::Command;

/// Rollout commands from the API, taken by the reconciler at its next pass.
pub type CommandQueue = Arc<Mutex<Vec<(String, String, Command)>>>;

/// Everything `GET /v1/status` reports.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Status {
    pub node: String,
    pub cluster: String,
    pub cluster_id: u16,
    pub started_ms: u64,
    /// Local manifests loaded, every remote cluster synced, every local endpoint programmed, no errors.
    pub ready: bool,
    pub manifest_generation: u64,
    pub manifest_errors: Vec<String>,
    pub remote_clusters: Vec<RemoteCluster>,
    /// This cluster's identities and ips as its own etcd has them (`--kvstore-config`; counts only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub own_cluster: Option<RemoteCluster>,
    pub datapath: DatapathStatus,
    /// The WireGuard engine (live; absent with `--encryption off`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub encryption: Option<crate::wireguard::EncryptionStatus>,
}

#[derive(Clone)]
pub struct ApiState {
    pub status: Arc<Mutex<Status>>,
    pub remotes: Remotes,
    /// Live counters (the rest of the datapath status is as of the last reconcile).
    pub counters: Arc<CountersReader>,
    pub commands: CommandQueue,
    /// Wakes the reconciler.
    pub wake: std::sync::mpsc::Sender<()>,
    /// Flow events.
    pub flows: Arc<crate::flows::Hub>,
    /// Compiled policies of local endpoints, as of the last reconcile.
    pub policies: crate::policy::SharedPolicyViews,
    /// What the datapath is programmed with (services, ipcache), read on demand by `GET /v1/status`.
    pub programmed: crate::reconcile::SharedProgrammed,
    /// Per-backend statistics of the datapath, read on demand (`None` when the map could not be opened).
    pub backend_stats: Option<Arc<crate::datapath::BackendStatsReader>>,
    /// The WireGuard engine (`None` with `--encryption off`): per-peer sessions for `GET /v1/encryption` and
    /// the metrics.
    pub wireguard: Option<Arc<crate::wireguard::Engine>>,
}

/// `GET /v1/flows?pod=&namespace=&cluster=&verdict=&last=&follow=`: flows as NDJSON; with `follow=true` the
/// response stays open and streams new flows (a line `{"lost": N}` tells a slow reader what it missed).
async fn flows(
    State(s): State<ApiState>,
    axum::extract::RawQuery(query): axum::extract::RawQuery,
) -> axum::response::Response {
    use axum::response::IntoResponse as _;
    let filter = match crate::flows::Filter::from_query(query.as_deref().unwrap_or("")) {
        Ok(f) => f,
        Err(e) => return (StatusCode::BAD_REQUEST, format!("{e}\n")).into_response(),
    };
    let last = filter
        .last
        .unwrap_or(if filter.follow { 0 } else { crate::flows::HISTORY });
    // Subscribe before reading the history so nothing falls between the two.
    let rx = filter.follow.then(|| s.flows.subscribe());
    let head: Vec<axum::body::Bytes> = s.flows.recent(&filter, last).iter().map(|f| line(&**f)).collect();
    let head = futures::stream::iter(head.into_iter().map(Ok::<_, std::convert::Infallible>));
    let Some(rx) = rx else {
        return (
            [(axum::http::header::CONTENT_TYPE, "application/x-ndjson")],
            axum::body::Body::from_stream(head),
        )
            .into_response();
    };
    let tail = futures::stream::unfold((rx, filter), move |(mut rx, filter)| async move {
        loop {
            match rx.recv().await {
                Ok(f) if filter.matches(&f) => return Some((Ok(line(&*f)), (rx, filter))),
                Ok(_) => {}
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    let lost = serde_json::json!({ "lost": n });
                    return Some((Ok(line(&lost)), (rx, filter)));
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
            }
        }
    });
    (
        [(axum::http::header::CONTENT_TYPE, "application/x-ndjson")],
        axum::body::Body::from_stream(futures::StreamExt::chain(head, tail)),
    )
        .into_response()
}

/// One NDJSON line.
fn line<T: Serialize>(v: &T) -> axum::body::Bytes {
    let mut l = serde_json::to_string(v).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"));
    l.push('\n');
    axum::body::Bytes::from(l)
}

/// `GET /v1/policy/{namespace}/{pod}`: the compiled policy of a local endpoint.
async fn policy(
    State(s): State<ApiState>,
    UrlPath((namespace, pod)): UrlPath<(String, String)>,
) -> axum::response::Response {
    use axum::response::IntoResponse as _;
    // A copy of the shared parts (persistent maps, `Arc`s), rendered outside the lock.
    let views = s.policies.lock().unwrap_or_else(PoisonError::into_inner).clone();
    match views.render(&namespace, &pod) {
        Some(v) => Json(v).into_response(),
        None => (
            StatusCode::NOT_FOUND,
            format!("pod {namespace}/{pod} is not an endpoint on this node\n"),
        )
            .into_response(),
    }
}

/// `POST /v1/rollouts/{namespace}/{name}/{command}`: queues pause, resume or abort for a rollout this node runs.
async fn rollout_command(
    State(s): State<ApiState>,
    UrlPath((namespace, name, command)): UrlPath<(String, String, String)>,
) -> (StatusCode, String) {
    let cmd: Command = match command.parse() {
        Ok(c) => c,
        Err(e) => return (StatusCode::BAD_REQUEST, format!("{e}\n")),
    };
    let known = s
        .status
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .datapath
        .rollouts
        .iter()
        .any(|r| r.namespace == namespace && r.name == name);
    if !known {
        return (
            StatusCode::NOT_FOUND,
            format!("no StagedRollout {namespace}/{name} on this node\n"),
        );
    }
    s.commands
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .push((namespace.clone(), name.clone(), cmd));
    let _ = s.wake.send(());
    (
        StatusCode::ACCEPTED,
        format!("{command} queued for StagedRollout {namespace}/{name}\n"),
    )
}

/// The status with live remote clusters and counters, and the datapath's services and ipcache as programmed
/// (presentation on demand: nothing of it is built by the control loop).
fn current(s: &ApiState) -> Status {
    let mut st = s.status.lock().unwrap_or_else(PoisonError::into_inner).clone();
    // Remote cluster state is live; the datapath part is as of the last reconcile.
    st.remote_clusters = s.remotes.snapshot().into_values().collect();
    st.own_cluster = s.remotes.own();
    st.encryption = s.wireguard.as_ref().map(|e| e.status());
    match s.counters.read() {
        Ok(c) => st.datapath.counters = c.into_iter().map(|(c, v)| (c.name(), v)).collect(),
        Err(e) => st.datapath.errors.push(format!("reading counters: {e}")),
    }
    let stats = s.backend_stats.as_ref().map(|r| r.read());
    let p = s.programmed.lock().unwrap_or_else(PoisonError::into_inner);
    st.datapath.ipcache = p
        .ipcache
        .iter()
        .map(|(prefix, e)| crate::reconcile::IpcacheStatus::of(*prefix, e))
        .collect();
    st.datapath.services = p
        .views
        .values()
        .map(|v| {
            let mut v = (**v).clone();
            if let Some(Ok(stats)) = &stats {
                crate::reconcile::attach_stats(&mut v, stats, &p.lb);
            }
            v
        })
        .collect();
    drop(p);
    if let Some(Err(e)) = stats {
        st.datapath
            .errors
            .push(format!("reading backend statistics: {e}"));
    }
    st
}

async fn status(State(s): State<ApiState>) -> Json<Status> {
    Json(current(&s))
}

/// `GET /v1/encryption`: the WireGuard engine per peer (handshake age, bytes, errors); `null` with encryption off.
async fn encryption(State(s): State<ApiState>) -> Json<Option<crate::wireguard::EncryptionStatus>> {
    Json(s.wireguard.as_ref().map(|e| e.status()))
}

/// `GET /metrics`: Prometheus text format, from the tables' numbers (no copy of the status).
async fn metrics(State(s): State<ApiState>) -> ([(axum::http::HeaderName, &'static str); 1], String) {
    let now = crate::remote::now_ms();
    let counters = s.counters.read().unwrap_or_else(|e| {
        tracing::warn!(error = %e, "reading the datapath counters for /metrics");
        Vec::new()
    });
    let ipcache_entries = s
        .programmed
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .ipcache
        .len();
    let st = s.status.lock().unwrap_or_else(PoisonError::into_inner).clone();
    // Numbers read under the tables' locks: no record is copied.
    let scrape = s.remotes.read(crate::remote::Scope::Peer, |peers| {
        s.remotes.read(crate::remote::Scope::Own, |own| {
            crate::metrics::Scrape::new(
                &st,
                peers.values(),
                own.values().next(),
                counters.into_iter().map(|(c, v)| (c.name(), v)),
                ipcache_entries,
                now,
            )
        })
    });
    let mut scrape = scrape;
    scrape.encryption = s.wireguard.as_ref().map(|e| e.status());
    scrape.selection = Some(s.remotes.selection()).filter(|sel| sel.file.is_some());
    (
        [(axum::http::header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)],
        scrape.render(),
    )
}

/// Serves the read-only part of the API that says how the agent is, on a TCP address (the chart's
/// `agent.statusPort`, reached by `meshctl status --context` through the API server's pod proxy): `GET /healthz`
/// and `GET /v1/summary`. Nothing that changes state, and nothing that grows with the mesh.
///
/// # Errors
/// When serving fails.
pub async fn serve_status(listener: tokio::net::TcpListener, state: ApiState) -> std::io::Result<()> {
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/v1/summary", get(summary))
        .with_state(state);
    axum::serve(listener, app).await
}

/// Serves `GET /metrics` alone on a TCP address (for Prometheus) until the process ends.
///
/// # Errors
/// When the address cannot be bound.
pub async fn serve_metrics(addr: std::net::SocketAddr, state: ApiState) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let app = Router::new().route("/metrics", get(metrics)).with_state(state);
    axum::serve(listener, app).await
}

/// `GET /v1/summary`: readiness, every remote cluster in numbers (state, last answer, entry counts), the
/// datapath's sizes and the first [`SUMMARY_ERRORS`] errors, without the per-service details of `/v1/status`
/// (which grow with the mesh). Its size depends on the number of clusters only; with `?clusters=none` it leaves
/// the per-cluster list out (the counts stay), for pollers of a fleet-sized agent.
async fn summary(
    State(s): State<ApiState>,
    axum::extract::RawQuery(query): axum::extract::RawQuery,
) -> Json<serde_json::Value> {
    let list = query.as_deref() != Some("clusters=none");
    let clusters = s.remotes.briefs();
    let st = s.status.lock().unwrap_or_else(PoisonError::into_inner);
    let peers = clusters.iter().filter(|c| !c.own).count();
    let synced = clusters
        .iter()
        .filter(|c| !c.own && matches!(c.state, crate::remote::SyncState::Synced { .. }))
        .count();
    let errors: Vec<&String> = st.manifest_errors.iter().chain(&st.datapath.errors).collect();
    Json(serde_json::json!({
        "node": st.node,
        "cluster": st.cluster,
        "clusterId": st.cluster_id,
        "startedMs": st.started_ms,
        "nowMs": crate::remote::now_ms(),
        "ready": st.ready,
        "manifestGeneration": st.manifest_generation,
        "reconciles": st.datapath.reconciles,
        "remoteClusters": peers,
        "remoteClustersSynced": synced,
        "peerSelection": s.remotes.selection(),
        "clusters": if list { serde_json::to_value(&clusters).unwrap_or_default() } else { serde_json::Value::Null },
        "datapath": st.datapath.summary,
        "errors": errors.len(),
        "errorMessages": &errors[..errors.len().min(SUMMARY_ERRORS)],
    }))
}

/// Most error messages `GET /v1/summary` lists (`errors` counts them all).
pub const SUMMARY_ERRORS: usize = 20;

async fn healthz() -> &'static str {
    "ok\n"
}

/// Why the agent is not ready to serve its node yet, `None` when it is: the cluster's state has been read (a first
/// snapshot of its source) and a reconcile pass has programmed the datapath from it. Remote clusters do not count:
/// a peer's outage must not make a cluster's agents unready and stall their rolling update (`/v1/status` and
/// `meshctl status --context` show them).
#[must_use]
pub fn not_ready(st: &Status) -> Option<&'static str> {
    if st.manifest_generation == 0 {
        Some("the cluster's state has not been read yet")
    } else if st.datapath.reconciles == 0 {
        Some("the datapath has not been programmed yet")
    } else {
        None
    }
}

/// `GET /readyz`: 200 `ok` once [`not_ready`] has nothing to say, else 503 with the reason (the chart's readiness
/// probe).
async fn readyz(State(s): State<ApiState>) -> (StatusCode, String) {
    let st = s.status.lock().unwrap_or_else(PoisonError::into_inner);
    match not_ready(&st) {
        None => (StatusCode::OK, "ok\n".to_owned()),
        Some(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {why}\n")),
    }
}

/// Serves the API on `socket` until the process ends.
///
/// # Errors
/// When the socket cannot be created.
pub async fn serve(socket: &Path, state: ApiState) -> std::io::Result<()> {
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::remove_file(socket) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = tokio::net::UnixListener::bind(socket)?;
    let app = Router::new()
        .route("/v1/status", get(status))
        .route("/v1/encryption", get(encryption))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/v1/summary", get(summary))
        .route("/metrics", get(metrics))
        .route("/v1/rollouts/{namespace}/{name}/{command}", post(rollout_command))
        .route("/v1/flows", get(flows))
        .route("/v1/policy/{namespace}/{pod}", get(policy))
        .with_state(state);
    axum::serve(listener, app).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(generation: u64, reconciles: u64) -> Status {
        Status {
            node: "n1".into(),
            cluster: "east".into(),
            cluster_id: 1,
            started_ms: 0,
            ready: false,
            manifest_generation: generation,
            manifest_errors: Vec::new(),
            remote_clusters: Vec::new(),
            own_cluster: None,
            encryption: None,
            datapath: DatapathStatus {
                reconciles,
                ..DatapathStatus::default()
            },
        }
    }

    #[test]
    fn ready_once_the_state_is_read_and_programmed_whatever_the_peers() {
        assert_eq!(
            not_ready(&status(0, 0)),
            Some("the cluster's state has not been read yet")
        );
        assert_eq!(
            not_ready(&status(1, 0)),
            Some("the datapath has not been programmed yet")
        );
        // `ready` (every peer synced) is false here: readiness does not wait for peers.
        assert_eq!(not_ready(&status(1, 1)), None);
    }
}
