//! fleetmesh's cluster state model: plain data about one cluster (nodes, namespaces, pods, services), the rules
//! for names and ids, and the manifests source that fills it from a directory of Kubernetes YAML.
//!
//! Nothing here does I/O except [`source`]; derived views are pure functions that unit-test without a kernel.

pub mod cluster;
pub mod clusterset;
pub mod duration;
pub mod identity;
pub mod manifests;
pub mod policy;
pub mod service;
pub mod source;
pub mod state;
pub mod traffic;
pub mod wireguard;
pub mod yaml;

pub use cluster::{ClusterId, ClusterName, ClusterNameError};
pub use state::{
    AddressType, ClusterState, ContainerPort, EndpointConditions, EndpointSlice, EndpointSlicePort,
    Namespace, Node, Pod, PodRef, Protocol, Service, ServicePort, SliceEndpoint,
};

/// Helpers shared by the unit tests of this crate.
#[cfg(test)]
pub(crate) mod test_util {
    use std::collections::BTreeMap;

    /// A label map from pairs.
    pub(crate) fn labels(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }
}
