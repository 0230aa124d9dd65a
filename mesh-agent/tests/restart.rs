//! Agent restarts keep the datapath (need root with CAP_BPF / CAP_NET_ADMIN / CAP_SYS_ADMIN for bpffs).
//!
//! A [`Datapath`] loaded with [`Datapath::load_pinned`] pins its maps and tc links; dropping it is what an agent
//! exiting does (also on SIGKILL: only file descriptors close). The next load adopts the pins: the maps with their
//! contents, the links with this build's program swapped in place. The service state is adopted by
//! [`LbMaps::adopt`], so reconciling the same desired state changes nothing.
//!
//! The main test runs a TCP stream through a service VIP (one connection, a line echoed every few milliseconds)
//! across 10 restart cycles and counts the exchanges that failed.
#[expect(
    dead_code,
    reason = "helpers shared by the datapath tests; this one uses a few"
)]
mod common;
#[path = "common/pins.rs"]
mod pins;

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd as _,
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use common::{Lab, POD_A, POD_B, eventually, in_netns, program_ipcache};
use mesh_agent::{
    datapath::{self, Datapath, SHARED_MAPS},
    lb::{Backend, Frontend, ServiceView},
    lb_maps::{LbAdopted, LbChanges, LbMaps},
    netdev,
};
use mesh_common::{Counter, CtKeyV4, NodeConfig, SlotKey, proto};
use mesh_model::Protocol;
use pins::Pins;

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const POD_C: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 4);
const PORT: u16 = 8080;
const RESTARTS: usize = 10;

fn views(backends: &[Ipv4Addr]) -> Vec<ServiceView> {
    vec![ServiceView {
        namespace: "default".into(),
        name: "stream".into(),
        spec: mesh_model::service::GlobalSpec::default(),
        policy: None,
        frontends: vec![Frontend {
            vip: VIP,
            port: PORT,
            protocol: Protocol::Tcp,
            port_name: "stream".into(),
            candidates: BTreeMap::new(),
            active: backends
                .iter()
                .map(|ip| Backend {
                    ipv4: *ip,
                    port: PORT,
                    cluster_id: 1,
                    weight: 1,
                })
                .collect(),
            groups: Vec::new(),
            unselected: Vec::new(),
            stats: BTreeMap::new(),
        }],
    }]
}

/// Everything the agent programs, as the maps hold it (conntrack apart: the programs write it).
#[derive(Debug, PartialEq)]
struct Programmed {
    endpoints: Vec<(Ipv4Addr, mesh_common::LocalEndpoint)>,
    ipcache: Vec<(ipnet::Ipv4Net, mesh_common::IpcacheEntry)>,
    node: NodeConfig,
    services: Vec<(mesh_common::ServiceKeyV4, mesh_common::ServiceEntry)>,
    slots: Vec<(SlotKey, u32)>,
    backends: Vec<(u32, mesh_common::BackendV4)>,
    rev_nats: Vec<(u32, mesh_common::RevNatV4)>,
}

fn programmed(dp: &Datapath) -> Programmed {
    Programmed {
        endpoints: dp.endpoints().unwrap(),
        ipcache: dp.ipcache().unwrap(),
        node: dp.node_config().unwrap(),
        services: dp.services().unwrap(),
        slots: dp.slots().unwrap(),
        backends: dp.backends().unwrap(),
        rev_nats: dp.revnats().unwrap(),
    }
}

/// Runs `f` on a new thread in network namespace `ns`.
fn spawn_in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> JoinHandle<T> {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
        // SAFETY: setns on a valid namespace fd; it only changes this (fresh) thread's namespace.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
        f()
    })
}

/// Line echo servers on :8080 of a pod; stopped on drop.
struct Echo {
    listener: TcpListener,
    conns: Arc<Mutex<Vec<TcpStream>>>,
    threads: Vec<JoinHandle<()>>,
}

impl Echo {
    fn start(pod_ns: &str, addr: Ipv4Addr) -> Self {
        let listener = in_netns(pod_ns, || {
            TcpListener::bind((addr, PORT)).expect("bind echo server")
        });
        let conns = Arc::new(Mutex::new(Vec::new()));
        let accept = {
            let (listener, conns) = (listener.try_clone().unwrap(), conns.clone());
            std::thread::spawn(move || {
                // Woken by shutdown() on drop.
                while let Ok((conn, _)) = listener.accept() {
                    conns.lock().unwrap().push(conn.try_clone().unwrap());
                    std::thread::spawn(move || {
                        let mut out = conn.try_clone().unwrap();
                        for line in BufReader::new(conn).lines() {
                            let Ok(line) = line else { break };
                            if out.write_all(format!("{line}\n").as_bytes()).is_err() {
                                break;
                            }
                        }
                    });
                }
            })
        };
        Self {
            listener,
            conns,
            threads: vec![accept],
        }
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        // SAFETY: shutdown on sockets we own; it wakes the threads blocked in accept() and read().
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        for c in self.conns.lock().unwrap().iter() {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// What a stream client saw.
#[derive(Debug)]
struct StreamReport {
    exchanges: u64,
    errors: Vec<String>,
    max_rtt: Duration,
    local: Option<SocketAddr>,
}

/// One TCP connection to the VIP, exchanging a line every 2 ms until stopped (or it fails: a lost flow).
struct Stream {
    stop: Arc<AtomicBool>,
    exchanges: Arc<AtomicU64>,
    failed: Arc<AtomicBool>,
    thread: Option<JoinHandle<StreamReport>>,
}

impl Stream {
    fn start(client_ns: &str) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let exchanges = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicBool::new(false));
        let thread = {
            let (stop, exchanges, failed) = (stop.clone(), exchanges.clone(), failed.clone());
            spawn_in_netns(client_ns, move || {
                let mut report = StreamReport {
                    exchanges: 0,
                    errors: Vec::new(),
                    max_rtt: Duration::ZERO,
                    local: None,
                };
                let to = SocketAddr::from((VIP, PORT));
                let conn = match TcpStream::connect_timeout(&to, Duration::from_secs(3)) {
                    Ok(c) => c,
                    Err(e) => {
                        report.errors.push(format!("connect {to}: {e}"));
                        failed.store(true, Ordering::SeqCst);
                        return report;
                    }
                };
                report.local = conn.local_addr().ok();
                conn.set_nodelay(true).unwrap();
                conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                let mut out = conn.try_clone().unwrap();
                let mut lines = BufReader::new(conn);
                let mut line = String::new();
                while !stop.load(Ordering::SeqCst) {
                    let n = report.exchanges;
                    let sent = Instant::now();
                    let result = out
                        .write_all(format!("{n}\n").as_bytes())
                        .map_err(|e| format!("exchange {n}: write: {e}"))
                        .and_then(|()| {
                            line.clear();
                            lines
                                .read_line(&mut line)
                                .map_err(|e| format!("exchange {n}: read: {e}"))
                        })
                        .and_then(|_| {
                            (line.trim_end() == n.to_string())
                                .then_some(())
                                .ok_or_else(|| format!("exchange {n}: got {line:?}"))
                        });
                    if let Err(e) = result {
                        report.errors.push(e);
                        failed.store(true, Ordering::SeqCst);
                        break;
                    }
                    report.max_rtt = report.max_rtt.max(sent.elapsed());
                    report.exchanges += 1;
                    exchanges.store(report.exchanges, Ordering::SeqCst);
                    // Pacing, not synchronisation: a steady trickle of packets through every restart.
                    std::thread::sleep(Duration::from_millis(2));
                }
                report
            })
        };
        Self {
            stop,
            exchanges,
            failed,
            thread: Some(thread),
        }
    }

    /// Waits until `more` further exchanges went through (fails at once when the connection failed).
    fn progresses(&self, more: u64, timeout: Duration) -> Result<(), String> {
        let target = self.exchanges.load(Ordering::SeqCst) + more;
        eventually(timeout, || {
            if self.failed.load(Ordering::SeqCst) {
                // The report says why.
                return Ok(());
            }
            let now = self.exchanges.load(Ordering::SeqCst);
            if now >= target {
                Ok(())
            } else {
                std::thread::yield_now();
                Err(format!("stream at {now} exchanges, waiting for {target}"))
            }
        })
    }

    fn finish(mut self) -> StreamReport {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.take().unwrap().join().expect("stream thread")
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One node (`fm_vxlan` in external mode) with client pod A and server pods B and C.
struct Node {
    ns: String,
    pods: Vec<(String, Ipv4Addr, String, mesh_common::LocalEndpoint)>,
}

fn node(lab: &mut Lab) -> Node {
    let ns = lab.netns("n1");
    common::ip(&[
        "-n", &ns, "link", "add", "fm_vxlan", "type", "vxlan", "external", "dstport", "4789",
    ]);
    common::ip(&["-n", &ns, "link", "set", "fm_vxlan", "up"]);
    let mut pods = Vec::new();
    for (name, ip, host_if) in [
        ("a", POD_A, "veth-a"),
        ("b", POD_B, "veth-b"),
        ("c", POD_C, "veth-c"),
    ] {
        let (pod_ns, ep) = lab.pod(&ns, name, host_if, ip);
        pods.push((pod_ns, ip, host_if.to_owned(), ep));
    }
    Node { ns, pods }
}

/// What the agent does at start: load (adopting the pins), attach, program endpoints, ipcache and services.
/// Returns the datapath, its LB state and what adopting and reconciling found.
fn agent_start(n: &Node, pins: &Path) -> (Datapath, LbMaps, LbAdopted, LbChanges) {
    let host_ifs: Vec<String> = n.pods.iter().map(|p| p.2.clone()).collect();
    let mut dp = in_netns(&n.ns, || {
        let mut dp = Datapath::load_pinned(pins).expect("load pinned");
        let vxlan_ifindex = netdev::ifindex("fm_vxlan").expect("fm_vxlan ifindex");
        let cfg = NodeConfig {
            vxlan_ifindex,
            node_ipv4: u32::from(Ipv4Addr::new(192, 168, 251, 1)),
            cluster_id: 1,
            ..Default::default()
        };
        if dp.node_config().unwrap() != cfg {
            dp.set_node_config(cfg).unwrap();
        }
        dp.attach_overlay("fm_vxlan").expect("attach overlay");
        for host_if in &host_ifs {
            dp.attach_endpoint(host_if).expect("attach pod veth");
        }
        dp
    });
    let current: BTreeMap<_, _> = dp.endpoints().unwrap().into_iter().collect();
    for (_, ip, _, ep) in &n.pods {
        if current.get(ip) != Some(ep) {
            dp.upsert_endpoint(*ip, *ep).unwrap();
        }
    }
    if dp.ipcache().unwrap().is_empty() {
        program_ipcache(
            &mut dp,
            "10.1.0.0/24",
            "10.2.0.0/16",
            Ipv4Addr::new(192, 168, 251, 2),
        );
    }
    let (mut lb, adopted) = LbMaps::adopt(&dp).expect("adopt service maps");
    let changes = lb.reconcile(&mut dp, &views(&[POD_B, POD_C])).expect("reconcile");
    (dp, lb, adopted, changes)
}

fn conntrack_of(dp: &Datapath, client: SocketAddr) -> Vec<CtKeyV4> {
    let SocketAddr::V4(client) = client else {
        panic!("IPv4 client expected")
    };
    dp.conntrack()
        .unwrap()
        .into_iter()
        .map(|(k, _)| k)
        .filter(|k| {
            k.proto == proto::TCP
                && ((k.saddr == client.ip().octets() && u16::from_be(k.sport_be) == client.port())
                    || (k.daddr == client.ip().octets() && u16::from_be(k.dport_be) == client.port()))
        })
        .collect()
}

#[test]
fn established_tcp_flow_through_a_vip_survives_ten_agent_restarts() {
    let pins = Pins::new("stream");
    let mut lab = Lab::new("rst");
    let n = node(&mut lab);
    let _echo_b = Echo::start(&n.pods[1].0, POD_B);
    let _echo_c = Echo::start(&n.pods[2].0, POD_C);

    let (mut dp, mut _lb, adopted, changes) = agent_start(&n, pins.path());
    assert_eq!(adopted, LbAdopted::default(), "fresh pins: nothing to adopt");
    assert_eq!(dp.adoption().maps_reused, [] as [&str; 0]);
    assert_eq!((changes.frontends_changed, changes.backends_added), (1, 2));

    let stream = Stream::start(&n.pods[0].0);
    stream
        .progresses(50, Duration::from_secs(10))
        .expect("the stream runs through the VIP");
    let client = stream_client(&dp);
    let ct_before = conntrack_of(&dp, client);
    assert_eq!(
        ct_before.len(),
        2,
        "SERVICE and REPLY entries of the flow: {ct_before:?}"
    );

    let mut translated = dp.counter(Counter::LbTranslated).unwrap();
    for cycle in 1..=RESTARTS {
        let before = programmed(&dp);
        // The agent exits (SIGTERM, SIGKILL or a crash look the same to the kernel: its descriptors close).
        drop(_lb);
        drop(dp);
        stream
            .progresses(25, Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("cycle {cycle}: forwarding stopped while no agent ran: {e}"));

        let (new_dp, new_lb, adopted, changes) = agent_start(&n, pins.path());
        (dp, _lb) = (new_dp, new_lb);
        let a = dp.adoption();
        assert_eq!(a.maps_reused, SHARED_MAPS, "cycle {cycle}: every map adopted");
        assert_eq!(a.maps_created, [], "cycle {cycle}");
        assert_eq!(
            a.links_adopted,
            [
                "from_overlay@fm_vxlan",
                "from_pod@veth-a",
                "from_pod@veth-b",
                "from_pod@veth-c"
            ],
            "cycle {cycle}"
        );
        assert_eq!(a.links_removed, [], "cycle {cycle}");
        assert_eq!(
            adopted,
            LbAdopted {
                frontends: 1,
                backends: 2,
                orphans: 0
            },
            "cycle {cycle}"
        );
        assert_eq!(
            changes,
            LbChanges::default(),
            "cycle {cycle}: the same desired state needs no change"
        );
        assert_eq!(programmed(&dp), before, "cycle {cycle}: maps unchanged");
        let now = dp.counter(Counter::LbTranslated).unwrap();
        assert!(
            now > translated,
            "cycle {cycle}: counters persist and kept counting: {now} after {translated}"
        );
        translated = now;
        let ct = conntrack_of(&dp, client);
        assert!(
            ct_before.iter().all(|k| ct.contains(k)),
            "cycle {cycle}: conntrack entries of the flow survived: {ct_before:?} vs {ct:?}"
        );
        for (_, _, host_if, _) in &n.pods {
            let progs = in_netns(&n.ns, || Datapath::tcx_ingress_programs(host_if).unwrap());
            assert_eq!(
                progs,
                ["from_pod"],
                "cycle {cycle}: one program on {host_if}, replaced in place"
            );
        }
        let progs = in_netns(&n.ns, || Datapath::tcx_ingress_programs("fm_vxlan").unwrap());
        assert_eq!(progs, ["from_overlay"], "cycle {cycle}");
        stream
            .progresses(25, Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("cycle {cycle}: forwarding after the restart: {e}"));
    }
    let report = stream.finish();
    eprintln!(
        "restart test: {RESTARTS} restarts, {} exchanges, max round trip {:?}, errors {:?}",
        report.exchanges, report.max_rtt, report.errors
    );
    assert_eq!(
        report.errors,
        [] as [String; 0],
        "flows lost across {RESTARTS} restarts"
    );
    let counters = dp.counters().unwrap();
    // The pods' kernels send IPv6 link-local chatter (router solicitations, MLD reports) on link up: fleetmesh
    // pods are IPv4-only and those frames are dropped by design (docs/security.md); none belongs to the flow.
    let drops: Vec<_> = counters
        .iter()
        .filter(|(c, n)| c.name().starts_with("drop") && *c != Counter::DropUnsupportedL3 && *n > 0)
        .collect();
    assert_eq!(
        drops,
        [] as [&(Counter, u64); 0],
        "no packet dropped by the datapath"
    );
    assert_eq!(
        dp.counter(Counter::LbNewFlow).unwrap(),
        1,
        "one flow, balanced once: conntrack kept it across every restart"
    );
    assert!(report.exchanges >= 50 * (RESTARTS as u64 + 1), "{report:?}");
}

/// The client's address of the stream, once its conntrack entry shows up.
fn stream_client(dp: &Datapath) -> SocketAddr {
    let mut found = None;
    eventually(Duration::from_secs(5), || {
        found = dp
            .conntrack()
            .unwrap()
            .into_iter()
            .find(|(k, _)| k.proto == proto::TCP && k.saddr == POD_A.octets())
            .map(|(k, _)| SocketAddr::from((POD_A, u16::from_be(k.sport_be))));
        found
            .map(|_| ())
            .ok_or_else(|| "no conntrack entry of the stream yet".to_owned())
    })
    .expect("conntrack entry of the stream");
    found.unwrap()
}

#[test]
fn a_pinned_datapath_outlives_its_agent_and_goes_with_its_pin_dir() {
    let pins = Pins::new("remove");
    let mut lab = Lab::new("rsr");
    let n = node(&mut lab);
    let (dp, lb, _, _) = agent_start(&n, pins.path());
    drop((lb, dp));
    let progs = in_netns(&n.ns, || Datapath::tcx_ingress_programs("veth-a").unwrap());
    assert_eq!(progs, ["from_pod"], "pinned: still attached with no agent");
    datapath::remove_pins(pins.path()).unwrap();
    assert!(!pins.path().exists());
    eventually(Duration::from_secs(5), || {
        let progs = in_netns(&n.ns, || Datapath::tcx_ingress_programs("veth-a").unwrap());
        progs
            .is_empty()
            .then_some(())
            .ok_or_else(|| format!("still attached: {progs:?}"))
    })
    .expect("links detach once their pins are gone");
}

#[test]
fn stale_pins_are_replaced_a_mismatched_map_flushed_and_a_defunct_link_dropped() {
    let pins = Pins::new("stale");
    let mut lab = Lab::new("rss");
    let n = node(&mut lab);
    let (dp, lb, _, _) = agent_start(&n, pins.path());
    drop((lb, dp));
    let maps_dir = pins.path().join(format!("maps-v{}", datapath::MAP_ABI));
    // An "upgrade" that changed ENDPOINTS_V4's definition: here the pin is a map of another shape (the CT map).
    let ct = aya::maps::MapData::from_pin(maps_dir.join("CT_V4")).unwrap();
    std::fs::remove_file(maps_dir.join("ENDPOINTS_V4")).unwrap();
    ct.pin(maps_dir.join("ENDPOINTS_V4")).unwrap();
    drop(ct);
    // Maps of an older ABI version.
    std::fs::create_dir(pins.path().join("maps-v0")).unwrap();
    // Pod C went away while no agent ran.
    common::ip(&["-n", &n.ns, "link", "del", "veth-c"]);

    let dp = in_netns(&n.ns, || Datapath::load_pinned(pins.path()).expect("load pinned"));
    let a = dp.adoption();
    assert_eq!(a.maps_created.len(), 1, "{a:?}");
    assert_eq!(a.maps_created[0].0, "ENDPOINTS_V4");
    let why = a.maps_created[0].1.as_deref().unwrap_or_default();
    assert!(why.contains("key size"), "{why}");
    assert_eq!(a.maps_reused.len(), SHARED_MAPS.len() - 1);
    assert_eq!(dp.endpoints().unwrap(), [], "the recreated map starts empty");
    assert_eq!(
        dp.services().unwrap().len(),
        1,
        "the other maps kept their contents"
    );
    assert_eq!(
        a.links_adopted,
        ["from_overlay@fm_vxlan", "from_pod@veth-a", "from_pod@veth-b"]
    );
    assert_eq!(a.links_removed.len(), 1, "{a:?}");
    assert_eq!(a.links_removed[0].0, "from_pod@veth-c");
    assert!(!pins.path().join("links/from_pod@veth-c").exists());
    assert!(
        !pins.path().join("maps-v0").exists(),
        "other ABI versions are removed"
    );
    assert_eq!(dp.attached_endpoints(), ["veth-a", "veth-b"]);
}

#[test]
fn adopting_the_service_maps_keeps_ids_and_removes_orphans() {
    let mut dp = Datapath::load().unwrap();
    let mut lb = LbMaps::default();
    let first = lb.reconcile(&mut dp, &views(&[POD_B, POD_C])).unwrap();
    assert_eq!((first.frontends_changed, first.backends_added), (1, 2));
    let services = dp.services().unwrap();
    // Leftovers of an agent that stopped half-way: a slot table never switched to, an unused rev-NAT, a second
    // id of a known backend.
    let service_id = services[0].1.service_id;
    let stray_slot = SlotKey {
        service_id: service_id + 7,
        slot: 0,
    };
    dp.upsert_slot(stray_slot, 1).unwrap();
    let rev_nat = services[0].1.rev_nat_id;
    let r = dp.revnats().unwrap()[0].1;
    dp.upsert_revnat(rev_nat + 3, r).unwrap();
    let b = dp.backends().unwrap()[0].1;
    dp.upsert_backend(40, b).unwrap();

    let (mut adopted, found) = LbMaps::adopt(&dp).unwrap();
    assert_eq!(
        found,
        LbAdopted {
            frontends: 1,
            backends: 2,
            orphans: 3
        }
    );
    let slots_before = dp.slots().unwrap();
    let changes = adopted.reconcile(&mut dp, &views(&[POD_B, POD_C])).unwrap();
    assert_eq!(
        changes,
        LbChanges {
            orphans_removed: 3,
            ..LbChanges::default()
        }
    );
    assert_eq!(dp.services().unwrap(), services, "frontend untouched");
    assert!(!dp.slots().unwrap().iter().any(|(k, _)| *k == stray_slot));
    assert_eq!(dp.slots().unwrap().len(), slots_before.len() - 1);
    assert_eq!(dp.revnats().unwrap().len(), 1);
    assert!(!dp.backends().unwrap().iter().any(|(id, _)| *id == 40));
    assert_eq!(
        adopted.backend_id(POD_B, PORT, Protocol::Tcp),
        lb.backend_id(POD_B, PORT, Protocol::Tcp)
    );

    // A backend less: the adopted slot table is edited in place (same service id, one slot fewer).
    let changes = adopted.reconcile(&mut dp, &views(&[POD_B])).unwrap();
    assert_eq!((changes.frontends_changed, changes.backends_removed), (1, 1));
    let edited = dp.services().unwrap()[0].1;
    assert_eq!(
        (edited.service_id, edited.slot_count),
        (service_id, 1),
        "{edited:?}"
    );
    assert_eq!(
        edited.rev_nat_id, rev_nat,
        "the rev-NAT id of a frontend never changes"
    );
    // New ids continue above every id seen, so nothing in use (or in conntrack) is reused: a frontend whose
    // flags change gets a new table.
    let mut global = views(&[POD_B]);
    global[0].spec.global = true;
    adopted.reconcile(&mut dp, &global).unwrap();
    let new = dp.services().unwrap()[0].1;
    assert!(new.service_id > service_id + 7, "{new:?}");
    assert_eq!(new.rev_nat_id, rev_nat);
}
