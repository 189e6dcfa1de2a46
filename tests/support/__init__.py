"""Shared test helpers (real Kubernetes control plane harness, ...)."""
