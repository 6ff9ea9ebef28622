"""A deploy in a process of its own, so that a test can stop it (SIGSTOP), resume it or kill
it by pid. The deploy is the stage's (deployers.app_deployer: every role of the settings).

argv[1]: JSON {"stage": <deploy settings>, "app": str, "repo": str, "ref": "name@sha256:...",
"run_id": str, "commit": str}. Logs each line on stderr (flushed), prints the report as JSON on
stdout, exits 0 when the deploy succeeded and 1 when it failed.
"""
from __future__ import annotations

import json
import sys

from deployers.base import DeployFailed
from deployers.app_deployer import AppDeployer
from runner.model.deploy import DeploySettings
from runner.model.image import ImageRef


def main() -> int:
    cfg = json.loads(sys.argv[1])
    d = AppDeployer(DeploySettings.model_validate(cfg["stage"]), pipeline=cfg["app"],
                    image_name=cfg["repo"], run_id=cfg["run_id"],
                    image=ImageRef.parse(cfg["ref"]), commit=cfg.get("commit", ""),
                    log=lambda line: print(line, file=sys.stderr, flush=True))
    try:
        report = d.apply()
        code = 0
    except DeployFailed as exc:
        report, code = exc.report, 1
    finally:
        d.close()
    print(json.dumps(report.to_dict()), flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
