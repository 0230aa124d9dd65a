//! What this cluster accepts from a peer cluster P: records under P's own name and cluster id, with addresses
//! inside the pod CIDRs accepted for P. A [`Grant`] decodes P's records and refuses anything beyond it, so that the
//! readers' tables only ever hold what P may claim (docs/security.md, "What a peer cluster can and cannot do").
//!
//! The grant comes from two places: what the peer file pins (`cluster-id`, `pod-cidrs`, written by `meshctl
//! clustermesh connect`), which always wins, and what P's own cluster config publishes (its id) where nothing is
//! pinned. Without pinned pod CIDRs the reader accepts P's node CIDRs that no other cluster claims (first claimant
//! keeps a prefix) and checks P's addresses against those.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

use crate::{DecodeError, IdentityRecord, IpRecord, NodeRecord, ServiceRecord};

/// Shortest pod CIDR prefix a node record may name (a /0 … /7 would claim a large part of the address space).
pub const MIN_POD_CIDR_LEN: u8 = 8;

/// What this cluster accepts from one peer cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// The peer's name (its peer file's name).
    pub cluster: String,
    /// The peer's cluster id: pinned in the peer file, else as its cluster config publishes it.
    pub cluster_id: u16,
    /// Pinned pod CIDRs (peer file `pod-cidrs`): every node CIDR, pod address and backend of the peer lies inside
    /// one. `None`: checked against the node CIDRs the reader accepted for the peer instead.
    pub pod_cidrs: Option<Vec<Ipv4Net>>,
}

/// Whether `ip` lies inside one of `cidrs`.
#[must_use]
pub fn covers(cidrs: &[Ipv4Net], ip: Ipv4Addr) -> bool {
    cidrs.iter().any(|c| c.contains(&ip))
}

impl Grant {
    fn wrong_id(&self, key: &str, found: u16) -> Result<(), DecodeError> {
        if found == self.cluster_id {
            Ok(())
        } else {
            Err(DecodeError::WrongClusterId {
                key: key.to_owned(),
                found,
                granted: self.cluster_id,
            })
        }
    }

    /// `Ok` when `ip` lies inside the pinned pod CIDRs (or none are pinned).
    fn inside(&self, key: &str, what: &str, ip: Ipv4Addr) -> Result<(), DecodeError> {
        match &self.pod_cidrs {
            Some(cidrs) if !covers(cidrs, ip) => Err(DecodeError::OutsidePodCidrs {
                key: key.to_owned(),
                what: format!("{what} {ip}"),
                accepted: list(cidrs),
            }),
            _ => Ok(()),
        }
    }

    /// Decodes a node record of the peer: [`crate::decode_node`], then its cluster id is the granted one, its pod
    /// CIDRs are canonical, at least /[`MIN_POD_CIDR_LEN`] and inside the pinned ones, and its underlay address is
    /// a unicast address.
    ///
    /// # Errors
    /// As [`crate::decode_node`]; [`DecodeError::WrongClusterId`], [`DecodeError::OutsidePodCidrs`], or
    /// [`DecodeError::Invalid`] for a CIDR or underlay address no node can have.
    pub fn decode_node(&self, key: &str, node: &str, value: &[u8]) -> Result<NodeRecord, DecodeError> {
        let rec = crate::decode_node(key, &self.cluster, node, value)?;
        self.wrong_id(key, rec.cluster_id)?;
        let invalid = |reason: String| DecodeError::Invalid {
            key: key.to_owned(),
            reason,
        };
        let u = rec.underlay_ipv4;
        if u.is_unspecified() || u.is_loopback() || u.is_multicast() || u.is_broadcast() {
            return Err(invalid(format!(
                "underlayIpv4 {u} is not a node's unicast address"
            )));
        }
        for c in &rec.pod_cidrs {
            if c.trunc() != *c {
                return Err(invalid(format!(
                    "pod CIDR {c} has host bits set (the network is {})",
                    c.trunc()
                )));
            }
            if c.prefix_len() < MIN_POD_CIDR_LEN {
                return Err(invalid(format!(
                    "pod CIDR {c} is shorter than /{MIN_POD_CIDR_LEN}"
                )));
            }
            if let Some(pinned) = &self.pod_cidrs
                && !pinned.iter().any(|p| p.contains(c))
            {
                return Err(DecodeError::OutsidePodCidrs {
                    key: key.to_owned(),
                    what: format!("pod CIDR {c}"),
                    accepted: list(pinned),
                });
            }
        }
        Ok(rec)
    }

    /// Decodes a service record of the peer: [`crate::decode_service`] (ports and weights in range), then its
    /// cluster id is the granted one and every backend lies inside the pinned pod CIDRs.
    ///
    /// # Errors
    /// As [`crate::decode_service`]; [`DecodeError::WrongClusterId`], [`DecodeError::OutsidePodCidrs`].
    pub fn decode_service(
        &self,
        key: &str,
        namespace: &str,
        name: &str,
        value: &[u8],
    ) -> Result<ServiceRecord, DecodeError> {
        let rec = crate::decode_service(key, &self.cluster, namespace, name, value)?;
        self.wrong_id(key, rec.cluster_id)?;
        for b in &rec.backends {
            self.inside(key, "backend", b.ipv4)?;
        }
        Ok(rec)
    }

    /// [`crate::decode_backend_slice`], then the cluster id and every backend address checked against the grant.
    ///
    /// # Errors
    /// As [`crate::decode_backend_slice`]; a wrong cluster id or a backend outside the granted pod CIDRs.
    pub fn decode_backend_slice(
        &self,
        key: &str,
        namespace: &str,
        name: &str,
        index: u32,
        value: &[u8],
    ) -> Result<crate::BackendSlice, DecodeError> {
        let rec = crate::decode_backend_slice(key, &self.cluster, namespace, name, index, value)?;
        self.wrong_id(key, rec.cluster_id)?;
        for b in &rec.backends {
            self.inside(key, "backend", b.ipv4)?;
        }
        Ok(rec)
    }

    /// Decodes an identity record of the peer: [`crate::decode_identity`], then its cluster id (and so the
    /// identity's cluster part) is the granted one.
    ///
    /// # Errors
    /// As [`crate::decode_identity`]; [`DecodeError::WrongClusterId`].
    pub fn decode_identity(
        &self,
        key: &str,
        number: u32,
        value: &[u8],
    ) -> Result<IdentityRecord, DecodeError> {
        let rec = crate::decode_identity(key, &self.cluster, number, value)?;
        self.wrong_id(key, rec.cluster_id)?;
        Ok(rec)
    }

    /// Decodes a pod address record of the peer: [`crate::decode_ip`], then its identity is of the granted cluster
    /// id and its address inside the pinned pod CIDRs.
    ///
    /// # Errors
    /// As [`crate::decode_ip`]; [`DecodeError::WrongClusterId`], [`DecodeError::OutsidePodCidrs`].
    pub fn decode_ip(&self, key: &str, ipv4: Ipv4Addr, value: &[u8]) -> Result<IpRecord, DecodeError> {
        let rec = crate::decode_ip(key, &self.cluster, ipv4, value)?;
        self.wrong_id(key, mesh_common::identity::cluster(rec.identity))?;
        self.inside(key, "pod address", rec.ipv4)?;
        Ok(rec)
    }
}

fn list(cidrs: &[Ipv4Net]) -> String {
    if cidrs.is_empty() {
        return "none".to_owned();
    }
    cidrs
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{BackendRecord, LABEL_CLUSTER, PortRecord, encode};
    use mesh_common::identity::compose;

    fn grant(pinned: Option<&[&str]>) -> Grant {
        Grant {
            cluster: "west".into(),
            cluster_id: 2,
            pod_cidrs: pinned.map(|p| p.iter().map(|c| c.parse().expect("cidr")).collect()),
        }
    }

    fn node() -> NodeRecord {
        NodeRecord {
            name: "west-node-1".into(),
            cluster: "west".into(),
            cluster_id: 2,
            underlay_ipv4: Ipv4Addr::new(172, 30, 2, 1),
            pod_cidrs: vec!["10.2.0.0/24".parse().expect("cidr")],
            wireguard: None,
        }
    }

    fn service(weight: u32, backend: [u8; 4]) -> ServiceRecord {
        let port = |p| PortRecord {
            name: "http".into(),
            port: p,
            protocol: mesh_model::Protocol::Tcp,
        };
        ServiceRecord {
            mcs: None,
            cluster: "west".into(),
            cluster_id: 2,
            namespace: "shop".into(),
            name: "api".into(),
            ports: vec![port(80)],
            backends: vec![BackendRecord {
                ipv4: Ipv4Addr::from(backend),
                ports: vec![port(8080)].into(),
                weight,
            }],
        }
    }

    fn ip(identity: u32, addr: [u8; 4]) -> IpRecord {
        IpRecord {
            ipv4: Ipv4Addr::from(addr),
            cluster: "west".into(),
            identity,
            namespace: "shop".into(),
            pod: "api-0".into(),
            node: "west-node-1".into(),
            named_ports: vec![],
        }
    }

    fn identity(cluster_id: u16) -> IdentityRecord {
        IdentityRecord {
            cluster: "west".into(),
            cluster_id,
            identity: compose(cluster_id, 300),
            labels: [
                ("app".to_owned(), "client".to_owned()),
                (LABEL_CLUSTER.to_owned(), "west".to_owned()),
            ]
            .into(),
        }
    }

    fn node_err(g: &Grant, rec: &NodeRecord) -> &'static str {
        g.decode_node("k", &rec.name, encode(rec).as_bytes())
            .expect_err("refused")
            .reason()
    }

    #[test]
    fn records_of_the_edge_cluster_ids_pass_their_grant_and_no_other() {
        for (id, other) in [(1u16, 4095u16), (4095, 1), (4095, 4094)] {
            let g = Grant {
                cluster_id: id,
                ..grant(None)
            };
            let n = NodeRecord {
                cluster_id: id,
                ..node()
            };
            assert_eq!(
                g.decode_node("k", "west-node-1", encode(&n).as_bytes()),
                Ok(n.clone()),
                "{id}"
            );
            let svc = ServiceRecord {
                cluster_id: id,
                ..service(1, [10, 2, 0, 5])
            };
            assert_eq!(
                g.decode_service("k", "shop", "api", encode(&svc).as_bytes()),
                Ok(svc.clone()),
                "{id}"
            );
            let rec = identity(id);
            assert_eq!(
                g.decode_identity("k", 300, encode(&rec).as_bytes()),
                Ok(rec.clone()),
                "{id}"
            );
            let addr = ip(compose(id, 300), [10, 2, 0, 5]);
            let pinned = Grant {
                cluster_id: id,
                ..grant(Some(&["10.2.0.0/16"]))
            };
            assert_eq!(
                pinned.decode_ip("k", addr.ipv4, encode(&addr).as_bytes()),
                Ok(addr),
                "{id}"
            );
            // The same records with the other edge's id are another cluster's: refused by reason.
            let n = NodeRecord {
                cluster_id: other,
                ..n
            };
            assert_eq!(node_err(&g, &n), "wrong_cluster_id", "{id} vs {other}");
            let svc = ServiceRecord {
                cluster_id: other,
                ..svc
            };
            assert_eq!(
                g.decode_service("k", "shop", "api", encode(&svc).as_bytes())
                    .expect_err("other id")
                    .reason(),
                "wrong_cluster_id"
            );
            assert_eq!(
                g.decode_identity("k", 300, encode(&identity(other)).as_bytes())
                    .expect_err("other id")
                    .reason(),
                "wrong_cluster_id"
            );
            let addr = ip(compose(other, 300), [10, 2, 0, 5]);
            assert_eq!(
                pinned
                    .decode_ip("k", addr.ipv4, encode(&addr).as_bytes())
                    .expect_err("other id")
                    .reason(),
                "wrong_cluster_id"
            );
        }
        // Beyond the edges a record is invalid whatever the grant.
        for id in [0u16, 4096] {
            let n = NodeRecord {
                cluster_id: id,
                ..node()
            };
            let g = Grant {
                cluster_id: id,
                ..grant(None)
            };
            assert_eq!(node_err(&g, &n), "invalid", "{id}");
        }
    }

    #[test]
    fn a_node_record_carries_the_granted_id() {
        let g = grant(None);
        assert_eq!(
            g.decode_node("k", "west-node-1", encode(&node()).as_bytes()),
            Ok(node())
        );
        // West republishing its node with east's id (1) passes as east: refused.
        let mut east = node();
        east.cluster_id = 1;
        let e = g
            .decode_node("k", "west-node-1", encode(&east).as_bytes())
            .expect_err("foreign id");
        assert_eq!(e.reason(), "wrong_cluster_id");
        assert!(
            e.to_string().contains("clusterId 1") && e.to_string().contains("granted cluster id 2"),
            "{e}"
        );
        // A record naming another cluster is still a key mismatch.
        let mut other = node();
        other.cluster = "east".into();
        assert_eq!(node_err(&g, &other), "key_mismatch");
    }

    #[test]
    fn node_cidrs_and_underlay_are_checked() {
        let with = |f: &dyn Fn(&mut NodeRecord)| {
            let mut n = node();
            f(&mut n);
            n
        };
        let g = grant(None);
        assert_eq!(
            node_err(
                &g,
                &with(&|n| n.pod_cidrs = vec!["10.2.0.1/24".parse().expect("cidr")])
            ),
            "invalid"
        );
        assert_eq!(
            node_err(
                &g,
                &with(&|n| n.pod_cidrs = vec!["0.0.0.0/0".parse().expect("cidr")])
            ),
            "invalid"
        );
        assert_eq!(
            node_err(&g, &with(&|n| n.underlay_ipv4 = Ipv4Addr::UNSPECIFIED)),
            "invalid"
        );
        assert_eq!(
            node_err(&g, &with(&|n| n.underlay_ipv4 = Ipv4Addr::new(224, 0, 0, 1))),
            "invalid"
        );
        // Pinned CIDRs: a node CIDR must lie inside one of them.
        let pinned = grant(Some(&["10.2.0.0/16"]));
        assert!(
            pinned
                .decode_node("k", "west-node-1", encode(&node()).as_bytes())
                .is_ok()
        );
        assert_eq!(
            node_err(
                &pinned,
                &with(&|n| n.pod_cidrs = vec!["10.1.0.0/24".parse().expect("cidr")])
            ),
            "outside_pod_cidrs"
        );
        assert_eq!(
            node_err(
                &pinned,
                &with(&|n| n.pod_cidrs = vec!["10.0.0.0/8".parse().expect("cidr")])
            ),
            "outside_pod_cidrs",
            "a CIDR larger than the pin"
        );
    }

    #[test]
    fn service_records_carry_the_granted_id_weights_in_range_and_pinned_backends() {
        let g = grant(Some(&["10.2.0.0/16"]));
        let d = |rec: &ServiceRecord| g.decode_service("k", "shop", "api", encode(rec).as_bytes());
        assert!(d(&service(1, [10, 2, 0, 5])).is_ok());
        assert!(d(&service(mesh_model::traffic::MAX_CAPACITY, [10, 2, 0, 5])).is_ok());
        // The weight that took every connection of a global service.
        let e = d(&service(u32::MAX, [10, 2, 0, 5])).expect_err("weight");
        assert_eq!(e.reason(), "invalid");
        assert!(e.to_string().contains("4294967295"), "{e}");
        assert_eq!(
            d(&service(mesh_model::traffic::MAX_CAPACITY + 1, [10, 2, 0, 5]))
                .expect_err("weight")
                .reason(),
            "invalid"
        );
        assert_eq!(
            d(&service(0, [10, 2, 0, 5])).expect_err("weight").reason(),
            "invalid"
        );
        let e = d(&service(1, [10, 1, 0, 5])).expect_err("backend outside");
        assert_eq!(e.reason(), "outside_pod_cidrs");
        assert!(e.to_string().contains("10.1.0.5"), "{e}");
        let mut foreign = service(1, [10, 2, 0, 5]);
        foreign.cluster_id = 1;
        assert_eq!(d(&foreign).expect_err("id").reason(), "wrong_cluster_id");
        // Without pins the backend is left to the reader's accepted node CIDRs.
        assert!(
            grant(None)
                .decode_service("k", "shop", "api", encode(&service(1, [10, 1, 0, 5])).as_bytes())
                .is_ok()
        );
    }

    #[test]
    fn identities_and_ips_carry_the_granted_id() {
        let g = grant(Some(&["10.2.0.0/16"]));
        assert!(
            g.decode_identity("k", 300, encode(&identity(2)).as_bytes())
                .is_ok()
        );
        // An identity in east's id space (1), consistent in itself: not west's to publish.
        assert_eq!(
            g.decode_identity("k", 300, encode(&identity(1)).as_bytes())
                .expect_err("foreign")
                .reason(),
            "wrong_cluster_id"
        );
        let a = Ipv4Addr::new(10, 2, 0, 7);
        assert!(
            g.decode_ip("k", a, encode(&ip(compose(2, 300), a.octets())).as_bytes())
                .is_ok()
        );
        assert_eq!(
            g.decode_ip("k", a, encode(&ip(compose(1, 300), a.octets())).as_bytes())
                .expect_err("foreign identity")
                .reason(),
            "wrong_cluster_id"
        );
        let east = Ipv4Addr::new(10, 1, 0, 7);
        assert_eq!(
            g.decode_ip("k", east, encode(&ip(compose(2, 300), east.octets())).as_bytes())
                .expect_err("outside")
                .reason(),
            "outside_pod_cidrs"
        );
    }
}
