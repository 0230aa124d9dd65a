//! Flow events: read from the datapath's ring buffer, named (pod, namespace, cluster, identity labels, rule), kept
//! in a bounded history and fanned out to `GET /v1/flows` subscribers (`meshctl observe`).
//!
//! Nothing here can slow the datapath: the programs rate-limit per CPU and count what they suppress; the reader
//! drains the ring as fast as it can; subscribers that fall behind lose events (they are told how many) instead of
//! holding memory.

use std::collections::{BTreeMap, VecDeque};
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use mesh_common::{Counter, FlowEvent, flow_verdict, identity, policy_dir, proto};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

/// How many events the history keeps (for `meshctl observe --last`).
pub const HISTORY: usize = 4096;
/// How many events a subscriber may lag behind before it loses some.
const FANOUT: usize = 8192;

/// Who an address or identity is, as far as the agent knows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Peer {
    pub ip: Ipv4Addr,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    pub identity: u32,
    /// `world`, `host`, `pending`, `cidr` or the identity's cluster.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    /// The identity's labels (without the namespace/cluster labels, which have their own fields).
    #[serde(skip_serializing_if = "BTreeMap::is_empty", default)]
    pub labels: BTreeMap<String, String>,
}

/// A named flow event, as `GET /v1/flows` streams it (one JSON object per line).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Flow {
    /// Wall-clock time, milliseconds since the Unix epoch.
    pub time_ms: u64,
    pub node: String,
    /// `forwarded` or `dropped`.
    pub verdict: String,
    /// The datapath counter: the drop reason or the forwarding decision (`policy_allowed`, ...).
    pub reason: String,
    /// `ingress`, `egress`, or absent for load-balancer events.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub direction: Option<String>,
    /// `TCP`, `UDP`, `ICMP` or the protocol number.
    pub protocol: String,
    pub source: Peer,
    pub destination: Peer,
    /// The policy rule that allowed the flow (`Kind namespace/name ingress[0]`), when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    pub ifindex: u32,
}

/// A pod the agent knows, for naming addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodName {
    pub cluster: String,
    pub namespace: String,
    pub pod: String,
}

/// What the reconciler tells the flow reader about the mesh (replaced as a whole after every pass).
#[derive(Debug, Clone, Default)]
pub struct Names {
    /// Pod addresses (local and remote); persistent, shared with the policy reconciler's table.
    pub pods: imbl::OrdMap<Ipv4Addr, PodName>,
    /// Identity → its identity labels (cluster and namespace are among them); shared the same way.
    pub identities: mesh_model::policy::Identities,
    /// Node-local CIDR identities → prefix.
    pub cidrs: BTreeMap<u32, String>,
    /// Rule numbers of local endpoints' compiled policies: (endpoint address, rule) → description.
    pub rules: BTreeMap<(Ipv4Addr, u32), String>,
}

impl Names {
    fn peer(&self, ip: [u8; 4], port_be: u16, ident: u32, proto_nr: u8) -> Peer {
        let ip = Ipv4Addr::from(ip);
        let has_ports = proto_nr == proto::TCP || proto_nr == proto::UDP;
        let mut p = Peer {
            ip,
            port: has_ports.then(|| u16::from_be(port_be)),
            identity: ident,
            cluster: None,
            namespace: None,
            pod: None,
            labels: BTreeMap::new(),
        };
        if let Some(name) = self.pods.get(&ip) {
            p.cluster = Some(name.cluster.clone());
            p.namespace = Some(name.namespace.clone());
            p.pod = Some(name.pod.clone());
        }
        match ident {
            identity::WORLD => p.cluster = p.cluster.or(Some("world".into())),
            identity::HOST => p.cluster = p.cluster.or(Some("host".into())),
            identity::PENDING => p.cluster = p.cluster.or(Some("pending".into())),
            _ => {}
        }
        if let Some(labels) = self.identities.get(&ident) {
            if p.cluster.is_none() {
                p.cluster = labels.get(mesh_model::identity::LABEL_CLUSTER).cloned();
            }
            if p.namespace.is_none() {
                p.namespace = labels.get(mesh_model::identity::LABEL_NAMESPACE).cloned();
            }
            p.labels = mesh_model::identity::pod_labels(labels);
        } else if let Some(cidr) = self.cidrs.get(&ident) {
            p.cluster.get_or_insert_with(|| "cidr".into());
            p.labels.insert("cidr".into(), cidr.clone());
        }
        p
    }

    /// Names both ends of `ev`.
    #[must_use]
    pub fn flow(&self, node: &str, ev: &FlowEvent, time_ms: u64) -> Flow {
        let reason = Counter::from_index(u32::from(ev.reason))
            .map_or_else(|| format!("unknown({})", ev.reason), |c| c.name().to_owned());
        let direction = match ev.dir {
            policy_dir::INGRESS => Some("ingress".to_owned()),
            policy_dir::EGRESS => Some("egress".to_owned()),
            _ => None,
        };
        // The rule belongs to the endpoint whose policy decided: the destination for ingress, the source for egress.
        let owner = if ev.dir == policy_dir::INGRESS {
            ev.daddr
        } else {
            ev.saddr
        };
        let rule = (ev.rule != 0).then(|| {
            self.rules
                .get(&(Ipv4Addr::from(owner), ev.rule))
                .cloned()
                .unwrap_or_else(|| format!("rule {}", ev.rule))
        });
        Flow {
            time_ms,
            node: node.to_owned(),
            verdict: match ev.verdict {
                flow_verdict::FORWARDED => "forwarded".into(),
                flow_verdict::DROPPED => "dropped".into(),
                v => format!("unknown({v})"),
            },
            reason,
            direction,
            protocol: match ev.proto {
                proto::TCP => "TCP".into(),
                proto::UDP => "UDP".into(),
                proto::ICMP => "ICMP".into(),
                p => p.to_string(),
            },
            source: self.peer(ev.saddr, ev.sport_be, ev.src_identity, ev.proto),
            destination: self.peer(ev.daddr, ev.dport_be, ev.dst_identity, ev.proto),
            rule,
            ifindex: ev.ifindex,
        }
    }
}

/// Which flows a subscriber wants. A filter on pod, namespace or cluster matches when either end matches.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    /// `NAME` or `NAMESPACE/NAME`.
    pub pod: Option<String>,
    pub namespace: Option<String>,
    pub cluster: Option<String>,
    /// `forwarded` or `dropped`.
    pub verdict: Option<String>,
    /// Return this many buffered events first (default 0 when following, all buffered otherwise).
    pub last: Option<usize>,
    /// Keep the stream open for new events.
    pub follow: bool,
}

/// Decodes `%XX` escapes and `+` of a query string component.
fn percent_decode(s: &str) -> Result<String, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let hex = s
                    .get(i + 1..i + 3)
                    .ok_or_else(|| format!("bad escape in {s:?}"))?;
                out.push(u8::from_str_radix(hex, 16).map_err(|_| format!("bad escape in {s:?}"))?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).map_err(|_| format!("{s:?} is not UTF-8"))
}

impl Filter {
    /// Parses a query string (`pod=..&namespace=..&cluster=..&verdict=..&last=N&follow=true`).
    ///
    /// # Errors
    /// For an unknown parameter, a bad escape or number, or an invalid value (see [`Filter::validate`]).
    pub fn from_query(q: &str) -> Result<Self, String> {
        let mut f = Filter::default();
        for pair in q.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let v = percent_decode(v)?;
            match k {
                "pod" => f.pod = Some(v),
                "namespace" => f.namespace = Some(v),
                "cluster" => f.cluster = Some(v),
                "verdict" => f.verdict = Some(v),
                "last" => f.last = Some(v.parse().map_err(|_| format!("last={v:?}: expected a number"))?),
                "follow" => {
                    f.follow = match v.as_str() {
                        "" | "true" | "1" => true,
                        "false" | "0" => false,
                        _ => return Err(format!("follow={v:?}: expected true or false")),
                    }
                }
                other => {
                    return Err(format!(
                        "unknown parameter {other:?} (pod, namespace, cluster, verdict, last, follow)"
                    ));
                }
            }
        }
        f.validate()?;
        Ok(f)
    }

    /// Checks the values (a bad verdict is an error, not an empty stream).
    ///
    /// # Errors
    /// For a verdict other than `forwarded` or `dropped`, or an empty value.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(v) = &self.verdict
            && v != "forwarded"
            && v != "dropped"
        {
            return Err(format!("verdict {v:?}: expected forwarded or dropped"));
        }
        for (name, v) in [
            ("pod", &self.pod),
            ("namespace", &self.namespace),
            ("cluster", &self.cluster),
        ] {
            if v.as_deref().is_some_and(str::is_empty) {
                return Err(format!("{name} must not be empty"));
            }
        }
        Ok(())
    }

    fn peer_matches(&self, p: &Peer) -> bool {
        if let Some(pod) = &self.pod {
            let ok = match pod.split_once('/') {
                Some((ns, name)) => p.namespace.as_deref() == Some(ns) && p.pod.as_deref() == Some(name),
                None => p.pod.as_deref() == Some(pod.as_str()),
            };
            if !ok {
                return false;
            }
        }
        if let Some(ns) = &self.namespace
            && p.namespace.as_deref() != Some(ns.as_str())
        {
            return false;
        }
        if let Some(c) = &self.cluster
            && p.cluster.as_deref() != Some(c.as_str())
        {
            return false;
        }
        true
    }

    /// Whether `f` passes the filter.
    #[must_use]
    pub fn matches(&self, f: &Flow) -> bool {
        if self.verdict.as_deref().is_some_and(|v| v != f.verdict) {
            return false;
        }
        self.peer_matches(&f.source) || self.peer_matches(&f.destination)
    }
}

/// The flow history and its subscribers.
pub struct Hub {
    node: String,
    names: RwLock<Arc<Names>>,
    history: Mutex<VecDeque<Arc<Flow>>>,
    tx: broadcast::Sender<Arc<Flow>>,
}

impl Hub {
    #[must_use]
    pub fn new(node: &str) -> Arc<Self> {
        Arc::new(Self {
            node: node.to_owned(),
            names: RwLock::new(Arc::new(Names::default())),
            history: Mutex::new(VecDeque::with_capacity(HISTORY)),
            tx: broadcast::channel(FANOUT).0,
        })
    }

    /// Replaces what addresses and identities are called (after a reconcile pass).
    pub fn set_names(&self, names: Names) {
        *self.names.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(names);
    }

    /// The current names (for the policy view).
    #[must_use]
    pub fn names(&self) -> Arc<Names> {
        self.names.read().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Names and records one raw event.
    pub fn push(&self, ev: &FlowEvent, time_ms: u64) {
        let flow = Arc::new(self.names().flow(&self.node, ev, time_ms));
        {
            let mut h = self.history.lock().unwrap_or_else(PoisonError::into_inner);
            if h.len() == HISTORY {
                h.pop_front();
            }
            h.push_back(flow.clone());
        }
        // No subscriber is not an error.
        let _ = self.tx.send(flow);
    }

    /// The buffered flows passing `filter`, oldest first, at most `last`.
    #[must_use]
    pub fn recent(&self, filter: &Filter, last: usize) -> Vec<Arc<Flow>> {
        let h = self.history.lock().unwrap_or_else(PoisonError::into_inner);
        let mut out: Vec<_> = h
            .iter()
            .rev()
            .filter(|f| filter.matches(f))
            .take(last)
            .cloned()
            .collect();
        out.reverse();
        out
    }

    /// A receiver of every new flow.
    #[must_use]
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Flow>> {
        self.tx.subscribe()
    }
}

/// Offset from `CLOCK_MONOTONIC` (what `bpf_ktime_get_ns` reads) to the wall clock, in nanoseconds.
#[must_use]
pub fn monotonic_to_wall_offset_ns() -> i128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
    let mono = i128::from(ts.tv_sec) * 1_000_000_000 + i128::from(ts.tv_nsec);
    let wall = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i128::try_from(d.as_nanos()).unwrap_or(i128::MAX));
    wall - mono
}

/// Drains `ring` into `hub` until the ring's file descriptor fails.
///
/// # Errors
/// When the ring buffer cannot be polled.
pub async fn run_reader(ring: aya::maps::RingBuf<aya::maps::MapData>, hub: Arc<Hub>) -> std::io::Result<()> {
    let offset = monotonic_to_wall_offset_ns();
    // SAFETY: the ring buffer owns its map file descriptor for as long as it lives, and the AsyncFd owns the ring
    // buffer: the descriptor stays open and the same until the AsyncFd is dropped.
    let mut fd =
        unsafe { tokio::io::unix::AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
            .map_err(|e| std::io::Error::other(e.to_string()))?;
    let mut malformed = 0u64;
    loop {
        let mut guard = fd.readable_mut().await?;
        let ring = guard.get_inner_mut();
        while let Some(item) = ring.next() {
            match crate::datapath::parse_flow_event(&item) {
                Some(ev) => {
                    let wall_ns = i128::from(ev.timestamp_ns) + offset;
                    let ms = u64::try_from(wall_ns / 1_000_000).unwrap_or(0);
                    hub.push(&ev, ms);
                }
                None => {
                    malformed += 1;
                    if malformed.is_power_of_two() {
                        tracing::warn!(
                            size = item.len(),
                            malformed,
                            "flow event of unexpected size skipped"
                        );
                    }
                }
            }
        }
        guard.clear_ready();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names() -> Names {
        let mut n = Names::default();
        n.pods.insert(
            Ipv4Addr::new(10, 1, 0, 2),
            PodName {
                cluster: "west".into(),
                namespace: "shop".into(),
                pod: "frontend-1".into(),
            },
        );
        n.identities.insert(
            identity::compose(2, 300),
            std::sync::Arc::new(BTreeMap::from([
                ("app".into(), "api".into()),
                ("io.kubernetes.pod.namespace".into(), "shop".into()),
                ("io.cilium.k8s.policy.cluster".into(), "east".into()),
            ])),
        );
        n.rules.insert(
            (Ipv4Addr::new(10, 1, 0, 2), 3),
            "NetworkPolicy shop/fe egress[0]".into(),
        );
        n
    }

    fn event() -> FlowEvent {
        FlowEvent {
            timestamp_ns: 5,
            saddr: [10, 1, 0, 2],
            daddr: [10, 2, 0, 9],
            sport_be: 40000u16.to_be(),
            dport_be: 8080u16.to_be(),
            src_identity: identity::compose(1, 256),
            dst_identity: identity::compose(2, 300),
            rule: 3,
            ifindex: 7,
            proto: proto::TCP,
            verdict: flow_verdict::FORWARDED,
            reason: Counter::PolicyAllowed as u8,
            dir: policy_dir::EGRESS,
        }
    }

    #[test]
    fn names_both_ends_and_the_rule() {
        let f = names().flow("n1", &event(), 42);
        assert_eq!(f.verdict, "forwarded");
        assert_eq!(f.reason, "policy_allowed");
        assert_eq!(f.direction.as_deref(), Some("egress"));
        assert_eq!(f.source.pod.as_deref(), Some("frontend-1"));
        assert_eq!(f.source.port, Some(40000));
        // The destination has no pod name here, but its identity tells cluster, namespace and labels.
        assert_eq!(f.destination.cluster.as_deref(), Some("east"));
        assert_eq!(f.destination.namespace.as_deref(), Some("shop"));
        assert_eq!(
            f.destination.labels,
            BTreeMap::from([("app".into(), "api".into())])
        );
        assert_eq!(f.rule.as_deref(), Some("NetworkPolicy shop/fe egress[0]"));
    }

    #[test]
    fn reserved_identities_are_named_not_guessed() {
        let mut ev = event();
        ev.dst_identity = identity::PENDING;
        ev.verdict = flow_verdict::DROPPED;
        ev.reason = Counter::DropPolicyPending as u8;
        ev.rule = 0;
        let f = names().flow("n1", &ev, 0);
        assert_eq!(f.destination.cluster.as_deref(), Some("pending"));
        assert_eq!(f.reason, "drop_policy_identity_pending");
        assert_eq!(f.rule, None);
    }

    #[test]
    fn filters_match_either_end() {
        let f = names().flow("n1", &event(), 0);
        let by = |filter: Filter| filter.matches(&f);
        assert!(by(Filter {
            pod: Some("shop/frontend-1".into()),
            ..Filter::default()
        }));
        assert!(by(Filter {
            cluster: Some("east".into()),
            ..Filter::default()
        }));
        assert!(!by(Filter {
            cluster: Some("north".into()),
            ..Filter::default()
        }));
        assert!(!by(Filter {
            verdict: Some("dropped".into()),
            ..Filter::default()
        }));
        assert!(by(Filter {
            namespace: Some("shop".into()),
            verdict: Some("forwarded".into()),
            ..Filter::default()
        }));
        assert!(
            Filter {
                verdict: Some("maybe".into()),
                ..Filter::default()
            }
            .validate()
            .is_err()
        );
        let q = Filter::from_query("pod=shop%2Ffrontend-1&verdict=dropped&last=5&follow=true").unwrap();
        assert_eq!(q.pod.as_deref(), Some("shop/frontend-1"));
        assert_eq!((q.last, q.follow), (Some(5), true));
        assert!(Filter::from_query("colour=red").is_err());
        assert!(Filter::from_query("last=many").is_err());
    }

    #[test]
    fn history_is_bounded_and_subscribers_see_new_flows() {
        let hub = Hub::new("n1");
        hub.set_names(names());
        let mut rx = hub.subscribe();
        for i in 0..(HISTORY + 10) {
            hub.push(&event(), i as u64);
        }
        let all = hub.recent(&Filter::default(), usize::MAX);
        assert_eq!(all.len(), HISTORY);
        assert_eq!(all.last().map(|f| f.time_ms), Some((HISTORY + 9) as u64));
        assert_eq!(rx.try_recv().map(|f| f.time_ms).ok(), Some(0));
    }
}
