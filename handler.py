"""RunPod serverless entry point: load the served models once, then answer jobs.

    python handler.py                                  # on RunPod: the job loop; locally: test_input.json
    python handler.py --test_input '{"input": {"prompt": "a red fox"}}'
    python handler.py --rp_serve_api --rp_api_port 8000  # local HTTP API: POST /runsync

Settings come from the environment (see README); with no MODELS outside RunPod the tiny
random-weight models run on the CPU, so a fresh checkout works end to end.
"""

import os
import sys

from turbovideo.worker.config import sdk_log_level

# The SDK reads its level when imported and raises on one it does not know: it gets a level it takes
# (INFO unless asked otherwise: at DEBUG it logs every handler output, presigned URLs included), and the
# start checks the variable as it was set, so a bad one is an E_STARTUP answer instead of a crash loop.
ENV = dict(os.environ)
os.environ["RUNPOD_LOG_LEVEL"] = sdk_log_level(ENV)

import runpod  # noqa: E402

from turbovideo.worker.startup import check_test_input, create_handler  # noqa: E402

if __name__ == "__main__":
    check_test_input(sys.argv[1:], ENV)
    sdk_config: dict = {}  # the handler sets its refresh_worker when this worker must be replaced
    sdk_config["handler"] = create_handler(ENV, sdk_config)
    runpod.serverless.start(sdk_config)
