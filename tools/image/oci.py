"""OCI image archives (an image layout in a tar) streamed from layer folders, for
`ctr images import -`: how the one-node cluster gets images without a registry or a multi-GiB file.

    python tools/image/oci.py digest DIR                      -> "sha256:<hex>=<size>" of DIR's layer tar
    python tools/image/oci.py write - --name NAME --config CONFIG.json DIR=DIGEST=SIZE ... [--only-blobs-of DIR ...]

A layer is a folder; its tar is made the same way every time (GNU tar, names sorted, numeric owners),
so its digest is computed once at build time and the tar is streamed again when an archive is
written. CONFIG.json holds the image's run config (Entrypoint, Cmd, Env, User, WorkingDir).
--only-blobs-of: put only those layers' blobs in the archive; the importing containerd must already
have the others (the big dependency layers are imported once per store, the app layer per build).
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import BinaryIO

LAYER_TYPE = "application/vnd.oci.image.layer.v1.tar"


def layer_tar(folder: Path) -> subprocess.Popen:
    """A process whose stdout is the folder's layer tar (deterministic for unchanged files)."""
    return subprocess.Popen(["tar", "--sort=name", "--format=gnu", "--numeric-owner", "-C", str(folder), "-cf", "-", "."],
                            stdout=subprocess.PIPE)


def digest_of(folder: Path) -> str:
    h, size = hashlib.sha256(), 0
    proc = layer_tar(folder)
    assert proc.stdout is not None
    for chunk in iter(lambda: proc.stdout.read(1 << 22), b""):
        h.update(chunk)
        size += len(chunk)
    if proc.wait() != 0:
        raise SystemExit(f"tar of {folder} failed")
    return f"sha256:{h.hexdigest()}={size}"


class _Checked(io.RawIOBase):
    """Reads a layer stream and checks it is the layer whose digest the manifest names."""

    def __init__(self, stream: BinaryIO, digest: str, folder: Path):
        self.stream, self.digest, self.folder, self.h = stream, digest, folder, hashlib.sha256()

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        data = self.stream.read(n)
        self.h.update(data)
        return data

    def check(self) -> None:
        if "sha256:" + self.h.hexdigest() != self.digest:
            raise SystemExit(f"{self.folder} changed since its digest was taken: rebuild (tools/image/build.sh)")


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_archive(out: BinaryIO, name: str, run_config: dict, layers: list[tuple[Path, str, int]],
                  only: set[Path] | None = None) -> str:
    """Writes the archive to `out`; returns the manifest digest."""
    diff_ids = [digest for _, digest, _ in layers]  # uncompressed layers: digest == diff_id
    config = json.dumps({
        "architecture": "amd64", "os": "linux", "config": run_config,
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }, sort_keys=True).encode()
    config_digest = "sha256:" + hashlib.sha256(config).hexdigest()
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": config_digest, "size": len(config)},
        "layers": [{"mediaType": LAYER_TYPE, "digest": d, "size": size} for _, d, size in layers],
    }, sort_keys=True).encode()
    manifest_digest = "sha256:" + hashlib.sha256(manifest).hexdigest()
    index = json.dumps({
        "schemaVersion": 2,
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                       "digest": manifest_digest, "size": len(manifest),
                       "annotations": {"io.containerd.image.name": name,
                                       "org.opencontainers.image.ref.name": name}}],
    }).encode()
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.GNU_FORMAT) as tar:
        _add_bytes(tar, "oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
        _add_bytes(tar, "index.json", index)
        _add_bytes(tar, f"blobs/sha256/{config_digest[7:]}", config)
        _add_bytes(tar, f"blobs/sha256/{manifest_digest[7:]}", manifest)
        for folder, digest, size in layers:
            if only is not None and folder not in only:
                continue
            proc = layer_tar(folder)
            assert proc.stdout is not None
            checked = _Checked(proc.stdout, digest, folder)
            info = tarfile.TarInfo(f"blobs/sha256/{digest[7:]}")
            info.size = size
            tar.addfile(info, checked)
            if proc.stdout.read(1) or proc.wait() != 0:
                raise SystemExit(f"{folder} changed since its digest was taken: rebuild (tools/image/build.sh)")
            checked.check()
    return manifest_digest


def parse_layer(spec: str) -> tuple[Path, str, int]:
    folder, digest, size = spec.split("=")
    return Path(folder), digest, int(size)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("digest")
    d.add_argument("folder", type=Path)
    w = sub.add_parser("write")
    w.add_argument("out", help="a file, or - for stdout")
    w.add_argument("--name", required=True)
    w.add_argument("--config", type=Path, required=True)
    w.add_argument("--only-blobs-of", type=Path, action="append")
    w.add_argument("layers", nargs="+", help="FOLDER=sha256:HEX=SIZE")
    args = ap.parse_args()
    if args.cmd == "digest":
        print(digest_of(args.folder))
        return
    layers = [parse_layer(s) for s in args.layers]
    only = set(args.only_blobs_of) if args.only_blobs_of else None
    config = json.loads(args.config.read_text())
    if args.out == "-":
        write_archive(sys.stdout.buffer, args.name, config, layers, only)
    else:
        with open(args.out, "wb") as f:
            write_archive(f, args.name, config, layers, only)


if __name__ == "__main__":
    main()
