//! One node for the test control plane (`e2e/cluster.rs`): kube-scheduler, and a kubelet and
//! kube-proxy built from the pinned Kubernetes module, with containerd, runc and the CNI bridge
//! plugin from Debian (`hack/node.sh`). Pods live on a Linux bridge this node makes
//! ([`BRIDGE`], [`POD_CIDR`]); kube-proxy's iptables rules take the API server (a process on the
//! host) to Service addresses, and a small forwarder takes pods to the API server on loopback.
//!
//! Everything is made for the run and undone when [`Node`] drops: pods are stopped through the
//! kubelet (so their network namespaces are released by the CNI plugin), leftover containers
//! killed through containerd, kube-proxy's chains removed with `kube-proxy --cleanup`, then the
//! bridge, the route, the mounts under the node's folder and the folder itself.
//!
//! The kubelet settings this machine needs (a container with cgroup v1, no systemd, no image
//! registry) are the ones in [`Node::kubelet_config`]; docs/testing.md explains each.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};

use crate::cluster::{ControlPlane, free_port, start_logged, tail};

/// The bridge pods are attached to; the name is this project's, so a leftover is recognised.
pub const BRIDGE: &str = "agentguard0";
/// Pods' addresses: a range used by nothing else on this machine, only on [`BRIDGE`].
pub const POD_CIDR: &str = "172.30.244.0/24";
/// The bridge's own address: pods' gateway, the node's InternalIP, where the kubelet listens.
pub const GATEWAY: &str = "172.30.244.1";
/// The control plane's `--service-cluster-ip-range`: routed to [`BRIDGE`] so that a Service
/// address never leaves the machine, even before kube-proxy has written its rules.
pub const SERVICE_CIDR: &str = "10.0.0.0/24";
/// Where the CRI plugin of containerd 1.6 keeps pods' network namespaces.
const NETNS_DIR: &str = "/var/run/netns";

/// The node's programs, named by environment variables (`hack/k8s-binaries.sh`, `hack/node.sh`).
pub struct NodeBinaries {
    pub kube_scheduler: PathBuf,
    pub kubelet: PathBuf,
    pub kube_proxy: PathBuf,
    pub containerd: PathBuf,
    pub ctr: PathBuf,
    pub cni_bin_dir: PathBuf,
    pub iptables: PathBuf,
}

impl NodeBinaries {
    pub fn from_env() -> Result<Self> {
        let get = |var: &str, script: &str| -> Result<PathBuf> {
            let path = PathBuf::from(
                std::env::var(var).with_context(|| format!("{var} is not set: eval \"$({script})\""))?,
            );
            ensure!(path.exists(), "{var}={} does not exist", path.display());
            Ok(path)
        };
        Ok(Self {
            kube_scheduler: get("KUBE_SCHEDULER", "hack/k8s-binaries.sh")?,
            kubelet: get("KUBELET", "hack/k8s-binaries.sh")?,
            kube_proxy: get("KUBE_PROXY", "hack/k8s-binaries.sh")?,
            containerd: get("CONTAINERD", "hack/node.sh")?,
            ctr: get("CTR", "hack/node.sh")?,
            cni_bin_dir: get("CNI_BIN_DIR", "hack/node.sh")?,
            iptables: get("IPTABLES", "hack/node.sh")?,
        })
    }
}

/// Why this machine cannot run a node, if it cannot: the suite then skips with this reason.
pub fn unsupported() -> Option<String> {
    let uid = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:").map(|v| v.split_whitespace().next().map(str::to_owned)))
        })
        .flatten();
    if uid.as_deref() != Some("0") {
        return Some("the node needs root (bridges, iptables, mounts, containers)".into());
    }
    if !Path::new("/sys/fs/cgroup/memory").is_dir()
        && !Path::new("/sys/fs/cgroup/cgroup.controllers").is_file()
    {
        return Some("no cgroup hierarchy under /sys/fs/cgroup".into());
    }
    if !Path::new("/dev/kmsg").exists() {
        return Some("no /dev/kmsg: the kubelet's OOM watcher reads it".into());
    }
    None
}

/// A daemon of the node, killed when dropped.
struct Daemon {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl Daemon {
    fn spawn(name: &'static str, command: Command, log: PathBuf) -> Result<Self> {
        Ok(Self { name, child: start_logged(name, command, &log)?, log })
    }

    fn check(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("{} exited ({status}):\n{}", self.name, tail(&self.log, 40));
        }
        Ok(())
    }

    /// SIGTERM, then SIGKILL after `grace`.
    fn stop(mut self, grace: Duration) {
        if !matches!(self.child.try_wait(), Ok(None)) {
            return;
        }
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                eprintln!("stopped {}", self.name);
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        drop(self);
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
            eprintln!("stopped {}", self.name);
        }
    }
}

/// A TCP forwarder from `GATEWAY:port` to the API server on loopback: the `kubernetes`
/// Service's endpoint, since the API server listens on 127.0.0.1 only.
struct Forwarder {
    port: u16,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Forwarder {
    fn start(to: String) -> Result<Self> {
        let listener = TcpListener::bind((GATEWAY, 0)).context("binding the API server forwarder")?;
        let port = listener.local_addr()?.port();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if flag.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(client) = conn else { continue };
                let Ok(server) = TcpStream::connect(&to) else { continue };
                for (mut from, mut into) in
                    [(client.try_clone(), server.try_clone()), (server.try_clone(), client.try_clone())]
                        .into_iter()
                        .filter_map(|(a, b)| Some((a.ok()?, b.ok()?)))
                {
                    std::thread::spawn(move || {
                        let mut buf = [0u8; 16384];
                        loop {
                            match from.read(&mut buf) {
                                Ok(0) | Err(_) => break,
                                Ok(n) => {
                                    if into.write_all(&buf[..n]).is_err() {
                                        break;
                                    }
                                }
                            }
                        }
                        let _ = into.shutdown(Shutdown::Write);
                    });
                }
            }
        });
        Ok(Self { port, stop, thread: Some(thread) })
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so that it sees the flag.
        let _ = TcpStream::connect_timeout(
            &format!("{GATEWAY}:{}", self.port).parse().expect("an address"),
            Duration::from_secs(1),
        );
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Start-up timings, for docs/testing.md.
#[derive(Debug, Default, Clone, Copy)]
pub struct Startup {
    /// containerd running and the images imported.
    pub runtime: Duration,
    /// From the kubelet's start to the node Ready.
    pub kubelet: Duration,
    /// The whole node: scheduler, network, containerd, kubelet, kube-proxy.
    pub total: Duration,
}

pub struct Node {
    pub name: String,
    /// Held while the node runs: one node per machine, since the bridge and the iptables chains
    /// are the machine's (a second run waits; a run that finds the lock free may remove what a
    /// killed one left).
    _lock: std::fs::File,
    pub dir: tempfile::TempDir,
    pub startup: Startup,
    socket: PathBuf,
    bins: NodeBinaries,
    kubectl: PathBuf,
    admin: PathBuf,
    netns_before: BTreeSet<String>,
    chains_before: BTreeSet<(PathBuf, &'static str, String)>,
    forwarder: Option<Forwarder>,
    scheduler: Option<Daemon>,
    containerd: Option<Daemon>,
    kubelet: Option<Daemon>,
    kube_proxy: Option<Daemon>,
}

fn run(cmd: &mut Command) -> Result<Output> {
    let out = cmd.stdin(Stdio::null()).output().with_context(|| format!("running {cmd:?}"))?;
    Ok(out)
}

fn must_run(cmd: &mut Command) -> Result<String> {
    let out = run(cmd)?;
    ensure!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ip(args: &[&str]) -> Result<String> {
    must_run(Command::new("ip").args(args))
}

fn netns_names() -> BTreeSet<String> {
    std::fs::read_dir(NETNS_DIR)
        .map(|d| d.filter_map(|e| e.ok()?.file_name().into_string().ok()).collect())
        .unwrap_or_default()
}

/// The iptables programs of both families: `iptables` and the `ip6tables` beside it.
fn iptables_families(iptables: &Path) -> Vec<PathBuf> {
    let v6 = iptables.with_file_name("ip6tables");
    [iptables.to_path_buf(), v6].into_iter().filter(|p| p.exists()).collect()
}

/// Chains named `KUBE-*` in the filter, nat and mangle tables of both families: the kubelet makes
/// some (KUBE-FIREWALL, KUBE-IPTABLES-HINT, KUBE-KUBELET-CANARY) that `kube-proxy --cleanup`
/// leaves.
fn kube_chains(iptables: &Path) -> BTreeSet<(PathBuf, &'static str, String)> {
    let mut chains = BTreeSet::new();
    for bin in iptables_families(iptables) {
        for table in ["filter", "nat", "mangle"] {
            let out = Command::new(&bin).args(["-t", table, "-S"]).output();
            let rules = out.map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default();
            for chain in rules.lines().filter_map(|l| l.strip_prefix("-N KUBE-")) {
                chains.insert((bin.clone(), table, format!("KUBE-{chain}")));
            }
        }
    }
    chains
}

/// Removes a chain: the rules that jump to it, then its own rules, then the chain.
fn remove_chain(bin: &Path, table: &str, chain: &str) {
    let out = Command::new(bin).args(["-t", table, "-S"]).output();
    let rules = out.map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default();
    for rule in rules.lines().filter(|l| l.starts_with("-A ") && l.ends_with(&format!("-j {chain}"))) {
        let args: Vec<&str> = rule.trim_start_matches("-A ").split_whitespace().collect();
        let _ = Command::new(bin).args(["-t", table, "-D"]).args(&args).output();
    }
    let _ = Command::new(bin).args(["-t", table, "-F", chain]).output();
    let _ = Command::new(bin).args(["-t", table, "-X", chain]).output();
}

/// Mount points at or under `dir`, deepest first.
fn mounts_under(dir: &Path) -> Vec<String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let prefix = dir.to_string_lossy().into_owned();
    let mut points: Vec<String> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| p.replace("\\040", " "))
        .filter(|p| p == &prefix || p.starts_with(&format!("{prefix}/")))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    points.dedup();
    points
}

impl Node {
    /// Starts the node against `plane`, imports `images` (archives from `hack/image.sh`) into
    /// containerd's `k8s.io` namespace, and returns once the node is Ready and kube-proxy serves.
    pub fn start(plane: &ControlPlane, bins: NodeBinaries, images: &[PathBuf]) -> Result<Self> {
        let started = Instant::now();
        let name = "agentguard-node".to_string();
        let lock = std::fs::File::create(std::env::temp_dir().join("agentguard-node.lock"))?;
        lock.lock().context("waiting for another run's node to stop")?;
        let dir = tempfile::Builder::new().prefix("agentguard-node-").tempdir()?;
        let socket = dir.path().join("containerd.sock");
        Self::remove_leftovers(&bins);
        let chains_before = kube_chains(&bins.iptables);
        let mut node = Self {
            _lock: lock,
            name,
            socket,
            bins,
            kubectl: plane.kubectl.clone(),
            admin: plane.admin.clone(),
            netns_before: netns_names(),
            chains_before: BTreeSet::new(),
            forwarder: None,
            scheduler: None,
            containerd: None,
            kubelet: None,
            kube_proxy: None,
            startup: Startup::default(),
            dir,
        };
        node.chains_before = chains_before;
        node.start_scheduler(plane)?;
        node.network(plane)?;
        let runtime = Instant::now();
        node.start_containerd()?;
        for image in images {
            node.ctr(&["images", "import", &image.to_string_lossy()])
                .with_context(|| format!("importing {}", image.display()))?;
        }
        node.startup.runtime = runtime.elapsed();
        let kubelet = Instant::now();
        node.start_kubelet(plane)?;
        node.startup.kubelet = kubelet.elapsed();
        node.start_kube_proxy(plane)?;
        node.startup.total = started.elapsed();
        Ok(node)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn admin_kubectl(&self, args: &[&str]) -> Result<String> {
        must_run(Command::new(&self.kubectl).env("KUBECONFIG", &self.admin).args(args))
    }

    /// `ctr` against this node's containerd, in the `k8s.io` namespace the kubelet uses.
    pub fn ctr(&self, args: &[&str]) -> Result<String> {
        must_run(
            Command::new(&self.bins.ctr)
                .arg("--address")
                .arg(&self.socket)
                .args(["--namespace", "k8s.io"])
                .args(args),
        )
    }

    /// What an earlier run that was killed before its teardown may have left.
    fn remove_leftovers(bins: &NodeBinaries) {
        if Command::new("ip").args(["link", "show", BRIDGE]).output().is_ok_and(|o| o.status.success()) {
            eprintln!("removing the bridge {BRIDGE} an earlier run left");
            let _ = Command::new("ip").args(["link", "delete", BRIDGE]).status();
        }
        let chains = Command::new(&bins.iptables).args(["-t", "nat", "-S"]).output();
        if chains.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("KUBE-SERVICES")) {
            eprintln!("removing kube-proxy rules an earlier run left");
            let _ = Command::new(&bins.kube_proxy).arg("--cleanup").output();
        }
    }

    fn start_scheduler(&mut self, plane: &ControlPlane) -> Result<()> {
        let kubeconfig = plane.user_kubeconfig("system:kube-scheduler", &[])?;
        let kubeconfig = kubeconfig.display();
        let mut cmd = Command::new(&self.bins.kube_scheduler);
        cmd.arg(format!("--kubeconfig={kubeconfig}"))
            .arg(format!("--authentication-kubeconfig={kubeconfig}"))
            .arg(format!("--authorization-kubeconfig={kubeconfig}"))
            .args(["--bind-address=127.0.0.1", &format!("--secure-port={}", free_port())])
            .args(["--leader-elect=false", "--profiling=false", "--v=1"]);
        self.scheduler = Some(Daemon::spawn("kube-scheduler", cmd, self.path("kube-scheduler.log"))?);
        Ok(())
    }

    /// The bridge with the gateway address, the Service range routed to it, CNI's config, the
    /// forwarder to the API server and the `kubernetes` Service's endpoint.
    fn network(&mut self, plane: &ControlPlane) -> Result<()> {
        ip(&["link", "add", BRIDGE, "type", "bridge"])?;
        ip(&["addr", "add", &format!("{GATEWAY}/24"), "dev", BRIDGE])?;
        ip(&["link", "set", BRIDGE, "up"])?;
        ip(&["route", "replace", SERVICE_CIDR, "dev", BRIDGE])?;
        let service =
            self.admin_kubectl(&["get", "service", "kubernetes", "-o", "jsonpath={.spec.clusterIP}"])?;
        ensure!(
            service.starts_with("10.0.0."),
            "the kubernetes Service has {service}, outside {SERVICE_CIDR}: the control plane's range changed"
        );

        let net_d = self.path("cni/net.d");
        std::fs::create_dir_all(&net_d)?;
        // No isGateway: the bridge already has the gateway address, and the plugin would turn on
        // the machine's IP forwarding for it. Pods only talk to the host: the API server (through
        // the forwarder) and, from the host, the API server to them.
        let conf = serde_json::json!({
            "cniVersion": "0.4.0",
            "name": "agentguard",
            "plugins": [{
                "type": "bridge",
                "bridge": BRIDGE,
                "isGateway": false,
                "ipMasq": false,
                "hairpinMode": true,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": POD_CIDR, "gateway": GATEWAY}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": self.path("cni/ipam"),
                }
            }]
        });
        std::fs::write(net_d.join("10-agentguard.conflist"), serde_json::to_string_pretty(&conf)?)?;

        let api = plane.url.trim_start_matches("https://").to_string();
        let forwarder = Forwarder::start(api)?;
        let slice = format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: kubernetes\n  namespace: default\n  labels:\n    kubernetes.io/service-name: kubernetes\n    endpointslice.kubernetes.io/managed-by: agentguard-test-node\naddressType: IPv4\nendpoints:\n- addresses: [\"{GATEWAY}\"]\n  conditions: {{ready: true}}\nports:\n- name: https\n  port: {}\n  protocol: TCP\n",
            forwarder.port
        );
        self.forwarder = Some(forwarder);
        let out = Command::new(&self.kubectl)
            .env("KUBECONFIG", &self.admin)
            .args(["apply", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .and_then(|mut c| {
                c.stdin.take().expect("stdin").write_all(slice.as_bytes())?;
                c.wait_with_output()
            })?;
        ensure!(
            out.status.success(),
            "the kubernetes EndpointSlice: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    }

    fn start_containerd(&mut self) -> Result<()> {
        let d = self.dir.path().display();
        let config = format!(
            r#"version = 2
root = "{d}/containerd/root"
state = "{d}/containerd/state"
disabled_plugins = ["io.containerd.internal.v1.opt", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs", "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]

[grpc]
  address = "{sock}"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{pause}"
  disable_apparmor = true
  restrict_oom_score_adj = true
  enable_selinux = false
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{cni}"
    conf_dir = "{d}/cni/net.d"
    max_conf_num = 1
"#,
            sock = self.socket.display(),
            pause = std::env::var("PAUSE_IMAGE").unwrap_or_else(|_| "localhost/agentguard-pause:3.10".into()),
            cni = self.bins.cni_bin_dir.display(),
        );
        std::fs::write(self.path("containerd.toml"), config)?;
        let mut cmd = Command::new(&self.bins.containerd);
        cmd.arg("--config").arg(self.path("containerd.toml")).args(["--log-level", "warn"]);
        self.containerd = Some(Daemon::spawn("containerd", cmd, self.path("containerd.log"))?);
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.ctr(&["version"]).is_err() {
            self.containerd.as_mut().expect("containerd").check()?;
            ensure!(
                Instant::now() < deadline,
                "containerd not serving after 30s:\n{}",
                tail(&self.path("containerd.log"), 30)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }

    /// The kubelet's configuration for this machine: see docs/testing.md, "The chart on a one-node cluster".
    fn kubelet_config(&self, port: u16, healthz: u16) -> String {
        let d = self.dir.path().display();
        format!(
            r#"apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
containerRuntimeEndpoint: unix://{sock}
# No systemd here: cgroups are managed by the cgroupfs driver (containerd's runc shim too).
cgroupDriver: cgroupfs
# This machine has cgroup v1 only, which kubelet 1.35 refuses unless told otherwise.
failCgroupV1: false
# No QoS or node-allocatable cgroups: the machine's cgroup tree is not the kubelet's to shape.
cgroupsPerQOS: false
enforceNodeAllocatable: []
failSwapOn: false
address: {GATEWAY}
port: {port}
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: {healthz}
authentication:
  anonymous: {{enabled: false}}
  webhook: {{enabled: false}}
  x509: {{clientCAFile: {d}/ca.crt}}
authorization: {{mode: AlwaysAllow}}
# No cluster DNS and no host resolver: pods resolve nothing, so they send nothing off the node.
resolvConf: ""
podLogsDir: {d}/pod-logs
# Nothing is pulled: images come from `ctr images import`.
serializeImagePulls: false
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {{memory.available: "100Mi", nodefs.available: "1%", imagefs.available: "1%", nodefs.inodesFree: "1%"}}
localStorageCapacityIsolation: false
protectKernelDefaults: false
makeIPTablesUtilChains: false
registerNode: true
"#,
            sock = self.socket.display(),
        )
    }

    fn start_kubelet(&mut self, plane: &ControlPlane) -> Result<()> {
        let kubeconfig = plane.user_kubeconfig(&format!("system:node:{}", self.name), &["system:nodes"])?;
        std::fs::copy(plane.dir.path().join("ca.crt"), self.path("ca.crt"))?;
        let (port, healthz) = (free_port(), free_port());
        std::fs::write(self.path("kubelet.yaml"), self.kubelet_config(port, healthz))?;
        let mut cmd = Command::new(&self.bins.kubelet);
        cmd.arg(format!("--config={}", self.path("kubelet.yaml").display()))
            .arg(format!("--kubeconfig={}", kubeconfig.display()))
            .arg(format!("--root-dir={}", self.path("kubelet").display()))
            .arg(format!("--cert-dir={}", self.path("kubelet-pki").display()))
            .arg(format!("--hostname-override={}", self.name))
            .arg(format!("--node-ip={GATEWAY}"))
            .arg("--v=1");
        self.kubelet = Some(Daemon::spawn("kubelet", cmd, self.path("kubelet.log"))?);
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            self.kubelet.as_mut().expect("kubelet").check()?;
            self.containerd.as_mut().expect("containerd").check()?;
            let ready = self
                .admin_kubectl(&[
                    "get",
                    "node",
                    &self.name,
                    "-o",
                    "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}",
                ])
                .unwrap_or_default();
            if ready == "True" {
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "node {} not Ready after 120s (Ready={ready:?}):\n{}",
                self.name,
                tail(&self.path("kubelet.log"), 40)
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    fn start_kube_proxy(&mut self, plane: &ControlPlane) -> Result<()> {
        let kubeconfig = plane.user_kubeconfig("system:kube-proxy", &[])?;
        let healthz = free_port();
        let config = format!(
            r#"apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection:
  kubeconfig: {kubeconfig}
hostnameOverride: {name}
mode: iptables
clusterCIDR: {POD_CIDR}
healthzBindAddress: 127.0.0.1:{healthz}
metricsBindAddress: 127.0.0.1:{metrics}
# Leave the machine's conntrack sysctls as they are (a container may not set them).
conntrack:
  maxPerCore: 0
  min: 0
  tcpEstablishedTimeout: 0s
  tcpCloseWaitTimeout: 0s
iptables:
  localhostNodePorts: false
nodePortAddresses: ["{GATEWAY}/32"]
"#,
            kubeconfig = kubeconfig.display(),
            name = self.name,
            metrics = free_port(),
        );
        std::fs::write(self.path("kube-proxy.yaml"), config)?;
        let mut cmd = Command::new(&self.bins.kube_proxy);
        cmd.arg(format!("--config={}", self.path("kube-proxy.yaml").display())).arg("--v=1");
        self.kube_proxy = Some(Daemon::spawn("kube-proxy", cmd, self.path("kube-proxy.log"))?);
        // Serving once its rules for the `kubernetes` Service are written.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            self.kube_proxy.as_mut().expect("kube-proxy").check()?;
            let rules =
                must_run(Command::new(&self.bins.iptables).args(["-t", "nat", "-S", "KUBE-SERVICES"]))
                    .unwrap_or_default();
            if rules.contains("default/kubernetes:https") {
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "kube-proxy wrote no rule for the kubernetes Service after 60s:\n{}",
                tail(&self.path("kube-proxy.log"), 30)
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// How many endpoints kube-proxy's rules send Service port `namespace/name:port` to.
    pub fn routed_endpoints(&self, namespace: &str, name: &str, port: &str) -> usize {
        let rules = Command::new(&self.bins.iptables).args(["-t", "nat", "-S"]).output();
        let rules = rules.map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default();
        let comment = format!("\"{namespace}/{name}:{port}\"");
        rules
            .lines()
            .filter(|l| l.starts_with("-A KUBE-SEP-") && l.contains(&comment) && l.contains("-j DNAT"))
            .count()
    }

    /// The last `lines` lines of each container log of pods in `namespace` (the kubelet writes
    /// them under the node's folder; `kubectl logs` would need the API server to authenticate to
    /// the kubelet, which this node does not set up).
    pub fn pod_logs(&self, namespace: &str, lines: usize) -> String {
        let mut out = String::new();
        let Ok(pods) = std::fs::read_dir(self.path("pod-logs")) else { return out };
        for pod in
            pods.flatten().filter(|p| p.file_name().to_string_lossy().starts_with(&format!("{namespace}_")))
        {
            for container in std::fs::read_dir(pod.path()).into_iter().flatten().flatten() {
                let mut files: Vec<PathBuf> = std::fs::read_dir(container.path())
                    .into_iter()
                    .flatten()
                    .flatten()
                    .map(|f| f.path())
                    .collect();
                files.sort();
                if let Some(last) = files.last() {
                    out.push_str(&format!("--- {}\n{}\n", last.display(), tail(last, lines)));
                }
            }
        }
        out
    }

    /// The end of a daemon's log, for failure messages.
    pub fn log_tail(&self, daemon: &str, lines: usize) -> String {
        tail(&self.path(&format!("{daemon}.log")), lines)
    }

    /// Pods on this node first leave through the kubelet, so that it tears their sandboxes down
    /// (CNI DEL releases the address and the network namespace).
    fn drain(&mut self) {
        if self.kubelet.is_none() {
            return;
        }
        // Without a scheduler, replacements made by controllers stay Pending off the node.
        if let Some(s) = self.scheduler.take() {
            s.stop(Duration::from_secs(5));
        }
        let field = format!("spec.nodeName={}", self.name);
        let _ = self.admin_kubectl(&[
            "delete",
            "pods",
            "--all-namespaces",
            "--field-selector",
            &field,
            "--grace-period=0",
            "--force",
            "--wait=false",
        ]);
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            let tasks = self.ctr(&["tasks", "list", "--quiet"]).unwrap_or_default();
            let netns = netns_names().difference(&self.netns_before).any(|n| n.starts_with("cni-"));
            if tasks.trim().is_empty() && !netns {
                return;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        eprintln!("node teardown: containers still running after 30s; killing them through containerd");
    }

    fn kill_containers(&self) {
        for task in self.ctr(&["tasks", "list", "--quiet"]).unwrap_or_default().split_whitespace() {
            let _ = self.ctr(&["tasks", "kill", "--signal", "SIGKILL", task]);
        }
        std::thread::sleep(Duration::from_millis(500));
        for task in self.ctr(&["tasks", "list", "--quiet"]).unwrap_or_default().split_whitespace() {
            let _ = self.ctr(&["tasks", "delete", "--force", task]);
        }
        for container in self.ctr(&["containers", "list", "--quiet"]).unwrap_or_default().split_whitespace() {
            let _ = self.ctr(&["containers", "delete", container]);
        }
    }

    /// Processes started under this node's folder (containerd's shims) that outlived containerd.
    fn kill_strays(&self) {
        let needle = self.dir.path().to_string_lossy().into_owned();
        let Ok(entries) = std::fs::read_dir("/proc") else { return };
        for entry in entries.flatten() {
            let Some(pid) = entry.file_name().to_str().and_then(|p| p.parse::<u32>().ok()) else { continue };
            if pid == std::process::id() {
                continue;
            }
            let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmdline).contains(&needle) {
                eprintln!("node teardown: killing leftover process {pid}");
                let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
            }
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.drain();
        if let Some(d) = self.kubelet.take() {
            d.stop(Duration::from_secs(5));
        }
        if let Some(d) = self.kube_proxy.take() {
            d.stop(Duration::from_secs(5));
        }
        if let Some(d) = self.scheduler.take() {
            d.stop(Duration::from_secs(5));
        }
        if self.containerd.is_some() {
            self.kill_containers();
        }
        if let Some(d) = self.containerd.take() {
            d.stop(Duration::from_secs(10));
        }
        self.kill_strays();
        self.forwarder.take();
        // Network namespaces the CNI left (only those this run made).
        for ns in netns_names().difference(&self.netns_before) {
            if ns.starts_with("cni-") {
                eprintln!("node teardown: removing network namespace {ns}");
                let _ = Command::new("ip").args(["netns", "delete", ns]).status();
            }
        }
        let cleanup = Command::new(&self.bins.kube_proxy).arg("--cleanup").output();
        if !cleanup.as_ref().is_ok_and(|o| o.status.success()) {
            eprintln!("node teardown: kube-proxy --cleanup failed: {cleanup:?}");
        }
        let left = kube_chains(&self.bins.iptables);
        for (bin, table, chain) in left.difference(&self.chains_before) {
            remove_chain(bin, table, chain);
        }
        let _ = Command::new("ip").args(["route", "delete", SERVICE_CIDR, "dev", BRIDGE]).status();
        let _ = Command::new("ip").args(["link", "delete", BRIDGE]).status();
        for point in mounts_under(self.dir.path()) {
            let _ = Command::new("umount").args(["--lazy", &point]).status();
        }
        eprintln!("stopped the node");
    }
}
