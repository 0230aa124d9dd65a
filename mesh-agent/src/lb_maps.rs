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
use tracing::{debug, info};

use crate::datapath::{Datapath, DatapathError};
use crate::lb::ServiceView;
use crate::maps::MapWriter;

fn proto_number(p: Protocol) -> u8 {
    match p {
        Protocol::Tcp => proto::TCP,
        Protocol::Udp => proto::UDP,
    }
}

/// Backend identity in the maps.
type BackendKey = (Ipv4Addr, u16, u8);

/// A service of the cluster: namespace and name.
pub type ServiceId = (String, String);

#[derive(Debug, Clone, PartialEq, Eq)]
struct Programmed {
    service_id: u32,
    rev_nat_id: u32,
    flags: u16,
    slots: Vec<u32>,
    /// The service that programmed it (`None`: adopted from the maps, not claimed yet).
    owner: Option<ServiceId>,
    /// The distinct backends of its slots (each holds one reference on them).
    backends: Vec<BackendKey>,
}

/// A backend in the maps.
#[derive(Debug, Clone, Copy)]
struct BackendEntry {
    id: u32,
    /// Frontends whose slot tables name it.
    refs: u32,
}

/// The LB maps as this agent programmed them.
#[derive(Debug, Default)]
pub struct LbMaps {
    /// Every backend in the maps: its id, and how many frontends' slot tables name it (it goes from the maps when
    /// none does). One map for both: a million remote backends cost one entry each.
    backends: BTreeMap<BackendKey, BackendEntry>,
    next_backend_id: u32,
    next_service_id: u32,
    next_rev_nat_id: u32,
    frontends: BTreeMap<ServiceKeyV4, Programmed>,
    /// The frontends each service programmed.
    by_service: BTreeMap<ServiceId, BTreeSet<ServiceKeyV4>>,
    /// Backends found at adoption that no slot names: removed by the next full reconcile unless a frontend
    /// takes them.
    unreferenced: Vec<BackendKey>,
    /// Entries found at adoption that nothing refers to (left by an agent that stopped half-way): removed by the
    /// next full reconcile, after the frontends are programmed.
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

impl LbChanges {
    pub fn add(&mut self, o: Self) {
        self.frontends_changed += o.frontends_changed;
        self.frontends_removed += o.frontends_removed;
        self.backends_added += o.backends_added;
        self.backends_removed += o.backends_removed;
        self.orphans_removed += o.orphans_removed;
    }
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

/// Whether two slot tables give each backend the same number of slots (their order does not matter: a flow picks
/// a slot by hash).
fn same_slots(a: &[u32], b: &[u32]) -> bool {
    a == b || a.len() == b.len() && slot_counts(a) == slot_counts(b)
}

fn slot_counts(slots: &[u32]) -> std::collections::HashMap<u32, usize> {
    let mut out = std::collections::HashMap::with_capacity(slots.len());
    for b in slots {
        *out.entry(*b).or_default() += 1;
    }
    out
}

/// (in `b` not `a`, in `a` not `b`) of two sorted, deduplicated lists.
fn sorted_difference<T: Ord + Copy>(a: &[T], b: &[T]) -> (Vec<T>, Vec<T>) {
    let (mut came, mut went) = (Vec::new(), Vec::new());
    let (mut i, mut j) = (0, 0);
    while i < a.len() || j < b.len() {
        match (a.get(i), b.get(j)) {
            (Some(x), Some(y)) if x == y => {
                i += 1;
                j += 1;
            }
            (Some(x), Some(y)) if x < y => {
                went.push(*x);
                i += 1;
            }
            (Some(_), Some(y)) | (None, Some(y)) => {
                came.push(*y);
                j += 1;
            }
            (Some(x), None) => {
                went.push(*x);
                i += 1;
            }
            (None, None) => break,
        }
    }
    (came, went)
}

/// The slot table that gives each backend as many slots as `want` does, changing as few slots of `old` as it can:
/// slots of backends that lose slots are reused for those that gain some; what is still missing is appended, and
/// what is left over is filled from the end (so the table stays dense and shrinks from its end). A change of one
/// backend thus rewrites about its own slots, not the table.
fn edit_slots(old: &[u32], want: &[u32]) -> Vec<u32> {
    let want_counts = slot_counts(want);
    let mut surplus: std::collections::HashMap<u32, usize> = slot_counts(old)
        .into_iter()
        .filter_map(|(b, n)| {
            let w = want_counts.get(&b).copied().unwrap_or(0);
            (n > w).then(|| (b, n - w))
        })
        .collect();
    let mut out: Vec<Option<u32>> = old.iter().copied().map(Some).collect();
    let mut holes = Vec::new();
    for (i, slot) in out.iter_mut().enumerate() {
        if let Some(b) = *slot
            && let Some(n) = surplus.get_mut(&b)
            && *n > 0
        {
            *n -= 1;
            *slot = None;
            holes.push(i);
        }
    }
    let kept: Vec<u32> = out.iter().flatten().copied().collect();
    let mut have = slot_counts(&kept);
    let mut holes = holes.into_iter();
    for b in want {
        let n = have.entry(*b).or_default();
        if want_counts.get(b).is_some_and(|w| *n < *w) {
            *n += 1;
            match holes.next() {
                Some(i) => out[i] = Some(*b),
                None => out.push(Some(*b)),
            }
        }
    }
    // Holes left: filled with the table's last slots.
    let mut i = 0;
    while i < out.len() {
        if out[i].is_none() {
            while out.last() == Some(&None) {
                out.pop();
            }
            if i >= out.len() {
                break;
            }
            out[i] = out.pop().flatten();
        }
        i += 1;
    }
    out.into_iter().flatten().collect()
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
            match lb.backends.entry(key) {
                // The same backend twice: keep the first id; a slot naming the other one makes its frontend
                // differ from the desired state, so the reconcile rewrites it before the orphan goes.
                std::collections::btree_map::Entry::Occupied(_) => orphans.backends.push(*id),
                std::collections::btree_map::Entry::Vacant(v) => {
                    v.insert(BackendEntry { id: *id, refs: 0 });
                }
            }
            lb.next_backend_id = lb.next_backend_id.max(*id);
        }
        let by_id: BTreeMap<u32, BackendKey> = backends
            .iter()
            .map(|(id, b)| (*id, (Ipv4Addr::from(b.addr), u16::from_be(b.port_be), b.proto)))
            .collect();
        let mut used_rev_nats = BTreeSet::new();
        for (key, e) in &services {
            let slots: Vec<u32> = (0..e.slot_count)
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
            let mut keys: Vec<BackendKey> = slots.iter().filter_map(|id| by_id.get(id).copied()).collect();
            keys.sort_unstable();
            keys.dedup();
            for k in &keys {
                lb.reference(k);
            }
            lb.frontends.insert(
                *key,
                Programmed {
                    service_id: e.service_id,
                    rev_nat_id: e.rev_nat_id,
                    flags: e.flags,
                    slots,
                    owner: None,
                    backends: keys,
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
        lb.unreferenced = lb
            .backends
            .iter()
            .filter(|(_, e)| e.refs == 0)
            .map(|(k, _)| *k)
            .collect();
        let adopted = LbAdopted {
            frontends: lb.frontends.len(),
            backends: lb.backends.len(),
            orphans: orphans.len(),
        };
        lb.orphans = orphans;
        Ok((lb, adopted))
    }

    /// Programs `views` (every service of the cluster) into the datapath: each service as
    /// [`Self::program_service`] does, then every frontend no view names goes, with leftovers of an earlier agent.
    ///
    /// # Errors
    /// The first map update that fails; what was applied before it stays applied, and the next reconcile
    /// retries the rest.
    pub fn reconcile(
        &mut self,
        dp: &mut impl MapWriter,
        views: &[ServiceView],
    ) -> Result<LbChanges, DatapathError> {
        let keyed: Vec<(ServiceId, &ServiceView)> = views
            .iter()
            .map(|v| ((v.namespace.clone(), v.name.clone()), v))
            .collect();
        self.reconcile_keyed(dp, &keyed)
    }

    /// As [`Self::reconcile`], each view under its own service id (a ClusterSetIP import's synthetic service
    /// shares its namespace and name with the Service it imports, not its id).
    ///
    /// # Errors
    /// As [`Self::reconcile`].
    pub fn reconcile_keyed(
        &mut self,
        dp: &mut impl MapWriter,
        views: &[(ServiceId, &ServiceView)],
    ) -> Result<LbChanges, DatapathError> {
        let mut changes = LbChanges::default();
        let mut wanted = BTreeSet::new();
        for (id, view) in views {
            changes.add(self.program_service(dp, id, Some(view))?);
            wanted.insert(id.clone());
        }
        let gone: Vec<ServiceId> = self
            .by_service
            .keys()
            .filter(|id| !wanted.contains(*id))
            .cloned()
            .collect();
        for id in gone {
            changes.add(self.program_service(dp, &id, None)?);
        }
        // Adopted frontends no service claimed.
        let unclaimed: Vec<ServiceKeyV4> = self
            .frontends
            .iter()
            .filter(|(_, p)| p.owner.is_none())
            .map(|(k, _)| *k)
            .collect();
        let mut unused = std::mem::take(&mut self.unreferenced);
        for key in unclaimed {
            unused.extend(self.remove_frontend(dp, key)?);
            changes.frontends_removed += 1;
        }
        changes.backends_removed += self.collect_backends(dp, unused)?;
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

    /// Programs one service: its frontends as `view` has them (`None`: the service is gone, or has no frontends),
    /// removing the frontends it programmed before that `view` lacks, and the backends no frontend names any more.
    /// Costs what the service holds, whatever the size of the rest.
    ///
    /// # Errors
    /// The first map update that fails; what was applied before it stays applied (and is remembered).
    pub fn program_service(
        &mut self,
        dp: &mut impl MapWriter,
        id: &ServiceId,
        view: Option<&ServiceView>,
    ) -> Result<LbChanges, DatapathError> {
        let mut changes = LbChanges::default();
        let mut unused = Vec::new();
        let mut wanted = BTreeSet::new();
        let result = (|| -> Result<(), DatapathError> {
            for fe in view.iter().flat_map(|v| v.frontends.iter()) {
                let flags = if view.is_some_and(|v| v.spec.global) {
                    service_flags::GLOBAL
                } else {
                    0
                };
                let key = self.program_frontend(dp, id, fe, flags, &mut changes, &mut unused)?;
                wanted.insert(key);
            }
            let before = self.by_service.get(id).cloned().unwrap_or_default();
            for key in before.difference(&wanted) {
                if self
                    .frontends
                    .get(key)
                    .is_some_and(|p| p.owner.as_ref() == Some(id))
                {
                    unused.extend(self.remove_frontend(dp, *key)?);
                    changes.frontends_removed += 1;
                }
            }
            Ok(())
        })();
        // What was programmed is remembered even when a write failed part-way.
        let mine: BTreeSet<ServiceKeyV4> = self
            .by_service
            .get(id)
            .into_iter()
            .flatten()
            .chain(wanted.iter())
            .filter(|k| {
                self.frontends
                    .get(*k)
                    .is_some_and(|p| p.owner.as_ref() == Some(id))
            })
            .copied()
            .collect();
        if mine.is_empty() {
            self.by_service.remove(id);
        } else {
            self.by_service.insert(id.clone(), mine);
        }
        result?;
        changes.backends_removed += self.collect_backends(dp, unused)?;
        Ok(changes)
    }

    /// Programs one frontend for service `id`; returns its key. Backends it no longer names are pushed to
    /// `unused` (removed by the caller once nothing refers to them).
    fn program_frontend(
        &mut self,
        dp: &mut impl MapWriter,
        id: &ServiceId,
        fe: &crate::lb::Frontend,
        flags: u16,
        changes: &mut LbChanges,
        unused: &mut Vec<BackendKey>,
    ) -> Result<ServiceKeyV4, DatapathError> {
        let key = ServiceKeyV4 {
            vip: fe.vip.octets(),
            port_be: fe.port.to_be(),
            proto: proto_number(fe.protocol),
            _pad: 0,
        };
        let mut ids = Vec::with_capacity(fe.active.len());
        let mut keys = Vec::with_capacity(fe.active.len());
        let mut new_backends = Vec::new();
        for b in &fe.active {
            let bkey = (b.ipv4, b.port, key.proto);
            let bid = match self.backends.get(&bkey) {
                Some(e) => e.id,
                None => {
                    let bid = next(&mut self.next_backend_id);
                    new_backends.push((
                        bid,
                        BackendV4 {
                            addr: b.ipv4.octets(),
                            port_be: b.port.to_be(),
                            proto: key.proto,
                            cluster_id: b.cluster_id,
                            ..BackendV4::default()
                        },
                    ));
                    self.backends.insert(bkey, BackendEntry { id: bid, refs: 0 });
                    // Unreferenced until the frontend is written: collected if that fails.
                    unused.push(bkey);
                    changes.backends_added += 1;
                    bid
                }
            };
            ids.push((bid, b.weight));
            keys.push(bkey);
        }
        dp.upsert_backends(&new_backends)?;
        keys.sort_unstable();
        keys.dedup();
        let slots = slot_list(&ids);
        if let Some(old) = self.frontends.get_mut(&key)
            && old.flags == flags
            && same_slots(&old.slots, &slots)
        {
            if old.owner.as_ref() != Some(id) {
                old.owner = Some(id.clone());
            }
            return Ok(key);
        }
        // The same frontend with other backends or weights: its slot table is edited where it differs.
        if let Some(old) = self.frontends.get(&key).filter(|o| o.flags == flags).cloned() {
            let edited = edit_slots(&old.slots, &slots);
            let writes: Vec<(SlotKey, u32)> = edited
                .iter()
                .enumerate()
                .filter(|(i, b)| old.slots.get(*i) != Some(*b))
                .map(|(i, b)| {
                    (
                        SlotKey {
                            service_id: old.service_id,
                            slot: u32::try_from(i).unwrap_or(u32::MAX),
                        },
                        *b,
                    )
                })
                .collect();
            dp.upsert_slots(&writes)?;
            if edited.len() != old.slots.len() {
                dp.upsert_service(
                    key,
                    ServiceEntry {
                        service_id: old.service_id,
                        slot_count: u32::try_from(edited.len()).unwrap_or(u32::MAX),
                        rev_nat_id: old.rev_nat_id,
                        flags,
                        _pad: 0,
                    },
                )?;
            }
            // Only the backends that came or went change their reference counts (both lists are sorted).
            let (came, went) = sorted_difference(&old.backends, &keys);
            for k in &came {
                self.reference(k);
            }
            self.unref(&went, unused);
            let new_len = edited.len();
            self.frontends.insert(
                key,
                Programmed {
                    slots: edited,
                    owner: Some(id.clone()),
                    backends: keys,
                    ..old
                },
            );
            let gone: Vec<SlotKey> = (new_len..old.slots.len())
                .map(|i| SlotKey {
                    service_id: old.service_id,
                    slot: u32::try_from(i).unwrap_or(u32::MAX),
                })
                .collect();
            dp.remove_slots(&gone)?;
            debug!(
                service = %format!("{}/{}", id.0, id.1),
                frontend = %format!("{}:{}/{:?}", fe.vip, fe.port, fe.protocol),
                backends = fe.active.len(),
                slots_written = writes.len(),
                "service frontend edited"
            );
            changes.frontends_changed += 1;
            return Ok(key);
        }
        let old = self.frontends.get(&key).cloned();
        let rev_nat_id = match &old {
            Some(o) => o.rev_nat_id,
            None => {
                let rid = next(&mut self.next_rev_nat_id);
                dp.upsert_revnat(
                    rid,
                    RevNatV4 {
                        vip: key.vip,
                        port_be: key.port_be,
                        _pad: 0,
                    },
                )?;
                rid
            }
        };
        let service_id = next(&mut self.next_service_id);
        let table: Vec<(SlotKey, u32)> = slots
            .iter()
            .enumerate()
            .map(|(i, backend)| {
                let slot = u32::try_from(i).unwrap_or(u32::MAX);
                (SlotKey { service_id, slot }, *backend)
            })
            .collect();
        dp.upsert_slots(&table)?;
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
        // The new table is in force: its backends are referenced, the old table's are not.
        for k in &keys {
            self.reference(k);
        }
        self.frontends.insert(
            key,
            Programmed {
                service_id,
                rev_nat_id,
                flags,
                slots,
                owner: Some(id.clone()),
                backends: keys,
            },
        );
        if let Some(o) = &old {
            self.unref(&o.backends, unused);
            remove_slots(dp, o)?;
        }
        info!(
            service = %format!("{}/{}", id.0, id.1),
            frontend = %format!("{}:{}/{:?}", fe.vip, fe.port, fe.protocol),
            backends = fe.active.len(),
            "service frontend programmed"
        );
        changes.frontends_changed += 1;
        Ok(key)
    }

    /// One more slot table names backend `k` (always one in the maps: tables name only those).
    fn reference(&mut self, k: &BackendKey) {
        if let Some(e) = self.backends.get_mut(k) {
            e.refs = e.refs.saturating_add(1);
        }
    }

    fn unref(&mut self, keys: &[BackendKey], unused: &mut Vec<BackendKey>) {
        for k in keys {
            if let Some(e) = self.backends.get_mut(k)
                && e.refs > 0
            {
                e.refs -= 1;
                if e.refs == 0 {
                    unused.push(*k);
                }
            }
        }
    }

    /// Removes a frontend (service entry, slots, rev-NAT); returns the backends it no longer holds.
    fn remove_frontend(
        &mut self,
        dp: &mut impl MapWriter,
        key: ServiceKeyV4,
    ) -> Result<Vec<BackendKey>, DatapathError> {
        let mut unused = Vec::new();
        if let Some(o) = self.frontends.remove(&key) {
            dp.remove_service(key)?;
            self.unref(&o.backends, &mut unused);
            remove_slots(dp, &o)?;
            dp.remove_revnat(o.rev_nat_id)?;
        }
        Ok(unused)
    }

    /// Removes the backends of `candidates` that no frontend names; returns how many went.
    fn collect_backends(
        &mut self,
        dp: &mut impl MapWriter,
        candidates: Vec<BackendKey>,
    ) -> Result<usize, DatapathError> {
        let mut removed = 0;
        for k in candidates {
            if self.backends.get(&k).is_none_or(|e| e.refs > 0) {
                continue;
            }
            if let Some(e) = self.backends.remove(&k) {
                dp.remove_backend(e.id)?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// (frontends, backends) programmed.
    #[must_use]
    pub fn counts(&self) -> (usize, usize) {
        (self.frontends.len(), self.backends.len())
    }

    /// Backend id of a programmed backend (for status).
    #[must_use]
    pub fn backend_id(&self, ip: Ipv4Addr, port: u16, protocol: Protocol) -> Option<u32> {
        self.backends
            .get(&(ip, port, proto_number(protocol)))
            .map(|e| e.id)
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

fn remove_slots(dp: &mut impl MapWriter, p: &Programmed) -> Result<(), DatapathError> {
    let keys: Vec<SlotKey> = (0..p.slots.len())
        .map(|i| SlotKey {
            service_id: p.service_id,
            slot: u32::try_from(i).unwrap_or(u32::MAX),
        })
        .collect();
    dp.remove_slots(&keys)
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
    fn slot_edits_touch_the_changed_backends_only() {
        let ids: Vec<(u32, u32)> = (1..=1000).map(|i| (i, 1)).collect();
        let old = slot_list(&ids);
        // One backend more: one slot appended, nothing else.
        let mut more = ids.clone();
        more.push((5000, 1));
        let edited = edit_slots(&old, &slot_list(&more));
        assert!(same_slots(&edited, &slot_list(&more)));
        assert_eq!(edited[..1000], old[..]);
        assert_eq!(edited.len(), 1001);
        // One backend less: its slot takes the last one; two slots differ, the table is one shorter.
        let less: Vec<(u32, u32)> = ids.iter().copied().filter(|(i, _)| *i != 500).collect();
        let edited = edit_slots(&old, &slot_list(&less));
        assert!(same_slots(&edited, &slot_list(&less)));
        assert_eq!(edited.len(), 999);
        assert_eq!((0..999).filter(|i| edited[*i] != old[*i]).count(), 1);
        // A replacement reuses the slot; a weight change adds or frees that backend's slots only.
        let mut swapped = less;
        swapped.push((6000, 1));
        let edited = edit_slots(&old, &slot_list(&swapped));
        assert_eq!(
            (edited.len(), (0..1000).filter(|i| edited[*i] != old[*i]).count()),
            (1000, 1)
        );
        let mut heavier = ids;
        heavier[10].1 = 3;
        let edited = edit_slots(&old, &slot_list(&heavier));
        assert!(same_slots(&edited, &slot_list(&heavier)));
        assert_eq!(edited[..1000], old[..]);
        let back = edit_slots(&edited, &old);
        assert!(same_slots(&back, &old));
        // Everything different: still exactly the wanted multiset.
        let other: Vec<(u32, u32)> = (2000..2010).map(|i| (i, 2)).collect();
        let edited = edit_slots(&old, &slot_list(&other));
        assert!(same_slots(&edited, &slot_list(&other)));
        assert!(edit_slots(&old, &[]).is_empty());
    }

    #[test]
    fn ids_are_never_zero() {
        let mut c = u32::MAX;
        assert_eq!(next(&mut c), 1);
        assert_eq!(next(&mut c), 2);
    }
}
