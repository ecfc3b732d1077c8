"""hycam_ext.integrations.vllm.export in the main environment (no vLLM needed): the directory's
files, names and config; what it refuses. Serving it is tested in python_tests/vllm (vLLM venv)."""
import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from hycam_ext import HyCAMConfig  # noqa: E402
from hycam_ext.integrations.transformers import get_hycam_model  # noqa: E402
from hycam_ext.integrations.vllm import export  # noqa: E402
from hycam_ext.integrations.vllm.export import HyCAMExportError  # noqa: E402

from python_tests.hf_tiny import byte_tokenizer, perturb_hycam, tiny_model  # noqa: E402


def _load(d):
    from safetensors.torch import load_file
    with open(os.path.join(d, "config.json")) as f:
        return json.load(f), load_file(os.path.join(d, "model.safetensors"))


@pytest.mark.parametrize("arch,want", [("llama", "HyCAMLlamaForCausalLM"),
                                       ("qwen2", "HyCAMQwen2ForCausalLM"),
                                       ("qwen3", "HyCAMQwen3ForCausalLM")])
def test_export_writes_weights_config_and_tokenizer(tmp_path, arch, want):
    model = get_hycam_model(tiny_model(arch), HyCAMConfig(num_specialists=3, rank=4))
    perturb_hycam(model)
    d = export(model, str(tmp_path / "out"), tokenizer=byte_tokenizer())
    cfg, sd = _load(d)
    assert cfg["architectures"] == [want] and cfg["model_type"] == arch
    hc = HyCAMConfig.from_dict(cfg["hycam_config"])
    assert (hc.num_specialists, hc.rank, hc.hidden_size) == (3, 4, model.config.hidden_size)
    own = model.base_model.state_dict()
    for k, v in sd.items():   # every tensor under its HF name, values as in the model
        assert torch.equal(v, own[k]), k
    hycam = [k for k in own if ".hycam." in k]
    assert hycam and set(hycam) <= set(sd)
    tied = model.config.tie_word_embeddings
    assert ("lm_head.weight" in sd) == (not tied)
    assert set(own) - set(sd) <= {"lm_head.weight"}
    assert os.path.isfile(os.path.join(d, "tokenizer.json"))


def test_export_of_a_peft_model(tmp_path):
    peft = pytest.importorskip("peft")
    from hycam_ext.integrations.peft import HyCAMPeftConfig
    model = peft.get_peft_model(tiny_model("qwen3"), HyCAMPeftConfig(num_specialists=2, rank=4))
    cfg, sd = _load(export(model, str(tmp_path / "out")))
    assert cfg["architectures"] == ["HyCAMQwen3ForCausalLM"]
    assert "model.layers.0.hycam.shared_weight" in sd
    assert not any(k.startswith("base_model.") for k in sd)


def test_export_refuses_task_routing_and_unserved_families(tmp_path):
    model = get_hycam_model(tiny_model("llama"), HyCAMConfig(routing="task", num_tasks=2))
    with pytest.raises(HyCAMExportError, match="routing='task'"):
        export(model, str(tmp_path / "a"))
    model = get_hycam_model(tiny_model("gemma2"), HyCAMConfig())
    with pytest.raises(HyCAMExportError, match="gemma2"):
        export(model, str(tmp_path / "b"))
    with pytest.raises(HyCAMExportError, match="not a HyCAM model"):
        export(tiny_model("llama"), str(tmp_path / "c"))


def test_export_does_not_import_vllm(tmp_path):
    code = ("import sys; from hycam_ext.integrations.vllm import export; "
            "from python_tests.hf_tiny import tiny_model; "
            "from hycam_ext.integrations.transformers import get_hycam_model; "
            f"export(get_hycam_model(tiny_model('llama')), {str(tmp_path / 'o')!r}); "
            "assert 'vllm' not in sys.modules")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
