//! The map writes the control plane makes, behind a trait: [`crate::datapath::Datapath`] writes the kernel's maps,
//! [`FakeMaps`] plain tables, so that the reconciler's decisions (what is written, in which order, what is left
//! alone) are unit-tested without root.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use mesh_common::{BackendV4, IpcacheEntry, RevNatV4, ServiceEntry, ServiceKeyV4, SlotKey};

use crate::datapath::{Datapath, DatapathError};

/// Writes to the service, backend, rev-NAT, ipcache and tunnel-peer maps.
pub trait MapWriter {
    /// # Errors
    /// When the map update fails.
    fn upsert_service(&mut self, key: ServiceKeyV4, e: ServiceEntry) -> Result<(), DatapathError>;
    /// # Errors
    /// When the removal fails (an absent entry is no error).
    fn remove_service(&mut self, key: ServiceKeyV4) -> Result<(), DatapathError>;
    /// # Errors
    /// When the map update fails.
    fn upsert_slot(&mut self, key: SlotKey, backend_id: u32) -> Result<(), DatapathError>;
    /// # Errors
    /// When the removal fails.
    fn remove_slot(&mut self, key: SlotKey) -> Result<(), DatapathError>;
    /// # Errors
    /// When an update fails (the slots before it are written).
    fn upsert_slots(&mut self, entries: &[(SlotKey, u32)]) -> Result<(), DatapathError> {
        for (k, v) in entries {
            self.upsert_slot(*k, *v)?;
        }
        Ok(())
    }
    /// # Errors
    /// When a removal fails.
    fn remove_slots(&mut self, keys: &[SlotKey]) -> Result<(), DatapathError> {
        for k in keys {
            self.remove_slot(*k)?;
        }
        Ok(())
    }
    /// # Errors
    /// When the map update fails.
    fn upsert_backend(&mut self, id: u32, b: BackendV4) -> Result<(), DatapathError>;
    /// # Errors
    /// When an update fails (the backends before it are written).
    fn upsert_backends(&mut self, entries: &[(u32, BackendV4)]) -> Result<(), DatapathError> {
        for (k, v) in entries {
            self.upsert_backend(*k, *v)?;
        }
        Ok(())
    }
    /// # Errors
    /// When the removal fails.
    fn remove_backend(&mut self, id: u32) -> Result<(), DatapathError>;
    /// # Errors
    /// When the map update fails.
    fn upsert_revnat(&mut self, id: u32, r: RevNatV4) -> Result<(), DatapathError>;
    /// # Errors
    /// When the removal fails.
    fn remove_revnat(&mut self, id: u32) -> Result<(), DatapathError>;
    /// # Errors
    /// When the map update fails.
    fn upsert_ipcache(&mut self, prefix: Ipv4Net, e: IpcacheEntry) -> Result<(), DatapathError>;
    /// # Errors
    /// When the removal fails.
    fn remove_ipcache(&mut self, prefix: Ipv4Net) -> Result<(), DatapathError>;
    /// # Errors
    /// When the map update fails.
    fn upsert_tunnel_peer(&mut self, underlay: Ipv4Addr, cluster_id: u16) -> Result<(), DatapathError>;
    /// # Errors
    /// When the removal fails.
    fn remove_tunnel_peer(&mut self, underlay: Ipv4Addr) -> Result<(), DatapathError>;
}

impl MapWriter for Datapath {
    fn upsert_service(&mut self, key: ServiceKeyV4, e: ServiceEntry) -> Result<(), DatapathError> {
        Self::upsert_service(self, key, e)
    }
    fn remove_service(&mut self, key: ServiceKeyV4) -> Result<(), DatapathError> {
        Self::remove_service(self, key)
    }
    fn upsert_slot(&mut self, key: SlotKey, backend_id: u32) -> Result<(), DatapathError> {
        Self::upsert_slot(self, key, backend_id)
    }
    fn remove_slot(&mut self, key: SlotKey) -> Result<(), DatapathError> {
        Self::remove_slot(self, key)
    }
    fn upsert_backend(&mut self, id: u32, b: BackendV4) -> Result<(), DatapathError> {
        Self::upsert_backend(self, id, b)
    }
    fn upsert_backends(&mut self, entries: &[(u32, BackendV4)]) -> Result<(), DatapathError> {
        Self::upsert_backends(self, entries)
    }
    fn upsert_slots(&mut self, entries: &[(SlotKey, u32)]) -> Result<(), DatapathError> {
        Self::upsert_slots(self, entries)
    }
    fn remove_slots(&mut self, keys: &[SlotKey]) -> Result<(), DatapathError> {
        Self::remove_slots(self, keys)
    }
    fn remove_backend(&mut self, id: u32) -> Result<(), DatapathError> {
        Self::remove_backend(self, id)
    }
    fn upsert_revnat(&mut self, id: u32, r: RevNatV4) -> Result<(), DatapathError> {
        Self::upsert_revnat(self, id, r)
    }
    fn remove_revnat(&mut self, id: u32) -> Result<(), DatapathError> {
        Self::remove_revnat(self, id)
    }
    fn upsert_ipcache(&mut self, prefix: Ipv4Net, e: IpcacheEntry) -> Result<(), DatapathError> {
        Self::upsert_ipcache(self, prefix, e)
    }
    fn remove_ipcache(&mut self, prefix: Ipv4Net) -> Result<(), DatapathError> {
        Self::remove_ipcache(self, prefix)
    }
    fn upsert_tunnel_peer(&mut self, underlay: Ipv4Addr, cluster_id: u16) -> Result<(), DatapathError> {
        Self::upsert_tunnel_peer(self, underlay, cluster_id)
    }
    fn remove_tunnel_peer(&mut self, underlay: Ipv4Addr) -> Result<(), DatapathError> {
        Self::remove_tunnel_peer(self, underlay)
    }
}

/// A frontend: VIP, port, protocol number.
pub type Frontend = (Ipv4Addr, u16, u8);
/// A backend as a slot resolves it: address, port, cluster id.
pub type ResolvedBackend = (Ipv4Addr, u16, u16);

/// The maps as plain tables, counting writes (for tests).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct FakeMaps {
    pub services: BTreeMap<ServiceKeyV4, ServiceEntry>,
    pub slots: BTreeMap<SlotKey, u32>,
    pub backends: BTreeMap<u32, BackendV4>,
    pub revnats: BTreeMap<u32, RevNatV4>,
    pub ipcache: BTreeMap<Ipv4Net, IpcacheEntry>,
    pub tunnel_peers: BTreeMap<Ipv4Addr, u16>,
    /// Map writes and removals made.
    pub writes: u64,
}

impl FakeMaps {
    /// Each frontend as the datapath resolves it: VIP, port, protocol → the backends of its slots, in slot order.
    #[must_use]
    pub fn resolved(&self) -> BTreeMap<Frontend, Vec<ResolvedBackend>> {
        self.services
            .iter()
            .map(|(k, e)| {
                // Sorted: a flow picks a slot by hash, so only how many slots each backend has matters.
                let mut backends: Vec<ResolvedBackend> = (0..e.slot_count)
                    .filter_map(|slot| {
                        let id = self.slots.get(&SlotKey {
                            service_id: e.service_id,
                            slot,
                        })?;
                        let b = self.backends.get(id)?;
                        Some((Ipv4Addr::from(b.addr), u16::from_be(b.port_be), b.cluster_id))
                    })
                    .collect();
                backends.sort_unstable();
                (
                    (Ipv4Addr::from(k.vip), u16::from_be(k.port_be), k.proto),
                    backends,
                )
            })
            .collect()
    }
}

impl MapWriter for FakeMaps {
    fn upsert_service(&mut self, key: ServiceKeyV4, e: ServiceEntry) -> Result<(), DatapathError> {
        self.writes += 1;
        self.services.insert(key, e);
        Ok(())
    }
    fn remove_service(&mut self, key: ServiceKeyV4) -> Result<(), DatapathError> {
        self.writes += 1;
        self.services.remove(&key);
        Ok(())
    }
    fn upsert_slot(&mut self, key: SlotKey, backend_id: u32) -> Result<(), DatapathError> {
        self.writes += 1;
        self.slots.insert(key, backend_id);
        Ok(())
    }
    fn remove_slot(&mut self, key: SlotKey) -> Result<(), DatapathError> {
        self.writes += 1;
        self.slots.remove(&key);
        Ok(())
    }
    fn upsert_backend(&mut self, id: u32, b: BackendV4) -> Result<(), DatapathError> {
        self.writes += 1;
        self.backends.insert(id, b);
        Ok(())
    }
    fn remove_backend(&mut self, id: u32) -> Result<(), DatapathError> {
        self.writes += 1;
        self.backends.remove(&id);
        Ok(())
    }
    fn upsert_revnat(&mut self, id: u32, r: RevNatV4) -> Result<(), DatapathError> {
        self.writes += 1;
        self.revnats.insert(id, r);
        Ok(())
    }
    fn remove_revnat(&mut self, id: u32) -> Result<(), DatapathError> {
        self.writes += 1;
        self.revnats.remove(&id);
        Ok(())
    }
    fn upsert_ipcache(&mut self, prefix: Ipv4Net, e: IpcacheEntry) -> Result<(), DatapathError> {
        self.writes += 1;
        self.ipcache.insert(prefix, e);
        Ok(())
    }
    fn remove_ipcache(&mut self, prefix: Ipv4Net) -> Result<(), DatapathError> {
        self.writes += 1;
        self.ipcache.remove(&prefix);
        Ok(())
    }
    fn upsert_tunnel_peer(&mut self, underlay: Ipv4Addr, cluster_id: u16) -> Result<(), DatapathError> {
        self.writes += 1;
        self.tunnel_peers.insert(underlay, cluster_id);
        Ok(())
    }
    fn remove_tunnel_peer(&mut self, underlay: Ipv4Addr) -> Result<(), DatapathError> {
        self.writes += 1;
        self.tunnel_peers.remove(&underlay);
        Ok(())
    }
}
