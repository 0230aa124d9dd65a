//! Membership by selector (`mesh-agent --peer-selector FILE`) against a real etcd laid out as a fleet hub: three
//! peers (`west`, `north` labelled `region: eu`, `south` labelled `region: us`, each under
//! `fleetmesh/clusters/<c>/`) and an agent of `east` whose peer files pin those labels.
//!
//! - `region: eu` selects west and north: they are watched and synced, south is neither watched nor stored.
//! - Changing the file to `region: us` swaps them without a restart: south comes, west and north go.
//! - A file that does not validate is refused (counted, the reason in the status) and the last good selector
//!   stays in force; removing the file selects every peer.
//! - A peer publishing a label its file does not pin cannot select itself in.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

#[path = "common/watchers.rs"]
#[expect(dead_code, reason = "these tests start with a selector only")]
mod watchers;

use mesh_agent::remote::SyncState;
use mesh_kvstore::{ClusterConfig, Keys, NodeRecord, Synced, encode};
use mesh_testkit::{Etcd, eventually};
use watchers::{Agent, TIMEOUT, peer_file};

const PEERS: [(&str, u16, &str); 3] = [("west", 2, "eu"), ("north", 3, "eu"), ("south", 4, "us")];

async fn publish(c: &mut etcd_client::Client, cluster: &str, id: u16, region: &str) {
    let keys = Keys::new(&Keys::default().hub_cluster_prefix(cluster));
    let node = NodeRecord {
        name: format!("{cluster}-node-1"),
        cluster: cluster.into(),
        cluster_id: id,
        underlay_ipv4: Ipv4Addr::new(100, 65, u8::try_from(id).expect("id"), 1),
        pod_cidrs: vec![format!("10.{id}.0.0/24").parse().expect("cidr")],
        wireguard: None,
    };
    let config = ClusterConfig {
        name: cluster.into(),
        id,
        capabilities: vec!["nodes/v1".into()],
        labels: [("region".to_owned(), region.to_owned())].into(),
    };
    for (k, v) in [
        (keys.cluster_config(cluster), encode(&config)),
        (keys.node(cluster, &node.name), encode(&node)),
        (
            keys.synced(cluster, mesh_kvstore::kinds::NODES),
            encode(&Synced { time_ms: 0, count: 1 }),
        ),
    ] {
        c.put(k, v, None).await.expect("seed");
    }
}

/// The peers the agent holds that are synced, and the number of peers it holds at all.
fn synced(agent: &Agent) -> (BTreeSet<String>, usize) {
    let all = agent.remotes.snapshot();
    let synced = all
        .values()
        .filter(|rc| matches!(rc.state, SyncState::Synced { .. }) && rc.usable)
        .map(|rc| rc.name.clone())
        .collect();
    (synced, all.len())
}

async fn wait_selected(agent: &Agent, want: &[&str], what: &str) {
    let want: BTreeSet<String> = want.iter().map(|s| (*s).to_owned()).collect();
    eventually(what, TIMEOUT, || {
        let (got, held) = synced(agent);
        let r = if got == want && held == want.len() {
            Ok(())
        } else {
            Err(format!("synced {got:?}, {held} held"))
        };
        async move { r }
    })
    .await;
}

fn write(path: &std::path::Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).expect("write selector");
    std::fs::rename(&tmp, path).expect("rename selector");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_membership_selector_picks_the_peers_and_changes_at_run_time() {
    let etcd = Etcd::start().await;
    let mut c = etcd.client().await;
    for (cluster, id, region) in PEERS {
        publish(&mut c, cluster, id, region).await;
    }
    let files: Vec<(&str, String)> = PEERS
        .iter()
        .map(|(cluster, id, region)| {
            let extra = format!(
                "prefix: {}\ncluster-id: {id}\ncluster-labels: {{region: {region}}}\n",
                Keys::default().hub_cluster_prefix(cluster)
            );
            (*cluster, peer_file(&etcd, &extra))
        })
        .collect();
    let agent = Agent::start_selecting(&files);
    let selector = agent.selector_file();
    write(&selector, "matchLabels: {region: eu}\n");
    wait_selected(&agent, &["north", "west"], "region: eu selects west and north").await;
    let sel = agent.remotes.selection();
    assert_eq!(sel.unselected, 1, "{sel:?}");
    assert_eq!(sel.error, None, "{sel:?}");

    write(
        &selector,
        "matchExpressions: [{key: region, operator: In, values: [us]}]\n",
    );
    wait_selected(&agent, &["south"], "region In [us] swaps the peers at run time").await;
    assert_eq!(agent.remotes.selection().unselected, 2);

    // Refused: an invalid key. The last good selector stays; the reason and a count are in the status.
    write(&selector, "matchLabels: {\"not a key!\": x}\n");
    eventually("the bad selector refused", TIMEOUT, || {
        let sel = agent.remotes.selection();
        let r = match &sel.error {
            Some(e) if e.contains("not a valid label key") && sel.refusals == 1 => Ok(()),
            _ => Err(format!("{sel:?}")),
        };
        async move { r }
    })
    .await;
    let (got, held) = synced(&agent);
    assert_eq!(
        (got, held),
        (["south".to_owned()].into(), 1),
        "the last good selector stays in force"
    );
    write(&selector, "matchLabels: [not, a, map]\n");
    eventually("a second bad content counted", TIMEOUT, || {
        let n = agent.remotes.selection().refusals;
        async move {
            if n == 2 {
                Ok(())
            } else {
                Err(format!("{n} refusals"))
            }
        }
    })
    .await;

    // A peer that publishes `region: eu` but whose file pins `region: us` stays out of an eu selection: the pin is
    // what this cluster granted (the difference is reported as a grant mismatch).
    write(&selector, "matchLabels: {region: eu}\n");
    publish(&mut c, "south", 4, "eu").await;
    wait_selected(&agent, &["north", "west"], "back to eu").await;

    // No file: every peer.
    std::fs::remove_file(&selector).expect("remove selector");
    wait_selected(
        &agent,
        &["north", "south", "west"],
        "every peer without a selector",
    )
    .await;
    let south = agent
        .wait("south", "south's published labels differ from its pin", |rc| {
            if rc.grant_mismatches.iter().any(|m| m.contains("pins")) {
                Ok(())
            } else {
                Err(format!("mismatches {:?}", rc.grant_mismatches))
            }
        })
        .await;
    assert_eq!(
        south.pinned_labels,
        Some([("region".to_owned(), "us".to_owned())].into())
    );
    let sel = agent.remotes.selection();
    assert_eq!(
        (sel.selector, sel.unselected),
        (None, 0),
        "no selector: every peer"
    );
}
