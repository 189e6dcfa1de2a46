"""Decontamination: exact normalized-question matches and 13-gram overlaps are removed and reported."""
from meddistill.data import MedicalRecord, decontaminate, load_dataset
from meddistill.data.decontaminate import normalize_text


def _open(id_, question, context=None):
    return MedicalRecord(id_, question, None, context, "answer", "open", "t")


def test_exact_and_ngram_matches_are_removed_with_reasons():
    eval_set = load_dataset("medqa:@samples/medqa/phrases_no_exclude_test.sample200.jsonl", limit=20).records
    target = eval_set[3]
    words = normalize_text(target.question).split()
    train = [
        _open("copy", target.question.upper().replace(".", " . ")),  # same text, other case/punctuation
        _open("excerpt", "Background: " + " ".join(words[5:5 + 15]) + " and so on"),  # shares a 13-gram
        _open("short", " ".join(words[5:5 + 12])),  # only 12 words in common: kept
        _open("clean", "What are the symptoms of tetanus?"),
    ]
    report = decontaminate(train, [eval_set])
    assert [r.id for r in report.kept] == ["short", "clean"]
    removed = {train_id: (eval_id, reason) for train_id, eval_id, reason in report.removed}
    assert removed["copy"] == (target.id, "exact question match")
    assert removed["excerpt"][0] == target.id and removed["excerpt"][1].startswith("13-gram overlap: '")
    assert report.to_dict()["kept"] == 2


def test_context_overlap_counts_and_several_eval_sets():
    pqa = load_dataset("pubmedqa:@samples/pubmedqa/ori_pqal.json#test", limit=5).records
    leak = _open("leak", "Unrelated question?", context=pqa[2].context)
    report = decontaminate([leak, _open("ok", "Unrelated question?")], [[], pqa])
    assert [r.id for r in report.kept] == ["ok"] and report.removed[0][:2] == ("leak", pqa[2].id)


def test_pubmedqa_official_splits_do_not_overlap():
    train = load_dataset("pubmedqa:@samples/pubmedqa/ori_pqal.json#train").records
    test = load_dataset("pubmedqa:@samples/pubmedqa/ori_pqal.json#test").records
    report = decontaminate(train, [test])
    assert len(report.kept) + len(report.removed) == 500
    assert len(report.removed) < 10  # distinct abstracts; any hit is reported, not hidden
