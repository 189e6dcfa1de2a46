"""Dataset references: the one string form that names a dataset everywhere (spec, CLI, tests).

    FORMAT:PATH[#SPLIT]

    pubmedqa:data/ori_pqal.json#test      medqa:phrases_no_exclude_test.jsonl
    medmcqa:dev.json                      mmlu:anatomy_test.csv
    medquad:MedQuAD/                      instruction:chatdoctor5k.json
    jsonl:my.jsonl                        hf:org/name#validation   hf:/local/saved#test
    pubmedqa:@samples/pubmedqa/ori_pqal.json#test   (data shipped inside the package)
    jsonl:pvc://data/medquad.jsonl                  (a file on the PersistentVolumeClaim `data`)

A relative PATH is resolved against `base_dir` (the folder of the spec file that names it) or the
current directory; `@samples/...` is resolved against `meddistill/samples/`, so examples work from
a fresh clone and inside a container image alike; `pvc://CLAIM/PATH` against the claim's mount,
`$MEDDISTILL_PVC_ROOT/CLAIM/PATH` (artifacts.pvc_path; the operator mounts the claim in every pod).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from meddistill.artifacts import PVC_SCHEME, input_path_pattern, parent_segment_problem, pvc_input_problem, pvc_path

DATASET_FORMATS: dict[str, str] = {
    "pubmedqa": "PubMedQA PQA-L ori_pqal.json (splits: test = official 500, train = the other 500)",
    "medqa": "MedQA-USMLE JSON lines (question, options{A..}, answer_idx)",
    "medmcqa": "MedMCQA JSON lines (question, opa..opd, cop 1-based, exp)",
    "mmlu": "MMLU CSV without header (question, 4 options, answer letter)",
    "medquad": "MedQuAD XML file or folder of XML files (QAPair/Question/Answer)",
    "instruction": "Alpaca-style JSON list of {instruction, input, output} (e.g. ChatDoctor)",
    "jsonl": "generic JSON lines, one MedicalRecord per line (see meddistill.data.loaders)",
    "hf": "Hugging Face dataset by hub name or saved local path (needs `datasets`)",
}

# parse_dataset_ref as one regex (RE2 syntax, which Python's re reads alike): the CRD's schema
# carries it, so the API server refuses what the parser refuses. tests/test_data_refs.py keeps the
# two in step. PATH may hold '#': the SPLIT is after the last one. A pvc:// PATH must be well formed.
_NO_SPLIT = r"[^#]*[^\s#][^#]*"  # a non-blank SPLIT
_PATH = input_path_pattern("#")  # the PATH of a reference without SPLIT
_SPLIT = input_path_pattern() + "#"  # the PATH before the last '#', and that '#'


def _formats(names) -> str:
    return "(?i:" + "|".join(names) + r")\s*:"


DATASET_REF_PATTERN = (
    r"^\s*(?:" + _formats(["pubmedqa"]) + f"(?:{_PATH}|{_SPLIT}\\s*(?:test|train)\\s*)"
    + "|" + _formats([f for f in DATASET_FORMATS if f != "pubmedqa"]) + f"(?:{_PATH}|{_SPLIT}{_NO_SPLIT})" + ")$"
)

SAMPLES_PREFIX = "@samples/"
SAMPLES_DIR = Path(__file__).resolve().parent.parent / "samples"


class DatasetRefError(ValueError):
    """A dataset reference string that cannot be parsed; the message names the bad part."""


@dataclass(frozen=True)
class DatasetRef:
    format: str
    path: str
    split: str | None = None

    def __str__(self) -> str:
        return f"{self.format}:{self.path}" + (f"#{self.split}" if self.split else "")

    @property
    def is_hub_name(self) -> bool:
        """An `hf:` reference that names a hub dataset rather than a local folder."""
        return self.format == "hf" and not (
            self.path.startswith(("/", ".", "~", SAMPLES_PREFIX, PVC_SCHEME)) or os.path.exists(self.path)
        )

    def resolve_path(self, base_dir: str | os.PathLike | None = None) -> Path:
        """The local file or folder this reference points at (no existence check)."""
        if self.path.startswith(SAMPLES_PREFIX):
            return SAMPLES_DIR / self.path[len(SAMPLES_PREFIX):]
        if self.path.startswith(PVC_SCHEME):
            return pvc_path(self.path)
        path = Path(self.path).expanduser()
        if path.is_absolute():
            return path
        return Path(base_dir or os.getcwd()) / path


def parse_dataset_ref(text: "str | DatasetRef") -> DatasetRef:
    """Parse `FORMAT:PATH[#SPLIT]`; raise DatasetRefError naming the bad part and the fix."""
    if isinstance(text, DatasetRef):
        return text
    if not isinstance(text, str) or not text.strip():
        raise DatasetRefError(
            f"dataset reference {text!r} is empty; expected FORMAT:PATH[#SPLIT] with FORMAT one of "
            f"{', '.join(DATASET_FORMATS)}"
        )
    text = text.strip()
    fmt, sep, rest = text.partition(":")
    if not sep:
        raise DatasetRefError(
            f"dataset reference {text!r} has no format prefix; write FORMAT:PATH[#SPLIT], e.g. "
            f"'pubmedqa:{text}', with FORMAT one of {', '.join(DATASET_FORMATS)}"
        )
    fmt = fmt.strip().lower()
    if fmt not in DATASET_FORMATS:
        raise DatasetRefError(
            f"dataset reference {text!r}: format {fmt!r} is unknown; allowed formats: "
            f"{', '.join(DATASET_FORMATS)}"
        )
    path, hash_sep, split = rest.rpartition("#") if "#" in rest else (rest, "", "")
    path, split = path.strip(), split.strip()
    if not path:
        raise DatasetRefError(f"dataset reference {text!r}: the PATH after '{fmt}:' is empty")
    if problem := parent_segment_problem(text):
        raise DatasetRefError(f"dataset reference: {problem}")
    if path.startswith(PVC_SCHEME) and (problem := pvc_input_problem(path)):
        raise DatasetRefError(f"dataset reference {text!r}: {problem}")
    if hash_sep and not split:
        raise DatasetRefError(f"dataset reference {text!r}: the SPLIT after '#' is empty; drop the '#'")
    if fmt == "pubmedqa" and split and split not in ("test", "train"):
        raise DatasetRefError(
            f"dataset reference {text!r}: PubMedQA split {split!r} is unknown; use #test (the official "
            f"500), #train (the other 500) or no split (all 1,000)"
        )
    return DatasetRef(format=fmt, path=path, split=split or None)
