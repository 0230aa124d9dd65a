//! The remote-cluster watchers (`mesh_agent::remote::manage`) of agent `east-node-1` (cluster east, id 1), for
//! the tests that play peer clusters with a real etcd.
use std::time::Duration;

use mesh_agent::desired::LocalNode;
use mesh_agent::remote::{RemoteCluster, Remotes, manage};
use mesh_kvstore::Keys;
use mesh_testkit::{Etcd, eventually};

/// How long a watcher may take to show a change.
pub const TIMEOUT: Duration = Duration::from_secs(15);

/// `manage` with one peer file per `(name, text)` in a temporary clustermesh config directory; the task is aborted
/// on drop.
pub struct Agent {
    pub remotes: Remotes,
    _wake: std::sync::mpsc::Receiver<()>,
    task: tokio::task::JoinHandle<()>,
    pub config: tempfile::TempDir,
}

impl Agent {
    /// Watches the peers of `files`.
    pub fn start(files: &[(&str, String)]) -> Self {
        Self::start_claiming(files, &[])
    }

    /// As [`Agent::start`], with east's own nodes claiming the pod CIDRs `local` (`(node, cidr)`) first.
    pub fn start_claiming(files: &[(&str, String)], local: &[(&str, &str)]) -> Self {
        Self::start_with(files, local, false)
    }

    /// As [`Agent::start`], with the membership selector file [`Agent::selector_file`] (absent until written).
    pub fn start_selecting(files: &[(&str, String)]) -> Self {
        Self::start_with(files, &[], true)
    }

    /// The membership selector file of an agent made by [`Agent::start_selecting`] (a dot file in the config
    /// directory, which the peer file reader skips).
    pub fn selector_file(&self) -> std::path::PathBuf {
        self.config.path().join(".peer-selector.yaml")
    }

    fn start_with(files: &[(&str, String)], local: &[(&str, &str)], selecting: bool) -> Self {
        let config = tempfile::tempdir().expect("tempdir");
        for (name, text) in files {
            std::fs::write(config.path().join(name), text).expect("write peer file");
        }
        let (wake, wake_rx) = std::sync::mpsc::channel();
        let remotes = Remotes::new(wake);
        if !local.is_empty() {
            remotes.set_local_pod_cidrs(
                "east",
                local
                    .iter()
                    .map(|(node, cidr)| ((*node).to_owned(), cidr.parse().expect("cidr")))
                    .collect(),
            );
        }
        let me = LocalNode {
            node: "east-node-1".into(),
            cluster: "east".into(),
            cluster_id: 1,
            labels: Default::default(),
        };
        let selector = selecting.then(|| config.path().join(".peer-selector.yaml"));
        let task = tokio::spawn(manage(
            config.path().to_owned(),
            selector,
            me,
            Keys::default(),
            remotes.clone(),
        ));
        Self {
            remotes,
            _wake: wake_rx,
            task,
            config,
        }
    }

    /// Waits until `cluster` satisfies `check`, and returns it.
    pub async fn wait(
        &self,
        cluster: &str,
        what: &str,
        check: impl Fn(&RemoteCluster) -> Result<(), String>,
    ) -> RemoteCluster {
        eventually(what, TIMEOUT, || {
            let r = match self.remotes.snapshot().remove(cluster) {
                Some(rc) => check(&rc)
                    .map(|()| rc.clone())
                    .map_err(|e| format!("{e}; {cluster}: {rc:?}")),
                None => Err(format!("{cluster} not known")),
            };
            async move { r }
        })
        .await
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A peer file for `etcd`, with `extra` lines (e.g. `prefix: ...` or pins).
pub fn peer_file(etcd: &Etcd, extra: &str) -> String {
    format!("endpoints:\n  - {}\n{extra}", etcd.url())
}
