//! Certificate metrics: expiry per identity and renewal outcomes, read from the
//! [`CertManager`] before each scrape.

use std::time::UNIX_EPOCH;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::CertManager;
use crate::observability::metrics::raise_counter_to;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IdentityLabels {
    /// A SPIFFE ID of a workload on this node: bounded by the node's pods.
    pub identity: String,
}

#[derive(Debug, Default)]
pub struct Metrics {
    expiry: Family<IdentityLabels, Gauge>,
    renewals: Counter,
    renewal_failures: Counter,
}

impl Metrics {
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "ambit_certificate_expiry_timestamp_seconds",
            "Not-after of each cached workload certificate, in Unix seconds",
            m.expiry.clone(),
        );
        registry.register(
            "ambit_certificate_renewals",
            "Successful background certificate renewals",
            m.renewals.clone(),
        );
        registry.register(
            "ambit_certificate_renewal_failures",
            "Failed certificate renewal attempts (each retry counts)",
            m.renewal_failures.clone(),
        );
        m
    }

    pub fn sync(&self, certs: &CertManager) {
        // Rebuilt each time so identities of departed pods disappear.
        self.expiry.clear();
        for cert in certs.snapshot() {
            let secs = cert
                .not_after
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            self.expiry
                .get_or_create(&IdentityLabels {
                    identity: cert.identity.to_string(),
                })
                .set(i64::try_from(secs).unwrap_or(i64::MAX));
        }
        let stats = certs.stats();
        raise_counter_to(&self.renewals, stats.renewals);
        raise_counter_to(&self.renewal_failures, stats.renewal_failures);
    }
}
