"""The evaluation gate: does the quantized student's evaluation earn it a place in front of users?

Pure and torch-free: `judge(gate, results, evaluation, annotations)` reads the results table the
evaluate stage wrote (jobs/results_table.py) and returns a `Verdict`: each check with its number
against its threshold in plain words, and whether the job may serve. The operator's planner calls
it after evaluation; the evaluate stage calls it too, so the model card states the verdict (the
card cannot see an override annotation: the operator's status records that). Here, not in operator/,
because a stage never reaches into the operator.

Checks (serving.gate):
  minAccuracy       the quantized student's accuracy on one evaluation set >= its floor
  minRetentionPct   lower bound of the 95% paired-bootstrap interval of quantized / 16-bit student
                    accuracy (all datasets pooled, generative) >= the floor
  notWorseThanBase  per evaluation set: not significantly worse than the base model on the same
                    questions (McNemar exact, two-sided p < 0.05 with a negative difference)
A number that was not measured fails its check: a gate never passes on missing evidence.

Override: the annotation `meddistill.io/gate-override: "NAME: REASON"` serves a failing model and
records who and why; a malformed one is ignored and the verdict says so.
"""
from __future__ import annotations

from dataclasses import dataclass

from meddistill.spec.models import Evaluation, EvaluationGate, GateCheck, GateStatus, Results, ResultRow

OVERRIDE_ANNOTATION = "meddistill.io/gate-override"
ALPHA = 0.05  # the significance level of the results table's verdicts (meddistill/evaluation/stats.py ALPHA)
CONDITION = "EvaluationGate"


@dataclass(frozen=True)
class Verdict:
    status: GateStatus
    override_problem: str = ""  # why an override annotation was ignored ("" when there was none or it was valid)

    @property
    def serve(self) -> bool:
        return self.status.passed or bool(self.status.overridden_by)

    @property
    def failed_checks(self) -> list[GateCheck]:
        return [c for c in self.status.checks if not c.passed]

    def summary(self) -> str:
        """One line for a condition, an event and the model card."""
        failed = self.failed_checks
        if not failed:
            text = f"passed: {'; '.join(c.message for c in self.status.checks) or 'no checks configured'}"
        elif self.status.overridden_by:
            text = (f"overridden by {self.status.overridden_by} ({self.status.override_reason}); failed: "
                    + "; ".join(c.message for c in failed))
        else:
            text = (f"failed: {'; '.join(c.message for c in failed)}. To serve it anyway, annotate the job "
                    f'{OVERRIDE_ANNOTATION}="NAME: REASON"')
        return text + (f". {self.override_problem}" if self.override_problem else "")

    def condition(self) -> tuple[str, str, str]:
        """(status, reason, message) of the EvaluationGate condition."""
        if self.status.passed:
            return "True", "Passed", self.summary()
        if self.status.overridden_by:
            return "True", "Overridden", self.summary()
        return "False", "Failed", self.summary()


def parse_override(annotations: dict | None) -> tuple[str, str, str]:
    """(name, reason, problem) from the override annotation; problem explains a malformed one."""
    value = (annotations or {}).get(OVERRIDE_ANNOTATION)
    if value is None:
        return "", "", ""
    name, sep, reason = str(value).partition(":")
    if not sep or not name.strip() or not reason.strip():
        return "", "", (f"The annotation {OVERRIDE_ANNOTATION}={str(value)[:200]!r} is ignored: write it as "
                         f'"NAME: REASON", e.g. "Dr Jane Roe: reviewed the failed PubMedQA answers"')
    return name.strip()[:200], reason.strip()[:500], ""


def _label(ref: str, scoring: str) -> str:
    # The evaluate stage labels loglik rows "<ref> [loglik]" so comparisons pair like with like.
    return ref if scoring == "generative" else f"{ref} [loglik]"


def _quantized_row(results: Results, ref: str, scoring: str) -> ResultRow | None:
    return next((r for r in results.rows if r.model == "quantized" and r.scoring == scoring
                 and r.dataset == _label(ref, scoring)), None)


def min_accuracy_check(results: Results, ref: str, floor: float, scoring: str) -> GateCheck:
    row = _quantized_row(results, ref, scoring)
    if row is None or not row.n:
        why = "no quantized row" if row is None else "no closed questions scored"
        return GateCheck(name="minAccuracy", dataset=ref, threshold=floor, passed=False,
                         message=f"{ref} accuracy ({scoring}) not measured ({why}), needs >= {floor:.2f}")
    ok = row.accuracy >= floor
    return GateCheck(name="minAccuracy", dataset=ref, value=row.accuracy, threshold=floor, passed=ok,
                     message=f"{ref} accuracy {row.accuracy:.2f} {'>=' if ok else '<'} {floor:.2f} "
                             f"({scoring}, n={row.n}, 95% CI {row.ci_low:.2f}-{row.ci_high:.2f})")


def retention_check(results: Results, floor: float) -> GateCheck:
    low = results.retention_ci_low
    if low is None:
        return GateCheck(name="minRetentionPct", threshold=floor, passed=False,
                         message=f"retention vs the 16-bit student not measured (needs generative rows of student and "
                                 f"quantized, and a student with a correct answer), needs a lower bound >= {floor:.1f}%")
    ok = low >= floor
    return GateCheck(name="minRetentionPct", value=low, threshold=floor, passed=ok,
                     message=f"retention vs the 16-bit student: 95% CI lower bound {low:.1f}% {'>=' if ok else '<'} "
                             f"{floor:.1f}% (point {results.accuracy_retention_pct:.1f}%, generative, all datasets pooled)")


def not_worse_than_base_check(results: Results, ref: str, scoring: str) -> GateCheck:
    label = _label(ref, scoring)
    row = _quantized_row(results, ref, scoring)
    if row is not None and not row.n:  # e.g. the quickstart's general questions: scored by keywords, not accuracy
        return GateCheck(name="notWorseThanBase", dataset=ref, passed=True,
                         message=f"{ref}: open questions only, no accuracy to compare with base")
    cmp = next((c for c in results.comparisons if c.a == "base" and c.b == "quantized" and c.dataset == label), None)
    if cmp is None:
        return GateCheck(name="notWorseThanBase", dataset=ref, threshold=ALPHA, passed=False,
                         message=f"{ref}: quantized vs base ({scoring}) not measured (no paired comparison)")
    worse = cmp.delta_pct_points < 0 and cmp.p_value < ALPHA
    words = "significantly worse than base" if worse else "not significantly worse than base"
    return GateCheck(name="notWorseThanBase", dataset=ref, value=cmp.p_value, threshold=ALPHA, passed=not worse,
                     message=f"{ref}: quantized {cmp.delta_pct_points:+.1f} points vs base, McNemar p {cmp.p_value:.3g} "
                             f"({'<' if cmp.p_value < ALPHA else '>='} {ALPHA}, n={cmp.n}): {words}")


def judge(gate: EvaluationGate, results: Results | None, evaluation: Evaluation,
          annotations: dict | None = None) -> Verdict:
    """The gate's verdict on the evaluate stage's results (None: the stage wrote no table)."""
    results = results or Results()
    checks = [min_accuracy_check(results, m.dataset, m.min_accuracy, gate.scoring) for m in gate.min_accuracy]
    if gate.min_retention_pct is not None:
        checks.append(retention_check(results, gate.min_retention_pct))
    if gate.not_worse_than_base:
        checks += [not_worse_than_base_check(results, ref, gate.scoring) for ref in evaluation.datasets]
    passed = all(c.passed for c in checks)
    name, reason, problem = parse_override(annotations)
    status = GateStatus(passed=passed, checks=checks,
                        overridden_by="" if passed else name, override_reason="" if passed else reason)
    return Verdict(status, problem)
