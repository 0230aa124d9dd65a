//! Security identities of this cluster (docs/network-policy.md, "Identities"): the apiserver is the cluster's only
//! allocator.
//!
//! Every pod with an address gets the identity of its label set; a new label set gets the lowest free number ≥ 256
//! ([`mesh_common::identity::FIRST_ALLOCATED`]). The numbers published by an earlier run are read back at every
//! session start ([`Allocator::restore`]), so restarts keep them. A number no pod uses any more stays published for
//! the grace period (`--identity-gc-grace`) and is then withdrawn; until it is withdrawn it is never handed to
//! another label set (caches may still hold it), and when its label set returns within the grace period it gets the
//! same number back.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use mesh_common::identity::{FIRST_ALLOCATED, LOCAL_MASK, compose};
use mesh_kvstore::{CapacityRecord, IdentityRecord, IpRecord, Keys, PortRecord, encode};
use mesh_model::{ClusterState, Namespace, Pod};
use tracing::{info, warn};

/// Identity labels, sorted.
pub type Labels = BTreeMap<String, String>;

/// The identity labels of `pod` in `cluster` (docs/network-policy.md; one definition shared with the agent).
fn identity_labels(cluster: &str, pod: &Pod, namespace: Option<&Namespace>) -> Labels {
    mesh_model::identity::identity_labels(cluster, pod, namespace)
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Allocation {
    labels: Labels,
    /// Since when no pod has this number (None while one has).
    unused_since: Option<Instant>,
}

/// The numbers of one cluster and the label sets they stand for.
#[derive(Debug)]
pub struct Allocator {
    cluster: String,
    cluster_id: u16,
    grace: Duration,
    by_labels: BTreeMap<Labels, u32>,
    slots: BTreeMap<u32, Allocation>,
}

/// What a pass of [`Allocator::assign`] produced.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Assigned {
    /// Full identity of every pod with an address, by (namespace, name).
    pub pods: BTreeMap<(String, String), u32>,
    /// Numbers allocated in this pass.
    pub allocated: Vec<u32>,
    /// Numbers withdrawn in this pass (unused for the grace period).
    pub collected: Vec<u32>,
}

impl Allocator {
    #[must_use]
    pub fn new(cluster: &str, cluster_id: u16, grace: Duration) -> Self {
        Self {
            cluster: cluster.to_owned(),
            cluster_id,
            grace,
            by_labels: BTreeMap::new(),
            slots: BTreeMap::new(),
        }
    }

    /// Takes back the identity records read from etcd (an earlier run's, or this run's from before a reconnect).
    /// What this allocator already holds wins; a label set published under two numbers keeps the lowest, and the
    /// other number is unused (withdrawn after the grace period). Returns how many numbers were taken back.
    pub fn restore(&mut self, mut records: Vec<IdentityRecord>) -> usize {
        records.sort_by_key(|r| r.identity);
        let mut restored = 0;
        for rec in records {
            let number = mesh_common::identity::local(rec.identity);
            if rec.cluster_id != self.cluster_id
                || number < FIRST_ALLOCATED
                || self.slots.contains_key(&number)
            {
                continue;
            }
            self.by_labels.entry(rec.labels.clone()).or_insert(number);
            self.slots.insert(
                number,
                Allocation {
                    labels: rec.labels,
                    unused_since: None,
                },
            );
            restored += 1;
        }
        restored
    }

    /// The lowest number ≥ 256 not held (a held number is published, or about to be).
    fn lowest_free(&self) -> Option<u32> {
        let mut candidate = FIRST_ALLOCATED;
        for &n in self.slots.range(FIRST_ALLOCATED..).map(|(n, _)| n) {
            if n != candidate {
                break;
            }
            candidate += 1;
        }
        (candidate <= LOCAL_MASK).then_some(candidate)
    }

    /// Gives every pod with an address the identity of its label set (allocating numbers for new label sets),
    /// then withdraws the numbers unused for the grace period. A number withdrawn here is free from the next pass
    /// on, once the publisher has deleted it.
    pub fn assign(&mut self, state: &ClusterState, now: Instant) -> Assigned {
        let mut out = Assigned::default();
        let mut used = BTreeSet::new();
        for pod in state.pods.values().filter(|p| p.ipv4.is_some()) {
            let labels = identity_labels(&self.cluster, pod, state.namespaces.get(&pod.namespace));
            let number = match self.by_labels.get(&labels) {
                Some(n) => *n,
                None => {
                    let Some(n) = self.lowest_free() else {
                        warn!(pod = %format!("{}/{}", pod.namespace, pod.name), "no identity number left; the pod has no identity");
                        continue;
                    };
                    self.by_labels.insert(labels.clone(), n);
                    self.slots.insert(
                        n,
                        Allocation {
                            labels,
                            unused_since: None,
                        },
                    );
                    out.allocated.push(n);
                    n
                }
            };
            used.insert(number);
            out.pods.insert(
                (pod.namespace.clone(), pod.name.clone()),
                compose(self.cluster_id, number),
            );
        }
        for (n, slot) in &mut self.slots {
            if used.contains(n) {
                slot.unused_since = None;
            } else {
                let since = *slot.unused_since.get_or_insert(now);
                if now.saturating_duration_since(since) >= self.grace {
                    out.collected.push(*n);
                }
            }
        }
        for n in &out.collected {
            if let Some(slot) = self.slots.remove(n)
                && self.by_labels.get(&slot.labels) == Some(n)
            {
                self.by_labels.remove(&slot.labels);
            }
        }
        if !out.allocated.is_empty() || !out.collected.is_empty() {
            info!(
                allocated = ?out.allocated,
                collected = ?out.collected,
                identities = self.slots.len(),
                "identities changed"
            );
        }
        out
    }

    /// When the next unused number is due for withdrawal.
    #[must_use]
    pub fn next_collection(&self) -> Option<Instant> {
        self.slots
            .values()
            .filter_map(|s| s.unused_since)
            .min()
            .map(|since| since + self.grace)
    }

    /// Number of identities held (published or about to be).
    #[must_use]
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// The identity records to publish, by key.
    pub fn records<'a>(&'a self, keys: &'a Keys) -> impl Iterator<Item = (String, String)> + 'a {
        self.slots.iter().map(move |(n, slot)| {
            let rec = IdentityRecord {
                cluster: self.cluster.clone(),
                cluster_id: self.cluster_id,
                identity: compose(self.cluster_id, *n),
                labels: slot.labels.clone(),
            };
            (keys.identity(&self.cluster, *n), encode(&rec))
        })
    }
}

/// The ip record of every pod with an address, a node and an identity (one per address: when pods share one, the
/// first by namespace/name keeps it), and its capacity record when its capacity (pod annotation
/// `fleetmesh.io/capacity`; 1 when absent or invalid) is not 1: the cluster's agents see only the pods of their
/// node, and weight the backends of other nodes with it.
pub fn pod_records<'a>(
    cluster: &'a str,
    keys: &'a Keys,
    state: &'a ClusterState,
    assigned: &'a Assigned,
) -> impl Iterator<Item = (String, String)> + 'a {
    let mut seen: BTreeSet<Ipv4Addr> = BTreeSet::new();
    state
        .pods
        .iter()
        .flat_map(move |(id, pod)| {
            let Some(ipv4) = pod.ipv4 else { return [None, None] };
            let Some(node) = pod.node_name.clone() else { return [None, None] };
            let Some(identity) = assigned.pods.get(id).copied() else {
                return [None, None];
            };
            if !seen.insert(ipv4) {
                warn!(pod = %format!("{}/{}", pod.namespace, pod.name), %ipv4, "address used by another pod; no ip record");
                return [None, None];
            }
            let rec = IpRecord {
                ipv4,
                cluster: cluster.to_owned(),
                identity,
                namespace: pod.namespace.clone(),
                pod: pod.name.clone(),
                node,
                named_ports: pod
                    .ports
                    .iter()
                    .filter_map(|p| {
                        Some(PortRecord {
                            name: p.name.clone().filter(|n| !n.is_empty())?,
                            port: p.port,
                            protocol: p.protocol,
                        })
                    })
                    .filter(|p| p.port != 0)
                    .collect(),
            };
            let capacity = mesh_model::traffic::capacity(&pod.annotations).unwrap_or(1);
            [
                Some((keys.ip(cluster, ipv4), encode(&rec))),
                (capacity != 1).then(|| (keys.capacity(cluster, ipv4), encode(&CapacityRecord { ipv4, capacity }))),
            ]
        })
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_model::{ContainerPort, Protocol};

    fn pod(ns: &str, name: &str, ip: Option<[u8; 4]>, labels: &[(&str, &str)]) -> Pod {
        Pod {
            namespace: ns.into(),
            name: name.into(),
            labels: labels.iter().map(|(k, v)| ((*k).into(), (*v).into())).collect(),
            annotations: BTreeMap::new(),
            node_name: Some("east-node-1".into()),
            ipv4: ip.map(Ipv4Addr::from),
            ports: vec![
                ContainerPort {
                    name: Some("http".into()),
                    port: 8080,
                    protocol: Protocol::Tcp,
                },
                ContainerPort {
                    name: None,
                    port: 9090,
                    protocol: Protocol::Tcp,
                },
            ],
            hostname: None,
            subdomain: None,
        }
    }

    fn state(pods: Vec<Pod>) -> ClusterState {
        let mut s = ClusterState::default();
        s.namespaces.insert(
            "shop".into(),
            Namespace {
                name: "shop".into(),
                labels: [("team".to_owned(), "a".to_owned())].into(),
            },
        );
        for p in pods {
            s.pods.insert((p.namespace.clone(), p.name.clone()), p);
        }
        s
    }

    #[test]
    fn labels_follow_the_policy_contract() {
        let p = pod(
            "shop",
            "api-0",
            None,
            &[
                ("app", "api"),
                ("pod-template-hash", "abc"),
                ("controller-revision-hash", "x"),
                ("statefulset.kubernetes.io/pod-name", "api-0"),
                ("io.cilium.k8s.policy.cluster", "evil"),
            ],
        );
        let s = state(vec![]);
        let l = identity_labels("east", &p, s.namespaces.get("shop"));
        let want: Labels = [
            ("app", "api"),
            ("io.kubernetes.pod.namespace", "shop"),
            ("io.cilium.k8s.namespace.labels.team", "a"),
            (
                "io.cilium.k8s.namespace.labels.kubernetes.io/metadata.name",
                "shop",
            ),
            ("io.cilium.k8s.policy.cluster", "east"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        assert_eq!(l, want);
        // A namespace without an object still has its name label.
        let l = identity_labels("east", &pod("other", "x", None, &[]), None);
        assert_eq!(
            l.get("io.cilium.k8s.namespace.labels.kubernetes.io/metadata.name")
                .map(String::as_str),
            Some("other")
        );
    }

    #[test]
    fn same_labels_share_a_number_and_new_ones_get_the_lowest_free() {
        let mut a = Allocator::new("east", 1, Duration::from_secs(60));
        let now = Instant::now();
        let s = state(vec![
            pod(
                "shop",
                "api-0",
                Some([10, 1, 0, 2]),
                &[("app", "api"), ("pod-template-hash", "1")],
            ),
            pod(
                "shop",
                "api-1",
                Some([10, 1, 0, 3]),
                &[("app", "api"), ("pod-template-hash", "2")],
            ),
            pod("shop", "web-0", Some([10, 1, 0, 4]), &[("app", "web")]),
            pod("shop", "pending", None, &[("app", "db")]),
        ]);
        let out = a.assign(&s, now);
        assert_eq!(out.allocated, vec![256, 257]);
        assert_eq!(out.pods.len(), 3, "pods without an address get none");
        let id = |n| compose(1, n);
        assert_eq!(out.pods[&("shop".into(), "api-0".into())], id(256));
        assert_eq!(out.pods[&("shop".into(), "api-1".into())], id(256));
        assert_eq!(out.pods[&("shop".into(), "web-0".into())], id(257));
        let keys = Keys::default();
        let ips: BTreeMap<String, String> = pod_records("east", &keys, &s, &out).collect();
        assert_eq!(ips.len(), 3);
        let rec = mesh_kvstore::decode_ip(
            "k",
            "east",
            Ipv4Addr::new(10, 1, 0, 2),
            ips[&keys.ip("east", Ipv4Addr::new(10, 1, 0, 2))].as_bytes(),
        )
        .expect("decodes");
        assert_eq!(rec.named_ports.len(), 1, "only named ports: {rec:?}");
        for (k, v) in a.records(&keys) {
            let number: u32 = k.rsplit('/').next().and_then(|n| n.parse().ok()).expect("number");
            mesh_kvstore::decode_identity(&k, "east", number, v.as_bytes()).expect("identity decodes");
        }
    }

    /// A pod whose capacity is not 1 gets a capacity record beside its ip record; the ip record keeps its form.
    #[test]
    fn pods_with_a_capacity_get_a_capacity_record() {
        use mesh_model::traffic::ANNOTATION_CAPACITY;
        let with = |name: &str, ip: [u8; 4], capacity: Option<&str>| {
            let mut p = pod("shop", name, Some(ip), &[("app", "api")]);
            if let Some(c) = capacity {
                p.annotations.insert(ANNOTATION_CAPACITY.into(), c.into());
            }
            p
        };
        let s = state(vec![
            with("big", [10, 1, 0, 2], Some("4")),
            with("one", [10, 1, 0, 3], Some("1")),
            with("plain", [10, 1, 0, 4], None),
            with("bad", [10, 1, 0, 5], Some("lots")),
            // Shares big's address: neither record.
            with("dup", [10, 1, 0, 2], Some("9")),
        ]);
        let mut a = Allocator::new("east", 1, Duration::from_secs(60));
        let out = a.assign(&s, Instant::now());
        let keys = Keys::default();
        let recs: BTreeMap<String, String> = pod_records("east", &keys, &s, &out).collect();
        let big = Ipv4Addr::new(10, 1, 0, 2);
        let capacities: Vec<&String> = recs
            .keys()
            .filter(|k| k.starts_with(&keys.capacities_prefix("east")))
            .collect();
        assert_eq!(capacities, [&keys.capacity("east", big)], "{recs:?}");
        let rec = mesh_kvstore::decode_capacity("k", big, recs[&keys.capacity("east", big)].as_bytes())
            .expect("decodes");
        assert_eq!(rec.capacity, 4);
        assert_eq!(
            recs.keys()
                .filter(|k| k.starts_with(&keys.ips_prefix("east")))
                .count(),
            4
        );
        // The ip record is what readers of the ip/v1 schema (which refuse unknown fields) expect.
        let ip = mesh_kvstore::decode_ip("k", "east", big, recs[&keys.ip("east", big)].as_bytes())
            .expect("decodes");
        assert_eq!(ip.pod, "big");
        assert!(!recs[&keys.ip("east", big)].contains("apacity"));
    }

    #[test]
    fn unused_numbers_are_kept_for_the_grace_period_and_not_reused_meanwhile() {
        let grace = Duration::from_secs(60);
        let mut a = Allocator::new("east", 1, grace);
        let t0 = Instant::now();
        let api = |app: &str| pod("shop", "p", Some([10, 1, 0, 2]), &[("app", app)]);
        assert_eq!(a.assign(&state(vec![api("a")]), t0).allocated, vec![256]);
        // The pod changes labels: a new number; 256 stays held.
        let out = a.assign(&state(vec![api("b")]), t0 + Duration::from_secs(1));
        assert_eq!(out.allocated, vec![257]);
        assert_eq!(a.next_collection(), Some(t0 + Duration::from_secs(1) + grace));
        // A third label set does not take 256 while it is held.
        let out = a.assign(&state(vec![api("c")]), t0 + Duration::from_secs(2));
        assert_eq!(out.allocated, vec![258]);
        // Back to "a" within the grace period: the same number.
        let out = a.assign(&state(vec![api("a")]), t0 + Duration::from_secs(3));
        assert!(out.allocated.is_empty());
        assert_eq!(out.pods[&("shop".into(), "p".into())], compose(1, 256));
        // After the grace period, the unused ones are withdrawn, and free again on the next pass.
        let out = a.assign(&state(vec![api("a")]), t0 + Duration::from_secs(2) + grace);
        assert_eq!(
            out.collected,
            vec![257],
            "258 was unused for less than the grace period"
        );
        let out = a.assign(&state(vec![api("a")]), t0 + Duration::from_secs(3) + grace);
        assert_eq!(out.collected, vec![258]);
        assert_eq!(a.len(), 1);
        let out = a.assign(
            &state(vec![api("a"), pod("shop", "q", Some([10, 1, 0, 3]), &[])]),
            t0 + grace * 2,
        );
        assert_eq!(out.allocated, vec![257]);
    }

    #[test]
    fn restore_keeps_published_numbers_and_the_lowest_of_duplicates() {
        let mut a = Allocator::new("east", 1, Duration::from_secs(60));
        let s = state(vec![pod("shop", "p", Some([10, 1, 0, 2]), &[("app", "a")])]);
        let labels = identity_labels(
            "east",
            &s.pods[&("shop".into(), "p".into())],
            s.namespaces.get("shop"),
        );
        let rec = |n: u32, labels: &Labels| IdentityRecord {
            cluster: "east".into(),
            cluster_id: 1,
            identity: compose(1, n),
            labels: labels.clone(),
        };
        let other: Labels = [("x".to_owned(), "y".to_owned())].into();
        assert_eq!(
            a.restore(vec![rec(900, &labels), rec(300, &other), rec(700, &labels)]),
            3
        );
        let now = Instant::now();
        let out = a.assign(&s, now);
        assert!(out.allocated.is_empty());
        assert_eq!(out.pods[&("shop".into(), "p".into())], compose(1, 700));
        // A new label set gets the lowest free number, below the restored ones.
        let s2 = state(vec![
            pod("shop", "p", Some([10, 1, 0, 2]), &[("app", "a")]),
            pod("shop", "q", Some([10, 1, 0, 3]), &[("app", "b")]),
        ]);
        assert_eq!(a.assign(&s2, now).allocated, vec![256]);
        // The duplicate 900 and the unused 300 go after the grace period.
        let out = a.assign(&s2, now + Duration::from_secs(60));
        assert_eq!(out.collected, vec![300, 900]);
        // Restoring again does not override what is held.
        assert_eq!(a.restore(vec![rec(700, &other)]), 0);
    }
}
