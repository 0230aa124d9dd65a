//! `meshctl clustermesh`: the material that secures the connections between clusters.
//!
//! - [`create_ca`]: one CA per mesh (`ca.crt`, `ca.key`); any CA given as PEM (PKCS#8 key) works as well.
//! - [`cluster_certs`]: per cluster, signed by that CA, into one folder:
//!
//!   | file | subject (CN) | used by |
//!   |---|---|---|
//!   | `etcd-server.crt/.key` | `etcd-<cluster>`, SANs: the given IPs and names | the cluster's etcd (`--cert-file`) |
//!   | `apiserver.crt/.key` | `clustermesh-apiserver-<cluster>` | the cluster's clustermesh-apiserver (read/write) |
//!   | `remote.crt/.key` | `remote-<cluster>` | peer clusters' agents (read only) |
//!   | `admin.crt/.key` | `admin-<cluster>` | `meshctl clustermesh etcd-init` (etcd root role) |
//!   | `ca.crt` | | everyone: the mesh CA |
//!   | `cluster.yaml` | | name, id and etcd endpoints of the cluster (read by `connect` and `etcd-init`) |
//!
//!   etcd maps a client certificate's CN to an etcd user when `--client-cert-auth` is on and auth is enabled. Every
//!   user name carries the cluster's name, so with one CA for the whole mesh the certificate of one cluster's
//!   apiserver (or admin) is nobody in another cluster's etcd.
//! - [`etcd_init`]: on the cluster's own etcd, as `admin-<cluster>`: users and roles, then `auth enable`
//!   (idempotent). Role `clustermesh-apiserver`: read/write on the key prefix; role `remote`: read on the key
//!   prefix; `root` (no password, no certificate is ever issued for it) and `admin-<cluster>` have the root role.
//! - [`connect`]: gives cluster A what it needs to read cluster B: copies B's CA and `remote` certificate into
//!   A's clustermesh config directory (`<B>.tls/`) and writes the file `<B>` with Cilium's etcd config keys
//!   (`endpoints`, `trusted-ca-file`, `cert-file`, `key-file`). Refuses B when it has A's name or id, or the id of
//!   another cluster A is already connected to.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, Result, bail, ensure};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use serde::{Deserialize, Serialize};

pub const CA_CERT: &str = "ca.crt";
pub const CA_KEY: &str = "ca.key";
pub const CLUSTER_FILE: &str = "cluster.yaml";
pub const DEFAULT_ETCD_PORT: u16 = 2379;
/// Suffix of the folder that holds a peer's TLS material in a clustermesh config directory (`<peer>.tls/`). The
/// agent skips folders, and a cluster name cannot contain a dot, so it never clashes with a peer's config file.
pub const PEER_TLS_SUFFIX: &str = ".tls";

/// The certificate/key pairs of a cluster folder, by role.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    EtcdServer,
    Apiserver,
    Remote,
    Admin,
}

impl Role {
    pub const ALL: [Role; 4] = [Role::EtcdServer, Role::Apiserver, Role::Remote, Role::Admin];

    #[must_use]
    pub fn file_stem(self) -> &'static str {
        match self {
            Role::EtcdServer => "etcd-server",
            Role::Apiserver => "apiserver",
            Role::Remote => "remote",
            Role::Admin => "admin",
        }
    }

    /// The certificate's CN, which etcd takes as the user name.
    #[must_use]
    pub fn common_name(self, cluster: &str) -> String {
        match self {
            Role::EtcdServer => format!("etcd-{cluster}"),
            Role::Apiserver => format!("clustermesh-apiserver-{cluster}"),
            Role::Remote => format!("remote-{cluster}"),
            Role::Admin => format!("admin-{cluster}"),
        }
    }

    #[must_use]
    pub fn cert(self, dir: &Path) -> PathBuf {
        dir.join(format!("{}.crt", self.file_stem()))
    }

    #[must_use]
    pub fn key(self, dir: &Path) -> PathBuf {
        dir.join(format!("{}.key", self.file_stem()))
    }
}

/// `cluster.yaml` of a cluster folder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClusterInfo {
    pub name: String,
    pub id: u16,
    pub endpoints: Vec<String>,
}

impl ClusterInfo {
    /// Reads `DIR/cluster.yaml`.
    ///
    /// # Errors
    /// Missing or malformed file.
    pub fn read(dir: &Path) -> Result<Self> {
        let p = dir.join(CLUSTER_FILE);
        let text = std::fs::read_to_string(&p).with_context(|| {
            format!(
                "reading {} (is {} a folder made by `meshctl clustermesh cluster-certs`?)",
                p.display(),
                dir.display()
            )
        })?;
        let info: Self =
            mesh_model::yaml::from_str(&text).with_context(|| format!("parsing {}", p.display()))?;
        mesh_model::ClusterName::new(&info.name)
            .map_err(|e| anyhow::anyhow!("{}: name: {e}", p.display()))?;
        ensure!(
            (1..=4095).contains(&info.id),
            "{}: id {} is not in 1..=4095",
            p.display(),
            info.id
        );
        ensure!(!info.endpoints.is_empty(), "{}: endpoints is empty", p.display());
        Ok(info)
    }
}

/// Metadata of a connected peer, kept in `<peer>.tls/cluster.yaml` of a clustermesh config directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PeerInfo {
    pub name: String,
    pub id: u16,
    /// The cluster labels the fleet admin gave it (`meshctl clustermesh hub join --label`): `hub connect` pins
    /// them in its peer files, and membership selectors match them.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

/// The config file an agent reads for one peer (Cilium's etcd config keys, and the pins of
/// [`mesh_kvstore::peer::RemoteConfig`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct PeerConfig {
    pub endpoints: Vec<String>,
    pub trusted_ca_file: PathBuf,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// Where the peer's records are in that etcd (a fleet hub: `<prefix>/clusters/<peer>`); default the reader's
    /// key prefix.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_id: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_cidrs: Option<Vec<ipnet::Ipv4Net>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_labels: Option<BTreeMap<String, String>>,
}

/// What `connect` pins in a peer's config file (docs/security.md, "Pinning a peer's grant"): the agents accept
/// from the peer only records with its pinned id and addresses inside its pinned pod CIDRs, and match its pinned
/// labels, whatever it publishes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pins {
    /// Pin each peer's id (as its `cluster.yaml` has it).
    pub id: bool,
    /// Pod CIDRs by peer name.
    pub pod_cidrs: BTreeMap<String, Vec<ipnet::Ipv4Net>>,
    /// Cluster labels by peer name.
    pub labels: BTreeMap<String, BTreeMap<String, String>>,
}

impl Pins {
    /// Checks that every pinned name is one of `peers`.
    ///
    /// # Errors
    /// A pin for a cluster that is not being connected.
    pub fn check(&self, peers: &[String]) -> Result<()> {
        for name in self.pod_cidrs.keys().chain(self.labels.keys()) {
            ensure!(
                peers.contains(name),
                "a pin names cluster {name:?}, which is not among the clusters to connect ({})",
                peers.join(", ")
            );
        }
        Ok(())
    }
}

/// Parses `PEER=CIDR` (for `--pod-cidr`).
///
/// # Errors
/// No `=`, or not a network address with a prefix length of 8 or more.
pub fn parse_pod_cidr_pin(s: &str) -> Result<(String, ipnet::Ipv4Net), String> {
    let (peer, cidr) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not PEER=CIDR, like west=10.2.0.0/16"))?;
    let net: ipnet::Ipv4Net = cidr
        .parse()
        .map_err(|e| format!("{cidr:?} is not a CIDR like 10.2.0.0/16: {e}"))?;
    if net.trunc() != net || net.prefix_len() < mesh_kvstore::grant::MIN_POD_CIDR_LEN {
        return Err(format!(
            "{cidr} is not a network of /{} or longer (like {})",
            mesh_kvstore::grant::MIN_POD_CIDR_LEN,
            net.trunc()
        ));
    }
    Ok((peer.to_owned(), net))
}

/// Parses `PEER=KEY=VALUE` (for `--peer-label`).
///
/// # Errors
/// Not of that shape, or not a valid label.
pub fn parse_label_pin(s: &str) -> Result<(String, (String, String)), String> {
    let (peer, label) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not PEER=KEY=VALUE, like west=stage=prod"))?;
    let kv = mesh_model::traffic::parse_label(label)?;
    Ok((peer.to_owned(), kv))
}

pub(crate) fn validity(days: u32) -> Result<(time::OffsetDateTime, time::OffsetDateTime)> {
    ensure!(days >= 1, "validity must be at least one day");
    let now = time::OffsetDateTime::now_utc();
    // A little slack for clocks that are slightly behind.
    Ok((
        now - time::Duration::hours(1),
        now + time::Duration::days(i64::from(days)),
    ))
}

pub(crate) fn write_file(path: &Path, contents: &[u8], mode: u32) -> Result<()> {
    let tmp = path.with_extension(format!(
        "{}.tmp",
        path.extension().and_then(|e| e.to_str()).unwrap_or("")
    ));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    // No fsync: it can take seconds on a busy disk, and the material is made again if a crash loses it.
    f.write_all(contents)
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}

pub(crate) fn create_out_dir(out: &Path, existing: &[PathBuf], force: bool) -> Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    if !force && let Some(p) = existing.iter().find(|p| p.exists()) {
        bail!(
            "{} exists already; refusing to overwrite it (pass --force to replace the material in {})",
            p.display(),
            out.display()
        );
    }
    Ok(())
}

/// Creates a CA for a mesh: `OUT/ca.crt`, `OUT/ca.key` (mode 0600).
///
/// # Errors
/// The files exist (without `force`), or cannot be written.
pub fn create_ca(out: &Path, name: &str, days: u32, force: bool) -> Result<()> {
    let (cert_path, key_path) = (out.join(CA_CERT), out.join(CA_KEY));
    create_out_dir(out, &[cert_path.clone(), key_path.clone()], force)?;
    let key = KeyPair::generate().context("generating the CA key")?;
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, format!("{name} clustermesh CA"));
    params
        .distinguished_name
        .push(DnType::OrganizationName, "fleetmesh");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    (params.not_before, params.not_after) = validity(days)?;
    let cert = params.self_signed(&key).context("signing the CA certificate")?;
    write_file(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
    write_file(&cert_path, cert.pem().as_bytes(), 0o644)?;
    Ok(())
}

/// What [`cluster_certs`] makes.
#[derive(Debug, Clone)]
pub struct ClusterSpec {
    pub cluster: String,
    pub id: u16,
    /// IP addresses of the etcd server (SANs, and the endpoints in `cluster.yaml` unless `endpoints` is given).
    pub server_ips: Vec<IpAddr>,
    /// DNS names of the etcd server (SANs).
    pub server_names: Vec<String>,
    pub etcd_port: u16,
    /// Endpoints peers use; default `https://<server ip>:<port>` for every server IP.
    pub endpoints: Vec<String>,
    pub days: u32,
}

pub(crate) fn load_issuer(ca_dir: &Path) -> Result<(String, Issuer<'static, KeyPair>)> {
    let (cert_path, key_path) = (ca_dir.join(CA_CERT), ca_dir.join(CA_KEY));
    let ca_pem = std::fs::read_to_string(&cert_path).with_context(|| {
        format!(
            "reading the CA certificate {} (create one with `meshctl clustermesh ca create --out {}`)",
            cert_path.display(),
            ca_dir.display()
        )
    })?;
    let key_pem = std::fs::read_to_string(&key_path)
        .with_context(|| format!("reading the CA key {}", key_path.display()))?;
    let key = KeyPair::from_pem(&key_pem).with_context(|| {
        format!(
            "{}: not a PEM private key (PKCS#8) rcgen can use",
            key_path.display()
        )
    })?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, key)
        .with_context(|| format!("{}: not a PEM CA certificate", cert_path.display()))?;
    Ok((ca_pem, issuer))
}

/// Makes the per-cluster material (see the module documentation) in `out`, signed by the CA in `ca_dir`.
///
/// # Errors
/// Bad name/id/addresses, unreadable CA, existing files (without `force`), write errors.
pub fn cluster_certs(ca_dir: &Path, spec: &ClusterSpec, out: &Path, force: bool) -> Result<ClusterInfo> {
    mesh_model::ClusterName::new(&spec.cluster).map_err(|e| anyhow::anyhow!("--cluster: {e}"))?;
    ensure!(
        (1..=4095).contains(&spec.id),
        "--cluster-id {} is not in 1..=4095",
        spec.id
    );
    ensure!(
        !spec.server_ips.is_empty() || !spec.server_names.is_empty(),
        "give the etcd server's addresses with --server-ip (and/or names with --server-name)"
    );
    let endpoints = if spec.endpoints.is_empty() {
        let hosts = spec
            .server_ips
            .iter()
            .map(|ip| match ip {
                IpAddr::V4(v4) => v4.to_string(),
                IpAddr::V6(v6) => format!("[{v6}]"),
            })
            .chain(spec.server_names.iter().cloned());
        hosts.map(|h| format!("https://{h}:{}", spec.etcd_port)).collect()
    } else {
        spec.endpoints.clone()
    };
    for e in &endpoints {
        ensure!(e.starts_with("https://"), "endpoint {e:?} is not an https:// URL");
    }
    let mut existing = vec![out.join(CA_CERT), out.join(CLUSTER_FILE)];
    existing.extend(Role::ALL.iter().flat_map(|r| [r.cert(out), r.key(out)]));
    let (ca_pem, issuer) = load_issuer(ca_dir)?;
    create_out_dir(out, &existing, force)?;
    let (not_before, not_after) = validity(spec.days)?;
    for role in Role::ALL {
        let mut params = if role == Role::EtcdServer {
            let sans: Vec<String> = spec
                .server_ips
                .iter()
                .map(ToString::to_string)
                .chain(spec.server_names.iter().cloned())
                .collect();
            CertificateParams::new(sans).context("--server-name: not a valid DNS name")?
        } else {
            CertificateParams::default()
        };
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, role.common_name(&spec.cluster));
        params
            .distinguished_name
            .push(DnType::OrganizationName, "fleetmesh");
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = if role == Role::EtcdServer {
            // etcd also dials itself (grpc-gateway) with its server certificate.
            vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ]
        } else {
            vec![ExtendedKeyUsagePurpose::ClientAuth]
        };
        params.use_authority_key_identifier_extension = true;
        params.not_before = not_before;
        params.not_after = not_after;
        let key = KeyPair::generate().context("generating a key")?;
        let cert = params
            .signed_by(&key, &issuer)
            .with_context(|| format!("signing the {} certificate", role.file_stem()))?;
        write_file(&role.key(out), key.serialize_pem().as_bytes(), 0o600)?;
        write_file(&role.cert(out), cert.pem().as_bytes(), 0o644)?;
    }
    write_file(&out.join(CA_CERT), ca_pem.as_bytes(), 0o644)?;
    let info = ClusterInfo {
        name: spec.cluster.clone(),
        id: spec.id,
        endpoints,
    };
    write_file(
        &out.join(CLUSTER_FILE),
        mesh_model::yaml::to_string(&info)?.as_bytes(),
        0o644,
    )?;
    Ok(info)
}

pub(crate) fn abs(p: &Path) -> Result<PathBuf> {
    std::path::absolute(p).with_context(|| format!("making {} absolute", p.display()))
}

/// Peers already connected in a clustermesh config directory (from their `<peer>.tls/cluster.yaml`).
pub(crate) fn connected_peers(config_dir: &Path) -> Result<BTreeMap<String, PeerInfo>> {
    let mut out = BTreeMap::new();
    let entries = match std::fs::read_dir(config_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e).with_context(|| format!("reading {}", config_dir.display())),
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(peer) = name.strip_suffix(PEER_TLS_SUFFIX) else {
            continue;
        };
        let p = entry.path().join(CLUSTER_FILE);
        let Ok(text) = std::fs::read_to_string(&p) else {
            continue;
        };
        let info: PeerInfo =
            mesh_model::yaml::from_str(&text).with_context(|| format!("parsing {}", p.display()))?;
        // Only peers whose config file is still there count (a removed peer frees its name and id).
        if config_dir.join(peer).is_file() {
            out.insert(peer.to_owned(), info);
        }
    }
    Ok(out)
}

/// Gives cluster `from` what it needs to read cluster `to`: writes `CONFIG_DIR/<to>` and `CONFIG_DIR/<to>.tls/`.
/// Returns the path of the config file.
///
/// # Errors
/// Same name or id as `from`, id used by another connected peer, a different cluster of the same name connected
/// already (unless `replace`), unreadable folders, write errors.
pub fn connect(from: &Path, to: &Path, config_dir: &Path, replace: bool, pins: &Pins) -> Result<PathBuf> {
    let a = ClusterInfo::read(from)?;
    let b = ClusterInfo::read(to)?;
    ensure!(
        a.name != b.name,
        "cannot connect cluster {:?} to itself ({} and {} are both cluster {:?})",
        a.name,
        from.display(),
        to.display(),
        b.name
    );
    ensure!(
        a.id != b.id,
        "cluster {:?} has id {}, which is cluster {:?}'s own id: cluster ids must be unique in the mesh",
        b.name,
        b.id,
        a.name
    );
    let peers = connected_peers(config_dir)?;
    if let Some((other, _)) = peers.iter().find(|(n, p)| **n != b.name && p.id == b.id) {
        bail!(
            "cluster {:?} has id {}, which cluster {other:?} (connected in {}) already uses: cluster ids must be \
             unique in the mesh; nothing was changed",
            b.name,
            b.id,
            config_dir.display()
        );
    }
    if let Some(p) = peers.get(&b.name)
        && p.id != b.id
        && !replace
    {
        bail!(
            "a cluster named {:?} with id {} is connected already in {}; refusing another cluster of that name \
             (id {}); nothing was changed (pass --replace to replace it)",
            b.name,
            p.id,
            config_dir.display(),
            b.id
        );
    }
    let tls = config_dir.join(format!("{}{PEER_TLS_SUFFIX}", b.name));
    std::fs::create_dir_all(&tls).with_context(|| format!("creating {}", tls.display()))?;
    let copy = |src: &Path, name: &str, mode: u32| -> Result<PathBuf> {
        let data = std::fs::read(src).with_context(|| format!("reading {}", src.display()))?;
        let dst = tls.join(name);
        write_file(&dst, &data, mode)?;
        abs(&dst)
    };
    let cfg = PeerConfig {
        endpoints: b.endpoints.clone(),
        trusted_ca_file: copy(&to.join(CA_CERT), CA_CERT, 0o644)?,
        cert_file: copy(&Role::Remote.cert(to), "client.crt", 0o644)?,
        key_file: copy(&Role::Remote.key(to), "client.key", 0o600)?,
        prefix: None,
        cluster_id: pins.id.then_some(b.id),
        pod_cidrs: pins.pod_cidrs.get(&b.name).cloned(),
        cluster_labels: pins.labels.get(&b.name).cloned(),
    };
    let meta = PeerInfo {
        labels: BTreeMap::new(),
        name: b.name.clone(),
        id: b.id,
    };
    write_file(
        &tls.join(CLUSTER_FILE),
        mesh_model::yaml::to_string(&meta)?.as_bytes(),
        0o644,
    )?;
    // The config file last: an agent that sees it finds everything it names.
    let path = config_dir.join(&b.name);
    write_file(&path, mesh_model::yaml::to_string(&cfg)?.as_bytes(), 0o644)?;
    Ok(path)
}

/// TLS options for an etcd client from PEM files.
///
/// # Errors
/// Unreadable files.
pub fn tls_options(ca: &Path, cert: &Path, key: &Path) -> Result<etcd_client::TlsOptions> {
    let read = |p: &Path| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
    Ok(etcd_client::TlsOptions::new()
        .ca_certificate(etcd_client::Certificate::from_pem(read(ca)?))
        .identity(etcd_client::Identity::from_pem(read(cert)?, read(key)?)))
}

/// Connects to an etcd with one role's certificate of a cluster folder.
///
/// # Errors
/// Unreadable files, connection errors.
pub async fn connect_etcd(dir: &Path, role: Role, endpoints: &[String]) -> Result<etcd_client::Client> {
    let tls = tls_options(&dir.join(CA_CERT), &role.cert(dir), &role.key(dir))?;
    let opts = etcd_client::ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(2))
        .with_timeout(Duration::from_secs(5))
        .with_tls(tls);
    etcd_client::Client::connect(endpoints, Some(opts))
        .await
        .with_context(|| format!("connecting to etcd at {}", endpoints.join(",")))
}

pub(crate) fn already_exists(e: &etcd_client::Error) -> bool {
    matches!(e, etcd_client::Error::GRpcStatus(s) if s.message().contains("already exists"))
}

/// Sets up users, roles and auth on a cluster's own etcd (see the module documentation). Idempotent: a second run
/// (auth on) works as `admin-<cluster>`.
///
/// # Errors
/// Connection or permission errors, with the step that failed.
pub async fn etcd_init(dir: &Path, endpoints: Option<&[String]>, prefix: &str) -> Result<()> {
    let info = ClusterInfo::read(dir)?;
    let endpoints = endpoints.unwrap_or(&info.endpoints);
    ensure!(!prefix.is_empty(), "--prefix must not be empty");
    let prefix = format!("{}/", prefix.trim_end_matches('/'));
    let mut c = connect_etcd(dir, Role::Admin, endpoints).await?;
    let admin = Role::Admin.common_name(&info.name);
    let apiserver = Role::Apiserver.common_name(&info.name);
    let remote = Role::Remote.common_name(&info.name);
    let no_pwd = || Some(etcd_client::UserAddOptions::new().with_no_pwd());
    let ok = |r: Result<(), etcd_client::Error>, what: &str| -> Result<()> {
        match r {
            Ok(()) => Ok(()),
            Err(e) if already_exists(&e) => Ok(()),
            Err(e) => Err(anyhow::Error::new(e).context(format!("{what} (on {})", endpoints.join(",")))),
        }
    };
    for role in ["root", "clustermesh-apiserver", "remote"] {
        ok(c.role_add(role).await.map(drop), &format!("adding role {role}"))?;
    }
    ok(
        c.role_grant_permission(
            "clustermesh-apiserver",
            etcd_client::Permission::read_write(prefix.as_str()).with_prefix(),
        )
        .await
        .map(drop),
        "granting read/write to role clustermesh-apiserver",
    )?;
    ok(
        c.role_grant_permission(
            "remote",
            etcd_client::Permission::read(prefix.as_str()).with_prefix(),
        )
        .await
        .map(drop),
        "granting read to role remote",
    )?;
    for (user, role) in [
        ("root", "root"),
        (admin.as_str(), "root"),
        (apiserver.as_str(), "clustermesh-apiserver"),
        (remote.as_str(), "remote"),
    ] {
        ok(
            c.user_add(user, "", no_pwd()).await.map(drop),
            &format!("adding user {user}"),
        )?;
        ok(
            c.user_grant_role(user, role).await.map(drop),
            &format!("granting role {role} to user {user}"),
        )?;
    }
    c.auth_enable()
        .await
        .with_context(|| format!("enabling auth on {}", endpoints.join(",")))?;
    Ok(())
}
