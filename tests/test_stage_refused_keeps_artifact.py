"""A stage run refused before it starts (a local store some Ray node cannot see) loses nothing:
the artifact already there keeps its manifest and still verifies, so the next run can skip it."""
from __future__ import annotations

import pytest

from meddistill.artifacts import verify, write_manifest
from meddistill.jobs import stage as stage_mod
from meddistill.jobs import storage


def test_a_refused_rerun_keeps_the_finished_artifacts_manifest(tiny_job, monkeypatch):
    ctx = stage_mod.StageContext(tiny_job(name="refused"))
    out = ctx.output_dir("teacher")
    (out / "model").mkdir(parents=True)
    (out / "model" / "weights.bin").write_bytes(b"finished weights")
    digest = write_manifest(out, stage="teacher", config={}).digest

    def blind(directory, field_name, value):
        raise storage.SharedFilesystemError(f"{field_name}={value!r}: node abc does not see {directory}")

    monkeypatch.setattr(stage_mod, "connect_ray", lambda address=None: None)  # no cluster needed to be refused
    monkeypatch.setattr(storage, "require_shared_filesystem", blind)
    with pytest.raises(stage_mod.StageError, match="spec.artifacts.uri"):
        stage_mod.run_stage(ctx, "teacher")

    manifest = verify(out)
    assert manifest is not None and manifest.digest == digest
