//! The agent's control loop: woken by changes (the cluster's source, remote watchers, API commands), it hands the
//! reconciler what changed and publishes the outcome. With nothing to do it sleeps: no timer runs except for what
//! is due (a failed write's retry with backoff, a remote cluster's grace period ending, an active staged
//! rollout's gate).

use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use mesh_model::ClusterState;
use mesh_model::source::Snapshot;
use tokio::sync::watch;
use tracing::{debug, warn};

use crate::api::{CommandQueue, Status};
use crate::reconcile::Reconciler;
use crate::remote::{Remotes, Scope, SyncState};

/// How the loop retries and ticks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoopConfig {
    /// First wait before retrying what failed; doubled per failed retry up to `retry_max`.
    pub retry_min: Duration,
    pub retry_max: Duration,
    /// Tick while a staged rollout is active (its gates judge live statistics).
    pub rollout_tick: Duration,
}

impl Default for LoopConfig {
    fn default() -> Self {
        Self {
            retry_min: Duration::from_millis(200),
            retry_max: Duration::from_secs(2),
            rollout_tick: crate::rollout::FAST_TICK,
        }
    }
}

/// What makes the loop run again without being woken.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Due {
    /// A failed write or interface waits for its retry.
    pub retry: bool,
    /// A staged rollout is active.
    pub rollout: bool,
    /// The soonest end of an unreachable remote cluster's grace period.
    pub grace_ends_in: Option<Duration>,
}

/// Retry backoff: doubles while retries keep failing, resets once nothing is left to retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    next: Duration,
}

impl Backoff {
    #[must_use]
    pub const fn new(cfg: &LoopConfig) -> Self {
        Self { next: cfg.retry_min }
    }

    /// How long to wait for the next wake-up, given what is due (`None`: until woken).
    pub fn wait(&mut self, cfg: &LoopConfig, due: Due) -> Option<Duration> {
        let retry = if due.retry {
            let d = self.next;
            self.next = (self.next * 2).min(cfg.retry_max);
            Some(d)
        } else {
            self.next = cfg.retry_min;
            None
        };
        [retry, due.rollout.then_some(cfg.rollout_tick), due.grace_ends_in]
            .into_iter()
            .flatten()
            .min()
    }
}

/// The loop and what it reads and writes.
pub struct ControlLoop {
    pub reconciler: Reconciler,
    pub remotes: Remotes,
    pub snapshots: watch::Receiver<Snapshot>,
    pub status: Arc<Mutex<Status>>,
    pub commands: CommandQueue,
    pub progress: watch::Sender<mesh_k8s::progress::NodeRollouts>,
    pub wake: Receiver<()>,
    pub config: LoopConfig,
    /// MCS imports and the clusterset DNS zone (docs/clusterset-dns.md): the local state handed to the reconciler
    /// gains the imports' synthetic services.
    pub clusterset: Option<crate::dns::Clusterset>,
    local: Option<(u64, Arc<ClusterState>)>,
    /// The local state with the imports, as last handed to the reconciler (the same `Arc` while it is equal, so
    /// the reconciler sees no change).
    with_imports: Option<Arc<ClusterState>>,
    /// The local state's generation `with_imports` was computed from.
    imports_generation: u64,
    /// The peers that were beyond their grace period at the last imports pass.
    imports_beyond: std::collections::BTreeSet<String>,
    backoff: Backoff,
    /// Returns freed memory after large work (the bootstrap, resyncs).
    trimmer: crate::memory::Trimmer,
}

impl ControlLoop {
    #[must_use]
    #[expect(clippy::too_many_arguments, reason = "the parts the loop connects")]
    pub fn new(
        reconciler: Reconciler,
        remotes: Remotes,
        snapshots: watch::Receiver<Snapshot>,
        status: Arc<Mutex<Status>>,
        commands: CommandQueue,
        progress: watch::Sender<mesh_k8s::progress::NodeRollouts>,
        wake: Receiver<()>,
        config: LoopConfig,
    ) -> Self {
        Self {
            reconciler,
            remotes,
            snapshots,
            status,
            commands,
            progress,
            wake,
            config,
            clusterset: None,
            local: None,
            with_imports: None,
            imports_generation: 0,
            imports_beyond: std::collections::BTreeSet::new(),
            backoff: Backoff::new(&config),
            trimmer: crate::memory::Trimmer::default(),
        }
    }

    /// Runs until every sender of the wake-up channel is gone.
    pub fn run(mut self) {
        let mut wait = None;
        loop {
            let woken = match wait {
                Some(d) => self.wake.recv_timeout(d),
                None => self.wake.recv().map_err(|_| RecvTimeoutError::Disconnected),
            };
            if woken == Err(RecvTimeoutError::Disconnected) {
                return;
            }
            // Coalesce a burst of wake-ups into one turn.
            while self.wake.try_recv().is_ok() {}
            wait = self.turn();
        }
    }

    /// One turn: what changed is programmed, the status updated. Returns when the next turn is due without a
    /// wake-up (`None`: only when woken).
    pub fn turn(&mut self) -> Option<Duration> {
        let started = std::time::Instant::now();
        let (generation, errors) = {
            let snap = self.snapshots.borrow();
            (snap.generation, snap.errors.clone())
        };
        if generation == 0 {
            return None;
        }
        if self.local.as_ref().is_none_or(|(g, _)| *g != generation) {
            let state = self.snapshots.borrow().state.clone();
            // Peers' node records may not claim this cluster's pod CIDRs.
            let cidrs = state
                .nodes
                .values()
                .map(|n| (n.name.clone(), n.pod_cidr))
                .collect();
            self.remotes
                .set_local_pod_cidrs(&self.reconciler.me.cluster, cidrs);
            self.local = Some((generation, state));
        }
        let (_, local) = self.local.clone()?;
        let queued = std::mem::take(&mut *self.commands.lock().unwrap_or_else(PoisonError::into_inner));
        for (ns, name, cmd) in queued {
            if let Err(e) = self.reconciler.rollouts.command(&ns, &name, cmd) {
                warn!(error = %e, "rollout command");
            }
        }
        self.reconciler.peers_configured = self.remotes.configured();
        let journal = self.remotes.take_changes();
        // Imports follow the local state, the peers' service records and their reachability: a full pass when the
        // local state or a peer's cluster-level facts changed, else only the services the peers changed.
        let imports_full = self.imports_generation != generation
            || journal
                .iter()
                .any(|((scope, _), c)| *scope == Scope::Peer && c.meta);
        let changed_services: std::collections::BTreeSet<&String> = journal
            .iter()
            .filter(|((scope, _), _)| *scope == Scope::Peer)
            .flat_map(|(_, c)| c.services.iter())
            .collect();
        let remotes = &self.remotes;
        let reconciler = &mut self.reconciler;
        let clusterset = &mut self.clusterset;
        let with_imports = &mut self.with_imports;
        let imports_beyond = &mut self.imports_beyond;
        self.imports_generation = generation;
        // Snapshots share the records and their maps (persistent maps): taking them costs the number of clusters,
        // and the watchers and the API never wait for the reconciler's work.
        let peers_snapshot = remotes.snapshot();
        let own_snapshot = remotes.own();
        let (dp_status, grace_ends_in, remotes_synced) = {
            let peers = &peers_snapshot;
            let grace_ms = u64::try_from(reconciler.remote_grace.as_millis()).unwrap_or(u64::MAX);
            let now = crate::remote::now_ms();
            let grace_ends_in = peers
                .values()
                .filter_map(|r| r.unreachable_since_ms)
                .map(|since| since.saturating_add(grace_ms))
                .filter(|end| *end > now)
                .min()
                .map(|end| Duration::from_millis(end - now + 1));
            let synced = peers
                .values()
                .all(|r| matches!(r.state, SyncState::Synced { .. }) && r.usable);
            // The peers beyond their grace period (their end wakes the loop with nothing in the journal).
            let beyond: std::collections::BTreeSet<String> = if clusterset.is_some() {
                peers
                    .iter()
                    .filter(|(_, r)| {
                        r.unreachable_since_ms
                            .is_some_and(|since| now.saturating_sub(since) >= grace_ms)
                    })
                    .map(|(n, _)| n.clone())
                    .collect()
            } else {
                std::collections::BTreeSet::new()
            };
            let local = match clusterset.as_mut() {
                None => local.clone(),
                Some(cs)
                    if imports_full
                        || with_imports.is_none()
                        || !changed_services.is_empty()
                        || beyond != *imports_beyond =>
                {
                    let imports_full = imports_full || beyond != *imports_beyond;
                    imports_beyond.clone_from(&beyond);
                    // Peers beyond their grace period export nothing (a copy only while one is).
                    let reachable;
                    let usable = if !beyond.is_empty() {
                        reachable = crate::lb::reachable(peers, now, grace_ms);
                        &reachable
                    } else {
                        peers
                    };
                    match with_imports.as_ref() {
                        // Only backends changed: the zone entries of those services, nothing for the reconciler.
                        Some(prev)
                            if !imports_full
                                && cs.pass_services(
                                    &reconciler.me.cluster,
                                    &local,
                                    usable,
                                    changed_services.iter().copied(),
                                ) =>
                        {
                            prev.clone()
                        }
                        _ => {
                            let next = cs.pass(&reconciler.me.cluster, &local, usable);
                            let next = match with_imports.as_ref() {
                                Some(prev) if **prev == next => prev.clone(),
                                _ => Arc::new(next),
                            };
                            *with_imports = Some(next.clone());
                            next
                        }
                    }
                }
                Some(_) => with_imports.clone().unwrap_or_else(|| local.clone()),
            };
            let st = reconciler.step(&local, own_snapshot.as_ref(), peers, journal);
            (st, grace_ends_in, synced)
        };
        let progress = self.reconciler.rollouts.progress(&local, crate::remote::now_ms());
        self.progress.send_if_modified(|p| {
            let changed = *p != progress;
            *p = progress;
            changed
        });
        let ready = dp_status.errors.is_empty()
            && dp_status.endpoints.iter().all(|e| e.programmed)
            && remotes_synced
            && self.remotes.configured();
        {
            let mut st = self.status.lock().unwrap_or_else(PoisonError::into_inner);
            st.ready = ready;
            st.manifest_generation = generation;
            st.manifest_errors = errors;
            st.datapath = dp_status;
        }
        if let Some(took) = self
            .trimmer
            .after_turn(started.elapsed(), remotes_synced && self.remotes.configured())
        {
            debug!(
                trims = self.trimmer.trims,
                took_us = took.as_micros(),
                "freed memory returned to the kernel"
            );
        }
        let due = Due {
            retry: self.reconciler.retry_due(),
            rollout: self.reconciler.rollouts.active(),
            grace_ends_in,
        };
        self.backoff.wait(&self.config, due)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_idle_loop_waits_to_be_woken_and_retries_back_off() {
        let cfg = LoopConfig {
            retry_min: Duration::from_millis(100),
            retry_max: Duration::from_millis(350),
            rollout_tick: Duration::from_millis(50),
        };
        let mut b = Backoff::new(&cfg);
        assert_eq!(b.wait(&cfg, Due::default()), None, "nothing due: no timer at all");
        let retry = Due {
            retry: true,
            ..Due::default()
        };
        assert_eq!(b.wait(&cfg, retry), Some(Duration::from_millis(100)));
        assert_eq!(b.wait(&cfg, retry), Some(Duration::from_millis(200)));
        assert_eq!(b.wait(&cfg, retry), Some(Duration::from_millis(350)), "capped");
        assert_eq!(b.wait(&cfg, Due::default()), None);
        assert_eq!(
            b.wait(&cfg, retry),
            Some(Duration::from_millis(100)),
            "a success resets the backoff"
        );
        let grace = Due {
            grace_ends_in: Some(Duration::from_millis(70)),
            ..Due::default()
        };
        assert_eq!(b.wait(&cfg, grace), Some(Duration::from_millis(70)));
        let both = Due {
            rollout: true,
            ..grace
        };
        assert_eq!(
            b.wait(&cfg, both),
            Some(Duration::from_millis(50)),
            "the soonest wins"
        );
    }
}
