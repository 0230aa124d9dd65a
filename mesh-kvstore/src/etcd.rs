//! Reading a cluster's records from etcd, as agents and the KVStoreMesh mirror both do: a paged list at one
//! revision (a cluster's state can be far larger than one gRPC message), and the message size limit for it; and
//! the delays between sessions of every etcd client (agents' remote watchers, KVStoreMesh, the publisher).

use std::time::Duration;

use backon::{BackoffBuilder as _, ExponentialBackoff, ExponentialBuilder};
use etcd_client::{Client, GetOptions, WatchClient};

/// Keys per page of a list.
pub const LIST_PAGE: i64 = 500;
/// Largest gRPC message accepted from an etcd (a list page of large records, or a burst of watch events).
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// The end of the key range holding every key that starts with `prefix` (etcd's `--prefix`).
#[must_use]
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// How much of one cluster's records a reader holds at most: beyond that the cluster is refused (its data dropped)
/// rather than let it grow the reader's memory without bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Keys under the cluster's prefix.
    pub max_keys: u64,
    /// Bytes of keys and values under the cluster's prefix.
    pub max_bytes: u64,
}

impl Limits {
    /// Room for a large cluster several times over: 5 000 nodes and 150 000 pods publish about 350 000 keys (an ip
    /// record and a capacity record per pod, identities, nodes, services) in well under 200 MiB, a service record
    /// being at most [`crate::MAX_VALUE_BYTES`].
    pub const DEFAULT: Limits = Limits {
        max_keys: 2_000_000,
        max_bytes: 1 << 30,
    };
    pub const UNLIMITED: Limits = Limits {
        max_keys: u64::MAX,
        max_bytes: u64::MAX,
    };

    /// `Err` with what is exceeded when `keys` or `bytes` are beyond the limits.
    ///
    /// # Errors
    /// When a limit is exceeded.
    pub fn check(&self, keys: u64, bytes: u64) -> Result<(), OverLimit> {
        if keys > self.max_keys || bytes > self.max_bytes {
            return Err(OverLimit {
                keys,
                bytes,
                limits: *self,
            });
        }
        Ok(())
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// A cluster holds more than a reader accepts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "holds {keys} keys / {bytes} bytes (or more), beyond the limits of {} keys / {} bytes",
    limits.max_keys,
    limits.max_bytes
)]
pub struct OverLimit {
    pub keys: u64,
    pub bytes: u64,
    pub limits: Limits,
}

/// Why a bounded list failed.
#[derive(Debug, thiserror::Error)]
pub enum ListError {
    #[error(transparent)]
    Etcd(#[from] etcd_client::Error),
    #[error(transparent)]
    OverLimit(#[from] OverLimit),
}

/// Bytes a key and its value count for in [`Limits`].
#[must_use]
pub fn entry_bytes(key: &[u8], value: &[u8]) -> u64 {
    u64::try_from(key.len() + value.len()).unwrap_or(u64::MAX)
}

/// Every key (UTF-8 ones; others cannot be records) and value under `prefix`, in key order, listed in pages of
/// [`LIST_PAGE`] at the revision of the first page; and that revision (to watch from the next one).
///
/// # Errors
/// When etcd refuses a page or cannot be reached.
pub async fn list_paged(
    client: &Client,
    prefix: &str,
) -> Result<(Vec<(String, Vec<u8>)>, i64), etcd_client::Error> {
    list_paged_within(client, prefix, Limits::UNLIMITED)
        .await
        .map_err(|e| match e {
            ListError::Etcd(e) => e,
            ListError::OverLimit(o) => etcd_client::Error::InvalidArgs(o.to_string()),
        })
}

/// As [`list_paged`], stopping as soon as what is listed exceeds `limits` (all keys count, UTF-8 or not).
///
/// # Errors
/// When etcd refuses a page or cannot be reached, or the limits are exceeded.
pub async fn list_paged_within(
    client: &Client,
    prefix: &str,
    limits: Limits,
) -> Result<(Vec<(String, Vec<u8>)>, i64), ListError> {
    let (mut keys, mut bytes) = (0u64, 0u64);
    let mut kv = client.kv_client().max_decoding_message_size(MAX_MESSAGE_BYTES);
    let end = prefix_end(prefix.as_bytes());
    let mut from = prefix.as_bytes().to_vec();
    let mut revision = 0;
    let mut out = Vec::new();
    loop {
        let mut opts = GetOptions::new().with_range(end.clone()).with_limit(LIST_PAGE);
        if revision > 0 {
            opts = opts.with_revision(revision);
        }
        let page = kv.get(from.clone(), Some(opts)).await?;
        if revision == 0 {
            revision = page
                .header()
                .map(etcd_client::ResponseHeader::revision)
                .unwrap_or_default();
        }
        for kv in page.kvs() {
            keys += 1;
            bytes = bytes.saturating_add(entry_bytes(kv.key(), kv.value()));
            limits.check(keys, bytes)?;
            if let Ok(k) = kv.key_str() {
                out.push((k.to_owned(), kv.value().to_vec()));
            }
        }
        match page.kvs().last() {
            Some(last) if page.more() => {
                from = last.key().to_vec();
                from.push(0);
            }
            _ => break,
        }
    }
    Ok((out, revision))
}

/// A watch client that accepts messages up to [`MAX_MESSAGE_BYTES`].
#[must_use]
pub fn watch_client(client: &Client) -> WatchClient {
    client.watch_client().max_decoding_message_size(MAX_MESSAGE_BYTES)
}

/// First wait before reconnecting to an etcd; it doubles after each failed session up to [`RECONNECT_MAX`].
pub const RECONNECT_MIN: Duration = Duration::from_millis(100);
/// Longest wait between sessions.
pub const RECONNECT_MAX: Duration = Duration::from_secs(5);
/// A session that lasted longer than this was healthy: the next wait starts over from [`RECONNECT_MIN`].
pub const RECONNECT_RESET_AFTER: Duration = Duration::from_secs(10);

const RECONNECT: ExponentialBuilder = ExponentialBuilder::new()
    .with_min_delay(RECONNECT_MIN)
    .with_max_delay(RECONNECT_MAX)
    .without_max_times();

/// The waits between the sessions of one etcd client (no jitter).
#[derive(Debug)]
pub struct Reconnect(ExponentialBackoff);

impl Default for Reconnect {
    fn default() -> Self {
        Self(RECONNECT.build())
    }
}

impl Reconnect {
    /// How long to wait before the next session, now that one that ran for `session` has ended.
    pub fn after(&mut self, session: Duration) -> Duration {
        if session > RECONNECT_RESET_AFTER {
            *self = Self::default();
        }
        let wait = self.0.next().unwrap_or(RECONNECT_MAX);
        // backon doubles in f32 (200.000003ms); whole milliseconds read better in logs.
        Duration::from_millis(u64::try_from(wait.as_millis()).unwrap_or(u64::MAX))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_bound_keys_and_bytes() {
        let l = Limits {
            max_keys: 10,
            max_bytes: 100,
        };
        assert!(l.check(10, 100).is_ok());
        let e = l.check(11, 5).expect_err("keys");
        assert!(
            e.to_string().contains("11 keys") && e.to_string().contains("10 keys"),
            "{e}"
        );
        assert!(l.check(1, 101).is_err());
        assert!(Limits::UNLIMITED.check(u64::MAX, u64::MAX).is_ok());
        assert_eq!(Limits::default(), Limits::DEFAULT);
        assert_eq!(entry_bytes(b"ab", b"cde"), 5);
    }

    #[test]
    fn reconnects_back_off_from_100ms_doubling_to_5s_and_start_over_after_a_healthy_session() {
        let mut r = Reconnect::default();
        let short = Duration::from_secs(1);
        let waits: Vec<u64> = (0..8)
            .map(|_| u64::try_from(r.after(short).as_millis()).unwrap_or_default())
            .collect();
        assert_eq!(waits, [100, 200, 400, 800, 1600, 3200, 5000, 5000]);
        assert_eq!(r.after(RECONNECT_RESET_AFTER + short), RECONNECT_MIN);
        assert_eq!(r.after(short), RECONNECT_MIN * 2);
    }

    #[test]
    fn prefix_end_is_the_first_key_after_the_prefix() {
        assert_eq!(prefix_end(b"fleetmesh/"), b"fleetmesh0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff\xff"), vec![0]);
    }
}
