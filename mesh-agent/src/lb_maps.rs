//! Owner of the load-balancing maps (services, slots, backends, rev-NAT): programs the desired service views
//! into them, changing only what differs.
//!
//! A frontend's slot table is never edited in place: a changed backend set gets a fresh table id, whose slots
//! are written first; then one update of the service entry switches new flows over; then the old slots go. So no
//! packet ever sees a half-written table. Established flows keep their backend through conntrack, even when the
//! backend is gone from every table.
//!
//! After an agent restart, [`LbMaps::adopt`] rebuilds this state from what the (pinned) maps hold: backend ids by
//! address, frontends with their service id, rev-NAT id, flags and slot table, and id counters above every id in
//! use. The first reconcile then changes only what differs: unchanged frontends keep their slot tables and rev-NAT
//! ids, so conntrack entries stay valid and established flows are untouched.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use mesh_common::{BackendV4, RevNatV4, ServiceEntry, ServiceKeyV4, SlotKey, proto, service_flags};
use mesh_model::Protocol;
use tracing::info;

use crate::datapath::{Datapath, DatapathError};
use crate::lb::ServiceView;

fn proto_number(p: Protocol) -> u8 {
    match p {
        Protocol::Tcp => proto::TCP,
        Protocol::Udp => proto::UDP,
    }
}

/// Backend identity in the maps.
type BackendKey = (Ipv4Addr, u16, u8);

#[derive(Debug, Clone, PartialEq, Eq)]
struct Programmed {
    service_id: u32,
    rev_nat_id: u32,
    flags: u16,
    slots: Vec<u32>,
}

/// The LB maps as this agent programmed them.
#[derive(Debug, Default)]
pub struct LbMaps {
    backend_ids: BTreeMap<BackendKey, u32>,
    next_backend_id: u32,
    next_service_id: u32,
    next_rev_nat_id: u32,
    frontends: BTreeMap<ServiceKeyV4, Programmed>,
    /// Entries found at adoption that nothing refers to (left by an agent that stopped half-way): removed by the
    /// next reconcile, after the frontends are programmed.
    orphans: Orphans,
}

/// Map entries found at adoption that no frontend refers to.
#[derive(Debug, Default)]
struct Orphans {
    slots: Vec<SlotKey>,
    backends: Vec<u32>,
    rev_nats: Vec<u32>,
}

impl Orphans {
    const fn len(&self) -> usize {
        self.slots.len() + self.backends.len() + self.rev_nats.len()
    }
}

/// What one reconcile changed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct LbChanges {
    pub frontends_changed: usize,
    pub frontends_removed: usize,
    pub backends_added: usize,
    pub backends_removed: usize,
    /// Entries left over from an earlier agent that nothing referred to (slots, backends, rev-NATs).
    pub orphans_removed: usize,
}

/// What [`LbMaps::adopt`] found in the maps.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct LbAdopted {
    pub frontends: usize,
    pub backends: usize,
    /// Entries nothing refers to, removed by the next reconcile.
    pub orphans: usize,
}

fn next(counter: &mut u32) -> u32 {
    *counter = counter.wrapping_add(1).max(1);
    *counter
}

/// Slot list of a backend set: each backend gets `weight` slots (at least one; the desired state keeps a
/// frontend's total within [`crate::lb::MAX_SLOTS_PER_FRONTEND`]), in a stable order.
fn slot_list(ids: &[(u32, u32)]) -> Vec<u32> {
    ids.iter()
        .flat_map(|(id, w)| std::iter::repeat_n(*id, (*w).max(1) as usize))
        .take(crate::lb::MAX_SLOTS_PER_FRONTEND as usize)
        .collect()
}

impl LbMaps {
    /// The state an earlier agent left in the maps of `dp` (empty maps give the empty state).
    ///
    /// # Errors
    /// When a map cannot be read.
    pub fn adopt(dp: &Datapath) -> Result<(Self, LbAdopted), DatapathError> {
        let services = dp.services()?;
        let slots: BTreeMap<(u32, u32), u32> = dp
            .slots()?
            .into_iter()
            .map(|(k, b)| ((k.service_id, k.slot), b))
            .collect();
        let backends = dp.backends()?;
        let rev_nats = dp.revnats()?;
        let mut lb = Self::default();
        let mut orphans = Orphans::default();

        for (id, b) in &backends {
            let key = (Ipv4Addr::from(b.addr), u16::from_be(b.port_be), b.proto);
            match lb.backend_ids.entry(key) {
                // The same backend twice: keep the first id; a slot naming the other one makes its frontend
                // differ from the desired state, so the reconcile rewrites it before the orphan goes.
                std::collections::btree_map::Entry::Occupied(_) => orphans.backends.push(*id),
                std::collections::btree_map::Entry::Vacant(v) => {
                    v.insert(*id);
                }
            }
            lb.next_backend_id = lb.next_backend_id.max(*id);
        }
        let mut used_rev_nats = BTreeSet::new();
        for (key, e) in &services {
            let slots = (0..e.slot_count)
                .map(|slot| {
                    slots
                        .get(&(e.service_id, slot))
                        // A missing slot: 0 is never a backend id, so the table differs from any desired one.
                        .map_or(0, |b| *b)
                })
                .collect();
            used_rev_nats.insert(e.rev_nat_id);
            lb.next_service_id = lb.next_service_id.max(e.service_id);
            lb.next_rev_nat_id = lb.next_rev_nat_id.max(e.rev_nat_id);
            lb.frontends.insert(
                *key,
                Programmed {
                    service_id: e.service_id,
                    rev_nat_id: e.rev_nat_id,
                    flags: e.flags,
                    slots,
                },
            );
        }
        let slot_counts: BTreeMap<u32, u32> = services
            .iter()
            .map(|(_, e)| (e.service_id, e.slot_count))
            .collect();
        for &(service_id, slot) in slots.keys() {
            lb.next_service_id = lb.next_service_id.max(service_id);
            let in_use = slot_counts.get(&service_id).is_some_and(|count| slot < *count);
            if !in_use {
                orphans.slots.push(SlotKey { service_id, slot });
            }
        }
        for (id, _) in &rev_nats {
            lb.next_rev_nat_id = lb.next_rev_nat_id.max(*id);
            if !used_rev_nats.contains(id) {
                orphans.rev_nats.push(*id);
            }
        }
        let adopted = LbAdopted {
            frontends: lb.frontends.len(),
            backends: lb.backend_ids.len(),
            orphans: orphans.len(),
        };
        lb.orphans = orphans;
        Ok((lb, adopted))
    }

    /// Programs `views` into the datapath.
    ///
    /// # Errors
    /// The first map update that fails; what was applied before it stays applied, and the next reconcile
    /// retries the rest.
    pub fn reconcile(
        &mut self,
        dp: &mut Datapath,
        views: &[ServiceView],
    ) -> Result<LbChanges, DatapathError> {
        let mut changes = LbChanges::default();
        let mut wanted_frontends = BTreeSet::new();
        let mut wanted_backends = BTreeSet::new();
        for view in views {
            for fe in &view.frontends {
                let key = ServiceKeyV4 {
                    vip: fe.vip.octets(),
                    port_be: fe.port.to_be(),
                    proto: proto_number(fe.protocol),
                    _pad: 0,
                };
                wanted_frontends.insert(key);
                let mut ids = Vec::with_capacity(fe.active.len());
                for b in &fe.active {
                    let bkey = (b.ipv4, b.port, key.proto);
                    wanted_backends.insert(bkey);
                    let id = match self.backend_ids.get(&bkey) {
                        Some(id) => *id,
                        None => {
                            let id = next(&mut self.next_backend_id);
                            dp.upsert_backend(
                                id,
                                BackendV4 {
                                    addr: b.ipv4.octets(),
                                    port_be: b.port.to_be(),
                                    proto: key.proto,
                                    cluster_id: b.cluster_id,
                                    ..BackendV4::default()
                                },
                            )?;
                            self.backend_ids.insert(bkey, id);
                            changes.backends_added += 1;
                            id
                        }
                    };
                    ids.push((id, b.weight));
                }
                let slots = slot_list(&ids);
                let flags = if view.spec.global {
                    service_flags::GLOBAL
                } else {
                    0
                };
                let old = self.frontends.get(&key).cloned();
                if old.as_ref().is_some_and(|o| o.slots == slots && o.flags == flags) {
                    continue;
                }
                let rev_nat_id = match &old {
                    Some(o) => o.rev_nat_id,
                    None => {
                        let id = next(&mut self.next_rev_nat_id);
                        dp.upsert_revnat(
                            id,
                            RevNatV4 {
                                vip: key.vip,
                                port_be: key.port_be,
                                _pad: 0,
                            },
                        )?;
                        id
                    }
                };
                let service_id = next(&mut self.next_service_id);
                for (i, backend) in slots.iter().enumerate() {
                    let slot = u32::try_from(i).unwrap_or(u32::MAX);
                    dp.upsert_slot(SlotKey { service_id, slot }, *backend)?;
                }
                let slot_count = u32::try_from(slots.len()).unwrap_or(u32::MAX);
                dp.upsert_service(
                    key,
                    ServiceEntry {
                        service_id,
                        slot_count,
                        rev_nat_id,
                        flags,
                        _pad: 0,
                    },
                )?;
                if let Some(o) = &old {
                    remove_slots(dp, o)?;
                }
                info!(
                    service = %format!("{}/{}", view.namespace, view.name),
                    frontend = %format!("{}:{}/{:?}", fe.vip, fe.port, fe.protocol),
                    backends = fe.active.len(),
                    "service frontend programmed"
                );
                self.frontends.insert(
                    key,
                    Programmed {
                        service_id,
                        rev_nat_id,
                        flags,
                        slots,
                    },
                );
                changes.frontends_changed += 1;
            }
        }
        let gone: Vec<ServiceKeyV4> = self
            .frontends
            .keys()
            .filter(|k| !wanted_frontends.contains(*k))
            .copied()
            .collect();
        for key in gone {
            if let Some(o) = self.frontends.remove(&key) {
                dp.remove_service(key)?;
                remove_slots(dp, &o)?;
                dp.remove_revnat(o.rev_nat_id)?;
                changes.frontends_removed += 1;
            }
        }
        let unused: Vec<BackendKey> = self
            .backend_ids
            .keys()
            .filter(|k| !wanted_backends.contains(*k))
            .copied()
            .collect();
        for bkey in unused {
            if let Some(id) = self.backend_ids.remove(&bkey) {
                dp.remove_backend(id)?;
                changes.backends_removed += 1;
            }
        }
        // Leftovers of an earlier agent, now that every frontend points at its final slot table.
        while let Some(key) = self.orphans.slots.pop() {
            dp.remove_slot(key)?;
            changes.orphans_removed += 1;
        }
        while let Some(id) = self.orphans.rev_nats.pop() {
            dp.remove_revnat(id)?;
            changes.orphans_removed += 1;
        }
        while let Some(id) = self.orphans.backends.pop() {
            dp.remove_backend(id)?;
            changes.orphans_removed += 1;
        }
        Ok(changes)
    }

    /// (frontends, backends) programmed.
    #[must_use]
    pub fn counts(&self) -> (usize, usize) {
        (self.frontends.len(), self.backend_ids.len())
    }

    /// Backend id of a programmed backend (for status).
    #[must_use]
    pub fn backend_id(&self, ip: Ipv4Addr, port: u16, protocol: Protocol) -> Option<u32> {
        self.backend_ids.get(&(ip, port, proto_number(protocol))).copied()
    }

    /// Backend ids in the slot table of a frontend (for status: what the datapath really uses).
    #[must_use]
    pub fn slots_of(&self, vip: Ipv4Addr, port: u16, protocol: Protocol) -> Vec<u32> {
        let key = ServiceKeyV4 {
            vip: vip.octets(),
            port_be: port.to_be(),
            proto: proto_number(protocol),
            _pad: 0,
        };
        self.frontends
            .get(&key)
            .map(|p| p.slots.clone())
            .unwrap_or_default()
    }
}

fn remove_slots(dp: &mut Datapath, p: &Programmed) -> Result<(), DatapathError> {
    for i in 0..p.slots.len() {
        let slot = u32::try_from(i).unwrap_or(u32::MAX);
        dp.remove_slot(SlotKey {
            service_id: p.service_id,
            slot,
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_follow_weights_and_order() {
        assert_eq!(slot_list(&[(1, 1), (2, 1)]), vec![1, 2]);
        assert_eq!(slot_list(&[(1, 3), (2, 1)]), vec![1, 1, 1, 2]);
        assert_eq!(
            slot_list(&[(7, 0)]),
            vec![7],
            "weight 0 still gets one slot while it is active"
        );
        assert_eq!(slot_list(&[(1, 1000)]).len(), 1000);
        assert_eq!(
            slot_list(&[(1, 20_000)]).len(),
            crate::lb::MAX_SLOTS_PER_FRONTEND as usize,
            "capped at the frontend's table size"
        );
    }

    #[test]
    fn ids_are_never_zero() {
        let mut c = u32::MAX;
        assert_eq!(next(&mut c), 1);
        assert_eq!(next(&mut c), 2);
    }
}
