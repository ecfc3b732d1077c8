"""The multi-task fine-tuning CLI (python -m hycam_ext.finetune / hycam-finetune)."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")
pytest.importorskip("tqdm")

from hycam_ext import finetune  # noqa: E402
from hycam_ext.integrations.transformers import HyCAMModel  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hf_tiny import byte_tokenizer, save_tiny_checkpoint  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny_llama"), "llama", seed=0)


def test_builtin_tasks_and_split():
    tasks = finetune.builtin_tasks(30, seed=1)
    assert set(tasks) == {"arithmetic", "code", "qa"}
    assert all(len(v) == 30 for v in tasks.values())
    assert tasks == finetune.builtin_tasks(30, seed=1)            # deterministic
    for recs in tasks.values():
        assert all(set(r) == {"instruction", "input", "output"} and r["output"] for r in recs)
    a = tasks["arithmetic"][0]
    lhs, rhs = a["output"].split(" = ")
    assert eval(lhs) == int(rhs)                                   # noqa: S307 (our own data)
    tr, ev = finetune.split_task(tasks["qa"], 0.2, 4, 10, seed=0)
    assert len(ev) == 4 and len(tr) == 10
    tr_all, ev_all = finetune.split_task(tasks["qa"], 0.2, 0, None, seed=0)
    assert len(ev_all) == 6
    key = lambda recs: sorted(map(json.dumps, recs))  # noqa: E731
    assert key(tr_all + ev_all) == key(tasks["qa"])        # a partition of the task
    assert ev_all[:4] == ev                                # same shuffle, capped


def test_formatter_masks_prompt_and_collate_pads():
    tok = byte_tokenizer()
    fmt = finetune.Formatter(tok, "alpaca", max_length=64)
    rec = {"instruction": "Say hi.", "input": "", "output": "hi"}
    enc = fmt.encode(rec)
    labels = enc["labels"]
    n_resp = sum(1 for x in labels if x != finetune.IGNORE_INDEX)
    assert n_resp == len(tok("hi", add_special_tokens=False)["input_ids"]) + 1   # + eos
    assert labels[-1] == tok.eos_token_id
    assert len(enc["input_ids"]) <= 64
    long = fmt.encode({"instruction": "x" * 500, "input": "", "output": "y" * 500})
    assert len(long["input_ids"]) == 64 and long["labels"][-1] != finetune.IGNORE_INDEX
    b = finetune.collate([enc, long], tok.pad_token_id)
    assert b["input_ids"].shape == (2, 64)
    assert int(b["attention_mask"][0].sum()) == len(enc["input_ids"])
    assert (b["labels"][0, len(enc["input_ids"]):] == finetune.IGNORE_INDEX).all()


def _tiny_args(ckpt, out, *extra):
    return ["--model", ckpt, "--output-dir", str(out), "--builtin-examples", "24",
            "--max-eval-examples", "4", "--max-length", "96", "--batch-size", "4",
            "--max-steps", "6", "--lr", "1e-2", "--num-specialists", "3", "--rank", "4",
            "--no-progress", *extra]


def test_cli_end_to_end_tiny_model(tiny_ckpt, tmp_path):
    out = tmp_path / "run"
    m = finetune.main(_tiny_args(tiny_ckpt, out, "--grad-accum", "2"))
    assert m["method"] == "hycam" and m["steps"] == 6
    assert set(m["eval_before"]) == set(m["eval_after"]) == {"arithmetic", "code", "qa"}
    for t in m["eval_after"]:
        assert m["eval_after"][t]["tokens"] > 0
        assert m["eval_after"][t]["ppl"] == pytest.approx(math.exp(m["eval_after"][t]["loss"]))
    # learning happened: the mean held-out loss went down
    before = sum(v["loss"] for v in m["eval_before"].values())
    after = sum(v["loss"] for v in m["eval_after"].values())
    assert after < before
    assert len(m["history"]) == 6 and all(h["aux_loss"] > 0 for h in m["history"])
    assert (out / "routing.png").stat().st_size > 1000
    routing = json.loads((out / "routing.json").read_text())
    assert set(routing) == {"arithmetic", "code", "qa"}
    assert len(routing["qa"]) == 2 and len(routing["qa"][0]) == 3
    assert abs(sum(routing["qa"][0]) - 1.0) < 1e-5
    assert json.loads((out / "metrics.json").read_text())["trainable_params"] == m["trainable_params"]
    # the adapter loads back into the base checkpoint
    from transformers import AutoModelForCausalLM
    base = AutoModelForCausalLM.from_pretrained(tiny_ckpt)
    model = HyCAMModel.from_pretrained(base, str(out / "adapter"))
    assert model.hycam_config.num_specialists == 3
    assert not torch.equal(model.hycam_modules()[0].shared_weight,
                           torch.zeros_like(model.hycam_modules()[0].shared_weight))


def test_cli_lora_baseline(tiny_ckpt, tmp_path):
    pytest.importorskip("peft")
    ref = finetune.hycam_param_count(32, 2, 3, 4, True)
    m = finetune.main(_tiny_args(tiny_ckpt, tmp_path / "lora", "--baseline", "lora",
                                 "--max-steps", "2", "--gradient-checkpointing"))
    assert m["method"] == "lora" and m["routing_plot"] is None
    assert 0.5 * ref <= m["trainable_params"] <= 1.5 * ref
    assert (tmp_path / "lora" / "adapter" / "adapter_config.json").exists()


def _write_alpaca(path, n, seed):
    tasks = finetune.builtin_tasks(n, seed)
    path.write_text(json.dumps(tasks["code"]))
    return str(path)


@pytest.mark.skipif(not (SHARED_DATA / "Auto-CoT.json").is_file(),
                    reason="shared data (../shared/data/Auto-CoT.json) not available")
def test_cli_on_auto_cot_with_checkpointing(tiny_ckpt, tmp_path):
    code = _write_alpaca(tmp_path / "code_tasks.json", 20, 3)
    out = tmp_path / "autocot"
    m = finetune.main(["--model", tiny_ckpt, "--data", str(SHARED_DATA / "Auto-CoT.json"), code,
                       "--output-dir", str(out), "--max-train-examples", "8",
                       "--max-eval-examples", "3", "--max-length", "96", "--batch-size", "2",
                       "--max-steps", "3", "--num-specialists", "2", "--rank", "2",
                       "--gradient-checkpointing", "--reentrant", "--no-progress"])
    assert set(m["eval_after"]) == {"Auto-CoT", "code_tasks"}
    assert all(v["tokens"] > 0 for v in m["eval_after"].values())
    assert (out / "routing.png").exists() and (out / "adapter").is_dir()


def test_load_alpaca_file_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"prompt": "x"}]))
    with pytest.raises(ValueError, match="instruction"):
        finetune.load_alpaca_file(str(bad))
    bad.write_text(json.dumps({"a": 1}))
    with pytest.raises(ValueError, match="list"):
        finetune.load_alpaca_file(str(bad))


def test_module_entry_point_help():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-m", "hycam_ext.finetune", "--help"], cwd=str(REPO),
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "--baseline" in r.stdout and "--max-steps" in r.stdout and "--gradient-checkpointing" in r.stdout
