"""The MedDistillJob operator: a pure planner (planner.py), a KubeRay backend (kuberay.py) and
thin kopf handlers (handlers.py). Imports neither torch nor ray."""
