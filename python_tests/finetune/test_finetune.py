"""The multi-task fine-tuning CLI (python -m hycam_ext.finetune / hycam-finetune)."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")
pytest.importorskip("tqdm")

from hycam_ext import finetune  # noqa: E402
from hycam_ext.integrations.transformers import HyCAMModel  # noqa: E402

from python_tests.hf_tiny import byte_tokenizer, save_tiny_checkpoint  # noqa: E402
from python_tests.helpers import AUTO_COT, ROOT, needs_auto_cot  # noqa: E402

# a FutureWarning is an error (every user would see it), except peft's own use of a renamed
# transformers API, which is not ours to fix
pytestmark = [pytest.mark.filterwarnings("error::FutureWarning"),
              pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")]

REPO = ROOT


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
            "--gen-max-new-tokens", "8", "--no-progress", *extra]


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
    gen = m["generation"]
    assert set(gen["tasks"]) == {"arithmetic", "code", "qa"}
    for t, g in gen["tasks"].items():
        assert g["n"] == 2                           # round(24 * 0.1) held-out examples
        assert all(0.0 <= g[k] <= 100.0 for k in ("bleu", "rouge1", "rouge2", "rougeL"))
        assert g["samples"] and all(isinstance(x["generated"], str) for x in g["samples"])
    assert gen["mean"]["rougeL"] == pytest.approx(
        sum(g["rougeL"] for g in gen["tasks"].values()) / 3)
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


@needs_auto_cot
def test_cli_on_auto_cot_with_checkpointing(tiny_ckpt, tmp_path):
    code = _write_alpaca(tmp_path / "code_tasks.json", 20, 3)
    out = tmp_path / "autocot"
    m = finetune.main(["--model", tiny_ckpt, "--data", str(AUTO_COT), code,
                       "--with-builtin", "--builtin-examples", "12", "--gen-max-new-tokens", "4",
                       "--output-dir", str(out), "--max-train-examples", "8",
                       "--max-eval-examples", "3", "--max-length", "96", "--batch-size", "2",
                       "--max-steps", "3", "--num-specialists", "2", "--rank", "2",
                       "--gradient-checkpointing", "--reentrant", "--no-progress"])
    tasks = {"Auto-CoT", "code_tasks", "arithmetic", "code", "qa"}
    assert set(m["eval_after"]) == set(m["generation"]["tasks"]) == tasks
    assert all(v["tokens"] > 0 for v in m["eval_after"].values())
    assert m["generation"]["tasks"]["Auto-CoT"]["n"] == 3
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


def test_score_generations_known_values():
    same = ["the cat sat on the mat", "def f(x):\n    return x * 2"]
    s = finetune.score_generations(same, same)
    assert s["bleu"] == pytest.approx(100.0)
    assert s["rouge1"] == s["rouge2"] == s["rougeL"] == pytest.approx(100.0)
    assert s["exact_match"] == 100.0 and s["rougeL_se"] == 0.0 and s["bleu_se"] < 1e-9
    s = finetune.score_generations(["dog runs fast", "x y"], ["the cat sat on the mat", "a b"])
    assert s["bleu"] == 0.0 and s["rouge1"] == 0.0 and s["rougeL"] == 0.0
    # one exact and one disjoint pair: ROUGE-1 mean 50, standard error std/sqrt(2) = 50
    s = finetune.score_generations(["the cat sat on the mat", "x"], ["the cat sat on the mat", "y"])
    assert s["rouge1"] == pytest.approx(50.0) and s["rouge1_se"] == pytest.approx(50.0)
    assert s["exact_match"] == 50.0 and 0.0 < s["bleu"] < 100.0 and s["bleu_se"] > 0.0
    # ROUGE-L: longest common subsequence 2 of 3 (prediction) and 2 of 4 (reference) tokens
    s = finetune.score_generations(["a b z"], ["a q b r"])
    p, r = 2 / 3, 2 / 4
    assert s["rougeL"] == pytest.approx(100.0 * 2 * p * r / (p + r))
    with pytest.raises(ValueError, match="length"):
        finetune.score_generations(["a"], [])


def test_left_pad():
    b = finetune.evaluation.left_pad([[5, 6, 7], [8]], pad_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]


@torch.no_grad()
def _greedy_without_cache(model, ids, n, eos):
    """Greedy decoding written out: the whole sequence through the model at every step."""
    ids = list(ids)
    out = []
    for _ in range(n):
        logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits
        nxt = int(logits[0, -1].argmax())
        if nxt == eos:
            break
        ids.append(nxt)
        out.append(nxt)
    return out


def test_batched_generation_matches_greedy_loop(tiny_ckpt):
    """Left-padded batches with the KV cache give each prompt the tokens that a cache-free greedy
    loop over that prompt alone gives (HyCAM with non-trivial weights in every layer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from hycam_ext.integrations.transformers import get_hycam_model
    from python_tests.hf_tiny import perturb_hycam
    import hycam_ext
    tok = AutoTokenizer.from_pretrained(tiny_ckpt)
    base = AutoModelForCausalLM.from_pretrained(tiny_ckpt)
    model = get_hycam_model(base, hycam_ext.HyCAMConfig(hidden_size=32, num_specialists=3, rank=4))
    perturb_hycam(model, seed=3, scale=0.3)
    model.eval()
    prompts = [tok(t)["input_ids"] for t in ("a", "hello world", "abc def ghi jkl", "xy", "q r s")]
    got = finetune.generate_responses(model, tok, prompts, 6, batch_size=3,
                                      device=torch.device("cpu"), autocast_dtype=None,
                                      progress=False)
    for p, g in zip(prompts, got):
        want = tok.decode(_greedy_without_cache(model, p, 6, tok.eos_token_id),
                          skip_special_tokens=True).strip()
        assert g == want
    assert any(g for g in got)                     # not all empty (eos at once)


def test_compare_writes_table_json_and_plot(tiny_ckpt, tmp_path):
    pytest.importorskip("peft")
    out = tmp_path / "cmp"
    summary = finetune.main(_tiny_args(tiny_ckpt, out, "--max-steps", "2", "--compare",
                                       "--gen-max-new-tokens", "4"))
    names = [v["variant"] for v in summary["variants"]]
    assert names == ["base", "lora-budget", "lora-r16", "shared-cam", "hycam"]
    by = {v["variant"]: v for v in summary["variants"]}
    # trainable budgets: LoRA rank 16 on the 7 projections of 2 layers of the tiny Llama
    # (d 32, MLP 64, k/v 16 wide: 512 weights per rank and layer), the shared CAM d*d + d per
    # layer, HyCAM K=3 r=4
    assert by["base"]["trainable_params"] == 0 and by["base"]["steps"] == 0
    assert by["lora-r16"]["trainable_params"] == 16 * 512 * 2
    assert by["shared-cam"]["trainable_params"] == 2 * (32 * 32 + 32)
    assert by["hycam"]["trainable_params"] == finetune.hycam_param_count(32, 2, 3, 4, True)
    ref = by["hycam"]["trainable_params"]
    assert 0.5 * ref <= by["lora-budget"]["trainable_params"] <= 1.5 * ref
    for v in summary["variants"]:
        assert set(v["bleu"]) == set(v["rougeL"]) == set(v["loss"]) == {"arithmetic", "code", "qa", "mean"}
        if v["variant"] != "base":
            assert v["step_time_median_s"] > 0 and v["peak_memory_increase_mib"] is not None
    # every trained variant moved the held-out loss away from the base model's
    for n in names[1:]:
        assert by[n]["loss"]["mean"] != by["base"]["loss"]["mean"]
    md = (out / "compare.md").read_text()
    assert all(f"| {n} |" in md for n in names) and "ROUGE-L" in md
    assert json.loads((out / "compare.json").read_text())["variants"][0]["variant"] == "base"
    assert (out / "compare.png").stat().st_size > 1000
    assert "--compare" in summary["command"]
    assert not (out / "hycam-seed0" / "adapter").exists()       # no adapters in a comparison
    # the table again from the variants' metrics.json files
    (out / "compare.md").unlink()
    rebuilt = finetune.compare.rebuild(out)
    assert [v["variant"] for v in rebuilt["variants"]] == names
    assert [v["loss"] for v in rebuilt["variants"]] == [v["loss"] for v in summary["variants"]]
    assert (out / "compare.md").read_text() == md


def test_shared_cam_baseline_trains_only_the_shared_cam(tiny_ckpt, tmp_path):
    out = tmp_path / "shared"
    m = finetune.main(_tiny_args(tiny_ckpt, out, "--baseline", "shared-cam", "--max-steps", "3",
                                 "--gen-max-new-tokens", "0"))
    assert m["method"] == "shared-cam" and m["generation"] is None
    assert m["trainable_params"] == 2 * (32 * 32 + 32)
    from transformers import AutoModelForCausalLM
    model = HyCAMModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_ckpt),
                                       str(out / "adapter"))
    for cam in model.hycam_modules():
        assert torch.count_nonzero(cam.B) == 0 and torch.count_nonzero(cam.B_bias) == 0
        assert torch.count_nonzero(cam.shared_weight) > 0         # the shared CAM trained


@pytest.mark.parametrize("argv,msg", [
    (["--seeds", "1", "2"], "--seeds needs --compare"),
    (["--with-builtin"], "--with-builtin needs --data"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--gen-max-new-tokens", "-1"], "--gen-max-new-tokens must be >= 0"),
])
def test_bad_arguments_name_the_argument(argv, msg, capsys):
    with pytest.raises(SystemExit):
        finetune.main(argv)
    assert msg in capsys.readouterr().err


def test_unknown_compare_variant(capsys):
    with pytest.raises(SystemExit):
        finetune.main(["--compare", "hycam,qlora"])
    assert "--compare: unknown variant(s) ['qlora']" in capsys.readouterr().err


def test_cli_task_routing_and_routing_diagnostics(tiny_ckpt, tmp_path):
    """--routing task (each task its id), --router-lr-scale, --eval-every: the diagnostics are
    logged at every evaluation, kept in metrics.json and plotted over training."""
    out = tmp_path / "task"
    m = finetune.main(_tiny_args(tiny_ckpt, out, "--routing", "task", "--router-lr-scale", "10",
                                 "--eval-every", "2"))
    cfg = json.loads((out / "adapter" / "hycam_adapter_config.json").read_text())["hycam_config"]
    assert cfg["routing"] == "task" and cfg["num_tasks"] == 3
    diags = m["routing_diagnostics"]
    assert [d["step"] for d in diags] == [0, 2, 4, 6]       # before, every 2 steps, after
    for d in diags:
        assert len(d["layers"]) == 2 and d["tasks"] == ["arithmetic", "code", "qa"]
        for layer in d["layers"]:
            assert 0.0 <= layer["mi"] <= 1.0 + 1e-9 and 0.0 <= layer["entropy"] <= 1.0 + 1e-9
            assert sum(layer["shares"]) == pytest.approx(1.0)
    # task routing: every token of a task takes its task's route, so the routes are a function
    # of the task (eval routing is the argmax of the task's logits)
    routing = json.loads((out / "routing.json").read_text())
    for task, per_layer in routing.items():
        for row in per_layer:
            assert max(row) == pytest.approx(1.0)
    assert (out / "routing_diagnostics.png").stat().st_size > 1000
    assert m["generation"]["tasks"]                          # generation took the task ids
    # the adapter loads back and routes by task
    import transformers as tf
    model = HyCAMModel.from_pretrained(tf.AutoModelForCausalLM.from_pretrained(tiny_ckpt),
                                       str(out / "adapter"))
    assert model.hycam_config.routing == "task"
    with pytest.raises(ValueError, match="pass task_ids"):
        model(input_ids=torch.tensor([[5, 6, 7]]))


def test_conflicting_tasks_and_the_routing_variants(tiny_ckpt, tmp_path):
    """--builtin-set conflict (the same digit sequences, four incompatible permutations) and the
    variants beyond the paper: router learning rate, task routing, routes forced by task."""
    tasks = finetune.conflict_tasks(5, seed=0)
    assert list(tasks) == ["reverse", "sort", "rotate", "swap"]
    assert len({tuple(r["input"] for r in recs) for recs in tasks.values()}) == 1  # same inputs
    rec = {t: recs[0]["output"] for t, recs in tasks.items()}
    digits = tasks["reverse"][0]["input"].split()
    assert rec["reverse"].split() == digits[::-1] and rec["sort"].split() == sorted(digits)
    assert rec["rotate"].split() == digits[1:] + digits[:1]
    out = tmp_path / "conflict"
    summary = finetune.main(_tiny_args(tiny_ckpt, out, "--builtin-set", "conflict",
                                       "--max-steps", "2", "--gen-max-new-tokens", "4",
                                       "--num-specialists", "4", "--compare",
                                       "hycam-router-lr,hycam-task,hycam-forced"))
    by = {v["variant"]: v for v in summary["variants"]}
    assert set(by) == {"hycam-router-lr", "hycam-task", "hycam-forced"}
    for name, v in by.items():
        assert set(v["loss"]) == {"reverse", "sort", "rotate", "swap", "mean"}
    # forced routes: task t takes specialist t in every layer, in eval and after training
    routing = json.loads((out / "hycam-forced-seed0" / "routing.json").read_text())
    for t, task in enumerate(["reverse", "sort", "rotate", "swap"]):
        for row in routing[task]:
            assert row[t] == pytest.approx(1.0)
    m = json.loads((out / "hycam-forced-seed0" / "metrics.json").read_text())
    assert m["routing_diagnostics"][-1]["mean"]["mi"] == pytest.approx(1.0)
    router = json.loads((out / "hycam-router-lr-seed0" / "metrics.json").read_text())["args"]
    assert router["router_lr_scale"] == 10.0 and router["aux_loss_coef"] == 0.1
