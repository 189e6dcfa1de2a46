"""MedDistill: fine-tune, distill, quantize, evaluate and serve medical LLMs on Ray and Kubernetes."""

__version__ = "0.1.0"
