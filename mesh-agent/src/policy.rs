//! Identities and network policy → the datapath (docs/network-policy.md).
//!
//! A pass keeps, per change: the identity universe (this cluster's identities from its own etcd, every usable
//! peer's, and node-local CIDR identities for the prefixes policies name), a selector cache (each endpoint
//! selector of the policies with the identities it selects, judged once per changed identity), each local
//! endpoint's identity (its ip record, else its labels' identity) and compiled policy. An endpoint is compiled
//! again only when its inputs, the policies or one of the selections it was compiled from changed; its table is
//! written by [`Datapath::replace_endpoint_policy`] only then. The names flow events use are handed on; the
//! views of `GET /v1/policy` are rendered when asked for ([`PolicyViews`]).

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::sync::Arc;

use ipnet::Ipv4Net;
use mesh_common::{IpcacheEntry, identity, policy_dir, proto};
use mesh_model::ClusterState;
use mesh_model::policy::{
    self as model, Compiled, CompiledEntry, EndpointView, Identities, NamedPorts, SelectorCache, Universe,
};
use mesh_model::state::Pod;
use serde_json::{Value, json};
use tracing::{info, warn};

use crate::datapath::{Datapath, EndpointPolicy, PolicyRule};
use crate::desired::LocalNode;
use crate::flows::{Names, PodName};
use crate::remote::{RemoteCluster, Scope};

/// Compiles and programs every local endpoint's network policy; keeps what must stay stable across passes (the
/// CIDR identities).
#[derive(Debug, Default)]
pub struct PolicyReconciler {
    cidr_ids: BTreeMap<Ipv4Net, u32>,
    /// Identities of this cluster's own etcd and of every usable peer, kept per change.
    identities: Identities,
    /// Remote and own-etcd pod names by address (flow events), kept per change.
    pods: imbl::OrdMap<Ipv4Addr, PodName>,
    /// The pod addresses that have named ports: their identity and ports.
    named: BTreeMap<Ipv4Addr, (u32, Vec<mesh_kvstore::PortRecord>)>,
    /// The tables above were filled from every cluster once (else the next pass does).
    filled: bool,
    /// Every endpoint selector of the local policies with the identities it selects.
    selectors: SelectorCache,
    /// The cluster labels the selections were judged with.
    cluster_labels: BTreeMap<String, BTreeMap<String, String>>,
    /// The CIDR identities of the last pass.
    last_cidrs: BTreeMap<u32, Ipv4Net>,
    /// Each local endpoint's compiled policy and what it was compiled from.
    endpoints: BTreeMap<Ipv4Addr, EndpointPolicyState>,
}

/// One local endpoint's policy as the last pass compiled and wrote it.
#[derive(Debug)]
struct EndpointPolicyState {
    labels: BTreeMap<String, String>,
    named: NamedPorts,
    view: Arc<PolicyView>,
    /// Rule descriptions, by 1-based rule number (flow events).
    rules: Vec<String>,
    /// The policy id the datapath returned; `None` when writing failed (the next pass writes again).
    policy_id: Option<u32>,
}

/// A local endpoint's compiled policy, as `GET /v1/policy/{namespace}/{pod}` shows it.
#[derive(Debug, Clone)]
pub struct PolicyView {
    pub namespace: String,
    pub pod: String,
    pub ip: Ipv4Addr,
    pub identity: u32,
    pub identity_labels: BTreeMap<String, String>,
    /// The policies selecting the endpoint (`Kind namespace/name`), sorted.
    pub policies: Vec<String>,
    pub compiled: Arc<Compiled>,
}

/// The compiled policies of the local endpoints and the names their entries are shown with; rendered on request
/// ([`PolicyViews::render`]), never by the control loop.
#[derive(Debug, Default, Clone)]
pub struct PolicyViews {
    pub pods: BTreeMap<(String, String), Arc<PolicyView>>,
    pub identities: Identities,
    pub cidrs: BTreeMap<u32, Ipv4Net>,
}

/// Shared between the control loop and the API.
pub type SharedPolicyViews = Arc<std::sync::Mutex<PolicyViews>>;

/// What changed since the last pass, for the tables a pass reads identities and pod names from.
#[derive(Debug, Default, Clone)]
pub struct PolicyChanges {
    /// Identities whose record changed: (scope, cluster, identity).
    pub identities: Vec<(Scope, String, u32)>,
    /// Pod addresses whose record changed: (scope, cluster, address).
    pub ips: Vec<(Scope, String, Ipv4Addr)>,
    /// Rebuild the tables from every cluster (the first pass, a from-scratch reconcile, held identities).
    pub full: bool,
    /// This cluster's state changed (its policies, pods or namespaces): every endpoint is compiled again.
    pub local: bool,
}

/// What [`PolicyReconciler::update_tables`] changed.
#[derive(Debug, Default)]
struct TableChanges {
    /// The identities were rebuilt as a whole.
    replaced: bool,
    /// Identities inserted, changed or removed.
    identities: Vec<u32>,
    /// Some pod address's named ports changed.
    named: bool,
}

/// What one pass produced besides the map writes.
#[derive(Debug, Default)]
pub struct PolicyPass {
    /// Names for flow events.
    pub names: Names,
    /// `GET /v1/policy/{namespace}/{pod}` answers.
    pub views: PolicyViews,
    /// Endpoints whose policy was compiled in this pass.
    pub compiled: usize,
    /// ipcache entries for the CIDR identities (addresses outside the mesh that policies name).
    pub cidr_entries: BTreeMap<Ipv4Net, IpcacheEntry>,
    /// Identity of every local pod (by address), for the endpoint map.
    pub endpoint_identities: BTreeMap<Ipv4Addr, u32>,
    /// Compiled entries of all local endpoints, both directions.
    pub entries: usize,
    /// Some local endpoint is enforced in some direction (or its programming failed, which may leave it so).
    pub enforced: bool,
    pub errors: Vec<String>,
}

fn named_ports_of(pod: &Pod) -> NamedPorts {
    let mut out = NamedPorts::new();
    for p in &pod.ports {
        if let Some(name) = &p.name {
            out.entry(name.clone()).or_default().push((p.protocol, p.port));
        }
    }
    out
}

/// The clusters whose identities count: this cluster's own etcd view, then every usable peer.
fn clusters<'a>(
    me: &'a LocalNode,
    own: Option<&'a RemoteCluster>,
    remotes: &'a BTreeMap<String, RemoteCluster>,
) -> impl Iterator<Item = &'a RemoteCluster> + 'a {
    own.into_iter().chain(
        remotes
            .iter()
            .filter(move |(n, rc)| *n != &me.cluster && rc.usable)
            .map(|(_, rc)| rc),
    )
}

impl PolicyReconciler {
    /// Brings the identity and pod-name tables up to date: only the changed keys are read, unless `full`.
    fn update_tables(
        &mut self,
        me: &LocalNode,
        own: Option<&RemoteCluster>,
        remotes: &BTreeMap<String, RemoteCluster>,
        changes: &PolicyChanges,
    ) -> TableChanges {
        let mut out = TableChanges::default();
        let pod_name = |ip: &mesh_kvstore::IpRecord| PodName {
            cluster: ip.cluster.clone(),
            namespace: ip.namespace.clone(),
            pod: ip.pod.clone(),
        };
        if changes.full || !self.filled {
            self.identities = Identities::new();
            self.pods = imbl::OrdMap::new();
            self.named.clear();
            for rc in clusters(me, own, remotes) {
                for (id, rec) in &rc.identities {
                    self.identities
                        .insert(*id, std::sync::Arc::new(rec.labels.clone()));
                }
                for ip in rc.ips.values() {
                    self.pods.insert(ip.ipv4, pod_name(ip));
                    if !ip.named_ports.is_empty() {
                        self.named.insert(ip.ipv4, (ip.identity, ip.named_ports.clone()));
                    }
                }
            }
            self.filled = true;
            out.replaced = true;
            out.named = true;
            return out;
        }
        let source = |scope: Scope, cluster: &str| match scope {
            Scope::Own => own,
            Scope::Peer => remotes
                .get(cluster)
                .filter(|rc| cluster != me.cluster && rc.usable),
        };
        for (scope, cluster, id) in &changes.identities {
            out.identities.push(*id);
            match source(*scope, cluster).and_then(|rc| rc.identities.get(id)) {
                Some(rec) => {
                    self.identities
                        .insert(*id, std::sync::Arc::new(rec.labels.clone()));
                }
                None => {
                    self.identities.remove(id);
                }
            }
        }
        for (scope, cluster, ip) in &changes.ips {
            match source(*scope, cluster).and_then(|rc| rc.ips.get(ip)) {
                Some(rec) => {
                    self.pods.insert(*ip, pod_name(rec));
                    if rec.named_ports.is_empty() {
                        out.named |= self.named.remove(ip).is_some();
                    } else {
                        let now = (rec.identity, rec.named_ports.clone());
                        out.named |= self.named.get(ip) != Some(&now);
                        self.named.insert(*ip, now);
                    }
                }
                None => {
                    self.pods.remove(ip);
                    out.named |= self.named.remove(ip).is_some();
                }
            }
        }
        out
    }

    /// CIDR identities for every prefix the policies name; a prefix keeps its identity while it is named.
    fn cidr_identities(&mut self, local: &ClusterState) -> BTreeMap<u32, Ipv4Net> {
        let wanted = model::cidr_prefixes(local.network_policies.values());
        self.cidr_ids.retain(|p, _| wanted.contains(p));
        for p in wanted {
            if !self.cidr_ids.contains_key(&p) {
                let used: std::collections::BTreeSet<u32> = self.cidr_ids.values().copied().collect();
                let id = (identity::FIRST_CIDR..)
                    .find(|i| !used.contains(i))
                    .unwrap_or(identity::FIRST_CIDR);
                self.cidr_ids.insert(p, id);
            }
        }
        self.cidr_ids.iter().map(|(p, id)| (*id, *p)).collect()
    }

    /// Runs one pass: programs every local endpoint's identity and policy; returns names, views and CIDR entries.
    /// The identities and pod names it reads are kept per change (`changes`): a pass copies none of them.
    #[expect(clippy::too_many_arguments, reason = "the state one pass reads")]
    pub fn reconcile(
        &mut self,
        dp: &mut Datapath,
        me: &LocalNode,
        local: &ClusterState,
        own: Option<&RemoteCluster>,
        remotes: &BTreeMap<String, RemoteCluster>,
        endpoints: &BTreeMap<Ipv4Addr, String>,
        changes: &PolicyChanges,
    ) -> PolicyPass {
        let mut pass = PolicyPass::default();
        let cidrs = self.cidr_identities(local);
        let table_changes = self.update_tables(me, own, remotes, changes);
        let mut universe = Universe {
            local_cluster: me.cluster.clone(),
            cidrs: cidrs.clone(),
            identities: self.identities.clone(),
            ..Universe::default()
        };
        universe
            .cluster_labels
            .insert(me.cluster.clone(), me.labels.clone());
        for rc in clusters(me, own, remotes) {
            if let Some(labels) = rc.labels() {
                universe.cluster_labels.insert(rc.name.clone(), labels.clone());
            }
        }
        for (identity, ports) in self.named.values() {
            let np = universe.named_ports.entry(*identity).or_default();
            for p in ports {
                let v = np.entry(p.name.clone()).or_default();
                if !v.contains(&(p.protocol, p.port)) {
                    v.push((p.protocol, p.port));
                }
            }
        }

        // The selections: judged again as a whole when the identities were replaced or cluster labels changed,
        // else once per changed identity.
        if table_changes.replaced {
            self.selectors = SelectorCache::default();
            self.cluster_labels = universe.cluster_labels.clone();
        } else if universe.cluster_labels != self.cluster_labels {
            self.selectors.refresh(&universe);
            self.cluster_labels = universe.cluster_labels.clone();
        } else {
            for id in &table_changes.identities {
                let labels = universe.identities.get(id).cloned();
                self.selectors.update_identity(*id, labels.as_deref(), &universe);
            }
        }
        self.selectors.sync(local.network_policies.values(), &universe);
        let changed_selections = self.selectors.take_changed();
        // What every endpoint's table depends on besides its selections.
        let everything = changes.full
            || changes.local
            || table_changes.replaced
            || table_changes.named
            || cidrs != self.last_cidrs;
        self.last_cidrs = cidrs.clone();

        pass.names.pods = self.pods.clone();
        let mut by_labels: BTreeMap<&BTreeMap<String, String>, u32> = BTreeMap::new();
        if let Some(own) = own {
            for (id, rec) in &own.identities {
                by_labels.insert(&rec.labels, *id);
            }
        }
        for (id, prefix) in &cidrs {
            pass.names.cidrs.insert(*id, prefix.to_string());
            pass.cidr_entries.insert(
                *prefix,
                IpcacheEntry {
                    identity: *id,
                    family: mesh_common::FAMILY_IPV4,
                    ..IpcacheEntry::default()
                },
            );
        }

        let mut seen = BTreeSet::new();
        for pod in local.pods_on_node(&me.node) {
            let Some(ip) = pod.ipv4 else { continue };
            if !endpoints.contains_key(&ip) || !seen.insert(ip) {
                continue;
            }
            let ns = local.namespaces.get(&pod.namespace);
            let id_labels = mesh_model::identity::identity_labels(&me.cluster, pod, ns);
            // The ip record is the cluster's word; before it arrives the labels' identity (if allocated) is used.
            let ident = own
                .and_then(|o| o.ips.get(&ip))
                .filter(|r| r.namespace == pod.namespace && r.pod == pod.name)
                .map(|r| r.identity)
                .filter(|id| universe.identities.get(id).is_some_and(|l| **l == id_labels))
                .or_else(|| by_labels.get(&id_labels).copied())
                .unwrap_or(identity::ANY);
            pass.endpoint_identities.insert(ip, ident);
            pass.names.pods.insert(
                ip,
                PodName {
                    cluster: me.cluster.clone(),
                    namespace: pod.namespace.clone(),
                    pod: pod.name.clone(),
                },
            );
            let named = named_ports_of(pod);
            let kept = self.endpoints.get(&ip).filter(|e| {
                !everything
                    && e.view.namespace == pod.namespace
                    && e.view.pod == pod.name
                    && e.labels == pod.labels
                    && e.view.identity_labels == id_labels
                    && e.named == named
                    && e.view.compiled.selectors.is_disjoint(&changed_selections)
            });
            let state = match kept {
                Some(e) => EndpointPolicyState {
                    labels: e.labels.clone(),
                    named: e.named.clone(),
                    view: if e.view.identity == ident {
                        e.view.clone()
                    } else {
                        Arc::new(PolicyView {
                            identity: ident,
                            ..(*e.view).clone()
                        })
                    },
                    rules: e.rules.clone(),
                    policy_id: e.policy_id,
                },
                None => {
                    pass.compiled += 1;
                    let view = EndpointView {
                        cluster: &me.cluster,
                        namespace: &pod.namespace,
                        labels: &pod.labels,
                        identity_labels: &id_labels,
                        named_ports: &named,
                    };
                    let compiled = model::compile_with(
                        &view,
                        local.network_policies.values(),
                        &universe,
                        Some(&self.selectors),
                    );
                    let rules = (0..compiled.rules.len())
                        .map(|i| describe(&compiled, i))
                        .collect();
                    let mut policies: Vec<String> = local
                        .network_policies
                        .values()
                        .filter(|p| p.selects(&pod.namespace, &pod.labels))
                        .map(|p| format!("{} {}/{}", p.kind.kind_name(), p.namespace, p.name))
                        .collect();
                    policies.sort();
                    EndpointPolicyState {
                        labels: pod.labels.clone(),
                        named,
                        view: Arc::new(PolicyView {
                            namespace: pod.namespace.clone(),
                            pod: pod.name.clone(),
                            ip,
                            identity: ident,
                            identity_labels: id_labels,
                            policies,
                            compiled: Arc::new(compiled),
                        }),
                        rules,
                        policy_id: None,
                    }
                }
            };
            let mut state = state;
            let compiled = &state.view.compiled;
            pass.entries +=
                compiled.ingress.as_ref().map_or(0, Vec::len) + compiled.egress.as_ref().map_or(0, Vec::len);
            // Written when compiled again, when the identity changed, when the last write failed, or when the
            // datapath no longer has the table written (the endpoint was programmed anew).
            let current = kept
                .filter(|e| e.view.identity == ident)
                .and(state.policy_id)
                .filter(|id| {
                    dp.endpoint(ip)
                        .ok()
                        .flatten()
                        .is_some_and(|ep| ep.policy_id == *id && ep.identity == ident)
                });
            if current.is_none() {
                let wanted = EndpointPolicy {
                    ingress: rules_of(compiled.ingress.as_ref()),
                    egress: rules_of(compiled.egress.as_ref()),
                };
                state.policy_id = match dp.replace_endpoint_policy(ip, ident, &wanted) {
                    Ok(id) => Some(id),
                    Err(e) => {
                        warn!(pod = %format!("{}/{}", pod.namespace, pod.name), error = %format!("{e:#}"), "programming policy");
                        pass.errors
                            .push(format!("policy of {}/{}: {e:#}", pod.namespace, pod.name));
                        None
                    }
                };
            }
            for (i, d) in state.rules.iter().enumerate() {
                let r = u32::try_from(i + 1).unwrap_or(u32::MAX);
                pass.names.rules.insert((ip, r), d.clone());
            }
            pass.views
                .pods
                .insert((pod.namespace.clone(), pod.name.clone()), state.view.clone());
            self.endpoints.insert(ip, state);
        }
        self.endpoints.retain(|ip, _| seen.contains(ip));
        pass.views.cidrs = cidrs;
        pass.views.identities = universe.identities.clone();
        // The universe is done with: flow events name identities from the same labels.
        pass.names.identities = std::mem::take(&mut universe.identities);
        if !pass.errors.is_empty() {
            info!(errors = pass.errors.len(), "policy pass had errors");
        }
        pass
    }
}

/// The datapath rules of a direction's compiled entries.
fn rules_of(entries: Option<&Vec<CompiledEntry>>) -> Option<Vec<PolicyRule>> {
    entries.map(|es| {
        es.iter()
            .map(|e| PolicyRule {
                peer: e.identity,
                proto: e.proto,
                port: e.port,
                port_plen: e.plen,
                rule: e.rule,
            })
            .collect()
    })
}

/// `Kind namespace/name ingress[i]` for rule `index` (0-based) of a compiled table.
fn describe(compiled: &Compiled, index: usize) -> String {
    compiled.rules.get(index).map_or_else(
        || format!("rule {}", index + 1),
        |rr| {
            format!(
                "{} {}/{} {}[{}]",
                rr.kind.kind_name(),
                rr.namespace,
                rr.name,
                if rr.direction == policy_dir::INGRESS {
                    "ingress"
                } else {
                    "egress"
                },
                rr.index
            )
        },
    )
}

impl PolicyViews {
    /// The JSON of `GET /v1/policy/{namespace}/{pod}`; `None` when the pod is not a local endpoint.
    #[must_use]
    pub fn render(&self, namespace: &str, pod: &str) -> Option<Value> {
        let v = self.pods.get(&(namespace.to_owned(), pod.to_owned()))?;
        let compiled = &v.compiled;
        let describe_rule = |r: u32| describe(compiled, r.saturating_sub(1) as usize);
        let peer = |id: u32| -> String {
            match id {
                identity::ANY => "any peer".to_owned(),
                identity::WORLD => "world".to_owned(),
                _ => {
                    if let Some(p) = self.cidrs.get(&id) {
                        return format!("cidr {p}");
                    }
                    self.identities.get(&id).map_or_else(
                        || format!("identity {id}"),
                        |l| {
                            let cluster = l
                                .get(mesh_model::identity::LABEL_CLUSTER)
                                .cloned()
                                .unwrap_or_default();
                            let ns = l
                                .get(mesh_model::identity::LABEL_NAMESPACE)
                                .cloned()
                                .unwrap_or_default();
                            let own: Vec<String> = mesh_model::identity::pod_labels(l)
                                .iter()
                                .map(|(k, v)| format!("{k}={v}"))
                                .collect();
                            format!("{cluster}/{ns} {{{}}}", own.join(","))
                        },
                    )
                }
            }
        };
        let dir_view = |entries: &Option<Vec<CompiledEntry>>| {
            json!({
                "enforced": entries.is_some(),
                "entries": entries.iter().flatten().map(|e| json!({
                    "identity": e.identity,
                    "peer": peer(e.identity),
                    "protocol": match e.proto { proto::TCP => "TCP", proto::UDP => "UDP", 0 => "any", _ => "other" },
                    "ports": port_range(e),
                    "rule": describe_rule(e.rule),
                })).collect::<Vec<_>>(),
            })
        };
        Some(json!({
            "namespace": v.namespace,
            "pod": v.pod,
            "ip": v.ip,
            "identity": v.identity,
            "identityLabels": v.identity_labels,
            "policies": v.policies,
            "ingress": dir_view(&compiled.ingress),
            "egress": dir_view(&compiled.egress),
        }))
    }
}

/// `any`, `8080` or `8000-8063` for an entry's port block.
fn port_range(e: &CompiledEntry) -> String {
    if e.proto == 0 || e.plen == 0 {
        return "any".to_owned();
    }
    let span = 1u32 << (16 - u32::from(e.plen));
    let last = u32::from(e.port) + span - 1;
    if span == 1 {
        e.port.to_string()
    } else {
        format!("{}-{last}", e.port)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_blocks_read_as_ranges() {
        let e = |port, plen| CompiledEntry {
            identity: 0,
            proto: proto::TCP,
            port,
            plen,
            rule: 1,
        };
        assert_eq!(port_range(&e(8080, 16)), "8080");
        assert_eq!(port_range(&e(8064, 11)), "8064-8095");
        assert_eq!(port_range(&e(0, 0)), "any");
    }
}
