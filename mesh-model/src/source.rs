//! The manifests source: a directory of Kubernetes YAML files (`*.yaml`, `*.yml`) turned into a
//! [`ClusterState`], watched for changes. Edge nodes without a kube-apiserver and the lab feed the daemons this way.
//!
//! A file that fails to parse keeps the objects it had before (bad input never loses state) and its error is
//! reported in the snapshot; a file that disappears takes its objects with it.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use crate::ClusterState;
use crate::manifests::{self, Object};

/// A consistent view of the directory.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Increases with every published change.
    pub generation: u64,
    pub state: Arc<ClusterState>,
    /// Problems in files whose previous objects are still in force.
    pub errors: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    ino: u64,
    size: u64,
    mtime: i64,
    mtime_nsec: i64,
}

#[derive(Debug)]
struct FileEntry {
    stamp: Stamp,
    objects: Vec<Object>,
}

/// The files of a manifests directory, parsed.
#[derive(Debug)]
pub struct ManifestDir {
    dir: PathBuf,
    files: BTreeMap<PathBuf, FileEntry>,
    errors: BTreeMap<PathBuf, String>,
    merge_error: Option<String>,
    last_good: ClusterState,
}

impl ManifestDir {
    #[must_use]
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_owned(),
            files: BTreeMap::new(),
            errors: BTreeMap::new(),
            merge_error: None,
            last_good: ClusterState::default(),
        }
    }

    /// Reads the directory again, re-parsing files that changed. Returns whether the state or the errors changed.
    ///
    /// # Errors
    /// When the directory itself cannot be read.
    pub fn rescan(&mut self) -> std::io::Result<bool> {
        let mut present = BTreeMap::new();
        for entry in std::fs::read_dir(&self.dir)? {
            let entry = entry?;
            let path = entry.path();
            let is_yaml = path.extension().is_some_and(|e| e == "yaml" || e == "yml");
            let hidden = path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with('.'));
            if !is_yaml || hidden {
                continue;
            }
            let Ok(meta) = std::fs::metadata(&path) else {
                continue;
            };
            if !meta.is_file() {
                continue;
            }
            let stamp = Stamp {
                ino: meta.ino(),
                size: meta.size(),
                mtime: meta.mtime(),
                mtime_nsec: meta.mtime_nsec(),
            };
            present.insert(path, stamp);
        }
        let mut changed = false;
        let removed: Vec<PathBuf> = self
            .files
            .keys()
            .filter(|p| !present.contains_key(*p))
            .cloned()
            .collect();
        for p in removed {
            info!(file = %p.display(), "manifest file removed");
            self.files.remove(&p);
            changed = true;
        }
        let before_errors = self.errors.len();
        self.errors.retain(|p, _| present.contains_key(p));
        changed |= before_errors != self.errors.len();
        for (path, stamp) in present {
            if self.files.get(&path).is_some_and(|f| f.stamp == stamp) {
                continue;
            }
            let text = match std::fs::read_to_string(&path) {
                Ok(t) => t,
                Err(e) => {
                    warn!(file = %path.display(), error = %e, "cannot read manifest file");
                    continue;
                }
            };
            let name = path.display().to_string();
            match manifests::parse_str(&name, &text) {
                Ok(objects) => {
                    debug!(file = %name, objects = objects.len(), "manifest file loaded");
                    self.files.insert(path.clone(), FileEntry { stamp, objects });
                    self.errors.remove(&path);
                    changed = true;
                }
                Err(e) => {
                    let msg = e.to_string();
                    if self.errors.get(&path) != Some(&msg) {
                        warn!(error = %msg, "manifest refused; the file's previous objects stay in force");
                        self.errors.insert(path.clone(), msg);
                        changed = true;
                    }
                    // Remember the stamp so the same broken content is not parsed again and again.
                    if let Some(f) = self.files.get_mut(&path) {
                        f.stamp = stamp;
                    } else {
                        self.files.insert(
                            path,
                            FileEntry {
                                stamp,
                                objects: Vec::new(),
                            },
                        );
                    }
                }
            }
        }
        if changed {
            let names: Vec<(String, &[Object])> = self
                .files
                .iter()
                .map(|(p, f)| (p.display().to_string(), f.objects.as_slice()))
                .collect();
            match manifests::merge(names.iter().map(|(n, o)| (n.as_str(), *o))) {
                Ok(state) => {
                    self.last_good = state;
                    self.merge_error = None;
                }
                Err(e) => {
                    warn!(error = %e, "manifests conflict; the previous state stays in force");
                    self.merge_error = Some(e);
                }
            }
        }
        Ok(changed)
    }

    /// The last consistent state.
    #[must_use]
    pub fn state(&self) -> &ClusterState {
        &self.last_good
    }

    /// Current problems, one line each.
    #[must_use]
    pub fn errors(&self) -> Vec<String> {
        self.errors
            .values()
            .cloned()
            .chain(self.merge_error.clone())
            .collect()
    }
}

/// Watches `dir` and publishes a [`Snapshot`] after the first scan and after every change. Uses inotify, with a
/// periodic rescan (`resync`) as a safety net. Returns when every receiver is gone.
///
/// # Errors
/// When the directory cannot be read at start.
pub async fn watch_dir(dir: PathBuf, tx: watch::Sender<Snapshot>, resync: Duration) -> std::io::Result<()> {
    let mut md = ManifestDir::new(&dir);
    md.rescan()?;
    let mut generation = 1;
    tx.send_replace(Snapshot {
        generation,
        state: Arc::new(md.state().clone()),
        errors: md.errors(),
    });
    let (ev_tx, mut ev_rx) = mpsc::unbounded_channel::<()>();
    let _watcher = match notify_watcher(&dir, ev_tx) {
        Ok(w) => Some(w),
        Err(e) => {
            warn!(dir = %dir.display(), error = %e, "cannot watch the manifests directory; polling only");
            None
        }
    };
    let mut tick = tokio::time::interval(resync);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = tx.closed() => return Ok(()),
            ev = ev_rx.recv() => {
                if ev.is_none() {
                    return Ok(());
                }
                while ev_rx.try_recv().is_ok() {}
            }
            _ = tick.tick() => {}
        }
        match md.rescan() {
            Ok(true) => {
                generation += 1;
                tx.send_replace(Snapshot {
                    generation,
                    state: Arc::new(md.state().clone()),
                    errors: md.errors(),
                });
            }
            Ok(false) => {}
            Err(e) => warn!(dir = %dir.display(), error = %e, "cannot read the manifests directory"),
        }
    }
}

/// Whether an inotify event may change what the directory holds. Reads are not changes: the rescan itself opens
/// and reads every file, and treating those events as changes made the watcher rescan in a busy loop.
fn is_change(kind: &notify::EventKind) -> bool {
    use notify::event::{AccessKind, AccessMode};
    match kind {
        notify::EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        notify::EventKind::Access(_) => false,
        _ => true,
    }
}

fn notify_watcher(dir: &Path, tx: mpsc::UnboundedSender<()>) -> notify::Result<notify::RecommendedWatcher> {
    use notify::Watcher as _;
    let mut w = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        if res.is_ok_and(|ev| is_change(&ev.kind)) {
            let _ = tx.send(());
        }
    })?;
    w.watch(dir, notify::RecursiveMode::NonRecursive)?;
    Ok(w)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NODE: &str = "apiVersion: v1\nkind: Node\nmetadata: {name: n1}\nspec: {podCIDR: 10.1.0.0/24}\nstatus: {addresses: [{type: InternalIP, address: 172.30.1.1}]}\n";
    const POD: &str = "apiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: x}\nspec: {nodeName: n1, containers: []}\n";

    #[test]
    fn broken_file_keeps_previous_objects() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = dir.path().join("a.yaml");
        std::fs::write(&f, format!("{NODE}---\n{POD}")).expect("write");
        let mut md = ManifestDir::new(dir.path());
        assert!(md.rescan().expect("scan"));
        assert_eq!(md.state().nodes.len(), 1);
        assert_eq!(md.state().pods.len(), 1);
        std::fs::write(&f, "kind: Pod\nmetadata: {name: p}\nspec: {bogus: 1}\n").expect("write");
        assert!(md.rescan().expect("scan"));
        assert_eq!(md.state().pods.len(), 1, "previous objects stay");
        assert_eq!(md.state().nodes.len(), 1, "previous objects stay");
        assert_eq!(md.errors().len(), 1);
        assert!(md.errors()[0].contains("a.yaml"), "{:?}", md.errors());
        assert!(
            !md.rescan().expect("scan"),
            "unchanged broken file is not re-reported"
        );
        std::fs::write(&f, NODE).expect("write");
        assert!(md.rescan().expect("scan"));
        assert!(md.errors().is_empty());
        assert_eq!(md.state().pods.len(), 0, "fixed file replaces the objects");
        std::fs::remove_file(&f).expect("rm");
        assert!(md.rescan().expect("scan"));
        assert!(md.state().nodes.is_empty());
    }

    const POLICY: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: api, namespace: shop}\nspec:\n  podSelector: {matchLabels: {app: api}}\n  ingress: [{ports: [{port: 8080}]}]\n";

    /// Editing a valid policy into an invalid one keeps the valid version in force and reports the error.
    #[test]
    fn invalid_policy_edit_keeps_the_previous_policy() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = dir.path().join("policy.yaml");
        std::fs::write(&f, POLICY).expect("write");
        let mut md = ManifestDir::new(dir.path());
        md.rescan().expect("scan");
        let before = md.state().network_policies.clone();
        assert_eq!(before.len(), 1);
        std::fs::write(&f, POLICY.replace("port: 8080", "port: 8080, endPort: 80")).expect("write");
        assert!(md.rescan().expect("scan"));
        assert_eq!(
            md.state().network_policies,
            before,
            "the previous version stays in force"
        );
        let errors = md.errors();
        assert!(
            errors.len() == 1
                && errors[0].contains("NetworkPolicy shop/api")
                && errors[0].contains("spec.ingress[0].ports[0].endPort"),
            "{errors:?}"
        );
        std::fs::write(&f, POLICY.replace("8080", "9090")).expect("write");
        assert!(md.rescan().expect("scan"));
        assert!(md.errors().is_empty());
        assert_ne!(
            md.state().network_policies,
            before,
            "the fixed version replaces it"
        );
    }

    #[test]
    fn duplicate_across_files_keeps_previous_state() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("a.yaml"), NODE).expect("write");
        let mut md = ManifestDir::new(dir.path());
        md.rescan().expect("scan");
        std::fs::write(dir.path().join("b.yml"), format!("{NODE}---\n{POD}")).expect("write");
        md.rescan().expect("scan");
        assert_eq!(md.state().pods.len(), 0, "conflicting change not applied");
        assert!(
            md.errors().iter().any(|e| e.contains("twice")),
            "{:?}",
            md.errors()
        );
    }

    #[test]
    fn reads_are_not_changes() {
        use notify::EventKind;
        use notify::event::{AccessKind, AccessMode, CreateKind, ModifyKind, RemoveKind};
        for k in [
            EventKind::Access(AccessKind::Open(AccessMode::Any)),
            EventKind::Access(AccessKind::Read),
            EventKind::Access(AccessKind::Close(AccessMode::Read)),
        ] {
            assert!(!is_change(&k), "{k:?}");
        }
        for k in [
            EventKind::Access(AccessKind::Close(AccessMode::Write)),
            EventKind::Create(CreateKind::File),
            EventKind::Modify(ModifyKind::Any),
            EventKind::Remove(RemoveKind::File),
            EventKind::Any,
        ] {
            assert!(is_change(&k), "{k:?}");
        }
    }

    #[tokio::test]
    async fn watch_publishes_changes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (tx, mut rx) = watch::channel(Snapshot::default());
        let task = tokio::spawn(watch_dir(dir.path().to_owned(), tx, Duration::from_secs(5)));
        rx.wait_for(|s| s.generation >= 1).await.expect("first snapshot");
        let tmp = dir.path().join(".tmp");
        std::fs::write(&tmp, NODE).expect("write");
        std::fs::rename(&tmp, dir.path().join("n.yaml")).expect("rename");
        let s = tokio::time::timeout(Duration::from_secs(3), rx.wait_for(|s| s.state.nodes.len() == 1))
            .await
            .expect("change seen within the deadline (inotify)")
            .expect("sender alive")
            .clone();
        assert!(s.generation >= 2);
        drop(rx);
        task.abort();
    }
}
