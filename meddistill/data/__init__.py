"""Medical QA data: the normalized record, dataset references, loaders and decontamination."""
from meddistill.data.decontaminate import DecontaminationReport, decontaminate
from meddistill.data.loaders import DataFormatError, LoadedDataset, SkippedRecord, load_dataset
from meddistill.data.records import QUESTION_TYPES, MedicalRecord
from meddistill.data.refs import DATASET_FORMATS, DatasetRef, DatasetRefError, parse_dataset_ref

__all__ = [
    "DATASET_FORMATS",
    "QUESTION_TYPES",
    "DataFormatError",
    "DatasetRef",
    "DatasetRefError",
    "DecontaminationReport",
    "LoadedDataset",
    "MedicalRecord",
    "SkippedRecord",
    "decontaminate",
    "load_dataset",
    "parse_dataset_ref",
]
