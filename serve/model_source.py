"""Where a serving replica finds its model: one function for both engines, called in the replica.

    pvc://CLAIM/PATH   the claim's mount in the pod ($MEDDISTILL_PVC_ROOT/CLAIM, which the operator sets
                       and mounts: the artifacts' claim and every claim the job's inputs name); its
                       manifest, when it has one, is checked
    s3://BUCKET/PREFIX a published artifact: fetched (manifest + files) into the local cache and
                       checked against the manifest's sha256s; refused when it has no manifest or
                       a file does not match
    anything else      meddistill.modelsource as for every other stage (a local directory, a
                       .gguf file, builtin:NAME, a Hugging Face id in the local cache)

Why in the replica: the serve config is rendered by the operator and the app is built on the head,
neither of which has the replica's mounts, cache or GPU.
"""
from __future__ import annotations

import logging
from pathlib import Path

from meddistill.artifacts import ArtifactStore, local_path, pvc_not_found, read_manifest, verify

log = logging.getLogger(__name__)


class ModelArtifactError(RuntimeError):
    """The model artifact is missing or fails its manifest check (the message says which and the fix)."""


def _checked(directory: Path, source: str) -> Path:
    """`directory` when its manifest verifies; a directory without a manifest is taken as it is."""
    if read_manifest(directory) is None:
        return directory
    if verify(directory) is None:
        raise ModelArtifactError(
            f"model source {source}: a file in {directory} does not match the sha256 in its manifest.json "
            f"(damaged or changed after the quantize stage published it); re-run the quantize stage, or "
            f"restore the artifact")
    return directory


def local_model_dir(source: str, *, gguf: bool = False) -> Path:
    """A local path the engines can load `source` from (see the module docstring).

    gguf: for the llama.cpp engine, which reads the .gguf (and the tokenizer beside it), a local
    artifact folder needs no transformers config.json at its root (`formats: [gguf]` alone has none).
    """
    if source.startswith("pvc://"):
        path = local_path(source)
        if not path.exists():
            raise ModelArtifactError(pvc_not_found(f"model source {source}", source))
        if not path.is_dir():
            raise ModelArtifactError(f"model source {source}: {path} is a file; name the model's directory")
        return _checked(path, source)
    if source.startswith("s3://"):
        fetched = ArtifactStore(source).fetch()
        if fetched is None:
            raise ModelArtifactError(
                f"model source {source}: no manifest.json under that prefix, so it is not a published artifact "
                f"(or it is still being uploaded: the manifest is written last); serve a finished quantize "
                f"artifact, or copy the model to a local path or PVC")
        if verify(fetched) is None:
            raise ModelArtifactError(
                f"model source {source}: the downloaded files in {fetched} do not match the sha256s in its "
                f"manifest.json; the artifact was changed after it was published: re-run the quantize stage")
        return fetched
    if gguf and Path(source).expanduser().is_dir():
        return _checked(Path(source).expanduser(), source)
    from meddistill.modelsource import resolve_model_source

    return resolve_model_source(source)
