//! One etcd client per distinct etcd (endpoints and TLS identity), shared by every remote watcher of a process: an
//! agent that reads N peers through one fleet hub (or N KVStoreMesh caches in its own etcd) holds one connection to
//! it, not N, and so does a clustermesh-apiserver's KVStoreMesh mirroring N peers from a hub (docs/fleet-hub.md). Watches and requests of the watchers multiplex over that connection's HTTP/2
//! channel; each watcher keeps its own session, state, refusals and limits.
//!
//! A client talks to one endpoint of its set at a time. When a watcher's session ends because that endpoint is
//! unreachable ([`is_unreachable`]), the client is retired: the next session of any watcher connects to the next
//! endpoint (members of a hub, in turn); sessions still running on the old client move to the current one at their
//! next liveness probe ([`Pool::is_current`]), so that the agent ends up with one client again.
//! Errors that are not about the connection (a permission refused, a malformed answer) leave the client alone.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Weak};

use etcd_client::{Client, ConnectOptions};
use tokio::sync::Mutex;

/// What makes two peers' etcds the same: the endpoints and the TLS material (file contents, so that copies of one
/// certificate in several peer folders share, and a renewed certificate gets a new client).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Target {
    pub endpoints: Vec<String>,
    /// CA, certificate and key (PEM) as read at connection time; empty without TLS.
    pub tls: Vec<Vec<u8>>,
}

/// A shared client, held by a session for as long as it runs.
pub struct Conn {
    pub client: Client,
    /// The endpoint it talks to.
    pub endpoint: String,
    target: Target,
    generation: u64,
    /// When the etcd last answered on this client (Unix ms; any session's probe or watch message), so that the
    /// sessions sharing it need not each prove it alive: a thousand peers read through one hub cost a probe or
    /// two per interval, not a thousand.
    last_answer_ms: std::sync::atomic::AtomicU64,
}

impl Conn {
    /// Notes an answer from the etcd now.
    pub fn answered(&self) {
        self.last_answer_ms
            .fetch_max(now_ms(), std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether the etcd answered on this client within `d`.
    #[must_use]
    pub fn answered_within(&self, d: std::time::Duration) -> bool {
        let last = self.last_answer_ms.load(std::sync::atomic::Ordering::Relaxed);
        let d = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        last != 0 && now_ms().saturating_sub(last) < d
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[derive(Default)]
struct Entry {
    conn: Weak<Conn>,
    /// Index (modulo the endpoint count) of the endpoint the next client connects to.
    next: usize,
    generation: u64,
}

/// The process's clients (process-wide: every peer with the same target shares one).
#[derive(Default)]
pub struct Pool {
    entries: Mutex<HashMap<Target, Entry>>,
}

static POOL: LazyLock<Pool> = LazyLock::new(Pool::default);

/// The process-wide pool.
#[must_use]
pub fn pool() -> &'static Pool {
    &POOL
}

/// A session ended because the etcd did not answer (rather than refused something): the shared client is
/// retired (see the module documentation).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Unreachable(pub String);

/// Whether `e` says the etcd could not be reached (transport errors, gRPC `Unavailable`, `DeadlineExceeded`,
/// `Cancelled`, `Unknown`, an unanswered probe), as opposed to a refusal.
#[must_use]
pub fn is_unreachable(e: &(dyn std::error::Error + 'static)) -> bool {
    use tonic::Code;
    std::iter::successors(Some(e), |c| c.source()).any(|c| {
        c.is::<Unreachable>()
            || c.downcast_ref::<etcd_client::Error>().is_some_and(|e| match e {
                etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => true,
                etcd_client::Error::GRpcStatus(s) => matches!(
                    s.code(),
                    Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown
                ),
                _ => false,
            })
    })
}

impl Pool {
    /// The client of `target`: the running one, or a new one connected with `opts` to the target's current
    /// endpoint.
    ///
    /// # Errors
    /// When a new client cannot connect.
    pub async fn get(&self, target: Target, opts: ConnectOptions) -> Result<Arc<Conn>, etcd_client::Error> {
        let mut entries = self.entries.lock().await;
        // Entries stay when no session holds their client (between sessions, after a loss): they remember which
        // endpoint is next. One per target the agent ever used: a few KiB per peer file or certificate change.
        let entry = entries.entry(target.clone()).or_insert_with(|| Entry {
            // Agents of a cluster start at different members, so that a hub's load spreads.
            next: usize::try_from(std::process::id()).unwrap_or_default(),
            ..Entry::default()
        });
        if let Some(conn) = entry.conn.upgrade() {
            return Ok(conn);
        }
        let n = target.endpoints.len().max(1);
        let endpoint = target.endpoints.get(entry.next % n).cloned().unwrap_or_default();
        let client = match Client::connect([endpoint.as_str()], Some(opts)).await {
            Ok(c) => c,
            Err(e) => {
                // The next attempt tries the next endpoint.
                entry.next = entry.next.wrapping_add(1);
                return Err(e);
            }
        };
        entry.generation += 1;
        let conn = Arc::new(Conn {
            client,
            endpoint,
            target,
            generation: entry.generation,
            last_answer_ms: std::sync::atomic::AtomicU64::new(0),
        });
        entry.conn = Arc::downgrade(&conn);
        Ok(conn)
    }

    /// A session on `conn` ended with `e`: when the etcd was unreachable, the client is retired and the next one
    /// connects to the next endpoint.
    pub async fn ended(&self, conn: &Conn, e: &(dyn std::error::Error + Send + Sync + 'static)) {
        if !is_unreachable(e) {
            return;
        }
        let mut entries = self.entries.lock().await;
        if let Some(entry) = entries.get_mut(&conn.target)
            && entry.generation == conn.generation
        {
            entry.conn = Weak::new();
            entry.next = entry.next.wrapping_add(1);
        }
    }

    /// Whether `conn` is still the client of its target: false once it was retired (a session on it found its
    /// endpoint unreachable), when the sessions still on it should move to the current one.
    pub async fn is_current(&self, conn: &Conn) -> bool {
        self.entries
            .lock()
            .await
            .get(&conn.target)
            .is_some_and(|e| e.generation == conn.generation && e.conn.strong_count() > 0)
    }

    /// How many clients are alive (for tests and status).
    pub async fn clients(&self) -> usize {
        self.entries
            .lock()
            .await
            .values()
            .filter(|e| e.conn.strong_count() > 0)
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unreachable_is_told_from_refusals() {
        let down = anyhow::Error::new(Unreachable("liveness probe got no answer".into()));
        assert!(is_unreachable(down.as_ref()));
        let unavailable = anyhow::Error::new(etcd_client::Error::GRpcStatus(tonic::Status::unavailable("x")))
            .context("listing");
        assert!(is_unreachable(unavailable.as_ref()));
        let denied = anyhow::Error::new(etcd_client::Error::GRpcStatus(tonic::Status::permission_denied(
            "x",
        )));
        assert!(!is_unreachable(denied.as_ref()));
        assert!(!is_unreachable(anyhow::anyhow!("reading /x: not found").as_ref()));
    }

    #[tokio::test]
    async fn peers_of_one_etcd_share_a_client_and_a_lost_endpoint_moves_to_the_next() {
        let etcd = mesh_testkit::Etcd::start().await;
        let pool = Pool::default();
        let dead = "http://127.0.0.1:1".to_owned();
        let target = Target {
            endpoints: vec![etcd.url(), dead.clone()],
            tls: Vec::new(),
        };
        let opts = || {
            ConnectOptions::new()
                .with_connect_timeout(std::time::Duration::from_millis(500))
                .with_timeout(std::time::Duration::from_secs(2))
        };
        // Start on the live endpoint whatever the process id.
        pool.entries.lock().await.insert(target.clone(), Entry::default());
        let a = pool.get(target.clone(), opts()).await.expect("first");
        let b = pool.get(target.clone(), opts()).await.expect("second");
        assert!(Arc::ptr_eq(&a, &b), "one client for one target");
        assert!(
            !a.answered_within(std::time::Duration::from_secs(60)),
            "no answer yet"
        );
        b.answered();
        assert!(
            a.answered_within(std::time::Duration::from_secs(60)),
            "an answer is shared"
        );
        assert!(!a.answered_within(std::time::Duration::ZERO));
        assert_eq!(pool.clients().await, 1);
        // A refusal keeps the client.
        let denied = anyhow::Error::new(etcd_client::Error::GRpcStatus(tonic::Status::permission_denied(
            "x",
        )));
        pool.ended(&a, denied.as_ref()).await;
        let c = pool.get(target.clone(), opts()).await.expect("kept");
        assert!(Arc::ptr_eq(&a, &c));
        // Unreachable: the next client talks to the next endpoint (here a dead one: the connect fails, and the
        // attempt after it is on the live one again).
        assert!(pool.is_current(&a).await);
        pool.ended(&a, anyhow::Error::new(Unreachable("gone".into())).as_ref())
            .await;
        assert!(!pool.is_current(&a).await, "retired: its sessions move on");
        drop((a, b, c));
        match pool.get(target.clone(), opts()).await {
            Ok(conn) => assert_eq!(conn.endpoint, dead, "moved to the next endpoint"),
            Err(_) => {
                let conn = pool
                    .get(target.clone(), opts())
                    .await
                    .expect("back on the live endpoint");
                assert_eq!(conn.endpoint, etcd.url());
            }
        }
    }
}
