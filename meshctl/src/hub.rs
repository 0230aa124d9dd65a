//! `meshctl clustermesh hub`: a fleet hub, one etcd cluster every cluster publishes into and reads its peers from
//! (docs/fleet-hub.md).
//!
//! - [`create`]: the hub's own CA, one server certificate per member, an admin certificate and `hub.yaml` (the
//!   members' client and peer URLs), in the hub folder.
//! - [`init`]: on the hub's etcd, as `admin-hub`: role `hub-reader` (read on `<prefix>/`), users `root` and
//!   `admin-hub` (role root), then `auth enable` (idempotent).
//! - [`join`]: one cluster: its certificates for the hub (`hub-apiserver-<cluster>`, which may write under
//!   `<prefix>/clusters/<cluster>/` only and read the rest; `hub-reader-<cluster>` for its agents and mirrors, read
//!   only), its etcd user and role in the hub, the apiserver's `--hub-config` file, and the cluster's entry in the
//!   hub folder (`clusters/<cluster>.yaml`), which keeps names and ids unique in the hub.
//! - [`connect`]: a cluster's agents' peer files for every other cluster that joined the hub: the hub's members as
//!   endpoints and `prefix: <prefix>/clusters/<peer>`, read with the cluster's `hub-reader` certificate.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, bail, ensure};
use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, KeyPair, KeyUsagePurpose};
use serde::{Deserialize, Serialize};

use crate::clustermesh::{
    CA_CERT, CLUSTER_FILE, PEER_TLS_SUFFIX, PeerConfig, PeerInfo, abs, already_exists, connected_peers,
    create_ca, create_out_dir, load_issuer, tls_options, validity, write_file,
};

/// The hub folder's description of the hub.
pub const HUB_FILE: &str = "hub.yaml";
/// The folder of the hub folder that lists the clusters that joined.
pub const CLUSTERS_DIR: &str = "clusters";
/// The apiserver's `--hub-config` file in a cluster's hub folder.
pub const HUB_CONFIG: &str = "hub-config.yaml";
/// The etcd role every cluster's reader certificate has in the hub.
pub const READER_ROLE: &str = "hub-reader";
/// The hub's admin user (root role).
pub const ADMIN_USER: &str = "admin-hub";
/// Client port of the hub members.
pub const CLIENT_PORT: u16 = 2379;
/// Peer (raft) port of the hub members.
pub const PEER_PORT: u16 = 2380;

/// One member of the hub's etcd.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Member {
    /// etcd `--name`: `hub-<i>`.
    pub name: String,
    pub client_url: String,
    pub peer_url: String,
}

/// `hub.yaml` of the hub folder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HubInfo {
    pub members: Vec<Member>,
}

impl HubInfo {
    /// Reads `HUB/hub.yaml`.
    ///
    /// # Errors
    /// Missing or malformed file.
    pub fn read(hub: &Path) -> Result<Self> {
        let p = hub.join(HUB_FILE);
        let text = std::fs::read_to_string(&p).with_context(|| {
            format!(
                "reading {} (is {} a folder made by `meshctl clustermesh hub create`?)",
                p.display(),
                hub.display()
            )
        })?;
        let info: Self =
            mesh_model::yaml::from_str(&text).with_context(|| format!("parsing {}", p.display()))?;
        ensure!(!info.members.is_empty(), "{}: members is empty", p.display());
        Ok(info)
    }

    #[must_use]
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(|m| m.client_url.clone()).collect()
    }

    /// etcd's `--initial-cluster` for the members.
    #[must_use]
    pub fn initial_cluster(&self) -> String {
        self.members
            .iter()
            .map(|m| format!("{}={}", m.name, m.peer_url))
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// Certificate file stems of a member: `member-<i>` (1-based).
#[must_use]
pub fn member_stem(i: usize) -> String {
    format!("member-{i}")
}

fn host(ip: &IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("[{v6}]"),
    }
}

/// Signs a certificate with CN `cn` (and `sans` for a server) and writes `DIR/<stem>.crt`, `.key`.
fn issue(
    issuer: &rcgen::Issuer<'static, KeyPair>,
    dir: &Path,
    stem: &str,
    cn: &str,
    sans: Option<Vec<String>>,
    days: u32,
) -> Result<()> {
    let server = sans.is_some();
    let mut params = match sans {
        Some(s) => CertificateParams::new(s).context("not a valid IP address or DNS name")?,
        None => CertificateParams::default(),
    };
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, cn);
    params
        .distinguished_name
        .push(DnType::OrganizationName, "fleetmesh");
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    // Members dial each other (raft over TLS) and themselves (grpc-gateway) with their server certificate.
    params.extended_key_usages = if server {
        vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ]
    } else {
        vec![ExtendedKeyUsagePurpose::ClientAuth]
    };
    params.use_authority_key_identifier_extension = true;
    (params.not_before, params.not_after) = validity(days)?;
    let key = KeyPair::generate().context("generating a key")?;
    let cert = params
        .signed_by(&key, issuer)
        .with_context(|| format!("signing the {stem} certificate"))?;
    write_file(
        &dir.join(format!("{stem}.key")),
        key.serialize_pem().as_bytes(),
        0o600,
    )?;
    write_file(&dir.join(format!("{stem}.crt")), cert.pem().as_bytes(), 0o644)?;
    Ok(())
}

/// Makes a hub folder: its CA, a server certificate per member (`member-<i>.crt`, SANs the members' addresses and
/// the extra names), `admin.crt` (CN `admin-hub`) and `hub.yaml`.
///
/// # Errors
/// No members, existing files (without `force`), write errors.
pub fn create(
    out: &Path,
    member_ips: &[IpAddr],
    names: &[String],
    days: u32,
    force: bool,
) -> Result<HubInfo> {
    ensure!(
        !member_ips.is_empty(),
        "give each hub member's address with --member-ip (3 members keep quorum when one is lost)"
    );
    for (i, ip) in member_ips.iter().enumerate() {
        ensure!(
            !member_ips[..i].contains(ip),
            "--member-ip {ip} is given twice: every member needs an address of its own"
        );
    }
    create_out_dir(out, &[out.join(HUB_FILE), out.join(CA_CERT)], force)?;
    create_ca(out, "fleet hub", days.max(3650), true)?;
    let (_, issuer) = load_issuer(out)?;
    let mut members = Vec::new();
    for (i, ip) in member_ips.iter().enumerate() {
        let stem = member_stem(i + 1);
        // Every member's address: etcd checks a peer's client certificate against the connection's source
        // address, which is the dialed member's own on a shared host.
        let sans = std::iter::once(ip.to_string())
            .chain(member_ips.iter().filter(|m| *m != ip).map(ToString::to_string))
            .chain(["127.0.0.1".to_owned()])
            .chain(names.iter().cloned())
            .collect();
        issue(
            &issuer,
            out,
            &stem,
            &format!("etcd-hub-{}", i + 1),
            Some(sans),
            days,
        )?;
        members.push(Member {
            name: format!("hub-{}", i + 1),
            client_url: format!("https://{}:{CLIENT_PORT}", host(ip)),
            peer_url: format!("https://{}:{PEER_PORT}", host(ip)),
        });
    }
    issue(&issuer, out, "admin", ADMIN_USER, None, days)?;
    let info = HubInfo { members };
    write_file(
        &out.join(HUB_FILE),
        mesh_model::yaml::to_string(&info)?.as_bytes(),
        0o644,
    )?;
    std::fs::create_dir_all(out.join(CLUSTERS_DIR))?;
    Ok(info)
}

async fn admin_client(hub: &Path, endpoints: &[String]) -> Result<etcd_client::Client> {
    let tls = tls_options(&hub.join(CA_CERT), &hub.join("admin.crt"), &hub.join("admin.key"))?;
    let opts = etcd_client::ConnectOptions::new()
        .with_connect_timeout(std::time::Duration::from_secs(2))
        .with_timeout(std::time::Duration::from_secs(5))
        .with_tls(tls);
    etcd_client::Client::connect(endpoints, Some(opts))
        .await
        .with_context(|| format!("connecting to the hub at {}", endpoints.join(",")))
}

fn tolerate(r: Result<(), etcd_client::Error>, what: &str, endpoints: &[String]) -> Result<()> {
    match r {
        Ok(()) => Ok(()),
        Err(e) if already_exists(&e) => Ok(()),
        Err(e) => Err(anyhow::Error::new(e).context(format!("{what} (on {})", endpoints.join(",")))),
    }
}

fn root_of(prefix: &str) -> Result<String> {
    let p = prefix.trim_end_matches('/');
    ensure!(
        !p.is_empty() && !p.starts_with('/'),
        "--prefix {prefix:?} is not a key prefix like fleetmesh"
    );
    Ok(format!("{p}/"))
}

/// Sets up the hub's etcd (see the module documentation). Idempotent.
///
/// # Errors
/// Connection or permission errors, with the step that failed.
pub async fn init(hub: &Path, prefix: &str) -> Result<()> {
    let info = HubInfo::read(hub)?;
    let eps = info.endpoints();
    let root = root_of(prefix)?;
    let mut c = admin_client(hub, &eps).await?;
    for role in ["root", READER_ROLE] {
        tolerate(
            c.role_add(role).await.map(drop),
            &format!("adding role {role}"),
            &eps,
        )?;
    }
    tolerate(
        c.role_grant_permission(
            READER_ROLE,
            etcd_client::Permission::read(root.as_str()).with_prefix(),
        )
        .await
        .map(drop),
        "granting read to role hub-reader",
        &eps,
    )?;
    let no_pwd = || Some(etcd_client::UserAddOptions::new().with_no_pwd());
    for user in ["root", ADMIN_USER] {
        tolerate(
            c.user_add(user, "", no_pwd()).await.map(drop),
            &format!("adding user {user}"),
            &eps,
        )?;
        tolerate(
            c.user_grant_role(user, "root").await.map(drop),
            &format!("granting role root to user {user}"),
            &eps,
        )?;
    }
    c.auth_enable()
        .await
        .with_context(|| format!("enabling auth on the hub at {}", eps.join(",")))?;
    Ok(())
}

/// The etcd user of a cluster's apiserver in the hub (its certificate's CN).
#[must_use]
pub fn apiserver_user(cluster: &str) -> String {
    format!("hub-apiserver-{cluster}")
}

/// The etcd user of a cluster's agents and mirrors in the hub.
#[must_use]
pub fn reader_user(cluster: &str) -> String {
    format!("hub-reader-{cluster}")
}

/// The clusters that joined the hub, from `HUB/clusters/*.yaml`.
///
/// # Errors
/// Unreadable or malformed entries.
pub fn joined(hub: &Path) -> Result<Vec<PeerInfo>> {
    let dir = hub.join(CLUSTERS_DIR);
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e).with_context(|| format!("reading {}", dir.display())),
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.extension().is_none_or(|x| x != "yaml") {
            continue;
        }
        let text = std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
        out.push(mesh_model::yaml::from_str(&text).with_context(|| format!("parsing {}", p.display()))?);
    }
    out.sort_by(|a: &PeerInfo, b| a.name.cmp(&b.name));
    Ok(out)
}

/// What [`join`] makes for one cluster.
#[derive(Debug, Clone)]
pub struct JoinSpec {
    pub cluster: String,
    pub id: u16,
    pub prefix: String,
    pub days: u32,
    /// Replace a cluster of the same name (another id) that joined already.
    pub replace: bool,
    /// The cluster's labels (pinned in the other clusters' peer files by [`connect`]).
    pub labels: BTreeMap<String, String>,
}

/// Joins a cluster to the hub: certificates, its hub user and role, its apiserver's `--hub-config` (`OUT/`), its
/// entry in the hub folder. Returns the path of the `--hub-config` file.
///
/// # Errors
/// Bad name or id, a name or id another joined cluster has, unreadable hub folder, hub errors.
pub async fn join(hub: &Path, spec: &JoinSpec, out: &Path) -> Result<PathBuf> {
    let c = &spec.cluster;
    mesh_model::ClusterName::new(c).map_err(|e| anyhow::anyhow!("--cluster: {e}"))?;
    ensure!(
        (1..=4095).contains(&spec.id),
        "--cluster-id {} is not in 1..=4095",
        spec.id
    );
    let info = HubInfo::read(hub)?;
    let root = root_of(&spec.prefix)?;
    for other in joined(hub)? {
        if other.name != *c && other.id == spec.id {
            bail!(
                "cluster {:?} has id {} in the hub already ({}): cluster ids must be unique in the hub; nothing was \
                 changed",
                other.name,
                other.id,
                hub.join(CLUSTERS_DIR).display()
            );
        }
        if other.name == *c && other.id != spec.id && !spec.replace {
            bail!(
                "a cluster named {c:?} with id {} joined the hub already; refusing another cluster of that name (id \
                 {}); nothing was changed (pass --replace to replace it)",
                other.id,
                spec.id
            );
        }
    }
    let (ca_pem, issuer) = load_issuer(hub)?;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    issue(&issuer, out, "apiserver", &apiserver_user(c), None, spec.days)?;
    issue(&issuer, out, "reader", &reader_user(c), None, spec.days)?;
    write_file(&out.join(CA_CERT), ca_pem.as_bytes(), 0o644)?;
    let meta = PeerInfo {
        name: c.clone(),
        id: spec.id,
        labels: spec.labels.clone(),
    };
    write_file(
        &out.join(CLUSTER_FILE),
        mesh_model::yaml::to_string(&meta)?.as_bytes(),
        0o644,
    )?;

    // The cluster's user in the hub: read/write below its own prefix, read on the rest.
    let eps = info.endpoints();
    let mut etcd = admin_client(hub, &eps).await?;
    let role = apiserver_user(c);
    let own = format!("{}/", mesh_kvstore::Keys::new(&root).hub_cluster_prefix(c));
    tolerate(
        etcd.role_add(role.as_str()).await.map(drop),
        &format!("adding role {role}"),
        &eps,
    )?;
    for perm in [
        etcd_client::Permission::read_write(own.as_str()).with_prefix(),
        etcd_client::Permission::read(root.as_str()).with_prefix(),
    ] {
        tolerate(
            etcd.role_grant_permission(role.as_str(), perm).await.map(drop),
            &format!("granting permissions to role {role}"),
            &eps,
        )?;
    }
    let no_pwd = || Some(etcd_client::UserAddOptions::new().with_no_pwd());
    for (user, r) in [
        (apiserver_user(c), role.clone()),
        (reader_user(c), READER_ROLE.to_owned()),
    ] {
        tolerate(
            etcd.user_add(user.as_str(), "", no_pwd()).await.map(drop),
            &format!("adding user {user}"),
            &eps,
        )?;
        tolerate(
            etcd.user_grant_role(user.as_str(), r.as_str()).await.map(drop),
            &format!("granting role {r} to user {user}"),
            &eps,
        )?;
    }

    let cfg = HubConfig {
        endpoints: eps,
        trusted_ca_file: abs(&out.join(CA_CERT))?,
        cert_file: abs(&out.join("apiserver.crt"))?,
        key_file: abs(&out.join("apiserver.key"))?,
        prefix: own.trim_end_matches('/').to_owned(),
    };
    let path = out.join(HUB_CONFIG);
    write_file(&path, mesh_model::yaml::to_string(&cfg)?.as_bytes(), 0o644)?;
    let entries = hub.join(CLUSTERS_DIR);
    std::fs::create_dir_all(&entries)?;
    write_file(
        &entries.join(format!("{c}.yaml")),
        mesh_model::yaml::to_string(&meta)?.as_bytes(),
        0o644,
    )?;
    Ok(path)
}

/// The apiserver's `--hub-config`: the peer file format, `prefix` being where the cluster publishes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct HubConfig {
    pub endpoints: Vec<String>,
    pub trusted_ca_file: PathBuf,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    pub prefix: String,
}

/// Writes a peer file (and `<peer>.tls/`) into `config_dir` for every cluster of the hub but the one of `certs`
/// (a folder made by [`join`]). Returns the files written.
///
/// # Errors
/// Unreadable folders, a peer with an id another cluster connected in `config_dir` has, write errors.
pub fn connect(
    hub: &Path,
    certs: &Path,
    config_dir: &Path,
    prefix: &str,
    pin_id: bool,
) -> Result<Vec<PathBuf>> {
    let me: PeerInfo = {
        let p = certs.join(CLUSTER_FILE);
        let text = std::fs::read_to_string(&p).with_context(|| {
            format!(
                "reading {} (is {} a folder made by `meshctl clustermesh hub join`?)",
                p.display(),
                certs.display()
            )
        })?;
        mesh_model::yaml::from_str(&text).with_context(|| format!("parsing {}", p.display()))?
    };
    let info = HubInfo::read(hub)?;
    let root = root_of(prefix)?;
    let keys = mesh_kvstore::Keys::new(&root);
    let connected = connected_peers(config_dir)?;
    std::fs::create_dir_all(config_dir).with_context(|| format!("creating {}", config_dir.display()))?;
    let mut written = Vec::new();
    for peer in joined(hub)?.into_iter().filter(|p| p.name != me.name) {
        ensure!(
            peer.id != me.id,
            "cluster {:?} has id {}, which is cluster {:?}'s own id: cluster ids must be unique in the hub",
            peer.name,
            peer.id,
            me.name
        );
        if let Some((other, _)) = connected
            .iter()
            .find(|(n, p)| **n != peer.name && p.id == peer.id)
        {
            bail!(
                "cluster {:?} has id {}, which cluster {other:?} (connected in {}) already uses; nothing more was \
                 changed",
                peer.name,
                peer.id,
                config_dir.display()
            );
        }
        let tls = config_dir.join(format!("{}{PEER_TLS_SUFFIX}", peer.name));
        std::fs::create_dir_all(&tls).with_context(|| format!("creating {}", tls.display()))?;
        let copy = |src: &Path, name: &str, mode: u32| -> Result<PathBuf> {
            let data = std::fs::read(src).with_context(|| format!("reading {}", src.display()))?;
            let dst = tls.join(name);
            write_file(&dst, &data, mode)?;
            abs(&dst)
        };
        let cfg = PeerConfig {
            endpoints: info.endpoints(),
            trusted_ca_file: copy(&certs.join(CA_CERT), CA_CERT, 0o644)?,
            cert_file: copy(&certs.join("reader.crt"), "client.crt", 0o644)?,
            key_file: copy(&certs.join("reader.key"), "client.key", 0o600)?,
            prefix: Some(keys.hub_cluster_prefix(&peer.name)),
            cluster_id: pin_id.then_some(peer.id),
            pod_cidrs: None,
            cluster_labels: (!peer.labels.is_empty()).then(|| peer.labels.clone()),
        };
        write_file(
            &tls.join(CLUSTER_FILE),
            mesh_model::yaml::to_string(&peer)?.as_bytes(),
            0o644,
        )?;
        let path = config_dir.join(&peer.name);
        write_file(&path, mesh_model::yaml::to_string(&cfg)?.as_bytes(), 0o644)?;
        written.push(path);
    }
    Ok(written)
}
