"""ServeArgs, build_app's typed args: what config renders reads back unchanged, a deployed config keeps
its bytes (the operator redeploys a Serve app whose config changed), and an unknown key is refused by
name. Pure: no model, no Ray cluster (build_app only builds the application graph)."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from meddistill.serve import config
from meddistill.serve.args import ServeArgs
from meddistill.spec.load import load_job
from meddistill.spec.models import MedDistillJob

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ["quickstart", "deepseek-r1-70b-to-7b"]  # the CPU quickstart and the production GPU job
VARIANTS = {
    "as written": {},
    "auth": {"serving": {"auth": {"secretName": "tok", "key": "k"}}},
    "gguf": {"quantization": {"formats": ["nf4", "gguf"]}, "serving": {"gpusPerReplica": 0, "engine": "auto"}},
    "w4a16": {"quantization": {"formats": ["nf4", "w4a16"]}, "serving": {"gpusPerReplica": 1}},
    "no system prompt": {"serving": {"chatSystemPrompt": ""}},
}


def example(name: str, change: dict | None = None) -> MedDistillJob:
    doc = yaml.safe_load((ROOT / "examples" / f"{name}.yaml").read_text())
    for section, values in (change or {}).items():
        doc["spec"].setdefault(section, {}).update(values)
    return MedDistillJob.model_validate(doc)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", EXAMPLES)
def test_rendered_args_read_back_unchanged(name, variant):
    args = config.app_args(example(name, VARIANTS[variant]), "s3://b/p/quantize")
    assert ServeArgs.parse(args).rendered() == args
    served = yaml.safe_load(config.render_serve_config_v2(example(name, VARIANTS[variant]), "s3://b/p/quantize"))
    assert served["applications"][0]["args"] == args  # what a RayService's build_app receives


@pytest.mark.parametrize("name", EXAMPLES)
def test_serve_config_is_byte_for_byte_what_it_was_before_the_typed_args(name):
    # Rendered by the dict-based config.py this model replaced. A running Serve app whose rendered
    # config changes is redeployed (RayService update, Serve REST deploy): change these files only on
    # purpose, with the redeploy said in the change.
    expected = (ROOT / "tests" / "fixtures" / "serve_config" / f"{name}.yaml").read_text()
    assert config.render_serve_config_v2(load_job(ROOT / "examples" / f"{name}.yaml"), "s3://b/p/quantize") == expected


def test_an_unknown_key_is_refused_naming_its_path():
    args = config.app_args(example("quickstart"), "/m")
    with pytest.raises(ValueError, match=r"max_batch: unknown key.*app_args"):
        ServeArgs.parse({**args, "max_batch": 8})
    nested = copy.deepcopy(args)
    nested["deployment"]["autoscaling_config"]["target_ongoing_request"] = 2
    with pytest.raises(ValueError, match=r"deployment\.autoscaling_config\.target_ongoing_request: unknown key"):
        ServeArgs.parse(nested)
    with pytest.raises(ValueError, match=r"engine: Input should be 'auto'"):
        ServeArgs.parse({**args, "engine": "tgi"})


def test_build_app_refuses_a_typo_in_a_serve_config_before_any_replica_starts():
    from meddistill.serve.app import build_app

    args = config.app_args(example("quickstart"), "/m")
    assert build_app(args)._bound_deployment.init_args[0].max_batch_size == args["max_batch_size"]
    with pytest.raises(ValueError, match="log_prompt: unknown key"):
        build_app({**args, "log_prompt": True})


def test_hand_written_args_get_the_apps_defaults():
    args = ServeArgs.parse({"model_source": "builtin:smollm2-135m-instruct", "model_name": "m"})
    assert (args.engine, args.max_batch_size, args.waiting_limit, args.formats) == ("auto", 16, 64, ["nf4"])
    assert args.deployment.gpus == 0 and args.rendered()["deployment"] == {}


def test_serve_package_speaks_no_pod_vocabulary():
    # Pod shapes (a Secret's env entry, worker groups) are the KubeRay backend's: operator/backends/kuberay_objects.py.
    for path in (ROOT / "serve").glob("*.py"):
        text = path.read_text()
        for word in ("secretKeyRef", "valueFrom", "workerGroup", "minReplicas", "cpusPerWorker"):
            assert word not in text, f"{path.name} mentions {word}"
