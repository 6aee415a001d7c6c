"""Stage `check_params`: params.yaml is validated before any other stage works, on every `dvc repro`.

It depends on params.yaml as a file, so any edit re-runs it, also of keys no stage declares (a typo
such as `dpo.betta`), and the stages at the roots of the DAG depend on its output, so DVC runs it
first. It checks the whole file against the schema (`params.yaml:LINE: key: reason`, exit status 2)
and imports a `function` judge, so a judge that cannot be imported fails here, not after generation; with
`onpolicy.generate.backend: vllm` it checks that vLLM's environment is there, before any model is trained.
Its output is the same for every valid file: a valid edit re-runs only the stages that read the key.
"""

from __future__ import annotations

from pathlib import Path

from tasks.lib.errors import SettingError
from tasks.lib.files import write_json
from tasks.lib.generation import vllm_problem
from tasks.lib.judges import FunctionJudge
from tasks.lib.schema import Params
from tasks.lib.stage import stage_main

VALID = {"params": "valid"}


def check_params(params: Params, out: Path) -> None:
    """Check what the schema cannot, then write the stamp the root stages depend on.

    Args:
        params: the pipeline's params (already validated against the schema by the command line)
        out: the stamp file: the same content for every valid params.yaml
    """
    if params.onpolicy.judge.kind == "function":
        FunctionJudge(params.onpolicy.judge)
    if params.onpolicy.generate.backend == "vllm":
        problem = vllm_problem(params.onpolicy.generate.vllm)
        if problem:
            raise SettingError(problem)
    write_json(out, VALID)
    print("params.yaml: valid")


if __name__ == "__main__":
    stage_main(check_params)
