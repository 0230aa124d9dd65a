//! The daemons' choice of cluster state source (`--source manifests|kubernetes`): one place that checks the
//! configuration at start, with messages that say what to fix, and runs the chosen source.

use std::fmt;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::str::FromStr;
use std::time::Duration;

use mesh_model::source::Snapshot;
use tokio::sync::watch;
use tracing::{info, instrument};

use crate::source::{self, Scope};

/// How often the manifests source rescans its directory besides inotify.
const MANIFESTS_RESYNC: Duration = Duration::from_secs(2);

/// Where a daemon's cluster state comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SourceKind {
    /// A directory of manifests (edge nodes without an API server, the lab).
    #[default]
    Manifests,
    /// The cluster's Kubernetes API server.
    Kubernetes,
}

impl FromStr for SourceKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "manifests" => Ok(Self::Manifests),
            "kubernetes" => Ok(Self::Kubernetes),
            other => Err(format!("{other:?}: the source is `manifests` or `kubernetes`")),
        }
    }
}

impl fmt::Display for SourceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Manifests => "manifests",
            Self::Kubernetes => "kubernetes",
        })
    }
}

/// A source that could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("--source manifests needs --manifests DIR (or FLEETMESH_MANIFESTS)")]
    NoManifestsDir,
    #[error("manifests directory {0} does not exist or is not a directory")]
    NotADirectory(PathBuf),
    #[error("manifests directory {dir}: {source}")]
    Manifests {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Kubernetes(#[from] source::Error),
}

/// The running source: publishes on its channel until every receiver is gone.
pub type RunningSource = Pin<Box<dyn Future<Output = Result<(), SourceError>> + Send>>;

/// Checks the chosen source (the directory exists; the API server answers) and returns it, ready to be spawned.
///
/// # Errors
/// `--manifests` missing or not a directory; no Kubernetes configuration, or the API server unreachable.
#[instrument(skip(tx))]
pub async fn start_source(
    kind: SourceKind,
    manifests: Option<PathBuf>,
    scope: Scope,
    tx: watch::Sender<Snapshot>,
) -> Result<RunningSource, SourceError> {
    match kind {
        SourceKind::Manifests => {
            let dir = manifests.ok_or(SourceError::NoManifestsDir)?;
            if !dir.is_dir() {
                return Err(SourceError::NotADirectory(dir));
            }
            info!(dir = %dir.display(), "cluster state from a manifests directory");
            Ok(Box::pin(async move {
                mesh_model::source::watch_dir(dir.clone(), tx, MANIFESTS_RESYNC)
                    .await
                    .map_err(|source| SourceError::Manifests { dir, source })
            }))
        }
        SourceKind::Kubernetes => {
            // Checked before connecting, so a bad node name is reported as such.
            scope.pod_field_selector()?;
            let client = source::connect().await?;
            info!(?scope, "cluster state from the Kubernetes API server");
            Ok(Box::pin(async move {
                source::watch_kubernetes(client, scope, tx)
                    .await
                    .map_err(SourceError::from)
            }))
        }
    }
}

/// As [`start_source`] for the clustermesh-apiserver (the whole cluster): with `--source kubernetes` it also
/// writes the status of every `TrafficPolicy`, `StagedRollout` and `MeshNetworkPolicy` ([`crate::status`]) and
/// summarizes every `StagedRollout`'s progress from the agents' `MeshNode`s ([`crate::progress`]).
///
/// # Errors
/// As [`start_source`].
#[instrument(skip(tx))]
pub async fn start_cluster_source(
    kind: SourceKind,
    manifests: Option<PathBuf>,
    tx: watch::Sender<Snapshot>,
) -> Result<RunningSource, SourceError> {
    match kind {
        SourceKind::Manifests => start_source(kind, manifests, Scope::Cluster, tx).await,
        SourceKind::Kubernetes => {
            let client = source::connect().await?;
            info!("cluster state from the Kubernetes API server, writing the status of fleetmesh objects");
            Ok(Box::pin(async move {
                source::watch_kubernetes_writing_status(client, tx)
                    .await
                    .map_err(SourceError::from)
            }))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_parse_and_print() {
        for k in [SourceKind::Manifests, SourceKind::Kubernetes] {
            assert_eq!(k.to_string().parse::<SourceKind>(), Ok(k));
        }
        assert!(
            "etcd"
                .parse::<SourceKind>()
                .expect_err("unknown")
                .contains("manifests")
        );
    }

    #[tokio::test]
    async fn manifests_source_needs_a_directory() {
        let (tx, _rx) = watch::channel(Snapshot::default());
        let err = start_source(SourceKind::Manifests, None, Scope::Cluster, tx.clone())
            .await
            .err();
        assert!(matches!(err, Some(SourceError::NoManifestsDir)), "{err:?}");
        let missing = PathBuf::from("/nonexistent/fleetmesh-manifests");
        let err = start_source(
            SourceKind::Manifests,
            Some(missing.clone()),
            Scope::Cluster,
            tx.clone(),
        )
        .await
        .err();
        assert!(
            matches!(&err, Some(SourceError::NotADirectory(d)) if *d == missing),
            "{err:?}"
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let (tx, mut rx) = watch::channel(Snapshot::default());
        let running = start_source(
            SourceKind::Manifests,
            Some(dir.path().to_owned()),
            Scope::Cluster,
            tx,
        )
        .await
        .expect("a directory");
        let task = tokio::spawn(running);
        rx.changed().await.expect("first snapshot");
        assert_eq!(rx.borrow().generation, 1);
        task.abort();
    }

    #[tokio::test]
    async fn kubernetes_source_refuses_a_bad_node_name_before_connecting() {
        let (tx, _rx) = watch::channel(Snapshot::default());
        let err = start_source(SourceKind::Kubernetes, None, Scope::Node("a,b".into()), tx)
            .await
            .err();
        assert!(
            matches!(&err, Some(SourceError::Kubernetes(source::Error::InvalidNodeName(n))) if n == "a,b"),
            "{err:?}"
        );
    }
}
