"""The pipeline stages, one recipe each: teacher · distill-data · distill · quantize · evaluate.

`python -m meddistill.jobs STAGE` (see __main__.py) is the one entrypoint: the operator submits it
as a RayJob, and `meddistill run` calls the same `run_stage` in-process. Shared pieces live in
their own small modules: stage.py (context, artifacts, Ray connection), sft_data.py (records ->
token ids with answer-only labels), losses.py (CE / KD / ULD), train_loop.py (the one step loop:
resume, accumulate, checkpoint, report), train_common.py (Ray Train wiring, devices, precision,
schedule), lora.py (the one LoRA builder and merge), student.py (layer-pruned students).
"""
