//! The lab's state and its commands.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::net::{self, LabLock};
use super::topology::{self, Cidr, Cluster, NODE_SLICE_LEN};
use crate::util;

const STATE_FILE: &str = "state.json";
const NODES_FILE: &str = "lab-nodes.yaml";
const ETCD_PORT: u16 = 2379;
const HOST_IFNAME_ANNOTATION: &str = "fleetmesh.io/host-ifname";
const POD_MTU: &str = "1450";
/// Pod MTU in a cluster with encryption: 1500 minus VXLAN (50) minus WireGuard over IPv4 (60), so that an
/// encrypted datagram still fits the underlay unfragmented (docs/encryption.md, "MTU").
const POD_MTU_ENCRYPTED: &str = "1390";
const GATEWAY: &str = "169.254.1.1";

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LabState {
    pub lab_dir: PathBuf,
    pub prefix: String,
    pub topology: PathBuf,
    pub clusters: Vec<ClusterRt>,
    /// Network namespaces made, in order.
    pub netns: Vec<String>,
    pub procs: Vec<Proc>,
    /// Daemons stopped by `lab stop`, to be started again by `lab start`.
    #[serde(default)]
    pub stopped: Vec<Proc>,
    /// The fleet hub, when the topology has one.
    #[serde(default)]
    pub hub: Option<HubRt>,
}

/// A lab's fleet hub: a real etcd cluster in the underlay namespace, members `hub-1`, `hub-2`, ... at
/// [`hub_ip`], served with TLS and client certificate auth, made with `meshctl clustermesh hub`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HubRt {
    pub members: Vec<Ipv4Addr>,
}

/// Address of hub member `i` (1-based) on the underlay (clusters' etcds and nodes never use 100.127.255.x).
pub fn hub_ip(i: u32) -> Ipv4Addr {
    Ipv4Addr::new(100, 127, 255, u8::try_from(i).unwrap_or(255))
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterRt {
    pub name: String,
    pub id: u16,
    pub pod_cidr: Cidr,
    pub service_cidr: Cidr,
    pub etcd_ip: Ipv4Addr,
    /// Cluster labels (`--cluster-label` of its daemons).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// The agents' `--encryption` (`None`: off).
    #[serde(default)]
    pub encryption: Option<String>,
    pub nodes: Vec<NodeRt>,
    /// Manifest files by base name: their documents as given by the user.
    pub files: BTreeMap<String, Vec<Value>>,
    /// Wired pods by `namespace/name`.
    pub pods: BTreeMap<String, PodRt>,
    /// Allocated ClusterIPs by `namespace/name`.
    pub service_ips: BTreeMap<String, Ipv4Addr>,
    pub next_service_host: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeRt {
    pub name: String,
    pub index: u32,
    pub netns: String,
    pub underlay_ip: Ipv4Addr,
    pub pod_cidr: Cidr,
    pub socket: PathBuf,
    pub next_host: u32,
    /// The node's WireGuard public key (made by its agent binary in its state directory) when its cluster
    /// encrypts; published as a Node annotation.
    #[serde(default)]
    pub wireguard_public_key: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodRt {
    pub namespace: String,
    pub name: String,
    pub node: String,
    pub ip: Ipv4Addr,
    pub netns: String,
    pub host_ifname: String,
    pub ports: Vec<(u16, String)>,
    #[serde(default)]
    pub fail: Option<String>,
    pub ready_file: PathBuf,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Proc {
    pub role: String,
    pub pid: u32,
    /// How it was started (for `lab restart`).
    #[serde(default)]
    pub spawn: Option<SpawnSpec>,
}

/// A daemon's command: program and arguments, run in a network namespace.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SpawnSpec {
    pub netns: String,
    pub program: PathBuf,
    pub args: Vec<String>,
}

fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Namespace prefix of the lab in `dir`: `fm` + 6 hex digits of the folder's path.
fn prefix_for(dir: &Path) -> String {
    format!("fm{:06x}", fnv(&dir.display().to_string()) & 0xff_ffff)
}

/// How long agents of the lab keep an unreachable cluster's backends (short, so fault rehearsals are quick).
pub const REMOTE_GRACE: &str = "3s";
/// The apiservers' heartbeat interval in the lab (10s by default) and how old a peer's heartbeat may get before an
/// agent reading it through the hub counts it unreachable (30s by default): a cluster whose apiserver stops is
/// withdrawn from global services within seconds.
pub const HEARTBEAT_INTERVAL: &str = "1s";
pub const REMOTE_HEARTBEAT_TIMEOUT: &str = "5s";
/// Where every lab agent serves `GET /healthz` and `GET /v1/summary` over TCP, inside its node's namespace
/// (`--status-addr`).
pub const AGENT_STATUS_ADDR: &str = "127.0.0.1:9968";

/// Loopback port of cluster `id`'s etcd inside the underlay namespace (for its own apiserver): 20001-24095, below
/// the kernel's ephemeral range (from 32768), so that no outgoing connection of the namespace can hold it when the
/// etcd of a large id starts.
fn local_etcd_port(id: u16) -> u16 {
    20000 + id
}

/// `--cluster-label KEY=VALUE` for each cluster label.
fn label_args(labels: &BTreeMap<String, String>) -> Vec<String> {
    labels
        .iter()
        .flat_map(|(k, v)| ["--cluster-label".to_owned(), format!("{k}={v}")])
        .collect()
}

/// MAC address of the underlay bridge (locally administered).
const UNDERLAY_BRIDGE_MAC: &str = "02:fe:00:00:00:01";

fn etcd_ip(id: u16) -> Ipv4Addr {
    Ipv4Addr::new(
        100,
        64,
        u8::try_from(id >> 8).unwrap_or(0),
        u8::try_from(id & 0xff).unwrap_or(0),
    )
}

fn node_ip(id: u16, index: u32) -> Ipv4Addr {
    Ipv4Addr::new(
        100,
        65 + u8::try_from(id >> 8).unwrap_or(0),
        u8::try_from(id & 0xff).unwrap_or(0),
        u8::try_from(index).unwrap_or(255),
    )
}

impl LabState {
    fn path(dir: &Path) -> PathBuf {
        dir.join(STATE_FILE)
    }

    pub fn load(dir: &Path) -> Result<Option<Self>> {
        let p = Self::path(dir);
        match std::fs::read_to_string(&p) {
            Ok(t) => Ok(Some(
                serde_json::from_str(&t).with_context(|| format!("parsing {}", p.display()))?,
            )),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", p.display())),
        }
    }

    fn load_running(dir: &Path) -> Result<Self> {
        Self::load(dir)?.with_context(|| {
            format!(
                "no lab is up in {} (run `cargo xtask lab up --topology DIR`)",
                dir.display()
            )
        })
    }

    fn save(&self) -> Result<()> {
        let p = Self::path(&self.lab_dir);
        let tmp = p.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(self)?)?;
        std::fs::rename(&tmp, &p)?;
        Ok(())
    }

    fn marker(&self) -> String {
        self.lab_dir.display().to_string()
    }

    fn ul(&self) -> String {
        format!("{}-ul", self.prefix)
    }

    fn log(&self, role: &str) -> PathBuf {
        self.lab_dir
            .join("logs")
            .join(format!("{}.log", role.replace('/', "_")))
    }

    fn cluster_dir(&self, cluster: &str) -> PathBuf {
        self.lab_dir.join("clusters").join(cluster)
    }

    /// The cluster's TLS material, made by `meshctl clustermesh cluster-certs` (ca.crt, etcd-server.*,
    /// apiserver.*, remote.*, admin.*, cluster.yaml).
    fn pki_dir(&self, cluster: &str) -> PathBuf {
        self.cluster_dir(cluster).join("pki")
    }

    /// The hub folder made by `meshctl clustermesh hub create` (its CA, member and admin certificates,
    /// `hub.yaml`, `clusters/`).
    pub fn hub_dir(&self) -> PathBuf {
        self.lab_dir.join("pki").join("hub")
    }

    /// A cluster's hub material made by `meshctl clustermesh hub join` (its apiserver's `hub-config.yaml`, the
    /// `hub-apiserver-<c>` and `hub-reader-<c>` certificates).
    pub fn hub_certs(&self, cluster: &str) -> PathBuf {
        self.cluster_dir(cluster).join("hub")
    }

    /// Makes the mesh CA and every cluster's certificates through `meshctl clustermesh`, as users do (and the
    /// hub's, with `hub create`).
    fn make_pki(&self) -> Result<()> {
        let meshctl = super::bin("meshctl");
        let ca = self.lab_dir.join("pki").join("ca");
        let _ = std::fs::remove_dir_all(self.lab_dir.join("pki"));
        util::run(
            Command::new(&meshctl)
                .args(["clustermesh", "ca", "create", "--name", "lab", "--out"])
                .arg(&ca),
        )?;
        if let Some(h) = &self.hub {
            let mut cmd = Command::new(&meshctl);
            cmd.args(["clustermesh", "hub", "create", "--out"])
                .arg(self.hub_dir());
            for ip in &h.members {
                cmd.arg("--member-ip").arg(ip.to_string());
            }
            util::run(&mut cmd)?;
        }
        for c in &self.clusters {
            util::run(
                Command::new(&meshctl)
                    .args(["clustermesh", "cluster-certs", "--ca"])
                    .arg(&ca)
                    .args(["--cluster", &c.name, "--cluster-id", &c.id.to_string()])
                    .args(["--server-ip", &c.etcd_ip.to_string(), "--server-ip", "127.0.0.1"])
                    .args(["--endpoint", &format!("https://{}:{ETCD_PORT}", c.etcd_ip)])
                    .arg("--force")
                    .arg("--out")
                    .arg(self.pki_dir(&c.name)),
            )?;
        }
        Ok(())
    }

    /// Starts `meshctl clustermesh etcd-init` for every cluster in the background (each takes a few raft
    /// commits); [`Self::finish_etcd_inits`] waits for them before any etcd client starts.
    fn start_etcd_inits(&self) -> Result<Vec<(usize, std::process::Child)>> {
        (0..self.clusters.len())
            .map(|ci| {
                let c = &self.clusters[ci];
                let log = std::fs::File::create(self.log(&format!("etcd-init-{}", c.name)))?;
                let mut cmd = net::in_netns_cmd(&self.ul(), &super::bin("meshctl"));
                cmd.args(["clustermesh", "etcd-init", "--certs"])
                    .arg(self.pki_dir(&c.name))
                    .stdin(std::process::Stdio::null())
                    .stdout(log.try_clone()?)
                    .stderr(log);
                Ok((ci, cmd.spawn().context("starting meshctl clustermesh etcd-init")?))
            })
            .collect()
    }

    /// Waits for the background etcd-inits; one that failed (etcd not serving yet) is run again until it works.
    fn finish_etcd_inits(&self, inits: Vec<(usize, std::process::Child)>) -> Result<()> {
        for (ci, mut child) in inits {
            if !child.wait().is_ok_and(|s| s.success()) {
                self.init_etcd(ci)?;
            }
        }
        Ok(())
    }

    /// Users, roles and auth in the cluster's etcd (`meshctl clustermesh etcd-init`, from the underlay).
    fn init_etcd(&self, ci: usize) -> Result<()> {
        let c = &self.clusters[ci];
        // etcd accepts connections a moment before it serves requests: retried until a deadline.
        net::wait_for(
            &format!("etcd-init of cluster {}", c.name),
            Duration::from_secs(15),
            || {
                let mut cmd = net::in_netns_cmd(&self.ul(), &super::bin("meshctl"));
                cmd.args(["clustermesh", "etcd-init", "--certs"])
                    .arg(self.pki_dir(&c.name));
                util::run(&mut cmd).map(drop).map_err(|e| format!("{e:#}"))
            },
        )
    }

    /// A client pod of `cluster` (`namespace/name`), the ClusterIP of a service there (`namespace/name`), and the
    /// API socket of the agent on the pod's node: what the demo and the benchmarks drive traffic and meshctl with.
    pub fn client_of(&self, cluster: &str, pod: &str, service: &str) -> Result<(&PodRt, Ipv4Addr, PathBuf)> {
        let c = &self.clusters[self.cluster(cluster)?];
        let client = c
            .pods
            .get(pod)
            .with_context(|| format!("pod {cluster}/{pod} missing"))?;
        let vip = *c
            .service_ips
            .get(service)
            .with_context(|| format!("service {cluster}/{service} has no ClusterIP"))?;
        let socket = c
            .nodes
            .iter()
            .find(|n| n.name == client.node)
            .map(|n| n.socket.clone())
            .with_context(|| format!("no node {} in {cluster}", client.node))?;
        Ok((client, vip, socket))
    }

    fn cluster(&self, name: &str) -> Result<usize> {
        self.clusters
            .iter()
            .position(|c| c.name == name)
            .with_context(|| {
                format!(
                    "no cluster {name:?} in the lab (clusters: {})",
                    self.clusters
                        .iter()
                        .map(|c| c.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            })
    }

    fn add_netns(&mut self, name: &str) -> Result<()> {
        // Record first: a crash between the two steps must still be cleaned up by `lab down`.
        self.netns.push(name.to_owned());
        self.save()?;
        net::ip(&["netns", "add", name])?;
        net::ip_in(name, &["link", "set", "lo", "up"])?;
        net::write_resolv_conf(name)?;
        Ok(())
    }

    fn spawn(&mut self, role: &str, netns: &str, program: &Path, args: &[String]) -> Result<u32> {
        let mut cmd = net::in_netns_cmd(netns, program);
        cmd.args(args);
        let pid = net::spawn_daemon(cmd, &self.log(role))?;
        let spawn = SpawnSpec {
            netns: netns.to_owned(),
            program: program.to_owned(),
            args: args.to_vec(),
        };
        self.procs.push(Proc {
            role: role.to_owned(),
            pid,
            spawn: Some(spawn),
        });
        self.save()?;
        Ok(pid)
    }

    fn proc_pid(&self, role: &str) -> Option<u32> {
        self.procs.iter().rev().find(|p| p.role == role).map(|p| p.pid)
    }

    fn stop_role(&mut self, role: &str) {
        let pids: Vec<u32> = self
            .procs
            .iter()
            .filter(|p| p.role == role)
            .map(|p| p.pid)
            .collect();
        net::stop_processes(&pids, &self.marker(), Duration::from_secs(5));
        self.procs.retain(|p| p.role != role);
    }

    // ---- building blocks ------------------------------------------------------------------------------------

    fn create_underlay(&mut self) -> Result<()> {
        let ul = self.ul();
        self.add_netns(&ul)?;
        // A fixed address: a bridge without one takes the lowest address of its ports and changes it when a port
        // with a lower one joins (a node added later), and every node's ARP entry for the etcd addresses on the
        // bridge then points nowhere until it expires: peers looked cut off for up to a minute.
        net::ip_in(
            &ul,
            &[
                "link",
                "add",
                "br0",
                "address",
                UNDERLAY_BRIDGE_MAC,
                "type",
                "bridge",
            ],
        )?;
        net::ip_in(&ul, &["link", "set", "br0", "up"])?;
        Ok(())
    }

    fn start_etcd(&mut self, ci: usize) -> Result<()> {
        let c = &self.clusters[ci];
        let (name, ip) = (c.name.clone(), c.etcd_ip);
        let ul = self.ul();
        net::ip_in(&ul, &["addr", "add", &format!("{ip}/10"), "dev", "br0"])?;
        let data = self.cluster_dir(&name).join("etcd");
        std::fs::create_dir_all(&data)?;
        let pki = self.pki_dir(&name);
        let client = format!("https://{ip}:{ETCD_PORT}");
        let peer = format!("http://{ip}:{}", ETCD_PORT + 1);
        // The cluster's own apiserver uses a loopback listener, so `lab cut` (which takes the cluster's etcd
        // address off the underlay) separates the cluster from its peers without cutting it from itself.
        let local = format!("https://127.0.0.1:{}", local_etcd_port(self.clusters[ci].id));
        let args = vec![
            "--name".into(),
            name.clone(),
            "--data-dir".into(),
            data.display().to_string(),
            "--listen-client-urls".into(),
            format!("{client},{local}"),
            "--advertise-client-urls".into(),
            client,
            "--listen-peer-urls".into(),
            peer.clone(),
            "--initial-advertise-peer-urls".into(),
            peer.clone(),
            "--initial-cluster".into(),
            format!("{name}={peer}"),
            "--log-level".into(),
            "warn".into(),
            // TLS with client certificates; etcd-init then maps each certificate's CN to a user.
            "--cert-file".into(),
            pki.join("etcd-server.crt").display().to_string(),
            "--key-file".into(),
            pki.join("etcd-server.key").display().to_string(),
            "--trusted-ca-file".into(),
            pki.join("ca.crt").display().to_string(),
            "--client-cert-auth".into(),
            // Lets agents ping every second, so a cut peer is noticed quickly (etcd's default is 5s).
            "--grpc-keepalive-min-time".into(),
            "500ms".into(),
        ];
        let etcd = util::which("etcd").context("etcd not found (run `cargo xtask setup`)")?;
        self.spawn(&format!("etcd-{name}"), &ul, &etcd, &args)?;
        Ok(())
    }

    /// Starts the hub's members (one etcd cluster), each on its own underlay address.
    fn start_hub(&mut self) -> Result<()> {
        let Some(h) = self.hub.clone() else {
            return Ok(());
        };
        let ul = self.ul();
        let dir = self.hub_dir();
        let initial: Vec<String> = h
            .members
            .iter()
            .enumerate()
            .map(|(i, ip)| format!("hub-{}=http://{ip}:{}", i + 1, ETCD_PORT + 1))
            .collect();
        let etcd = util::which("etcd").context("etcd not found (run `cargo xtask setup`)")?;
        for (i, ip) in h.members.iter().enumerate() {
            let name = format!("hub-{}", i + 1);
            net::ip_in(&ul, &["addr", "add", &format!("{ip}/10"), "dev", "br0"])?;
            let data = self.lab_dir.join("clusters").join(".hub").join(&name);
            std::fs::create_dir_all(&data)?;
            let file = |ext: &str| dir.join(format!("member-{}.{ext}", i + 1)).display().to_string();
            let ca = dir.join("ca.crt").display().to_string();
            let client = format!("https://{ip}:{ETCD_PORT}");
            // Raft between the members in plain HTTP, as the clusters' etcds' peer URLs: they share the underlay
            // namespace, which has no route out (docs/fleet-hub.md has the production setup with peer TLS).
            let peer = format!("http://{ip}:{}", ETCD_PORT + 1);
            let args: Vec<String> = [
                "--name",
                &name,
                "--data-dir",
                &data.display().to_string(),
                "--listen-client-urls",
                &client,
                "--advertise-client-urls",
                &client,
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
                "--initial-cluster",
                &initial.join(","),
                "--initial-cluster-state",
                "new",
                "--initial-cluster-token",
                &format!("{}-hub", self.prefix),
                "--log-level",
                "warn",
                "--cert-file",
                &file("crt"),
                "--key-file",
                &file("key"),
                "--trusted-ca-file",
                &ca,
                "--client-cert-auth",
                "--grpc-keepalive-min-time",
                "500ms",
            ]
            .iter()
            .map(|a| (*a).to_owned())
            .collect();
            self.spawn(&format!("etcd-{name}"), &ul, &etcd, &args)?;
        }
        Ok(())
    }

    /// Sets the hub up once its members serve (`hub init`), joins every cluster (`hub join`) and writes every
    /// cluster's peer files pointing at the hub (`hub connect`), all with meshctl from the underlay.
    fn init_hub(&self, timeout: Duration) -> Result<()> {
        let Some(h) = &self.hub else {
            return Ok(());
        };
        let ul = self.ul();
        for ip in &h.members {
            let addr = SocketAddr::from((*ip, ETCD_PORT));
            net::wait_for(&format!("hub member {ip}"), timeout, || {
                net::in_netns(&ul, || {
                    TcpStream::connect_timeout(&addr, Duration::from_millis(200))
                })
                .map_err(|e| e.to_string())?
                .map(drop)
                .map_err(|e| format!("{addr}: {e}"))
            })?;
        }
        let meshctl = |args: &[&str]| {
            let mut cmd = net::in_netns_cmd(&ul, &super::bin("meshctl"));
            cmd.args(["clustermesh", "hub"]).args(args);
            cmd
        };
        let hub = self.hub_dir().display().to_string();
        // The members accept connections a moment before the cluster has a leader: retried until a deadline.
        net::wait_for("hub init", timeout, || {
            util::run(&mut meshctl(&["init", "--hub", &hub]))
                .map(drop)
                .map_err(|e| format!("{e:#}"))
        })?;
        for c in &self.clusters {
            let out = self.hub_certs(&c.name).display().to_string();
            let id = c.id.to_string();
            util::run(&mut meshctl(&[
                "join",
                "--hub",
                &hub,
                "--cluster",
                &c.name,
                "--cluster-id",
                &id,
                "--out",
                &out,
            ]))?;
        }
        for c in &self.clusters {
            let certs = self.hub_certs(&c.name).display().to_string();
            let cfg = self.cluster_dir(&c.name).join("clustermesh");
            std::fs::create_dir_all(&cfg)?;
            util::run(&mut meshctl(&[
                "connect",
                "--hub",
                &hub,
                "--certs",
                &certs,
                "--config-dir",
                &cfg.display().to_string(),
                "--pin-id",
            ]))?;
        }
        Ok(())
    }

    fn wait_etcd(&self, ci: usize, timeout: Duration) -> Result<()> {
        let c = &self.clusters[ci];
        let addr = SocketAddr::from((c.etcd_ip, ETCD_PORT));
        let ul = self.ul();
        let role = format!("etcd-{}", c.name);
        let pid = self.proc_pid(&role).unwrap_or(0);
        net::wait_for(&format!("etcd of cluster {}", c.name), timeout, || {
            if !net::is_ours(pid, &self.marker()) {
                return Err(format!(
                    "etcd exited; log:\n{}",
                    net::log_tail(&self.log(&role), 10)
                ));
            }
            net::in_netns(&ul, || {
                TcpStream::connect_timeout(&addr, Duration::from_millis(200))
            })
            .map_err(|e| e.to_string())?
            .map(drop)
            .map_err(|e| format!("{addr}: {e}"))
        })
    }

    fn create_node(&mut self, ci: usize, index: u32) -> Result<()> {
        let (cname, id, pod_cidr) = (
            self.clusters[ci].name.clone(),
            self.clusters[ci].id,
            self.clusters[ci].pod_cidr,
        );
        let name = topology::node_name(&cname, index);
        let netns = format!("{}-{name}", self.prefix);
        let slice = pod_cidr
            .subnet(NODE_SLICE_LEN, index - 1)
            .with_context(|| format!("cluster {cname}: podCIDR {pod_cidr} has no room for node {index}"))?;
        let ip = node_ip(id, index);
        let node = NodeRt {
            name: name.clone(),
            index,
            netns: netns.clone(),
            underlay_ip: ip,
            pod_cidr: slice,
            socket: self.lab_dir.join("run").join(format!("{name}.sock")),
            next_host: 2,
            wireguard_public_key: None,
        };
        let wireguard_public_key = if self.clusters[ci].encryption.is_some() {
            Some(self.wireguard_key(&name)?)
        } else {
            None
        };
        let node = NodeRt {
            wireguard_public_key,
            ..node
        };
        self.clusters[ci].nodes.push(node);
        self.add_netns(&netns)?;
        let ul = self.ul();
        let uplink = format!("u{id}n{index}");
        net::ip_in(
            &ul,
            &[
                "link", "add", &uplink, "type", "veth", "peer", "name", "eth0", "netns", &netns,
            ],
        )?;
        net::ip_in(&ul, &["link", "set", &uplink, "master", "br0", "up"])?;
        net::ip_in(&netns, &["addr", "add", &format!("{ip}/10"), "dev", "eth0"])?;
        net::ip_in(&netns, &["link", "set", "eth0", "up"])?;
        self.save()
    }

    /// The agent's state directory of node `name`.
    fn agent_state_dir(&self, name: &str) -> PathBuf {
        self.lab_dir.join("run").join("state").join(name)
    }

    /// Node `name`'s WireGuard public key: its agent binary makes the key pair in the node's state directory (the
    /// private key stays there, 0600) and prints the public key, which the lab then publishes on the Node object
    /// (on Kubernetes the agent annotates its Node itself).
    fn wireguard_key(&self, name: &str) -> Result<String> {
        let dir = self.agent_state_dir(name);
        let out = std::process::Command::new(super::bin("mesh-agent"))
            .arg("wireguard-key")
            .arg("--state-dir")
            .arg(&dir)
            .output()
            .context("running mesh-agent wireguard-key")?;
        anyhow::ensure!(
            out.status.success(),
            "mesh-agent wireguard-key --state-dir {}: {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// Where the lab's agents pin their datapaths on bpffs (per lab, so that labs of the same topology running at
    /// once stay apart; one directory per node below it).
    fn bpf_pins(&self) -> PathBuf {
        Path::new("/sys/fs/bpf/fleetmesh").join(&self.prefix)
    }

    fn start_agent(&mut self, ci: usize, ni: usize) -> Result<()> {
        let c = &self.clusters[ci];
        let n = &c.nodes[ni];
        let dir = self.cluster_dir(&c.name);
        let mut args = vec![
            "--node-name".into(),
            n.name.clone(),
            "--cluster-name".into(),
            c.name.clone(),
            "--cluster-id".into(),
            c.id.to_string(),
            "--manifests".into(),
            dir.join("manifests").display().to_string(),
            "--clustermesh-config".into(),
            dir.join("clustermesh").display().to_string(),
            "--kvstore-config".into(),
            self.kvstore_config(&c.name).display().to_string(),
            "--api-socket".into(),
            n.socket.display().to_string(),
            // Inside the node's namespace: the read-only status endpoint `meshctl status --context` reads.
            "--status-addr".into(),
            AGENT_STATUS_ADDR.into(),
            "--remote-keepalive-interval".into(),
            "1s".into(),
            "--remote-grace-period".into(),
            REMOTE_GRACE.into(),
            "--remote-heartbeat-timeout".into(),
            REMOTE_HEARTBEAT_TIMEOUT.into(),
            "--bpf-pin-dir".into(),
            self.bpf_pins().join(&n.name).display().to_string(),
            "--state-dir".into(),
            self.agent_state_dir(&n.name).display().to_string(),
            "--encryption".into(),
            c.encryption.clone().unwrap_or_else(|| "off".into()),
            // The clusterset DNS zone, on the node-local address every pod's resolv.conf names; no upstream:
            // lab namespaces have no way out, other names are refused.
            "--dns-listen".into(),
            format!("{}:53", net::LAB_DNS),
        ];
        args.extend(label_args(&c.labels));
        let (role, netns) = (format!("agent-{}", n.name), n.netns.clone());
        self.spawn(&role, &netns, &super::bin("mesh-agent"), &args)?;
        Ok(())
    }

    fn start_apiserver(&mut self, ci: usize) -> Result<()> {
        let c = &self.clusters[ci];
        let mut args = vec![
            "--cluster-name".into(),
            c.name.clone(),
            "--cluster-id".into(),
            c.id.to_string(),
            "--manifests".into(),
            self.cluster_dir(&c.name).join("manifests").display().to_string(),
            "--etcd-endpoints".into(),
            format!("https://127.0.0.1:{}", local_etcd_port(c.id)),
            "--etcd-ca".into(),
            self.pki_dir(&c.name).join("ca.crt").display().to_string(),
            "--etcd-cert".into(),
            self.pki_dir(&c.name).join("apiserver.crt").display().to_string(),
            "--etcd-key".into(),
            self.pki_dir(&c.name).join("apiserver.key").display().to_string(),
            "--heartbeat-interval".into(),
            HEARTBEAT_INTERVAL.into(),
        ];
        if self.hub.is_some() {
            args.push("--hub-config".into());
            args.push(
                self.hub_certs(&c.name)
                    .join("hub-config.yaml")
                    .display()
                    .to_string(),
            );
        }
        args.extend(label_args(&c.labels));
        let role = format!("apiserver-{}", c.name);
        let ul = self.ul();
        self.spawn(&role, &ul, &super::bin("clustermesh-apiserver"), &args)?;
        Ok(())
    }

    /// The agents' config file for their own cluster's etcd (`--kvstore-config`), where they watch the cluster's
    /// identities and ips.
    fn kvstore_config(&self, cluster: &str) -> PathBuf {
        self.cluster_dir(cluster).join("kvstore.yaml")
    }

    /// Every cluster's `--kvstore-config` file: its etcd (the address peers use too), read with the cluster's
    /// read-only `remote` certificate (its role reads the whole key prefix).
    fn write_kvstore_configs(&self) -> Result<()> {
        for c in &self.clusters {
            let pki = self.pki_dir(&c.name);
            let text = format!(
                "endpoints:\n  - https://{}:{ETCD_PORT}\ntrusted-ca-file: {}\ncert-file: {}\nkey-file: {}\n",
                c.etcd_ip,
                pki.join("ca.crt").display(),
                pki.join("remote.crt").display(),
                pki.join("remote.key").display(),
            );
            let file = self.kvstore_config(&c.name);
            std::fs::create_dir_all(self.cluster_dir(&c.name))?;
            std::fs::write(&file, text).with_context(|| format!("writing {}", file.display()))?;
        }
        Ok(())
    }

    /// Every cluster's clustermesh config: `meshctl clustermesh connect` to each peer, pinning what each peer may
    /// claim (its id, its pod CIDR and its labels, as the topology gives them): a peer's etcd cannot widen them.
    fn write_clustermesh_configs(&self) -> Result<()> {
        if self.hub.is_some() {
            // The peers are read from the hub: `init_hub` writes the files once the hub serves.
            return Ok(());
        }
        for c in &self.clusters {
            let dir = self.cluster_dir(&c.name).join("clustermesh");
            std::fs::create_dir_all(&dir)?;
            let peers: Vec<&ClusterRt> = self.clusters.iter().filter(|p| p.name != c.name).collect();
            if peers.is_empty() {
                continue;
            }
            let mut cmd = Command::new(super::bin("meshctl"));
            cmd.args(["clustermesh", "connect", "--from"])
                .arg(self.pki_dir(&c.name))
                .arg("--config-dir")
                .arg(&dir);
            cmd.arg("--pin-id");
            for p in peers {
                cmd.arg("--to").arg(self.pki_dir(&p.name));
                cmd.arg("--pod-cidr").arg(format!("{}={}", p.name, p.pod_cidr));
                for (k, v) in &p.labels {
                    cmd.arg("--peer-label").arg(format!("{}={k}={v}", p.name));
                }
            }
            util::run(&mut cmd)?;
        }
        Ok(())
    }

    /// Wires every Pod document of cluster `ci` that is not wired yet, and unwires pods that are gone.
    fn sync_pods(&mut self, ci: usize) -> Result<()> {
        let desired: BTreeMap<String, topology::PodSpec> = self.clusters[ci]
            .files
            .values()
            .flatten()
            .filter(|d| d["kind"] == "Pod")
            .map(|d| {
                let p = topology::pod_spec(d);
                (format!("{}/{}", p.namespace, p.name), p)
            })
            .collect();
        let gone: Vec<String> = self.clusters[ci]
            .pods
            .iter()
            .filter(|(k, p)| {
                desired.get(*k).is_none_or(|d| {
                    d.node.as_ref().is_some_and(|n| n != &p.node) || d.ports != p.ports || d.fail != p.fail
                })
            })
            .map(|(k, _)| k.clone())
            .collect();
        for k in gone {
            self.remove_pod(ci, &k)?;
        }
        for (k, spec) in desired {
            if !self.clusters[ci].pods.contains_key(&k) {
                self.create_pod(ci, &spec)?;
            }
        }
        Ok(())
    }

    fn create_pod(&mut self, ci: usize, spec: &topology::PodSpec) -> Result<()> {
        let cname = self.clusters[ci].name.clone();
        // Schedule: the named node, else the node with the fewest pods.
        let node_name = match &spec.node {
            Some(n) => n.clone(),
            None => {
                let c = &self.clusters[ci];
                c.nodes
                    .iter()
                    .min_by_key(|n| (c.pods.values().filter(|p| p.node == n.name).count(), n.index))
                    .map(|n| n.name.clone())
                    .context("cluster has no nodes")?
            }
        };
        let ni = self.clusters[ci]
            .nodes
            .iter()
            .position(|n| n.name == node_name)
            .with_context(|| {
                format!(
                    "pod {}/{}: node {node_name} does not exist",
                    spec.namespace, spec.name
                )
            })?;
        let node = &mut self.clusters[ci].nodes[ni];
        let ip = node
            .pod_cidr
            .host(node.next_host)
            .filter(|_| node.next_host < 255)
            .with_context(|| format!("node {node_name}: no pod addresses left"))?;
        node.next_host += 1;
        let node_netns = node.netns.clone();
        let full = format!("{cname}/{}/{}", spec.namespace, spec.name);
        let host_ifname = format!("fm{:010x}", fnv(&full) & 0xff_ffff_ffff);
        let netns = format!("{}-p{:010x}", self.prefix, fnv(&full) & 0xff_ffff_ffff);
        let ready_file = self
            .lab_dir
            .join("run")
            .join("pods")
            .join(format!("{cname}_{}_{}.ready", spec.namespace, spec.name));
        let pod = PodRt {
            namespace: spec.namespace.clone(),
            name: spec.name.clone(),
            node: node_name,
            ip,
            netns: netns.clone(),
            host_ifname: host_ifname.clone(),
            ports: spec.ports.clone(),
            fail: spec.fail.clone(),
            ready_file: ready_file.clone(),
        };
        self.clusters[ci]
            .pods
            .insert(format!("{}/{}", spec.namespace, spec.name), pod);
        self.add_netns(&netns)?;
        let o = ip.octets();
        let mac = format!("0a:58:{:02x}:{:02x}:{:02x}:{:02x}", o[0], o[1], o[2], o[3]);
        net::ip_in(
            &node_netns,
            &[
                "link",
                "add",
                &host_ifname,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                &netns,
            ],
        )?;
        let mtu = if self.clusters[ci].encryption.is_some() {
            POD_MTU_ENCRYPTED
        } else {
            POD_MTU
        };
        net::ip_in(&node_netns, &["link", "set", &host_ifname, "mtu", mtu, "up"])?;
        // The node's own route to the pod, as a CNI plugin sets it up: the node (kubelet probes) reaches its pods and
        // answers them through the host veth; pod-to-pod traffic never uses it (the datapath redirects it).
        net::ip_in(
            &node_netns,
            &[
                "route",
                "add",
                &format!("{ip}/32"),
                "dev",
                &host_ifname,
                "scope",
                "link",
            ],
        )?;
        net::ip_in(
            &netns,
            &["link", "set", "eth0", "address", &mac, "mtu", mtu, "up"],
        )?;
        net::ip_in(&netns, &["addr", "add", &format!("{ip}/32"), "dev", "eth0"])?;
        net::ip_in(&netns, &["route", "add", GATEWAY, "dev", "eth0", "scope", "link"])?;
        net::ip_in(
            &netns,
            &["route", "add", "default", "via", GATEWAY, "dev", "eth0"],
        )?;
        let link: Value = serde_json::from_str(&net::ip_in(
            &node_netns,
            &["-j", "link", "show", "dev", &host_ifname],
        )?)?;
        let host_mac = link[0]["address"]
            .as_str()
            .context("no MAC on the host veth")?
            .to_owned();
        net::ip_in(
            &netns,
            &[
                "neigh",
                "add",
                GATEWAY,
                "lladdr",
                &host_mac,
                "dev",
                "eth0",
                "nud",
                "permanent",
            ],
        )?;
        let mut args = vec![
            "echo".to_owned(),
            "--name".into(),
            full,
            "--ready-file".into(),
            ready_file.display().to_string(),
        ];
        if let Some(fail) = &spec.fail {
            args.push("--fail".into());
            args.push(fail.clone());
        }
        for (port, proto) in &spec.ports {
            let flag = match proto.as_str() {
                "UDP" => "--udp",
                "TCP-STREAM" => "--tcp-stream",
                _ => "--tcp",
            };
            args.push(flag.into());
            args.push(port.to_string());
        }
        let _ = std::fs::remove_file(&ready_file);
        if let Some(d) = ready_file.parent() {
            std::fs::create_dir_all(d)?;
        }
        let exe = std::env::current_exe().context("locating the xtask binary")?;
        self.spawn(
            &format!("pod-{cname}-{}-{}", spec.namespace, spec.name),
            &netns,
            &exe,
            &args,
        )?;
        Ok(())
    }

    fn remove_pod(&mut self, ci: usize, key: &str) -> Result<()> {
        let Some(p) = self.clusters[ci].pods.remove(key) else {
            return Ok(());
        };
        let role = format!("pod-{}-{}-{}", self.clusters[ci].name, p.namespace, p.name);
        self.stop_role(&role);
        // The host side first, synchronously: removing the pod's netns destroys its veth in the background, and
        // a pod re-created at once (same names) would find the old host interface still there.
        let node_netns = self.clusters[ci]
            .nodes
            .iter()
            .find(|n| n.name == p.node)
            .map(|n| n.netns.clone());
        if let Some(node_netns) = node_netns
            && net::netns_exists(&node_netns)
        {
            let _ = net::ip(&["-n", &node_netns, "link", "del", &p.host_ifname]);
        }
        if net::netns_exists(&p.netns) {
            net::ip(&["netns", "del", &p.netns])?;
        }
        net::remove_resolv_conf(&p.netns);
        self.netns.retain(|n| n != &p.netns);
        self.save()
    }

    /// Writes the manifests the cluster's daemons read: the lab's Node objects and the user's files with pods
    /// wired (node, IP, host interface) and ClusterIPs allocated.
    fn write_manifests(&mut self, ci: usize) -> Result<()> {
        let dir = self.cluster_dir(&self.clusters[ci].name).join("manifests");
        std::fs::create_dir_all(&dir)?;
        let c = &mut self.clusters[ci];
        let mut nodes = String::new();
        for n in &c.nodes {
            let mut doc = json!({
                "apiVersion": "v1", "kind": "Node",
                "metadata": {"name": n.name, "labels": {"topology.fleetmesh.io/cluster": c.name}},
                "spec": {"podCIDR": n.pod_cidr.to_string()},
                "status": {"addresses": [{"type": "InternalIP", "address": n.underlay_ip.to_string()}]},
            });
            if let Some(key) = &n.wireguard_public_key {
                doc["metadata"]["annotations"] = json!({ mesh_model::wireguard::ANNOTATION_PUBLIC_KEY: key });
            }
            nodes.push_str("---\n");
            nodes.push_str(&mesh_model::yaml::to_string(&doc)?);
        }
        write_atomic(&dir.join(NODES_FILE), &nodes)?;
        let mut keep = BTreeSet::from([NODES_FILE.to_owned()]);
        for (file, docs) in &c.files {
            let mut out = String::new();
            for d in docs {
                let mut d = d.clone();
                let (kind, ns, name) = topology::object_key(&d);
                let key = format!("{ns}/{name}");
                if kind == "Pod"
                    && let Some(p) = c.pods.get(&key)
                {
                    d["metadata"]["annotations"][HOST_IFNAME_ANNOTATION] = json!(p.host_ifname);
                    d["spec"]["nodeName"] = json!(p.node);
                    d["status"] = json!({"podIP": p.ip.to_string(), "phase": "Running"});
                }
                if kind == "Service" && d["spec"]["clusterIP"].as_str().is_none_or(str::is_empty) {
                    let ip = match c.service_ips.get(&key) {
                        Some(ip) => *ip,
                        None => {
                            c.next_service_host += 1;
                            let ip = c
                                .service_cidr
                                .host(c.next_service_host)
                                .with_context(|| format!("serviceCIDR {} is full", c.service_cidr))?;
                            c.service_ips.insert(key, ip);
                            ip
                        }
                    };
                    d["spec"]["clusterIP"] = json!(ip.to_string());
                }
                out.push_str("---\n");
                out.push_str(&mesh_model::yaml::to_string(&d)?);
            }
            write_atomic(&dir.join(file), &out)?;
            keep.insert(file.clone());
        }
        for e in std::fs::read_dir(&dir)?.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !keep.contains(&name) {
                std::fs::remove_file(e.path())?;
            }
        }
        self.save()
    }

    /// Waits until every agent is ready and knows every node's pod prefix, every local pod is programmed and
    /// every workload listens. Returns the time it took.
    fn wait_converged(&self, timeout: Duration) -> Result<Duration> {
        let started = Instant::now();
        let all_prefixes: BTreeSet<String> = self
            .clusters
            .iter()
            .flat_map(|c| c.nodes.iter().map(|n| n.pod_cidr.to_string()))
            .collect();
        // A hub stopped on purpose (every member `lab stop`ped): no agent can sync its peers, so none is waited for.
        let hub_stopped = self.hub.as_ref().is_some_and(|h| {
            (1..=h.members.len()).all(|i| self.stopped.iter().any(|p| p.role == format!("etcd-hub-{i}")))
        });
        net::wait_for("the mesh to converge", timeout, || {
            for c in &self.clusters {
                for n in &c.nodes {
                    let role = format!("agent-{}", n.name);
                    // An agent stopped on purpose (`lab stop`) is not waited for.
                    if hub_stopped || self.stopped.iter().any(|p| p.role == role) {
                        continue;
                    }
                    if !self
                        .proc_pid(&role)
                        .is_some_and(|p| net::is_ours(p, &self.marker()))
                    {
                        return Err(format!(
                            "agent of {} is not running; log:\n{}",
                            n.name,
                            net::log_tail(&self.log(&role), 15)
                        ));
                    }
                    let st: Value = serde_json::from_str(&net::http_get_unix(&n.socket, "/v1/status")?)
                        .map_err(|e| format!("agent {}: bad status: {e}", n.name))?;
                    check_agent(&st, n, c, &all_prefixes).map_err(|e| format!("agent {}: {e}", n.name))?;
                }
                for p in c.pods.values() {
                    if !p.ready_file.exists() {
                        return Err(format!(
                            "workload of pod {}/{}/{} is not listening yet",
                            c.name, p.namespace, p.name
                        ));
                    }
                }
            }
            Ok(())
        })?;
        Ok(started.elapsed())
    }

    fn teardown(&mut self) {
        // Clients first, then the etcd servers: agents do not log the servers going away as faults.
        let (servers, clients): (Vec<&Proc>, Vec<&Proc>) =
            self.procs.iter().partition(|p| p.role.starts_with("etcd-"));
        for group in [clients, servers] {
            let pids: Vec<u32> = group.iter().map(|p| p.pid).collect();
            net::stop_processes(&pids, &self.marker(), Duration::from_secs(5));
        }
        self.procs.clear();
        let mut names: Vec<String> = self.netns.iter().rev().cloned().collect();
        for n in net::netns_with_prefix(&format!("{}-", self.prefix)) {
            if !names.contains(&n) {
                names.push(n);
            }
        }
        for n in names {
            if net::netns_exists(&n)
                && let Err(e) = net::ip(&["netns", "del", &n])
            {
                eprintln!("lab: removing netns {n}: {e:#}");
            }
            net::remove_resolv_conf(&n);
        }
        self.netns.clear();
        // The agents' pinned datapaths (maps, links); the links are gone with the namespaces already.
        let pins = self.bpf_pins();
        if let Err(e) = std::fs::remove_dir_all(&pins)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            eprintln!("lab: removing pinned datapaths {}: {e}", pins.display());
        }
        let _ = std::fs::remove_dir_all(self.lab_dir.join("run"));
        let _ = std::fs::remove_dir_all(self.lab_dir.join("clusters"));
    }
}

fn check_agent(st: &Value, n: &NodeRt, c: &ClusterRt, prefixes: &BTreeSet<String>) -> Result<(), String> {
    let dp = &st["datapath"];
    let have: BTreeSet<String> = dp["ipcache"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["prefix"].as_str().map(str::to_owned))
        .collect();
    if let Some(missing) = prefixes.difference(&have).next() {
        let remotes: Vec<String> = st["remoteClusters"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|r| {
                format!(
                    "{}={}",
                    r["name"].as_str().unwrap_or("?"),
                    r["state"]["state"].as_str().unwrap_or("?")
                )
            })
            .collect();
        return Err(format!(
            "ipcache lacks {missing} (remote clusters: {})",
            remotes.join(", ")
        ));
    }
    let programmed: BTreeSet<String> = dp["endpoints"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["programmed"] == true)
        .filter_map(|e| e["ipv4"].as_str().map(str::to_owned))
        .collect();
    for p in c.pods.values().filter(|p| p.node == n.name) {
        if !programmed.contains(&p.ip.to_string()) {
            return Err(format!(
                "pod {}/{} ({}) is not programmed yet",
                p.namespace, p.name, p.ip
            ));
        }
    }
    if st["ready"] != true {
        return Err(format!(
            "not ready: errors {} manifest errors {}",
            dp["errors"], st["manifestErrors"]
        ));
    }
    Ok(())
}

fn write_atomic(path: &Path, text: &str) -> Result<()> {
    let tmp = path.with_file_name(format!(
        ".{}.tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("x")
    ));
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}

/// Reads and checks the manifest files of a cluster the way the agent will (`meshctl manifests validate`).
fn validate_files(files: &[PathBuf]) -> Result<()> {
    if files.is_empty() {
        return Ok(());
    }
    let mut cmd = Command::new(super::bin("meshctl"));
    cmd.args(["manifests", "validate"]).args(files);
    let out = cmd
        .output()
        .with_context(|| format!("running {}", util::cmdline(&cmd)))?;
    if !out.status.success() {
        bail!(
            "{}",
            String::from_utf8_lossy(&out.stderr)
                .trim()
                .trim_start_matches("error: ")
        );
    }
    Ok(())
}

fn load_cluster_docs(c: &Cluster) -> Result<BTreeMap<String, Vec<Value>>> {
    let mut files = BTreeMap::new();
    for f in &c.files {
        let base = f
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_owned();
        if base == NODES_FILE {
            bail!(
                "{}: the file name {NODES_FILE} is reserved for the lab's Node objects",
                f.display()
            );
        }
        files.insert(base, topology::read_docs(f)?);
    }
    Ok(files)
}

// ---- commands -------------------------------------------------------------------------------------------------

pub fn up(dir: &Path, topology_dir: &Path, build: bool, timeout: Duration) -> Result<LabState> {
    let _lock = LabLock::acquire(dir)?;
    if LabState::load(dir)?.is_some() {
        bail!(
            "a lab is already up in {} (run `cargo xtask lab down` first, or pass another --lab-dir)",
            dir.display()
        );
    }
    let topology_dir = topology_dir
        .canonicalize()
        .with_context(|| format!("topology folder {}", topology_dir.display()))?;
    println!("lab: checking topology {}", topology_dir.display());
    let clusters = topology::load(&topology_dir)?;
    let hub = topology::load_hub(&topology_dir)?;
    let mut docs = Vec::new();
    for c in &clusters {
        let files = load_cluster_docs(c)?;
        let nodes: Vec<String> = (1..=c.nodes).map(|i| topology::node_name(&c.name, i)).collect();
        topology::check_docs(c, &files, &nodes)?;
        docs.push(files);
    }
    if build {
        super::build_daemons()?;
    }
    for c in &clusters {
        validate_files(&c.files)?;
    }

    let prefix = prefix_for(dir);
    let leftovers = net::netns_with_prefix(&format!("{prefix}-"));
    if !leftovers.is_empty() {
        bail!(
            "network namespaces of an earlier lab in this folder are still there ({}); run `cargo xtask lab down`",
            leftovers.join(", ")
        );
    }
    let mut st = LabState {
        lab_dir: dir.to_owned(),
        prefix,
        topology: topology_dir,
        clusters: clusters
            .iter()
            .zip(docs)
            .map(|(c, files)| ClusterRt {
                name: c.name.clone(),
                id: c.id,
                pod_cidr: c.pod_cidr,
                service_cidr: c.service_cidr,
                etcd_ip: etcd_ip(c.id),
                labels: c.labels.clone(),
                encryption: (c.encryption != "off").then(|| c.encryption.clone()),
                nodes: Vec::new(),
                files,
                pods: BTreeMap::new(),
                service_ips: BTreeMap::new(),
                next_service_host: 1,
            })
            .collect(),
        netns: Vec::new(),
        procs: Vec::new(),
        stopped: Vec::new(),
        hub: hub.map(|h| HubRt {
            members: (1..=h.members).map(hub_ip).collect(),
        }),
    };
    let _ = std::fs::remove_dir_all(dir.join("logs"));
    let _ = std::fs::remove_dir_all(dir.join("clusters"));
    let _ = std::fs::remove_dir_all(dir.join("run"));
    st.save()?;
    let result = (|| -> Result<()> {
        println!(
            "lab: creating the underlay and {} etcd servers",
            st.clusters.len()
        );
        st.create_underlay()?;
        st.make_pki()?;
        for ci in 0..st.clusters.len() {
            st.start_etcd(ci)?;
        }
        st.start_hub()?;
        for (ci, c) in clusters.iter().enumerate() {
            for i in 1..=c.nodes {
                st.create_node(ci, i)?;
            }
        }
        st.write_clustermesh_configs()?;
        st.write_kvstore_configs()?;
        for ci in 0..st.clusters.len() {
            st.wait_etcd(ci, Duration::from_secs(30))?;
        }
        // Pods are wired while the etcd-inits run; clients start only once every etcd is in its final auth
        // state: a client connected while auth goes on sees `revision of auth store is old` and reconnects.
        let inits = st.start_etcd_inits()?;
        println!("lab: wiring pods while etcd users, roles and auth are set up");
        for ci in 0..st.clusters.len() {
            st.sync_pods(ci)?;
            st.write_manifests(ci)?;
        }
        st.finish_etcd_inits(inits)?;
        st.init_hub(Duration::from_secs(30))?;
        println!("lab: starting clustermesh-apiservers and agents");
        for ci in 0..st.clusters.len() {
            st.start_apiserver(ci)?;
            for ni in 0..st.clusters[ci].nodes.len() {
                st.start_agent(ci, ni)?;
            }
        }
        println!("lab: waiting for the mesh to converge");
        let t = st.wait_converged(timeout)?;
        println!("lab: converged {:.1}s after the agents started", t.as_secs_f64());
        Ok(())
    })();
    if let Err(e) = result {
        return Err(e.context(format!(
            "lab up failed; the lab is left as it is for inspection (logs in {}); remove it with `cargo xtask lab down`",
            dir.join("logs").display()
        )));
    }
    Ok(st)
}

pub fn down(dir: &Path) -> Result<()> {
    let _lock = LabLock::acquire(dir)?;
    let mut st = LabState::load(dir)?.unwrap_or_else(|| LabState {
        lab_dir: dir.to_owned(),
        prefix: prefix_for(dir),
        topology: PathBuf::new(),
        clusters: Vec::new(),
        netns: Vec::new(),
        procs: Vec::new(),
        stopped: Vec::new(),
        hub: None,
    });
    let (np, nn) = (st.procs.len(), st.netns.len());
    st.teardown();
    std::fs::remove_file(LabState::path(dir)).or_else(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            Ok(())
        } else {
            Err(e)
        }
    })?;
    println!(
        "lab: down ({np} processes stopped, {nn} network namespaces removed; logs kept in {})",
        dir.join("logs").display()
    );
    Ok(())
}

/// The network namespaces of the lab in `dir` (found by its prefix, so also after a crash).
pub fn namespaces(dir: &Path) -> Vec<String> {
    let mut n = net::netns_with_prefix(&format!("{}-", prefix_for(dir)));
    n.sort();
    n
}

pub fn exec(dir: &Path, pod: &str, command: &[String]) -> Result<i32> {
    let st = LabState::load_running(dir)?;
    let p = find_pod(&st, pod)?;
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net=/run/netns/{}", p.netns))
        .arg("--")
        .args(command);
    let status = cmd
        .status()
        .with_context(|| format!("running {}", util::cmdline(&cmd)))?;
    Ok(status.code().unwrap_or(1))
}

fn find_pod<'a>(st: &'a LabState, pod: &str) -> Result<&'a PodRt> {
    let parts: Vec<&str> = pod.split('/').collect();
    let [cluster, ns, name] = parts[..] else {
        bail!("{pod:?}: expected CLUSTER/NAMESPACE/POD")
    };
    let c = &st.clusters[st.cluster(cluster)?];
    c.pods.get(&format!("{ns}/{name}")).with_context(|| {
        format!(
            "no pod {ns}/{name} in cluster {cluster} (pods: {})",
            c.pods.keys().cloned().collect::<Vec<_>>().join(", ")
        )
    })
}

pub fn apply(dir: &Path, cluster: &str, file: &Path, delete: bool) -> Result<()> {
    let _lock = LabLock::acquire(dir)?;
    let mut st = LabState::load_running(dir)?;
    let ci = st.cluster(cluster)?;
    let docs = topology::read_docs(file)?;
    let mut files = st.clusters[ci].files.clone();
    if delete {
        let keys: BTreeSet<topology::ObjectKey> = docs.iter().map(topology::object_key).collect();
        for d in files.values_mut() {
            d.retain(|d| !keys.contains(&topology::object_key(d)));
        }
        files.retain(|_, d| !d.is_empty());
    } else {
        validate_files(&[file.to_owned()])?;
        let base = file
            .file_name()
            .and_then(|n| n.to_str())
            .context("file has no name")?
            .to_owned();
        if base == NODES_FILE {
            bail!(
                "{}: the file name {NODES_FILE} is reserved for the lab's Node objects",
                file.display()
            );
        }
        // Like `kubectl apply`: an object that exists (in any file) is updated in place, a new one is added
        // under this file's name; nothing is deleted.
        for doc in docs {
            let key = topology::object_key(&doc);
            let existing = files
                .values_mut()
                .flat_map(|d| d.iter_mut())
                .find(|d| topology::object_key(d) == key);
            match existing {
                Some(slot) => *slot = doc,
                None => files.entry(base.clone()).or_default().push(doc),
            }
        }
    }
    let nodes: Vec<String> = st.clusters[ci].nodes.iter().map(|n| n.name.clone()).collect();
    let c = Cluster {
        name: st.clusters[ci].name.clone(),
        id: st.clusters[ci].id,
        pod_cidr: st.clusters[ci].pod_cidr,
        service_cidr: st.clusters[ci].service_cidr,
        nodes: 0,
        labels: st.clusters[ci].labels.clone(),
        encryption: st.clusters[ci].encryption.clone().unwrap_or_else(|| "off".into()),
        files: Vec::new(),
    };
    topology::check_docs(&c, &files, &nodes)?;
    st.clusters[ci].files = files;
    st.sync_pods(ci)?;
    st.write_manifests(ci)?;
    let t = st.wait_converged(Duration::from_secs(60))?;
    println!(
        "lab: {} {} in cluster {cluster}; converged in {} ms",
        if delete { "deleted" } else { "applied" },
        file.display(),
        t.as_millis()
    );
    Ok(())
}

pub fn add_node(dir: &Path, cluster: &str) -> Result<()> {
    let _lock = LabLock::acquire(dir)?;
    let mut st = LabState::load_running(dir)?;
    let ci = st.cluster(cluster)?;
    let started = Instant::now();
    let index = st.clusters[ci].nodes.iter().map(|n| n.index).max().unwrap_or(0) + 1;
    anyhow::ensure!(
        index <= topology::MAX_NODES,
        "cluster {cluster} already has {} nodes",
        topology::MAX_NODES
    );
    st.create_node(ci, index)?;
    st.write_manifests(ci)?;
    let ni = st.clusters[ci].nodes.len() - 1;
    st.start_agent(ci, ni)?;
    let t = st.wait_converged(Duration::from_secs(60))?;
    let n = &st.clusters[ci].nodes[ni];
    println!(
        "lab: node {} added (underlay {}, pod CIDR {}); every agent of the mesh had its route {} ms after the add began ({} ms of waiting)",
        n.name,
        n.underlay_ip,
        n.pod_cidr,
        started.elapsed().as_millis(),
        t.as_millis()
    );
    Ok(())
}

pub fn status(dir: &Path, as_json: bool) -> Result<()> {
    let st = LabState::load_running(dir)?;
    let agent = |n: &NodeRt| -> Value {
        net::http_get_unix(&n.socket, "/v1/status")
            .ok()
            .and_then(|b| serde_json::from_str(&b).ok())
            .unwrap_or(Value::Null)
    };
    let clusters: Vec<Value> = st
        .clusters
        .iter()
        .map(|c| {
            json!({
                "name": c.name,
                "id": c.id,
                "podCIDR": c.pod_cidr.to_string(),
                "etcd": format!("https://{}:{ETCD_PORT}", c.etcd_ip),
                "nodes": c.nodes.iter().map(|n| {
                    let a = agent(n);
                    json!({
                        "name": n.name,
                        "underlayIP": n.underlay_ip.to_string(),
                        "podCIDR": n.pod_cidr.to_string(),
                        "netns": n.netns,
                        "agentSocket": n.socket,
                        "agentReady": a["ready"],
                        "remoteClusters": a["remoteClusters"].as_array().into_iter().flatten().map(|r| json!({
                            "name": r["name"], "state": r["state"]["state"], "nodes": r["nodes"].as_object().map_or(0, serde_json::Map::len),
                            "identities": r["identityCount"], "ips": r["ipCount"],
                        })).collect::<Vec<_>>(),
                        // This cluster's identities and ips as the agent reads them from its own etcd.
                        "ownCluster": a.get("ownCluster").map(|o| json!({
                            "state": o["state"]["state"], "identities": o["identityCount"], "ips": o["ipCount"],
                        })),
                    })
                }).collect::<Vec<_>>(),
                "pods": c.pods.values().map(|p| json!({
                    "namespace": p.namespace, "name": p.name, "ip": p.ip.to_string(), "node": p.node, "netns": p.netns,
                    "ports": p.ports.iter().map(|(n, proto)| format!("{n}/{proto}")).collect::<Vec<_>>(),
                })).collect::<Vec<_>>(),
                "services": c.service_ips.iter().map(|(k, ip)| json!({"name": k, "clusterIP": ip.to_string()})).chain(
                    c.files.values().flatten().filter(|d| d["kind"] == "Service" && d["spec"]["clusterIP"].is_string()).map(|d| {
                        let (_, ns, name) = topology::object_key(d);
                        json!({"name": format!("{ns}/{name}"), "clusterIP": d["spec"]["clusterIP"]})
                    })
                ).collect::<Vec<_>>(),
            })
        })
        .collect();
    let out = json!({"labDir": st.lab_dir, "topology": st.topology, "underlayNetns": st.ul(), "clusters": clusters});
    if as_json {
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!(
        "lab {} (topology {})",
        st.lab_dir.display(),
        st.topology.display()
    );
    for c in out["clusters"].as_array().into_iter().flatten() {
        println!(
            "\ncluster {} (id {}, podCIDR {}, etcd {})",
            c["name"].as_str().unwrap_or(""),
            c["id"],
            c["podCIDR"].as_str().unwrap_or(""),
            c["etcd"].as_str().unwrap_or("")
        );
        println!(
            "  {:<20} {:<15} {:<16} {:<6} remote clusters",
            "NODE", "UNDERLAY", "POD CIDR", "READY"
        );
        for n in c["nodes"].as_array().into_iter().flatten() {
            let remotes: Vec<String> = n["remoteClusters"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|r| {
                    format!(
                        "{}={}({} nodes)",
                        r["name"].as_str().unwrap_or("?"),
                        r["state"].as_str().unwrap_or("?"),
                        r["nodes"]
                    )
                })
                .collect();
            println!(
                "  {:<20} {:<15} {:<16} {:<6} {}",
                n["name"].as_str().unwrap_or(""),
                n["underlayIP"].as_str().unwrap_or(""),
                n["podCIDR"].as_str().unwrap_or(""),
                n["agentReady"],
                remotes.join(" ")
            );
        }
        println!("  {:<30} {:<15} {:<20} ports", "POD", "IP", "NODE");
        for p in c["pods"].as_array().into_iter().flatten() {
            println!(
                "  {:<30} {:<15} {:<20} {}",
                format!(
                    "{}/{}",
                    p["namespace"].as_str().unwrap_or(""),
                    p["name"].as_str().unwrap_or("")
                ),
                p["ip"].as_str().unwrap_or(""),
                p["node"].as_str().unwrap_or(""),
                p["ports"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_str)
                    .collect::<Vec<_>>()
                    .join(",")
            );
        }
        for s in c["services"].as_array().into_iter().flatten() {
            println!(
                "  service {:<30} clusterIP {}",
                s["name"].as_str().unwrap_or(""),
                s["clusterIP"].as_str().unwrap_or("")
            );
        }
    }
    Ok(())
}

/// A daemon of the lab, as `lab restart` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Daemon {
    /// A node's mesh-agent (name a node).
    Agent,
    /// A cluster's clustermesh-apiserver (name a cluster).
    Apiserver,
    /// A cluster's etcd (name a cluster), or a member of the fleet hub (`hub-1`, ...).
    Etcd,
}

/// Restarts a daemon: SIGTERM (or SIGKILL with `kill`), wait until it is gone, start it again with the same
/// command. Returns how long the process was away.
/// The process role of a daemon: `agent-<node>`, `etcd-<cluster>`, `apiserver-<cluster>`.
fn daemon_role(st: &LabState, daemon: Daemon, name: &str) -> Result<String> {
    Ok(match daemon {
        Daemon::Agent => {
            st.clusters
                .iter()
                .flat_map(|c| &c.nodes)
                .find(|n| n.name == name)
                .with_context(|| format!("no node {name:?} in the lab"))?;
            format!("agent-{name}")
        }
        Daemon::Etcd
            if st
                .hub
                .as_ref()
                .is_some_and(|h| (1..=h.members.len()).any(|i| name == format!("hub-{i}"))) =>
        {
            format!("etcd-{name}")
        }
        Daemon::Apiserver | Daemon::Etcd => {
            st.cluster(name)?;
            format!(
                "{}-{name}",
                if daemon == Daemon::Etcd {
                    "etcd"
                } else {
                    "apiserver"
                }
            )
        }
    })
}

/// Stops a running daemon (SIGTERM, or SIGKILL with `kill`) and waits until it is gone; returns its record.
fn stop_daemon(st: &mut LabState, role: &str, kill: bool) -> Result<Proc> {
    let proc = st
        .procs
        .iter()
        .rev()
        .find(|p| p.role == role)
        .cloned()
        .with_context(|| format!("no running process {role}"))?;
    anyhow::ensure!(
        proc.spawn.is_some(),
        "{role} was started by an older lab; run lab down/up"
    );
    let marker = st.marker();
    if kill {
        net::kill_now(proc.pid, &marker);
    } else {
        net::stop_processes(&[proc.pid], &marker, Duration::from_secs(10));
    }
    // Until it has closed its files, not merely until its command line is gone: the restarted daemon binds the
    // same ports.
    net::wait_for(&format!("{role} to exit"), Duration::from_secs(10), || {
        if net::has_exited(proc.pid) {
            Ok(())
        } else {
            Err("still running".to_owned())
        }
    })?;
    st.procs.retain(|p| p.pid != proc.pid);
    Ok(proc)
}

pub fn restart(dir: &Path, daemon: Daemon, name: &str, kill: bool) -> Result<Duration> {
    let _lock = LabLock::acquire(dir)?;
    let mut st = LabState::load_running(dir)?;
    let role = daemon_role(&st, daemon, name)?;
    let started = Instant::now();
    let proc = stop_daemon(&mut st, &role, kill)?;
    let spec = proc.spawn.context("no spawn spec")?;
    st.spawn(&role, &spec.netns, &spec.program, &spec.args)?;
    let away = started.elapsed();
    println!(
        "lab: {} {role} and started it again ({} ms)",
        if kill { "killed" } else { "stopped" },
        away.as_millis()
    );
    Ok(away)
}

/// `lab stop`: stops a daemon and keeps it stopped (the rest of the lab goes on) until `lab start`.
pub fn stop(dir: &Path, daemon: Daemon, name: &str, kill: bool) -> Result<()> {
    let _lock = LabLock::acquire(dir)?;
    let mut st = LabState::load_running(dir)?;
    let role = daemon_role(&st, daemon, name)?;
    let proc = stop_daemon(&mut st, &role, kill)?;
    st.stopped.retain(|p| p.role != role);
    st.stopped.push(proc);
    st.save()?;
    println!(
        "lab: {} {role}; `lab start` starts it again",
        if kill { "killed" } else { "stopped" }
    );
    Ok(())
}

/// `lab start`: starts a daemon that `lab stop` stopped.
pub fn start(dir: &Path, daemon: Daemon, name: &str) -> Result<()> {
    let _lock = LabLock::acquire(dir)?;
    let mut st = LabState::load_running(dir)?;
    let role = daemon_role(&st, daemon, name)?;
    let i = st
        .stopped
        .iter()
        .position(|p| p.role == role)
        .with_context(|| format!("{role} was not stopped with `lab stop`"))?;
    let proc = st.stopped.remove(i);
    let spec = proc.spawn.context("no spawn spec")?;
    st.spawn(&role, &spec.netns, &spec.program, &spec.args)?;
    println!("lab: started {role} again");
    Ok(())
}

/// Takes a cluster off the underlay (`cut == true`) or puts it back: its nodes' links to the underlay bridge go
/// down, and its etcd address leaves the bridge, so peers can reach neither its pods nor its kvstore. The cluster
/// itself keeps working (its apiserver talks to its etcd over loopback).
pub fn cut(dir: &Path, cluster: &str, cut: bool) -> Result<()> {
    let _lock = LabLock::acquire(dir)?;
    let st = LabState::load_running(dir)?;
    let c = &st.clusters[st.cluster(cluster)?];
    let ul = st.ul();
    let state = if cut { "down" } else { "up" };
    for n in &c.nodes {
        net::ip_in(&ul, &["link", "set", &format!("u{}n{}", c.id, n.index), state])?;
    }
    let addr = format!("{}/10", c.etcd_ip);
    let present = net::ip_in(&ul, &["-o", "addr", "show", "dev", "br0"])?.contains(&format!("{addr} "));
    if cut && present {
        net::ip_in(&ul, &["addr", "del", &addr, "dev", "br0"])?;
    } else if !cut && !present {
        net::ip_in(&ul, &["addr", "add", &addr, "dev", "br0"])?;
    }
    println!(
        "lab: cluster {cluster} {}",
        if cut { "cut off the underlay" } else { "restored" }
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_and_ports_stay_apart_up_to_the_largest_cluster_id() {
        let max = topology::MAX_CLUSTER_ID;
        let mut etcds = std::collections::BTreeSet::new();
        let mut ports = std::collections::BTreeSet::new();
        for id in 1..=max {
            let ip = etcd_ip(id);
            assert!(etcds.insert(ip), "etcd address {ip} of id {id} is taken");
            assert!(ip.octets()[..2] == [100, 64], "{ip}");
            assert!(ip != hub_ip(1) && ip != hub_ip(2) && ip != hub_ip(3));
            let port = local_etcd_port(id);
            assert!(
                ports.insert(port) && port < 32768 && port != ETCD_PORT,
                "{id}: {port}"
            );
        }
        // Nodes of the edge ids: inside the underlay /10, apart from each other and from every etcd and hub member.
        let mut nodes = std::collections::BTreeSet::new();
        for id in [1, 2, 255, 256, 2048, max - 1, max] {
            for index in [1, 2, topology::MAX_NODES] {
                let ip = node_ip(id, index);
                let [a, b, ..] = ip.octets();
                assert!(a == 100 && (64..128).contains(&b), "{ip}");
                assert!(!etcds.contains(&ip) && ip != hub_ip(1), "{ip}");
                assert!(nodes.insert(ip), "node address {ip} of id {id} is taken");
            }
            // Interface names fit IFNAMSIZ (15 characters).
            assert!(format!("u{id}n{}", topology::MAX_NODES).len() <= 15);
        }
        assert_eq!(node_ip(max, 1), Ipv4Addr::new(100, 80, 255, 1));
        assert_eq!(etcd_ip(max), Ipv4Addr::new(100, 64, 15, 255));
    }
}
