//! Hands the heap's free memory back to the kernel once a load has gone.
//!
//! glibc keeps what is freed below a block still in use, and up to its trim threshold at
//! each arena's top: after 10,000 proxied connections closed, the soak's agents stayed at
//! twice the RSS they had before the load. `malloc_trim` returns those pages, but it walks
//! each arena under that arena's lock, which the data path's allocations then wait for
//! (2–8 ms in the soak), and the pages it hands back are faulted in again if a load returns;
//! so it runs only once the open connections have clearly fallen and stopped moving up, at
//! most every 30 s (a slow drain gets a release every 30 s, not one per sample), on a
//! blocking thread (never on the async workers).

use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{info, warn};

use crate::tunnel::Metrics;

/// How often the count of open proxied connections is sampled.
const SAMPLE_EVERY: Duration = Duration::from_secs(5);

/// Connections that must have closed since the highest count seen before the heap is
/// released: a few KiB each, so what a smaller fall frees is not worth a walk of the heap.
const RELEASE_AFTER_FALL: usize = 1_000;

/// Samples between two releases at least (30 s): a slow drain releases every so often,
/// not at each step.
const SAMPLES_BETWEEN_RELEASES: u32 = 6;

/// Decides from samples of the live connection count when to release the heap.
#[derive(Debug)]
struct ReleasePolicy {
    /// The highest count since the last release (or the start).
    peak: usize,
    previous: usize,
    samples_since_release: u32,
}

impl Default for ReleasePolicy {
    fn default() -> Self {
        Self {
            peak: 0,
            previous: 0,
            samples_since_release: SAMPLES_BETWEEN_RELEASES,
        }
    }
}

impl ReleasePolicy {
    /// Takes one sample; `Some(peak)`, the count it fell from, when the heap should be
    /// released now: the count is [`RELEASE_AFTER_FALL`] below its peak and has settled (not
    /// above the last sample, and at most 5 % + 16 below it: a load still moving would only
    /// allocate again under the walk's locks), and the last release is
    /// [`SAMPLES_BETWEEN_RELEASES`] samples back.
    fn sample(&mut self, live: usize) -> Option<usize> {
        self.peak = self.peak.max(live);
        self.samples_since_release = self.samples_since_release.saturating_add(1);
        let settled = live <= self.previous && self.previous - live <= self.previous / 20 + 16;
        self.previous = live;
        if settled
            && self.peak - live >= RELEASE_AFTER_FALL
            && self.samples_since_release >= SAMPLES_BETWEEN_RELEASES
        {
            self.samples_since_release = 0;
            return Some(std::mem::replace(&mut self.peak, live));
        }
        None
    }
}

/// Runs for the agent's life on the control plane's runtime.
pub async fn release_after_load(metrics: Arc<Metrics>) {
    let mut policy = ReleasePolicy::default();
    let mut tick = tokio::time::interval(SAMPLE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        // Proxied connections, HBONE streams included (many share a pooled connection).
        let live = metrics.active_connections();
        let Some(peak) = policy.sample(live) else {
            continue;
        };
        let released = tokio::task::spawn_blocking(|| {
            let before = resident_bytes();
            let started = Instant::now();
            crate::sys::release_free_heap();
            (before, resident_bytes(), started.elapsed())
        })
        .await;
        match released {
            Ok((before, after, took)) => info!(
                live,
                peak,
                rss_before_kib = before.map(|b| b / 1024),
                rss_after_kib = after.map(|b| b / 1024),
                took_ms = took.as_secs_f64() * 1e3,
                "returned the heap's free memory to the kernel after the connections fell"
            ),
            Err(e) => warn!(error = %e, "releasing the heap's free memory failed"),
        }
    }
}

/// This process's resident memory (`/proc/self/statm`); `None` where it cannot be read.
fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * u64::from(crate::sys::page_size()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples(policy: &mut ReleasePolicy, counts: &[usize]) -> Vec<bool> {
        counts
            .iter()
            .map(|&live| policy.sample(live).is_some())
            .collect()
    }

    #[test]
    fn the_heap_is_released_once_the_fallen_count_has_settled() {
        let mut policy = ReleasePolicy::default();
        // Load builds up, holds, then goes: one release, once the count stops falling.
        assert_eq!(
            samples(
                &mut policy,
                &[0, 4_000, 10_000, 10_000, 9_500, 8_999, 5_000, 140, 140, 140]
            ),
            [
                false, false, false, false, false, false, false, false, true, false
            ]
        );
    }

    #[test]
    fn no_release_while_the_count_moves_or_after_a_small_fall() {
        let mut policy = ReleasePolicy::default();
        // 1,600 below the peak, but still moving until the last sample.
        assert_eq!(
            samples(&mut policy, &[3_000, 1_000, 1_500, 1_400, 1_400]),
            [false, false, false, false, true]
        );
        let mut policy = ReleasePolicy::default();
        assert_eq!(
            samples(&mut policy, &[3_000, 3_000, 2_500, 2_500, 2_001, 2_001]),
            [false; 6],
            "settled, but never 1,000 below the peak"
        );
    }

    #[test]
    fn a_fall_of_exactly_the_bound_releases_and_a_rising_count_waits() {
        let mut policy = ReleasePolicy::default();
        assert_eq!(
            samples(&mut policy, &[2_000, 2_000, 1_000, 1_000]),
            [false, false, false, true]
        );
        // 1,050 below the peak, but moving up again (if only by 50): wait until it stops.
        let mut policy = ReleasePolicy::default();
        assert_eq!(
            samples(&mut policy, &[3_000, 3_000, 1_900, 1_950, 1_950]),
            [false, false, false, false, true]
        );
    }

    #[test]
    fn releases_are_spaced_and_a_new_peak_needs_its_own_fall() {
        let mut policy = ReleasePolicy::default();
        assert_eq!(
            samples(&mut policy, &[5_000, 5_000, 0, 0]),
            [false, false, false, true]
        );
        // Another load comes and goes at once: its release waits for the spacing.
        assert_eq!(
            samples(&mut policy, &[3_000, 3_000, 0, 0]),
            [false, false, false, false]
        );
        let rest = usize::try_from(SAMPLES_BETWEEN_RELEASES).expect("small") - 4;
        let waited = samples(&mut policy, &vec![0; rest]);
        assert_eq!(waited.iter().filter(|r| **r).count(), 1);
        assert_eq!(
            waited.last(),
            Some(&true),
            "the first sample the spacing allows"
        );
        // The peak was reset by the release: a count that rises to 900 and stays has not
        // fallen at all.
        assert_eq!(samples(&mut policy, &[900; 20]), [false; 20]);
    }

    #[test]
    fn resident_memory_is_read() {
        let rss = resident_bytes().expect("statm");
        assert!(rss > 1024 * 1024, "{rss}");
    }
}
