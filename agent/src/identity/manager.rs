//! [`CertManager`]: one cached, automatically renewed certificate per
//! workload identity on this node.
//!
//! Certificates are fetched on first use, not when a pod appears, so an
//! identity that never talks costs nothing. Each cached certificate gets a
//! background task that renews it at half its lifetime and, if the CA is
//! down, keeps retrying with back-off while the old certificate is served.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use arc_swap::{ArcSwap, ArcSwapOption};
use rand::Rng;
use serde::Serialize;
use tokio::task::AbortHandle;

use super::{
    CertificateAuthority, IdentityError, Result, SpiffeId, TrustBundle, WorkloadCertificate,
};

/// First retry delay after a failed renewal.
const BACKOFF_INITIAL: Duration = Duration::from_millis(500);
/// Retry delay cap: a CA outage is retried at least every 150 s, so recovery
/// is noticed quickly without every node hammering a struggling CA.
const BACKOFF_MAX: Duration = Duration::from_secs(150);
/// Floor between renewals, so a CA handing out oddly short certificates
/// cannot turn the renewal task into a busy loop.
const MIN_RENEW_DELAY: Duration = Duration::from_millis(100);

/// The wall clock certificates are judged by. Sleeps go through tokio's timer, so a test
/// pairs a clock derived from tokio's (paused) time with `tokio::time::pause` and renewal
/// runs deterministically, without racing real time.
pub trait Clock: Send + Sync {
    fn now(&self) -> SystemTime;
}

/// The system's wall clock.
#[derive(Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// What the admin endpoint shows per cached certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CertSummary {
    pub identity: SpiffeId,
    pub serial: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

/// Counter values at one point in time (metrics wiring comes later).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct CertManagerStats {
    /// Certificates issued on demand by `get`.
    pub issued: u64,
    /// On-demand issuances that failed.
    pub issue_failures: u64,
    /// Successful background renewals.
    pub renewals: u64,
    /// Failed background renewal attempts (each retry counts).
    pub renewal_failures: u64,
}

#[derive(Default)]
struct Counters {
    issued: AtomicU64,
    issue_failures: AtomicU64,
    renewals: AtomicU64,
    renewal_failures: AtomicU64,
}

/// Hands out certificates per identity; cheap to clone (shared state).
#[derive(Clone)]
pub struct CertManager {
    inner: Arc<Inner>,
}

struct Inner {
    ca: Arc<dyn CertificateAuthority>,
    ttl: Duration,
    clock: Arc<dyn Clock>,
    /// Read by every new HBONE connection, changed by the control plane (`retain`) and by
    /// the first `get` of an identity: copied on change, so a lookup takes no lock.
    entries: ArcSwap<HashMap<SpiffeId, Arc<Entry>>>,
    counters: Arc<Counters>,
    /// The runtime the manager was made on (the agent's control plane): renewals run there
    /// even when a connection's first `get` comes from a data-path thread.
    runtime: Option<tokio::runtime::Handle>,
}

struct Entry {
    id: SpiffeId,
    /// The certificate new callers get; loaded without a lock, so the hot path never
    /// waits on an issuance or renewal in progress.
    current: ArcSwapOption<WorkloadCertificate>,
    /// Serialises issuance for this identity (single flight). Holds the
    /// error of the last attempt so callers that queued behind a failed
    /// attempt share its result instead of each retrying at once.
    flight: tokio::sync::Mutex<Option<Arc<IdentityError>>>,
    /// Completed issuance attempts; read before queueing on `flight` to tell
    /// whether an attempt finished while we waited.
    attempts: AtomicU64,
    renewer: Mutex<Renewer>,
}

#[derive(Default)]
struct Renewer {
    /// Set when the identity is forgotten (`retain`); no renewal task may start afterwards.
    forgotten: bool,
    task: Option<AbortHandle>,
}

impl CertManager {
    pub fn new(ca: Arc<dyn CertificateAuthority>, ttl: Duration) -> Self {
        Self::with_clock(ca, ttl, Arc::new(SystemClock))
    }

    /// A manager that reads the time from `clock` (tests).
    pub fn with_clock(
        ca: Arc<dyn CertificateAuthority>,
        ttl: Duration,
        clock: Arc<dyn Clock>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                ca,
                ttl,
                clock,
                entries: ArcSwap::default(),
                counters: Arc::new(Counters::default()),
                runtime: tokio::runtime::Handle::try_current().ok(),
            }),
        }
    }

    /// The certificate for `id`, issuing one if none is cached or the cached
    /// one has expired. Concurrent callers for the same identity share one
    /// issuance. Must be called within a tokio runtime (renewal is spawned).
    pub async fn get(&self, id: &SpiffeId) -> Result<Arc<WorkloadCertificate>> {
        let entry = self.inner.entry(id);
        let clock = self.inner.clock.as_ref();
        if let Some(cert) = entry.unexpired(clock.now()) {
            return Ok(cert);
        }

        let seen = entry.attempts.load(Ordering::Acquire);
        let mut last_error = entry.flight.lock().await;
        // Whoever held the lock before us may have just succeeded...
        if let Some(cert) = entry.unexpired(clock.now()) {
            return Ok(cert);
        }
        // ...or just failed, in which case we report that instead of
        // immediately asking a failing CA again.
        if entry.attempts.load(Ordering::Acquire) != seen
            && let Some(err) = last_error.as_ref()
        {
            return Err(IdentityError::Shared(Arc::clone(err)));
        }

        let result = checked(id, self.inner.ca.issue(id, self.inner.ttl).await, clock);
        entry.attempts.fetch_add(1, Ordering::AcqRel);
        let counters = &self.inner.counters;
        match result {
            Ok(cert) => {
                *last_error = None;
                let cert = Arc::new(cert);
                entry.set(Arc::clone(&cert));
                counters.issued.fetch_add(1, Ordering::Relaxed);
                tracing::info!(identity = %id, serial = %cert.serial, "issued workload certificate");
                drop(last_error);
                self.inner.ensure_renewer(&entry);
                Ok(cert)
            }
            Err(err) => {
                counters.issue_failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(identity = %id, error = %err, "certificate issuance failed");
                let err = Arc::new(err);
                *last_error = Some(Arc::clone(&err));
                Err(IdentityError::Shared(err))
            }
        }
    }

    /// Stops caching and renewing every identity `keep` refuses (their workloads are
    /// gone); returns how many. Holders of their certificates keep them; a later `get`
    /// starts from scratch.
    pub fn retain(&self, mut keep: impl FnMut(&SpiffeId) -> bool) -> usize {
        let mut removed: Vec<Arc<Entry>> = Vec::new();
        self.inner.entries.rcu(|entries| {
            // `rcu` runs this again if a first `get` changed the map meanwhile.
            removed.clear();
            let mut kept = HashMap::with_capacity(entries.len());
            for (id, entry) in entries.iter() {
                if keep(id) {
                    kept.insert(id.clone(), Arc::clone(entry));
                } else {
                    removed.push(Arc::clone(entry));
                }
            }
            kept
        });
        for entry in &removed {
            entry.stop_renewing();
        }
        removed.len()
    }

    /// The CA's current bundle, shared (no copy per connection).
    pub fn trust_bundle(&self) -> Arc<TrustBundle> {
        self.inner.ca.trust_bundle()
    }

    /// Cached certificates, sorted by identity.
    pub fn snapshot(&self) -> Vec<CertSummary> {
        let mut out: Vec<CertSummary> = self
            .inner
            .entries
            .load()
            .values()
            .filter_map(|entry| entry.current())
            .map(|cert| CertSummary {
                identity: cert.identity.clone(),
                serial: cert.serial.clone(),
                not_before: cert.not_before,
                not_after: cert.not_after,
            })
            .collect();
        out.sort_by(|a, b| a.identity.cmp(&b.identity));
        out
    }

    /// Cached certificates (chain included), sorted by identity; for the admin endpoint.
    pub fn certificates(&self) -> Vec<Arc<WorkloadCertificate>> {
        let mut out: Vec<_> = (self.inner.entries.load().values())
            .filter_map(|e| e.current())
            .collect();
        out.sort_by(|a, b| a.identity.cmp(&b.identity));
        out
    }

    pub fn stats(&self) -> CertManagerStats {
        let c = &self.inner.counters;
        CertManagerStats {
            issued: c.issued.load(Ordering::Relaxed),
            issue_failures: c.issue_failures.load(Ordering::Relaxed),
            renewals: c.renewals.load(Ordering::Relaxed),
            renewal_failures: c.renewal_failures.load(Ordering::Relaxed),
        }
    }
}

impl std::fmt::Debug for CertManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertManager")
            .field("ttl", &self.inner.ttl)
            .field("identities", &self.inner.entries.load().len())
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl Inner {
    fn entry(&self, id: &SpiffeId) -> Arc<Entry> {
        if let Some(entry) = self.entries.load().get(id) {
            return Arc::clone(entry);
        }
        // An identity's first use: a new map with it (identities per node are few).
        let fresh = Arc::new(Entry {
            id: id.clone(),
            current: ArcSwapOption::empty(),
            flight: tokio::sync::Mutex::new(None),
            attempts: AtomicU64::new(0),
            renewer: Mutex::new(Renewer::default()),
        });
        let mut found = None;
        self.entries.rcu(|entries| {
            // Another caller may have added it meanwhile: theirs is the one.
            found = entries.get(id).cloned();
            if found.is_some() {
                return Arc::clone(entries);
            }
            let mut with = HashMap::clone(entries);
            with.insert(id.clone(), Arc::clone(&fresh));
            Arc::new(with)
        });
        found.unwrap_or(fresh)
    }

    fn ensure_renewer(&self, entry: &Arc<Entry>) {
        let mut renewer = lock(&entry.renewer);
        // Checked under the same lock forgetting takes, so a `get` racing with
        // `retain` cannot leave a renewal task behind for a gone workload.
        if renewer.forgotten || renewer.task.is_some() {
            return;
        }
        let renewal = renew_loop(
            Arc::clone(&self.ca),
            self.ttl,
            Arc::clone(&self.clock),
            Arc::clone(entry),
            Arc::clone(&self.counters),
        );
        let task = match &self.runtime {
            Some(runtime) => runtime.spawn(renewal),
            None => tokio::spawn(renewal),
        };
        renewer.task = Some(task.abort_handle());
    }
}

impl Drop for Inner {
    /// Renewal tasks hold no reference back to the manager, so without this
    /// they would outlive it and renew certificates nobody can read.
    fn drop(&mut self) {
        for entry in self.entries.load().values() {
            entry.stop_renewing();
        }
    }
}

impl Entry {
    fn current(&self) -> Option<Arc<WorkloadCertificate>> {
        self.current.load_full()
    }

    fn unexpired(&self, now: SystemTime) -> Option<Arc<WorkloadCertificate>> {
        self.current().filter(|cert| now < cert.not_after)
    }

    fn set(&self, cert: Arc<WorkloadCertificate>) {
        self.current.store(Some(cert));
    }

    fn is_current(&self, cert: &Arc<WorkloadCertificate>) -> bool {
        self.current().is_some_and(|c| Arc::ptr_eq(&c, cert))
    }

    fn stop_renewing(&self) {
        let mut renewer = lock(&self.renewer);
        renewer.forgotten = true;
        if let Some(task) = renewer.task.take() {
            task.abort();
        }
    }
}

/// Renews `entry`'s certificate at half life, forever (until aborted).
async fn renew_loop(
    ca: Arc<dyn CertificateAuthority>,
    ttl: Duration,
    clock: Arc<dyn Clock>,
    entry: Arc<Entry>,
    counters: Arc<Counters>,
) {
    loop {
        let Some(old) = entry.current() else {
            return; // only spawned after a certificate was stored
        };
        // Converted to a monotonic sleep now; a wall-clock jump while
        // sleeping shifts renewal by at most that jump.
        let wait = until(old.refresh_at(), clock.now()).max(MIN_RENEW_DELAY);
        tokio::time::sleep(wait).await;

        let mut delay = BACKOFF_INITIAL;
        loop {
            let mut last_error = entry.flight.lock().await;
            // `get` may have replaced an expired certificate while we slept
            // in back-off; then schedule from that one instead.
            if !entry.is_current(&old) {
                break;
            }
            let result = checked(&entry.id, ca.issue(&entry.id, ttl).await, clock.as_ref());
            entry.attempts.fetch_add(1, Ordering::AcqRel);
            match result {
                Ok(cert) => {
                    *last_error = None;
                    counters.renewals.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(
                        identity = %entry.id,
                        old_serial = %old.serial,
                        serial = %cert.serial,
                        "renewed workload certificate"
                    );
                    entry.set(Arc::new(cert));
                    break;
                }
                Err(err) => {
                    counters.renewal_failures.fetch_add(1, Ordering::Relaxed);
                    let still_valid = clock.now() < old.not_after;
                    tracing::warn!(
                        identity = %entry.id,
                        error = %err,
                        still_valid,
                        retry_in = ?delay,
                        "certificate renewal failed; keeping the current certificate"
                    );
                    *last_error = Some(Arc::new(err));
                }
            }
            drop(last_error);
            tokio::time::sleep(jittered(delay)).await;
            delay = (delay * 2).min(BACKOFF_MAX);
        }
    }
}

/// Rejects CA answers that would be wrong to cache: a certificate for
/// another identity, or one already expired (which would also make the
/// renewal loop spin). Stamps the certificate as obtained now.
fn checked(
    id: &SpiffeId,
    result: Result<WorkloadCertificate>,
    clock: &dyn Clock,
) -> Result<WorkloadCertificate> {
    let mut cert = result?;
    let now = clock.now();
    if cert.identity != *id {
        return Err(IdentityError::Ca(format!(
            "asked for {id}, got a certificate for {}",
            cert.identity
        )));
    }
    if cert.not_after <= now {
        return Err(IdentityError::Ca(format!(
            "certificate for {id} is already expired"
        )));
    }
    cert.issued_at = now;
    Ok(cert)
}

fn until(t: SystemTime, now: SystemTime) -> Duration {
    t.duration_since(now).unwrap_or(Duration::ZERO)
}

/// A delay between half and all of `d`, so agents that lost the CA at the
/// same moment do not all come back at the same moment.
fn jittered(d: Duration) -> Duration {
    d.mul_f64(rand::rng().random_range(0.5..=1.0))
}

/// Locks a std mutex, ignoring poisoning: no code path panics while holding
/// these locks, and the data (a flag, a task handle) stays consistent regardless.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use futures::future::BoxFuture;

    use super::*;
    use crate::identity::LocalCa;

    /// Wall-clock time that moves with tokio's clock: under `start_paused` it advances
    /// only when the test's tasks all wait, by exactly what they wait for. Starts on a
    /// whole second, so X.509's one-second resolution loses nothing.
    struct TokioClock {
        base: SystemTime,
        start: tokio::time::Instant,
    }

    impl TokioClock {
        fn new() -> Arc<Self> {
            let secs = SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs();
            Arc::new(Self {
                base: std::time::UNIX_EPOCH + Duration::from_secs(secs),
                start: tokio::time::Instant::now(),
            })
        }
    }

    impl Clock for TokioClock {
        fn now(&self) -> SystemTime {
            self.base + self.start.elapsed()
        }
    }

    /// A CA that counts calls, can fail the next N calls, and can be slow.
    struct FakeCa {
        ca: LocalCa,
        calls: AtomicUsize,
        fail_next: AtomicUsize,
        delay: Duration,
        clock: Arc<TokioClock>,
    }

    impl FakeCa {
        fn new(delay: Duration) -> Arc<Self> {
            Arc::new(Self {
                ca: LocalCa::generate().unwrap(),
                calls: AtomicUsize::new(0),
                fail_next: AtomicUsize::new(0),
                delay,
                clock: TokioClock::new(),
            })
        }

        /// A manager on the same clock as this CA.
        fn manager(self: &Arc<Self>, ttl: Duration) -> CertManager {
            CertManager::with_clock(self.clone(), ttl, self.clock.clone())
        }

        fn now(&self) -> SystemTime {
            self.clock.now()
        }

        fn calls(&self) -> usize {
            self.calls.load(Ordering::SeqCst)
        }
    }

    impl CertificateAuthority for FakeCa {
        fn issue(
            &self,
            id: &SpiffeId,
            ttl: Duration,
        ) -> BoxFuture<'_, Result<WorkloadCertificate, IdentityError>> {
            let id = id.clone();
            Box::pin(async move {
                self.calls.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(self.delay).await;
                let failing = self
                    .fail_next
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .is_ok();
                if failing {
                    return Err(IdentityError::Ca("injected failure".into()));
                }
                // No backdating, so lifetimes are exactly what tests ask for.
                let now = self.clock.now();
                self.ca.issue_with_validity(&id, now, now + ttl)
            })
        }

        fn trust_bundle(&self) -> Arc<TrustBundle> {
            self.ca.trust_bundle()
        }
    }

    fn id(sa: &str) -> SpiffeId {
        SpiffeId::new("cluster.local", "default", sa).unwrap()
    }

    // Every test runs on paused tokio time with the manager and the CA on the same clock
    // derived from it: sleeps advance time exactly, so the renewal instants are exact.

    #[tokio::test(start_paused = true)]
    async fn concurrent_gets_share_one_issuance() {
        let ca = FakeCa::new(Duration::from_millis(100));
        let mgr = ca.manager(Duration::from_secs(3600));
        let a = id("a");
        let certs = futures::future::join_all((0..50).map(|_| {
            let mgr = mgr.clone();
            let a = a.clone();
            tokio::spawn(async move { mgr.get(&a).await })
        }))
        .await;
        let certs: Vec<_> = certs.into_iter().map(|r| r.unwrap().unwrap()).collect();
        assert_eq!(ca.calls(), 1);
        assert!(certs.iter().all(|c| Arc::ptr_eq(c, &certs[0])));
        assert_eq!(mgr.stats().issued, 1);
        // Cached afterwards; a different identity gets its own certificate.
        mgr.get(&a).await.unwrap();
        let b = mgr.get(&id("b")).await.unwrap();
        assert_eq!(b.identity, id("b"));
        assert_eq!(ca.calls(), 2);
        let snapshot = mgr.snapshot();
        assert_eq!(
            snapshot.iter().map(|s| &s.identity).collect::<Vec<_>>(),
            [&id("a"), &id("b")]
        );
        assert_eq!(snapshot[0].serial, certs[0].serial);
        assert_eq!(mgr.trust_bundle(), ca.trust_bundle());
    }

    /// First uses of many identities at once, from several threads, while the control
    /// plane retains: the copy-on-write map loses no identity and makes no second entry
    /// (which would be a second issuance) for any.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn first_gets_racing_on_threads_make_one_entry_per_identity() {
        let ca = FakeCa::new(Duration::ZERO);
        let mgr = ca.manager(Duration::from_secs(3600));
        let ids: Arc<Vec<SpiffeId>> = Arc::new((0..40).map(|i| id(&format!("sa{i}"))).collect());
        let getters = (0..8).map(|t| {
            let (mgr, ids) = (mgr.clone(), ids.clone());
            tokio::spawn(async move {
                // Each task walks the identities from its own starting point.
                for i in 0..ids.len() {
                    mgr.get(&ids[(i + t * 5) % ids.len()])
                        .await
                        .expect("issued");
                }
            })
        });
        let retainer = {
            let mgr = mgr.clone();
            tokio::spawn(async move {
                for _ in 0..200 {
                    assert_eq!(mgr.retain(|_| true), 0);
                    tokio::task::yield_now().await;
                }
            })
        };
        for task in futures::future::join_all(getters).await {
            task.expect("getter");
        }
        retainer.await.expect("retainer");
        assert_eq!(ca.calls(), ids.len());
        assert_eq!(mgr.snapshot().len(), ids.len());
        // Every identity's certificate is the one cached: no caller got an orphan entry's.
        for id in ids.iter() {
            let cached = mgr.get(id).await.expect("cached");
            let listed = mgr.certificates();
            assert!(listed.iter().any(|c| Arc::ptr_eq(c, &cached)));
        }
        assert_eq!(ca.calls(), ids.len());
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_gets_share_one_failure() {
        let ca = FakeCa::new(Duration::from_millis(100));
        ca.fail_next.store(usize::MAX, Ordering::SeqCst);
        let mgr = ca.manager(Duration::from_secs(3600));
        let a = id("a");
        let results = futures::future::join_all((0..20).map(|_| mgr.get(&a))).await;
        assert!(results.iter().all(|r| r.is_err()));
        assert_eq!(ca.calls(), 1);
        // A later caller tries again rather than replaying the old error.
        ca.fail_next.store(0, Ordering::SeqCst);
        mgr.get(&a).await.unwrap();
        assert_eq!(ca.calls(), 2);
        assert_eq!(mgr.stats().issue_failures, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn renews_at_half_life() {
        let ca = FakeCa::new(Duration::ZERO);
        let mgr = ca.manager(Duration::from_secs(4));
        let a = id("a");
        let first = mgr.get(&a).await.unwrap();
        assert_eq!(first.refresh_at(), first.issued_at + Duration::from_secs(2));

        tokio::time::sleep(Duration::from_millis(1999)).await;
        assert_eq!(
            mgr.get(&a).await.unwrap().serial,
            first.serial,
            "renewed before half life"
        );
        assert_eq!(ca.calls(), 1);

        tokio::time::sleep(Duration::from_millis(2)).await;
        let second = mgr.get(&a).await.unwrap();
        assert_ne!(second.serial, first.serial, "not renewed at half life");
        assert_eq!(ca.calls(), 2);
        assert_eq!(mgr.stats().renewals, 1);
        // The next renewal is timed from the new certificate: half of its life later.
        tokio::time::sleep(Duration::from_millis(1998)).await;
        assert_eq!(mgr.get(&a).await.unwrap().serial, second.serial);
        tokio::time::sleep(Duration::from_millis(2)).await;
        assert_eq!(mgr.stats().renewals, 2);
        // The old Arc's holder still has an intact certificate.
        assert_eq!(first.identity, a);
        first.certified_key().unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn failed_renewal_keeps_the_old_certificate_and_retries() {
        let ca = FakeCa::new(Duration::ZERO);
        let mgr = ca.manager(Duration::from_secs(4));
        let a = id("a");
        let first = mgr.get(&a).await.unwrap();
        ca.fail_next.store(1, Ordering::SeqCst);

        // Half life (2 s): the attempt fails.
        tokio::time::sleep(Duration::from_millis(2001)).await;
        assert_eq!(mgr.stats().renewal_failures, 1);
        assert_eq!(mgr.stats().renewals, 0);
        // The retry comes 250-500 ms later (jittered); meanwhile the old one is served.
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(mgr.get(&a).await.unwrap().serial, first.serial);
        assert_eq!(ca.calls(), 2);

        tokio::time::sleep(Duration::from_millis(350)).await;
        assert_eq!(mgr.stats().renewals, 1, "retried within 500 ms");
        let renewed = mgr.get(&a).await.unwrap();
        assert_ne!(renewed.serial, first.serial);
        assert!(ca.now() < first.not_after, "retry beat expiry");
        assert_eq!(ca.calls(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn expired_certificate_is_reissued_or_get_fails() {
        let ca = FakeCa::new(Duration::ZERO);
        let mgr = ca.manager(Duration::from_secs(2));
        let a = id("a");
        let first = mgr.get(&a).await.unwrap();
        ca.fail_next.store(usize::MAX, Ordering::SeqCst);
        tokio::time::sleep(until(first.not_after, ca.now()) + Duration::from_millis(1)).await;

        assert!(ca.now() > first.not_after);
        assert!(mgr.get(&a).await.is_err(), "expired and CA down: must fail");
        ca.fail_next.store(0, Ordering::SeqCst);
        let fresh = mgr.get(&a).await.unwrap();
        assert_ne!(fresh.serial, first.serial);
        assert!(ca.now() < fresh.not_after);
    }

    #[tokio::test(start_paused = true)]
    async fn retain_forgets_the_identities_not_kept_and_stops_their_renewal() {
        let ca = FakeCa::new(Duration::ZERO);
        let mgr = ca.manager(Duration::from_secs(2));
        let (kept, dropped) = (id("kept"), id("dropped"));
        mgr.get(&kept).await.unwrap();
        mgr.get(&dropped).await.unwrap();
        assert_eq!(mgr.retain(|id| *id == kept), 1);
        let left: Vec<SpiffeId> = mgr.snapshot().into_iter().map(|c| c.identity).collect();
        assert_eq!(left, std::slice::from_ref(&kept));
        // Renewal comes at half-life (1 s): only the kept identity renews.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(ca.calls(), 3, "two issuances and one renewal");
        assert_eq!(mgr.retain(|_| true), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn forget_stops_renewal() {
        let ca = FakeCa::new(Duration::ZERO);
        let mgr = ca.manager(Duration::from_secs(2));
        let a = id("a");
        mgr.get(&a).await.unwrap();
        assert_eq!(mgr.retain(|id| *id != a), 1);
        assert_eq!(mgr.retain(|id| *id != a), 0);
        assert!(mgr.snapshot().is_empty());
        // Renewal would have come at 1 s, and again every second after.
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert_eq!(ca.calls(), 1);
        assert_eq!(mgr.stats().renewals, 0);
        // A later get starts over with a fresh issuance.
        mgr.get(&a).await.unwrap();
        assert_eq!(ca.calls(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn dropping_the_manager_stops_renewal() {
        let ca = FakeCa::new(Duration::ZERO);
        let mgr = ca.manager(Duration::from_secs(2));
        mgr.get(&id("a")).await.unwrap();
        drop(mgr);
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert_eq!(ca.calls(), 1);
    }

    #[tokio::test]
    async fn rejects_a_certificate_for_another_identity() {
        struct WrongCa(LocalCa);
        impl CertificateAuthority for WrongCa {
            fn issue(
                &self,
                _id: &SpiffeId,
                ttl: Duration,
            ) -> BoxFuture<'_, Result<WorkloadCertificate, IdentityError>> {
                self.0.issue(&id("someone-else"), ttl)
            }
            fn trust_bundle(&self) -> Arc<TrustBundle> {
                self.0.trust_bundle()
            }
        }
        let mgr = CertManager::new(
            Arc::new(WrongCa(LocalCa::generate().unwrap())),
            Duration::from_secs(60),
        );
        let err = mgr.get(&id("a")).await.unwrap_err();
        assert!(err.to_string().contains("someone-else"), "{err}");
    }
}
