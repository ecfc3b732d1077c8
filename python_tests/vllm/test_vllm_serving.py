"""vLLM serving of HyCAM models on vLLM's CPU backend (hycam_ext.integrations.vllm).

Collected only by the vLLM venv's pytest (``bash .ci/vllm_setup`` builds it, then
``.venv-vllm/bin/python -m pytest -q --noconftest python_tests/vllm``: python_tests/conftest.py
imports the checkout's hycam_ext, whose in-place binary, when there is one, is .venv's, built
for another torch); the main suite skips it. The work runs in serve_check.py, a subprocess
started from a scratch directory (see its docstring), and in vLLM's OpenAI server.

What is checked, per family (llama, qwen2, qwen3): greedy tokens of a batch of four prompts of
lengths 3, 5, 7 and 12 from ``vllm.LLM(model=export_dir)`` equal HyCAMModel.generate's, with a
perturbed ("trained") adapter, and the log-probability of every generated token agrees within
LOGPROB_ATOL (float32: vLLM's CPU kernels and transformers' sum in other orders; measured: 5e-7);
the trained adapter changes the output (tokens, or log-probs by more than 100 x LOGPROB_ATOL: the
check is not vacuous); a fresh adapter gives the base model's
tokens.
"""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("vllm", reason="needs vLLM: bash .ci/vllm_setup, then run this folder with "
                                   ".venv-vllm/bin/python -m pytest --noconftest")

FAMILIES = ("llama", "qwen2", "qwen3")
LOGPROB_ATOL = 1e-4


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    work = tmp_path_factory.mktemp("vllm_serve")
    out = work / "results.json"
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "serve_check.py")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    env.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    proc = subprocess.run([sys.executable, script, str(out), str(work), *FAMILIES], cwd=work,
                          env=env, capture_output=True, text=True, timeout=1500)
    if proc.returncode != 0:
        pytest.fail(f"serve_check.py failed (rc {proc.returncode}):\n{proc.stdout[-4000:]}\n"
                    f"{proc.stderr[-8000:]}")
    with open(out) as f:
        return json.load(f)


def test_the_checked_hycam_ext_is_installed_not_the_checkout():
    """serve_check.py must import the hycam_ext built for this venv's torch."""
    here = os.path.dirname(os.path.abspath(__file__))
    code = "import hycam_ext, sys; print(hycam_ext.__file__); sys.exit(0 if hycam_ext.ops.kernels_available() else 1)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=here, capture_output=True, text=True,
                          env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    root = os.path.dirname(os.path.dirname(here))
    installed = os.path.dirname(os.path.realpath(proc.stdout.strip()))
    assert installed != os.path.realpath(os.path.join(root, "hycam_ext")), proc.stdout


@pytest.mark.parametrize("family", FAMILIES)
def test_trained_adapter_matches_hf_generate(results, family):
    r = results[family]
    assert r["arch"][0].startswith("HyCAM"), r["arch"]
    for i, (hf, vl) in enumerate(zip(r["hf_trained"], r["vllm_trained"])):
        assert vl["tokens"] == hf["tokens"], f"{family} prompt {i}"
        diff = max(abs(a - b) for a, b in zip(hf["logprobs"], vl["logprobs"]))
        assert diff <= LOGPROB_ATOL, f"{family} prompt {i}: log-prob differs by {diff:.2e}"
    # the adapter matters: without it some prompt decodes differently or with other log-probs
    assert any(t["tokens"] != b["tokens"]
               or max(abs(x - y) for x, y in zip(t["logprobs"], b["logprobs"])) > 100 * LOGPROB_ATOL
               for t, b in zip(r["hf_trained"], r["hf_base"])), family


@pytest.mark.parametrize("family", FAMILIES)
def test_fresh_adapter_gives_the_base_models_tokens(results, family):
    r = results[family]
    for i, (base, vl) in enumerate(zip(r["hf_fresh_base"], r["vllm_fresh"])):
        assert vl["tokens"] == base["tokens"], f"{family} prompt {i}"
        diff = max(abs(a - b) for a, b in zip(base["logprobs"], vl["logprobs"]))
        assert diff <= LOGPROB_ATOL, f"{family} prompt {i}: log-prob differs by {diff:.2e}"


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_openai_server_serves_the_export(tmp_path):
    """The export with its tokenizer behind vLLM's OpenAI-compatible server, in vLLM's default
    mode (no enforce_eager: the model, hycam ops included, traced by dynamo and compiled by
    inductor), adapter in the ``attention`` placement: a text completion request gets
    HyCAMModel.generate's greedy tokens. (``vllm serve DIR`` is the same server, but
    vllm-cpu 0.32.0's ``vllm`` command fails before parsing its arguments: it asks for the
    version of a distribution named "vllm", and this one is named "vllm-cpu"; so the module.)"""
    import time
    import urllib.request
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "serve_check.py")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    served, ref_json, prompt = tmp_path / "served", tmp_path / "ref.json", "hello HyCAM"
    proc = subprocess.run([sys.executable, script, "served", str(served), prompt, str(ref_json)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    ref = json.loads(ref_json.read_text())
    assert ref["tokens"] != ref["base_tokens"]   # the adapter matters for this prompt
    port = _free_port()
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.openai.api_server",
                               "--model", str(served), "--dtype", "float32",
                               "--max-model-len", "64", "--host", "127.0.0.1",
                               "--port", str(port)],
                              cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        body = json.dumps({"model": str(served), "prompt": prompt, "max_tokens": len(ref["tokens"]),
                           "temperature": 0, "ignore_eos": True, "return_token_ids": True}).encode()
        deadline, reply = time.time() + 240, None
        while reply is None:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-6000:]
            assert time.time() < deadline, "the server did not answer within 240 s"
            try:
                req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                             headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(req, timeout=60) as r:
                    reply = json.loads(r.read())
            except OSError:
                time.sleep(2)
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
    text = (tmp_path / "server.log").read_text()
    assert "HyCAMLlamaForCausalLM" in text and "Enforce eager set" not in text
    choice = reply["choices"][0]
    assert choice["token_ids"] == ref["tokens"], (choice, ref)
    assert reply["usage"]["prompt_tokens"] == len(ref["prompt_ids"])
