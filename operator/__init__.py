"""The MedDistillJob operator: a pure planner (planner.py), two backends behind one protocol
(backends/: KubeRay, an existing Ray cluster) and thin kopf handlers (handlers.py). Imports
neither torch nor ray (the Ray backend imports ray's job client lazily)."""
