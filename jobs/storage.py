"""Where a stage's files and Ray Train checkpoints go when its processes run on several nodes.

With an `s3://` store every node stages files in its *own* local cache (artifacts.ArtifactStore.
working_dir), so what rank 0 writes on a worker node never appears in the driver's directory:

    worker (rank 0)  writes into its node's working dir, then uploads those files to the stage's
                     prefix plus a listing, NODE_OUTPUTS (upload_node_outputs)
    driver           after fit(), downloads the listed files into its working dir (pull_node_outputs),
                     so its checks and the manifest cover them; publish skips what is already there
    checkpoints      Ray Train's storage_path is `<stage prefix>/ray_train` on S3 through a pyarrow
                     S3FileSystem built from the same AWS_* settings boto3 uses, so a retried stage
                     (new driver, other node) resumes from the latest checkpoint; removed on success
    plain Ray tasks  (distill-data's teacher shards, evaluate's models) are started with node_task:
                     each reads its inputs from the store into its own node's cache (fetch_input),
                     writes into a fresh folder on its node and uploads it; `collect` returns their
                     results and downloads what they uploaded into the driver's working dir
    worker inputs    what the driver makes for its own workers (distill's pruned base, with its
                     own manifest) goes to the stage's prefix first (share_with_workers); workers
                     fetch_input it, and a folder with its own manifest is never a node's output

A local `artifacts.uri` (a path or pvc://) must be the same filesystem on every node:
`require_shared_filesystem` checks it on a multi-node cluster and refuses otherwise; there tasks
write straight into the stage's folder.
`run_stage` opens a `stage_scope` around the recipe, so the training helpers know the stage's URI
without every recipe passing it along.
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from meddistill.artifacts import MANIFEST, PROGRESS, ArtifactStore, bucket_prefix, contained_path, s3_client, verify

NODE_OUTPUTS = ".node-outputs.json"  # {relative path: size} that rank 0 uploaded from its node
CHECKPOINTS = "ray_train"  # Ray Train's storage under the stage (local dir or object prefix)
_NOT_OUTPUTS = {MANIFEST, PROGRESS, NODE_OUTPUTS}


@dataclass
class StageScope:
    uri: str  # the stage's artifact URI
    uploaded: dict[str, int] = field(default_factory=dict)  # files the nodes uploaded (rel -> size)

    @property
    def on_s3(self) -> bool:
        return self.uri.startswith("s3://")


_scope: StageScope | None = None


@contextlib.contextmanager
def stage_scope(uri: str):
    """The stage whose recipe runs inside this block (run_stage opens it)."""
    global _scope
    previous, _scope = _scope, StageScope(uri)
    try:
        yield _scope
    finally:
        _scope = previous


def current() -> StageScope | None:
    return _scope


def s3_filesystem():
    """pyarrow's S3 filesystem with the settings boto3 reads from the environment (pyarrow does not
    read AWS_ENDPOINT_URL itself): an in-cluster MinIO or the moto server in tests."""
    from pyarrow import fs

    kwargs = {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        parsed = urlparse(endpoint)
        kwargs.update(endpoint_override=parsed.netloc or parsed.path, scheme=parsed.scheme or "https")
    if os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY"):
        kwargs.update(access_key=os.environ["AWS_ACCESS_KEY_ID"], secret_key=os.environ["AWS_SECRET_ACCESS_KEY"],
                      session_token=os.environ.get("AWS_SESSION_TOKEN"))
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        kwargs["region"] = region
    return fs.S3FileSystem(**kwargs)


# What reaches the store: the workers get the driver's values (as a Ray job's runtime env would
# give them), never MEDDISTILL_CACHE, which is each node's own.
S3_ENV = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_REGION",
          "AWS_DEFAULT_REGION", "AWS_CA_BUNDLE")


def checkpoint_storage(out_dir: Path) -> tuple[str, object | None, dict | None]:
    """(storage_path, storage_filesystem, worker_runtime_env) for Ray Train: the stage's S3 prefix
    on an s3:// store (reachable from every node), else <out_dir>/ray_train (a shared filesystem
    by requirement)."""
    scope = current()
    if scope is None or not scope.on_s3:
        return str(Path(out_dir) / CHECKPOINTS), None, None
    bucket, prefix = bucket_prefix(scope.uri)
    env = s3_env()
    return f"{bucket}/{prefix}/{CHECKPOINTS}", s3_filesystem(), {"env_vars": env} if env else None


def s3_env() -> dict[str, str]:
    """The driver's S3_ENV settings, for the runtime env of the Ray workers and tasks it starts."""
    return {k: os.environ[k] for k in S3_ENV if os.environ.get(k)}


def delete_checkpoints(uri: str) -> int:
    """Remove a finished stage's checkpoints from S3 (the artifact supersedes them, and a later run
    of the same stage must start fresh, not resume a finished one). Returns the objects removed."""
    s3, (bucket, prefix) = s3_client(), bucket_prefix(uri)
    removed = 0
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{prefix}/{CHECKPOINTS}/"):
        keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
        if keys:
            s3.delete_objects(Bucket=bucket, Delete={"Objects": keys})
            removed += len(keys)
    return removed


def node_output_files(directory: Path) -> list[Path]:
    """The stage files a node wrote: everything but checkpoints, scratch, the manifest and the
    folders with a manifest of their own (inputs fetched onto the node: distill's pruned base)."""
    directory = Path(directory)
    fetched = {p.parent for p in directory.rglob(MANIFEST) if p.parent != directory}
    return sorted(
        p for p in directory.rglob("*")
        if p.is_file() and p.name not in _NOT_OUTPUTS and p.relative_to(directory).parts[0] != CHECKPOINTS
        and not fetched.intersection(p.parents)
    )


def share_with_workers(directory: Path) -> str:
    """On the driver, before training: a folder of the stage that its workers read (distill's
    pruned base, with its own manifest) as a URI that fetch_input opens on any node. On an s3://
    store it is uploaded under the stage's prefix (unless the bucket holds the same manifest
    already) and recorded, so publish does not send it again; a local store is read in place."""
    directory, scope = Path(directory), current()
    if scope is None or not scope.on_s3:
        return str(directory)
    rel = directory.relative_to(ArtifactStore(scope.uri).working_dir())
    uri = f"{scope.uri}/{rel}"
    s3, (bucket, prefix) = s3_client(), bucket_prefix(uri)
    try:
        same = s3.get_object(Bucket=bucket, Key=f"{prefix}/{MANIFEST}")["Body"].read() == (directory / MANIFEST).read_bytes()
    except s3.exceptions.NoSuchKey:
        same = False
    if not same:
        ArtifactStore(uri).publish(directory)
    scope.uploaded.update({str(rel / p.relative_to(directory)): p.stat().st_size
                           for p in directory.rglob("*") if p.is_file()})
    return uri


def upload_files(directory: Path, uri: str) -> dict[str, int]:
    """From the node that wrote them: upload a stage's files (node_output_files) to its prefix;
    returns the listing {relative path: size}."""
    s3, (bucket, prefix) = s3_client(), bucket_prefix(uri)
    listing = {}
    for path in node_output_files(directory):
        rel = str(path.relative_to(directory))
        s3.upload_file(str(path), bucket, f"{prefix}/{rel}")
        listing[rel] = path.stat().st_size
    return listing


def upload_node_outputs(directory: Path, uri: str) -> dict[str, int]:
    """Rank 0's upload: the files, then NODE_OUTPUTS listing them and where they were written (the
    driver of a Ray Train run gets no return value from a worker, so it reads this from the bucket)."""
    listing = upload_files(directory, uri)
    written = {"node": _node_id(), "dir": str(directory), "files": listing}
    s3, (bucket, prefix) = s3_client(), bucket_prefix(uri)
    s3.put_object(Bucket=bucket, Key=f"{prefix}/{NODE_OUTPUTS}", Body=json.dumps(written).encode())
    return listing


def forget_node_outputs(uri: str) -> None:
    """Before a run: a listing left by an earlier run must not be taken for this one's."""
    s3, (bucket, prefix) = s3_client(), bucket_prefix(uri)
    s3.delete_object(Bucket=bucket, Key=f"{prefix}/{NODE_OUTPUTS}")


def pull_node_outputs(uri: str, target: Path) -> dict[str, int]:
    """On the driver: the files rank 0 listed in NODE_OUTPUTS, downloaded into `target` unless rank 0
    wrote them there itself (same node, same folder); returns the listing.

    Never "keep a local copy of the same size": a re-run's weights have the size of the earlier
    run's copy still in the driver's cache, and the manifest would hash the old bytes.
    """
    s3, (bucket, prefix) = s3_client(), bucket_prefix(uri)
    try:
        body = s3.get_object(Bucket=bucket, Key=f"{prefix}/{NODE_OUTPUTS}")["Body"].read()
    except s3.exceptions.NoSuchKey:
        return {}
    written = json.loads(body)
    if (written["node"], written["dir"]) != (_node_id(), str(target)):
        download_files(uri, written["files"], target, f"{uri}/{NODE_OUTPUTS}")
    s3.delete_object(Bucket=bucket, Key=f"{prefix}/{NODE_OUTPUTS}")
    return written["files"]


def download_files(uri: str, listing: dict[str, int], target: Path, source: str) -> None:
    """On the driver: the listed files of the stage's prefix into `target`, replacing what is
    there. `source` names the listing in errors."""
    s3, (bucket, prefix) = s3_client(), bucket_prefix(uri)
    for rel in listing:
        path = contained_path(Path(target), rel, source)
        path.parent.mkdir(parents=True, exist_ok=True)
        s3.download_file(bucket, f"{prefix}/{rel}", str(path))


def _node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


def publish(store: ArtifactStore, directory: Path, uploaded: dict[str, int]) -> None:
    """ArtifactStore.publish, less the files a node already uploaded with the same bytes (a 70B
    model is not sent twice); the manifest is always sent, last."""
    if store.local is not None or not uploaded:
        store.publish(directory)
        return
    s3, (bucket, prefix) = s3_client(), bucket_prefix(store.uri)
    directory = Path(directory)
    for path in sorted((p for p in directory.rglob("*") if p.is_file()), key=lambda p: p.name == MANIFEST):
        rel = str(path.relative_to(directory))
        if rel == MANIFEST or uploaded.get(rel) != path.stat().st_size:
            s3.upload_file(str(path), bucket, f"{prefix}/{rel}")


def node_task(fn, out: Path, **ray_options):
    """`fn(out_dir, *args)` as a Ray task of the current stage, on whatever node Ray picks:
    call the returned function with `*args` to start one (an ObjectRef), `collect` the refs.

    On an s3:// store the task writes into a fresh folder on its own node and uploads it, unless it
    runs in the driver's process environment (same node, same cache): then, as on a local store
    (one filesystem for all nodes), it writes straight into `out`. A folder per task keeps tasks
    sharing a node from uploading each other's files, or an earlier run's.
    """
    import ray

    scope = current()
    on_s3 = scope is not None and scope.on_s3
    if on_s3 and s3_env():  # the store's settings travel with the task (not the cache: each node has its own)
        runtime_env = ray_options.get("runtime_env") or {}
        ray_options["runtime_env"] = {**runtime_env, "env_vars": {**s3_env(), **runtime_env.get("env_vars", {})}}
    # ray.remote, not .options(): Ray accepts max_calls (evaluate's fresh process per model) only there
    remote = ray.remote(**ray_options)(_write_on_node) if ray_options else ray.remote(_write_on_node)
    driver = (scope.uri if on_s3 else None, str(out), _node_id())
    return functools.partial(remote.remote, fn, *driver)


def _write_on_node(fn, stage_uri: str | None, driver_dir: str, driver_node: str, *args) -> tuple[object, dict[str, int]]:
    """Inside the task: (fn's result, {relative path: size} of the files it uploaded)."""
    if stage_uri is None:
        return fn(driver_dir, *args), {}
    here = ArtifactStore(stage_uri).working_dir()
    if here == Path(driver_dir) and _node_id() == driver_node:
        return fn(driver_dir, *args), {}
    scratch = Path(tempfile.mkdtemp(prefix=".task-", dir=here.parent))  # beside the stage: the cache's disk
    try:
        result = fn(str(scratch), *args)
        return result, upload_files(scratch, stage_uri)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)  # uploaded; a node's disk must not keep a copy


def collect(refs: list, out: Path) -> list:
    """The results of node_task refs, in order, once the files each task uploaded are in `out`
    (recorded in the stage scope, so publish does not send them again)."""
    import ray

    scope, results = current(), []
    for result, listing in ray.get(refs):
        if listing:
            download_files(scope.uri, listing, out, f"{scope.uri} (a task's uploads)")
            scope.uploaded.update(listing)
        results.append(result)
    return results


def fetch_input(uri: str, stage: str | None = None) -> Path:
    """In a task on any node: an earlier stage's artifact (or a folder share_with_workers made;
    `stage` names the stage that writes it) fetched into this node's cache (a local store is read
    in place), verified against its manifest."""
    directory = ArtifactStore(uri).fetch()
    if directory is None or verify(directory) is None:
        stage = stage or uri.rstrip("/").rsplit("/", 1)[-1]
        raise FileNotFoundError(f"{uri}: no artifact there, or its files do not match its manifest as fetched on this "
                                f"node; run that stage again: meddistill run FILE --stage {stage} --force")
    return directory


def worker_out_dir(config: dict) -> Path:
    """Inside a worker: this node's working dir for the stage (its own cache on s3), recorded in
    config["out_dir"] so the recipe writes there."""
    uri = config.get("stage_uri")
    if uri:
        config["out_dir"] = str(ArtifactStore(uri).working_dir())
    return Path(config["out_dir"])


class SharedFilesystemError(RuntimeError):
    """A local artifacts.uri that some Ray node cannot see."""


def require_shared_filesystem(directory: Path, field_name: str, value: str) -> None:
    """On a multi-node Ray cluster, refuse a local store that is not the same filesystem on every
    node: a token written here must be readable from each alive node."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n["NodeID"] for n in ray.nodes() if n.get("Alive")]
    if len(nodes) < 2:
        return
    token = uuid.uuid4().hex
    marker = Path(directory) / f".shared-check-{token}"
    marker.write_text(token)
    try:
        seen = ray.get([
            ray.remote(num_cpus=0)(_reads_token).options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(str(marker), token)
            for node in nodes
        ])
    finally:
        marker.unlink(missing_ok=True)
    blind = [node for node, ok in zip(nodes, seen) if not ok]
    if blind:
        raise SharedFilesystemError(
            f"{field_name}={value!r} is a local path, but Ray node(s) {', '.join(n[:12] for n in blind)} do not see "
            f"{directory}: stage outputs written there would be lost. Use an s3:// URI, or a pvc:// claim "
            "(ReadWriteMany) mounted on every node, or mount the same shared filesystem at that path on every node"
        )


def _reads_token(path: str, token: str) -> bool:
    try:
        return Path(path).read_text() == token
    except OSError:
        return False
