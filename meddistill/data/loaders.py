"""Load any supported medical QA dataset into `MedicalRecord`s.

    load_dataset("pubmedqa:@samples/pubmedqa/ori_pqal.json#test")

One function per source format turns the file into records. A malformed record raises
`DataFormatError("file:line: reason")` (JSON arrays/dicts name the element index/key, XML the
QAPair index) unless `lenient=True`, where it lands in `LoadedDataset.skipped` with its reason:
never silently dropped. A file that cannot be parsed at all always raises.

The generic `jsonl` format is one JSON object per line with the MedicalRecord fields:
    {"question": "...", "options": {"A": "...", ...} | null, "context": "..." | null,
     "answer": "B" | "yes" | "free text" | null, "question_type": "multiple_choice" | ... (optional,
     detected when absent), "id": "..." (optional), "source": "..." (optional),
     "reasoning": "..." (optional), "meta": {...} (optional)}
"""
from __future__ import annotations

import csv
import json
import os
import re
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from meddistill.artifacts import PVC_SCHEME, pvc_not_found
from meddistill.data.records import OPTION_LETTERS, QUESTION_TYPES, YES_NO_MAYBE, MedicalRecord
from meddistill.data.refs import DatasetRef, parse_dataset_ref
from meddistill.prompts.detect import detect_question_type


class DataFormatError(ValueError):
    """A record (or whole file) that does not match its declared format: "file:line: reason"."""


@dataclass(frozen=True)
class SkippedRecord:
    location: str  # "file:line", "file:[index]", "file:key" or "file:QAPair[i]"
    reason: str


@dataclass
class LoadedDataset:
    records: list[MedicalRecord]
    skipped: list[SkippedRecord]
    ref: DatasetRef

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[MedicalRecord]:
        return iter(self.records)

    def question_type_counts(self) -> dict[str, int]:
        counts = Counter(r.question_type for r in self.records)
        return {t: counts[t] for t in QUESTION_TYPES if counts[t]}


class _Malformed(Exception):
    """Raised inside a per-record parser; turned into DataFormatError or a SkippedRecord."""


@dataclass
class _Sink:
    """Collects records, applying lenient/strict handling and the limit in one place."""

    lenient: bool
    limit: int | None
    records: list[MedicalRecord] = field(default_factory=list)
    skipped: list[SkippedRecord] = field(default_factory=list)

    @property
    def full(self) -> bool:
        return self.limit is not None and len(self.records) >= self.limit

    def add(self, location: str, build: Callable[[], MedicalRecord | None]) -> None:
        try:
            record = build()
        except (_Malformed, KeyError, TypeError, ValueError, AttributeError) as err:
            reason = str(err) if isinstance(err, _Malformed) else _describe(err)
            self.fail(location, reason)
            return
        if record is not None:
            self.records.append(record)

    def fail(self, location: str, reason: str) -> None:
        if not self.lenient:
            raise DataFormatError(f"{location}: {reason}")
        self.skipped.append(SkippedRecord(location, reason))


def _describe(err: Exception) -> str:
    if isinstance(err, KeyError):
        return f"missing field {err.args[0]!r}"
    return f"{type(err).__name__}: {err}"


def load_dataset(
    ref: "str | DatasetRef",
    *,
    lenient: bool = False,
    base_dir: "str | os.PathLike | None" = None,
    limit: int | None = None,
) -> LoadedDataset:
    """Load a dataset reference (`FORMAT:PATH[#SPLIT]`) into normalized records."""
    ref = parse_dataset_ref(ref)
    sink = _Sink(lenient=lenient, limit=limit)
    if ref.path.startswith(PVC_SCHEME) and not ref.resolve_path().exists():  # hf: too: a saved dataset
        raise FileNotFoundError(pvc_not_found(f"dataset {ref}", ref.path))
    if ref.format == "hf":
        _load_hf(ref, sink, base_dir)
    else:
        path = ref.resolve_path(base_dir)
        if not path.exists():
            raise FileNotFoundError(
                f"dataset {ref}: {path} does not exist (relative paths resolve against "
                f"{'base_dir ' + str(base_dir) if base_dir else 'the current directory'}; "
                f"'@samples/' against the data shipped in meddistill/samples)"
            )
        if ref.split and ref.format not in ("pubmedqa",):
            raise DataFormatError(
                f"dataset {ref}: format {ref.format!r} has no named splits; name the split's own "
                f"file instead and drop '#{ref.split}'"
            )
        _LOADERS[ref.format](path, ref, sink)
    return LoadedDataset(records=sink.records, skipped=sink.skipped, ref=ref)


# --- PubMedQA -------------------------------------------------------------------------------

def _load_pubmedqa(path: Path, ref: DatasetRef, sink: _Sink) -> None:
    data = _read_json(path)
    if not isinstance(data, dict):
        raise DataFormatError(f"{path}: expected a JSON object keyed by PMID (PQA-L ori_pqal.json)")
    keys = list(data)
    if ref.split:
        truth_path = path.with_name("test_ground_truth.json")
        if not truth_path.exists():
            raise DataFormatError(
                f"dataset {ref}: split {ref.split!r} needs the official test_ground_truth.json next "
                f"to {path.name} ({truth_path} is missing)"
            )
        test_ids = set(_read_json(truth_path))
        keys = [k for k in keys if (k in test_ids) == (ref.split == "test")]
    for pmid in keys:
        if sink.full:
            break
        sink.add(f"{path}:{pmid}", lambda pmid=pmid: _pubmedqa_record(pmid, data[pmid], ref.split))


def _pubmedqa_record(pmid: str, item: Any, split: str | None) -> MedicalRecord:
    if not isinstance(item, dict):
        raise _Malformed(f"expected an object, got {type(item).__name__}")
    question = _required_text(item, "QUESTION")
    contexts = item.get("CONTEXTS")
    if not isinstance(contexts, list) or not contexts or not all(isinstance(c, str) for c in contexts):
        raise _Malformed("CONTEXTS must be a non-empty list of strings")
    labels = item.get("LABELS") or []
    if isinstance(labels, list) and len(labels) == len(contexts):
        context = "\n".join(f"{lab}: {c.strip()}" for lab, c in zip(labels, contexts))
    else:
        context = "\n".join(c.strip() for c in contexts)
    decision = item.get("final_decision")
    if decision not in YES_NO_MAYBE:
        raise _Malformed(f"final_decision={decision!r} is not one of yes/no/maybe")
    meta = {k: item[k] for k in ("YEAR", "MESHES", "reasoning_required_pred", "reasoning_free_pred") if k in item}
    if split:
        meta["split"] = split
    return MedicalRecord(
        id=str(pmid), question=question, options=None, context=context, answer=decision,
        question_type="yes_no_maybe", source="pubmedqa",
        reasoning=(item.get("LONG_ANSWER") or None), meta=meta,
    )


# --- MedQA-USMLE ----------------------------------------------------------------------------

def _load_medqa(path: Path, ref: DatasetRef, sink: _Sink) -> None:
    for lineno, obj in _json_lines(path, sink):
        sink.add(f"{path}:{lineno}", lambda: _medqa_record(obj, path, lineno))


def _medqa_record(obj: Any, path: Path, lineno: int) -> MedicalRecord:
    _require_object(obj)
    question = _required_text(obj, "question")
    options = _letter_options(obj.get("options"), "options")
    answer = obj.get("answer_idx")
    if answer not in options:
        raise _Malformed(f"answer_idx={answer!r} is not one of the option letters {sorted(options)}")
    meta = {k: obj[k] for k in ("meta_info",) if k in obj}
    return MedicalRecord(
        id=str(obj.get("id") or f"medqa-{path.stem}-{lineno}"), question=question, options=options,
        context=None, answer=answer, question_type="multiple_choice", source="medqa", meta=meta,
    )


# --- MedMCQA --------------------------------------------------------------------------------

_MEDMCQA_KEYS = ("opa", "opb", "opc", "opd")


def _load_medmcqa(path: Path, ref: DatasetRef, sink: _Sink) -> None:
    for lineno, obj in _json_lines(path, sink):
        sink.add(f"{path}:{lineno}", lambda: _medmcqa_record(obj, path, lineno))


def _medmcqa_record(obj: Any, path: Path, lineno: int) -> MedicalRecord:
    _require_object(obj)
    question = _required_text(obj, "question")
    options = {letter: _required_text(obj, key) for letter, key in zip(OPTION_LETTERS, _MEDMCQA_KEYS)}
    cop = obj.get("cop")
    if cop in (None, -1, ""):  # the public test split ships without answers
        answer = None
    elif isinstance(cop, int) and not isinstance(cop, bool) and 1 <= cop <= 4:
        answer = OPTION_LETTERS[cop - 1]
    else:
        raise _Malformed(f"cop={cop!r} must be 1..4 (1-based index of the correct option)")
    meta = {k: obj[k] for k in ("subject_name", "topic_name", "choice_type") if obj.get(k) is not None}
    return MedicalRecord(
        id=str(obj.get("id") or f"medmcqa-{path.stem}-{lineno}"), question=question, options=options,
        context=None, answer=answer, question_type="multiple_choice", source="medmcqa",
        reasoning=(obj.get("exp") or None), meta=meta,
    )


# --- MMLU -----------------------------------------------------------------------------------

def _load_mmlu(path: Path, ref: DatasetRef, sink: _Sink) -> None:
    subject = re.sub(r"_(test|dev|val)$", "", path.stem)
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        start = 1
        while not sink.full:
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error as err:
                raise DataFormatError(f"{path}:{reader.line_num}: invalid CSV: {err}") from err
            lineno, start = start, reader.line_num + 1
            if not row or all(not c.strip() for c in row):
                continue
            sink.add(f"{path}:{lineno}", lambda: _mmlu_record(row, path, lineno, subject))


def _mmlu_record(row: list[str], path: Path, lineno: int, subject: str) -> MedicalRecord:
    if len(row) != 6:
        raise _Malformed(f"expected 6 columns (question, A, B, C, D, answer), got {len(row)}")
    question, *texts, answer = (c.strip() for c in row)
    if not question:
        raise _Malformed("empty question")
    if any(not t for t in texts):
        raise _Malformed("empty option text")
    if answer not in ("A", "B", "C", "D"):
        raise _Malformed(f"answer={answer!r} must be one of A, B, C, D")
    return MedicalRecord(
        id=f"mmlu-{path.stem}-{lineno}", question=question, options=dict(zip("ABCD", texts)),
        context=None, answer=answer, question_type="multiple_choice", source="mmlu",
        meta={"subject": subject},
    )


# --- MedQuAD --------------------------------------------------------------------------------

def _load_medquad(path: Path, ref: DatasetRef, sink: _Sink) -> None:
    files = sorted(path.rglob("*.xml")) if path.is_dir() else [path]
    if not files:
        raise DataFormatError(f"dataset {ref}: no .xml files under {path}")
    for xml_path in files:
        if sink.full:
            break
        try:
            root = ET.parse(xml_path).getroot()
        except ET.ParseError as err:
            line = err.position[0] if getattr(err, "position", None) else "?"
            sink.fail(f"{xml_path}:{line}", f"invalid XML: {err}")
            continue
        doc = {"document_id": root.get("id") or root.get("docid") or root.get("fid"),
               "document_source": root.get("source") or root.get("corpus"),
               "url": root.get("url"), "focus": _clean_text(_text(_child(root, "Focus", "doctitle-focus")))}
        # Most files are <Document><QAPairs><QAPair><Question/><Answer/>; a few upstream files use
        # <doc><qaPairs><pair><question/><answer/> or a <DiseaseFile> root: same structure.
        container = _child(root, "QAPairs")
        if container is None:
            sink.fail(f"{xml_path}:1", f"no <QAPairs> element under <{root.tag}>: not a MedQuAD document")
            continue
        # An empty <QAPairs/> is real upstream (10 NIDDK documents): a document with no records.
        pairs = [el for el in container if el.tag.lower() in ("qapair", "pair")]
        for i, pair in enumerate(pairs):
            if sink.full:
                break
            sink.add(f"{xml_path}:QAPair[{i}]", lambda pair=pair, i=i: _medquad_record(pair, doc, xml_path, i))


def _child(el: ET.Element, *names: str) -> ET.Element | None:
    """The first child whose tag matches one of `names`, ignoring case."""
    wanted = {n.lower() for n in names}
    return next((c for c in el if c.tag.lower() in wanted), None)


def _medquad_record(pair: ET.Element, doc: dict, xml_path: Path, index: int) -> MedicalRecord:
    q = _child(pair, "Question")
    question = _clean_text(_text(q))
    answer = _clean_text(_text(_child(pair, "Answer")))
    if not question:
        raise _Malformed("empty or missing <Question>")
    if not answer:
        raise _Malformed("empty or missing <Answer>")
    qid = (q.get("qid") if q is not None else None) or f"{doc['document_id'] or xml_path.stem}-{index + 1}"
    meta = {k: v for k, v in doc.items() if v}
    if q is not None and q.get("qtype"):
        meta["qtype"] = q.get("qtype")
    return MedicalRecord(
        id=f"medquad-{doc['document_source'] or 'x'}-{qid}", question=question, options=None, context=None,
        answer=answer, question_type=detect_question_type(question), source="medquad", meta=meta,
    )


# --- Instruction (Alpaca / ChatDoctor) ------------------------------------------------------

def _load_instruction(path: Path, ref: DatasetRef, sink: _Sink) -> None:
    if _first_char(path) == "[":
        data = _read_json(path)
        items = ((f"{path}:[{i}]", i, obj) for i, obj in enumerate(data))
    else:
        items = ((f"{path}:{n}", n, obj) for n, obj in _json_lines(path, sink))
    for location, index, obj in items:
        if sink.full:
            break
        sink.add(location, lambda: _instruction_record(obj, path, index))


def _instruction_record(obj: Any, path: Path, index: int) -> MedicalRecord:
    _require_object(obj)
    instruction = (obj.get("instruction") or "").strip()
    patient = (obj.get("input") or "").strip()
    output = _required_text(obj, "output")
    if not instruction and not patient:
        raise _Malformed("both instruction and input are empty")
    # Alpaca puts the task in `instruction` and its material in `input`; ChatDoctor puts a fixed
    # "If you are a doctor..." line in `instruction` and the patient's message in `input`. Either
    # way the user's question is `input` when present; the instruction is kept in meta.
    question = patient or instruction
    meta = {"instruction": instruction} if patient and instruction else {}
    return MedicalRecord(
        id=str(obj.get("id") or f"{path.stem}-{index}"), question=question, options=None, context=None,
        answer=output, question_type=detect_question_type(question), source="instruction", meta=meta,
    )


# --- Generic JSONL --------------------------------------------------------------------------

def _load_jsonl(path: Path, ref: DatasetRef, sink: _Sink) -> None:
    for lineno, obj in _json_lines(path, sink):
        sink.add(f"{path}:{lineno}", lambda: _generic_record(obj, f"{path.stem}-{lineno}", "jsonl"))


def _generic_record(obj: Any, default_id: str, default_source: str) -> MedicalRecord:
    _require_object(obj)
    question = _required_text(obj, "question")
    options = _letter_options(obj["options"], "options") if obj.get("options") else None
    context = obj.get("context") or None
    if context is not None and not isinstance(context, str):
        raise _Malformed(f"context must be a string, got {type(context).__name__}")
    qtype = obj.get("question_type") or detect_question_type(question, options, context)
    if qtype not in QUESTION_TYPES:
        raise _Malformed(f"question_type={qtype!r} is not one of {QUESTION_TYPES}")
    answer = obj.get("answer")
    answer = None if answer is None else str(answer).strip()
    answer = _check_answer(answer, qtype, options)
    return MedicalRecord(
        id=str(obj.get("id") or default_id), question=question, options=options, context=context,
        answer=answer, question_type=qtype, source=str(obj.get("source") or default_source),
        reasoning=obj.get("reasoning") or None, meta=dict(obj.get("meta") or {}),
    )


def _check_answer(answer: str | None, qtype: str, options: dict[str, str] | None) -> str | None:
    if answer is None or answer == "":
        return None
    if qtype == "multiple_choice":
        if not options:
            raise _Malformed("question_type multiple_choice needs options")
        if answer.upper() in options:
            return answer.upper()
        by_text = [k for k, v in options.items() if v.strip().lower() == answer.lower()]
        if len(by_text) == 1:
            return by_text[0]
        raise _Malformed(f"answer={answer!r} is neither an option letter {sorted(options)} nor an option's text")
    if qtype == "yes_no_maybe":
        if answer.lower() not in YES_NO_MAYBE:
            raise _Malformed(f"answer={answer!r} must be yes, no or maybe for yes_no_maybe")
        return answer.lower()
    return answer


# --- Hugging Face datasets ------------------------------------------------------------------

def _load_hf(ref: DatasetRef, sink: _Sink, base_dir: "str | os.PathLike | None") -> None:
    try:
        import datasets  # noqa: PLC0415 - optional dependency
    except ImportError as err:
        raise DataFormatError(
            f"dataset {ref}: the 'hf:' format needs the `datasets` package; pip install datasets "
            f"(or convert the data to jsonl: see meddistill.data.loaders)"
        ) from err
    try:
        if ref.is_hub_name:
            if os.environ.get("MEDDISTILL_ALLOW_HUB") != "1" and os.environ.get("HF_DATASETS_OFFLINE") is None:
                os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
            ds = datasets.load_dataset(ref.path, split=ref.split)
        else:
            local = ref.resolve_path(base_dir)
            saved = any((local / n).exists() for n in ("dataset_dict.json", "state.json", "dataset_info.json"))
            ds = datasets.load_from_disk(str(local)) if saved else datasets.load_dataset(str(local), split=ref.split)
            if saved and ref.split:
                ds = ds[ref.split]
    except Exception as err:  # noqa: BLE001 - datasets raises many types; we add what to do
        raise DataFormatError(
            f"dataset {ref}: could not load with `datasets` ({type(err).__name__}: {err}). Hub names need "
            f"network access and MEDDISTILL_ALLOW_HUB=1; otherwise save the dataset with "
            f"`save_to_disk` and name the folder: hf:/path/to/saved#split"
        ) from err
    if isinstance(ds, datasets.DatasetDict):
        raise DataFormatError(f"dataset {ref}: has splits {list(ds)}; name one with '#SPLIT'")
    for i, row in enumerate(ds):
        if sink.full:
            break
        sink.add(f"{ref}:[{i}]", lambda row=row, i=i: _hf_record(dict(row), f"hf-{i}"))


def _hf_record(row: dict[str, Any], default_id: str) -> MedicalRecord:
    """Map the common column layouts (MedQA, MedMCQA, MMLU, PubMedQA, Alpaca) to a record."""
    question = next((row[k] for k in ("question", "QUESTION", "query", "instruction", "input", "prompt")
                     if isinstance(row.get(k), str) and row[k].strip()), None)
    if question is None:
        raise _Malformed(f"no question column among {sorted(row)}")
    options: dict[str, str] | None = None
    answer: Any = None
    if isinstance(row.get("options"), dict):
        options = row["options"]
    elif isinstance(row.get("options"), list):
        options = _options_from_list(row["options"])
    elif all(k in row for k in _MEDMCQA_KEYS):
        options = {letter: row[k] for letter, k in zip(OPTION_LETTERS, _MEDMCQA_KEYS)}
        if isinstance(row.get("cop"), int) and row["cop"] >= 0:
            answer = OPTION_LETTERS[row["cop"]]  # HF's medmcqa stores cop 0-based
    elif isinstance(row.get("choices"), list):  # MMLU (cais/mmlu): answer is a 0-based index
        options = _options_from_list(row["choices"])
    if answer is None:
        for key in ("answer_idx", "final_decision", "answer", "label", "output", "response"):
            if row.get(key) not in (None, ""):
                answer = row[key]
                break
    if options is not None and isinstance(answer, int) and not isinstance(answer, bool):
        answer = OPTION_LETTERS[answer]
    context = row.get("context") or row.get("CONTEXTS")
    if isinstance(context, dict):  # pubmed_qa: {"contexts": [...], "labels": [...]}
        context = context.get("contexts")
    if isinstance(context, list):
        context = "\n".join(str(c) for c in context)
    if question == row.get("instruction") and isinstance(row.get("input"), str) and row["input"].strip():
        question = row["input"]
    obj = {"question": question, "options": options, "context": context or None,
           "answer": answer, "id": row.get("id") or row.get("pubid") or default_id,
           "reasoning": row.get("exp") or row.get("long_answer") or None}
    if options is None and str(answer).lower() in YES_NO_MAYBE and context:
        obj["question_type"] = "yes_no_maybe"
    return _generic_record(obj, default_id, "hf")


def _options_from_list(values: list) -> dict[str, str]:
    if len(values) > len(OPTION_LETTERS):
        raise _Malformed(f"{len(values)} options; at most {len(OPTION_LETTERS)} are supported")
    return {letter: str(v) for letter, v in zip(OPTION_LETTERS, values)}


# --- shared helpers -------------------------------------------------------------------------

def _read_json(path: Path) -> Any:
    try:
        with path.open(encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise DataFormatError(f"{path}:{err.lineno}: invalid JSON: {err.msg} (column {err.colno})") from err


def _json_lines(path: Path, sink: _Sink) -> Iterator[tuple[int, Any]]:
    """(line number, parsed object) for each non-blank line; bad JSON goes through the sink."""
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if sink.full:
                return
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                sink.fail(f"{path}:{lineno}", f"invalid JSON: {err.msg} (column {err.colno})")
                continue
            yield lineno, obj


def _first_char(path: Path) -> str:
    with path.open(encoding="utf-8") as f:
        while True:
            chunk = f.read(64)
            if not chunk:
                return ""
            stripped = chunk.lstrip()
            if stripped:
                return stripped[0]


def _require_object(obj: Any) -> None:
    if not isinstance(obj, dict):
        raise _Malformed(f"expected a JSON object, got {type(obj).__name__}")


def _required_text(obj: dict, key: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or not value.strip():
        raise _Malformed(f"field {key!r} is missing or empty" if value in (None, "") else
                         f"field {key!r} must be a string, got {type(value).__name__}")
    return value.strip()


def _letter_options(value: Any, name: str) -> dict[str, str]:
    if not isinstance(value, dict) or not value:
        raise _Malformed(f"{name} must be a non-empty object of letter -> text")
    bad = [k for k in value if k not in OPTION_LETTERS]
    if bad:
        raise _Malformed(f"{name} keys {bad} are not letters A-E")
    if any(not isinstance(v, str) or not v.strip() for v in value.values()):
        raise _Malformed(f"{name} has an empty or non-string option text")
    if len(value) < 2:
        raise _Malformed(f"{name} needs at least 2 options")
    return {k: value[k].strip() for k in sorted(value)}


def _text(el: ET.Element | None) -> str:
    return "".join(el.itertext()) if el is not None else ""


def _clean_text(text: str) -> str:
    """Strip each line and collapse runs of blank lines (MedQuAD answers are heavily indented)."""
    lines = [ln.strip() for ln in text.replace("\r", "").split("\n")]
    out: list[str] = []
    for ln in lines:
        if ln or (out and out[-1]):
            out.append(ln)
    return "\n".join(out).strip()


_LOADERS: dict[str, Callable[[Path, DatasetRef, _Sink], None]] = {
    "pubmedqa": _load_pubmedqa,
    "medqa": _load_medqa,
    "medmcqa": _load_medmcqa,
    "mmlu": _load_mmlu,
    "medquad": _load_medquad,
    "instruction": _load_instruction,
    "jsonl": _load_jsonl,
}
