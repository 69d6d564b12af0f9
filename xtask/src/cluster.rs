//! `cargo xtask image` (the container image from deploy/Dockerfile) and `cargo xtask kind`
//! (a kind cluster, the manifests of deploy/, and the end-to-end checks of issue 12, each
//! printed as one PASS/FAIL line with its evidence).
//!
//! Everything here drives real tools (docker, kind, kubectl) as subprocesses; this project's
//! own machines have none of them, so `cargo xtask test` never runs this and the kind run
//! happens on a machine with docker (.github/workflows/kind.yml).

use std::collections::BTreeMap;
use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use crate::setup;

/// The image `deploy/` names; `cargo xtask image` tags this by default.
pub const RELEASE_IMAGE: &str = "ghcr.io/ambit-mesh/ambit";
/// Tag loaded into kind (never pulled: kind nodes get it with `kind load`).
const KIND_IMAGE: &str = "ambit:kind";
/// Kubernetes' own e2e test image: `netexec` serves /echo and /clientip; curl is inside.
const TEST_IMAGE: &str = "registry.k8s.io/e2e-test-images/agnhost:2.52";
const TRUST_DOMAIN: &str = "cluster.local";
const MESH_NS: &str = "ambit-e2e-mesh";
const PLAIN_NS: &str = "ambit-e2e-plain";
const SERVER_PORT: u16 = 8080;

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|paths| {
        std::env::split_paths(&paths).any(|dir| {
            let path = dir.join(tool);
            path.is_file()
                && std::fs::metadata(&path).is_ok_and(|m| {
                    std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o111 != 0
                })
        })
    })
}

/// Fails with one message naming every missing tool, and whether docker's daemon answers.
fn require(tools: &[(&str, &str)]) -> anyhow::Result<()> {
    let missing: Vec<String> = tools
        .iter()
        .filter(|(tool, _)| !on_path(tool))
        .map(|(tool, how)| format!("  - `{tool}` not found on PATH ({how})"))
        .collect();
    if !missing.is_empty() {
        bail!(
            "missing on this machine:\n{}\nThis project's own machines have no container engine; \
             run this where docker is installed (see README, \"Install into a cluster\").",
            missing.join("\n")
        );
    }
    if tools.iter().any(|(tool, _)| *tool == "docker") {
        let info = Command::new("docker")
            .args(["info", "--format", "{{.ServerVersion}}"])
            .output()
            .context("running docker info")?;
        if !info.status.success() {
            bail!(
                "`docker` is installed but its daemon does not answer (`docker info`: {}). \
                 Start the docker daemon, or run this on a machine that has one.",
                String::from_utf8_lossy(&info.stderr).trim()
            );
        }
    }
    Ok(())
}

const DOCKER: (&str, &str) = ("docker", "a container engine with BuildKit");
const KIND: (&str, &str) = (
    "kind",
    "https://kind.sigs.k8s.io, `go install sigs.k8s.io/kind@latest`",
);
const KUBECTL: (&str, &str) = ("kubectl", "with built-in kustomize, >= 1.27");

/// `cargo xtask image [--tag T]`: builds deploy/Dockerfile from the workspace root.
pub fn image(tag: Option<&str>) -> anyhow::Result<String> {
    require(&[DOCKER])?;
    let version = env!("CARGO_PKG_VERSION");
    let tag = tag.map_or_else(|| format!("{RELEASE_IMAGE}:{version}"), str::to_owned);
    let revision =
        setup::output("git", &["rev-parse", "HEAD"]).unwrap_or_else(|_| "unknown".into());
    run(Command::new("docker")
        .args(["build", "-f", "deploy/Dockerfile"])
        .args(["--build-arg", &format!("VERSION={version}")])
        .args(["--build-arg", &format!("REVISION={}", revision.trim())])
        .args(["-t", &tag, "."])
        // Dockerfile.dockerignore (keeps target/ out of the context) needs BuildKit.
        .env("DOCKER_BUILDKIT", "1"))?;
    eprintln!("xtask: built image {tag}");
    Ok(tag)
}

/// Options of `cargo xtask kind`.
pub struct KindOptions {
    pub name: String,
    pub keep: bool,
    /// kind node image (`--image` of `kind create cluster`); kind's default when None.
    pub node_image: Option<String>,
}

/// Deletes the cluster when the run ends, however it ends, unless `--keep`.
struct ClusterGuard {
    name: String,
    keep: bool,
}

impl Drop for ClusterGuard {
    fn drop(&mut self) {
        if self.keep {
            eprintln!(
                "xtask: keeping kind cluster {0} (kubectl --context kind-{0}); delete it with \
                 `kind delete cluster --name {0}`",
                self.name
            );
            return;
        }
        eprintln!("xtask: deleting kind cluster {}", self.name);
        let _ = Command::new("kind")
            .args(["delete", "cluster", "--name", &self.name])
            .status();
    }
}

/// PASS/FAIL lines and their count.
#[derive(Default)]
struct Report {
    passed: u32,
    failed: u32,
}

impl Report {
    fn check(&mut self, name: &str, outcome: anyhow::Result<String>) {
        match outcome {
            Ok(evidence) => {
                self.passed += 1;
                println!("PASS {name}: {evidence}");
            }
            Err(e) => {
                self.failed += 1;
                println!("FAIL {name}: {e:#}");
            }
        }
    }
}

pub fn kind(options: KindOptions) -> anyhow::Result<()> {
    require(&[DOCKER, KIND, KUBECTL])?;
    // The CA probe is built from this workspace (it needs the eBPF toolchain like the agent).
    setup::run(setup::Need::Build)?;
    cargo(&["build", "-p", "ambit-e2e", "--bin", "ambit-ca-probe"])?;
    let probe = target_dir()?.join("debug/ambit-ca-probe");

    image(Some(KIND_IMAGE))?;

    let work = setup::workspace_root()?.join("target/kind");
    std::fs::create_dir_all(&work)?;
    let cluster_config = work.join("cluster.yaml");
    std::fs::write(
        &cluster_config,
        "kind: Cluster\napiVersion: kind.x-k8s.io/v1alpha4\nnodes:\n  - role: control-plane\n  - role: worker\n  - role: worker\n",
    )?;
    let mut create = Command::new("kind");
    create
        .args(["create", "cluster", "--name", &options.name, "--config"])
        .arg(&cluster_config)
        .args(["--wait", "180s"]);
    if let Some(node_image) = &options.node_image {
        create.args(["--image", node_image]);
    }
    run(&mut create)?;
    let _guard = ClusterGuard {
        name: options.name.clone(),
        keep: options.keep,
    };
    let kube = Kube {
        context: format!("kind-{}", options.name),
    };

    let nodes = setup::output("kind", &["get", "nodes", "--name", &options.name])?;
    let mut workers: Vec<String> = nodes
        .lines()
        .map(str::trim)
        .filter(|n| n.contains("worker"))
        .map(str::to_owned)
        .collect();
    workers.sort();
    let [worker1, worker2] = workers.as_slice() else {
        bail!("expected 2 kind workers, found {workers:?}");
    };
    for node in nodes.lines().map(str::trim).filter(|n| !n.is_empty()) {
        // Pins must outlive the agent container: bpffs on the node itself.
        docker_exec(
            node,
            "mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf",
        )?;
    }
    for node in [worker1, worker2] {
        docker_exec(
            node,
            "command -v tcpdump >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq tcpdump >/dev/null)",
        )?;
    }
    run(Command::new("kind").args(["load", "docker-image", KIND_IMAGE, "--name", &options.name]))?;

    // The manifests as shipped, with only the image swapped for the one just loaded. kind
    // has no Istio: the overlay with Istio's policy CRDs.
    let overlay = work.join("overlay");
    std::fs::create_dir_all(&overlay)?;
    let (image_name, image_tag) = KIND_IMAGE.split_once(':').context("image tag")?;
    std::fs::write(
        overlay.join("kustomization.yaml"),
        format!(
            "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources:\n  - ../../../deploy/overlays/without-istio\nimages:\n  - name: {RELEASE_IMAGE}\n    newName: {image_name}\n    newTag: {image_tag}\n"
        ),
    )?;
    kube.run(&["apply", "-k", &overlay.to_string_lossy()])?;
    kube.run(&[
        "-n",
        "ambit-system",
        "rollout",
        "status",
        "deploy/ambit-ca",
        "--timeout=300s",
    ])?;
    // No manual step: the CA publishes its root (ConfigMap ambit-root), the agents wait
    // for it in ContainerCreating and start once it is there.
    kube.run(&[
        "-n",
        "ambit-system",
        "rollout",
        "status",
        "ds/ambit",
        "--timeout=300s",
    ])?;

    // What the agents trust: the roots the CA published (also what the CA probe trusts).
    let root = kube.capture(&[
        "-n",
        "ambit-system",
        "get",
        "configmap",
        "ambit-root",
        "-o",
        "go-template={{index .data \"root.pem\"}}",
    ])?;
    let root_file = work.join("root.pem");
    std::fs::write(&root_file, &root)?;

    kube.apply(&workloads(worker1, worker2))?;
    for ns in [MESH_NS, PLAIN_NS] {
        kube.run(&[
            "-n",
            ns,
            "wait",
            "--for=condition=Ready",
            "pod",
            "--all",
            "--timeout=300s",
        ])?;
    }
    let client = kube.pod(MESH_NS, "client")?;
    let server = kube.pod(MESH_NS, "server")?;
    let plain = kube.pod(PLAIN_NS, "client")?;
    for (pod, node) in [(&client, worker1), (&server, worker2), (&plain, worker1)] {
        if pod.node != *node {
            bail!(
                "{}/{} runs on {}, not {node}",
                pod.namespace,
                pod.name,
                pod.node
            );
        }
    }
    for pod in [&client, &server] {
        kube.wait_annotation(pod, Some("enrolled"), Duration::from_secs(120))?;
    }
    let agent1 = kube.agent_on(worker1)?;
    let agent2 = kube.agent_on(worker2)?;
    let ctx = Ctx {
        kube: &kube,
        worker1,
        client: &client,
        server: &server,
        plain: &plain,
    };

    let mut report = Report::default();
    report.check(
        "the CA published its root for the agents (no manual step)",
        root_published(&kube, &root),
    );
    report.check(
        "traffic between the workers is TLS on 15008 only",
        ctx.mtls_only_on_the_wire("tls-only"),
    );
    report.check(
        "identities in both agents' access logs",
        identities_in_logs(&kube, &agent1, &agent2),
    );
    report.check(
        "the server sees the client's pod IP",
        ctx.server_sees_client_ip(),
    );
    report.check(
        "a DENY AuthorizationPolicy refuses the client",
        ctx.deny_policy_refuses(),
    );
    report.check(
        "STRICT refuses the client of the unlabelled namespace",
        ctx.strict_refuses_plaintext(),
    );
    report.check(
        "namespace label off = plain traffic, back on = mTLS, pods not restarted",
        ctx.label_toggle(),
    );
    report.check(
        "a conflist rewritten without ambit-cni is chained again by the agent",
        cni_rechained(&kube, worker1),
    );
    report.check(
        "a deleted agent's node stays fail closed until the new agent is ready",
        ctx.agent_restart_fails_closed(&agent1),
    );
    report.check(
        "the CA refuses a node agent an identity of the other node",
        ca_refuses_other_node(&kube, &probe, &root_file, worker1, &work),
    );
    println!("kind: {} passed, {} failed", report.passed, report.failed);
    if report.failed > 0 {
        bail!("{} kind check(s) failed", report.failed);
    }
    Ok(())
}

/// The test workloads: a server on worker 2 and a client on worker 1 in an opted-in
/// namespace, and a client on worker 1 in a namespace without the label.
fn workloads(worker1: &str, worker2: &str) -> String {
    let pod = |ns: &str, name: &str, node: &str, args: &str| {
        format!(
            "apiVersion: v1\nkind: ServiceAccount\nmetadata: {{name: {name}, namespace: {ns}}}\n---\n\
             apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {ns}\n  labels: {{app: {name}}}\n\
             spec:\n  serviceAccountName: {name}\n  nodeSelector: {{kubernetes.io/hostname: {node}}}\n  \
             terminationGracePeriodSeconds: 1\n  containers:\n    - name: main\n      image: {TEST_IMAGE}\n      \
             args: {args}\n---\n"
        )
    };
    let mut out = format!(
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {MESH_NS}\n  labels: {{ambit.dev/mesh: enabled}}\n---\n\
         apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {PLAIN_NS}\n---\n"
    );
    out += &pod(
        MESH_NS,
        "server",
        worker2,
        &format!("[netexec, --http-port={SERVER_PORT}]"),
    );
    out += &pod(MESH_NS, "client", worker1, "[pause]");
    out += &pod(PLAIN_NS, "client", worker1, "[pause]");
    out
}

struct Kube {
    context: String,
}

struct Pod {
    namespace: String,
    name: String,
    ip: String,
    uid: String,
    node: String,
}

impl Kube {
    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("kubectl");
        cmd.args(["--context", &self.context]).args(args);
        cmd
    }

    fn run(&self, args: &[&str]) -> anyhow::Result<()> {
        run(&mut self.command(args))
    }

    fn capture(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = self
            .command(args)
            .stderr(Stdio::inherit())
            .output()
            .context("running kubectl")?;
        if !out.status.success() {
            bail!("kubectl {} failed ({})", args.join(" "), out.status);
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn apply(&self, yaml: &str) -> anyhow::Result<()> {
        let mut child = self
            .command(&["apply", "-f", "-"])
            .stdin(Stdio::piped())
            .spawn()
            .context("running kubectl apply")?;
        child
            .stdin
            .take()
            .context("kubectl stdin")?
            .write_all(yaml.as_bytes())?;
        let status = child.wait()?;
        if !status.success() {
            bail!("kubectl apply failed ({status}) for:\n{yaml}");
        }
        Ok(())
    }

    fn pod(&self, namespace: &str, name: &str) -> anyhow::Result<Pod> {
        let fields = self.capture(&[
            "-n",
            namespace,
            "get",
            "pod",
            name,
            "-o",
            "jsonpath={.status.podIP} {.metadata.uid} {.spec.nodeName}",
        ])?;
        let mut it = fields.split_whitespace().map(str::to_owned);
        let (Some(ip), Some(uid), Some(node)) = (it.next(), it.next(), it.next()) else {
            bail!("pod {namespace}/{name}: no IP, UID or node yet ({fields:?})");
        };
        Ok(Pod {
            namespace: namespace.into(),
            name: name.into(),
            ip,
            uid,
            node,
        })
    }

    /// The pod's `ambit.dev/status` annotation (None when absent).
    fn annotation(&self, pod: &Pod) -> anyhow::Result<Option<String>> {
        let value = self.capture(&[
            "-n",
            &pod.namespace,
            "get",
            "pod",
            &pod.name,
            "-o",
            "jsonpath={.metadata.annotations.ambit\\.dev/status}",
        ])?;
        Ok((!value.trim().is_empty()).then(|| value.trim().to_owned()))
    }

    fn wait_annotation(
        &self,
        pod: &Pod,
        want: Option<&str>,
        timeout: Duration,
    ) -> anyhow::Result<Duration> {
        let started = Instant::now();
        loop {
            let now = self.annotation(pod)?;
            if now.as_deref() == want {
                return Ok(started.elapsed());
            }
            if started.elapsed() > timeout {
                bail!(
                    "{}/{}: ambit.dev/status is {now:?}, expected {want:?} within {timeout:?}",
                    pod.namespace,
                    pod.name
                );
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// The agent pod on `node` (name, whether ready).
    fn agents_on(&self, node: &str) -> anyhow::Result<Vec<(String, bool)>> {
        let out = self.capture(&[
            "-n",
            "ambit-system",
            "get",
            "pods",
            "-l",
            "app.kubernetes.io/name=ambit",
            "--field-selector",
            &format!("spec.nodeName={node}"),
            "-o",
            "jsonpath={range .items[*]}{.metadata.name} {.status.containerStatuses[0].ready}{\"\\n\"}{end}",
        ])?;
        Ok(out
            .lines()
            .filter_map(|l| {
                let (name, ready) = l.split_once(' ')?;
                Some((name.to_owned(), ready == "true"))
            })
            .collect())
    }

    fn agent_on(&self, node: &str) -> anyhow::Result<String> {
        let agents = self.agents_on(node)?;
        match agents.as_slice() {
            [(name, true)] => Ok(name.clone()),
            _ => bail!("expected one ready agent on {node}, found {agents:?}"),
        }
    }

    /// `curl` from a pod; (exit code, stdout, stderr).
    fn curl(&self, from: &Pod, url: &str) -> anyhow::Result<(i32, String, String)> {
        let out = self
            .command(&[
                "-n",
                &from.namespace,
                "exec",
                &from.name,
                "--",
                "curl",
                "-sS",
                "--max-time",
                "5",
                url,
            ])
            .output()
            .context("running kubectl exec curl")?;
        Ok((
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).trim().to_owned(),
            String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        ))
    }
}

/// curl's exit codes for a connection reset ("Failed sending data" 55, "Recv failure:
/// Connection reset by peer" 56): what a refused meshed connection looks like to the client
/// (the agent resets, never closes cleanly; a clean close would be 52, "Empty reply").
const CURL_RESET: [i32; 2] = [55, 56];

struct Ctx<'a> {
    kube: &'a Kube,
    worker1: &'a str,
    client: &'a Pod,
    server: &'a Pod,
    plain: &'a Pod,
}

impl Ctx<'_> {
    fn echo_url(&self, marker: &str) -> String {
        format!("http://{}:{SERVER_PORT}/echo?msg={marker}", self.server.ip)
    }

    /// One echo round trip through the mesh client; Ok only for the marker echoed back.
    fn echo(&self, from: &Pod, marker: &str) -> anyhow::Result<()> {
        let (code, body, err) = self.kube.curl(from, &self.echo_url(marker))?;
        if code != 0 || body != marker {
            bail!("curl exit {code}, body {body:?}, stderr {err:?}");
        }
        Ok(())
    }

    /// Payload packets to or from the server pod seen on worker 1's eth0 while `traffic`
    /// runs, split by server port, and whether the marker crossed the wire in clear.
    fn capture_during(
        &self,
        marker: &str,
        traffic: impl FnOnce() -> anyhow::Result<()>,
    ) -> anyhow::Result<WireSummary> {
        let capture = Capture::start(self.worker1, &format!("tcp and host {}", self.server.ip))?;
        let result = traffic();
        let text = capture.stop()?;
        result?;
        Ok(WireSummary::parse(&text, &self.server.ip, marker))
    }

    fn mtls_only_on_the_wire(&self, tag: &str) -> anyhow::Result<String> {
        let marker = format!("AMBIT-MARKER-{tag}-{}", std::process::id());
        let wire = self.capture_during(&marker, || {
            for _ in 0..3 {
                self.echo(self.client, &marker)?;
            }
            Ok(())
        })?;
        wire.expect_mtls_only()
    }

    fn server_sees_client_ip(&self) -> anyhow::Result<String> {
        let url = format!("http://{}:{SERVER_PORT}/clientip", self.server.ip);
        let (code, body, err) = self.kube.curl(self.client, &url)?;
        if code != 0 {
            bail!("curl /clientip exit {code}: {err}");
        }
        let seen = body.rsplit_once(':').map_or(body.as_str(), |(ip, _)| ip);
        if seen != self.client.ip {
            bail!(
                "server saw {seen}, the client pod is {} (body {body:?})",
                self.client.ip
            );
        }
        Ok(format!(
            "server saw {body}, client pod IP {}",
            self.client.ip
        ))
    }

    fn deny_policy_refuses(&self) -> anyhow::Result<String> {
        let policy = format!(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: ambit-e2e-deny, namespace: {MESH_NS}}}\n\
             spec:\n  selector: {{matchLabels: {{app: server}}}}\n  action: DENY\n  rules:\n    - from:\n        - source: {{principals: [\"{TRUST_DOMAIN}/ns/{MESH_NS}/sa/client\"]}}\n"
        );
        self.echo(self.client, "before-deny")
            .context("before the policy")?;
        self.kube.apply(&policy)?;
        let refused = self.until_refused(self.client, "deny");
        self.kube.run(&[
            "-n",
            MESH_NS,
            "delete",
            "authorizationpolicy",
            "ambit-e2e-deny",
        ])?;
        let (after, err) = refused?;
        let restored = self.until_ok(self.client, "after-deny")?;
        Ok(format!(
            "reset {after:.1?} after the policy ({err}); allowed again {restored:.1?} after deleting it"
        ))
    }

    fn strict_refuses_plaintext(&self) -> anyhow::Result<String> {
        self.echo(self.plain, "plain-permissive")
            .context("the unlabelled client must reach the server while PERMISSIVE")?;
        let strict = format!(
            "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {{name: ambit-e2e-strict, namespace: {MESH_NS}}}\n\
             spec:\n  mtls: {{mode: STRICT}}\n"
        );
        self.kube.apply(&strict)?;
        let refused = self.until_refused(self.plain, "strict");
        let meshed = refused
            .as_ref()
            .ok()
            .map(|_| self.echo(self.client, "strict-meshed"));
        self.kube.run(&[
            "-n",
            MESH_NS,
            "delete",
            "peerauthentication",
            "ambit-e2e-strict",
        ])?;
        let (after, err) = refused?;
        meshed
            .context("no mesh attempt")?
            .context("the meshed client must still pass under STRICT")?;
        Ok(format!(
            "plaintext reset {after:.1?} after STRICT ({err}); the meshed client still passed"
        ))
    }

    fn label_toggle(&self) -> anyhow::Result<String> {
        let before = self.restart_counts()?;
        self.kube
            .run(&["label", "namespace", MESH_NS, "ambit.dev/mesh-"])?;
        let off = self
            .kube
            .wait_annotation(self.client, None, Duration::from_secs(60))?;
        self.kube
            .wait_annotation(self.server, None, Duration::from_secs(60))?;
        let marker = format!("AMBIT-MARKER-plain-{}", std::process::id());
        let wire = self.capture_during(&marker, || self.echo(self.client, &marker))?;
        let plain = wire.expect_plaintext()?;

        self.kube
            .run(&["label", "namespace", MESH_NS, "ambit.dev/mesh=enabled"])?;
        let on =
            self.kube
                .wait_annotation(self.client, Some("enrolled"), Duration::from_secs(60))?;
        self.kube
            .wait_annotation(self.server, Some("enrolled"), Duration::from_secs(60))?;
        let mtls = self.mtls_only_on_the_wire("relabel")?;
        let after = self.restart_counts()?;
        if before != after {
            bail!("pods restarted or were replaced: before {before:?}, after {after:?}");
        }
        Ok(format!(
            "unenrolled in {off:.1?}: {plain}; re-enrolled in {on:.1?}: {mtls}; same pod UIDs and restart counts {after:?}"
        ))
    }

    /// Pod UID and container restart count of the client and the server.
    fn restart_counts(&self) -> anyhow::Result<BTreeMap<String, String>> {
        let mut out = BTreeMap::new();
        for pod in [self.client, self.server] {
            let value = self.kube.capture(&[
                "-n",
                &pod.namespace,
                "get",
                "pod",
                &pod.name,
                "-o",
                "jsonpath={.metadata.uid}/{.status.containerStatuses[0].restartCount}",
            ])?;
            if !value.starts_with(&pod.uid) {
                bail!("{}/{} was replaced ({value})", pod.namespace, pod.name);
            }
            out.insert(pod.name.clone(), value);
        }
        Ok(out)
    }

    fn agent_restart_fails_closed(&self, old_agent: &str) -> anyhow::Result<String> {
        let marker = format!("AMBIT-MARKER-restart-{}", std::process::id());
        let mut window_refused = 0u32;
        let mut window_passed = 0u32;
        let mut window_exits = BTreeMap::<i32, u32>::new();
        let mut resumed_after = None;
        let wire = self.capture_during(&marker, || {
            self.kube.run(&[
                "-n",
                "ambit-system",
                "delete",
                "pod",
                old_agent,
                "--wait=false",
            ])?;
            let started = Instant::now();
            while started.elapsed() < Duration::from_secs(240) {
                let agents = self.kube.agents_on(self.worker1)?;
                let old_gone = agents.iter().all(|(name, _)| name != old_agent);
                let new_ready = agents
                    .iter()
                    .any(|(name, ready)| name != old_agent && *ready);
                let outcome = self.kube.curl(self.client, &self.echo_url(&marker))?;
                let passed = outcome.0 == 0 && outcome.1 == marker;
                if new_ready {
                    if passed {
                        resumed_after = Some(started.elapsed());
                        return Ok(());
                    }
                } else if old_gone {
                    // No agent at all on the node: anything that passes here went around
                    // the mesh.
                    if passed {
                        window_passed += 1;
                    } else {
                        window_refused += 1;
                        *window_exits.entry(outcome.0).or_default() += 1;
                    }
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            bail!("traffic did not resume within 240 s of deleting {old_agent}")
        })?;
        let resumed = resumed_after.context("traffic did not resume")?;
        if window_passed > 0 {
            bail!("{window_passed} request(s) passed while no agent ran on the node (fail open)");
        }
        if window_refused == 0 {
            bail!(
                "no request was made while the node had no agent (the new one was ready too \
                 fast to observe); fail-closed behaviour not shown"
            );
        }
        if wire.plaintext_packets > 0 || wire.marker_seen {
            bail!(
                "plaintext on the wire during the restart: {}",
                wire.describe()
            );
        }
        Ok(format!(
            "{window_refused} request(s) failed while no agent ran (curl exit codes {window_exits:?}), none passed; traffic resumed {resumed:.1?} after the delete; wire: {}",
            wire.describe()
        ))
    }

    /// Polls until `from` is refused with a reset; returns when and curl's message.
    fn until_refused(&self, from: &Pod, tag: &str) -> anyhow::Result<(Duration, String)> {
        let started = Instant::now();
        let mut last = (0, String::new(), String::new());
        while started.elapsed() < Duration::from_secs(60) {
            last = self.kube.curl(from, &self.echo_url(tag))?;
            if CURL_RESET.contains(&last.0) {
                return Ok((
                    started.elapsed(),
                    format!("curl exit {}: {}", last.0, last.2),
                ));
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        bail!(
            "not refused with a reset within 60 s: last curl exit {}, body {:?}, stderr {:?}",
            last.0,
            last.1,
            last.2
        )
    }

    fn until_ok(&self, from: &Pod, tag: &str) -> anyhow::Result<Duration> {
        let started = Instant::now();
        loop {
            match self.echo(from, tag) {
                Ok(()) => return Ok(started.elapsed()),
                Err(e) if started.elapsed() > Duration::from_secs(60) => {
                    return Err(e.context("still refused 60 s later"));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(500)),
            }
        }
    }
}

/// What tcpdump saw: payload-carrying packets by the server pod's port.
struct WireSummary {
    hbone_packets: u32,
    plaintext_packets: u32,
    other_ports: Vec<String>,
    marker_seen: bool,
    bytes: usize,
}

impl WireSummary {
    fn parse(text: &str, server_ip: &str, marker: &str) -> Self {
        let mut summary = Self {
            hbone_packets: 0,
            plaintext_packets: 0,
            other_ports: Vec::new(),
            marker_seen: text.contains(marker),
            bytes: text.len(),
        };
        for line in text.lines() {
            let Some(port) = server_port(line, server_ip) else {
                continue;
            };
            // Only packets that carry bytes: handshakes and ACKs say nothing.
            let carries = line
                .rsplit_once("length ")
                .and_then(|(_, n)| n.trim().parse::<u32>().ok())
                .is_some_and(|n| n > 0);
            if !carries {
                continue;
            }
            match port.as_str() {
                "15008" => summary.hbone_packets += 1,
                p if p == SERVER_PORT.to_string() => summary.plaintext_packets += 1,
                other => summary.other_ports.push(other.to_owned()),
            }
        }
        summary
    }

    fn describe(&self) -> String {
        format!(
            "{} payload packets on 15008, {} on {SERVER_PORT}, others {:?}, marker {} in {} bytes of capture",
            self.hbone_packets,
            self.plaintext_packets,
            self.other_ports,
            if self.marker_seen { "SEEN" } else { "absent" },
            self.bytes
        )
    }

    fn expect_mtls_only(&self) -> anyhow::Result<String> {
        if self.hbone_packets == 0
            || self.plaintext_packets > 0
            || !self.other_ports.is_empty()
            || self.marker_seen
        {
            bail!("{}", self.describe());
        }
        Ok(self.describe())
    }

    /// Plain traffic reached the server: the marker in clear on its port. (Packets on 15008
    /// are not held against it: a pooled HBONE connection from before may still be closing.)
    fn expect_plaintext(&self) -> anyhow::Result<String> {
        if self.plaintext_packets == 0 || !self.marker_seen {
            bail!("expected plain traffic: {}", self.describe());
        }
        Ok(self.describe())
    }
}

/// The server-side port of a tcpdump header line
/// (`IP 10.244.1.3.40000 > 10.244.2.4.15008: Flags [P.], …, length 120`), in either direction.
fn server_port(line: &str, server_ip: &str) -> Option<String> {
    let rest = line.split_once(" IP ")?.1;
    let (from, rest) = rest.split_once(" > ")?;
    let to = rest.split_once(':')?.0;
    let prefix = format!("{server_ip}.");
    [from, to]
        .into_iter()
        .find_map(|end| end.strip_prefix(&prefix).map(str::to_owned))
}

/// tcpdump inside a kind node container (its eth0 is the wire between the nodes).
struct Capture {
    node: String,
    pid: String,
    child: Child,
    output: std::sync::mpsc::Receiver<String>,
}

impl Capture {
    fn start(node: &str, filter: &str) -> anyhow::Result<Self> {
        // `echo $$` then exec: the printed pid is tcpdump's (under `timeout`, a safety net
        // should this process die), so stop() can signal exactly it.
        let script =
            format!("echo $$; exec timeout -s INT 600 tcpdump -i eth0 -nn -l -A -s 0 '{filter}'");
        let mut child = Command::new("docker")
            .args(["exec", node, "sh", "-c", &script])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting tcpdump")?;
        let stdout = child.stdout.take().context("tcpdump stdout")?;
        let stderr = child.stderr.take().context("tcpdump stderr")?;
        let mut stdout = BufReader::new(stdout);
        let mut pid = String::new();
        stdout.read_line(&mut pid)?;
        let pid = pid.trim().to_owned();
        if pid.is_empty() || !pid.bytes().all(|b| b.is_ascii_digit()) {
            bail!("tcpdump on {node} did not start (pid line {pid:?})");
        }
        // Capture is live once tcpdump says "listening on".
        let mut stderr = BufReader::new(stderr);
        let mut line = String::new();
        loop {
            line.clear();
            if stderr.read_line(&mut line)? == 0 {
                bail!("tcpdump on {node} exited before listening");
            }
            if line.contains("listening on") {
                break;
            }
        }
        // Keep draining stderr too: a closed pipe could end `docker exec` before stdout is
        // complete.
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut stderr, &mut std::io::sink());
        });
        // Keep reading stdout in the background so tcpdump never blocks on a full pipe.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = stdout.read_to_string(&mut text);
            let _ = tx.send(text);
        });
        Ok(Self {
            node: node.into(),
            pid,
            child,
            output: rx,
        })
    }

    fn stop(mut self) -> anyhow::Result<String> {
        // Let packets in flight be seen before stopping.
        std::thread::sleep(Duration::from_millis(500));
        run(Command::new("docker").args(["exec", &self.node, "kill", "-INT", &self.pid]))?;
        self.child.wait()?;
        self.output.recv().context("capture output")
    }
}

fn identities_in_logs(
    kube: &Kube,
    client_agent: &str,
    server_agent: &str,
) -> anyhow::Result<String> {
    let client_id = format!("spiffe://{TRUST_DOMAIN}/ns/{MESH_NS}/sa/client");
    let server_id = format!("spiffe://{TRUST_DOMAIN}/ns/{MESH_NS}/sa/server");
    let mut evidence = Vec::new();
    for (agent, message) in [
        (client_agent, "outbound connection closed"),
        (server_agent, "inbound connection closed"),
    ] {
        let logs = kube.capture(&["-n", "ambit-system", "logs", agent, "-c", "agent"])?;
        let line = logs
            .lines()
            .find(|l| l.contains(message) && l.contains(&client_id) && l.contains(&server_id))
            .with_context(|| {
                format!("{agent}: no \"{message}\" line naming {client_id} and {server_id}")
            })?;
        evidence.push(format!("{agent}: {}", truncate(line, 240)));
    }
    Ok(evidence.join(" | "))
}

fn truncate(text: &str, max: usize) -> &str {
    match text.char_indices().nth(max) {
        Some((i, _)) => &text[..i],
        None => text,
    }
}

/// ConfigMap `ambit-root` holds exactly the root of the CA's Secret `ambit-ca`.
fn root_published(kube: &Kube, published: &str) -> anyhow::Result<String> {
    let secret = kube.capture(&[
        "-n",
        "ambit-system",
        "get",
        "secret",
        "ambit-ca",
        "-o",
        "go-template={{index .data \"ca.crt\" | base64decode}}",
    ])?;
    // Same certificate whatever the PEM line wrapping.
    let bare = |pem: &str| pem.split_whitespace().collect::<String>();
    if published.trim().is_empty() || bare(published) != bare(&secret) {
        bail!(
            "ConfigMap ambit-root ({} bytes) differs from Secret ambit-ca's ca.crt ({} bytes)",
            published.trim().len(),
            secret.trim().len()
        );
    }
    let first_line = published.lines().nth(1).unwrap_or_default();
    Ok(format!(
        "ambit-root root.pem = ambit-ca ca.crt ({} bytes, {first_line:.24}…)",
        published.trim().len()
    ))
}

/// With a token bound to worker 1's agent pod (as its projected one), the CA must refuse the
/// server's identity (its only pod runs on worker 2) and grant the client's (worker 1).
fn ca_refuses_other_node(
    kube: &Kube,
    probe: &Path,
    root: &Path,
    worker1: &str,
    work: &Path,
) -> anyhow::Result<String> {
    let agent = kube.agent_on(worker1)?;
    let uid = kube.capture(&[
        "-n",
        "ambit-system",
        "get",
        "pod",
        &agent,
        "-o",
        "jsonpath={.metadata.uid}",
    ])?;
    let token = kube.capture(&[
        "-n",
        "ambit-system",
        "create",
        "token",
        "ambit",
        "--audience=ambit-ca",
        "--duration=10m",
        "--bound-object-kind=Pod",
        &format!("--bound-object-name={agent}"),
        &format!("--bound-object-uid={}", uid.trim()),
    ])?;
    let token_file = work.join("agent-token");
    std::fs::write(&token_file, token.trim())?;
    let local_port = "15912";
    let mut forward = kube
        .command(&[
            "-n",
            "ambit-system",
            "port-forward",
            "svc/ambit-ca",
            &format!("{local_port}:15012"),
        ])
        .stdout(Stdio::piped())
        .spawn()
        .context("kubectl port-forward")?;
    let outcome = (|| {
        let mut ready = String::new();
        BufReader::new(forward.stdout.as_mut().context("port-forward stdout")?)
            .read_line(&mut ready)?;
        if !ready.contains("Forwarding from") {
            bail!("port-forward did not start: {ready:?}");
        }
        let ask = |identity: &str| -> anyhow::Result<(bool, String)> {
            let out = Command::new(probe)
                .args(["--address", &format!("https://127.0.0.1:{local_port}")])
                .args(["--tls-server-name", "ambit-ca.ambit-system.svc"])
                .arg("--token-file")
                .arg(&token_file)
                .arg("--trust-file")
                .arg(root)
                .args(["--identity", identity])
                .output()
                .context("running ambit-ca-probe")?;
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            Ok((out.status.success(), text.trim().to_owned()))
        };
        let own = format!("spiffe://{TRUST_DOMAIN}/ns/{MESH_NS}/sa/client");
        let other = format!("spiffe://{TRUST_DOMAIN}/ns/{MESH_NS}/sa/server");
        let (issued, own_text) = ask(&own)?;
        if !issued {
            bail!("the control request for {own} (a pod on {worker1}) was not issued: {own_text}");
        }
        let (issued, other_text) = ask(&other)?;
        if issued || !other_text.contains("identity_not_on_node") {
            bail!(
                "{other} (no pod on {worker1}) should be refused with identity_not_on_node: {other_text}"
            );
        }
        Ok(format!("{own}: {own_text}; {other}: {other_text}"))
    })();
    // Our own child, ended by its handle.
    let _ = forward.kill();
    let _ = forward.wait();
    outcome
}

/// As a network plugin restarting would (kindnet rewrites its conflist on start), the
/// node's conflist loses the ambit-cni entry; the agent must chain it again within its poll
/// interval (5 s), log it and count it. The entry is removed with `ambit-cni uninstall`
/// run in the agent's container against an empty scratch bin dir, so the node's binary
/// stays (that is what the agent checks before chaining).
fn cni_rechained(kube: &Kube, node: &str) -> anyhow::Result<String> {
    const CONF_DIR: &str = "/etc/cni/net.d";
    let chained = || -> anyhow::Result<bool> {
        Ok(docker_output(node, &format!("cat {CONF_DIR}/*.conflist"))?.contains("\"ambit-cni\""))
    };
    if !chained()? {
        bail!("ambit-cni is not in {node}'s conflist to begin with");
    }
    let agent = kube.agent_on(node)?;
    kube.run(&[
        "-n",
        "ambit-system",
        "exec",
        &agent,
        "-c",
        "agent",
        "--",
        "/usr/local/bin/ambit-cni",
        "uninstall",
        "--bin-dir=/var/lib/ambit",
        "--conf-dir=/host/etc/cni/net.d",
    ])?;
    if chained()? {
        bail!("removing the entry did not take (nothing tested)");
    }
    let started = Instant::now();
    while !chained()? {
        if started.elapsed() > Duration::from_secs(60) {
            bail!("ambit-cni was not chained again within 60 s");
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let took = started.elapsed();
    let logs = kube.capture(&["-n", "ambit-system", "logs", &agent, "-c", "agent"])?;
    let logged = logs
        .lines()
        .filter(|l| l.contains("chained it again"))
        .count();
    if logged == 0 {
        bail!("re-chained, but {agent} did not log it");
    }
    if docker_output(node, "test -x /opt/cni/bin/ambit-cni && echo present")?.trim() != "present" {
        bail!("the plugin binary is gone from {node}");
    }
    Ok(format!(
        "entry back after {took:.1?}; {agent} logged {logged} re-chain(s); binary still in /opt/cni/bin"
    ))
}

fn docker_output(node: &str, script: &str) -> anyhow::Result<String> {
    let out = Command::new("docker")
        .args(["exec", node, "sh", "-c", script])
        .output()
        .context("running docker exec")?;
    if !out.status.success() {
        bail!(
            "docker exec {node} {script:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn docker_exec(node: &str, script: &str) -> anyhow::Result<()> {
    run(Command::new("docker").args(["exec", node, "sh", "-c", script]))
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let shown = format!("{cmd:?}");
    eprintln!("xtask: {shown}");
    let status = cmd.status().with_context(|| format!("running {shown}"))?;
    if !status.success() {
        bail!("{shown} failed ({status})");
    }
    Ok(())
}

fn cargo(args: &[&str]) -> anyhow::Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    run(Command::new(cargo).args(args))
}

fn target_dir() -> anyhow::Result<PathBuf> {
    Ok(match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => setup::workspace_root()?.join("target"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const CAPTURE: &str = "\
10:00:00.000001 IP 10.244.1.3.40000 > 10.244.2.4.15008: Flags [S], seq 1, win 64240, length 0
10:00:00.000002 IP 10.244.2.4.15008 > 10.244.1.3.40000: Flags [P.], seq 1:518, ack 1, length 517
E..(..@.@...........
10:00:00.000003 IP 10.244.1.3.40000 > 10.244.2.4.15008: Flags [P.], seq 1:90, ack 518, length 89
10:00:00.000004 IP 10.244.1.3.40002 > 10.244.2.4.8080: Flags [P.], seq 1:80, ack 1, length 79
GET /echo?msg=AMBIT-MARKER-x HTTP/1.1
";

    #[test]
    fn wire_summary_counts_payload_packets_by_server_port() {
        let wire = WireSummary::parse(CAPTURE, "10.244.2.4", "AMBIT-MARKER-x");
        assert_eq!(wire.hbone_packets, 2);
        assert_eq!(wire.plaintext_packets, 1);
        assert!(wire.marker_seen);
        assert!(wire.expect_mtls_only().is_err());
        assert!(wire.expect_plaintext().is_ok());
        let no_marker = WireSummary::parse(CAPTURE, "10.244.2.4", "AMBIT-MARKER-y");
        assert!(
            no_marker.expect_plaintext().is_err(),
            "the marker must be seen in clear"
        );
    }

    #[test]
    fn only_hbone_with_no_marker_is_mtls_only() {
        let tls_only: String = CAPTURE.lines().take(4).collect::<Vec<_>>().join("\n");
        let wire = WireSummary::parse(&tls_only, "10.244.2.4", "AMBIT-MARKER-x");
        assert_eq!((wire.hbone_packets, wire.plaintext_packets), (2, 0));
        assert!(!wire.marker_seen);
        assert!(wire.expect_mtls_only().is_ok());
        // A capture that saw nothing proves nothing.
        let empty = WireSummary::parse("", "10.244.2.4", "AMBIT-MARKER-x");
        assert!(empty.expect_mtls_only().is_err());
    }

    #[test]
    fn server_port_reads_either_direction_and_ignores_other_hosts() {
        let out = "1 IP 10.244.1.3.40000 > 10.244.2.4.15008: Flags [P.], length 5";
        let back = "1 IP 10.244.2.4.8080 > 10.244.1.3.40000: Flags [P.], length 5";
        let other = "1 IP 10.244.1.3.40000 > 10.244.2.40.8080: Flags [P.], length 5";
        assert_eq!(server_port(out, "10.244.2.4").as_deref(), Some("15008"));
        assert_eq!(server_port(back, "10.244.2.4").as_deref(), Some("8080"));
        assert_eq!(server_port(other, "10.244.2.4"), None);
    }

    #[test]
    fn workloads_pin_pods_to_their_nodes_and_label_only_the_mesh_namespace() {
        let yaml = workloads("w1", "w2");
        assert!(yaml.contains(&format!(
            "name: {MESH_NS}\n  labels: {{ambit.dev/mesh: enabled}}"
        )));
        assert!(yaml.contains(&format!("name: {PLAIN_NS}\n---")));
        assert_eq!(yaml.matches("kubernetes.io/hostname: w1").count(), 2);
        assert_eq!(yaml.matches("kubernetes.io/hostname: w2").count(), 1);
    }
}
