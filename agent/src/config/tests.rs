use std::net::SocketAddr;

use super::*;

const EXAMPLE: &str = include_str!("../../../examples/local.yaml");

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("socket address")
}

#[test]
fn example_file_parses_and_enrolls_only_opted_in_pods_of_this_node() {
    let (state, warnings) = parse(EXAMPLE, "node1").expect("example parses");
    assert!(warnings.is_empty(), "{warnings:?}");
    let local: Vec<_> = state.local_pods().map(|w| w.name.as_str()).collect();
    assert_eq!(local, ["frontend"], "batch opted out; checkout is on node2");
    let (state2, _) = parse(EXAMPLE, "node2").expect("example parses");
    let local2: Vec<_> = state2.local_pods().map(|w| w.name.as_str()).collect();
    assert_eq!(
        local2,
        ["checkout-v1"],
        "reporting's namespace is not opted in"
    );
    assert_eq!(state.policies().len(), 2);
    let frontend = state
        .workload_by_ip("10.11.1.2".parse().expect("ip"))
        .expect("frontend");
    assert_eq!(
        frontend.identity.to_string(),
        "spiffe://cluster.local/ns/shop/sa/frontend"
    );
}

#[test]
fn routes_workloads_services_and_the_rest() {
    let (state, _) = parse(EXAMPLE, "node1").expect("parses");
    match state.route(addr("10.11.2.2:8080"), 0) {
        Route::Hbone {
            workload,
            target,
            hbone_addr,
        } => {
            assert_eq!(workload.name, "checkout-v1");
            assert_eq!(target, addr("10.11.2.2:8080"));
            assert_eq!(hbone_addr, addr("10.11.2.2:15008"));
        }
        other => panic!("expected HBONE, got {other:?}"),
    }
    match state.route(addr("10.96.0.10:80"), 7) {
        Route::Hbone { target, .. } => {
            assert_eq!(target, addr("10.11.2.2:8080"), "VIP -> endpoint:targetPort")
        }
        other => panic!("expected HBONE to the endpoint, got {other:?}"),
    }
    assert_eq!(
        state.route(addr("10.11.2.3:80"), 0),
        Route::Direct {
            target: addr("10.11.2.3:80")
        },
        "a workload outside the mesh is reached directly"
    );
    assert_eq!(
        state.route(addr("10.11.1.3:80"), 0),
        Route::Direct {
            target: addr("10.11.1.3:80")
        },
        "an opted-out pod is reached directly"
    );
    assert_eq!(
        state.route(addr("192.0.2.1:443"), 0),
        Route::Direct {
            target: addr("192.0.2.1:443")
        },
        "passthrough by default"
    );
    let denying = EXAMPLE.replace(
        "unknownDestination: passthrough",
        "unknownDestination: deny",
    );
    let (state, _) = parse(&denying, "node1").expect("parses");
    assert!(matches!(
        state.route(addr("192.0.2.1:443"), 0),
        Route::Deny { .. }
    ));
}

#[test]
fn service_load_is_spread_over_endpoints() {
    let two = EXAMPLE.replace(
        "  - name: batch\n",
        "  - name: checkout-v2\n    namespace: shop\n    serviceAccount: checkout\n    labels: {app: checkout, version: v2}\n    ips: [10.11.1.9]\n    node: node1\n    netns: /run/netns/checkout-v2\n  - name: batch\n",
    );
    let (state, _) = parse(&two, "node1").expect("parses");
    let mut targets: Vec<SocketAddr> = (0..4)
        .filter_map(|i| match state.route(addr("10.96.0.10:80"), i) {
            Route::Hbone { target, .. } => Some(target),
            _ => None,
        })
        .collect();
    targets.sort();
    targets.dedup();
    assert_eq!(targets, [addr("10.11.1.9:8080"), addr("10.11.2.2:8080")]);
}

#[test]
fn bad_files_are_refused_with_the_place_named() {
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "syntax",
            "kind: AmbitLocalConfig\nworkloads: [".into(),
            "document 0",
        ),
        (
            "no config",
            "kind: Other\n".into(),
            "no document of kind AmbitLocalConfig",
        ),
        (
            "two configs",
            format!("{EXAMPLE}\n---\nkind: AmbitLocalConfig\n"),
            "both of kind AmbitLocalConfig",
        ),
        (
            "bad ip",
            EXAMPLE.replace("ips: [10.11.1.2]", "ips: [10.11.1.300]"),
            "line",
        ),
        (
            "duplicate ip",
            EXAMPLE.replace("ips: [10.11.2.3]", "ips: [10.11.2.2]"),
            "workloads[3] (legacy/reporting): IP 10.11.2.2 is already used by shop/checkout-v1",
        ),
        (
            "unknown field",
            EXAMPLE.replace("trustDomain:", "trustDomian:"),
            "unknown field `trustDomian`",
        ),
        (
            "missing netns",
            EXAMPLE.replace("    netns: /run/netns/frontend\n", ""),
            "workloads[0] (shop/frontend): an enrolled workload on this node needs `netns`",
        ),
        (
            "bad service account",
            EXAMPLE.replace("serviceAccount: frontend", "serviceAccount: Front/End"),
            "workloads[0] (shop/frontend)",
        ),
        (
            "bad policy",
            EXAMPLE.replace("mode: STRICT", "mode: STRICTEST"),
            "STRICTEST",
        ),
    ];
    for (name, text, expected) in &cases {
        let err = parse(text, "node1")
            .err()
            .unwrap_or_else(|| panic!("{name}: must be refused"));
        let message = err.to_string();
        assert!(
            message.contains(expected),
            "{name}: {message:?} should contain {expected:?}"
        );
    }
}

mod watching {
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use tokio::sync::watch;

    use super::super::ConfigWatcher;
    use super::super::watch::testing::ScriptedFile;
    use super::*;

    const INTERVAL: Duration = Duration::from_millis(100);
    const SETTLE: Duration = Duration::from_millis(200);

    /// Log output of the current thread (the paused-time tests run on one thread, spawned
    /// tasks included).
    #[derive(Clone, Default)]
    struct LogBuf(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for LogBuf {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("lock").extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogBuf {
        type Writer = LogBuf;
        fn make_writer(&'a self) -> Self::Writer {
            self.clone()
        }
    }

    impl LogBuf {
        fn lines_with(&self, text: &str) -> usize {
            String::from_utf8_lossy(&self.0.lock().expect("lock"))
                .lines()
                .filter(|l| l.contains(text))
                .count()
        }
    }

    fn capture_logs() -> (tracing::subscriber::DefaultGuard, LogBuf) {
        let buf = LogBuf::default();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(buf.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .finish();
        (tracing::subscriber::set_default(subscriber), buf)
    }

    /// Starts a watcher on `file` whose current configuration is `last`, and records every
    /// state it publishes.
    fn start(node: &str, file: &ScriptedFile, last: &str) -> Arc<Mutex<Vec<Arc<MeshState>>>> {
        let (initial, _) = parse(last, node).expect("initial config parses");
        let (tx, mut rx) = watch::channel(Arc::new(initial));
        let watcher =
            ConfigWatcher::new("mesh.yaml".into(), node.into(), INTERVAL).with_settle(SETTLE);
        tokio::spawn(watcher.watch_scripted(file.clone(), last.to_owned(), tx));
        let published = Arc::new(Mutex::new(Vec::new()));
        let record = published.clone();
        tokio::spawn(async move {
            while rx.changed().await.is_ok() {
                let state = rx.borrow_and_update().clone();
                record.lock().expect("lock").push(state);
            }
        });
        published
    }

    #[tokio::test(start_paused = true)]
    async fn a_file_caught_mid_write_is_never_applied() {
        let old = EXAMPLE.replace("excludedPorts: [15021]", "excludedPorts: [15020]");
        // The writer replaces `old` by EXAMPLE in place; part-way through, the file ends
        // at a line end inside the PeerAuthentication document.
        let cut = EXAMPLE
            .find("  namespace: istio-system\n")
            .expect("the PeerAuthentication's namespace line")
            + "  namespace: istio-system\n".len();
        let half = &EXAMPLE[..cut];
        let (half_state, _) = parse(half, "node1").expect("the cut file is valid YAML");
        assert!(
            half_state.policies().len() < 2,
            "the cut loses the policies after it"
        );

        let file = ScriptedFile::new(&old);
        let published = start("node1", &file, &old);
        tokio::time::sleep(Duration::from_millis(50)).await;
        file.set(Some(half));
        // The next poll (t=100 ms) sees the half file; the writer finishes 50 ms later,
        // well within the settle interval.
        tokio::time::sleep(Duration::from_millis(100)).await;
        file.set(Some(EXAMPLE));
        tokio::time::sleep(Duration::from_secs(2)).await;

        assert!(
            file.served().contains(&Some(half.to_owned())),
            "the watcher read the file mid-write"
        );
        let published = published.lock().expect("lock");
        assert_eq!(published.len(), 1, "only the finished file is applied");
        assert_eq!(published[0].policies().len(), 2);
        assert_eq!(published[0].excluded_ports, [15021]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_deleted_file_keeps_the_old_state_and_is_logged_once_per_streak() {
        let (_guard, logs) = capture_logs();
        let unreadable = "configuration file unreadable";
        let file = ScriptedFile::new(EXAMPLE);
        let published = start("node1", &file, EXAMPLE);
        tokio::time::sleep(Duration::from_millis(50)).await;
        file.set(None);
        tokio::time::sleep(Duration::from_secs(1)).await;
        let failed_reads = file.served().iter().filter(|r| r.is_none()).count();
        assert!(failed_reads >= 9, "polled while deleted: {failed_reads}");
        assert!(published.lock().expect("lock").is_empty(), "old state kept");
        assert_eq!(logs.lines_with(unreadable), 1, "logged once for the streak");

        // Written back (changed): applied, and the streak's end is logged.
        let changed = EXAMPLE.replace("excludedPorts: [15021]", "excludedPorts: [15020]");
        file.set(Some(&changed));
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(logs.lines_with("configuration file readable again"), 1);
        {
            let published = published.lock().expect("lock");
            assert_eq!(published.len(), 1);
            assert_eq!(published[0].excluded_ports, [15020]);
        }

        // A new streak is logged again.
        file.set(None);
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(logs.lines_with(unreadable), 2);
        assert_eq!(published.lock().expect("lock").len(), 1);
    }

    #[test]
    fn node_known_means_a_workload_of_the_file_is_on_it() {
        let known = |node| parse(EXAMPLE, node).expect("parses").0.node_known();
        assert!(known("node1"));
        assert!(known("node2"), "only reporting (not enrolled) and checkout");
        assert!(!known("node9"));
        assert!(!known("Node1"), "names are exact");
    }

    #[tokio::test(start_paused = true)]
    async fn an_unknown_node_is_warned_about_once_per_change() {
        let (_guard, logs) = capture_logs();
        let warning = "no workload in the configuration is on this node";
        let path = std::env::temp_dir().join(format!(
            "ambit-node-known-{}-{}.yaml",
            std::process::id(),
            line!()
        ));
        std::fs::write(&path, EXAMPLE).expect("writing the config");
        let watcher = ConfigWatcher::new(path.clone(), "node9".into(), INTERVAL);
        let loaded = watcher.load();
        let _ = std::fs::remove_file(&path);
        let (_, state) = loaded.expect("loads");
        assert_eq!(state.local_pods().count(), 0);
        assert_eq!(logs.lines_with(warning), 1, "warned at start");

        // Another change that still names no workload on node9: no new warning.
        let file = ScriptedFile::new(EXAMPLE);
        let (tx, _rx) = watch::channel(Arc::new(state));
        tokio::spawn(watcher.with_settle(SETTLE).watch_scripted(
            file.clone(),
            EXAMPLE.to_owned(),
            tx,
        ));
        let still_unknown = EXAMPLE.replace("excludedPorts: [15021]", "excludedPorts: [15020]");
        file.set(Some(&still_unknown));
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(logs.lines_with("configuration reloaded"), 1);
        assert_eq!(logs.lines_with(warning), 1, "unchanged: not repeated");

        // The node appears, then disappears again: told both times.
        let on_node9 = EXAMPLE.replace(
            "node: node2\n    netns: /run/netns/checkout-v1",
            "node: node9\n    netns: /run/netns/checkout-v1",
        );
        file.set(Some(&on_node9));
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(
            logs.lines_with("the configuration has workloads on this node again"),
            1
        );
        file.set(Some(EXAMPLE));
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(logs.lines_with(warning), 2, "warned again after the change");
    }
}
