"""A pipeline's top-level `env:` reaches the deployed container, under `container.env`, for
real: a pipeline file read by the loader, the deploy stage run on one of the lab's servers, and
the environment read back from inside the container."""
from __future__ import annotations

import json
import threading


from pipelines.deploy import DeployStage
from runner.loader import load_pipeline_text
from runner.outputs import Outputs
from runner.stage import StageContext
from tests.doubles import checkout_outputs, push_outputs
from tests.lab.deploy_fixtures import UID, Log, NoSecrets, _deployer, _port, _servers, _stage

def test_top_level_env_reaches_the_container_and_container_env_wins(lab, images, app, tmp_path):
    name, _ = app
    port = _port()
    stage = _stage(lab, _servers(lab, 1), name, port, container={"env": {"MODE": "production"}})
    deploy = stage.model_dump(mode="json", by_alias=True, exclude_defaults=True)
    text = json.dumps({  # JSON is YAML: the file as the loader reads it
        "name": name, "repository": {"url": "."}, "image": {"name": images["repo"]},
        "env": {"MODE": "staging", "REGION": "lab-1"},
        "stages": {"deploy": deploy}})
    pipeline = load_pipeline_text(text, str(tmp_path / "pipeline.yaml"), environ={})
    assert pipeline.stages.deploy.container.env == {"MODE": "production"}  # as the file says

    ctx = StageContext(run_id=f"r{UID}env", pipeline=pipeline, workdir=tmp_path,
                       cache_dir=tmp_path, log=Log(), secrets=NoSecrets(),
                       cancel=threading.Event(),
                       outputs=Outputs(push=push_outputs(images["v1"]),
                                       checkout=checkout_outputs(commit="1" * 40)))
    report = DeployStage().run(ctx).to_dict()
    assert report["ok"], report

    d = _deployer(stage, images, "v1", name)
    try:
        r = d.connection(d.targets[0]).run(
            ["docker", "exec", name, "sh", "-c", 'echo "$MODE $REGION"'])
    finally:
        d.close()
    assert r.stdout.strip() == "production lab-1"
