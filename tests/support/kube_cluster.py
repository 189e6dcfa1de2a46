"""A real, local Kubernetes control plane for tests.

Runs the genuine ``etcd``, ``kube-apiserver`` and ``kube-controller-manager``
binaries (built from the Go module proxy by ``tools/kube/build.sh`` and cached
outside the repository) on 127.0.0.1 with random ports and a private temp dir:

* RBAC authorization, static bearer tokens (``--token-auth-file``):
  an admin (user ``admin``, group ``system:masters``) and the operator's
  ServiceAccount identity
  (``system:serviceaccount:meddistill-system:meddistill-operator``, groups
  ``system:serviceaccounts``, ``system:serviceaccounts:meddistill-system``,
  ``system:authenticated``). The token is static, so the ServiceAccount object
  itself does not have to exist (the chart under test may create it) and RBAC
  decides what it may do, exactly as for a real projected token.
* self-signed serving certs (``--cert-dir``), service-account signing keys.
* kube-controller-manager with the garbage collector (ownerReference cascade),
  namespace controller (namespace deletion), serviceaccount and
  serviceaccount-token controllers, and root-ca-cert-publisher.
* KubeRay's CRDs (``tests/fixtures/kuberay-crds``) installed and Established
  before the controller manager starts, so the garbage collector watches them
  from the beginning. CRDs created later are picked up by the garbage collector
  on its periodic discovery resync (every 30 s).

There is no kubelet, scheduler or KubeRay operator: Pods never run, and RayJob
status only changes when a test patches the ``/status`` subresource.

The ``OwnerReferencesPermissionEnforcement`` admission plugin is on (as on OpenShift): a child with
``blockOwnerDeletion`` needs ``update`` on its owner's ``finalizers`` subresource.

The ``ServiceAccount`` admission plugin is disabled (as controller-runtime's
envtest does), so Pods can be created in a namespace right after it is created,
without waiting for its ``default`` ServiceAccount.

If the binaries are missing they are built (this takes a long time once); if
that fails, :class:`KubeClusterError` is raised -- never a skip.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO, Iterable, Sequence

REPO_ROOT = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO_ROOT / "tools" / "kube" / "build.sh"
KUBERAY_CRDS_DIR = REPO_ROOT / "tests" / "fixtures" / "kuberay-crds"

OPERATOR_NAMESPACE = "meddistill-system"
OPERATOR_SERVICE_ACCOUNT = "meddistill-operator"
OPERATOR_USER = f"system:serviceaccount:{OPERATOR_NAMESPACE}:{OPERATOR_SERVICE_ACCOUNT}"
OPERATOR_GROUPS = (
    "system:serviceaccounts",
    f"system:serviceaccounts:{OPERATOR_NAMESPACE}",
    "system:authenticated",
)
ADMIN_USER = "admin"
ADMIN_GROUPS = ("system:masters",)

SERVICE_CLUSTER_IP_RANGE = "10.0.0.0/24"
CONTROLLERS = ("garbage-collector-controller,namespace-controller,serviceaccount-controller,"
               "serviceaccount-token-controller,root-ca-certificate-publisher-controller")
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"

BINARIES = ("kube-apiserver", "kube-controller-manager", "kubectl", "kubelet", "kube-scheduler", "kube-proxy",
            "etcd", "helm", "kuberay-operator", "coredns")


class KubeClusterError(RuntimeError):
    """The control plane could not be built, started or used."""


class KubectlError(subprocess.CalledProcessError):
    """A kubectl/helm call failed; str() includes its stdout and stderr."""

    def __str__(self) -> str:  # pragma: no cover - formatting only
        return (
            f"{' '.join(map(str, self.cmd))!r} exited {self.returncode}\n"
            f"--- stdout ---\n{self.stdout or ''}\n--- stderr ---\n{self.stderr or ''}"
        )


# --------------------------------------------------------------------------- binaries


def ensure_binaries(progress: IO[str] | None = None) -> dict[str, Path]:
    """Run tools/kube/build.sh (builds what is missing, else returns at once).

    Progress lines are copied to ``progress`` (default: sys.stderr). Raises
    KubeClusterError when the build fails or a binary is missing afterwards.
    """
    progress = progress if progress is not None else sys.stderr
    if not BUILD_SCRIPT.is_file():
        raise KubeClusterError(f"{BUILD_SCRIPT} not found")
    proc = subprocess.Popen(
        ["bash", str(BUILD_SCRIPT)],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    err_lines: list[str] = []
    assert proc.stderr is not None and proc.stdout is not None
    for line in proc.stderr:  # build.sh writes progress to stderr, paths to stdout
        err_lines.append(line)
        progress.write(line)
        progress.flush()
    out = proc.stdout.read()
    rc = proc.wait()
    if rc != 0:
        tail = "".join(err_lines[-60:])
        raise KubeClusterError(
            f"tools/kube/build.sh failed (exit {rc}); the Kubernetes test binaries "
            f"could not be built.\n{tail}"
        )
    paths: dict[str, Path] = {}
    for line in out.splitlines():
        name, sep, path = line.partition("=")
        if sep:
            paths[name.strip()] = Path(path.strip())
    for name in BINARIES:
        if name not in paths or not os.access(paths[name], os.X_OK):
            raise KubeClusterError(f"build.sh did not produce an executable {name}: {out!r}")
    return paths


# --------------------------------------------------------------------------- helpers


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_rsa_keypair(private_path: Path, public_path: Path) -> None:
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import rsa
    except ImportError:  # fall back to the openssl CLI
        subprocess.run(
            ["openssl", "genrsa", "-out", str(private_path), "2048"], check=True, capture_output=True
        )
        subprocess.run(
            ["openssl", "rsa", "-in", str(private_path), "-pubout", "-out", str(public_path)],
            check=True,
            capture_output=True,
        )
        return
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    public_path.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    os.chmod(private_path, 0o600)


def _kubeconfig_yaml(server: str, ca_file: Path, user: str, token: str) -> str:
    # JSON is valid YAML; avoids depending on PyYAML here.
    cfg = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": "meddistill-test", "cluster": {"server": server, "certificate-authority": str(ca_file)}}
        ],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [{"name": user, "context": {"cluster": "meddistill-test", "user": user}}],
        "current-context": user,
        "preferences": {},
    }
    return json.dumps(cfg, indent=2) + "\n"


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """Linux: have the child killed if the test process dies without cleaning up."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except Exception:
        pass


class _Proc:
    def __init__(self, name: str, argv: Sequence[str], log_path: Path, env: dict[str, str] | None = None):
        self.name = name
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.popen = subprocess.Popen(
            list(argv),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # own process group, so we can kill the whole tree
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
            env=env,
        )

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, n: int = 40) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def stop(self, grace: float = 10.0) -> None:
        if self.popen.poll() is None:
            try:
                os.killpg(self.popen.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        # Kill anything left in the group (also if the leader already exited).
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.popen.wait(5)
        except subprocess.TimeoutExpired:
            pass
        self._log.close()


# --------------------------------------------------------------------------- cluster


class KubeCluster:
    """etcd + kube-apiserver + kube-controller-manager on localhost.

    Use :meth:`start` / :meth:`stop`, or as a context manager.
    """

    def __init__(
        self,
        binaries: dict[str, Path] | None = None,
        *,
        install_kuberay_crds: bool = True,
        kuberay_crds_dir: Path | None = None,
        keep_tmp: bool | None = None,
        progress: IO[str] | None = None,
        address: str = "127.0.0.1",
        controllers: str = CONTROLLERS,
        service_account_admission: bool = False,
        apiserver_args: Sequence[str] = (),
    ) -> None:
        self._binaries = dict(binaries) if binaries else None
        # A cluster with a kubelet (tests/support/node_cluster.py) serves on an address pods reach, runs
        # every controller and mounts ServiceAccount tokens into pods.
        self.address = address
        self._controllers = controllers
        self._sa_admission = service_account_admission
        self._apiserver_args = list(apiserver_args)
        self._install_kuberay_crds = install_kuberay_crds
        self._kuberay_crds_dir = kuberay_crds_dir or KUBERAY_CRDS_DIR  # another release's, for its controller
        self._progress = progress
        self.keep_tmp = (
            keep_tmp if keep_tmp is not None else os.environ.get("MEDDISTILL_KUBE_KEEP_TMP") == "1"
        )
        self.tmpdir: Path | None = None
        self._procs: list[_Proc] = []
        self.server = ""
        self.etcd_url = ""
        self.admin_token = secrets.token_hex(24)
        self.operator_token = secrets.token_hex(24)
        self.kubeconfig: Path | None = None
        self.operator_kubeconfig: Path | None = None
        self.ca_file: Path | None = None

    # -- lifecycle ----------------------------------------------------------------

    def __enter__(self) -> "KubeCluster":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self, timeout: float = 180.0) -> "KubeCluster":
        if self._binaries is None:
            self._binaries = ensure_binaries(self._progress)
        self.tmpdir = Path(tempfile.mkdtemp(prefix="meddistill-kube-"))
        try:
            self._start_etcd(timeout)
            self._start_apiserver(timeout)
            if self._install_kuberay_crds:
                self.apply_crds(sorted(self._kuberay_crds_dir.glob("*.yaml")))
            self._start_controller_manager(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for proc in reversed(self._procs):
            proc.stop()
        self._procs.clear()
        if self.tmpdir is not None and not self.keep_tmp:
            shutil.rmtree(self.tmpdir, ignore_errors=True)

    # -- public API -------------------------------------------------------------------

    def bin(self, name: str) -> Path:
        assert self._binaries is not None, "cluster not started"
        return self._binaries[name]

    @property
    def binaries(self) -> dict[str, Path]:
        assert self._binaries is not None, "cluster not started"
        return dict(self._binaries)

    def tool_env(self, kubeconfig: str | os.PathLike | None = None) -> dict[str, str]:
        """Environment for kubectl/helm/other clients pointed at this cluster."""
        assert self.tmpdir is not None
        env = dict(os.environ)
        env["KUBECONFIG"] = str(kubeconfig or self.kubeconfig)
        env["KUBECACHEDIR"] = str(self.tmpdir / "kube-cache")
        env["HELM_CACHE_HOME"] = str(self.tmpdir / "helm" / "cache")
        env["HELM_CONFIG_HOME"] = str(self.tmpdir / "helm" / "config")
        env["HELM_DATA_HOME"] = str(self.tmpdir / "helm" / "data")
        return env

    def kubectl(
        self,
        *args: str,
        kubeconfig: str | os.PathLike | None = None,
        input: str | None = None,
        check: bool = True,
        timeout: float = 120.0,
    ) -> subprocess.CompletedProcess:
        kc = str(kubeconfig or self.kubeconfig)
        return self._run([str(self.bin("kubectl")), "--kubeconfig", kc, *map(str, args)],
                         env=self.tool_env(kc), input=input, check=check, timeout=timeout)

    def helm(
        self,
        *args: str,
        kubeconfig: str | os.PathLike | None = None,
        input: str | None = None,
        check: bool = True,
        timeout: float = 300.0,
    ) -> subprocess.CompletedProcess:
        kc = str(kubeconfig or self.kubeconfig)
        return self._run([str(self.bin("helm")), *map(str, args)],
                         env=self.tool_env(kc), input=input, check=check, timeout=timeout)

    def api_client(self, kubeconfig: str | os.PathLike | None = None):
        """A ``kubernetes.client.ApiClient`` for the admin (default) or another kubeconfig."""
        from kubernetes import config as k8s_config

        return k8s_config.new_client_from_config(config_file=str(kubeconfig or self.kubeconfig))

    def apply_crds(self, paths: Iterable[str | os.PathLike], timeout: float = 60.0) -> list[str]:
        """Server-side apply CRD manifests and wait until each is Established.

        (KubeRay's CRDs are too large for client-side apply's last-applied annotation.)
        Returns the CRD names.
        """
        files = [arg for path in paths for arg in ("-f", str(path))]
        if not files:
            return []
        out = self.kubectl(
            "apply", "--server-side", "--force-conflicts",
            "--field-manager=meddistill-tests", "-o", "name", *files,
            timeout=timeout + 60,
        ).stdout
        names = [line.split("/", 1)[1] for line in out.split() if line.startswith("customresourcedefinition")]
        if names:
            self.kubectl(
                "wait", "--for=condition=Established", f"--timeout={int(timeout)}s",
                *[f"customresourcedefinition/{n}" for n in names],
                timeout=timeout + 30,
            )
        return names

    def start_kuberay(self, timeout: float = 120.0) -> None:
        """KubeRay's real controller (tools/kube/build.sh builds it) against this control plane, out of
        cluster: it reaches Ray heads through the API server's service proxy. Stopped with the cluster;
        its log is ``self.logs("kuberay-operator")``."""
        assert self.kubeconfig is not None, "cluster not started"
        probe = free_port()
        proc = self._spawn("kuberay-operator", [
            str(self.bin("kuberay-operator")),
            f"-kubeconfig={self.kubeconfig}",
            "-enable-leader-election=false",
            "-use-kubernetes-proxy",
            "-metrics-addr=0",
            f"-health-probe-bind-address=127.0.0.1:{probe}",
            "-log-stdout-encoder=json",
        ])
        self._wait_http(proc, f"http://127.0.0.1:{probe}/readyz", timeout, ok_body=None)

    def write_kubeconfig(self, path: str | os.PathLike, token: str, user: str = "user") -> Path:
        """Write a kubeconfig for another bearer token (must be in the token file or a real SA token)."""
        assert self.ca_file is not None
        p = Path(path)
        p.write_text(_kubeconfig_yaml(self.server, self.ca_file, user, token))
        return p

    def logs(self, name: str, n: int = 200) -> str:
        for proc in self._procs:
            if proc.name == name:
                return proc.log_tail(n)
        raise KeyError(name)

    # -- internals ----------------------------------------------------------------------

    @staticmethod
    def _run(argv, *, env, input, check, timeout) -> subprocess.CompletedProcess:
        res = subprocess.run(argv, env=env, input=input, capture_output=True, text=True, timeout=timeout)
        if check and res.returncode != 0:
            raise KubectlError(res.returncode, argv, res.stdout, res.stderr)
        return res

    def _spawn(self, name: str, argv: Sequence[str]) -> _Proc:
        assert self.tmpdir is not None
        proc = _Proc(name, argv, self.tmpdir / f"{name}.log")
        self._procs.append(proc)
        return proc

    def _wait_http(self, proc: _Proc, url: str, timeout: float, token: str | None = None,
                   ok_body: str | None = "ok") -> None:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if not proc.alive():
                raise KubeClusterError(
                    f"{proc.name} exited with {proc.popen.returncode} while starting:\n{proc.log_tail()}"
                )
            req = urllib.request.Request(url)
            if token:
                req.add_header("Authorization", f"Bearer {token}")
            try:
                with urllib.request.urlopen(req, timeout=5, context=ctx) as resp:
                    body = resp.read().decode(errors="replace")
                    if resp.status == 200 and (ok_body is None or ok_body in body):
                        return
                    last = f"{resp.status} {body[:300]}"
            except urllib.error.HTTPError as e:
                last = f"{e.code} {e.read()[:500].decode(errors='replace')}"
            except (OSError, ssl.SSLError) as e:
                last = repr(e)
            time.sleep(0.25)
        raise KubeClusterError(f"{proc.name} not ready at {url} after {timeout}s ({last}):\n{proc.log_tail()}")

    def _start_etcd(self, timeout: float) -> None:
        assert self.tmpdir is not None
        client, peer = free_port(), free_port()
        self.etcd_url = f"http://127.0.0.1:{client}"
        peer_url = f"http://127.0.0.1:{peer}"
        proc = self._spawn("etcd", [
            str(self.bin("etcd")),
            "--name=default",
            f"--data-dir={self.tmpdir / 'etcd'}",
            f"--listen-client-urls={self.etcd_url}",
            f"--advertise-client-urls={self.etcd_url}",
            f"--listen-peer-urls={peer_url}",
            f"--initial-advertise-peer-urls={peer_url}",
            f"--initial-cluster=default={peer_url}",
            "--unsafe-no-fsync=true",  # test data only; much faster on slow disks
            "--log-level=warn",
        ])
        self._wait_http(proc, f"{self.etcd_url}/health", timeout, ok_body='"health":"true"')

    def _start_apiserver(self, timeout: float) -> None:
        d = self.tmpdir
        assert d is not None
        port = free_port()
        self.server = f"https://{self.address}:{port}"
        cert_dir = d / "apiserver-certs"
        cert_dir.mkdir()
        sa_key, sa_pub = d / "sa.key", d / "sa.pub"
        _write_rsa_keypair(sa_key, sa_pub)
        tokens = d / "tokens.csv"
        tokens.write_text(
            f'{self.admin_token},{ADMIN_USER},admin-uid,"{",".join(ADMIN_GROUPS)}"\n'
            f'{self.operator_token},{OPERATOR_USER},operator-uid,"{",".join(OPERATOR_GROUPS)}"\n'
        )
        os.chmod(tokens, 0o600)
        proc = self._spawn("kube-apiserver", [
            str(self.bin("kube-apiserver")),
            f"--etcd-servers={self.etcd_url}",
            f"--bind-address={self.address}",
            f"--advertise-address={self.address}",
            f"--secure-port={port}",
            f"--cert-dir={cert_dir}",
            "--authorization-mode=RBAC",
            f"--token-auth-file={tokens}",
            "--anonymous-auth=false",
            f"--service-account-key-file={sa_pub}",
            f"--service-account-signing-key-file={sa_key}",
            f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
            f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
            "--allow-privileged=true",
            *([] if self._sa_admission else ["--disable-admission-plugins=ServiceAccount"]),
            # As on OpenShift and other hardened clusters: setting blockOwnerDeletion on a child needs
            # `update` on the owner's finalizers, so a chart missing that rule fails here with a 403.
            "--enable-admission-plugins=OwnerReferencesPermissionEnforcement",
            "--profiling=false",
            "--v=1",
            *self._apiserver_args,
        ])
        self._wait_http(proc, f"{self.server}/readyz", timeout, token=self.admin_token)
        # The self-signed serving cert file holds the leaf and its CA; it covers 127.0.0.1.
        self.ca_file = cert_dir / "apiserver.crt"
        if not self.ca_file.is_file():
            raise KubeClusterError(f"kube-apiserver did not write {self.ca_file}")
        self.kubeconfig = self.write_kubeconfig(d / "admin.kubeconfig", self.admin_token, ADMIN_USER)
        self.operator_kubeconfig = self.write_kubeconfig(
            d / "operator.kubeconfig", self.operator_token, OPERATOR_USER
        )
        # Bootstrap RBAC policy is reconciled by a post-start hook covered by /readyz,
        # but make sure the admin can really act (and the CA file verifies) before going on.
        self.kubectl("auth", "can-i", "*", "*", "--all-namespaces")

    def _start_controller_manager(self, timeout: float) -> None:
        d = self.tmpdir
        assert d is not None and self.kubeconfig is not None
        port = free_port()
        cert_dir = d / "kcm-certs"
        cert_dir.mkdir()
        proc = self._spawn("kube-controller-manager", [
            str(self.bin("kube-controller-manager")),
            f"--kubeconfig={self.kubeconfig}",
            f"--authentication-kubeconfig={self.kubeconfig}",
            f"--authorization-kubeconfig={self.kubeconfig}",
            "--authentication-skip-lookup=true",
            "--bind-address=127.0.0.1",
            f"--secure-port={port}",
            f"--cert-dir={cert_dir}",
            "--leader-elect=false",
            "--use-service-account-credentials=false",
            f"--controllers={self._controllers}",
            f"--service-account-private-key-file={d / 'sa.key'}",
            f"--root-ca-file={self.ca_file}",
            "--concurrent-gc-syncs=5",
            "--profiling=false",
            "--v=1",
        ])
        self._wait_http(proc, f"https://127.0.0.1:{port}/healthz", timeout)
