"""The artifact store: where each stage's output lives, and its manifest.

Layout (the same for every store): `<spec.artifacts.uri>/<job name>/<stage>/` holds the stage's
files plus `manifest.json` (config, data digest, metrics, sha256 of every file, and the stage's
fingerprint: hashes of the spec sections it depends on and the digests of its input stages). The
manifest's own sha256 is the stage's *artifact digest*: the operator records it in status,
`meddistill run` skips a stage whose manifest verifies and whose fingerprint matches the spec, and
the next stage reads the files it lists.

Stores: a local path; `pvc://CLAIM/PATH` (a PersistentVolumeClaim mounted at
`$MEDDISTILL_PVC_ROOT/CLAIM`, default `/mnt/pvc/CLAIM`, in every pod; the operator reads a job's at
`$MEDDISTILL_PVC_ROOT/<namespace>/CLAIM`); `s3://BUCKET/PREFIX`
(boto3; files are staged in a local cache). Torch-free: the operator imports this module.

`pvc://CLAIM/PATH` is also how a model source or a dataset reference's PATH names files on a claim
(air-gapped hospitals keep models and data there): `pvc_path` is the one resolution of the scheme,
`pvc_input_problem` its validation and `pvc_not_found` the error when the file is not there.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable

MANIFEST = "manifest.json"
PROGRESS = "progress.jsonl"  # live training progress (train_common.report); scratch, never part of an artifact
# Where pods mount a pvc:// store's claim (PVC_ROOT/CLAIM): the operator mounts it there and sets
# PVC_ROOT_ENV; stages and serving replicas resolve pvc:// URIs through local_path with the same value.
PVC_ROOT, PVC_ROOT_ENV = "/mnt/pvc", "MEDDISTILL_PVC_ROOT"
PVC_SCHEME = "pvc://"
# A PersistentVolumeClaim name, a DNS-1123 subdomain. Python and RE2 read it alike: CRD patterns embed
# it. Its 253-character limit is checked beside it, in Python only (RE2 cannot count within this form):
# `validate` and the operator, which validates every job it reads, refuse a longer one.
PVC_CLAIM_PATTERN = r"[a-z0-9](?:[-a-z0-9]*[a-z0-9])?(?:\.[a-z0-9](?:[-a-z0-9]*[a-z0-9])?)*"
PVC_CLAIM_MAX = 253
# A `..` segment (at the start or after '/' or a dataset FORMAT's ':'; before '/', a SPLIT's '#' or the
# end). Refused in every model, dataset and artifact reference, by `validate`, the operator and (as CEL)
# the API server: a reference names a place inside its folder, claim or bucket, never one above it.
# Python's re and RE2 read it alike.
PARENT_SEGMENT = r"(^\s*|[/:])\.\.(/|#|\s*$)"
PARENT_SEGMENT_CEL = "!self.matches('" + PARENT_SEGMENT.replace("\\", "\\\\") + "')"
log = logging.getLogger(__name__)


def parent_segment_problem(value: str) -> str:
    """Why `value` (a model, dataset or artifact reference) is refused for a `..` segment; "" if not."""
    if not isinstance(value, str) or not re.search(PARENT_SEGMENT, value):
        return ""
    return (f"{value!r} has a '..' path segment, which is refused in models, datasets and artifact stores (on a "
            "shared cluster it would climb out of the claim or folder it names): name the place directly, "
            "e.g. an absolute path or pvc://CLAIM/PATH without '..'")


def _cache_root() -> Path:
    return Path(os.environ.get("MEDDISTILL_CACHE", Path.home() / ".cache" / "meddistill"))


def job_dir(metadata) -> str:
    """Where a job's artifacts go under spec.artifacts.uri (metadata: the job's name, namespace, uid).

    `meddistill run` (no uid): `<name>`. A job the operator runs carries its uid: `<namespace>/<name>-<uid[:8]>`,
    so same-named jobs of two namespaces sharing a bucket, or a job deleted and re-created under its
    name, never read or overwrite each other's artifacts.
    """
    uid = getattr(metadata, "uid", None) or ""
    if not uid:
        return metadata.name
    return f"{metadata.namespace or 'default'}/{metadata.name}-{uid[:8]}"


def stage_uri(artifacts_uri: str, job_dir: str, stage: str) -> str:
    """URI of one stage's artifact directory (job_dir: job_dir(job.metadata))."""
    return f"{artifacts_uri.rstrip('/')}/{job_dir}/{stage}"


def local_path(uri: str, base_dir: str | os.PathLike | None = None, namespace: str | None = None) -> Path | None:
    """The local directory behind a URI, or None for object storage.

    namespace: the operator's view of pvc://, which sees claims of many namespaces, each mounted at
    `$MEDDISTILL_PVC_ROOT/<namespace>/<claim>` (the chart's artifactClaims): a claim name means the
    job's own namespace's claim, never a same-named one elsewhere. A pod (namespace None) mounts its
    own namespace's claim at `$MEDDISTILL_PVC_ROOT/<claim>`.
    """
    if uri.startswith("s3://"):
        return None
    if uri.startswith(PVC_SCHEME):
        return pvc_path(uri, namespace)
    path = Path(uri).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = Path(base_dir) / path
    return path.resolve()


def pvc_root() -> Path:
    return Path(os.environ.get(PVC_ROOT_ENV) or PVC_ROOT)


def pvc_claim(uri: str) -> str:
    return uri[len(PVC_SCHEME):].partition("/")[0]


def pvc_path(uri: str, namespace: str | None = None) -> Path:
    """Where `pvc://CLAIM/PATH` is on this machine: `$MEDDISTILL_PVC_ROOT/CLAIM/PATH` (see local_path
    for namespace). Pods, `meddistill run` and serving replicas all resolve the scheme here."""
    claim, _, rest = uri[len(PVC_SCHEME):].partition("/")
    root = pvc_root()
    return (root / namespace if namespace else root) / claim / rest


def pvc_input_problem(uri: str) -> str:
    """Why `uri` (stripped, starting with pvc://) cannot name a model or dataset; "" when it can.

    An input names a file or folder inside a claim: a bare pvc://CLAIM is refused, so a forgotten path
    shows at validation, not as a whole claim loaded as a model."""
    claim, _, rest = uri[len(PVC_SCHEME):].partition("/")
    if not re.fullmatch(PVC_CLAIM_PATTERN, claim) or len(claim) > PVC_CLAIM_MAX:
        return (f"the claim {claim!r} is not a PersistentVolumeClaim name (lowercase letters, digits, '-' and '.', "
                f"at most {PVC_CLAIM_MAX} characters, starting and ending with a letter or digit); write "
                "pvc://CLAIM/PATH, e.g. pvc://models/llama-3-8b")
    if not re.search(r"[^\s/]", rest):
        return f"no path inside the claim {claim!r}; write pvc://CLAIM/PATH, e.g. pvc://{claim}/llama-3-8b"
    return ""


def pvc_not_found(what: str, uri: str) -> str:
    """The error for an input pvc:// reference whose file is not on this machine, with the fix."""
    claim, path, root = pvc_claim(uri), pvc_path(uri), pvc_root()
    if (root / claim).is_dir():
        return (f"{what}: {path} does not exist: the claim {claim!r} is mounted at {root / claim} but holds no "
                f"{uri[len(PVC_SCHEME) + len(claim):].lstrip('/')!r}; copy it onto the claim or fix the path")
    return (f"{what}: {path} does not exist on this machine: the claim {claim!r} must be mounted at {root / claim} "
            f"(the operator mounts it in every stage and serving pod), or set {PVC_ROOT_ENV} to the folder the "
            f"claims are mounted under on this machine (now {root})")


def input_path_pattern(excluded: str = "") -> str:
    """RE2 (read alike by Python) of a model or dataset path, leading blanks allowed: a well-formed
    pvc://CLAIM/PATH, or any path not starting with pvc:// (there the resolver decides). CRD patterns
    embed it so the API server refuses what pvc_input_problem refuses; RE2 has no lookahead, hence
    "not pvc://" spelled as each prefix of it followed by a different character, or alone.
    excluded: characters the path cannot hold (a dataset reference's '#' before its SPLIT)."""
    char = f"[^{excluded}]" if excluded else r"[\s\S]"
    s = PVC_SCHEME
    starts = [rf"[^\s{s[0]}{excluded}]"] + [f"{s[:i]}[^{s[i]}{excluded}]" for i in range(1, len(s))]
    return (rf"\s*(?:{s}{PVC_CLAIM_PATTERN}/{char}*[^\s/{excluded}]{char}*"
            rf"|(?:{'|'.join(starts)}){char}*|{'|'.join(s[:i] for i in range(1, len(s)))})")


class UnsafePathError(ValueError):
    """A manifest or bucket listing names a path outside the directory it is written to."""


def contained_path(root: Path, rel: str, source: str) -> Path:
    """`root / rel`, refused unless it stays inside root once resolved.

    Manifests and bucket listings come from storage other tenants or an attacker may write:
    `../`, an absolute path or a symlink already in the cache must not place a file elsewhere.
    """
    root = Path(root).resolve()
    path = (root / rel).resolve()  # follows symlinks: a link planted in the cache is caught too
    if Path(rel).is_absolute() or ".." in Path(rel).parts or not path.is_relative_to(root) or path == root:
        raise UnsafePathError(f"{source}: refusing key {rel!r}: it resolves outside {root}; "
                              "rewrite the manifest/bucket with relative paths inside the prefix")
    return path


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class Manifest:
    stage: str
    files: dict[str, str]  # relative path -> sha256
    config: dict
    data_digest: str
    metrics: dict
    created: float
    fingerprint: dict[str, str] = field(default_factory=dict)  # spec section path -> sha256 of its value
    inputs: dict[str, str] = field(default_factory=dict)  # input stage -> its artifact digest when this one ran
    digest: str = ""  # sha256 of the manifest file itself

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "digest"}


def write_manifest(directory: Path, *, stage: str, config: dict, data_digest: str = "", metrics: dict | None = None,
                   fingerprint: dict[str, str] | None = None, inputs: dict[str, str] | None = None) -> Manifest:
    """Hash every file in `directory` and write manifest.json last (its presence means 'complete')."""
    directory = Path(directory)
    (directory / PROGRESS).unlink(missing_ok=True)  # scratch of the run that just finished
    files = {
        str(p.relative_to(directory)): sha256_file(p)
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name not in (MANIFEST, PROGRESS)
    }
    manifest = Manifest(stage, files, config, data_digest, metrics or {}, time.time(), fingerprint or {}, inputs or {})
    tmp = directory / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest.to_dict(), indent=2, sort_keys=True, default=str))
    os.replace(tmp, directory / MANIFEST)  # atomic: a crash never leaves a half manifest
    manifest.digest = sha256_file(directory / MANIFEST)
    return manifest


def read_manifest(directory: Path) -> Manifest | None:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    known = {f.name for f in fields(Manifest)} - {"digest"}
    # Keys a newer writer added are ignored, so an older reader (an operator) still reads the manifest.
    return Manifest(**{k: v for k, v in data.items() if k in known}, digest=sha256_file(path))


def verify(directory: Path) -> Manifest | None:
    """The manifest if every listed file exists with its recorded sha256, else None."""
    manifest = read_manifest(directory)
    if manifest is None:
        return None
    for rel, digest in manifest.files.items():
        try:
            p = contained_path(directory, rel, f"{directory}/{MANIFEST}")
        except UnsafePathError as e:
            log.warning("%s", e)
            return None
        if not p.is_file() or sha256_file(p) != digest:
            return None
    return manifest


def s3_client(uri: str = "s3://"):
    """A boto3 S3 client: AWS_ENDPOINT_URL (MinIO, Ceph, moto) + the default credential chain."""
    try:
        import boto3
    except ImportError:
        raise RuntimeError(f"{uri}: s3:// artifact stores need boto3: pip install 'meddistill[s3]'") from None
    return boto3.client("s3", endpoint_url=os.environ.get("AWS_ENDPOINT_URL") or None)


def bucket_prefix(uri: str) -> tuple[str, str]:
    """("bucket", "key/prefix") of an s3:// URI."""
    bucket, _, prefix = uri[len("s3://"):].partition("/")
    return bucket, prefix.rstrip("/")


class ArtifactStoreUnavailable(RuntimeError):
    """The store did not answer 'found' or 'not found' (403, a 5xx, an outage): a reader must
    not take this as 'no artifact', which would re-run (and overwrite) a stage that succeeded."""

    def __init__(self, what: str, cause: BaseException):
        code = _s3_error_code(cause)
        denied = ("the credentials (spec.artifacts.secretName) may not read it; S3 also answers 403 for a missing "
                  "key when they lack s3:ListBucket, so grant s3:GetObject and s3:ListBucket on the prefix")
        hint = denied if code in ("403", "AccessDenied") else (
            f"S3 answered {code}: check the bucket in spec.artifacts.uri and the S3 service" if code
            else "the store is unreachable: check AWS_ENDPOINT_URL and that the S3 service is up")
        super().__init__(f"{what}: {code or type(cause).__name__}: {hint}")
        self.code = code


def _s3_error_code(e: BaseException) -> str:
    """botocore's error code ('404', 'NoSuchKey', '403', 'AccessDenied', ...); '' when S3 never answered."""
    response = getattr(e, "response", None)
    return str(((response or {}).get("Error") or {}).get("Code") or "") if isinstance(response, dict) else ""


class ArtifactStore:
    """Move a stage directory between a URI and a local working directory."""

    def __init__(self, uri: str, base_dir: str | os.PathLike | None = None):
        self.uri = uri
        self.local = local_path(uri, base_dir)

    def _s3(self):
        return s3_client(self.uri)

    def _bucket_prefix(self) -> tuple[str, str]:
        return bucket_prefix(self.uri)

    def working_dir(self) -> Path:
        """A local directory to write into (the store itself when it is a filesystem)."""
        if self.local is not None:
            self.local.mkdir(parents=True, exist_ok=True)
            return self.local
        path = _cache_root() / "s3" / self.uri[len("s3://"):]
        path.mkdir(parents=True, exist_ok=True)
        return path

    def publish(self, directory: Path) -> None:
        """Upload a finished working dir (manifest last); a no-op for filesystem stores."""
        if self.local is not None:
            return
        s3, (bucket, prefix) = self._s3(), self._bucket_prefix()
        files = sorted(p for p in Path(directory).rglob("*") if p.is_file())
        for p in sorted(files, key=lambda p: p.name == MANIFEST):
            s3.upload_file(str(p), bucket, f"{prefix}/{p.relative_to(directory)}")

    def fetch(self, only: Iterable[str] | None = None) -> Path | None:
        """A local copy of the stage directory if its manifest exists (downloaded for s3).

        only: besides the manifest, just these files (the operator reads results.json, never a
        model's weights). A file whose local copy already has the manifest's sha256 is not
        downloaded again, so re-checking a finished 70B stage costs hashing, not a transfer.
        """
        if self.local is not None:
            return self.local if (self.local / MANIFEST).is_file() else None
        s3, (bucket, prefix) = self._s3(), self._bucket_prefix()
        target = self.working_dir()
        try:
            s3.download_file(bucket, f"{prefix}/{MANIFEST}", str(target / MANIFEST))
        except Exception as e:  # noqa: BLE001 - classified below: only a 404 means 'not complete'
            (target / MANIFEST).unlink(missing_ok=True)  # never leave a stale manifest claiming 'complete'
            if _s3_error_code(e) in ("404", "NoSuchKey", "NotFound"):
                return None
            raise ArtifactStoreUnavailable(f"{self.uri}/{MANIFEST}", e) from e
        wanted = None if only is None else set(only)
        files = json.loads((target / MANIFEST).read_text())["files"]
        try:  # every path is checked before anything is downloaded
            paths = {rel: contained_path(target, rel, f"{self.uri}/{MANIFEST}") for rel in files}
        except UnsafePathError:
            (target / MANIFEST).unlink(missing_ok=True)  # a hostile manifest never counts as 'complete'
            raise
        for rel, digest in files.items():
            path = paths[rel]
            if (wanted is not None and rel not in wanted) or (path.is_file() and sha256_file(path) == digest):
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            s3.download_file(bucket, f"{prefix}/{rel}", str(path))
        return target

    def clear(self) -> None:
        """Remove a partial (unverified) stage directory before a fresh attempt."""
        if self.local is not None and self.local.exists():
            shutil.rmtree(self.local)


def atomic_dir(final: Path) -> Path:
    """A temp dir next to `final`; rename it into place with os.replace when complete."""
    final.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
