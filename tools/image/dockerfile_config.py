"""Print the run config (OCI image config: Env, User, WorkingDir, Entrypoint, Cmd) that the
Dockerfile's last stage declares, so the local image build (tools/image/build.sh) runs its image
exactly as `docker build` would: one source of truth for how the image starts.

    python tools/image/dockerfile_config.py Dockerfile
"""
from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def logical_lines(text: str) -> list[str]:
    out, cur = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not cur and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            cur += line[:-1] + " "
            continue
        out.append(cur + line)
        cur = ""
    return out


def last_stage_config(text: str) -> dict:
    lines = logical_lines(text)
    start = max(i for i, line in enumerate(lines) if line.split()[0].upper() == "FROM")
    env: dict[str, str] = {"PATH": DEFAULT_PATH}
    config: dict = {}
    for line in lines[start + 1:]:
        word, _, rest = line.partition(" ")
        word, rest = word.upper(), rest.strip()
        if word == "ENV":
            for pair in shlex.split(rest):
                key, sep, value = pair.partition("=")
                if not sep:
                    raise SystemExit(f"Dockerfile: use ENV KEY=VALUE (got {line!r})")
                env[key] = value.replace("$PATH", env["PATH"]).replace("${PATH}", env["PATH"])
        elif word == "USER":
            config["User"] = rest
        elif word == "WORKDIR":
            config["WorkingDir"] = rest
        elif word in ("ENTRYPOINT", "CMD"):
            value = json.loads(rest)  # exec form only: no shell in between
            config["Entrypoint" if word == "ENTRYPOINT" else "Cmd"] = value
    config["Env"] = [f"{k}={v}" for k, v in env.items()]
    return config


if __name__ == "__main__":
    print(json.dumps(last_stage_config(Path(sys.argv[1]).read_text()), indent=2, sort_keys=True))
