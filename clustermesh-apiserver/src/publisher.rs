//! Local state → this cluster's etcd.
//!
//! One session per etcd connection: grant a lease, write the cluster config, read back the identities published
//! earlier (their numbers are kept), then keep the published records (identities, pod addresses and capacities,
//! nodes, services) equal to the desired ones (put what changed, delete what is gone, including records left by an
//! earlier run), write the synced markers after the first full sync, and keep the lease and the heartbeat alive.
//! Records are put in key order: capacities, identities, then ips, then nodes and services, so that agents know an
//! identity before an address or a service refers to it. Any error ends the session; the next one starts from a fresh list, so nothing stale
//! survives a restart.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use etcd_client::{Client, ConnectOptions, GetOptions, PutOptions, Txn, TxnOp};
use mesh_kvstore::{
    BackendRecord, ClusterConfig, Heartbeat, KeyKind, Keys, NodeRecord, PortRecord, ServiceRecord, Synced,
    encode, kinds,
};
use mesh_model::service;
use mesh_model::source::Snapshot;
use tokio::sync::watch;
use tracing::{info, instrument, warn};

use crate::identities::{self, Allocator};

/// The cluster's identity allocator, shared by the publishers of one apiserver (its own etcd and a fleet hub), so
/// that both carry the same numbers.
pub type SharedAllocator = std::sync::Arc<std::sync::Mutex<Allocator>>;

/// A new allocator for `cluster`, to share between publishers.
#[must_use]
pub fn shared_allocator(cluster: &str, cluster_id: u16, gc_grace: Duration) -> SharedAllocator {
    std::sync::Arc::new(std::sync::Mutex::new(Allocator::new(
        cluster, cluster_id, gc_grace,
    )))
}

fn lock(a: &std::sync::Mutex<Allocator>) -> std::sync::MutexGuard<'_, Allocator> {
    // A publisher that panicked while holding it left consistent numbers behind (every change is one call).
    a.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

pub struct Publisher {
    /// Which etcd this publisher writes, for logs: `etcd` (the cluster's own) or `hub`.
    pub sink: &'static str,
    pub cluster: String,
    pub cluster_id: u16,
    /// Cluster labels, published with the cluster's config record.
    pub labels: std::collections::BTreeMap<String, String>,
    pub keys: Keys,
    pub endpoints: Vec<String>,
    pub lease_ttl: Duration,
    /// How often the heartbeat is written (`--heartbeat-interval`; at most a third of the lease). Agents reading the
    /// cluster through a fleet hub judge it by the heartbeat's age.
    pub heartbeat_interval: Duration,
    /// Client TLS for `https://` endpoints.
    pub tls: Option<EtcdTls>,
    /// MCS export records to publish with the others (`--source kubernetes`), see [`crate::mcs`].
    /// `None` in the channel until the controller's first pass: meanwhile, export records already in etcd (an
    /// earlier run's) are kept, so that a restart does not withdraw them from the peers for a moment.
    pub exports: Option<watch::Receiver<Option<crate::mcs::ExportRecords>>>,
    /// Services with more backends than this are published as a record without backends plus slices of at most
    /// this many (`--service-slice-size`; 0: every service as one record).
    pub slice_size: usize,
    /// Each sliced service's slices as last published (slice → backend addresses): a change keeps every backend
    /// in its slice, so it rewrites only the slices it touches.
    pub slices: std::sync::Mutex<BTreeMap<(String, String), SliceAssignment>>,
}

/// A sliced service's slices: slice index → the backend addresses in it.
pub type SliceAssignment = BTreeMap<u32, Vec<std::net::Ipv4Addr>>;

/// TLS material for this cluster's etcd (PEM files, read at every connection so renewed files are picked up).
#[derive(Debug, Clone)]
pub struct EtcdTls {
    pub ca: std::path::PathBuf,
    /// Client certificate and key (etcd maps the certificate's CN to the etcd user).
    pub identity: Option<(std::path::PathBuf, std::path::PathBuf)>,
}

impl EtcdTls {
    pub fn options(&self) -> anyhow::Result<etcd_client::TlsOptions> {
        Ok(tls_options_of(&self.pem()?))
    }

    /// The PEM files, read now: the CA, then the certificate and key when there is an identity.
    pub fn pem(&self) -> anyhow::Result<Vec<Vec<u8>>> {
        use anyhow::Context as _;
        let read = |p: &std::path::Path| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
        let mut pem = vec![read(&self.ca)?];
        if let Some((cert, key)) = &self.identity {
            pem.push(read(cert)?);
            pem.push(read(key)?);
        }
        Ok(pem)
    }
}

/// TLS options of PEM files as [`EtcdTls::pem`] reads them.
pub fn tls_options_of(pem: &[Vec<u8>]) -> etcd_client::TlsOptions {
    let mut tls = etcd_client::TlsOptions::new();
    if let Some(ca) = pem.first() {
        tls = tls.ca_certificate(etcd_client::Certificate::from_pem(ca));
    }
    if let [_, cert, key] = pem {
        tls = tls.identity(etcd_client::Identity::from_pem(cert, key));
    }
    tls
}

/// Whether the export records changed (`false` when their sender is gone); pends forever without a receiver.
async fn exports_changed(rx: Option<&mut watch::Receiver<Option<crate::mcs::ExportRecords>>>) -> bool {
    match rx {
        Some(rx) => rx.changed().await.is_ok(),
        None => std::future::pending().await,
    }
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl Publisher {
    /// Runs sessions forever, reconnecting with backoff.
    pub async fn run(&self, mut snapshots: watch::Receiver<Snapshot>, allocator: SharedAllocator) {
        // Generation 0 is the channel's placeholder, not the directory: publishing it would withdraw every record
        // and write a synced marker for an empty cluster.
        if snapshots.wait_for(|s| s.generation > 0).await.is_err() {
            return;
        }
        let mut backoff = mesh_kvstore::etcd::Reconnect::default();
        // A session talks to one endpoint (a member of the etcd cluster) and the next session to the next one: a
        // client over all of them spreads its requests over every member, so one member's loss would end every
        // session (and stop the lease keep-alive and the heartbeat) until the member is back.
        let mut next = 0usize;
        // Outlives sessions: what it holds wins over what a session start reads back.
        loop {
            let started = std::time::Instant::now();
            let endpoint = self
                .endpoints
                .get(next % self.endpoints.len().max(1))
                .map(std::slice::from_ref)
                .unwrap_or_default();
            match self.session(endpoint, &mut snapshots, &allocator).await {
                Ok(()) => return,
                Err(e) => {
                    next = next.wrapping_add(1);
                    let wait = backoff.after(started.elapsed());
                    warn!(error = %format!("{e:#}"), endpoint = ?endpoint, retry_in = ?wait, "etcd session ended");
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }

    /// Every record this cluster should have in etcd: its identities, its pods' addresses (and capacities other than
    /// 1), its nodes, and its global services that it shares.
    fn desired(
        &self,
        snapshot: &Snapshot,
        allocator: &std::sync::Mutex<Allocator>,
    ) -> BTreeMap<String, String> {
        let state = &snapshot.state;
        let mut allocator = lock(allocator);
        let assigned = allocator.assign(state, std::time::Instant::now());
        let identities: Vec<(String, String)> = allocator.records(&self.keys).collect();
        drop(allocator);
        let ips: Vec<(String, String)> =
            identities::pod_records(&self.cluster, &self.keys, state, &assigned).collect();
        let nodes = state.nodes.values().map(|n| {
            let rec = NodeRecord {
                name: n.name.clone(),
                cluster: self.cluster.clone(),
                cluster_id: self.cluster_id,
                underlay_ipv4: n.underlay_ipv4,
                pod_cidrs: vec![n.pod_cidr],
                wireguard: n.wireguard.clone(),
            };
            (self.keys.node(&self.cluster, &n.name), encode(&rec))
        });
        let mut slices = self
            .slices
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut sliced = std::collections::BTreeSet::new();
        let mut services: Vec<(String, String)> = Vec::new();
        for svc in state.services.values() {
            let exported = state.exports.contains(&(svc.namespace.clone(), svc.name.clone()));
            // Affinity is the clients' choice (each agent's default); only global and shared matter here.
            let spec = service::global_spec(svc, exported, service::Affinity::None);
            if !spec.errors.is_empty() {
                warn!(service = %format!("{}/{}", svc.namespace, svc.name), errors = ?spec.errors, "service stays local");
            }
            if !spec.global || !spec.shared {
                continue;
            }
            let port = |name: &str, port: u16, protocol| PortRecord {
                name: name.to_owned(),
                port,
                protocol,
            };
            let endpoints = service::endpoints(state, svc);
            let mut rec = ServiceRecord {
                cluster: self.cluster.clone(),
                cluster_id: self.cluster_id,
                namespace: svc.namespace.clone(),
                name: svc.name.clone(),
                ports: svc
                    .ports
                    .iter()
                    .map(|p| port(p.name.as_deref().unwrap_or_default(), p.port, p.protocol))
                    .collect(),
                backends: endpoints
                    .iter()
                    .map(|e| BackendRecord {
                        ipv4: e.ipv4,
                        ports: e
                            .ports
                            .iter()
                            .map(|p| port(&p.name, p.port, p.protocol))
                            .collect(),
                        weight: e.capacity,
                    })
                    .collect(),
                // What the clusterset DNS and the ClusterSetIP imports of the peers need (docs/clusterset-dns.md).
                // Hostnames (pod `spec.hostname` under `spec.subdomain`, EndpointSlice `hostname`) are DNS labels
                // already (the sources refuse others): peers would refuse the whole record for one that is not.
                mcs: exported.then(|| mesh_kvstore::McsRecord {
                    headless: svc.cluster_ipv4.is_none(),
                    hostnames: endpoints
                        .iter()
                        .filter_map(|e| {
                            let h = e.hostname.as_ref()?;
                            if mesh_kvstore::is_dns_label(h) {
                                Some((e.ipv4, h.clone()))
                            } else {
                                warn!(service = %format!("{}/{}", svc.namespace, svc.name), hostname = %h,
                                    "hostname is not a DNS label; not published");
                                None
                            }
                        })
                        .collect(),
                }),
            };
            // A large service: its backends in bounded slices, each backend staying in its slice.
            if self.slice_size > 0 && rec.backends.len() > self.slice_size {
                let id = (svc.namespace.clone(), svc.name.clone());
                let previous = slices.get(&id).cloned().unwrap_or_default();
                let parts = mesh_kvstore::slice_backends(&previous, &rec.backends, self.slice_size);
                slices.insert(
                    id.clone(),
                    parts
                        .iter()
                        .map(|(i, bs)| (*i, bs.iter().map(|b| b.ipv4).collect()))
                        .collect(),
                );
                sliced.insert(id);
                for (index, backends) in parts {
                    let slice = mesh_kvstore::BackendSlice {
                        cluster: self.cluster.clone(),
                        cluster_id: self.cluster_id,
                        namespace: svc.namespace.clone(),
                        name: svc.name.clone(),
                        backends,
                    };
                    services.push((
                        self.keys
                            .backend_slice(&self.cluster, &svc.namespace, &svc.name, index),
                        encode(&slice),
                    ));
                }
                rec.backends.clear();
            }
            services.push((
                self.keys.service(&self.cluster, &svc.namespace, &svc.name),
                encode(&rec),
            ));
        }
        slices.retain(|id, _| sliced.contains(id));
        drop(slices);
        let exports: Vec<(String, String)> = self
            .exports
            .as_ref()
            .and_then(|rx| rx.borrow().clone())
            .map(|r| r.into_iter().collect())
            .unwrap_or_default();
        identities
            .into_iter()
            .chain(ips)
            .chain(nodes)
            .chain(services)
            .chain(exports)
            .collect()
    }

    /// Reads back the identity records of this cluster (an earlier run's): the allocator keeps their numbers.
    #[instrument(skip_all)]
    async fn restore_identities(
        &self,
        client: &Client,
        allocator: &std::sync::Mutex<Allocator>,
    ) -> anyhow::Result<()> {
        let (records, _) =
            mesh_kvstore::etcd::list_paged(client, &self.keys.identities_prefix(&self.cluster)).await?;
        let mut found = Vec::new();
        for (k, v) in &records {
            match self.keys.classify(&self.cluster, k) {
                KeyKind::Identity(number) => match mesh_kvstore::decode_identity(k, &self.cluster, number, v)
                {
                    Ok(rec) if rec.cluster_id == self.cluster_id => found.push(rec),
                    Ok(rec) => {
                        warn!(key = %k, id = rec.cluster_id, "identity record of another cluster id; it is withdrawn")
                    }
                    Err(e) => warn!(error = %e, "malformed identity record; it is withdrawn"),
                },
                _ => warn!(key = %k, "unexpected key among the identities; it is withdrawn"),
            }
        }
        let mut allocator = lock(allocator);
        let restored = allocator.restore(found);
        info!(
            records = records.len(),
            restored,
            held = allocator.len(),
            "identities read back"
        );
        Ok(())
    }

    #[instrument(skip_all, fields(cluster = %self.cluster, sink = self.sink))]
    async fn session(
        &self,
        endpoints: &[String],
        snapshots: &mut watch::Receiver<Snapshot>,
        allocator: &std::sync::Mutex<Allocator>,
    ) -> anyhow::Result<()> {
        let opts = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(3))
            .with_timeout(Duration::from_secs(5))
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5));
        let opts = match &self.tls {
            Some(t) => opts.with_tls(t.options()?),
            None => opts,
        };
        let mut client = Client::connect(endpoints, Some(opts)).await?;
        let ttl = i64::try_from(self.lease_ttl.as_secs()).unwrap_or(30);
        let lease = client.lease_grant(ttl, None).await?.id();
        let (mut keeper, mut keepalive) = client.lease_keep_alive(lease).await?;
        info!(lease, ttl, "connected to etcd");

        let config = ClusterConfig {
            name: self.cluster.clone(),
            id: self.cluster_id,
            capabilities: vec![
                "nodes/v1".into(),
                "services/v1".into(),
                "backends/v1".into(),
                "identities/v1".into(),
                "ip/v1".into(),
            ],
            labels: self.labels.clone(),
        };
        client
            .put(self.keys.cluster_config(&self.cluster), encode(&config), None)
            .await?;

        self.restore_identities(&client, allocator).await?;
        // What is in etcd now (maybe from an earlier run): anything not desired gets deleted.
        let mut published: BTreeMap<String, Option<String>> = BTreeMap::new();
        for prefix in [
            self.keys.identities_prefix(&self.cluster),
            self.keys.ips_prefix(&self.cluster),
            self.keys.capacities_prefix(&self.cluster),
            self.keys.nodes_prefix(&self.cluster),
            self.keys.services_prefix(&self.cluster),
            self.keys.backend_slices_prefix(&self.cluster),
            crate::mcs::exports_prefix(&self.keys, &self.cluster),
        ] {
            let existing = client
                .get(prefix, Some(GetOptions::new().with_prefix().with_keys_only()))
                .await?;
            published.extend(
                existing
                    .kvs()
                    .iter()
                    .filter_map(|kv| kv.key_str().ok().map(|k| (k.to_owned(), None))),
            );
        }
        let with_lease = || Some(PutOptions::new().with_lease(lease));
        let mut synced = false;
        // Keep-alive and heartbeat: a third of the lease, and at least every `--heartbeat-interval` (10 s by
        // default) so that the heartbeat says how recent the cluster's view is whatever the lease.
        let mut tick = tokio::time::interval((self.lease_ttl / 3).min(self.heartbeat_interval));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut exports = self.exports.clone();
        // The desired records are computed again only when something they come from changed (the cluster's
        // state, the exports, an identity's grace period): keep-alives and heartbeats cost nothing else.
        let mut stale = true;
        loop {
            if !stale {
                let open = self
                    .wait(
                        snapshots,
                        &mut exports,
                        allocator,
                        &mut tick,
                        &mut keeper,
                        &mut keepalive,
                        lease,
                        &mut client,
                        &mut stale,
                    )
                    .await?;
                if !open {
                    return Ok(());
                }
                if !stale {
                    continue;
                }
            }
            stale = false;
            // Seen from here on: a change while this pass publishes makes the next one stale again.
            if let Some(rx) = exports.as_mut() {
                rx.mark_unchanged();
            }
            let snapshot = snapshots.borrow_and_update().clone();
            let desired = self.desired(&snapshot, allocator);
            let mut puts = 0usize;
            for (k, v) in &desired {
                if published.get(k).and_then(Option::as_ref) != Some(v) {
                    client.put(k.as_str(), v.as_str(), with_lease()).await?;
                    published.insert(k.clone(), Some(v.clone()));
                    puts += 1;
                }
            }
            // Export records are not known before the MCS controller's first pass: keep those in etcd meanwhile.
            let keep_exports = exports.as_ref().is_some_and(|rx| rx.borrow().is_none());
            let exports_prefix = crate::mcs::exports_prefix(&self.keys, &self.cluster);
            let gone: Vec<String> = published
                .keys()
                .filter(|k| !(desired.contains_key(*k) || keep_exports && k.starts_with(&exports_prefix)))
                .cloned()
                .collect();
            for k in &gone {
                client.delete(k.as_str(), None).await?;
                published.remove(k);
            }
            if puts > 0 || !gone.is_empty() {
                info!(
                    puts,
                    deletes = gone.len(),
                    records = desired.len(),
                    "published records"
                );
            }
            if !synced {
                // All markers in one transaction: a reader sees every kind synced at once.
                let mut markers = Vec::new();
                for (kind, prefix) in [
                    (kinds::IDENTITIES, self.keys.identities_prefix(&self.cluster)),
                    (kinds::IPS, self.keys.ips_prefix(&self.cluster)),
                    (kinds::NODES, self.keys.nodes_prefix(&self.cluster)),
                    (kinds::SERVICES, self.keys.services_prefix(&self.cluster)),
                ] {
                    let count = desired.keys().filter(|k| k.starts_with(&prefix)).count() as u64;
                    let marker = Synced {
                        time_ms: now_ms(),
                        count,
                    };
                    markers.push(TxnOp::put(
                        self.keys.synced(&self.cluster, kind),
                        encode(&marker),
                        with_lease(),
                    ));
                }
                client.txn(Txn::new().and_then(markers)).await?;
                synced = true;
                info!(records = desired.len(), "initial sync complete");
            }
        }
    }

    /// Waits for the next event of a session: a change of what records come from (sets `stale`), an identity's
    /// grace period ending (sets `stale`), or the lease keep-alive and heartbeat tick. `false` when the state
    /// source ended.
    #[expect(clippy::too_many_arguments, reason = "the session's parts it serves")]
    async fn wait(
        &self,
        snapshots: &mut watch::Receiver<Snapshot>,
        exports: &mut Option<watch::Receiver<Option<crate::mcs::ExportRecords>>>,
        allocator: &std::sync::Mutex<Allocator>,
        tick: &mut tokio::time::Interval,
        keeper: &mut etcd_client::LeaseKeeper,
        keepalive: &mut etcd_client::LeaseKeepAliveStream,
        lease: i64,
        client: &mut Client,
        stale: &mut bool,
    ) -> anyhow::Result<bool> {
        // Unused identities are withdrawn when their grace period ends, changes or not.
        let next = lock(allocator).next_collection();
        let collect_at = next.map_or_else(
            || tokio::time::Instant::now() + Duration::from_secs(3600),
            tokio::time::Instant::from_std,
        );
        let with_lease = || Some(PutOptions::new().with_lease(lease));
        tokio::select! {
            () = tokio::time::sleep_until(collect_at) => *stale = true,
            changed = snapshots.changed() => {
                if changed.is_err() {
                    return Ok(false);
                }
                *stale = true;
            }
            changed = exports_changed(exports.as_mut()) => {
                if !changed {
                    *exports = None;
                }
                *stale = true;
            }
            _ = tick.tick() => {
                keeper.keep_alive().await?;
                let hb = Heartbeat { time_ms: now_ms() };
                client.put(self.keys.heartbeat(&self.cluster), encode(&hb), with_lease()).await?;
            }
            msg = keepalive.message() => {
                match msg? {
                    Some(resp) if resp.ttl() > 0 => {}
                    Some(_) => anyhow::bail!("lease {lease} expired"),
                    None => anyhow::bail!("lease keep-alive stream closed"),
                }
            }
        }
        Ok(true)
    }
}
