"""A real one-node Kubernetes cluster on this machine, where pods really run.

:class:`NodeCluster` is :class:`KubeCluster` (etcd, kube-apiserver, kube-controller-manager with
every controller) plus what a node needs:

* containerd + runc (Debian's packages) with their own config, socket and state in a temp folder;
  the image store (``root``) is cached under ``~/.cache/meddistill/containerd`` so the product
  image is imported once per machine (a multi-GiB dependency layer), not once per run.
* a CNI bridge (``meddistill0``, 10.88.0.0/16, the node's address is its gateway 10.88.0.1):
  the API server, the kubelet and CoreDNS listen there, so pods reach them.
* kubelet (cgroupfs driver, cgroup v1 allowed), kube-scheduler, kube-proxy (iptables mode), CoreDNS
  (``cluster.local`` from the API), and KubeRay's controller (out of cluster).
* images without a registry: ``tools/image/build.sh`` builds the product image and the pod sandbox
  ("pause") image as OCI archives; they are imported into containerd; pods use
  ``imagePullPolicy: Never``.
* ``pvc://`` claims: static hostPath PersistentVolumes under the temp folder (:meth:`add_pv`).

:meth:`stop` leaves nothing behind: pods, containerd shims, mounts, network namespaces, the bridge,
iptables chains, cgroups, and the sysctls the kubelet and kube-proxy change are put back.

Needs root, the apt packages in :data:`APT_PACKAGES`, and Linux with overlayfs and bridge netfilter.
:func:`preflight` says what is missing and how to deselect (``-m "not cluster"``).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

from .kube_cluster import KUBERAY_CRDS_DIR, REPO_ROOT, KubeCluster, KubeClusterError, ensure_binaries, free_port

APT_PACKAGES = ("containerd", "runc", "debootstrap", "containernetworking-plugins", "iptables", "conntrack")
NODE_NAME = "meddistill-node"
BRIDGE = "meddistill0"
POD_CIDR = "10.88.0.0/16"
NODE_IP = "10.88.0.1"
CNI_BIN_DIR = "/usr/lib/cni"
CGROUP_ROOT = "meddistill"
IMAGE_BUILD = REPO_ROOT / "tools" / "image" / "build.sh"
OCI_TOOL = REPO_ROOT / "tools" / "image" / "oci.py"
# What the kubelet (and kube-proxy) set on the host; put back at teardown.
SYSCTLS = (
    "vm.overcommit_memory", "vm.panic_on_oom", "kernel.panic", "kernel.panic_on_oops",
    "kernel.keys.root_maxkeys", "kernel.keys.root_maxbytes",
    "net.ipv4.ip_forward", "net.bridge.bridge-nf-call-iptables",
)


def cache_dir() -> Path:
    return Path(os.environ.get("MEDDISTILL_CACHE", Path.home() / ".cache" / "meddistill"))


def preflight() -> list[str]:
    """What this machine lacks to run a NodeCluster (empty: nothing), each with its fix."""
    problems = []
    if os.geteuid() != 0:
        problems.append("not root: the kubelet, containerd and the image build need root")
    missing = [b for b in ("containerd", "runc", "ctr", "debootstrap", "iptables", "iptables-save", "ip")
               if shutil.which(b) is None]
    if missing or not Path(CNI_BIN_DIR, "bridge").exists():
        problems.append(
            f"missing {', '.join(missing) or 'CNI plugins'}: apt-get install -y --no-install-recommends "
            + " ".join(APT_PACKAGES))
    if not Path("/proc/sys/net/bridge").is_dir():
        problems.append("no bridge netfilter (/proc/sys/net/bridge): load the br_netfilter module")
    return problems


def install_prerequisites(progress: IO[str]) -> None:
    """apt-get install what preflight() finds missing (CI and people run the same thing)."""
    if os.geteuid() == 0 and shutil.which("apt-get") and any("apt-get install" in p for p in preflight()):
        progress.write(f"[node-cluster] apt-get install {' '.join(APT_PACKAGES)}\n")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update", "-qq"], check=False, env=env, capture_output=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *APT_PACKAGES],
                       check=True, env=env, capture_output=True)


def build_images(progress: IO[str]) -> dict[str, str]:
    """tools/image/build.sh: name=value lines (image, pause_image, *_archive)."""
    proc = subprocess.run(["bash", str(IMAGE_BUILD)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
    progress.write(proc.stderr[-4000:])
    if proc.returncode != 0:
        raise KubeClusterError(f"tools/image/build.sh failed (exit {proc.returncode}):\n{proc.stderr[-6000:]}")
    return dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)


def _sh(*argv: str, check: bool = False, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), capture_output=True, text=True, check=check, timeout=timeout)


class NodeCluster(KubeCluster):
    def __init__(self, binaries: dict[str, Path] | None = None, *, images: dict[str, str] | None = None,
                 kuberay_crds_dir: Path | None = None, progress: IO[str] | None = None,
                 keep_tmp: bool | None = None) -> None:
        super().__init__(binaries, kuberay_crds_dir=kuberay_crds_dir, progress=progress, keep_tmp=keep_tmp,
                         address=NODE_IP, controllers="*", service_account_admission=True,
                         # logs and exec: the node's name resolves nowhere, its address does
                         apiserver_args=["--kubelet-preferred-address-types=InternalIP"])
        self.images = dict(images or {})
        self.containerd_root = cache_dir() / "containerd" / "root"
        self.socket: Path | None = None
        self._sysctls: dict[str, str] = {}
        self._root_lock = None
        self._pv_count = 0

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self, timeout: float = 180.0) -> "NodeCluster":
        problems = preflight()
        if problems:
            raise KubeClusterError(
                "this machine cannot run the one-node cluster tests:\n  - " + "\n  - ".join(problems)
                + "\nDeselect them with: pytest -m 'not cluster'")
        if self._binaries is None:
            self._binaries = ensure_binaries(self._progress)
        if self._kuberay_crds_dir == KUBERAY_CRDS_DIR:  # the controller runs against its own release's CRDs
            self._kuberay_crds_dir = self._binaries["kuberay-operator"].parent / "crds"
        if not self.images:
            self.images = build_images(self._progress or sys.stderr)
        self._record_sysctls()
        self._chains_before = self._chains()
        self._write_sysctl("net.ipv4.ip_forward", "1")
        self._write_sysctl("net.bridge.bridge-nf-call-iptables", "1")
        self._make_bridge()
        try:
            super().start(timeout)  # etcd, apiserver on NODE_IP, CRDs, controller-manager
            self._start_containerd(timeout)
            self._import_images()
            self._start_coredns(timeout)
            self._start_kube_proxy(timeout)
            self._start_scheduler(timeout)
            self._start_kubelet(timeout)
            self.start_kuberay(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        try:
            self._drain()
        finally:
            procs = {p.name: p for p in self._procs}
            for name in ("kuberay-operator", "kubelet", "kube-scheduler", "coredns"):
                if name in procs:
                    procs[name].stop()
            self._kill_containers()
            if "containerd" in procs:
                procs["containerd"].stop()
            self._kill_shims()
            if "kube-proxy" in procs:
                procs["kube-proxy"].stop()
            if self._binaries and "kube-proxy" in self._binaries:
                _sh(str(self._binaries["kube-proxy"]), "--cleanup")
            self._procs = [p for p in self._procs if p.alive()]
            if self.tmpdir is not None:
                self._unmount_under(self.tmpdir)
            super().stop()  # controller-manager, apiserver, etcd; removes the temp folder (after unmounting)
            self._sweep_network()
            self._remove_cgroups()
            self._restore_sysctls()
            if self._root_lock is not None:
                self._root_lock.close()
                self._root_lock = None

    # -- what tests use ----------------------------------------------------------------------------

    @property
    def image(self) -> str:
        """The product image (meddistill.local/meddistill:<version>-<sources hash>)."""
        return self.images["image"]

    def add_pv(self, name: str, size: str = "20Gi", path: Path | None = None) -> Path:
        """A static ReadWriteMany hostPath PersistentVolume (storageClassName ``local``) whose folder is
        writable by the image's user; returns the folder."""
        assert self.tmpdir is not None
        folder = Path(path) if path else self.tmpdir / "pv" / name
        folder.mkdir(parents=True, exist_ok=True)
        os.chown(folder, 65532, 65532)
        pv = {"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": name},
              "spec": {"capacity": {"storage": size}, "accessModes": ["ReadWriteMany", "ReadWriteOnce"],
                       "persistentVolumeReclaimPolicy": "Retain", "storageClassName": "local",
                       "hostPath": {"path": str(folder), "type": "Directory"}}}
        self.kubectl("apply", "-f", "-", input=json.dumps(pv))
        return folder

    # -- bring-up ----------------------------------------------------------------------------------

    def _record_sysctls(self) -> None:
        for key in SYSCTLS:
            path = Path("/proc/sys") / key.replace(".", "/")
            if path.exists():
                self._sysctls[key] = path.read_text().strip()

    @staticmethod
    def _write_sysctl(key: str, value: str) -> None:
        Path("/proc/sys", key.replace(".", "/")).write_text(value)

    def _restore_sysctls(self) -> None:
        for key, value in self._sysctls.items():
            try:
                self._write_sysctl(key, value)
            except OSError:
                pass
        self._sysctls = {}

    @staticmethod
    def _make_bridge() -> None:
        # Made before the API server starts: it and CoreDNS listen on the bridge's address. The CNI
        # bridge plugin adopts it.
        if _sh("ip", "link", "show", BRIDGE).returncode == 0:
            raise KubeClusterError(
                f"bridge {BRIDGE} exists: another one-node cluster runs here, or one was not torn down "
                f"(python tools/kube/cluster.py down)")
        _sh("ip", "link", "add", BRIDGE, "type", "bridge", check=True)
        _sh("ip", "addr", "add", f"{NODE_IP}/16", "dev", BRIDGE, check=True)
        _sh("ip", "link", "set", BRIDGE, "up", check=True)

    def _start_containerd(self, timeout: float) -> None:
        import fcntl

        d = self.tmpdir
        assert d is not None
        self.containerd_root.mkdir(parents=True, exist_ok=True)
        self._root_lock = open(self.containerd_root.parent / ".lock", "w")
        try:
            fcntl.flock(self._root_lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise KubeClusterError(f"{self.containerd_root} is in use by another one-node cluster") from None
        self.socket = d / "containerd.sock"
        (d / "cni").mkdir()
        (d / "cni" / "10-meddistill.conflist").write_text(json.dumps({
            "cniVersion": "1.0.0", "name": "meddistill",
            "plugins": [
                {"type": "bridge", "bridge": BRIDGE, "isGateway": True, "ipMasq": False, "hairpinMode": True,
                 "ipam": {"type": "host-local", "dataDir": str(d / "cni-ipam"),
                          "ranges": [[{"subnet": POD_CIDR, "gateway": NODE_IP}]],
                          "routes": [{"dst": "0.0.0.0/0"}]}},
                {"type": "portmap", "capabilities": {"portMappings": True}},
            ],
        }))
        config = d / "containerd.toml"
        config.write_text(f"""version = 2
root = "{self.containerd_root}"
state = "{d / 'containerd-state'}"
[grpc]
  address = "{self.socket}"
[ttrpc]
  address = "{self.socket}.ttrpc"
[debug]
  address = ""
[metrics]
  address = ""
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{self.images['pause_image']}"
  # This process lacks CAP_SYS_RESOURCE: without this every sandbox fails ("can't get final child's PID").
  restrict_oom_score_adj = true
  enable_cdi = false
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{CNI_BIN_DIR}"
    conf_dir = "{d / 'cni'}"
""")
        proc = self._spawn("containerd", ["containerd", "--config", str(config), "--log-level", "warn"])
        deadline = time.monotonic() + timeout
        while not self._ctr("version", check=False).returncode == 0:
            if not proc.alive() or time.monotonic() > deadline:
                raise KubeClusterError(f"containerd did not start:\n{proc.log_tail()}")
            time.sleep(0.3)

    def _ctr(self, *args: str, check: bool = True, timeout: float = 900) -> subprocess.CompletedProcess:
        return _sh("ctr", "--address", str(self.socket), "--namespace", "k8s.io", *args, check=check,
                   timeout=timeout)

    def _import_images(self) -> None:
        """Stream each image missing from the store into `ctr images import` (tools/image/oci.py): the
        dependency layers once per store, then the app image, whose archive holds only its own layer."""
        have = set(self._ctr("images", "ls", "-q").stdout.split())
        im = self.images
        for name, config, layers, only in (
            (im["pause_image"], im["pause_config"], im["pause_layers"], None),
            (im["deps_image"], im["image_config"], im["deps_layers"], None),
            (im["image"], im["image_config"], im["image_layers"], im["image_layers"].split()[-1].split("=")[0]),
        ):
            if name in have:
                continue
            started = time.monotonic()
            argv = [sys.executable, str(OCI_TOOL), "write", "-", "--name", name, "--config", config,
                    *(["--only-blobs-of", only] if only else []), *layers.split()]
            writer = subprocess.Popen(argv, stdout=subprocess.PIPE)
            res = subprocess.run(["ctr", "--address", str(self.socket), "--namespace", "k8s.io", "images",
                                  "import", "-"], stdin=writer.stdout, capture_output=True, text=True)
            assert writer.stdout is not None
            writer.stdout.close()
            if writer.wait() != 0 or res.returncode != 0:
                raise KubeClusterError(f"importing {name} failed: {res.stderr[-2000:]}")
            if self._progress:
                self._progress.write(f"[node-cluster] imported {name} in {time.monotonic() - started:.0f}s\n")
        # Older builds of ours go (containerd then frees their layers): each deps layer is several GiB.
        current = {im["pause_image"], im["deps_image"], im["image"]}
        old = [ref for ref in have if ref.startswith("meddistill.local/") and ref not in current]
        if old:
            self._ctr("images", "rm", *old, check=False)

    def _start_coredns(self, timeout: float) -> None:
        d = self.tmpdir
        assert d is not None
        health, ready = free_port(), free_port()
        corefile = d / "Corefile"
        # No forward plugin: names outside cluster.local fail fast, as in an air-gapped hospital.
        corefile.write_text(f""".:53 {{
    bind {NODE_IP}
    errors
    health 127.0.0.1:{health}
    ready 127.0.0.1:{ready}
    kubernetes cluster.local in-addr.arpa ip6.arpa {{
        kubeconfig {self.kubeconfig}
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
    }}
    cache 5
}}
""")
        proc = self._spawn("coredns", [str(self.bin("coredns")), "-conf", str(corefile)])
        self._wait_http(proc, f"http://127.0.0.1:{ready}/ready", timeout, ok_body=None)

    def _start_kube_proxy(self, timeout: float) -> None:
        d = self.tmpdir
        assert d is not None
        healthz = free_port()
        config = d / "kube-proxy.yaml"
        config.write_text(json.dumps({
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1", "kind": "KubeProxyConfiguration",
            "clientConnection": {"kubeconfig": str(self.kubeconfig)},
            "hostnameOverride": NODE_NAME, "mode": "iptables", "clusterCIDR": POD_CIDR,
            "healthzBindAddress": f"127.0.0.1:{healthz}", "metricsBindAddress": f"127.0.0.1:{free_port()}",
            # Leave the host's conntrack table sizes alone.
            "conntrack": {"maxPerCore": 0, "min": 0},
        }))
        proc = self._spawn("kube-proxy", [str(self.bin("kube-proxy")), f"--config={config}", "--v=1"])
        self._wait_http(proc, f"http://127.0.0.1:{healthz}/livez", timeout, ok_body=None)

    def _start_scheduler(self, timeout: float) -> None:
        port = free_port()
        proc = self._spawn("kube-scheduler", [
            str(self.bin("kube-scheduler")), f"--kubeconfig={self.kubeconfig}",
            f"--authentication-kubeconfig={self.kubeconfig}", f"--authorization-kubeconfig={self.kubeconfig}",
            "--leader-elect=false", "--bind-address=127.0.0.1", f"--secure-port={port}", "--v=1"])
        self._wait_http(proc, f"https://127.0.0.1:{port}/healthz", timeout)

    def _start_kubelet(self, timeout: float) -> None:
        d = self.tmpdir
        assert d is not None
        healthz = free_port()
        (d / "kubelet").mkdir()
        self._make_cgroups()
        resolv = d / "resolv.conf"
        resolv.write_text("")  # pods get only cluster DNS; the host's resolver is not theirs
        config = d / "kubelet.yaml"
        config.write_text(json.dumps({
            "apiVersion": "kubelet.config.k8s.io/v1beta1", "kind": "KubeletConfiguration",
            "failCgroupV1": False, "cgroupDriver": "cgroupfs", "cgroupRoot": f"/{CGROUP_ROOT}",
            "address": NODE_IP, "port": free_port(), "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1", "healthzPort": healthz,
            # The API server reaches the kubelet (logs, exec) without client certificates here: test cluster.
            "authentication": {"anonymous": {"enabled": True}, "webhook": {"enabled": False}},
            "authorization": {"mode": "AlwaysAllow"},
            "clusterDNS": [NODE_IP], "clusterDomain": "cluster.local", "resolvConf": str(resolv),
            "containerRuntimeEndpoint": f"unix://{self.socket}",
            "podLogsDir": str(d / "pod-logs"),
            "failSwapOn": False, "serializeImagePulls": False,
            "imageGCHighThresholdPercent": 100, "imageGCLowThresholdPercent": 99,
            "evictionHard": {"memory.available": "200Mi", "nodefs.available": "1%",
                             "imagefs.available": "1%", "nodefs.inodesFree": "1%"},
            "maxPods": 60, "registerNode": True,
        }))
        proc = self._spawn("kubelet", [
            str(self.bin("kubelet")), f"--config={config}", f"--kubeconfig={self.kubeconfig}",
            f"--hostname-override={NODE_NAME}", f"--node-ip={NODE_IP}", f"--root-dir={d / 'kubelet'}",
            f"--cert-dir={d / 'kubelet-pki'}", "--v=1"])
        self._wait_http(proc, f"http://127.0.0.1:{healthz}/healthz", timeout, ok_body=None)
        # Healthy is not registered: on a cold containerd store the Node object came seconds later, and
        # `kubectl wait` on an object that does not exist yet fails at once (NotFound).
        deadline = time.monotonic() + timeout
        while self.kubectl("get", "node", NODE_NAME, check=False).returncode != 0:
            if not proc.alive() or time.monotonic() > deadline:
                raise KubeClusterError(f"the kubelet did not register node {NODE_NAME} in {timeout:.0f}s "
                                       f"(running: {proc.alive()}):\n{proc.log_tail()}")
            time.sleep(1)
        self.kubectl("wait", "--for=condition=Ready", f"node/{NODE_NAME}", f"--timeout={int(timeout)}s",
                     timeout=timeout + 30)

    # -- teardown --------------------------------------------------------------------------------

    def _drain(self) -> None:
        """Delete every pod through the API so the kubelet tears its sandbox down (CNI DEL, mounts)."""
        if not any(p.name == "kubelet" and p.alive() for p in self._procs):
            return
        for name in ("kuberay-operator", "kube-controller-manager"):  # nothing recreates pods meanwhile
            for p in self._procs:
                if p.name == name:
                    p.stop()
        self.kubectl("delete", "pods", "--all", "--all-namespaces", "--grace-period=1", "--wait=false",
                     check=False, timeout=60)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if not self._ctr("tasks", "ls", "-q", check=False).stdout.split():
                break
            time.sleep(1)

    def _kill_containers(self) -> None:
        if self.socket is None or not self.socket.exists():
            return
        for task in self._ctr("tasks", "ls", "-q", check=False).stdout.split():
            self._ctr("tasks", "kill", "-s", "SIGKILL", task, check=False)
        time.sleep(0.5)
        for task in self._ctr("tasks", "ls", "-q", check=False).stdout.split():
            self._ctr("tasks", "delete", "-f", task, check=False)
        for c in self._ctr("containers", "ls", "-q", check=False).stdout.split():
            self._ctr("containers", "delete", c, check=False)

    def _kill_shims(self) -> None:
        if self.socket is None:
            return
        marker = str(self.socket)
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                cmd = Path("/proc", pid, "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if "containerd-shim" in cmd and marker in cmd:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def _unmount_under(self, *roots: Path) -> None:
        prefixes = [str(r) + "/" for r in roots if r]
        mounts = []
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            point = line.split()[4].replace("\\040", " ")
            if any(point.startswith(p) for p in prefixes) or point.startswith("/run/netns/cni-"):
                mounts.append(point)
        for point in sorted(mounts, key=len, reverse=True):
            _sh("umount", "-l", point)

    @staticmethod
    def _chains() -> set[tuple[str, str, str]]:
        """(tool, table, chain) of every KUBE-* and CNI-* chain now (the kubelet, kube-proxy and CNI make them)."""
        out = set()
        for tool in ("iptables", "ip6tables"):
            for table in ("filter", "nat", "mangle"):
                for line in _sh(f"{tool}-save", "-t", table).stdout.splitlines():
                    if line.startswith((":KUBE-", ":CNI-")):
                        out.add((tool, table, line[1:].split()[0]))
        return out

    def _sweep_network(self) -> None:
        _sh("ip", "link", "del", BRIDGE)
        # Chains made while the cluster ran (chains this host had before are left alone): first the rules
        # that jump to them, then their rules, then the chains.
        ours = self._chains() - getattr(self, "_chains_before", set())
        for tool in ("iptables", "ip6tables"):
            for table in ("filter", "nat", "mangle"):
                chains = {c for t, tb, c in ours if t == tool and tb == table}
                if not chains:
                    continue
                for rule in _sh(f"{tool}-save", "-t", table).stdout.splitlines():
                    words = shlex.split(rule)
                    if rule.startswith("-A ") and words[1] not in chains and "-j" in words \
                            and words[words.index("-j") + 1] in chains:
                        _sh(tool, "-t", table, "-D", *words[1:])
                for chain in chains:
                    _sh(tool, "-t", table, "-F", chain)
                for chain in chains:
                    _sh(tool, "-t", table, "-X", chain)

    @staticmethod
    def _make_cgroups() -> None:
        """The kubelet's cgroupRoot must exist in every hierarchy (cgroup v1); cpuset needs its CPUs and
        memory nodes copied from the parent before a task may join."""
        base = Path("/sys/fs/cgroup")
        for controller in base.iterdir():
            if not controller.is_dir() or controller.is_symlink():
                continue
            top = controller / CGROUP_ROOT
            top.mkdir(exist_ok=True)
            for knob in ("cpuset.cpus", "cpuset.mems"):
                if (controller / knob).exists():
                    (top / knob).write_text((controller / knob).read_text())

    @staticmethod
    def _remove_cgroups() -> None:
        base = Path("/sys/fs/cgroup")
        for controller in base.iterdir() if base.is_dir() else ():
            top = controller / CGROUP_ROOT
            if not top.is_dir():
                continue
            for dirpath, _dirs, _files in sorted(os.walk(top), key=lambda t: len(t[0]), reverse=True):
                try:
                    os.rmdir(dirpath)
                except OSError:
                    pass
