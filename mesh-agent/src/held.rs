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

    /// Writes the identities of every synced, usable peer when they changed (at most every [`WRITE_EVERY`]).
    pub fn save(&mut self, remotes: &BTreeMap<String, RemoteCluster>) {
        let Some(file) = &self.file else { return };
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
        let mut all: BTreeMap<String, HeldCluster> = self.held.clone();
        for rc in remotes.values().filter(synced) {
            all.insert(
                rc.name.clone(),
                HeldCluster {
                    cluster_id: rc.cluster_id.unwrap_or(0),
                    identities: rc
                        .identities
                        .iter()
                        .map(|(id, r)| (*id, r.labels.clone()))
                        .collect(),
                },
            );
        }
        let write = || -> std::io::Result<()> {
            if let Some(dir) = file.parent() {
                std::fs::create_dir_all(dir)?;
            }
            let tmp = file.with_extension("json.tmp");
            std::fs::write(&tmp, serde_json::to_vec(&all)?)?;
            std::fs::rename(&tmp, file)
        };
        self.last_write = Some(Instant::now());
        match write() {
            Ok(()) => self.written = now,
            Err(e) => warn!(file = %file.display(), error = %e, "writing peer identities"),
        }
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
