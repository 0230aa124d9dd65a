//! Keys that several parties may claim (an ipcache prefix, a tunnel peer's address), each claim with its rank; the
//! first by rank wins. A change to one claim costs the claims of that key, not a pass over every key: this is
//! how the ipcache and the tunnel peers follow per-key changes while keeping the from-scratch functions'
//! precedence (`desired::ipcache`, `desired::remote_pod_entries`: this cluster first, then peers by name).

use std::collections::BTreeMap;
use std::sync::Arc;

/// Who claims a key, in order of precedence (smaller wins).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Rank {
    /// The kind of claim (see the `tier` constants of the users).
    pub tier: u8,
    pub cluster: Arc<str>,
    /// The node (node prefixes and tunnel peers), or the node of a pod's record.
    pub node: Arc<str>,
}

/// Claims by key. Most keys have one claim: each key's claims are a sorted list of exactly its length (a map
/// per key would cost a whole tree node, some 600 bytes, for one claim).
#[derive(Debug, Clone)]
pub struct Claims<K, E> {
    by_key: BTreeMap<K, Vec<(Rank, E)>>,
}

impl<K, E> Default for Claims<K, E> {
    fn default() -> Self {
        Self {
            by_key: BTreeMap::new(),
        }
    }
}

impl<K: Ord + Copy, E: Clone + PartialEq> Claims<K, E> {
    /// Sets (`Some`) or withdraws (`None`) the claim of `rank` on `key`.
    pub fn set(&mut self, key: K, rank: Rank, e: Option<E>) {
        match e {
            Some(e) => {
                let m = self.by_key.entry(key).or_insert_with(|| Vec::with_capacity(1));
                match m.binary_search_by(|(r, _)| r.cmp(&rank)) {
                    Ok(i) => m[i].1 = e,
                    Err(i) => {
                        m.reserve_exact(1);
                        m.insert(i, (rank, e));
                    }
                }
            }
            None => {
                if let Some(m) = self.by_key.get_mut(&key) {
                    if let Ok(i) = m.binary_search_by(|(r, _)| r.cmp(&rank)) {
                        m.remove(i);
                    }
                    if m.is_empty() {
                        self.by_key.remove(&key);
                    }
                }
            }
        }
    }

    /// Withdraws the claims on `key` for which `f` holds; returns them.
    pub fn withdraw_where(&mut self, key: K, f: impl Fn(&Rank) -> bool) -> Vec<Rank> {
        let Some(m) = self.by_key.get_mut(&key) else {
            return Vec::new();
        };
        let gone: Vec<Rank> = m.iter().filter(|(r, _)| f(r)).map(|(r, _)| r.clone()).collect();
        m.retain(|(r, _)| !f(r));
        if m.is_empty() {
            self.by_key.remove(&key);
        }
        gone
    }

    /// The winning claim on `key`.
    #[must_use]
    pub fn winner(&self, key: &K) -> Option<&E> {
        self.by_key.get(key).and_then(|m| m.first()).map(|(_, e)| e)
    }

    /// The ranks claiming `key`, the winner first.
    #[must_use]
    pub fn ranks(&self, key: &K) -> Vec<&Rank> {
        self.by_key
            .get(key)
            .map(|m| m.iter().map(|(r, _)| r).collect())
            .unwrap_or_default()
    }

    /// Every key with its winning claim.
    pub fn winners(&self) -> impl Iterator<Item = (&K, &E)> {
        self.by_key
            .iter()
            .filter_map(|(k, m)| m.first().map(|(_, e)| (k, e)))
    }

    /// Keys claimed more than once within one group of tiers (`group` maps a tier to its group): the ranks of
    /// each, the winner first.
    pub fn contested(&self, group: impl Fn(u8) -> u8) -> Vec<(K, Vec<Rank>)> {
        let mut out = Vec::new();
        for (k, m) in &self.by_key {
            let mut by_group: BTreeMap<u8, Vec<Rank>> = BTreeMap::new();
            for (r, _) in m {
                by_group.entry(group(r.tier)).or_default().push(r.clone());
            }
            for (_, ranks) in by_group.into_iter().filter(|(_, r)| r.len() > 1) {
                out.push((*k, ranks));
            }
        }
        out
    }

    #[must_use]
    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }
}

/// Shared names (cluster and node names repeat in millions of claims).
#[derive(Debug, Default)]
pub struct Names(BTreeMap<String, Arc<str>>);

impl Names {
    /// The shared copy of `name`.
    pub fn get(&mut self, name: &str) -> Arc<str> {
        if let Some(n) = self.0.get(name) {
            return n.clone();
        }
        let n: Arc<str> = Arc::from(name);
        self.0.insert(name.to_owned(), n.clone());
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rank(tier: u8, cluster: &str) -> Rank {
        Rank {
            tier,
            cluster: cluster.into(),
            node: "".into(),
        }
    }

    #[test]
    fn the_first_rank_wins_and_the_next_takes_over_when_it_goes() {
        let mut c: Claims<u32, &str> = Claims::default();
        c.set(1, rank(1, "west"), Some("w"));
        c.set(1, rank(1, "north"), Some("n"));
        assert_eq!(c.winner(&1), Some(&"n"), "peers by name");
        c.set(1, rank(0, "east"), Some("e"));
        assert_eq!(c.winner(&1), Some(&"e"), "a lower tier first");
        assert_eq!(
            c.contested(|t| t).len(),
            1,
            "north and west contest within tier 1"
        );
        c.set(1, rank(0, "east"), None);
        c.set(1, rank(1, "north"), None);
        assert_eq!(c.winner(&1), Some(&"w"));
        assert_eq!(c.withdraw_where(1, |r| &*r.cluster == "west").len(), 1);
        assert!(c.is_empty());
    }
}
