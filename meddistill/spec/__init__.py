"""The MedDistillJob API: typed models (models.py), loading and validation (load.py), the CRD and
reference generated from them (crd.py, reference.py)."""
