//! KVStoreMesh: the clustermesh-apiserver mirrors remote clusters into its own cluster's etcd, so that the agents
//! of this cluster read every remote cluster from their local etcd (one connection per remote cluster for the
//! whole cluster, instead of one per agent).
//!
//! For each peer file of `--kvstoremesh-config` (the agents' clustermesh config format), a mirror lists the peer's
//! records in pages at one revision, writes them under `<prefix>/kvstoremesh/<cluster>/` (the key below the
//! peer's prefix is kept), deletes what the cache holds beyond them, then follows the peer's watch. A status key
//! (`.../kvstoremesh-status`) tells agents whether the mirror is connected and when it last heard from the peer:
//! while it is not, agents keep the cached data and count the cluster unreachable from that time (their grace
//! period then withdraws its backends). The status key has a lease of [`STATUS_TTL_SECS`] that a running mirror keeps
//! alive: when the mirror dies (or hangs), the key goes, and agents treat the silent cache as unreachable too. Agents read a cluster through the cache with `prefix:` in their peer file.
//! A peer whose etcd does not hold its own cluster config is not mirrored. Every key under the peer's prefix is
//! mirrored, whatever its kind (nodes, services, identities, ips, synced markers), so new kinds need no change here.
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use etcd_client::{Client, ConnectOptions, EventType, GetOptions, WatchOptions};
use mesh_kvstore::etcd::{list_paged, watch_client};
use mesh_kvstore::etcd_pool::{Conn, Target, pool};
use mesh_kvstore::peer::RemoteConfig;
use mesh_kvstore::{Keys, KvstoremeshStatus, encode};
use tokio::task::JoinHandle;
use tracing::{info, instrument, warn};

use crate::publisher::{EtcdTls, now_ms, tls_options_of};

/// How often a mirror proves its peer alive (and keeps its status lease alive).
const PROBE_EVERY: Duration = Duration::from_secs(1);
/// Lease of the status key: a mirror silent for this long (stopped, hung, cut from its etcd) loses its status.
pub const STATUS_TTL_SECS: i64 = 10;

/// This cluster's etcd, where the cache lives.
#[derive(Debug, Clone)]
pub struct Local {
    pub endpoints: Vec<String>,
    pub tls: Option<EtcdTls>,
    pub keys: Keys,
    /// This cluster's name (a peer file of that name is skipped).
    pub cluster: String,
}

impl Local {
    /// The client of this cluster's etcd, shared by every mirror (held for as long as the caller uses it).
    async fn connect(&self) -> anyhow::Result<Arc<Conn>> {
        let opts = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_timeout(Duration::from_secs(5));
        let (target, opts) = pooled(&self.endpoints, self.tls.as_ref(), opts)?;
        Ok(pool().get(target, opts).await?)
    }
}

/// The pool target ([`mesh_kvstore::etcd_pool`]: endpoints and TLS material) and the connect options of an etcd,
/// its TLS files read once: the mirrors of N peers read through one fleet hub share one connection to it, not N.
fn pooled(
    endpoints: &[String],
    tls: Option<&EtcdTls>,
    opts: ConnectOptions,
) -> anyhow::Result<(Target, ConnectOptions)> {
    let pem = tls.map(EtcdTls::pem).transpose()?.unwrap_or_default();
    let opts = if tls.is_some() {
        opts.with_tls(tls_options_of(&pem))
    } else {
        opts
    };
    Ok((
        Target {
            endpoints: endpoints.to_vec(),
            tls: pem,
        },
        opts,
    ))
}

struct Mirror {
    name: String,
    cfg: RemoteConfig,
    local: Local,
    /// Key prefix of the peer's records in its etcd.
    peer_keys: Keys,
    last_alive_ms: u64,
}

/// The key segment below a prefix where KVStoreMesh caches live ([`Keys::kvstoremesh_prefix`]).
const KVSTOREMESH_SEGMENT: &str = "kvstoremesh/";

impl Mirror {
    fn cache_keys(&self) -> Keys {
        Keys::new(&self.local.keys.kvstoremesh_prefix(&self.name))
    }

    /// The cache key of a peer key; `None` for keys that are not the peer's own records: the peer's own
    /// KVStoreMesh cache of other clusters (`<prefix>/kvstoremesh/...`) is never mirrored, or two clusters that
    /// mirror each other would copy each other's copies without end, and a peer could publish records in the
    /// name of clusters it mirrors.
    fn cache_key(&self, peer_key: &str) -> Option<String> {
        let rest = peer_key.strip_prefix(&self.peer_keys.root())?;
        if rest.starts_with(KVSTOREMESH_SEGMENT) {
            return None;
        }
        Some(format!("{}{rest}", self.cache_keys().root()))
    }

    fn peer_tls(&self) -> anyhow::Result<Option<EtcdTls>> {
        Ok(self.cfg.trusted_ca_file.clone().map(|ca| EtcdTls {
            ca,
            identity: self.cfg.cert_file.clone().zip(self.cfg.key_file.clone()),
        }))
    }

    async fn set_status(
        &self,
        local: &mut Client,
        connected: bool,
        reason: &str,
        lease: i64,
    ) -> anyhow::Result<()> {
        let st = KvstoremeshStatus {
            connected,
            last_alive_ms: self.last_alive_ms,
            reason: reason.to_owned(),
        };
        local
            .put(
                self.cache_keys().kvstoremesh_status(),
                encode(&st),
                Some(etcd_client::PutOptions::new().with_lease(lease)),
            )
            .await?;
        Ok(())
    }

    async fn run(mut self) {
        let mut backoff = mesh_kvstore::etcd::Reconnect::default();
        loop {
            let started = std::time::Instant::now();
            let reason = match self.session().await {
                Ok(()) => "watch stream ended".to_owned(),
                Err(e) => format!("{e:#}"),
            };
            warn!(cluster = %self.name, reason = %reason, "KVStoreMesh lost the cluster");
            match self.local.connect().await {
                Ok(conn) => {
                    let mut local = conn.client.clone();
                    // Under a lease of its own: a mirror that stops retrying leaves no status behind.
                    let put = async {
                        let lease = local.lease_grant(STATUS_TTL_SECS, None).await?.id();
                        self.set_status(&mut local, false, &reason, lease).await
                    };
                    if let Err(e) = put.await {
                        warn!(cluster = %self.name, error = %e, "writing the KVStoreMesh status");
                    }
                }
                Err(e) => warn!(cluster = %self.name, error = %e, "connecting to the local etcd"),
            }
            tokio::time::sleep(backoff.after(started.elapsed())).await;
        }
    }

    #[instrument(skip_all, fields(cluster = %self.name))]
    async fn session(&mut self) -> anyhow::Result<()> {
        let opts = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_timeout(Duration::from_secs(5))
            .with_keep_alive(PROBE_EVERY, PROBE_EVERY);
        let (target, opts) = pooled(&self.cfg.endpoints, self.peer_tls()?.as_ref(), opts)?;
        let conn = pool()
            .get(target, opts)
            .await
            .context("connecting to the peer's etcd")?;
        let result = self.session_on(&conn.client).await;
        if let Err(e) = &result {
            pool().ended(&conn, e.as_ref()).await;
        }
        result
    }

    /// A session on the (shared) client of the peer's etcd.
    async fn session_on(&mut self, peer: &Client) -> anyhow::Result<()> {
        let local_conn = self
            .local
            .connect()
            .await
            .context("connecting to the local etcd")?;
        let mut local = local_conn.client.clone();
        let (records, revision) = list_paged(peer, &self.peer_keys.root()).await?;
        anyhow::ensure!(
            records
                .iter()
                .any(|(k, _)| *k == self.peer_keys.cluster_config(&self.name)),
            "the etcd at {} does not hold cluster {:?}'s config: not mirrored",
            self.cfg.endpoints.join(","),
            self.name
        );
        self.last_alive_ms = now_ms();
        // Bring the cache to the peer's state: changed and new keys, then what disappeared.
        let (cached, _) = list_paged(&local, &self.cache_keys().root()).await?;
        let cached: BTreeMap<String, Vec<u8>> = cached.into_iter().collect();
        let status_key = self.cache_keys().kvstoremesh_status();
        let mut wanted = BTreeMap::new();
        for (k, v) in records {
            if let Some(ck) = self.cache_key(&k) {
                wanted.insert(ck, v);
            }
        }
        let (mut puts, mut deletes) = (0, 0);
        for (k, v) in &wanted {
            if cached.get(k) != Some(v) {
                local.put(k.as_str(), v.clone(), None).await?;
                puts += 1;
            }
        }
        for k in cached
            .keys()
            .filter(|k| !wanted.contains_key(*k) && **k != status_key)
        {
            local.delete(k.as_str(), None).await?;
            deletes += 1;
        }
        let lease = local.lease_grant(STATUS_TTL_SECS, None).await?.id();
        let (mut keeper, mut keepalive) = local.lease_keep_alive(lease).await?;
        self.set_status(&mut local, true, "", lease).await?;
        info!(
            records = wanted.len(),
            puts, deletes, revision, "KVStoreMesh: cluster mirrored"
        );

        let mut stream = watch_client(peer)
            .watch(
                self.peer_keys.root(),
                Some(
                    WatchOptions::new()
                        .with_prefix()
                        .with_start_revision(revision + 1),
                ),
            )
            .await?;
        let mut probe = tokio::time::interval(PROBE_EVERY);
        probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let heartbeat = self.peer_keys.heartbeat(&self.name);
        let mut kv = peer.kv_client();
        loop {
            tokio::select! {
                msg = stream.message() => {
                    let Some(resp) = msg? else { return Ok(()) };
                    if resp.canceled() {
                        anyhow::bail!("watch canceled by etcd: {}", resp.cancel_reason());
                    }
                    for ev in resp.events() {
                        let Some(kv) = ev.kv() else { continue };
                        let Some(ck) = kv.key_str().ok().and_then(|k| self.cache_key(k)) else { continue };
                        match ev.event_type() {
                            EventType::Put => {
                                local.put(ck, kv.value().to_vec(), None).await?;
                            }
                            EventType::Delete => {
                                local.delete(ck, None).await?;
                            }
                        }
                    }
                    self.last_alive_ms = now_ms();
                }
                _ = probe.tick() => {
                    let get = kv.get(heartbeat.as_str(), Some(GetOptions::new().with_keys_only()));
                    match tokio::time::timeout(PROBE_EVERY, get).await {
                        Ok(Ok(_)) => self.last_alive_ms = now_ms(),
                        Ok(Err(e)) => anyhow::bail!("liveness probe failed: {e}"),
                        Err(_) => anyhow::bail!("liveness probe got no answer within {PROBE_EVERY:?}"),
                    }
                    // The status lives as long as this mirror answers.
                    keeper.keep_alive().await.context("keeping the status lease alive")?;
                    match keepalive.message().await.context("status lease keep-alive")? {
                        Some(r) if r.ttl() > 0 => {}
                        Some(_) => anyhow::bail!("status lease {lease} expired"),
                        None => anyhow::bail!("status lease keep-alive stream closed"),
                    }
                }
            }
        }
    }
}

/// Runs a mirror for every peer file of `dir` that `selector` selects (none: every one; read at start; errors in
/// files are logged and the file skipped).
pub fn start(
    dir: &Path,
    selector: Option<&mesh_kvstore::peer::PeerSelector>,
    local: &Local,
) -> Vec<JoinHandle<()>> {
    let (configs, errors) = mesh_kvstore::peer::read_config_dir(dir, &local.cluster);
    for e in errors {
        warn!(error = %e, "KVStoreMesh config");
    }
    let (configs, unselected): (Vec<_>, Vec<_>) = configs
        .into_iter()
        .partition(|(_, cfg)| mesh_kvstore::peer::selects(selector, cfg));
    if !unselected.is_empty() {
        info!(
            selector = ?selector,
            clusters = ?unselected.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
            "KVStoreMesh: peers the membership selector leaves out are not mirrored"
        );
    }
    configs
        .into_iter()
        .map(|(name, cfg)| {
            info!(cluster = %name, endpoints = ?cfg.endpoints, "KVStoreMesh: mirroring cluster");
            let peer_keys = cfg
                .prefix
                .as_deref()
                .map_or_else(|| local.keys.clone(), Keys::new);
            let m = Mirror {
                name,
                cfg,
                local: local.clone(),
                peer_keys,
                last_alive_ms: now_ms(),
            };
            tokio::spawn(m.run())
        })
        .collect()
}
