"""Dataset references: FORMAT:PATH[#SPLIT] parsing, errors and path resolution."""
from pathlib import Path

import pytest

from meddistill.data.refs import DATASET_FORMATS, SAMPLES_DIR, DatasetRef, DatasetRefError, parse_dataset_ref


@pytest.mark.parametrize(
    "text, expected",
    [
        ("pubmedqa:data/ori_pqal.json#test", DatasetRef("pubmedqa", "data/ori_pqal.json", "test")),
        ("medqa:phrases_no_exclude_test.jsonl", DatasetRef("medqa", "phrases_no_exclude_test.jsonl", None)),
        ("MMLU:anatomy_test.csv", DatasetRef("mmlu", "anatomy_test.csv", None)),
        ("hf:bigbio/med_qa#validation", DatasetRef("hf", "bigbio/med_qa", "validation")),
        ("hf:/local/saved#test", DatasetRef("hf", "/local/saved", "test")),
        ("jsonl:C:my.jsonl", DatasetRef("jsonl", "C:my.jsonl", None)),
        ("  medquad:@samples/medquad  ", DatasetRef("medquad", "@samples/medquad", None)),
    ],
)
def test_parse_valid(text, expected):
    ref = parse_dataset_ref(text)
    assert ref == expected
    assert parse_dataset_ref(str(ref)) == ref  # round trip


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("ori_pqal.json", "no format prefix"),
        ("csvfile:x.csv", "format 'csvfile' is unknown"),
        ("pubmedqa:", "PATH after 'pubmedqa:' is empty"),
        ("pubmedqa:x.json#", "SPLIT after '#' is empty"),
        ("pubmedqa:x.json#dev", "PubMedQA split 'dev' is unknown"),
        ("", "empty"),
    ],
)
def test_parse_errors_name_the_bad_part(text, fragment):
    with pytest.raises(DatasetRefError) as err:
        parse_dataset_ref(text)
    assert fragment in str(err.value)
    if "format" in fragment:
        assert all(fmt in str(err.value) for fmt in DATASET_FORMATS)


def test_resolve_relative_samples_and_absolute(tmp_path):
    assert parse_dataset_ref("jsonl:a/b.jsonl").resolve_path(tmp_path) == tmp_path / "a/b.jsonl"
    assert parse_dataset_ref("jsonl:a.jsonl").resolve_path() == Path.cwd() / "a.jsonl"
    assert parse_dataset_ref("jsonl:/abs/a.jsonl").resolve_path(tmp_path) == Path("/abs/a.jsonl")
    samples = parse_dataset_ref("pubmedqa:@samples/pubmedqa/ori_pqal.json").resolve_path(tmp_path)
    assert samples == SAMPLES_DIR / "pubmedqa/ori_pqal.json" and samples.is_file()


def test_hub_name_detection(tmp_path):
    assert parse_dataset_ref("hf:org/name#test").is_hub_name
    assert not parse_dataset_ref(f"hf:{tmp_path}#test").is_hub_name


def _parses(text: str) -> bool:
    try:
        parse_dataset_ref(text)
    except DatasetRefError:
        return False
    return True


def test_the_crd_pattern_accepts_exactly_what_the_parser_accepts():
    """DATASET_REF_PATTERN goes into the CRD: the API server must refuse what `validate` refuses, no more."""
    import random
    import re

    from meddistill.data.refs import DATASET_REF_PATTERN

    pieces = ["pubmedqa", "PubMedQA", "hf", "mmlu", "pubmed", ":", ":", "#", "#", " ", "x", "a/b.json", "test",
              "train", "dev", "@samples/"]
    rng = random.Random(0)
    samples = ["just/a/path.json", "x.json#", "pubmedqa:x.json#", "pubmedqa:", "pubmedqa:x#dev", "hf:a#b#c",
               "jsonl:##test", " medquad : MedQuAD/ ", "pubmedqa: x # test "]
    samples += [rng.choice(["", "pubmedqa:", "hf:", " MMLU :"]) + "".join(rng.choice(pieces) for _ in range(rng.randint(1, 6)))
                for _ in range(4000)]
    disagree = [s for s in samples if _parses(s) != bool(re.fullmatch(DATASET_REF_PATTERN, s))]
    assert disagree == []
    assert sum(map(_parses, samples)) > 1000  # both outcomes are well represented
