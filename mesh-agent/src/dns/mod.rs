//! The clusterset DNS zone (`clusterset.local`), as the MCS DNS specification (KEP-1645, specification v1.0.0)
//! has it: docs/clusterset-dns.md.
//!
//! - [`ServiceDns`]: what one exported service contributes (computed by [`compute`] from the local state and the
//!   remote clusters' service records);
//! - [`Table`]: the zone's records, with per-service upsert and remove, and the lookup that decides between an
//!   answer, NODATA and NXDOMAIN; no I/O, unit-tested here;
//! - [`server`]: a `hickory-server` request handler over a shared table, forwarding other zones to an upstream (or
//!   refusing them).

pub mod compute;
pub mod server;
pub mod zone;

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;
use std::str::FromStr;

use hickory_proto::rr::rdata::{A, SOA, SRV, TXT};
use hickory_proto::rr::{LowerName, Name, RData, Record, RecordType};
use mesh_model::Protocol;
use serde::Serialize;

pub use compute::compute;
pub use zone::{SharedZone, Zone};

/// The zone: `clusterset.local` is the only value the MCS API allows.
pub const ZONE: &str = "clusterset.local.";
/// The schema version answered at `dns-version.clusterset.local. TXT`.
pub const SCHEMA_VERSION: &str = "1.0.0";
/// TTL of service and endpoint records (what CoreDNS' kubernetes plugin uses by default): an answer is at most this
/// old in a client's cache.
pub const TTL: u32 = 5;
/// TTL of the schema version record (the specification's example).
pub const VERSION_TTL: u32 = 28800;
/// Negative-caching TTL (SOA minimum): a name that does not exist yet is asked again this soon.
pub const NEGATIVE_TTL: u32 = 5;

/// A port of an exported service.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct DnsPort {
    /// Empty for an unnamed port (it gets no SRV record).
    pub name: String,
    pub port: u16,
    pub protocol: Protocol,
}

/// A ready endpoint of a headless service.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct DnsEndpoint {
    /// The exporting cluster's name (the `<clusterid>` label of hostname records).
    pub cluster: String,
    pub ipv4: Ipv4Addr,
    pub hostname: Option<String>,
}

/// What one exported service puts in the zone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceDns {
    pub namespace: String,
    pub name: String,
    /// `Some`: a ClusterSetIP service; `None`: headless.
    pub clusterset_ip: Option<Ipv4Addr>,
    pub ports: Vec<DnsPort>,
    /// Headless only: every exporting cluster's ready endpoints (sorted).
    pub endpoints: Vec<DnsEndpoint>,
    /// The clusters exporting it (sorted).
    pub clusters: Vec<String>,
}

/// The result of a lookup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// The name is not in the zone: not ours to answer.
    NotOurs,
    /// The name does not exist in the zone (NXDOMAIN, with the SOA).
    NxDomain,
    /// The name exists, without records of the asked type (NOERROR, no answers, with the SOA).
    NoData,
    /// The records.
    Records(Vec<Record>),
}

#[derive(Debug, Default)]
struct Node {
    /// Services with a name at or below this one (empty non-terminals exist, RFC 8020).
    refs: u32,
    records: Vec<Record>,
}

#[derive(Debug)]
struct Entry {
    dns: ServiceDns,
    /// Names that carry this service's records.
    owned: Vec<LowerName>,
    /// Every name this service holds a reference on (owned names and their ancestors below the zone).
    held: Vec<LowerName>,
}

/// A name the table cannot hold.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TableError {
    #[error("service {namespace}/{name}: {what} {label:?} is not a DNS label")]
    NotALabel {
        namespace: String,
        name: String,
        what: &'static str,
        label: String,
    },
}

/// The records of the clusterset zone.
#[derive(Debug)]
pub struct Table {
    zone: LowerName,
    soa: Record,
    nodes: HashMap<LowerName, Node>,
    services: BTreeMap<(String, String), Entry>,
    records: usize,
    /// What the server answers, kept up to date per name ([`Table::snapshot`]).
    answers: Zone,
}

impl Default for Table {
    fn default() -> Self {
        Self::new()
    }
}

fn name(s: &str) -> Name {
    // Only called with names built from validated labels.
    Name::from_ascii(s).unwrap_or_else(|_| Name::root())
}

fn label_ok(s: &str) -> bool {
    mesh_kvstore::is_dns_label(s)
}

impl Table {
    #[must_use]
    pub fn new() -> Self {
        let zone = name(ZONE);
        let soa = Record::from_rdata(
            zone.clone(),
            NEGATIVE_TTL,
            RData::SOA(SOA::new(
                name(&format!("ns.dns.{ZONE}")),
                name(&format!("hostmaster.{ZONE}")),
                1,
                7200,
                1800,
                86400,
                NEGATIVE_TTL,
            )),
        );
        let version = Record::from_rdata(
            name(&format!("dns-version.{ZONE}")),
            VERSION_TTL,
            RData::TXT(TXT::new(vec![SCHEMA_VERSION.to_owned()])),
        );
        let mut answers = Zone::new(&zone, soa.clone());
        answers.set(
            &zone,
            Some(zone::NameAnswers::new(&zone, vec![soa.clone()], &soa)),
        );
        answers.set(
            &version.name,
            Some(zone::NameAnswers::new(&version.name, vec![version.clone()], &soa)),
        );
        Self {
            zone: LowerName::from(&zone),
            soa,
            nodes: HashMap::new(),
            services: BTreeMap::new(),
            records: 0,
            answers,
        }
    }

    /// The zone as the server answers it: a snapshot that shares its names with the table (it costs nothing).
    #[must_use]
    pub fn snapshot(&self) -> Zone {
        self.answers.clone()
    }

    /// Re-encodes the answers of the names in `touched` from their nodes.
    fn refresh(&mut self, touched: std::collections::BTreeSet<LowerName>) {
        for n in touched {
            let name = Name::from(n.clone());
            let answers = self
                .nodes
                .get(&n)
                .map(|node| zone::NameAnswers::new(&name, node.records.clone(), &self.soa));
            self.answers.set(&name, answers);
        }
    }

    /// The zone's SOA record (for negative answers' authority section).
    #[must_use]
    pub fn soa(&self) -> &Record {
        &self.soa
    }

    /// Number of services in the zone.
    #[must_use]
    pub fn services(&self) -> usize {
        self.services.len()
    }

    /// Number of records in the zone (not counting the SOA and the version record).
    #[must_use]
    pub fn records(&self) -> usize {
        self.records
    }

    /// The service's entry, if the zone has it.
    #[must_use]
    pub fn service(&self, namespace: &str, name: &str) -> Option<&ServiceDns> {
        self.services
            .get(&(namespace.to_owned(), name.to_owned()))
            .map(|e| &e.dns)
    }

    /// Adds or replaces a service's records. Unchanged input changes nothing; bad input changes nothing either.
    ///
    /// # Errors
    /// When the namespace, name, a port name, a cluster or a hostname is not a DNS label.
    pub fn upsert(&mut self, dns: ServiceDns) -> Result<bool, TableError> {
        let key = (dns.namespace.clone(), dns.name.clone());
        if self.services.get(&key).is_some_and(|e| e.dns == dns) {
            return Ok(false);
        }
        let records = build(&dns)?;
        let mut touched = std::collections::BTreeSet::new();
        self.remove_inner(&dns.namespace, &dns.name, &mut touched);
        let zone_labels = self.zone.num_labels();
        let mut owned = Vec::new();
        let mut held = Vec::new();
        for (n, rs) in records {
            let lower = LowerName::from(&n);
            // The name and its ancestors below the zone.
            let mut cur: Name = n.clone();
            while cur.num_labels() > zone_labels {
                let l = LowerName::from(&cur);
                self.nodes.entry(l.clone()).or_default().refs += 1;
                touched.insert(l.clone());
                held.push(l);
                cur = cur.base_name();
            }
            let node = self.nodes.entry(lower.clone()).or_default();
            self.records += rs.len();
            node.records.extend(rs);
            owned.push(lower);
        }
        self.services.insert(key, Entry { dns, owned, held });
        self.refresh(touched);
        Ok(true)
    }

    /// Removes a service's records; `false` when the zone did not have it.
    pub fn remove(&mut self, namespace: &str, name: &str) -> bool {
        let mut touched = std::collections::BTreeSet::new();
        let removed = self.remove_inner(namespace, name, &mut touched);
        self.refresh(touched);
        removed
    }

    fn remove_inner(
        &mut self,
        namespace: &str,
        name: &str,
        touched: &mut std::collections::BTreeSet<LowerName>,
    ) -> bool {
        let Some(e) = self.services.remove(&(namespace.to_owned(), name.to_owned())) else {
            return false;
        };
        for n in &e.owned {
            if let Some(node) = self.nodes.get_mut(n) {
                self.records -= node.records.len();
                node.records.clear();
            }
        }
        for n in &e.held {
            if let Some(node) = self.nodes.get_mut(n) {
                node.refs -= 1;
                if node.refs == 0 {
                    self.nodes.remove(n);
                }
            }
            touched.insert(n.clone());
        }
        true
    }

    /// Makes the zone hold exactly `wanted`: upserts what changed, removes what is gone. Returns the services
    /// changed and the refusals (a refused service keeps its previous records, if any).
    pub fn sync(&mut self, wanted: Vec<ServiceDns>) -> (usize, Vec<TableError>) {
        let keep: std::collections::BTreeSet<(String, String)> = wanted
            .iter()
            .map(|d| (d.namespace.clone(), d.name.clone()))
            .collect();
        let gone: Vec<(String, String)> = self
            .services
            .keys()
            .filter(|k| !keep.contains(*k))
            .cloned()
            .collect();
        let mut changed = 0;
        for (ns, n) in gone {
            changed += usize::from(self.remove(&ns, &n));
        }
        let mut errors = Vec::new();
        for d in wanted {
            match self.upsert(d) {
                Ok(c) => changed += usize::from(c),
                Err(e) => errors.push(e),
            }
        }
        (changed, errors)
    }

    /// Looks `qname` up for records of `qtype` (`ANY` returns every record of the name).
    #[must_use]
    pub fn lookup(&self, qname: &LowerName, qtype: RecordType) -> Lookup {
        self.answers.lookup(qname, qtype)
    }

    /// Looks up a name given as text (`meshctl dns lookup`, tests).
    ///
    /// # Errors
    /// When `qname` is not a domain name.
    pub fn lookup_str(&self, qname: &str, qtype: RecordType) -> Result<Lookup, String> {
        let n = LowerName::from_str(qname).map_err(|e| format!("{qname:?}: {e}"))?;
        let mut n: Name = n.into();
        n.set_fqdn(true);
        Ok(self.lookup(&LowerName::from(n), qtype))
    }
}

/// What the agent's control loop calls when the local state or the peers' service records changed: computes the
/// imports and their ClusterSetIPs, brings the zone up to date (per service: only what changed is rewritten),
/// publishes it to the server, and returns the local state with the imports' synthetic services, for the
/// reconciler to program.
#[derive(Debug)]
pub struct Clusterset {
    pub imports: crate::clusterset::Imports,
    pub table: Table,
    /// What the server answers from; replaced (not locked) after each change of the table.
    pub zone: SharedZone,
    /// The imports of the last full pass, by service.
    last: BTreeMap<(String, String), crate::clusterset::Import>,
}

impl Clusterset {
    #[must_use]
    pub fn new(range: ipnet::Ipv4Net) -> Self {
        let table = Table::new();
        let zone = std::sync::Arc::new(arc_swap::ArcSwap::from_pointee(table.snapshot()));
        Self {
            imports: crate::clusterset::Imports::new(range),
            table,
            zone,
            last: BTreeMap::new(),
        }
    }

    fn publish(&self) {
        self.zone.store(std::sync::Arc::new(self.table.snapshot()));
    }

    /// A full pass over the local state of cluster `me` and the remote clusters that may be used (work in the
    /// number of imports).
    pub fn pass(
        &mut self,
        me: &str,
        local: &mesh_model::ClusterState,
        remotes: &BTreeMap<String, crate::remote::RemoteCluster>,
    ) -> mesh_model::ClusterState {
        let imports = self.imports.update(me, local, remotes);
        let wanted: Vec<ServiceDns> = imports
            .iter()
            .filter_map(|i| compute(me, i, local, remotes))
            .collect();
        let (changed, errors) = self.table.sync(wanted);
        for e in errors {
            tracing::warn!(error = %e, "clusterset DNS: service left out of the zone");
        }
        if changed > 0 {
            self.publish();
        }
        self.last = imports
            .iter()
            .map(|i| ((i.namespace.clone(), i.name.clone()), i.clone()))
            .collect();
        crate::clusterset::with_imports(local, &imports)
    }

    /// Only the peers' service records of `changed` (`namespace/name`) changed since the last pass: their zone
    /// entries are recomputed (work in the number of changed services). `false` when an import itself came, went
    /// or changed (exporting clusters, ports, type): the imports need a full [`Clusterset::pass`] then, and nothing
    /// was changed.
    pub fn pass_services<'a>(
        &mut self,
        me: &str,
        local: &mesh_model::ClusterState,
        remotes: &BTreeMap<String, crate::remote::RemoteCluster>,
        changed: impl IntoIterator<Item = &'a String>,
    ) -> bool {
        let mut todo = Vec::new();
        for id in changed {
            let Some((ns, name)) = id.split_once('/') else {
                continue;
            };
            let key = (ns.to_owned(), name.to_owned());
            let now = crate::clusterset::import_of(me, local, remotes, &key);
            let last = self.last.get(&key);
            let same = match (&now, last) {
                (None, None) => true,
                (Some(n), Some(l)) => {
                    n.headless == l.headless && n.ports == l.ports && n.clusters == l.clusters
                }
                _ => false,
            };
            if !same {
                return false;
            }
            if let Some(mut i) = now {
                i.ip = self.imports.ip_of(&key);
                todo.push(i);
            }
        }
        let mut changed = 0;
        for i in &todo {
            match compute(me, i, local, remotes) {
                Some(d) => match self.table.upsert(d) {
                    Ok(c) => changed += usize::from(c),
                    Err(e) => tracing::warn!(error = %e, "clusterset DNS: service left out of the zone"),
                },
                None => changed += usize::from(self.table.remove(&i.namespace, &i.name)),
            }
        }
        if changed > 0 {
            self.publish();
        }
        true
    }
}

/// The records of one service, by owner name.
fn build(d: &ServiceDns) -> Result<Vec<(Name, Vec<Record>)>, TableError> {
    let bad = |what: &'static str, label: &str| TableError::NotALabel {
        namespace: d.namespace.clone(),
        name: d.name.clone(),
        what,
        label: label.to_owned(),
    };
    if !label_ok(&d.namespace) {
        return Err(bad("namespace", &d.namespace));
    }
    if !label_ok(&d.name) {
        return Err(bad("name", &d.name));
    }
    for p in d.ports.iter().filter(|p| !p.name.is_empty()) {
        if !label_ok(&p.name) {
            return Err(bad("port name", &p.name));
        }
    }
    for e in &d.endpoints {
        if !label_ok(&e.cluster) {
            return Err(bad("cluster", &e.cluster));
        }
        if let Some(h) = &e.hostname
            && !label_ok(h)
        {
            return Err(bad("hostname", h));
        }
    }
    let base = format!("{}.{}.svc.{ZONE}", d.name, d.namespace);
    let base_name = name(&base);
    let proto = |p: Protocol| match p {
        Protocol::Tcp => "_tcp",
        Protocol::Udp => "_udp",
    };
    let mut out: Vec<(Name, Vec<Record>)> = Vec::new();
    let a = |n: &Name, ip: Ipv4Addr| Record::from_rdata(n.clone(), TTL, RData::A(A(ip)));
    let srv = |n: &Name, port: u16, target: &Name| {
        Record::from_rdata(n.clone(), TTL, RData::SRV(SRV::new(0, 100, port, target.clone())))
    };
    if let Some(ip) = d.clusterset_ip {
        out.push((base_name.clone(), vec![a(&base_name, ip)]));
        for p in d.ports.iter().filter(|p| !p.name.is_empty()) {
            let n = name(&format!("_{}.{}.{base}", p.name, proto(p.protocol)));
            out.push((n.clone(), vec![srv(&n, p.port, &base_name)]));
        }
        return Ok(out);
    }
    // Headless: no ready endpoint, no name (NXDOMAIN, as the specification says).
    if d.endpoints.is_empty() {
        return Ok(out);
    }
    let mut ips: Vec<Ipv4Addr> = d.endpoints.iter().map(|e| e.ipv4).collect();
    ips.sort();
    ips.dedup();
    out.push((
        base_name.clone(),
        ips.iter().map(|ip| a(&base_name, *ip)).collect(),
    ));
    let mut hosts: BTreeMap<String, Vec<Ipv4Addr>> = BTreeMap::new();
    for e in &d.endpoints {
        if let Some(h) = &e.hostname {
            hosts
                .entry(format!("{h}.{}.{base}", e.cluster))
                .or_default()
                .push(e.ipv4);
        }
    }
    for (h, ips) in &hosts {
        let n = name(h);
        out.push((n.clone(), ips.iter().map(|ip| a(&n, *ip)).collect()));
    }
    for p in d.ports.iter().filter(|p| !p.name.is_empty()) {
        let n = name(&format!("_{}.{}.{base}", p.name, proto(p.protocol)));
        let rs: Vec<Record> = hosts.keys().map(|h| srv(&n, p.port, &name(h))).collect();
        if !rs.is_empty() {
            out.push((n, rs));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn clusterset(name: &str, ip: [u8; 4]) -> ServiceDns {
        ServiceDns {
            namespace: "demo".into(),
            name: name.into(),
            clusterset_ip: Some(Ipv4Addr::from(ip)),
            ports: vec![
                DnsPort {
                    name: "http".into(),
                    port: 80,
                    protocol: Protocol::Tcp,
                },
                DnsPort {
                    name: String::new(),
                    port: 81,
                    protocol: Protocol::Tcp,
                },
            ],
            endpoints: Vec::new(),
            clusters: vec!["east".into()],
        }
    }

    fn headless(eps: &[(&str, [u8; 4], Option<&str>)]) -> ServiceDns {
        ServiceDns {
            namespace: "demo".into(),
            name: "db".into(),
            clusterset_ip: None,
            ports: vec![DnsPort {
                name: "sql".into(),
                port: 5432,
                protocol: Protocol::Tcp,
            }],
            endpoints: eps
                .iter()
                .map(|(c, ip, h)| DnsEndpoint {
                    cluster: (*c).into(),
                    ipv4: Ipv4Addr::from(*ip),
                    hostname: h.map(str::to_owned),
                })
                .collect(),
            clusters: vec!["east".into(), "west".into()],
        }
    }

    fn a_records(l: &Lookup) -> Vec<Ipv4Addr> {
        let Lookup::Records(rs) = l else { return Vec::new() };
        let mut v: Vec<Ipv4Addr> = rs
            .iter()
            .filter_map(|r| match &r.data {
                RData::A(a) => Some(a.0),
                _ => None,
            })
            .collect();
        v.sort();
        v
    }

    fn srv_targets(l: &Lookup) -> Vec<(u16, String)> {
        let Lookup::Records(rs) = l else { return Vec::new() };
        rs.iter()
            .filter_map(|r| match &r.data {
                RData::SRV(s) => Some((s.port, s.target.to_ascii())),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn clusterset_ip_records() {
        let mut t = Table::new();
        assert_eq!(t.upsert(clusterset("echo", [198, 19, 0, 5])), Ok(true));
        let l = t
            .lookup_str("echo.demo.svc.clusterset.local", RecordType::A)
            .unwrap();
        assert_eq!(a_records(&l), vec![Ipv4Addr::new(198, 19, 0, 5)]);
        let Lookup::Records(rs) = &l else { panic!("{l:?}") };
        assert_eq!(rs[0].ttl, TTL);
        // Case does not matter.
        let l = t
            .lookup_str("ECHO.Demo.svc.clusterset.local.", RecordType::A)
            .unwrap();
        assert_eq!(a_records(&l), vec![Ipv4Addr::new(198, 19, 0, 5)]);
        // The SRV of the named port; the unnamed one has none.
        let l = t
            .lookup_str("_http._tcp.echo.demo.svc.clusterset.local", RecordType::SRV)
            .unwrap();
        assert_eq!(
            srv_targets(&l),
            vec![(80, "echo.demo.svc.clusterset.local.".to_owned())]
        );
        assert_eq!(
            t.lookup_str("_http._udp.echo.demo.svc.clusterset.local", RecordType::SRV)
                .unwrap(),
            Lookup::NxDomain
        );
        // NODATA: the name exists, not the type.
        assert_eq!(
            t.lookup_str("echo.demo.svc.clusterset.local", RecordType::AAAA)
                .unwrap(),
            Lookup::NoData
        );
        assert_eq!(
            t.lookup_str("echo.demo.svc.clusterset.local", RecordType::MX)
                .unwrap(),
            Lookup::NoData
        );
        // Empty non-terminals are NODATA, not NXDOMAIN (RFC 8020).
        assert_eq!(
            t.lookup_str("demo.svc.clusterset.local", RecordType::A).unwrap(),
            Lookup::NoData
        );
        assert_eq!(
            t.lookup_str("svc.clusterset.local", RecordType::A).unwrap(),
            Lookup::NoData
        );
        assert_eq!(
            t.lookup_str("_tcp.echo.demo.svc.clusterset.local", RecordType::A)
                .unwrap(),
            Lookup::NoData
        );
        // Absent names, and names out of the zone.
        assert_eq!(
            t.lookup_str("other.demo.svc.clusterset.local", RecordType::A)
                .unwrap(),
            Lookup::NxDomain
        );
        assert_eq!(
            t.lookup_str("echo.other.svc.clusterset.local", RecordType::A)
                .unwrap(),
            Lookup::NxDomain
        );
        // No per-cluster name for a ClusterSetIP service.
        assert_eq!(
            t.lookup_str("east.echo.demo.svc.clusterset.local", RecordType::A)
                .unwrap(),
            Lookup::NxDomain
        );
        assert_eq!(
            t.lookup_str("echo.demo.svc.cluster.local", RecordType::A)
                .unwrap(),
            Lookup::NotOurs
        );
        assert_eq!(
            t.lookup_str("example.com", RecordType::A).unwrap(),
            Lookup::NotOurs
        );
        assert_eq!(
            t.lookup_str("clusterset.local.example.com", RecordType::A)
                .unwrap(),
            Lookup::NotOurs
        );
        assert_eq!(t.records(), 2);
    }

    #[test]
    fn apex_and_version() {
        let t = Table::new();
        let l = t
            .lookup_str("dns-version.clusterset.local", RecordType::TXT)
            .unwrap();
        let Lookup::Records(rs) = l else { panic!() };
        assert_eq!(rs[0].ttl, VERSION_TTL);
        assert!(matches!(&rs[0].data, RData::TXT(t) if t.to_string().contains(SCHEMA_VERSION)));
        assert!(matches!(
            t.lookup_str("clusterset.local", RecordType::SOA).unwrap(),
            Lookup::Records(_)
        ));
        assert_eq!(
            t.lookup_str("clusterset.local", RecordType::A).unwrap(),
            Lookup::NoData
        );
        assert_eq!(
            t.lookup_str("svc.clusterset.local", RecordType::A).unwrap(),
            Lookup::NxDomain
        );
    }

    #[test]
    fn headless_records() {
        let mut t = Table::new();
        t.upsert(headless(&[
            ("east", [10, 1, 0, 5], Some("db-0")),
            ("west", [10, 2, 0, 7], Some("db-0")),
            ("west", [10, 2, 0, 8], None),
        ]))
        .unwrap();
        let l = t
            .lookup_str("db.demo.svc.clusterset.local", RecordType::A)
            .unwrap();
        assert_eq!(
            a_records(&l),
            vec![
                Ipv4Addr::new(10, 1, 0, 5),
                Ipv4Addr::new(10, 2, 0, 7),
                Ipv4Addr::new(10, 2, 0, 8)
            ]
        );
        let l = t
            .lookup_str("db-0.west.db.demo.svc.clusterset.local", RecordType::A)
            .unwrap();
        assert_eq!(a_records(&l), vec![Ipv4Addr::new(10, 2, 0, 7)]);
        let l = t
            .lookup_str("_sql._tcp.db.demo.svc.clusterset.local", RecordType::SRV)
            .unwrap();
        let mut got = srv_targets(&l);
        got.sort();
        assert_eq!(
            got,
            vec![
                (5432, "db-0.east.db.demo.svc.clusterset.local.".to_owned()),
                (5432, "db-0.west.db.demo.svc.clusterset.local.".to_owned())
            ]
        );
        // The cluster label alone is an empty non-terminal, which has no records of its own.
        assert_eq!(
            t.lookup_str("west.db.demo.svc.clusterset.local", RecordType::A)
                .unwrap(),
            Lookup::NoData
        );
        // A backend removed in one cluster: only its records go.
        t.upsert(headless(&[
            ("east", [10, 1, 0, 5], Some("db-0")),
            ("west", [10, 2, 0, 8], None),
        ]))
        .unwrap();
        assert_eq!(
            t.lookup_str("db-0.west.db.demo.svc.clusterset.local", RecordType::A)
                .unwrap(),
            Lookup::NxDomain
        );
        let l = t
            .lookup_str("db.demo.svc.clusterset.local", RecordType::A)
            .unwrap();
        assert_eq!(
            a_records(&l),
            vec![Ipv4Addr::new(10, 1, 0, 5), Ipv4Addr::new(10, 2, 0, 8)]
        );
        // No ready endpoint: NXDOMAIN.
        t.upsert(headless(&[])).unwrap();
        assert_eq!(
            t.lookup_str("db.demo.svc.clusterset.local", RecordType::A)
                .unwrap(),
            Lookup::NxDomain
        );
        assert_eq!(t.records(), 0);
    }

    #[test]
    fn remove_and_sync_leave_nothing_behind() {
        let mut t = Table::new();
        t.upsert(clusterset("a", [198, 19, 0, 1])).unwrap();
        t.upsert(clusterset("b", [198, 19, 0, 2])).unwrap();
        assert!(t.remove("demo", "a"));
        assert!(!t.remove("demo", "a"));
        assert_eq!(
            t.lookup_str("a.demo.svc.clusterset.local", RecordType::A)
                .unwrap(),
            Lookup::NxDomain
        );
        // b keeps the shared ancestors alive.
        assert_eq!(
            t.lookup_str("demo.svc.clusterset.local", RecordType::A).unwrap(),
            Lookup::NoData
        );
        let (changed, errors) = t.sync(vec![clusterset("c", [198, 19, 0, 3])]);
        assert_eq!((changed, errors.len()), (2, 0));
        assert_eq!(t.services(), 1);
        let (changed, _) = t.sync(vec![clusterset("c", [198, 19, 0, 3])]);
        assert_eq!(changed, 0, "unchanged input changes nothing");
        t.sync(Vec::new());
        assert_eq!((t.services(), t.records(), t.nodes.len()), (0, 0, 0));
    }

    #[test]
    fn bad_labels_are_refused_and_keep_the_previous_records() {
        let mut t = Table::new();
        t.upsert(headless(&[("east", [10, 1, 0, 5], Some("db-0"))]))
            .unwrap();
        let bad = headless(&[("east", [10, 1, 0, 6], Some("Not_A_Label"))]);
        assert!(matches!(
            t.upsert(bad),
            Err(TableError::NotALabel { what: "hostname", .. })
        ));
        let l = t
            .lookup_str("db.demo.svc.clusterset.local", RecordType::A)
            .unwrap();
        assert_eq!(a_records(&l), vec![Ipv4Addr::new(10, 1, 0, 5)]);
        let mut long = clusterset("x", [198, 19, 0, 9]);
        long.name = "x".repeat(64);
        assert!(t.upsert(long).is_err());
        let mut port = clusterset("y", [198, 19, 0, 9]);
        port.ports[0].name = "-bad".into();
        assert!(t.upsert(port).is_err());
        assert_eq!(t.services(), 1);
    }
}
