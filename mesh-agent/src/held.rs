//! Peers' security identities as last synced, kept on disk (`<state dir>/peer-identities.json`): an agent
//! restarted while a peer is away still knows the peer's identities, so that policies admitting its pods keep
//! admitting them (their addresses stay in the adopted ipcache, see `reconcile::HeldPeers`) until the peer has
//! synced again in the new process.
//!
//! Written at most every [`WRITE_EVERY`] while some synced peer's identities changed; read once at start.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mesh_kvstore::IdentityRecord;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::reconcile::settled;
use crate::remote::RemoteCluster;

/// Least time between two writes of the file.
pub const WRITE_EVERY: Duration = Duration::from_secs(5);

/// One peer's identities: its cluster id, and the labels of each identity.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HeldCluster {
    pub cluster_id: u16,
    pub identities: BTreeMap<u32, BTreeMap<String, String>>,
}

/// The peers' identities an earlier agent saw, and what this one has written.
#[derive(Debug, Default)]
pub struct IdentityStore {
    file: Option<PathBuf>,
    /// Read at start, by peer name; each goes once its peer is settled.
    held: BTreeMap<String, HeldCluster>,
    /// What the file holds now: per peer (cluster id, number of identities, their generation).
    written: BTreeMap<String, (u16, usize, u64)>,
    last_write: Option<Instant>,
    /// The thread writing the file, if one was started.
    writer: Option<std::thread::JoinHandle<()>>,
}

/// What says a peer's identities changed, without reading them: its id, their number and generation.
fn fingerprint(rc: &RemoteCluster) -> (u16, usize, u64) {
    (
        rc.cluster_id.unwrap_or(0),
        rc.identities.len(),
        rc.identity_generation,
    )
}

impl IdentityStore {
    /// Reads `file` (missing or unreadable: nothing is held).
    #[must_use]
    pub fn load(file: PathBuf) -> Self {
        let held: BTreeMap<String, HeldCluster> = match std::fs::read(&file) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                warn!(file = %file.display(), error = %e, "peer identities unreadable; none held");
                BTreeMap::new()
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => {
                warn!(file = %file.display(), error = %e, "peer identities unreadable; none held");
                BTreeMap::new()
            }
        };
        if !held.is_empty() {
            info!(
                peers = held.len(),
                "peer identities of the last run held until each peer has synced"
            );
        }
        Self {
            file: Some(file),
            held,
            ..Self::default()
        }
    }

    /// `remotes` with the held identities of every peer that is not settled yet and knows none of its own; `None`
    /// when nothing is held any more (the common case: no copy).
    pub fn patch(
        &mut self,
        remotes: &BTreeMap<String, RemoteCluster>,
        configured: bool,
    ) -> Option<BTreeMap<String, RemoteCluster>> {
        if self.held.is_empty() {
            return None;
        }
        self.held.retain(|name, h| {
            remotes.contains_key(name) && !settled(h.cluster_id, remotes, configured)
                || !configured && !remotes.contains_key(name)
        });
        if self.held.is_empty() {
            return None;
        }
        let mut out = remotes.clone();
        for (name, h) in &self.held {
            let Some(rc) = out.get_mut(name).filter(|rc| rc.identities.is_empty()) else {
                continue;
            };
            for (id, labels) in &h.identities {
                rc.identities.insert(
                    *id,
                    Arc::new(IdentityRecord {
                        cluster: name.clone(),
                        cluster_id: h.cluster_id,
                        identity: *id,
                        labels: labels.clone(),
                    }),
                );
            }
        }
        Some(out)
    }

    /// Writes the identities of every synced, usable peer when they changed (at most every [`WRITE_EVERY`]). The
    /// file is serialised and written by a thread of its own, from a snapshot that shares the records (the
    /// peers' persistent maps): the control loop pays O(peers), not O(identities). While a write runs, the next
    /// one waits for a later call.
    pub fn save(&mut self, remotes: &BTreeMap<String, RemoteCluster>) {
        let Some(file) = &self.file else { return };
        if self.writer.as_ref().is_some_and(|w| !w.is_finished()) {
            return;
        }
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
        let synced = |rc: &&RemoteCluster| rc.usable && rc.syncs > 0 && rc.cluster_id.is_some();
        let now: BTreeMap<String, (u16, usize, u64)> = remotes
            .values()
            .filter(synced)
            .map(|rc| (rc.name.clone(), fingerprint(rc)))
            .collect();
        // Peers not synced yet keep what the file had of them.
        let unchanged = now.iter().all(|(n, f)| self.written.get(n) == Some(f));
        if unchanged || self.last_write.is_some_and(|t| t.elapsed() < WRITE_EVERY) {
            return;
        }
        let snapshot = Snapshot {
            held: self
                .held
                .iter()
                .filter(|(n, _)| !now.contains_key(*n))
                .map(|(n, h)| (n.clone(), h.clone()))
                .collect(),
            synced: remotes
                .values()
                .filter(synced)
                .map(|rc| (rc.name.clone(), rc.cluster_id.unwrap_or(0), rc.identities.clone()))
                .collect(),
        };
        let file = file.clone();
        self.last_write = Some(Instant::now());
        // What the file will hold; a failed write is logged and tried again after the next change.
        self.written = now;
        self.writer = Some(std::thread::spawn(move || {
            let write = || -> std::io::Result<()> {
                if let Some(dir) = file.parent() {
                    std::fs::create_dir_all(dir)?;
                }
                let tmp = file.with_extension("json.tmp");
                std::fs::write(&tmp, serde_json::to_vec(&snapshot)?)?;
                std::fs::rename(&tmp, &file)
            };
            if let Err(e) = write() {
                warn!(file = %file.display(), error = %e, "writing peer identities");
            }
        }));
    }

    /// Waits for a write in progress.
    pub fn flush(&mut self) {
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
    }
}

/// What one write of the file holds: peers still held from the file, and the synced peers' identities (shared
/// with the tables they came from). Serialised as `BTreeMap<String, HeldCluster>`.
struct Snapshot {
    held: Vec<(String, HeldCluster)>,
    synced: Vec<(String, u16, imbl::OrdMap<u32, Arc<IdentityRecord>>)>,
}

impl Serialize for Snapshot {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap as _;
        struct Labels<'a>(&'a imbl::OrdMap<u32, Arc<IdentityRecord>>);
        impl Serialize for Labels<'_> {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_map(self.0.iter().map(|(id, r)| (id, &r.labels)))
            }
        }
        #[derive(Serialize)]
        #[serde(rename_all = "camelCase")]
        struct Cluster<'a> {
            cluster_id: u16,
            identities: Labels<'a>,
        }
        let mut all: Vec<(&str, Option<&HeldCluster>, Option<Cluster<'_>>)> = self
            .held
            .iter()
            .map(|(n, h)| (n.as_str(), Some(h), None))
            .chain(self.synced.iter().map(|(n, id, ids)| {
                (
                    n.as_str(),
                    None,
                    Some(Cluster {
                        cluster_id: *id,
                        identities: Labels(ids),
                    }),
                )
            }))
            .collect();
        all.sort_by(|a, b| a.0.cmp(b.0));
        let mut m = s.serialize_map(Some(all.len()))?;
        for (name, held, synced) in &all {
            match (held, synced) {
                (Some(h), _) => m.serialize_entry(name, h)?,
                (None, Some(c)) => m.serialize_entry(name, c)?,
                (None, None) => {}
            }
        }
        m.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::remote::SyncState;

    fn west(synced: bool, ids: &[u32]) -> BTreeMap<String, RemoteCluster> {
        let mut w = RemoteCluster::new("west");
        w.cluster_id = Some(2);
        if synced {
            w.state = SyncState::Synced { since_ms: 1 };
            w.syncs = 1;
        }
        for n in ids {
            let id = mesh_common::identity::compose(2, *n);
            w.identities.insert(
                id,
                Arc::new(IdentityRecord {
                    cluster: "west".into(),
                    cluster_id: 2,
                    identity: id,
                    labels: [("app".to_owned(), "client".to_owned())].into(),
                }),
            );
        }
        [("west".to_owned(), w)].into()
    }

    #[test]
    fn a_restarted_agent_knows_a_peers_identities_until_the_peer_has_synced() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("peer-identities.json");
        let mut before = IdentityStore::load(file.clone());
        assert!(before.patch(&west(true, &[300]), true).is_none(), "nothing held");
        before.save(&west(true, &[300, 301]));
        before.flush();
        assert!(file.is_file());

        // The next agent: west is away (its watcher has not heard from it).
        let mut after = IdentityStore::load(file.clone());
        let patched = after.patch(&west(false, &[]), true).expect("held identities");
        let ids: Vec<u32> = patched["west"].identities.keys().copied().collect();
        let compose = mesh_common::identity::compose;
        assert_eq!(ids, vec![compose(2, 300), compose(2, 301)]);
        assert_eq!(
            patched["west"].identities[&compose(2, 300)].labels["app"],
            "client"
        );
        // Not synced yet, nothing it saves replaces west's entry in the file.
        after.save(&west(false, &[]));
        after.flush();
        assert!(IdentityStore::load(file).held.contains_key("west"));
        // West synced: its own records count, the held ones go.
        assert!(after.patch(&west(true, &[302]), true).is_none());
        assert!(after.held.is_empty());
    }

    #[test]
    fn an_unreadable_file_holds_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("peer-identities.json");
        std::fs::write(&file, "{not json").expect("write");
        let mut s = IdentityStore::load(file);
        assert!(s.patch(&west(false, &[]), true).is_none());
    }
}
