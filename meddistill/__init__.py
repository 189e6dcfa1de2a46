"""MedDistill: fine-tune, distill, quantize, evaluate and serve medical LLMs on Ray and Kubernetes."""

import os

__version__ = "0.1.0"

# transformers >= 5.2x swaps layers for "hub kernels" by default: code downloaded from a model hub at
# run time. Hospitals are often air-gapped, and what runs must be what was installed and tested, so
# MedDistill turns that off in every process that imports it (Ray workers and Serve replicas too);
# USE_HUB_KERNELS=YES in the environment turns it back on.
os.environ.setdefault("USE_HUB_KERNELS", "NO")
