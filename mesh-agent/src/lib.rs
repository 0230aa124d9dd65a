//! fleetmesh node agent: watches its cluster (manifests source) and the peer clusters (etcd), and programs the
//! eBPF datapath of its node.

pub mod api;
pub mod claims;
pub mod clusterset;
pub mod control;
pub mod datapath;
pub mod desired;
pub mod dns;
pub use mesh_kvstore::etcd_pool;
pub mod flows;
pub mod held;
pub mod lb;
pub mod lb_maps;
pub mod maps;
pub mod memory;
pub mod metrics;
pub mod netdev;
pub mod policy;
pub mod reconcile;
pub mod remote;
pub mod rollout;
pub mod tables;
pub mod wireguard;
