//! fleetmesh's Kubernetes source: watchers on the cluster's API server turned into the same
//! [`mesh_model::source::Snapshot`] the manifests source publishes, and fleetmesh's CRD types.
//!
//! Objects are converted with mesh-model's manifest rules ([`mesh_model::manifests`]), so nothing downstream
//! knows where its state came from. A malformed object is skipped and reported in the snapshot's errors.

pub mod crd;
pub mod lenient;
pub mod progress;
pub mod select;
pub mod source;
pub mod status;
pub mod wireguard;

pub use select::start_cluster_source;
pub use select::{RunningSource, SourceError, SourceKind, start_source};
pub use source::{Error, Scope, connect, connect_with, watch_kubernetes, watch_kubernetes_writing_status};
