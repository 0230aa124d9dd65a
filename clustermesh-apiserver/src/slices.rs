//! EndpointSlices of headless imports (MCS API, KEP-1645), with `--source kubernetes` only: for a headless service
//! exported by peer clusters, this cluster's clustermesh-apiserver writes each exporting peer's ready backends as
//! `discovery.k8s.io/v1` EndpointSlices in the service's namespace, so that StatefulSet-style clients and
//! third-party tools that read EndpointSlices see the remote pods.
//!
//! * One writer per cluster: the clustermesh-apiserver (it already reads the peers' export records through
//!   `--mcs-peers`); for every headless export of a peer it also reads the peer's service record and backend
//!   slices of that service (`mesh_kvstore::decode_service`, `decode_backend_slice`).
//! * Slices are named `<service>.<cluster>.<n>` (unambiguous: neither name has a dot) and carry the labels
//!   `multicluster.kubernetes.io/service-name: <service>`, `multicluster.kubernetes.io/source-cluster: <cluster>`
//!   and `endpointslice.kubernetes.io/managed-by: endpointslice-controller.fleetmesh.io` ([`MANAGED_BY`]). They
//!   have no `kubernetes.io/service-name`: fleetmesh makes no derived Service, and naming a same-named local
//!   Service there would make kube-proxy (and this cluster's own publisher) count the remote pods as local
//!   backends.
//! * At most [`MAX_ENDPOINTS`] endpoints per slice (backends with the same ports share slices, in address order),
//!   at most [`MAX_SLICES`] slices per exporting cluster and service (the rest left out, logged).
//! * A slice is written only when what it should hold differs from what it holds (merge patch; created when
//!   missing); slices of ours that are no longer wanted (the export went, the peer went, fewer backends) are
//!   deleted. EndpointSlices without the managed-by label above are never touched, also when they have the name
//!   a slice of ours would have (that slice is then not written, logged).

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use anyhow::Context as _;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use mesh_kvstore::{BackendRecord, PortRecord};
use serde_json::{Value, json};
use tracing::{debug, info, warn};

/// `endpointslice.kubernetes.io/managed-by` of the EndpointSlices this controller writes (the EndpointSlice
/// controller's own is `endpointslice-controller.k8s.io`).
pub const MANAGED_BY: (&str, &str) = (
    "endpointslice.kubernetes.io/managed-by",
    "endpointslice-controller.fleetmesh.io",
);
/// The MCS API's label naming the imported service.
pub const LABEL_SERVICE: &str = "multicluster.kubernetes.io/service-name";
/// The MCS API's label naming the cluster the endpoints come from.
pub const LABEL_SOURCE_CLUSTER: &str = "multicluster.kubernetes.io/source-cluster";
/// Endpoints per slice at most (the EndpointSlice controller's default `--max-endpoints-per-slice`).
pub const MAX_ENDPOINTS: usize = 100;
/// Slices per exporting cluster and service at most (10,000 endpoints).
pub const MAX_SLICES: usize = 100;

/// The ready backends a peer publishes for one of its headless exports.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerBackends {
    /// Sorted by address, one per address.
    pub backends: Vec<BackendRecord>,
    /// Hostname by address (`mcs.hostnames` of the service record).
    pub hostnames: BTreeMap<Ipv4Addr, String>,
}

impl PeerBackends {
    /// The backends of a service record and its slices, one per address (the first seen wins).
    #[must_use]
    pub fn new(
        backends: impl IntoIterator<Item = BackendRecord>,
        hostnames: BTreeMap<Ipv4Addr, String>,
    ) -> Self {
        let mut by_ip: BTreeMap<Ipv4Addr, BackendRecord> = BTreeMap::new();
        for b in backends {
            by_ip.entry(b.ipv4).or_insert(b);
        }
        Self {
            backends: by_ip.into_values().collect(),
            hostnames,
        }
    }
}

fn port_json(p: &PortRecord) -> Value {
    json!({
        "name": p.name,
        "port": p.port,
        "protocol": match p.protocol {
            mesh_model::Protocol::Tcp => "TCP",
            mesh_model::Protocol::Udp => "UDP",
        },
    })
}

/// The EndpointSlices (name → object) that hold `cluster`'s backends `b` of headless service `namespace/name`.
///
/// # Errors
/// When the cluster or the service name cannot name a slice and label it (not a DNS label).
pub fn desired(
    cluster: &str,
    namespace: &str,
    name: &str,
    b: &PeerBackends,
) -> Result<BTreeMap<String, Value>, String> {
    for (what, v) in [("cluster", cluster), ("service", name), ("namespace", namespace)] {
        if !mesh_kvstore::is_dns_label(v) {
            return Err(format!("{what} {v:?} is not a DNS label"));
        }
    }
    // Backends with the same ports share slices.
    let mut groups: BTreeMap<Vec<PortRecord>, Vec<&BackendRecord>> = BTreeMap::new();
    for be in &b.backends {
        let mut ports = be.ports.to_vec();
        ports.sort();
        groups.entry(ports).or_default().push(be);
    }
    let mut out = BTreeMap::new();
    let mut n = 0usize;
    for (ports, backends) in &groups {
        for chunk in backends.chunks(MAX_ENDPOINTS) {
            if n == MAX_SLICES {
                warn!(
                    cluster,
                    namespace,
                    name,
                    max = MAX_SLICES,
                    "more backends than the slices of one cluster hold; the rest are left out"
                );
                return Ok(out);
            }
            let endpoints: Vec<Value> = chunk
                .iter()
                .map(|be| {
                    let mut e = json!({"addresses": [be.ipv4.to_string()], "conditions": {"ready": true}});
                    if let Some(h) = b.hostnames.get(&be.ipv4) {
                        e["hostname"] = json!(h);
                    }
                    e
                })
                .collect();
            // Dots: neither a service name nor a cluster name has one, so no two (service, cluster) share a name.
            let slice = format!("{name}.{cluster}.{n}");
            out.insert(
                slice.clone(),
                json!({
                    "apiVersion": "discovery.k8s.io/v1",
                    "kind": "EndpointSlice",
                    "metadata": {
                        "name": slice,
                        "namespace": namespace,
                        "labels": {
                            LABEL_SERVICE: name,
                            LABEL_SOURCE_CLUSTER: cluster,
                            MANAGED_BY.0: MANAGED_BY.1,
                        },
                    },
                    "addressType": "IPv4",
                    "endpoints": endpoints,
                    "ports": ports.iter().map(port_json).collect::<Vec<_>>(),
                }),
            );
            n += 1;
        }
    }
    Ok(out)
}

/// What of a slice this controller decides, in a form where defaults the API server may fill in (port name `""`,
/// protocol `TCP`, absent conditions) compare equal.
fn canon(o: &Value) -> Value {
    let labels: BTreeMap<&str, &Value> = [LABEL_SERVICE, LABEL_SOURCE_CLUSTER, MANAGED_BY.0]
        .into_iter()
        .map(|k| (k, &o["metadata"]["labels"][k]))
        .collect();
    let endpoints: Vec<Value> = o["endpoints"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| {
            json!({
                "addresses": e["addresses"],
                "ready": e["conditions"]["ready"].as_bool().unwrap_or(true),
                "hostname": e["hostname"],
            })
        })
        .collect();
    let ports: Vec<Value> = o["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            json!({
                "name": p["name"].as_str().unwrap_or_default(),
                "port": p["port"],
                "protocol": p["protocol"].as_str().unwrap_or("TCP"),
            })
        })
        .collect();
    json!({"labels": labels, "addressType": o["addressType"], "endpoints": endpoints, "ports": ports})
}

/// Whether `o` (an EndpointSlice as listed) is one of ours.
#[must_use]
pub fn ours(o: &Value) -> bool {
    o["metadata"]["labels"][MANAGED_BY.0] == MANAGED_BY.1
}

/// Brings the EndpointSlices of ours to `wanted` ((namespace, slice name) → object): creates the missing ones,
/// patches those that differ, deletes ours that are not wanted, and leaves every other EndpointSlice alone.
///
/// # Errors
/// Listing the EndpointSlices fails, or a write does (the others of the pass are still tried; the first error
/// is returned).
pub async fn sync(client: &kube::Client, wanted: &BTreeMap<(String, String), Value>) -> anyhow::Result<()> {
    let all = Api::<DynamicObject>::all_with(client.clone(), &slice_resource());
    let lp = ListParams::default().labels(&format!("{}={}", MANAGED_BY.0, MANAGED_BY.1));
    let listed = all.list(&lp).await.context("listing EndpointSlices")?;
    // Selected by label above; checked again here, as every slice is before it is written or deleted.
    let mut existing: BTreeMap<(String, String), Value> = BTreeMap::new();
    for o in listed.items {
        let (Some(ns), Some(name)) = (o.metadata.namespace.clone(), o.metadata.name.clone()) else {
            continue;
        };
        existing.insert(
            (ns, name),
            serde_json::to_value(&o).context("encoding a listed EndpointSlice")?,
        );
    }
    let mut first_error: Option<anyhow::Error> = None;
    let mut keep = |r: anyhow::Result<()>| {
        if let Err(e) = r {
            warn!(error = %format!("{e:#}"), "EndpointSlice write-back");
            first_error.get_or_insert(e);
        }
    };
    for ((ns, name), want) in wanted {
        let api = Api::<DynamicObject>::namespaced_with(client.clone(), ns, &slice_resource());
        match existing.get(&(ns.clone(), name.clone())).filter(|o| ours(o)) {
            Some(have) if canon(have) == canon(want) => {}
            Some(_) => {
                let patch = json!({
                    "metadata": {"labels": want["metadata"]["labels"]},
                    "addressType": want["addressType"],
                    "endpoints": want["endpoints"],
                    "ports": want["ports"],
                });
                keep(
                    api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
                        .await
                        .map(|_| info!(namespace = %ns, name = %name, "EndpointSlice updated"))
                        .with_context(|| format!("patching EndpointSlice {ns}/{name}")),
                );
            }
            None => keep(create(&api, ns, name, want).await),
        }
    }
    for ((ns, name), o) in &existing {
        if !ours(o) || wanted.contains_key(&(ns.clone(), name.clone())) {
            continue;
        }
        let api = Api::<DynamicObject>::namespaced_with(client.clone(), ns, &slice_resource());
        match api.delete(name, &DeleteParams::default()).await {
            Ok(_) => info!(namespace = %ns, name = %name, "EndpointSlice deleted: no longer imported"),
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => keep(Err(e).with_context(|| format!("deleting EndpointSlice {ns}/{name}"))),
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// Creates slice `ns/name`; when that name is taken by an EndpointSlice not of ours, leaves it alone.
async fn create(api: &Api<DynamicObject>, ns: &str, name: &str, want: &Value) -> anyhow::Result<()> {
    let obj: DynamicObject = serde_json::from_value(want.clone()).context("building an EndpointSlice")?;
    match api.create(&PostParams::default(), &obj).await {
        Ok(_) => {
            info!(namespace = %ns, name = %name, "EndpointSlice created");
            Ok(())
        }
        Err(kube::Error::Api(e)) if e.code == 409 => {
            // Taken: by a slice of someone else's (ours would have been listed), left alone.
            match api.get_opt(name).await {
                Ok(Some(o)) if !ours(&serde_json::to_value(&o).unwrap_or_default()) => {
                    warn!(namespace = %ns, name = %name,
                        "an EndpointSlice not managed by fleetmesh has this name; left alone, not written");
                    Ok(())
                }
                Ok(_) => {
                    debug!(namespace = %ns, name = %name, "EndpointSlice created meanwhile; next pass compares");
                    Ok(())
                }
                Err(e) => Err(e).with_context(|| format!("reading EndpointSlice {ns}/{name}")),
            }
        }
        Err(e) => Err(e).with_context(|| format!("creating EndpointSlice {ns}/{name}")),
    }
}

fn slice_resource() -> kube::api::ApiResource {
    kube::api::ApiResource::from_gvk_with_plural(
        &kube::api::GroupVersionKind::gvk("discovery.k8s.io", "v1", "EndpointSlice"),
        "endpointslices",
    )
}

/// The slices wanted for every headless import: `imports` are (namespace, name) → the exporting clusters, `peers`
/// (cluster, namespace, name) → that peer's backends. The importing cluster itself (`me`) is skipped: its own
/// EndpointSlices exist already.
#[must_use]
pub fn wanted(
    me: &str,
    imports: &BTreeMap<(String, String), BTreeSet<String>>,
    peers: &BTreeMap<(String, String, String), PeerBackends>,
) -> BTreeMap<(String, String), Value> {
    let mut out = BTreeMap::new();
    for ((ns, name), clusters) in imports {
        for c in clusters.iter().filter(|c| c.as_str() != me) {
            let Some(b) = peers.get(&(c.clone(), ns.clone(), name.clone())) else {
                continue;
            };
            match desired(c, ns, name, b) {
                Ok(slices) => out.extend(slices.into_iter().map(|(n, o)| ((ns.clone(), n), o))),
                Err(reason) => {
                    warn!(cluster = %c, namespace = %ns, name = %name, reason, "no EndpointSlices for this export");
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend(last: u8, port: u16) -> BackendRecord {
        BackendRecord {
            ipv4: Ipv4Addr::new(10, 2, 0, last),
            ports: vec![PortRecord {
                name: "sql".into(),
                port,
                protocol: mesh_model::Protocol::Tcp,
            }]
            .into(),
            weight: 1,
        }
    }

    #[test]
    fn slices_are_bounded_grouped_by_ports_and_labelled() {
        let b = PeerBackends::new(
            (1..=150).map(|i| backend(i, 5432)).chain([backend(200, 6000)]),
            [(Ipv4Addr::new(10, 2, 0, 1), "db-0".to_owned())].into(),
        );
        let s = desired("west", "shop", "db", &b).expect("slices");
        let names: Vec<&str> = s.keys().map(String::as_str).collect();
        assert_eq!(names, ["db.west.0", "db.west.1", "db.west.2"]);
        let sizes: Vec<usize> = s
            .values()
            .map(|o| o["endpoints"].as_array().map_or(0, Vec::len))
            .collect();
        assert_eq!(sizes, [100, 50, 1]);
        let first = &s["db.west.0"];
        assert_eq!(first["metadata"]["labels"][LABEL_SERVICE], "db");
        assert_eq!(first["metadata"]["labels"][LABEL_SOURCE_CLUSTER], "west");
        assert!(ours(first));
        assert!(
            first["metadata"]["labels"]
                .get("kubernetes.io/service-name")
                .is_none()
        );
        assert_eq!(first["endpoints"][0]["hostname"], "db-0");
        assert!(first["endpoints"][1].get("hostname").is_none());
        assert_eq!(s["db.west.2"]["ports"][0]["port"], 6000);
        // The same backends give the same slices; server defaults compare equal.
        assert_eq!(desired("west", "shop", "db", &b).expect("slices"), s);
        let mut defaulted = first.clone();
        defaulted["endpoints"][1]["conditions"] = json!({"ready": true, "serving": true});
        defaulted["metadata"]["labels"]["other"] = json!("x");
        assert_eq!(canon(&defaulted), canon(first));
        defaulted["endpoints"][1]["addresses"] = json!(["10.9.9.9"]);
        assert_ne!(canon(&defaulted), canon(first));
    }

    #[test]
    fn too_many_backends_are_cut_and_bad_names_refused() {
        let b = PeerBackends::new(
            (0..=u16::try_from(MAX_SLICES * MAX_ENDPOINTS).unwrap()).map(|i| BackendRecord {
                ipv4: Ipv4Addr::from(0x0a00_0000 + u32::from(i)),
                ports: Vec::new().into(),
                weight: 1,
            }),
            BTreeMap::new(),
        );
        assert_eq!(
            desired("west", "shop", "db", &b).expect("slices").len(),
            MAX_SLICES
        );
        let e = desired("West_1", "shop", "db", &PeerBackends::default()).expect_err("bad cluster");
        assert!(e.contains("not a DNS label"), "{e}");
    }

    #[test]
    fn the_importing_cluster_writes_no_slices_of_its_own() {
        let imports = [(
            ("shop".to_owned(), "db".to_owned()),
            ["east".to_owned(), "west".to_owned()].into(),
        )]
        .into();
        let b = PeerBackends::new([backend(1, 5432)], BTreeMap::new());
        let peers = [
            (("east".to_owned(), "shop".to_owned(), "db".to_owned()), b.clone()),
            (("west".to_owned(), "shop".to_owned(), "db".to_owned()), b),
        ]
        .into();
        let w = wanted("east", &imports, &peers);
        let names: Vec<_> = w.keys().map(|(_, n)| n.as_str()).collect();
        assert_eq!(names, ["db.west.0"]);
        // Names with dashes never meet: service db-west of cluster x, service db of cluster west-x.
        let b = PeerBackends::new([backend(1, 5432)], BTreeMap::new());
        let a = desired("x", "shop", "db-west", &b).expect("slices");
        let c = desired("west-x", "shop", "db", &b).expect("slices");
        assert!(a.keys().all(|k| !c.contains_key(k)), "{a:?} {c:?}");
    }
}
