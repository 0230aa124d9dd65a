//! ClusterSetIP allocation (MCS API, KEP-1645): every imported service of type ClusterSetIP gets a virtual IP from
//! a configured range, the same on every node that sees the same imports.
//!
//! The choice is deterministic: an address keeps its allocation while its import lasts (`existing`, e.g. the
//! `spec.ips` of existing ServiceImports, or what the previous pass chose), and a new import starts at an address
//! derived from a hash of `namespace/name` (FNV-1a, stable across builds and runs) and takes the next free one when
//! that is taken. Imports are placed in (hash, name) order, so two nodes that know the same imports choose the same
//! addresses even when they learnt them in different orders.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

/// The default clusterset range (`--clusterset-cidr`): inside 198.18.0.0/15 (benchmarking, RFC 2544), beside the
/// lab's service ranges (198.18.x.0/24).
pub const DEFAULT_CLUSTERSET_CIDR: &str = "198.19.0.0/16";

/// Whether `s` is a DNS label as RFC 1123 has it, lower case: 1-63 of `a-z0-9-`, not starting or ending with `-`
/// (what a pod's `spec.hostname`, a service name and a clusterset DNS label must be).
#[must_use]
pub fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// A service, `(namespace, name)`.
pub type ServiceKey = (String, String);

/// Why an import got no address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the clusterset range {range} is full: {unallocated} imports got no address")]
pub struct RangeFull {
    pub range: Ipv4Net,
    pub unallocated: usize,
}

/// FNV-1a, 64 bits.
fn fnv1a(s: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// The usable addresses of `range`: all but the network and broadcast addresses (for a /31 or /32, all).
fn usable(range: Ipv4Net) -> (u32, u32) {
    let first = u32::from(range.network());
    let last = u32::from(range.broadcast());
    if range.prefix_len() >= 31 {
        (first, last)
    } else {
        (first + 1, last - 1)
    }
}

/// Allocates an address of `range` to every import of `wanted`.
///
/// An entry of `existing` is kept when its import is still wanted, its address is in the range and no other kept
/// entry has it (of two with the same address, the first by name keeps it). Imports no longer wanted release their
/// address (they are simply not in the result).
///
/// # Errors
/// When the range has fewer usable addresses than imports; the result then still holds every import that got one
/// (returned in the error's companion: see [`allocate_partial`]).
pub fn allocate(
    range: Ipv4Net,
    wanted: &BTreeSet<ServiceKey>,
    existing: &BTreeMap<ServiceKey, Ipv4Addr>,
) -> Result<BTreeMap<ServiceKey, Ipv4Addr>, RangeFull> {
    let (out, unallocated) = allocate_partial(range, wanted, existing);
    if unallocated.is_empty() {
        Ok(out)
    } else {
        Err(RangeFull {
            range,
            unallocated: unallocated.len(),
        })
    }
}

/// As [`allocate`], returning what could be allocated and the imports left without an address.
#[must_use]
pub fn allocate_partial(
    range: Ipv4Net,
    wanted: &BTreeSet<ServiceKey>,
    existing: &BTreeMap<ServiceKey, Ipv4Addr>,
) -> (BTreeMap<ServiceKey, Ipv4Addr>, Vec<ServiceKey>) {
    let (first, last) = usable(range);
    let size = u64::from(last - first) + 1;
    let mut taken: BTreeSet<u32> = BTreeSet::new();
    let mut out = BTreeMap::new();
    for (k, ip) in existing {
        let n = u32::from(*ip);
        if wanted.contains(k) && (first..=last).contains(&n) && taken.insert(n) {
            out.insert(k.clone(), *ip);
        }
    }
    let mut new: Vec<(u64, &ServiceKey)> = wanted
        .iter()
        .filter(|k| !out.contains_key(*k))
        .map(|k| (fnv1a(&format!("{}/{}", k.0, k.1)), k))
        .collect();
    new.sort();
    let mut left = Vec::new();
    for (h, k) in new {
        if u64::try_from(taken.len()).unwrap_or(u64::MAX) >= size {
            left.push(k.clone());
            continue;
        }
        let start = h % size;
        let mut off = start;
        loop {
            // `off < size <= 2^32`, so the sum stays within u32 range.
            let n = first + u32::try_from(off).unwrap_or(0);
            if taken.insert(n) {
                out.insert(k.clone(), Ipv4Addr::from(n));
                break;
            }
            off = (off + 1) % size;
        }
    }
    (out, left)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(ns: &str, n: &str) -> ServiceKey {
        (ns.to_owned(), n.to_owned())
    }

    fn range() -> Ipv4Net {
        "198.19.0.0/16".parse().unwrap()
    }

    #[test]
    fn deterministic_and_in_range() {
        let wanted: BTreeSet<_> = (0..200).map(|i| key("demo", &format!("svc{i}"))).collect();
        let a = allocate(range(), &wanted, &BTreeMap::new()).unwrap();
        let b = allocate(range(), &wanted, &BTreeMap::new()).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.len(), 200);
        let distinct: BTreeSet<_> = a.values().collect();
        assert_eq!(distinct.len(), 200, "every import has its own address");
        for ip in a.values() {
            assert!(range().contains(ip) && *ip != range().network() && *ip != range().broadcast());
        }
    }

    #[test]
    fn existing_allocations_stay_and_others_release() {
        let wanted: BTreeSet<_> = [key("a", "x"), key("a", "y")].into();
        let existing: BTreeMap<_, _> = [
            (key("a", "x"), Ipv4Addr::new(198, 19, 7, 7)),
            // Gone: released.
            (key("a", "gone"), Ipv4Addr::new(198, 19, 8, 8)),
        ]
        .into();
        let got = allocate(range(), &wanted, &existing).unwrap();
        assert_eq!(got[&key("a", "x")], Ipv4Addr::new(198, 19, 7, 7));
        assert!(!got.contains_key(&key("a", "gone")));
        assert_ne!(got[&key("a", "y")], Ipv4Addr::new(198, 19, 7, 7));
    }

    #[test]
    fn out_of_range_or_duplicate_existing_are_reallocated() {
        let wanted: BTreeSet<_> = [key("a", "x"), key("a", "y"), key("a", "z")].into();
        let existing: BTreeMap<_, _> = [
            (key("a", "x"), Ipv4Addr::new(10, 0, 0, 1)),
            (key("a", "y"), Ipv4Addr::new(198, 19, 1, 1)),
            (key("a", "z"), Ipv4Addr::new(198, 19, 1, 1)),
        ]
        .into();
        let got = allocate(range(), &wanted, &existing).unwrap();
        assert!(range().contains(&got[&key("a", "x")]));
        assert_eq!(got[&key("a", "y")], Ipv4Addr::new(198, 19, 1, 1));
        assert_ne!(got[&key("a", "z")], Ipv4Addr::new(198, 19, 1, 1));
    }

    #[test]
    fn collisions_probe_and_a_full_range_is_an_error() {
        // A /30 has two usable addresses.
        let small: Ipv4Net = "198.19.0.0/30".parse().unwrap();
        let two: BTreeSet<_> = [key("a", "x"), key("a", "y")].into();
        let got = allocate(small, &two, &BTreeMap::new()).unwrap();
        let ips: BTreeSet<_> = got.values().copied().collect();
        assert_eq!(
            ips,
            [Ipv4Addr::new(198, 19, 0, 1), Ipv4Addr::new(198, 19, 0, 2)].into()
        );
        let three: BTreeSet<_> = [key("a", "x"), key("a", "y"), key("a", "z")].into();
        let err = allocate(small, &three, &got).unwrap_err();
        assert_eq!(err.unallocated, 1);
        let (partial, left) = allocate_partial(small, &three, &got);
        assert_eq!(partial.len(), 2);
        assert_eq!(left, vec![key("a", "z")]);
        // What was allocated before keeps its address when the range is full.
        assert_eq!(partial[&key("a", "x")], got[&key("a", "x")]);
    }

    #[test]
    fn order_of_learning_does_not_matter() {
        let all: BTreeSet<_> = (0..50).map(|i| key("n", &format!("s{i}"))).collect();
        let first_half: BTreeSet<_> = all.iter().take(25).cloned().collect();
        let a = allocate(range(), &first_half, &BTreeMap::new()).unwrap();
        let a = allocate(range(), &all, &a).unwrap();
        let b = allocate(range(), &all, &BTreeMap::new()).unwrap();
        // Without collisions in the first half, learning in two steps ends where learning at once does.
        assert_eq!(a, b);
    }
}
