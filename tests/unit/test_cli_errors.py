"""User errors print `error: <message>` and exit 2 without a traceback of our code; bugs keep their traceback.

Every case runs the command a user types (a recipe, `accelerate launch`, `python -m eval`) as a subprocess. The
errors all happen before any model loads, so the commands start side by side and cost little more than their imports.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from eval.data import EvalError
from eval.runs import CompareError
from recipes.common.config import ConfigError
from recipes.common.data import DataError
from recipes.common.errors import USER_ERROR_EXIT_CODE, UserError
from recipes.common.modeling import ModelLoadError
from recipes.common.outputs import OutputDirError
from recipes.common.reward import RewardModelError
from recipes.grpo.rewards import RewardFunctionError
from recipes.rejection_sampling.loop import RejectionSamplingError
from recipes.rejection_sampling.rundir import RoundStateError
from recipes.rejection_sampling.selection import ScorerError

REPO_ROOT = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
ACCELERATE = str(Path(sys.executable).with_name("accelerate"))
# A frame of the project's own code in a traceback: `File ".../recipes/..."`, `.../eval/...` or `.../scripts/...`.
OUR_FRAME = re.compile(r'File "[^"]*/(recipes|eval|scripts)/')
TIMEOUT_S = 300


def recipe(stage: str) -> str:
    return str(REPO_ROOT / "recipes" / stage / "train.py")


def shipped(stage: str) -> str:
    return str(REPO_ROOT / "recipes" / stage / "config.yaml")


# name -> (command, a piece of the message it must print). `{tmp}` is the working directory, set up by `inputs()`.
CASES = {
    "sft: unknown config key": (
        [PYTHON, recipe("sft"), "--config", "{tmp}/unknown_key.yaml"],
        "error: Unknown arguments from config file: ['--no_such_key', '1'] in {tmp}/unknown_key.yaml",
    ),
    "dpo under accelerate launch: missing config file": (
        [ACCELERATE, "launch", "--num_processes", "1", recipe("dpo"), "--config", "missing.yaml"],
        "error: Config file not found: 'missing.yaml'",
    ),
    "reward: dataset without chosen/rejected columns": (
        [PYTHON, recipe("reward"), "--config", shipped("reward"), "--dataset_name", "{tmp}/pairs.jsonl"]
        + ["--output_dir", "{tmp}/reward"],
        "has columns ['prompt', 'response']",
    ),
    "grpo: model path without config.json": (
        [PYTHON, recipe("grpo"), "--config", shipped("grpo"), "--model_name_or_path", "{tmp}/not_a_model"]
        + ["--parent_run", "{tmp}/parent_sft", "--dataset_name", "{tmp}/math.jsonl", "--output_dir", "{tmp}/grpo"],
        "error: The model path '{tmp}/not_a_model' has no config.json",
    ),
    "python -m eval: model path without config.json": (
        [PYTHON, "-m", "eval", "--model", "{tmp}/not_a_model", "--tasks", "length"],
        "error: The model path '{tmp}/not_a_model' holds no config.json",
    ),
    "study: unknown method": (
        [PYTHON, str(REPO_ROOT / "scripts" / "study_ppo_vs_dpo.py"), "--methods", "kto", "--output_dir", "{tmp}/study"],
        "error: unknown method(s) ['kto']",
    ),
}


def inputs(tmp: Path) -> None:
    """The files the cases point at."""
    (tmp / "unknown_key.yaml").write_text(f"output_dir: {tmp / 'sft'}\nno_such_key: 1\n")
    (tmp / "pairs.jsonl").write_text(json.dumps({"prompt": "Hi", "response": "Hello"}) + "\n")
    (tmp / "math.jsonl").write_text(json.dumps({"prompt": "What is 2 + 2?", "answer": "4"}) + "\n")
    (tmp / "parent_sft").mkdir()
    (tmp / "parent_sft" / "run_complete.json").write_text("{}")
    (tmp / "not_a_model").mkdir()  # a directory without config.json, like an interrupted run's output dir


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[str, int, str]]:
    """Every case started at once, then awaited: name -> (expected message, exit code, stdout + stderr)."""
    tmp = tmp_path_factory.mktemp("cli_errors")
    inputs(tmp)
    running = {}
    for index, (name, (cmd, expected)) in enumerate(CASES.items()):
        log = open(tmp / f"case{index}.log", "w+")  # a file, not a pipe: no process stalls on a full pipe
        cmd = [part.format(tmp=tmp) for part in cmd]
        running[name] = (expected.format(tmp=tmp), subprocess.Popen(cmd, cwd=tmp, stdout=log, stderr=log), log)
    results = {}
    for name, (expected, process, log) in running.items():
        try:
            code = process.wait(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            code = process.wait()
        log.seek(0)
        results[name] = (expected, code, log.read())
        log.close()
    return results


@pytest.mark.parametrize("name", list(CASES))
def test_user_error_prints_one_message_without_our_traceback(finished, name):
    expected, code, output = finished[name]
    assert code != 0, output
    assert expected in output, output
    assert len([line for line in output.splitlines() if line.startswith("error: ")]) == 1, output
    assert not OUR_FRAME.search(output), output
    if "accelerate" in name:
        # accelerate turns the child's exit into its own CalledProcessError (its frames only); `launch -q` drops it.
        assert "CalledProcessError" in output and "returned non-zero exit status 2" in output, output
    else:
        assert code == USER_ERROR_EXIT_CODE, output
        assert "Traceback" not in output, output


ENTRY = """\
import sys
from recipes.common.errors import UserError, run_cli


class ThresholdError(UserError):
    pass


def main():
    if sys.argv[1] == "bug":
        return {}["missing"]  # a KeyError: a bug, not the user's mistake
    if sys.argv[1] == "code":
        return 3
    raise ThresholdError("min_score 7 in demo.yaml is above the scorer's range: set it to a value in [0, 1].")


if __name__ == "__main__":
    run_cli(main)
"""
MESSAGE = "error: min_score 7 in demo.yaml is above the scorer's range: set it to a value in [0, 1].\n"


def run_entry(tmp_path: Path, mode: str, **env: str) -> subprocess.CompletedProcess:
    entry = tmp_path / "entry.py"
    entry.write_text(ENTRY)
    return subprocess.run(
        [PYTHON, str(entry), mode], capture_output=True, text=True, timeout=60, env={**os.environ, **env}
    )


def test_run_cli_user_error_bug_and_exit_code(tmp_path):
    user = run_entry(tmp_path, "user")
    assert (user.returncode, user.stderr) == (2, MESSAGE)
    bug = run_entry(tmp_path, "bug")
    assert bug.returncode == 1
    assert "Traceback" in bug.stderr and 'entry.py", line' in bug.stderr and "KeyError: 'missing'" in bug.stderr
    code = run_entry(tmp_path, "code")
    assert (code.returncode, code.stderr) == (3, "")


def test_run_cli_under_accelerate_with_two_processes(tmp_path):
    """Printed once, by rank 0; torchrun's failure summary shows the first failed rank's message (a rank that was
    still starting when torchrun saw the first failure is stopped by torchrun, before printing anything)."""
    cpu_2proc = REPO_ROOT / "accelerate_configs" / "cpu_2proc.yaml"
    (tmp_path / "entry.py").write_text(ENTRY)
    cmd = [ACCELERATE, "launch", "--config_file", str(cpu_2proc), str(tmp_path / "entry.py"), "user"]
    result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=TIMEOUT_S)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert [line + "\n" for line in output.splitlines() if line.startswith("error: ")] in ([MESSAGE], []), output
    assert f"traceback : {MESSAGE.strip()}" in output.partition("Root Cause")[2], output
    assert "ChildFailedError" in output and not OUR_FRAME.search(output), output


def test_run_cli_other_ranks_leave_the_message_to_torchrun(tmp_path):
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    error_file = tmp_path / "error.json"
    result = run_entry(tmp_path, "user", LOCAL_RANK="1", TORCHELASTIC_ERROR_FILE=str(error_file))
    assert (result.returncode, result.stderr) == (2, ""), "only the first process of a machine prints"
    failure = ProcessFailure(local_rank=1, pid=0, exitcode=2, error_file=str(error_file))  # what torchrun reads
    assert failure.message == MESSAGE.strip()


def test_error_classes_are_user_errors_and_still_value_errors():
    spec = importlib.util.spec_from_file_location("prepare_demo", REPO_ROOT / "scripts" / "prepare_demo.py")
    prepare_demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prepare_demo)
    errors = [ConfigError, DataError, ModelLoadError, OutputDirError, RewardModelError, CompareError]
    errors += [RewardFunctionError, RejectionSamplingError, RoundStateError, ScorerError, EvalError]
    for error in [*errors, prepare_demo.PrepareError]:
        assert issubclass(error, UserError) and issubclass(error, ValueError), error
