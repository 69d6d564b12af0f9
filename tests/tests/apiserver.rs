//! The fake API server driven through a real kube-rs client and watcher: the semantics the
//! agent's Kubernetes mode relies on (list+watch, selectors, bookmarks, relist after 410,
//! recovery after a restart, 404 for missing CRDs, TokenReview, PATCH). No root needed.

use std::collections::BTreeSet;
use std::time::Duration;

use ambit_e2e::apiserver::{self, ApiServer, Kind, TokenIdentity, Verb};
use futures::{Stream, StreamExt};
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::ResourceExt;
use kube::api::{
    Api, ApiResource, DynamicObject, GroupVersionKind, ListParams, PartialObjectMeta, Patch,
    PatchParams, PostParams, WatchEvent, WatchParams,
};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use serde_json::json;

/// How long any single expected event may take; generous for a loaded 2-core machine.
const EVENT_TIMEOUT: Duration = Duration::from_secs(20);

/// A client built the way the agent builds one: from a kubeconfig file.
async fn client(server: &ApiServer) -> kube::Client {
    kube::Client::try_from(kube_config(server).await).expect("building the client")
}

async fn kube_config(server: &ApiServer) -> kube::Config {
    let path = std::env::temp_dir().join(format!("{}.kubeconfig", ambit_e2e::unique_name("api")));
    server
        .write_kubeconfig(&path)
        .expect("writing the kubeconfig");
    let kubeconfig = Kubeconfig::read_from(&path).expect("reading the kubeconfig back");
    let _ = std::fs::remove_file(&path);
    kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("loading the kubeconfig")
}

fn seed(server: &ApiServer, pods: &[(&str, &str)]) {
    server
        .create(&apiserver::namespace(
            "app",
            &[("ambit.dev/mesh", "enabled")],
        ))
        .unwrap();
    for (name, node) in pods {
        server
            .create(
                &apiserver::pod("app", name)
                    .node(node)
                    .ip("10.0.0.1")
                    .build(),
            )
            .unwrap();
    }
}

/// One watcher event as a short string, `"Apply a"`, so sequences compare in one assert.
fn describe(event: &Event<Pod>) -> String {
    match event {
        Event::Init => "Init".into(),
        Event::InitApply(p) => format!("InitApply {}", p.name_any()),
        Event::InitDone => "InitDone".into(),
        Event::Apply(p) => format!("Apply {}", p.name_any()),
        Event::Delete(p) => format!("Delete {}", p.name_any()),
    }
}

async fn next<S, T>(stream: &mut S) -> T
where
    S: Stream<Item = T> + Unpin,
{
    tokio::time::timeout(EVENT_TIMEOUT, stream.next())
        .await
        .expect("no event in time")
        .expect("the stream ended")
}

/// The next `n` watcher events, failing on any error.
async fn events<S>(stream: &mut S, n: usize) -> Vec<String>
where
    S: Stream<Item = Result<Event<Pod>, watcher::Error>> + Unpin,
{
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(describe(&next(stream).await.expect("watcher error")));
    }
    out
}

/// Waits for a condition the server reports (not a fixed sleep).
async fn until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + EVENT_TIMEOUT;
    while !condition() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn list_then_watch_sees_added_modified_deleted() {
    let server = ApiServer::start();
    seed(&server, &[("a", "n1")]);
    let pods: Api<Pod> = Api::all(client(&server).await);
    let mut stream = watch_pods(pods.clone(), watcher::Config::default()).boxed();
    assert_eq!(
        events(&mut stream, 3).await,
        ["Init", "InitApply a", "InitDone"]
    );

    server
        .create(&apiserver::pod("app", "b").node("n1").build())
        .unwrap();
    server
        .patch_labels(Kind::Pod, "app", "a", &[("tier", Some("web"))])
        .unwrap();
    server.delete::<Pod>("app", "b").unwrap();
    let mut seen = Vec::new();
    for _ in 0..3 {
        let event = next(&mut stream).await.unwrap();
        if let Event::Apply(p) = &event
            && p.name_any() == "a"
        {
            assert_eq!(p.labels().get("tier").map(String::as_str), Some("web"));
        }
        seen.push(describe(&event));
    }
    assert_eq!(seen, ["Apply b", "Apply a", "Delete b"]);
    assert_eq!(server.request_count("pods", Verb::List), 1);
    assert_eq!(server.request_count("pods", Verb::Watch), 1);

    // The list's resourceVersion is the global one.
    let list = pods.list(&ListParams::default()).await.unwrap();
    assert_eq!(
        list.metadata.resource_version,
        Some(server.resource_version().to_string())
    );
    assert_eq!(list.items.len(), 1);
}

fn watch_pods(
    api: Api<Pod>,
    config: watcher::Config,
) -> impl Stream<Item = Result<Event<Pod>, watcher::Error>> + Send {
    watcher::watcher(api, config)
}

#[tokio::test]
async fn field_and_label_selectors_filter_list_and_watch() {
    let server = ApiServer::start();
    seed(&server, &[("a", "n1"), ("b", "n2")]);
    let client = client(&server).await;
    let pods: Api<Pod> = Api::all(client.clone());

    let mut on_n1 = watch_pods(
        pods.clone(),
        watcher::Config::default().fields("spec.nodeName=n1"),
    )
    .boxed();
    assert_eq!(
        events(&mut on_n1, 3).await,
        ["Init", "InitApply a", "InitDone"]
    );
    server
        .create(&apiserver::pod("app", "c").node("n2").build())
        .unwrap();
    server
        .create(&apiserver::pod("app", "d").node("n1").build())
        .unwrap();
    assert_eq!(
        events(&mut on_n1, 1).await,
        ["Apply d"],
        "a pod of n2 leaked through"
    );
    let watch = server
        .request_log()
        .into_iter()
        .find(|r| r.resource == "pods" && r.verb == Some(Verb::Watch))
        .expect("the watch request is logged");
    assert_eq!(watch.path, "/api/v1/pods");
    assert_eq!(watch.query["fieldSelector"], "spec.nodeName=n1");
    assert_eq!(watch.query["allowWatchBookmarks"], "true");

    let by_name = pods
        .list(&ListParams::default().fields("metadata.name=b"))
        .await
        .unwrap();
    assert_eq!(
        by_name
            .items
            .iter()
            .map(|p| p.name_any())
            .collect::<Vec<_>>(),
        ["b"]
    );

    // Labels: an object moving into the selection is added, moving out is deleted.
    let mut web = watch_pods(pods.clone(), watcher::Config::default().labels("tier=web")).boxed();
    assert_eq!(events(&mut web, 2).await, ["Init", "InitDone"]);
    server
        .patch_labels(Kind::Pod, "app", "b", &[("tier", Some("web"))])
        .unwrap();
    server
        .patch_labels(Kind::Pod, "app", "c", &[("tier", Some("db"))])
        .unwrap();
    server
        .patch_labels(Kind::Pod, "app", "b", &[("tier", None)])
        .unwrap();
    assert_eq!(events(&mut web, 2).await, ["Apply b", "Delete b"]);

    let in_ns: Api<Pod> = Api::namespaced(client.clone(), "app");
    let set = in_ns
        .list(&ListParams::default().labels("tier in (web,db)"))
        .await
        .unwrap();
    assert_eq!(
        set.items.iter().map(|p| p.name_any()).collect::<Vec<_>>(),
        ["c"]
    );
    let other_ns: Api<Pod> = Api::namespaced(client, "other");
    assert!(
        other_ns
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .is_empty()
    );
}

#[tokio::test]
async fn bookmarks_carry_the_resource_version_past_filtered_changes() {
    let server = ApiServer::start();
    seed(&server, &[("a", "n1")]);
    let pods: Api<Pod> = Api::all(client(&server).await);
    let from = server.resource_version().to_string();

    let params = WatchParams::default().fields("spec.nodeName=n1");
    let mut with = pods.watch(&params.clone(), &from).await.unwrap().boxed();
    let mut without = pods
        .watch(&params.clone().disable_bookmarks(), &from)
        .await
        .unwrap()
        .boxed();
    until("both watches open", || server.open_watches() == 2).await;
    server
        .create(&apiserver::pod("app", "elsewhere").node("n2").build())
        .unwrap();
    let after_filtered = server.resource_version().to_string();
    match next(&mut with).await.unwrap() {
        WatchEvent::Bookmark(bm) => assert_eq!(bm.metadata.resource_version, after_filtered),
        other => panic!("expected a bookmark, got {other:?}"),
    }
    server
        .create(&apiserver::pod("app", "here").node("n1").build())
        .unwrap();
    match next(&mut with).await.unwrap() {
        WatchEvent::Added(p) => assert_eq!(p.name_any(), "here"),
        other => panic!("expected ADDED here, got {other:?}"),
    }
    match next(&mut without).await.unwrap() {
        WatchEvent::Added(p) => assert_eq!(p.name_any(), "here"),
        other => panic!("without bookmarks the first event must be ADDED here, got {other:?}"),
    }
}

#[tokio::test]
async fn compaction_makes_the_watcher_relist_and_end_with_the_current_set() {
    let server = ApiServer::start();
    seed(&server, &[("a", "n1"), ("b", "n1")]);
    let pods: Api<Pod> = Api::all(client(&server).await);
    let mut stream = watch_pods(pods, watcher::Config::default()).boxed();
    assert_eq!(
        events(&mut stream, 4).await,
        ["Init", "InitApply a", "InitApply b", "InitDone"]
    );

    // Cut the watch, then change and compact while the watcher is away: its resume
    // resourceVersion is now too old.
    server.end_watches();
    until("the watch to end", || server.open_watches() == 0).await;
    server
        .create(&apiserver::pod("app", "c").node("n1").build())
        .unwrap();
    server.delete::<Pod>("app", "a").unwrap();
    server.compact();

    match next(&mut stream).await {
        Err(watcher::Error::WatchError(status)) => {
            assert_eq!(status.code, 410);
            assert_eq!(status.reason, "Expired");
        }
        other => panic!("expected a 410 watch error, got {other:?}"),
    }
    assert_eq!(
        events(&mut stream, 4).await,
        ["Init", "InitApply b", "InitApply c", "InitDone"]
    );
    assert_eq!(
        server.request_count("pods", Verb::List),
        2,
        "the watcher relisted once"
    );

    // Ending the watches without compaction resumes without a relist.
    server.end_watches();
    until("the watch to end", || server.open_watches() == 0).await;
    server
        .create(&apiserver::pod("app", "d").node("n1").build())
        .unwrap();
    assert_eq!(events(&mut stream, 1).await, ["Apply d"]);
    assert_eq!(server.request_count("pods", Verb::List), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watcher_recovers_after_a_restart_on_the_same_port() {
    let mut server = ApiServer::start();
    seed(&server, &[("a", "n1")]);
    let addr = server.addr();
    let pods: Api<Pod> = Api::all(client(&server).await);
    let mut stream = watch_pods(pods, watcher::Config::default())
        .default_backoff()
        .boxed();
    assert_eq!(
        events(&mut stream, 3).await,
        ["Init", "InitApply a", "InitDone"]
    );

    server.stop();
    server
        .create(&apiserver::pod("app", "b").node("n1").build())
        .unwrap();
    server.restart().unwrap();
    assert_eq!(server.addr(), addr);

    // Connection errors while it was down are expected; the first event after is b.
    let event = loop {
        match next(&mut stream).await {
            Ok(event) => break event,
            Err(watcher::Error::WatchStartFailed(_) | watcher::Error::WatchFailed(_)) => {}
            Err(other) => panic!("unexpected watcher error {other:?}"),
        }
    };
    assert_eq!(describe(&event), "Apply b");
}

fn istio_api(client: &kube::Client, kind: &str, plural: &str, version: &str) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk("security.istio.io", version, kind);
    Api::namespaced_with(
        client.clone(),
        "app",
        &ApiResource::from_gvk_with_plural(&gvk, plural),
    )
}

#[tokio::test]
async fn istio_crds_answer_404_unless_installed_in_that_version() {
    let server = ApiServer::start();
    seed(&server, &[]);
    server
        .create_json(
            Kind::PeerAuthentication,
            apiserver::peer_authentication("app", "strict", "v1", "STRICT"),
        )
        .unwrap();
    let client = client(&server).await;
    let v1 = istio_api(&client, "PeerAuthentication", "peerauthentications", "v1");
    let v1beta1 = istio_api(
        &client,
        "PeerAuthentication",
        "peerauthentications",
        "v1beta1",
    );

    let listed = v1.list(&ListParams::default()).await.unwrap();
    assert_eq!(listed.items.len(), 1);
    assert_eq!(listed.items[0].data["spec"]["mtls"]["mode"], "STRICT");

    server.set_istio_crds(&[]);
    match v1.list(&ListParams::default()).await {
        Err(kube::Error::Api(status)) => {
            assert_eq!(status.code, 404);
            assert_eq!(status.reason, "NotFound");
        }
        other => panic!("expected 404, got {other:?}"),
    }
    let policies = istio_api(
        &client,
        "AuthorizationPolicy",
        "authorizationpolicies",
        "v1",
    );
    assert!(
        matches!(policies.list(&ListParams::default()).await, Err(kube::Error::Api(s)) if s.code == 404)
    );

    server.set_istio_crds(&["v1beta1"]);
    assert!(
        matches!(v1.list(&ListParams::default()).await, Err(kube::Error::Api(s)) if s.code == 404)
    );
    let old = v1beta1.list(&ListParams::default()).await.unwrap();
    assert_eq!(
        old.items[0].types.as_ref().map(|t| t.api_version.as_str()),
        Some("security.istio.io/v1beta1"),
        "served in the requested version"
    );
}

async fn review(client: &kube::Client, token: &str, audiences: &[&str]) -> TokenReview {
    let reviews: Api<TokenReview> = Api::all(client.clone());
    let request = TokenReview {
        spec: TokenReviewSpec {
            token: Some(token.into()),
            audiences: (!audiences.is_empty())
                .then(|| audiences.iter().map(|a| a.to_string()).collect()),
        },
        ..Default::default()
    };
    reviews
        .create(&PostParams::default(), &request)
        .await
        .unwrap()
}

#[tokio::test]
async fn token_review_answers_as_registered() {
    let server = ApiServer::start();
    server.register_token(
        "good",
        TokenIdentity::service_account("app", "web", "web-0", "uid-web-0", &["istio-ca"]),
    );
    let mut expired = TokenIdentity::service_account("app", "web", "web-1", "uid-1", &["istio-ca"]);
    expired.expired = true;
    server.register_token("expired", expired);
    let client = client(&server).await;

    let ok = review(&client, "good", &["istio-ca"]).await.status.unwrap();
    assert_eq!(ok.authenticated, Some(true));
    assert_eq!(ok.audiences, Some(vec!["istio-ca".to_string()]));
    let user = ok.user.unwrap();
    assert_eq!(
        user.username.as_deref(),
        Some("system:serviceaccount:app:web")
    );
    let extra = user.extra.unwrap();
    assert_eq!(extra["authentication.kubernetes.io/pod-name"], ["web-0"]);
    assert_eq!(extra["authentication.kubernetes.io/pod-uid"], ["uid-web-0"]);
    assert!(
        user.groups
            .unwrap()
            .contains(&"system:serviceaccounts:app".to_string())
    );

    for (token, audiences, error) in [
        ("unknown", &["istio-ca"][..], "invalid bearer token"),
        (
            "good",
            &["other"][..],
            "is invalid for the target audiences",
        ),
        // No audiences means the API server's own, which this token was not issued for.
        ("good", &[][..], "is invalid for the target audiences"),
        ("expired", &["istio-ca"][..], "has expired"),
    ] {
        let status = review(&client, token, audiences).await.status.unwrap();
        assert_eq!(status.authenticated, Some(false), "{token} {audiences:?}");
        assert!(
            status.error.as_deref().unwrap_or("").contains(error),
            "{token} {audiences:?}: {:?}",
            status.error
        );
    }
    assert_eq!(server.request_count("tokenreviews", Verb::Create), 5);
}

#[tokio::test]
async fn pod_patch_is_visible_in_get_and_as_a_modified_event() {
    let server = ApiServer::start();
    seed(&server, &[("a", "n1")]);
    let pods: Api<Pod> = Api::namespaced(client(&server).await, "app");
    let mut stream = watch_pods(pods.clone(), watcher::Config::default()).boxed();
    assert_eq!(
        events(&mut stream, 3).await,
        ["Init", "InitApply a", "InitDone"]
    );

    let status_patch = json!({"metadata": {"annotations": {"ambit.dev/status": "enrolled"}}});
    pods.patch_status("a", &PatchParams::default(), &Patch::Merge(&status_patch))
        .await
        .unwrap();
    let got = pods.get("a").await.unwrap();
    assert_eq!(
        got.annotations()
            .get("ambit.dev/status")
            .map(String::as_str),
        Some("enrolled")
    );
    match next(&mut stream).await.unwrap() {
        Event::Apply(p) => assert_eq!(p.annotations()["ambit.dev/status"], "enrolled"),
        other => panic!("expected the patched pod, got {}", describe(&other)),
    }

    // The same patch again changes nothing: no new resourceVersion.
    let rv = server.resource_version();
    pods.patch_status("a", &PatchParams::default(), &Patch::Merge(&status_patch))
        .await
        .unwrap();
    assert_eq!(server.resource_version(), rv);

    let apply = json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "a", "annotations": {"ambit.dev/status": "refused"}}});
    pods.patch(
        "a",
        &PatchParams::apply("ambit").force(),
        &Patch::Apply(&apply),
    )
    .await
    .unwrap();
    let strategic = json!({"metadata": {"labels": {"x": "y"}}, "status": {"phase": "Failed"}});
    pods.patch("a", &PatchParams::default(), &Patch::Strategic(&strategic))
        .await
        .unwrap();
    let stored: Pod = server.get("app", "a").unwrap().unwrap();
    assert_eq!(stored.annotations()["ambit.dev/status"], "refused");
    assert_eq!(stored.labels()["x"], "y");
    assert_eq!(
        stored.status.unwrap().phase.as_deref(),
        Some("Running"),
        "a patch of the main resource must not change status"
    );

    let patches = server.patches();
    let summary: Vec<_> = patches
        .iter()
        .map(|p| (p.subresource.as_deref(), p.content_type.as_str(), p.status))
        .collect();
    assert_eq!(
        summary,
        [
            (Some("status"), "application/merge-patch+json", 200),
            (Some("status"), "application/merge-patch+json", 200),
            (None, "application/apply-patch+yaml", 200),
            (None, "application/strategic-merge-patch+json", 200),
        ]
    );
    assert_eq!(patches[0].body, status_patch);
    assert_eq!(patches[2].field_manager.as_deref(), Some("ambit"));
    assert_eq!(server.request_count("pods", Verb::Patch), 4);
}

#[tokio::test]
async fn paginated_lists_and_expired_continue_tokens() {
    let server = ApiServer::start();
    let names: Vec<String> = (0..5).map(|i| format!("p{i}")).collect();
    seed(
        &server,
        &names.iter().map(|n| (n.as_str(), "n1")).collect::<Vec<_>>(),
    );
    let pods: Api<Pod> = Api::all(client(&server).await);
    let mut stream = watch_pods(pods.clone(), watcher::Config::default().page_size(2)).boxed();
    let seen = events(&mut stream, 7).await;
    assert_eq!(seen.first().map(String::as_str), Some("Init"));
    assert_eq!(seen.last().map(String::as_str), Some("InitDone"));
    assert_eq!(
        seen[1..6].iter().cloned().collect::<BTreeSet<_>>(),
        names
            .iter()
            .map(|n| format!("InitApply {n}"))
            .collect::<BTreeSet<_>>()
    );
    assert_eq!(server.request_count("pods", Verb::List), 3);

    let first = pods.list(&ListParams::default().limit(2)).await.unwrap();
    let token = first.metadata.continue_.clone().expect("a continue token");
    server.compact();
    match pods
        .list(&ListParams::default().limit(2).continue_token(&token))
        .await
    {
        Err(kube::Error::Api(status)) => assert_eq!(status.code, 410),
        other => panic!("expected 410 for an expired continue token, got {other:?}"),
    }
}

#[tokio::test]
async fn streaming_list_ends_its_initial_events_with_a_bookmark() {
    let server = ApiServer::start();
    seed(&server, &[("a", "n1")]);
    let pods: Api<Pod> = Api::all(client(&server).await);
    let mut stream = watch_pods(pods, watcher::Config::default().streaming_lists()).boxed();
    assert_eq!(
        events(&mut stream, 3).await,
        ["Init", "InitApply a", "InitDone"]
    );
    server.create(&apiserver::pod("app", "b").build()).unwrap();
    assert_eq!(events(&mut stream, 1).await, ["Apply b"]);
    assert_eq!(server.request_count("pods", Verb::List), 0);
}

#[tokio::test]
async fn unavailable_answers_503_which_kube_retries_by_default() {
    let server = ApiServer::start();
    seed(&server, &[]);
    server.set_unavailable(true);

    // kube 5's default client retries 429/503/504 (up to 15 times, backoff from 5 ms):
    // a short outage is ridden out inside one call.
    let namespaces: Api<Namespace> = Api::all(client(&server).await);
    let list = tokio::spawn(async move { namespaces.list(&ListParams::default()).await });
    until("retries of the list", || {
        server.request_count("namespaces", Verb::List) >= 3
    })
    .await;
    server.set_unavailable(false);
    let listed = tokio::time::timeout(EVENT_TIMEOUT, list)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(listed.unwrap().items.len(), 1);

    // Without the retry layer the 503 Status comes straight back.
    let mut config = kube_config(&server).await;
    config.default_retry = false;
    let namespaces: Api<Namespace> = Api::all(kube::Client::try_from(config).unwrap());
    server.set_unavailable(true);
    let before = server.request_count("namespaces", Verb::List);
    match namespaces.list(&ListParams::default()).await {
        Err(kube::Error::Api(status)) => {
            assert_eq!(status.code, 503);
            assert_eq!(status.reason, "ServiceUnavailable");
        }
        other => panic!("expected 503, got {other:?}"),
    }
    assert_eq!(server.request_count("namespaces", Verb::List), before + 1);
}

#[tokio::test]
async fn requests_without_the_kubeconfig_token_are_unauthorized() {
    let server = ApiServer::start();
    let anonymous =
        kube::Client::try_from(kube::Config::new(server.url().parse().unwrap())).unwrap();
    match Api::<Namespace>::all(anonymous)
        .list(&ListParams::default())
        .await
    {
        Err(kube::Error::Api(status)) => {
            assert_eq!(status.code, 401);
            assert_eq!(status.reason, "Unauthorized");
        }
        other => panic!("expected 401, got {other:?}"),
    }
}

#[tokio::test]
async fn discovery_lists_the_istio_group_only_while_installed() {
    let server = ApiServer::start();
    let client = client(&server).await;
    let discovery = kube::discovery::Discovery::new(client.clone())
        .run()
        .await
        .unwrap();
    let istio = discovery
        .get("security.istio.io")
        .expect("the Istio group is discovered");
    assert_eq!(istio.preferred_version_or_latest(), "v1");
    let (resource, caps) = istio
        .recommended_kind("AuthorizationPolicy")
        .expect("AuthorizationPolicy discovered");
    assert_eq!(resource.plural, "authorizationpolicies");
    assert_eq!(caps.scope, kube::discovery::Scope::Namespaced);
    assert!(discovery.has_group("discovery.k8s.io"));

    server.set_istio_crds(&["v1beta1"]);
    let group = kube::discovery::group(&client, "security.istio.io")
        .await
        .unwrap();
    assert_eq!(group.versions().collect::<Vec<_>>(), ["v1beta1"]);

    server.set_istio_crds(&[]);
    let discovery = kube::discovery::Discovery::new(client).run().await.unwrap();
    assert!(!discovery.has_group("security.istio.io"));
    assert!(discovery.has_group("discovery.k8s.io"));
}

#[tokio::test]
async fn metadata_watcher_gets_partial_object_metadata() {
    let server = ApiServer::start();
    seed(&server, &[]);
    let client = client(&server).await;
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let listed = namespaces
        .list_metadata(&ListParams::default())
        .await
        .unwrap();
    assert_eq!(
        listed.items[0].types.as_ref().map(|t| t.kind.as_str()),
        Some("PartialObjectMetadata")
    );
    // kube 5's way to watch metadata only: an Api of PartialObjectMeta.
    let metadata: Api<PartialObjectMeta<Namespace>> = Api::all(client);
    let mut stream = watcher::watcher(metadata, watcher::Config::default()).boxed();
    let mut seen = Vec::new();
    for _ in 0..3 {
        seen.push(match next(&mut stream).await.unwrap() {
            Event::Init => "Init".to_string(),
            Event::InitApply(ns) => format!("InitApply {}", ns.labels()["ambit.dev/mesh"]),
            Event::InitDone => "InitDone".into(),
            Event::Apply(ns) | Event::Delete(ns) => format!("unexpected {}", ns.name_any()),
        });
    }
    assert_eq!(seen, ["Init", "InitApply enabled", "InitDone"]);
    server
        .patch_labels(Kind::Namespace, "", "app", &[("ambit.dev/mesh", None)])
        .unwrap();
    match next(&mut stream).await.unwrap() {
        Event::Apply(ns) => {
            assert_eq!(ns.name_any(), "app");
            assert!(ns.labels().get("ambit.dev/mesh").is_none());
            assert_eq!(
                ns.types.map(|t| t.kind),
                Some("PartialObjectMetadata".into())
            );
        }
        other => panic!("expected the relabelled namespace, got {other:?}"),
    }
}

#[tokio::test]
async fn a_watch_ends_after_its_timeout_seconds() {
    let server = ApiServer::start();
    seed(&server, &[]);
    let namespaces: Api<Namespace> = Api::all(client(&server).await);
    let from = server.resource_version().to_string();
    let started = std::time::Instant::now();
    let mut stream = namespaces
        .watch(&WatchParams::default().timeout(1), &from)
        .await
        .unwrap()
        .boxed();
    let end = tokio::time::timeout(EVENT_TIMEOUT, stream.next()).await;
    assert!(
        matches!(end, Ok(None)),
        "expected the stream to end, got {end:?}"
    );
    assert!(started.elapsed() >= Duration::from_secs(1));
    until("the server to close the watch", || {
        server.open_watches() == 0
    })
    .await;
}

#[tokio::test]
async fn config_maps_create_once_and_replace_only_at_the_current_resource_version() {
    use k8s_openapi::api::core::v1::ConfigMap;
    let server = ApiServer::start();
    let client = client(&server).await;
    let api: Api<ConfigMap> = Api::namespaced(client, "ambit-system");
    let map = |root: &str, rv: Option<String>| ConfigMap {
        metadata: kube::api::ObjectMeta {
            name: Some("ambit-root".into()),
            resource_version: rv,
            ..Default::default()
        },
        data: Some([("root.pem".to_owned(), root.to_owned())].into()),
        ..Default::default()
    };
    let created = api
        .create(&PostParams::default(), &map("OLD", None))
        .await
        .expect("create");
    let first_rv = created.resource_version().expect("resourceVersion");

    // A second create is 409 AlreadyExists, the object unchanged.
    match api
        .create(&PostParams::default(), &map("OTHER", None))
        .await
    {
        Err(kube::Error::Api(status)) => {
            assert_eq!(
                (status.code, status.reason.as_str()),
                (409, "AlreadyExists")
            );
        }
        other => panic!("expected 409 AlreadyExists, got {other:?}"),
    }

    // Replace at the current resourceVersion works and bumps it.
    let replaced = api
        .replace(
            "ambit-root",
            &PostParams::default(),
            &map("NEW", Some(first_rv.clone())),
        )
        .await
        .expect("replace");
    assert_ne!(replaced.resource_version(), Some(first_rv.clone()));

    // Replace at the old one is a 409 Conflict and changes nothing.
    match api
        .replace(
            "ambit-root",
            &PostParams::default(),
            &map("STALE", Some(first_rv)),
        )
        .await
    {
        Err(kube::Error::Api(status)) => {
            assert_eq!((status.code, status.reason.as_str()), (409, "Conflict"));
        }
        other => panic!("expected 409 Conflict, got {other:?}"),
    }
    let stored = api.get("ambit-root").await.expect("get");
    assert_eq!(
        stored
            .data
            .expect("data")
            .get("root.pem")
            .map(String::as_str),
        Some("NEW")
    );
    assert_eq!(server.request_count("configmaps", Verb::Create), 2);
    assert_eq!(server.request_count("configmaps", Verb::Update), 2);
    assert_eq!(server.list_json(Kind::ConfigMap).len(), 1);
}
