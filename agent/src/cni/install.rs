//! Installing `ambit-cni` on a node (the DaemonSet's init container) and removing it.
//!
//! The runtime (containerd, CRI-O) uses the lexicographically first `*.conf`,
//! `*.conflist` or `*.json` file of its config directory as the pod network; the plugin is
//! chained as the last plugin of that file. A single-plugin `.conf`/`.json` file is turned
//! into a `.conflist` of the same base name holding the original plugin unchanged.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use super::plugin::SUPPORTED_VERSIONS;
use super::write_atomically;

/// The plugin's `type`, which is also the binary's name in the CNI bin directory.
pub const PLUGIN_TYPE: &str = "ambit-cni";
const CONFIG_EXTENSIONS: [&str; 3] = ["conf", "conflist", "json"];

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("no CNI network config (*.conf, *.conflist, *.json) in {}; is the network plugin installed yet?", dir.display())]
    NoConfig { dir: PathBuf },
    #[error("reading {}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error("{} is not valid JSON: {source}", path.display())]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{}: {reason}", path.display())]
    Invalid { path: PathBuf, reason: String },
    #[error("writing {}: {source}", path.display())]
    Write { path: PathBuf, source: io::Error },
}

#[derive(Clone, Debug)]
pub struct InstallOptions {
    /// The node's CNI binary directory (e.g. `/host/opt/cni/bin`).
    pub bin_dir: PathBuf,
    /// The node's CNI config directory (e.g. `/host/etc/cni/net.d`).
    pub conf_dir: PathBuf,
    /// The binary to install (the running `ambit-cni` itself).
    pub source_exe: PathBuf,
    /// Written into the plugin entry as `agentSocket` (a path on the node).
    pub agent_socket: PathBuf,
    /// Written into the plugin entry as `namespacesFile` (a path on the node).
    pub namespaces_file: PathBuf,
}

/// What [`install`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Installed {
    pub binary: PathBuf,
    /// The conflist that now chains the plugin.
    pub config: PathBuf,
    /// False when the config already held exactly this entry (nothing was written).
    pub config_changed: bool,
    /// The single-plugin file that was converted into `config`, now removed.
    pub converted_from: Option<PathBuf>,
}

/// Where the plugin's entry goes and what it says: [`install`]'s options without the binary.
#[derive(Clone, Debug, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ChainOptions {
    #[serde(serialize_with = "crate::observability::readable::path")]
    pub conf_dir: PathBuf,
    #[serde(serialize_with = "crate::observability::readable::path")]
    pub agent_socket: PathBuf,
    #[serde(serialize_with = "crate::observability::readable::path")]
    pub namespaces_file: PathBuf,
}

impl InstallOptions {
    pub fn chain_options(&self) -> ChainOptions {
        ChainOptions {
            conf_dir: self.conf_dir.clone(),
            agent_socket: self.agent_socket.clone(),
            namespaces_file: self.namespaces_file.clone(),
        }
    }
}

/// The primary config with the plugin chained, computed but not written yet.
#[derive(Debug)]
pub struct ChainPlan {
    /// The file the runtime uses now.
    pub primary: PathBuf,
    /// The file to write (the primary, or a `.conflist` beside a single-plugin one).
    pub config: PathBuf,
    list: Value,
    /// False when the primary already holds exactly this (nothing to write).
    pub changes: bool,
    pub converted_from: Option<PathBuf>,
}

/// Works out the chained config without touching the node.
pub fn plan_chain(options: &ChainOptions) -> Result<ChainPlan, InstallError> {
    let primary = primary_config(&options.conf_dir)?;
    let original = read_json(&primary)?;

    let is_list = original.get("plugins").is_some();
    let mut list = if is_list {
        original.clone()
    } else {
        conf_to_list(&primary, &original)?
    };
    check_version(&primary, &list)?;
    let plugins = plugins_mut(&primary, &mut list)?;
    let mut entry = plugins
        .iter()
        .find(|plugin| is_ours(plugin))
        .and_then(|plugin| plugin.as_object().cloned())
        .unwrap_or_default();
    plugins.retain(|plugin| !is_ours(plugin));
    if plugins.is_empty() {
        return Err(InstallError::Invalid {
            path: primary,
            reason: "has no network plugin to chain after".into(),
        });
    }
    entry.insert("type".into(), PLUGIN_TYPE.into());
    entry.insert(
        "agentSocket".into(),
        options.agent_socket.display().to_string().into(),
    );
    entry.insert(
        "namespacesFile".into(),
        options.namespaces_file.display().to_string().into(),
    );
    plugins.push(Value::Object(entry));

    // A list (even one in a .json file) is rewritten in place; a single plugin becomes a
    // .conflist beside it.
    let config = if is_list {
        primary.clone()
    } else {
        primary.with_extension("conflist")
    };
    let converted_from = (config != primary).then(|| primary.clone());
    if converted_from.is_some() && config.exists() {
        return Err(InstallError::Invalid {
            path: primary,
            reason: format!(
                "converting it would overwrite {}; merge them first",
                config.display()
            ),
        });
    }
    Ok(ChainPlan {
        changes: !(is_list && list == original),
        primary,
        config,
        list,
        converted_from,
    })
}

/// Writes a plan that [`ChainPlan::changes`] something (the binary must be in place).
pub fn write_chain(plan: &ChainPlan) -> Result<(), InstallError> {
    write_json(&plan.config, &plan.list)?;
    if let Some(old) = &plan.converted_from {
        fs::remove_file(old).map_err(|source| InstallError::Write {
            path: old.clone(),
            source,
        })?;
    }
    Ok(())
}

/// Copies the binary into place, then chains the plugin into the primary network config.
/// Idempotent: an existing entry of ours is updated (its other keys kept) and moved last.
pub fn install(options: &InstallOptions) -> Result<Installed, InstallError> {
    let plan = plan_chain(&options.chain_options())?;
    // The binary goes first: a config naming a plugin the runtime cannot find fails pods.
    let binary = options.bin_dir.join(PLUGIN_TYPE);
    copy_binary(&options.source_exe, &binary)?;
    if !plan.changes {
        return Ok(Installed {
            binary,
            config: plan.config,
            config_changed: false,
            converted_from: None,
        });
    }
    write_chain(&plan)?;
    Ok(Installed {
        binary,
        config: plan.config,
        config_changed: true,
        converted_from: plan.converted_from,
    })
}

/// Removes the plugin's binary, then its entry from every network config in `conf_dir`
/// (leaving valid conflists). Returns the configs it rewrote. Running it twice is harmless.
///
/// The binary goes first: the agent's chain watch ([`super::watch`]) never chains the
/// plugin while the binary is missing and takes back an entry it wrote if the binary
/// vanished meanwhile, so an agent still running cannot re-add the entry after this.
pub fn uninstall(bin_dir: &Path, conf_dir: &Path) -> Result<Vec<PathBuf>, InstallError> {
    let binary = bin_dir.join(PLUGIN_TYPE);
    match fs::remove_file(&binary) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(InstallError::Write {
                path: binary,
                source,
            });
        }
    }
    unchain(conf_dir)
}

/// Takes the plugin's entry out of every network config in `conf_dir`.
pub fn unchain(conf_dir: &Path) -> Result<Vec<PathBuf>, InstallError> {
    let mut rewritten = Vec::new();
    for path in config_files(conf_dir)? {
        let mut list = read_json(&path)?;
        let Some(plugins) = list.get_mut("plugins").and_then(Value::as_array_mut) else {
            continue;
        };
        let before = plugins.len();
        plugins.retain(|plugin| !is_ours(plugin));
        if plugins.len() == before {
            continue;
        }
        if plugins.is_empty() {
            // Only our entry was left: an empty list is no valid network.
            fs::remove_file(&path).map_err(|source| InstallError::Write {
                path: path.clone(),
                source,
            })?;
        } else {
            write_json(&path, &list)?;
        }
        rewritten.push(path);
    }
    Ok(rewritten)
}

/// The file the runtime takes as the pod network: the first config file by name.
pub fn primary_config(conf_dir: &Path) -> Result<PathBuf, InstallError> {
    config_files(conf_dir)?
        .into_iter()
        .next()
        .ok_or_else(|| InstallError::NoConfig {
            dir: conf_dir.to_path_buf(),
        })
}

fn config_files(conf_dir: &Path) -> Result<Vec<PathBuf>, InstallError> {
    let read_err = |source| InstallError::Read {
        path: conf_dir.to_path_buf(),
        source,
    };
    let mut files = Vec::new();
    for entry in fs::read_dir(conf_dir).map_err(read_err)? {
        let path = entry.map_err(read_err)?.path();
        let is_config = path
            .extension()
            .and_then(|ext| ext.to_str())
            .is_some_and(|ext| CONFIG_EXTENSIONS.contains(&ext));
        if is_config && path.is_file() {
            files.push(path);
        }
    }
    // Byte order of the names, as the runtimes sort them.
    files.sort_by(|a, b| a.file_name().cmp(&b.file_name()));
    Ok(files)
}

fn read_json(path: &Path) -> Result<Value, InstallError> {
    let text = fs::read(path).map_err(|source| InstallError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let value: Value = serde_json::from_slice(&text).map_err(|source| InstallError::Parse {
        path: path.to_path_buf(),
        source,
    })?;
    if !value.is_object() {
        return Err(InstallError::Invalid {
            path: path.to_path_buf(),
            reason: "is not a JSON object".into(),
        });
    }
    Ok(value)
}

fn write_json(path: &Path, value: &Value) -> Result<(), InstallError> {
    let mut text = serde_json::to_string_pretty(value).map_err(|e| InstallError::Write {
        path: path.to_path_buf(),
        source: io::Error::other(e),
    })?;
    text.push('\n');
    write_atomically(path, text.as_bytes(), 0o644).map_err(|source| InstallError::Write {
        path: path.to_path_buf(),
        source,
    })
}

/// A single-plugin config as a list, the way libcni reads one: the plugin object unchanged
/// inside `plugins`, its version and name repeated at the top.
fn conf_to_list(path: &Path, conf: &Value) -> Result<Value, InstallError> {
    if conf.get("type").and_then(Value::as_str).is_none() {
        return Err(InstallError::Invalid {
            path: path.to_path_buf(),
            reason: "has neither \"plugins\" nor a plugin \"type\"".into(),
        });
    }
    let mut list = Map::new();
    for key in ["cniVersion", "name"] {
        if let Some(value) = conf.get(key) {
            list.insert(key.into(), value.clone());
        }
    }
    list.insert("plugins".into(), Value::Array(vec![conf.clone()]));
    Ok(Value::Object(list))
}

fn check_version(path: &Path, list: &Value) -> Result<(), InstallError> {
    let version = list.get("cniVersion").and_then(Value::as_str);
    match version {
        Some(v) if SUPPORTED_VERSIONS.contains(&v) => Ok(()),
        _ => Err(InstallError::Invalid {
            path: path.to_path_buf(),
            reason: format!(
                "cniVersion {version:?} is not one ambit-cni supports ({SUPPORTED_VERSIONS:?})"
            ),
        }),
    }
}

fn plugins_mut<'a>(path: &Path, list: &'a mut Value) -> Result<&'a mut Vec<Value>, InstallError> {
    list.get_mut("plugins")
        .and_then(Value::as_array_mut)
        .ok_or_else(|| InstallError::Invalid {
            path: path.to_path_buf(),
            reason: "\"plugins\" is not a list".into(),
        })
}

pub(crate) fn is_ours(plugin: &Value) -> bool {
    plugin.get("type").and_then(Value::as_str) == Some(PLUGIN_TYPE)
}

/// Copies under a temporary name, then renames: a runtime never runs half a binary, and a
/// running old binary keeps its inode.
fn copy_binary(source: &Path, target: &Path) -> Result<(), InstallError> {
    use std::os::unix::fs::PermissionsExt as _;
    let staging = target.with_file_name(format!(".{PLUGIN_TYPE}.{}.tmp", std::process::id()));
    let result = (|| {
        fs::copy(source, &staging)?;
        fs::set_permissions(&staging, fs::Permissions::from_mode(0o755))?;
        fs::File::open(&staging)?.sync_all()?;
        fs::rename(&staging, target)
    })();
    if let Err(source) = result {
        let _ = fs::remove_file(&staging);
        return Err(InstallError::Write {
            path: target.to_path_buf(),
            source,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::testing::TempDir;
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    struct Node {
        _dir: TempDir,
        bin: PathBuf,
        conf: PathBuf,
        exe: PathBuf,
    }

    fn node() -> Node {
        let dir = TempDir::new("cni-install");
        let bin = dir.path().join("opt/cni/bin");
        let conf = dir.path().join("etc/cni/net.d");
        fs::create_dir_all(&bin).expect("bin");
        fs::create_dir_all(&conf).expect("conf");
        let exe = dir.path().join("ambit-cni-build");
        fs::write(&exe, b"\x7fELF fake plugin").expect("exe");
        Node {
            _dir: dir,
            bin,
            conf,
            exe,
        }
    }

    fn options(node: &Node, socket: &str) -> InstallOptions {
        InstallOptions {
            bin_dir: node.bin.clone(),
            conf_dir: node.conf.clone(),
            source_exe: node.exe.clone(),
            agent_socket: socket.into(),
            namespaces_file: "/var/run/ambit/mesh-namespaces".into(),
        }
    }

    const CALICO: &str = r#"{
  "name": "k8s-pod-network",
  "cniVersion": "0.3.1",
  "plugins": [
    {"type": "calico", "log_level": "info", "ipam": {"type": "calico-ipam"}, "kubernetes": {"kubeconfig": "/etc/cni/net.d/calico-kubeconfig"}},
    {"type": "portmap", "snat": true, "capabilities": {"portMappings": true}},
    {"type": "bandwidth", "capabilities": {"bandwidth": true}}
  ]
}"#;

    fn ours(socket: &str) -> Value {
        serde_json::json!({
            "type": "ambit-cni",
            "agentSocket": socket,
            "namespacesFile": "/var/run/ambit/mesh-namespaces",
        })
    }

    fn read(path: &Path) -> Value {
        serde_json::from_slice(&fs::read(path).expect("read")).expect("json")
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .expect("ls")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn chains_last_into_a_conflist_keeping_everything_else() {
        let node = node();
        let path = node.conf.join("10-calico.conflist");
        fs::write(&path, CALICO).expect("write");
        let installed = install(&options(&node, "/var/run/ambit/cni.sock")).expect("install");
        assert_eq!(
            installed,
            Installed {
                binary: node.bin.join("ambit-cni"),
                config: path.clone(),
                config_changed: true,
                converted_from: None,
            }
        );
        let mut expected: Value = serde_json::from_str(CALICO).expect("json");
        expected["plugins"]
            .as_array_mut()
            .expect("plugins")
            .push(ours("/var/run/ambit/cni.sock"));
        let written = read(&path);
        assert_eq!(written, expected);
        // Key order is the original's.
        let keys: Vec<&String> = written.as_object().expect("object").keys().collect();
        assert_eq!(keys, ["name", "cniVersion", "plugins"]);
        // The binary is in place, executable, with the build's bytes; no temp files left.
        assert_eq!(
            fs::read(&installed.binary).expect("bin"),
            b"\x7fELF fake plugin"
        );
        assert_eq!(
            fs::metadata(&installed.binary)
                .expect("stat")
                .permissions()
                .mode()
                & 0o777,
            0o755
        );
        assert_eq!(names(&node.bin), ["ambit-cni"]);
        assert_eq!(names(&node.conf), ["10-calico.conflist"]);
    }

    #[test]
    fn converts_a_single_plugin_conf_to_a_conflist() {
        let node = node();
        let flannel = r#"{"name":"cbr0","cniVersion":"1.0.0","type":"flannel","delegate":{"hairpinMode":true,"isDefaultGateway":true}}"#;
        fs::write(node.conf.join("10-flannel.conf"), flannel).expect("write");
        let installed = install(&options(&node, "/run/a.sock")).expect("install");
        assert_eq!(installed.config, node.conf.join("10-flannel.conflist"));
        assert_eq!(
            installed.converted_from,
            Some(node.conf.join("10-flannel.conf"))
        );
        assert_eq!(names(&node.conf), ["10-flannel.conflist"]);
        let original: Value = serde_json::from_str(flannel).expect("json");
        assert_eq!(
            read(&installed.config),
            serde_json::json!({
                "name": "cbr0",
                "cniVersion": "1.0.0",
                "plugins": [original, ours("/run/a.sock")],
            })
        );
        // Re-running finds the conflist and changes nothing.
        let again = install(&options(&node, "/run/a.sock")).expect("again");
        assert!(!again.config_changed);
        assert_eq!(again.converted_from, None);
    }

    #[test]
    fn is_idempotent_and_updates_its_own_entry() {
        let node = node();
        let path = node.conf.join("10-calico.conflist");
        fs::write(&path, CALICO).expect("write");
        install(&options(&node, "/run/a.sock")).expect("first");
        let first = fs::read(&path).expect("read");
        let again = install(&options(&node, "/run/a.sock")).expect("second");
        assert!(!again.config_changed);
        assert_eq!(
            fs::read(&path).expect("read"),
            first,
            "unchanged file rewritten"
        );

        // An admin's extra key on our entry survives; the socket is updated; still one entry,
        // and last even if something was appended after it.
        let mut edited = read(&path);
        let plugins = edited["plugins"].as_array_mut().expect("plugins");
        plugins[3]["timeoutSeconds"] = 20.into();
        plugins.push(serde_json::json!({"type": "tuning"}));
        fs::write(&path, serde_json::to_string(&edited).expect("json")).expect("write");
        let updated = install(&options(&node, "/run/b.sock")).expect("update");
        assert!(updated.config_changed);
        let plugins = read(&path)["plugins"].as_array().expect("plugins").clone();
        let types: Vec<&str> = plugins
            .iter()
            .map(|p| p["type"].as_str().expect("type"))
            .collect();
        assert_eq!(
            types,
            ["calico", "portmap", "bandwidth", "tuning", "ambit-cni"]
        );
        assert_eq!(plugins[4]["agentSocket"], "/run/b.sock");
        assert_eq!(plugins[4]["timeoutSeconds"], 20);
    }

    #[test]
    fn picks_the_lexicographically_first_config() {
        let node = node();
        fs::write(node.conf.join("20-other.conflist"), CALICO).expect("write");
        fs::write(node.conf.join("05-cilium.conflist"), CALICO).expect("write");
        fs::write(node.conf.join("00-notes.txt"), "not a config").expect("write");
        fs::write(node.conf.join("10-x.conf.disabled"), "{").expect("write");
        let installed = install(&options(&node, "/run/a.sock")).expect("install");
        assert_eq!(installed.config, node.conf.join("05-cilium.conflist"));
        assert_eq!(
            fs::read_to_string(node.conf.join("20-other.conflist")).expect("read"),
            CALICO
        );
    }

    #[test]
    fn uninstall_removes_the_entry_and_the_binary() {
        let node = node();
        fs::write(
            node.conf.join("10-flannel.conf"),
            r#"{"name":"cbr0","cniVersion":"0.3.1","type":"flannel"}"#,
        )
        .expect("write");
        let installed = install(&options(&node, "/run/a.sock")).expect("install");
        let rewritten = uninstall(&node.bin, &node.conf).expect("uninstall");
        assert_eq!(rewritten, vec![installed.config.clone()]);
        assert_eq!(
            read(&installed.config),
            serde_json::json!({
                "name": "cbr0", "cniVersion": "0.3.1",
                "plugins": [{"name": "cbr0", "cniVersion": "0.3.1", "type": "flannel"}],
            })
        );
        assert!(names(&node.bin).is_empty());
        // Twice is fine, and leaves the network alone.
        assert!(uninstall(&node.bin, &node.conf).expect("again").is_empty());
        assert_eq!(names(&node.conf), ["10-flannel.conflist"]);
    }

    #[test]
    fn no_config_is_a_clear_error() {
        let node = node();
        let err = install(&options(&node, "/run/a.sock")).expect_err("nothing to chain");
        assert!(
            matches!(&err, InstallError::NoConfig { dir } if *dir == node.conf),
            "{err}"
        );
        assert!(err.to_string().contains("no CNI network config"), "{err}");
        // Nothing was installed.
        assert!(names(&node.bin).is_empty());
    }

    #[test]
    fn a_broken_or_unsupported_config_is_left_untouched() {
        let node = node();
        let path = node.conf.join("10-broken.conflist");
        fs::write(&path, "{\"plugins\": [").expect("write");
        let err = install(&options(&node, "/run/a.sock")).expect_err("broken");
        assert!(matches!(err, InstallError::Parse { .. }), "{err}");
        assert_eq!(fs::read_to_string(&path).expect("read"), "{\"plugins\": [");

        fs::write(
            &path,
            r#"{"cniVersion":"0.2.0","name":"n","plugins":[{"type":"bridge"}]}"#,
        )
        .expect("write");
        let err = install(&options(&node, "/run/a.sock")).expect_err("old version");
        assert!(
            err.to_string().contains("cniVersion Some(\"0.2.0\")"),
            "{err}"
        );

        fs::write(&path, r#"{"cniVersion":"1.0.0","name":"n","plugins":[]}"#).expect("write");
        let err = install(&options(&node, "/run/a.sock")).expect_err("empty");
        assert!(err.to_string().contains("no network plugin"), "{err}");
        assert_eq!(names(&node.conf), ["10-broken.conflist"]);
    }
}
