//! Status write-back: the clustermesh-apiserver (one writer per cluster) reports on every
//! `TrafficPolicy`, `StagedRollout` and `MeshNetworkPolicy` whether the source accepted it, in the object's `status` subresource:
//! `observedGeneration`, `phase` (`Valid` or `Invalid`) and, when invalid, the `message` the source also puts in
//! the snapshot's errors (it names the field).
//!
//! The writer remembers what it wrote, and reads what the object carries, and patches an object only when its
//! status would change: at most one patch per object per change, none after a restart when nothing changed. A failed patch is logged and retried on the next change of the verdicts, or after
//! [`RETRY`] without one; it never stops the source. A `StagedRollout`'s progress (`status.progress`, the
//! clustermesh-apiserver's summary of the agents' `MeshNode`s) is [`crate::progress`]'s.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use k8s_openapi::NamespaceResourceScope;
use kube::api::{Api, Patch, PatchParams};
use kube::{Client, Resource};
use serde_json::json;
use tokio::sync::watch;
use tracing::{debug, instrument, warn};

use crate::crd::{MeshNetworkPolicy, ObjectStatus, StagedRollout, TrafficPolicy};
use crate::lenient::Lenient;

/// How long the writer waits before retrying failed patches when nothing else changes.
pub const RETRY: Duration = Duration::from_secs(10);
/// `phase` of an object the source accepted.
pub const PHASE_VALID: &str = "Valid";
/// `phase` of an object the source refused (skipped; a previous good version stays in force).
pub const PHASE_INVALID: &str = "Invalid";

/// The fleetmesh kinds whose status is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum StatusKind {
    TrafficPolicy,
    StagedRollout,
    MeshNetworkPolicy,
}

impl StatusKind {
    /// Merge-patches the status subresource of the object `namespace/name` of this kind (at its CRD type's path;
    /// the answer is read as [`Lenient`]: the object may be one the source refused).
    async fn patch_status(
        self,
        client: Client,
        namespace: &str,
        name: &str,
        body: &serde_json::Value,
    ) -> Result<(), kube::Error> {
        async fn patch<K>(
            client: Client,
            namespace: &str,
            name: &str,
            body: &serde_json::Value,
        ) -> Result<(), kube::Error>
        where
            K: Resource<DynamicType = (), Scope = NamespaceResourceScope> + std::fmt::Debug,
        {
            Api::<Lenient<K>>::namespaced(client, namespace)
                .patch_status(name, &PatchParams::default(), &Patch::Merge(body))
                .await
                .map(|_| ())
        }
        match self {
            StatusKind::TrafficPolicy => patch::<TrafficPolicy>(client, namespace, name, body).await,
            StatusKind::StagedRollout => patch::<StagedRollout>(client, namespace, name, body).await,
            StatusKind::MeshNetworkPolicy => patch::<MeshNetworkPolicy>(client, namespace, name, body).await,
        }
    }
}

/// One fleetmesh object.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectRef {
    pub kind: StatusKind,
    pub namespace: String,
    pub name: String,
}

/// What the source concluded about the current version of an object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// `metadata.generation` of the version judged.
    pub generation: Option<i64>,
    /// Why it was refused (the message of the snapshot's errors); `None` when accepted.
    pub error: Option<String>,
    /// The status the object carries now (as the watch saw it), so that a restarted writer does not write again
    /// what is there already.
    pub current: Option<ObjectStatus>,
}

impl Verdict {
    /// The status that reports this verdict.
    #[must_use]
    pub fn status(&self) -> ObjectStatus {
        ObjectStatus {
            observed_generation: self.generation,
            phase: Some(
                if self.error.is_some() {
                    PHASE_INVALID
                } else {
                    PHASE_VALID
                }
                .to_owned(),
            ),
            message: self.error.clone(),
        }
    }
}

/// The verdicts on every fleetmesh object the source holds.
pub type Verdicts = BTreeMap<ObjectRef, Verdict>;

/// A status that could not be written.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error(
        "cannot patch the status of {kind:?} {namespace}/{name} (does the clustermesh-apiserver's role grant \
         `patch` on its `/status`?)"
    )]
    Patch {
        kind: StatusKind,
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
}

/// Writes the status of fleetmesh objects, remembering what it wrote.
#[derive(Clone)]
pub struct StatusWriter {
    client: Client,
    written: HashMap<ObjectRef, ObjectStatus>,
}

impl std::fmt::Debug for StatusWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StatusWriter")
            .field("written", &self.written)
            .finish_non_exhaustive()
    }
}

impl StatusWriter {
    #[must_use]
    pub fn new(client: Client) -> Self {
        Self {
            client,
            written: HashMap::new(),
        }
    }

    /// Patches the status of every object whose verdict differs from what was written; forgets objects that are
    /// gone. Returns how many patches succeeded, and the failures (retried by the next call).
    #[instrument(skip_all, fields(objects = verdicts.len()))]
    pub async fn sync(&mut self, verdicts: &Verdicts) -> (usize, Vec<StatusError>) {
        self.written.retain(|o, _| verdicts.contains_key(o));
        let mut patched = 0;
        let mut failures = Vec::new();
        for (object, verdict) in verdicts {
            let status = verdict.status();
            if self.written.get(object) == Some(&status) {
                continue;
            }
            if verdict.current.as_ref() == Some(&status) {
                self.written.insert(object.clone(), status);
                continue;
            }
            match self.patch(object, &status).await {
                Ok(()) => {
                    debug!(?object, phase = ?status.phase, generation = ?status.observed_generation, "status written");
                    self.written.insert(object.clone(), status);
                    patched += 1;
                }
                Err(e) => {
                    // Not remembered: the next sync tries again.
                    self.written.remove(object);
                    failures.push(e);
                }
            }
        }
        (patched, failures)
    }

    /// A merge patch of the `status` subresource. `message` is sent as `null` when there is none, so that a
    /// fixed object loses its old message.
    #[instrument(skip(self, status), fields(phase = ?status.phase))]
    async fn patch(&self, object: &ObjectRef, status: &ObjectStatus) -> Result<(), StatusError> {
        let body = json!({"status": {
            "observedGeneration": status.observed_generation,
            "phase": status.phase,
            "message": status.message,
        }});
        object
            .kind
            .patch_status(self.client.clone(), &object.namespace, &object.name, &body)
            .await
            .map_err(|source| StatusError::Patch {
                kind: object.kind,
                namespace: object.namespace.clone(),
                name: object.name.clone(),
                source,
            })
    }

    /// Syncs after every change of the verdicts (and after [`RETRY`] while some patch failed) until the sender
    /// is gone. Failures are logged, never returned.
    #[instrument(skip_all)]
    pub async fn run(mut self, mut verdicts: watch::Receiver<Verdicts>) {
        let mut failing = false;
        loop {
            if failing {
                tokio::select! {
                    r = verdicts.changed() => if r.is_err() { return },
                    () = tokio::time::sleep(RETRY) => {}
                }
            } else if verdicts.changed().await.is_err() {
                return;
            }
            let current = verdicts.borrow_and_update().clone();
            let (_, failures) = self.sync(&current).await;
            failing = !failures.is_empty();
            for e in &failures {
                warn!(error = %e, source = %std::error::Error::source(e).map(ToString::to_string).unwrap_or_default(),
                      "status not written; retrying later");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdict_status() {
        let ok = Verdict {
            generation: Some(3),
            error: None,
            current: None,
        };
        assert_eq!(
            ok.status(),
            ObjectStatus {
                observed_generation: Some(3),
                phase: Some("Valid".into()),
                message: None
            }
        );
        let bad = Verdict {
            generation: Some(4),
            error: Some("field spec.weights: sum to 0".into()),
            current: None,
        };
        let s = bad.status();
        assert_eq!(s.phase.as_deref(), Some("Invalid"));
        assert_eq!(s.message.as_deref(), Some("field spec.weights: sum to 0"));
        assert_eq!(s.observed_generation, Some(4));
    }
}
