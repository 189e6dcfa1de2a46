"""What a failed stage run says in status and events: an error class and a short message, never log text.

A stage's log and its exception message can quote a training record (patient text), and status
and events are readable by anyone who can `kubectl get` the job. So only names that code chose
travel there: the stage, the exception class from the stage's `error:` line, and the first clause
of Ray's/KubeRay's own message; the full log stays where access to it is already controlled.
"""

from __future__ import annotations

import re

# jobs/__main__.py prints `error: stage STAGE: ExceptionClass: message`; only the class is kept.
_ERROR_LINE = re.compile(r"^error: stage ([\w-]+): ([A-Za-z_][\w.]*)", re.M)
HEAD_CHARS = 160  # a Ray/KubeRay message's first clause is fixed text; longer means it quotes something


def redacted_failure(ray_message: str, logs: str, full_log: str) -> str:
    """`stage S raised Cls | <first clause of Ray's message> | full log: <where>`."""
    errors = _ERROR_LINE.findall(f"{logs or ''}\n{ray_message or ''}")
    parts = [f"stage {errors[-1][0]} raised {errors[-1][1]}"] if errors else []
    # "Job entrypoint command failed with exit code 1, last available logs (...):\n<logs>" -> its first clause
    head = (ray_message or "").strip().splitlines()[:1]
    head = [h.split(", last available logs")[0].split(": ")[0] for h in head]
    parts += [h if len(h) <= HEAD_CHARS else h[:HEAD_CHARS] + "..." for h in head if h]
    return " | ".join((parts or ["failed without a message"]) + [f"full log: {full_log}"])
