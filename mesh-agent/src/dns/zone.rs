//! An immutable snapshot of the clusterset zone, as the DNS server answers from it: every name of the zone (empty
//! non-terminals included) with its records and its responses already encoded by hickory.
//!
//! The [`Table`](super::Table) owns the zone and updates it per service (a persistent map: a change costs the names
//! it touches, a snapshot costs nothing); the control loop publishes a snapshot after each change
//! ([`SharedZone`], an `ArcSwap`), and the server's threads read it with no lock.
//!
//! The fast path ([`Zone::fast_answer`]) is a response cache keyed by the question: it answers the plain case (one
//! question of class IN, at most one OPT record, a name of the zone that exists) by copying the response hickory
//! encoded when the name changed and setting the query's id, flags and question bytes (the same name, perhaps in
//! other case: the same length, so the compression pointers of the encoded response stay right). Everything else
//! (NXDOMAIN, other zones, `ANY`, malformed or unusual messages, answers too large for the datagram) goes to the
//! slow path, which decodes and encodes with hickory ([`super::server`]).

use std::sync::Arc;

use arc_swap::ArcSwap;
use hickory_proto::op::{Edns, Message, OpCode, Query};
use hickory_proto::rr::{LowerName, Name, Record, RecordType};

use super::Lookup;

/// What the server reads: the last published snapshot.
pub type SharedZone = Arc<ArcSwap<Zone>>;

/// The UDP payload size the server advertises in its OPT record (the DNS flag day 2020 value).
pub const EDNS_PAYLOAD: u16 = 1232;
/// The largest UDP response to a query without EDNS (RFC 1035).
pub const PLAIN_UDP_LIMIT: usize = 512;

/// A response encoded without and with an OPT record.
#[derive(Debug, Clone)]
struct Encoded {
    plain: Box<[u8]>,
    edns: Box<[u8]>,
}

/// One name of the zone.
#[derive(Debug)]
pub struct NameAnswers {
    /// Every record of the name (empty for an empty non-terminal).
    records: Vec<Record>,
    /// The answer for each record type the name has.
    typed: Vec<(RecordType, Encoded)>,
    /// NODATA (the SOA in the authority section) for every other type.
    nodata: Encoded,
}

/// The zone as the server answers it.
#[derive(Debug, Clone)]
pub struct Zone {
    origin: LowerName,
    soa: Record,
    names: imbl::HashMap<Box<[u8]>, Arc<NameAnswers>>,
}

/// The wire form of `name` in lower case (the key of [`Zone`]'s names).
#[must_use]
pub fn wire_key(name: &Name) -> Box<[u8]> {
    let mut k = Vec::with_capacity(name.len() + 2);
    for label in name.iter() {
        // Labels of a `Name` are at most 63 bytes.
        k.push(u8::try_from(label.len()).unwrap_or(63));
        k.extend(label.iter().map(u8::to_ascii_lowercase));
    }
    k.push(0);
    k.into_boxed_slice()
}

fn encode(qname: &Name, qtype: RecordType, answers: Vec<Record>, soa: Option<&Record>) -> Encoded {
    let mut m = Message::response(0, OpCode::Query);
    m.metadata.authoritative = true;
    m.add_query(Query::query(qname.clone(), qtype));
    m.answers = answers;
    if let Some(soa) = soa {
        m.add_authority(soa.clone());
    }
    // Records of validated labels always encode; an empty answer would only send the client to the slow path.
    let plain = m.to_vec().unwrap_or_default().into_boxed_slice();
    let mut e = Edns::new();
    e.set_max_payload(EDNS_PAYLOAD);
    m.set_edns(e);
    let edns = m.to_vec().unwrap_or_default().into_boxed_slice();
    Encoded { plain, edns }
}

impl NameAnswers {
    /// The answers of `name` with `records`; `soa` for negative answers.
    #[must_use]
    pub fn new(name: &Name, records: Vec<Record>, soa: &Record) -> Self {
        let mut types: Vec<RecordType> = records.iter().map(Record::record_type).collect();
        types.sort();
        types.dedup();
        let typed = types
            .into_iter()
            .map(|t| {
                let rs: Vec<Record> = records.iter().filter(|r| r.record_type() == t).cloned().collect();
                (t, encode(name, t, rs, None))
            })
            .collect();
        // The question's type is the query's (copied in): any placeholder will do.
        let nodata = encode(name, RecordType::NULL, Vec::new(), Some(soa));
        Self {
            records,
            typed,
            nodata,
        }
    }

    /// Heap bytes of the encoded responses (for the memory figure).
    #[must_use]
    pub fn encoded_bytes(&self) -> usize {
        let e = |x: &Encoded| x.plain.len() + x.edns.len();
        self.typed.iter().map(|(_, x)| e(x)).sum::<usize>() + e(&self.nodata)
    }
}

/// Whether a query type asks for something other than records of one type (these go to the slow path).
fn meta_type(t: u16) -> bool {
    t == 0 || t == 41 || (128..=255).contains(&t)
}

fn u16_at(b: &[u8], i: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(i)?, *b.get(i + 1)?]))
}

impl Zone {
    /// An empty zone at `origin` with its SOA (answered at the apex).
    #[must_use]
    pub fn new(origin: &Name, soa: Record) -> Self {
        Self {
            origin: LowerName::from(origin),
            soa,
            names: imbl::HashMap::new(),
        }
    }

    /// Sets the answers of `name` (`None`: the name leaves the zone).
    pub fn set(&mut self, name: &Name, answers: Option<NameAnswers>) {
        let k = wire_key(name);
        match answers {
            Some(a) => {
                self.names.insert(k, Arc::new(a));
            }
            None => {
                self.names.remove(&k);
            }
        }
    }

    /// The zone's SOA record.
    #[must_use]
    pub fn soa(&self) -> &Record {
        &self.soa
    }

    /// Names in the zone (empty non-terminals included).
    #[must_use]
    pub fn names(&self) -> usize {
        self.names.len()
    }

    /// Heap bytes of every encoded response.
    #[must_use]
    pub fn encoded_bytes(&self) -> usize {
        self.names.values().map(|a| a.encoded_bytes()).sum()
    }

    /// Looks up the A records of a name given as text (tests).
    ///
    /// # Panics
    /// When `name` is not a domain name.
    #[cfg(test)]
    #[must_use]
    pub fn lookup_str(&self, name: &str) -> Lookup {
        self.lookup(&LowerName::from(Name::from_ascii(name).unwrap()), RecordType::A)
    }

    /// Looks `qname` up for records of `qtype` (`ANY` returns every record of the name).
    #[must_use]
    pub fn lookup(&self, qname: &LowerName, qtype: RecordType) -> Lookup {
        if !self.origin.zone_of(qname) {
            return Lookup::NotOurs;
        }
        let Some(a) = self.names.get(&wire_key(&Name::from(qname.clone()))[..]) else {
            return Lookup::NxDomain;
        };
        let rs: Vec<Record> = a
            .records
            .iter()
            .filter(|r| qtype == RecordType::ANY || r.record_type() == qtype)
            .cloned()
            .collect();
        if rs.is_empty() {
            Lookup::NoData
        } else {
            Lookup::Records(rs)
        }
    }

    /// Writes the response to the datagram `q` into `out` when the fast path can answer it (see the module's
    /// documentation); `false` leaves the query to the slow path. `recursion_available` sets the RA flag (an
    /// upstream is configured). Allocates nothing once `out` has grown to the largest response.
    pub fn fast_answer(&self, q: &[u8], out: &mut Vec<u8>, recursion_available: bool) -> bool {
        self.fast_answer_inner(q, out, recursion_available).is_some()
    }

    fn fast_answer_inner(&self, q: &[u8], out: &mut Vec<u8>, recursion_available: bool) -> Option<()> {
        // Header: a query (QR 0), opcode QUERY, not truncated; one question, no answers or authorities, at most
        // one additional record (the OPT).
        let flags = *q.get(2)?;
        if flags & 0xFA != 0 {
            return None;
        }
        if u16_at(q, 4)? != 1 || u16_at(q, 6)? != 0 || u16_at(q, 8)? != 0 {
            return None;
        }
        let additionals = u16_at(q, 10)?;
        if additionals > 1 {
            return None;
        }
        // The question's name: plain labels (no compression pointer), lower-cased into the key.
        let mut key = [0u8; 256];
        let (mut i, mut k) = (12usize, 0usize);
        loop {
            let len = usize::from(*q.get(i)?);
            if len == 0 {
                break;
            }
            if len > 63 || k + len + 2 > 255 {
                return None;
            }
            let label = q.get(i + 1..i + 1 + len)?;
            key[k] = u8::try_from(len).ok()?;
            for (d, s) in key[k + 1..=k + len].iter_mut().zip(label) {
                *d = s.to_ascii_lowercase();
            }
            k += len + 1;
            i += len + 1;
        }
        key[k] = 0;
        let key = &key[..=k];
        let qtype = u16_at(q, i + 1)?;
        if u16_at(q, i + 3)? != 1 || meta_type(qtype) {
            return None;
        }
        let question_end = i + 5;
        let limit = if additionals == 0 {
            if q.len() != question_end {
                return None;
            }
            PLAIN_UDP_LIMIT
        } else {
            // OPT: root name, type 41, class = payload size, version 0, then exactly its RDATA.
            let o = question_end;
            if *q.get(o)? != 0 || u16_at(q, o + 1)? != 41 || *q.get(o + 6)? != 0 {
                return None;
            }
            let rdlen = usize::from(u16_at(q, o + 9)?);
            if q.len() != o + 11 + rdlen {
                return None;
            }
            usize::from(u16_at(q, o + 3)?).max(PLAIN_UDP_LIMIT)
        };
        let answers = self.names.get(key)?;
        let qtype = RecordType::from(qtype);
        let enc = answers
            .typed
            .iter()
            .find(|(t, _)| *t == qtype)
            .map_or(&answers.nodata, |(_, e)| e);
        let bytes = if additionals == 0 { &enc.plain } else { &enc.edns };
        if bytes.len() > limit || bytes.len() < question_end {
            return None;
        }
        out.clear();
        out.extend_from_slice(bytes);
        // The query's id, its RD and CD flags, RA when there is an upstream, and its question (case and type).
        out[0] = q[0];
        out[1] = q[1];
        out[2] = (out[2] & !0x01) | (q[2] & 0x01);
        out[3] = (out[3] & !0x90) | (q[3] & 0x10) | if recursion_available { 0x80 } else { 0 };
        out[12..question_end].copy_from_slice(&q[12..question_end]);
        Some(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::server::{Datagram, answer_datagram};
    use super::super::{DnsEndpoint, DnsPort, ServiceDns, Table};
    use hickory_proto::op::{Message, Query, ResponseCode};
    use hickory_proto::rr::{Name, RecordType};
    use mesh_model::Protocol;
    use std::net::Ipv4Addr;

    fn table() -> Table {
        let mut t = Table::new();
        t.upsert(ServiceDns {
            namespace: "demo".into(),
            name: "web".into(),
            clusterset_ip: Some(Ipv4Addr::new(198, 19, 0, 7)),
            ports: vec![DnsPort {
                name: "http".into(),
                port: 80,
                protocol: Protocol::Tcp,
            }],
            endpoints: Vec::new(),
            clusters: vec!["east".into()],
        })
        .unwrap();
        t.upsert(ServiceDns {
            namespace: "demo".into(),
            name: "db".into(),
            clusterset_ip: None,
            ports: vec![DnsPort {
                name: "sql".into(),
                port: 5432,
                protocol: Protocol::Tcp,
            }],
            // Enough endpoints that the answer does not fit 512 bytes.
            endpoints: (0..40u32)
                .map(|i| DnsEndpoint {
                    cluster: "west".into(),
                    ipv4: Ipv4Addr::from(0x0A02_0000 + i),
                    hostname: (i < 2).then(|| format!("db-{i}")),
                })
                .collect(),
            clusters: vec!["west".into()],
        })
        .unwrap();
        t
    }

    fn query(name: &str, t: RecordType, id: u16, edns: bool) -> Vec<u8> {
        let mut m = Message::query();
        m.metadata.id = id;
        m.metadata.recursion_desired = id.is_multiple_of(2);
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), t));
        if edns {
            let mut e = hickory_proto::op::Edns::new();
            e.set_max_payload(4096);
            m.set_edns(e);
        }
        m.to_vec().unwrap()
    }

    /// The response cache answers exactly what the slow path (hickory decoding and encoding) answers.
    #[test]
    fn the_fast_path_answers_as_the_slow_path() {
        let zone = table().snapshot();
        let mut out = Vec::new();
        let mut fast = 0;
        for (name, t) in [
            ("web.demo.svc.clusterset.local.", RecordType::A),
            ("WEB.Demo.SVC.clusterset.local.", RecordType::A),
            ("web.demo.svc.clusterset.local.", RecordType::AAAA),
            ("web.demo.svc.clusterset.local.", RecordType::MX),
            ("_http._tcp.web.demo.svc.clusterset.local.", RecordType::SRV),
            ("demo.svc.clusterset.local.", RecordType::A),
            ("db.demo.svc.clusterset.local.", RecordType::A),
            ("db-1.west.db.demo.svc.clusterset.local.", RecordType::A),
            ("_sql._tcp.db.demo.svc.clusterset.local.", RecordType::SRV),
            ("dns-version.clusterset.local.", RecordType::TXT),
            ("clusterset.local.", RecordType::SOA),
            ("nope.demo.svc.clusterset.local.", RecordType::A),
            ("web.demo.svc.clusterset.local.", RecordType::ANY),
            ("example.com.", RecordType::A),
        ] {
            for (id, edns) in [(7u16, false), (8, true)] {
                let q = query(name, t, id, edns);
                let Datagram::Reply(slow) = answer_datagram(&zone, &q, false) else {
                    panic!("{name} {t}: no reply from the slow path");
                };
                let slow = Message::from_vec(&slow).unwrap();
                if zone.fast_answer(&q, &mut out, false) {
                    fast += 1;
                    let got = Message::from_vec(&out).unwrap();
                    assert_eq!(got.metadata, slow.metadata, "{name} {t} edns={edns}");
                    assert_eq!(got.queries, slow.queries, "{name} {t}: the question as asked");
                    assert_eq!(got.answers, slow.answers, "{name} {t}");
                    assert_eq!(got.authorities, slow.authorities, "{name} {t}");
                    assert_eq!(got.edns.is_some(), edns, "{name} {t}");
                }
            }
        }
        // Everything but NXDOMAIN, ANY, other zones and the too-large plain answer.
        assert_eq!(fast, 2 * 11 - 1);
    }

    #[test]
    fn unusual_and_oversized_queries_go_to_the_slow_path() {
        let zone = table().snapshot();
        let mut out = Vec::new();
        // The headless answer is larger than 512 bytes: without EDNS the slow path truncates it.
        let q = query("db.demo.svc.clusterset.local.", RecordType::A, 3, false);
        assert!(!zone.fast_answer(&q, &mut out, false));
        let Datagram::Reply(r) = answer_datagram(&zone, &q, false) else {
            panic!("no reply");
        };
        let r = Message::from_vec(&r).unwrap();
        assert!(r.metadata.truncation && r.answers.is_empty());
        // A response (QR set), trailing bytes, a second question, a short datagram: not the fast path's.
        let good = query("web.demo.svc.clusterset.local.", RecordType::A, 3, false);
        assert!(zone.fast_answer(&good, &mut out, false));
        let mut resp = good.clone();
        resp[2] |= 0x80;
        let mut trailing = good.clone();
        trailing.push(0);
        for bad in [&resp[..], &trailing[..], &good[..20], &[][..]] {
            assert!(!zone.fast_answer(bad, &mut out, false));
        }
        // The slow path: a garbage datagram with an id is FORMERR, without one it is dropped; other zones
        // without an upstream are refused.
        let Datagram::Reply(r) = answer_datagram(&zone, &good[..20], false) else {
            panic!("no FORMERR");
        };
        assert_eq!(
            Message::from_vec(&r).unwrap().metadata.response_code,
            ResponseCode::FormErr
        );
        assert_eq!(answer_datagram(&zone, b"\x01", false), Datagram::Drop);
        let q = query("example.com.", RecordType::A, 3, false);
        let Datagram::Reply(r) = answer_datagram(&zone, &q, false) else {
            panic!("no REFUSED");
        };
        assert_eq!(
            Message::from_vec(&r).unwrap().metadata.response_code,
            ResponseCode::Refused
        );
        assert_eq!(answer_datagram(&zone, &q, true), Datagram::Forward);
    }
}
