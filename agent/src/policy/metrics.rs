//! `ambit_authorization_decisions_total`: the authorizer's decision counts, exported.

use std::collections::BTreeMap;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use super::authorizer::DecisionKey;
use crate::observability::metrics::raise_counter_to;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    /// `allow` or `deny`.
    pub action: &'static str,
    /// `<namespace>/<name>` of the deciding policy, `none` when no policy decided. Bounded by
    /// the number of policies.
    pub policy: String,
    pub reason: &'static str,
}

#[derive(Debug, Default)]
pub struct Metrics {
    decisions: Family<DecisionLabels, Counter>,
}

impl Metrics {
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "ambit_authorization_decisions",
            "Inbound authorization decisions by action, deciding policy and reason",
            m.decisions.clone(),
        );
        m
    }

    /// Brings the counters up to the authorizer's own counts (called before each scrape;
    /// the authorizer keeps counting on its hot path without knowing about metrics).
    pub fn sync(&self, counts: &BTreeMap<DecisionKey, u64>) {
        for (key, &count) in counts {
            let labels = DecisionLabels {
                action: if key.allowed { "allow" } else { "deny" },
                policy: key
                    .policy
                    .as_ref()
                    .map_or_else(|| "none".to_owned(), ToString::to_string),
                reason: key.reason.as_str(),
            };
            let counter = self.decisions.get_or_create(&labels);
            // Counts only grow; a smaller one would mean a new authorizer, so keep ours.
            raise_counter_to(&counter, count);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{DecisionReason, PolicyName};

    #[test]
    fn sync_exports_counts_once() {
        let mut registry = Registry::default();
        let m = Metrics::new(&mut registry);
        let key = DecisionKey {
            allowed: false,
            reason: DecisionReason::MtlsRequired,
            policy: Some(PolicyName::new("mesh", "strict")),
        };
        m.sync(&BTreeMap::from([(key.clone(), 2)]));
        m.sync(&BTreeMap::from([(key, 3)]));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encodes");
        assert!(
            text.contains(
                "ambit_authorization_decisions_total{action=\"deny\",policy=\"mesh/strict\",reason=\"mtls_required\"} 3"
            ),
            "{text}"
        );
    }
}
