//! Giving freed memory back to the kernel after large work.
//!
//! glibc's malloc keeps the pages of freed chunks inside its heaps (only a heap's top is returned): after a
//! bootstrap, a resync or a selector change has parsed and dropped hundreds of megabytes of transient buffers (list
//! responses, decoded records, the previous views), the agent's RSS would keep them until they are reused.
//! `malloc_trim(0)` returns the free pages of every arena. It walks the free chunks, so it is called only after
//! work that freed much: once, when the peers are first all synced (the bootstrap), and after every second of
//! reconcile work since the last trim (resyncs, selector changes, bursts). An idle agent never trims.

use std::time::Duration;

/// Reconcile work after which freed memory is returned.
const WORK_PER_TRIM: Duration = Duration::from_secs(1);

/// Decides when to return freed memory (see the module docs).
#[derive(Debug, Default)]
pub struct Trimmer {
    /// Reconcile work since the last trim.
    work: Duration,
    /// The peers have all been synced once.
    bootstrapped: bool,
    /// Trims done (logged with each).
    pub trims: u64,
}

impl Trimmer {
    /// After a turn that took `work`, with the peers all synced or not: how long returning memory took, when it
    /// was returned now.
    pub fn after_turn(&mut self, work: Duration, synced: bool) -> Option<Duration> {
        self.work += work;
        let first_sync = synced && !self.bootstrapped;
        self.bootstrapped |= synced;
        if !first_sync && self.work < WORK_PER_TRIM {
            return None;
        }
        self.work = Duration::ZERO;
        self.trims += 1;
        let started = std::time::Instant::now();
        trim();
        Some(started.elapsed())
    }
}

/// Returns the free pages of the allocator's heaps to the kernel (glibc only; elsewhere nothing).
fn trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: malloc_trim only takes the allocator's locks and releases free pages; it has no
        // preconditions, and Rust's global allocator here is the system malloc.
        let _ = unsafe { libc::malloc_trim(0) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trims_after_the_first_sync_and_after_a_second_of_work_only() {
        let mut t = Trimmer::default();
        let ms = Duration::from_millis;
        let mut trims = |work, synced| t.after_turn(work, synced).is_some();
        assert!(!trims(ms(10), false), "small work, not synced");
        assert!(trims(ms(10), true), "the first sync");
        assert!(!trims(ms(10), true), "synced again is not a first sync");
        assert!(!trims(ms(600), true));
        assert!(trims(ms(600), true), "over a second of work since the last trim");
        assert!(!trims(Duration::ZERO, true), "idle: never");
        assert!(!trims(ms(5), false), "a peer unsynced");
        assert!(
            !trims(ms(5), true),
            "synced again after a loss: only its work counts"
        );
        assert_eq!(t.trims, 2);
    }
}
