"""`meddistill crd`: print the CRD generated from the typed spec (the chart ships exactly this)."""

from __future__ import annotations

import sys


def register(subparsers, summary: str) -> None:
    p = subparsers.add_parser(
        "crd",
        help=summary,
        description="Print the MedDistillJob CustomResourceDefinition generated from the pydantic models. "
        "charts/meddistill-operator/crds/meddistilljobs.yaml is exactly this output "
        "(regenerate it with: meddistill crd > charts/meddistill-operator/crds/meddistilljobs.yaml).",
    )
    p.add_argument("-o", "--output", help="write to this file instead of stdout")
    p.add_argument("--reference", action="store_true",
                   help="print the spec reference as markdown instead (docs/spec-reference.md is exactly this)")
    p.set_defaults(func=run)


def run(args) -> int:
    from meddistill.spec.crd import render_crd_yaml
    from meddistill.spec.reference import render_spec_reference

    text = render_spec_reference() if args.reference else render_crd_yaml()
    if args.output:
        with open(args.output, "w") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    return 0
