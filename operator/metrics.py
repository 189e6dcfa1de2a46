"""Prometheus metrics of the operator (served by `meddistill operator --metrics-port`)."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

RECONCILES = Counter("meddistill_operator_reconciles_total", "Reconciles of MedDistillJobs by result", ["result"])
RECONCILE_SECONDS = Histogram("meddistill_operator_reconcile_seconds", "Time of one reconcile (read, plan, write)")
# A full periodic pass (every job listed, reconciled, then garbage collected): "the operator looked again".
RESYNCS = Counter("meddistill_operator_resyncs_total", "Completed resync passes over every MedDistillJob")
CHILDREN_CREATED = Counter("meddistill_operator_children_created_total", "Children created, by resource", ["resource"])
