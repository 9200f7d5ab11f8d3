"""The lm-eval backend `btx` against lm-eval's own `hf` backend (transformers, fp32) on the same checkpoints: a
random tiny Llama and the real pretrained llama2.c model stories260K converted to HF. Per-request loglikelihoods
within 1e-4, equal is_greedy flags and accuracy on a multiple-choice task, rolling loglikelihoods, identical
greedy generations; a LoRA-MoE (mergoo) and a PEFT adapter directory without conversion; the CLI's errors."""
from __future__ import annotations

import json
import logging
import os
import shutil

import numpy as np
import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
lm_eval = pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from btx_jax import LoraMoESpec, compose, load_pretrained  # noqa: E402
from btx_jax.cli.lm_eval import main  # noqa: E402
from btx_jax.eval.harness import TASKS_DIR, BtxLM  # noqa: E402
from conftest import build_hf_llama  # noqa: E402
from llama2c import STORIES, stories260k_hf  # noqa: E402

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
STORY = ("Once upon a time, there was a little girl named Lily. She loved to play outside in the park. "
         "One day, she saw a big, red ball. ")


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """{'stories': stories260K as HF, 'random': a random tiny Llama (vocab 512) with the same tokenizer}."""
    root = tmp_path_factory.mktemp("harness")
    stories = stories260k_hf(root / "stories")
    rand = build_hf_llama(root / "random", vocab_size=512, max_position_embeddings=192)
    for f in TOKENIZER_FILES:
        shutil.copy(stories / f, rand / f)
    return {"stories": stories, "random": rand}


@pytest.fixture(scope="module")
def backends(dirs):
    """name -> (btx backend, hf backend) over the same directory."""
    return {name: (BtxLM(pretrained=str(d), batch_size=4),
                   HFLM(pretrained=str(d), dtype="float32", device="cpu", batch_size=4))
            for name, d in dirs.items()}


@pytest.fixture(scope="module")
def tasks():
    """The bundled offline tasks only (indexing the harness's thousands of built-in tasks takes long)."""
    return TaskManager(include_path=str(TASKS_DIR), include_defaults=False)


def _instances(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


@pytest.mark.parametrize("name", ["random", "stories"])
def test_multiple_choice_task_matches_hf_backend(backends, tasks, name):
    """JCommonsenseQA (3-shot, contexts truncated from the left at the model's max length): every request."""
    runs = [lm_eval.simple_evaluate(model=lm, tasks=["btx_jcommonsenseqa"], limit=4, task_manager=tasks,
                                    log_samples=True) for lm in backends[name]]
    (btx, hf) = [[s["resps"] for s in r["samples"]["btx_jcommonsenseqa"]] for r in runs]
    got = np.array([[c[0][0] for c in doc] for doc in btx])
    want = np.array([[c[0][0] for c in doc] for doc in hf])
    assert got.shape == (4, 5) and np.isfinite(got).all()
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    assert [[c[0][1] for c in doc] for doc in btx] == [[c[0][1] for c in doc] for doc in hf]
    accs = [r["results"]["btx_jcommonsenseqa"]["acc,none"] for r in runs]
    assert accs[0] == accs[1]


def test_requests_match_hf_backend(backends):
    """The real model: loglikelihoods (is_greedy true on its own story), rolling windows, generations."""
    btx, hf = backends["stories"]
    ll = [("Once upon a time,", " there was a little girl named Lily."), ("", "Once upon a time"),
          ("She loved to play", " outside"), ("One day, she saw a big", ", red ball."),
          ("The cat", " sat on the mat and looked at the moon for a long time")]
    got, want = btx.loglikelihood(_instances("loglikelihood", ll)), hf.loglikelihood(_instances("loglikelihood", ll))
    np.testing.assert_allclose([g[0] for g in got], [w[0] for w in want], atol=1e-4, rtol=0)
    assert [g[1] for g in got] == [w[1] for w in want]
    assert got[0][1] and got[2][1]          # the real model continues its own story greedily
    # a text longer than max_length: several rolling windows
    rolling = [(STORY,), (STORY * 6,)]
    np.testing.assert_allclose(btx.loglikelihood_rolling(_instances("loglikelihood_rolling", rolling)),
                               hf.loglikelihood_rolling(_instances("loglikelihood_rolling", rolling)),
                               atol=1e-4 * len(STORY * 6), rtol=1e-6)
    # greedy generation: stop sequences, EOS, max_gen_toks; two prompts of one length share a batch
    gen = [("Once upon a time,", {"until": ["."], "max_gen_toks": 24, "do_sample": False}),
           ("Once upon a time, there", {"until": ["park"], "max_gen_toks": 30, "do_sample": False}),
           ("Once upon a time,", {"until": ["\n\n"], "max_gen_toks": 12, "do_sample": False}),
           ("Lily and Ben", {"until": [","], "max_gen_toks": 20, "do_sample": False})]
    got_text = btx.generate_until(_instances("generate_until", gen))
    assert got_text == hf.generate_until(_instances("generate_until", gen))
    assert got_text[0] == "there was a little girl named Lily"
    sampled = btx.generate_until(_instances("generate_until", [
        ("Once upon a time,", {"until": ["."], "max_gen_toks": 16, "do_sample": True, "temperature": 1.0})] * 2))
    assert all(isinstance(t, str) for t in sampled)


def test_peft_adapter_matches_hf_backend_with_peft(dirs, tmp_path):
    from btx_jax.pretrained import open_model
    from btx_jax.train.model_init import lora_spec, with_fresh_lora
    expert = with_fresh_lora(open_model(dirs["random"]), lora_spec({"rank": 4, "alpha": 8.0}), seed=3).load()
    flat = {k: v for k, v in expert.flat_numpy().items()}
    rng = np.random.default_rng(0)            # non-zero lora_b so the adapter changes the logits
    from btx_jax import param_paths
    expert.params = param_paths.unflatten({k: (rng.normal(0, 0.05, v.shape).astype(v.dtype) if "lora_b" in k else v)
                                           for k, v in flat.items()})
    adapter = expert.save_pretrained(tmp_path / "adapter", format="peft")
    ll = _instances("loglikelihood", [("Once upon a time,", " there was a girl"), ("The dog", " ran away.")])
    got = BtxLM(pretrained=str(dirs["random"]), adapter=str(adapter), batch_size=4).loglikelihood(ll)
    want = HFLM(pretrained=str(dirs["random"]), peft=str(adapter), dtype="float32", device="cpu",
                batch_size=2).loglikelihood(ll)
    plain = BtxLM(pretrained=str(dirs["random"]), batch_size=4).loglikelihood(ll)
    np.testing.assert_allclose([g[0] for g in got], [w[0] for w in want], atol=1e-4, rtol=0)
    assert abs(got[0][0] - plain[0][0]) > 1e-3


def test_mergoo_moe_evaluates_from_its_directory(dirs, tmp_path):
    from btx_jax.pretrained import open_model
    from btx_jax.train.model_init import lora_spec, with_fresh_lora
    base = load_pretrained(dirs["random"])
    experts = []
    for i in range(2):
        src = with_fresh_lora(open_model(dirs["random"]), lora_spec({"rank": 4, "alpha": 8.0}), seed=i)
        src.load().save_pretrained(tmp_path / f"e{i}", format="btx")
        experts.append(str(tmp_path / f"e{i}"))
    moe = compose(base, experts, LoraMoESpec(top_k=1))
    moe_dir = moe.save_pretrained(tmp_path / "moe", format="mergoo")
    lm = BtxLM(pretrained=str(moe_dir), tokenizer=str(dirs["random"]), batch_size=2)
    ctx, cont = lm.tok_encode("Once upon a time,"), lm.tok_encode(" there", add_special_tokens=False)
    (logp, _), = lm.loglikelihood(_instances("loglikelihood", [("Once upon a time,", " there")]))
    logits = moe.logits([ctx + cont])[0]
    logz = np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1)) + logits.max(-1)
    want = sum(logits[len(ctx) - 1 + j, t] - logz[len(ctx) - 1 + j] for j, t in enumerate(cont))
    np.testing.assert_allclose(logp, want, atol=1e-4)


@pytest.mark.parametrize("case", ["missing_model", "vocab_mismatch", "missing_task_file", "broken_task_file"])
def test_cli_bad_input_is_one_line_exit_2(dirs, tmp_path, capsys, case):
    model, tasks = str(dirs["stories"]), "btx_jcommonsenseqa"
    if case == "missing_model":
        model = str(tmp_path / "nope")
    elif case == "vocab_mismatch":           # 512-token tokenizer, 256-row embedding
        model = str(build_hf_llama(tmp_path / "small", vocab_size=256))
        for f in TOKENIZER_FILES:
            shutil.copy(dirs["stories"] / f, tmp_path / "small" / f)
    elif case == "missing_task_file":
        tasks = str(tmp_path / "missing.yaml")
    else:                                    # a YAML syntax error (an unclosed bracket) on line 2
        (tmp_path / "broken.yaml").write_text("task: broken\ndoc_to_text: [unclosed\n")
        tasks = str(tmp_path / "broken.yaml")
    rc = main(["--model", "btx", "--model_args", f"pretrained={model}", "--tasks", tasks, "--limit", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert err[-1].startswith("error: ") and "Traceback" not in "\n".join(err)
    assert {"missing_model": "nope", "vocab_mismatch": "512 tokens", "missing_task_file": "missing.yaml",
            "broken_task_file": "broken.yaml: line 3 not valid YAML"}[case] in err[-1]
    if case == "vocab_mismatch":             # the fix in lm-eval's own terms, not another command's flag
        assert err[-1].endswith("with tokenizer=PATH in --model_args") and "--tokenizer" not in err[-1]


def test_cli_runs_a_local_task_file_on_the_full_jglue_validation_set(dirs, tmp_path, capsys):
    jglue = STORIES.parents[1] / "sft" / "jglue" / "jcommonsenseqa-v1.3"
    full_valid = (jglue / "valid-v1.3.json").read_text(encoding="utf-8").splitlines()
    bundled = (TASKS_DIR / "jcommonsenseqa_validation.jsonl").read_text(encoding="utf-8").splitlines()
    assert bundled == full_valid[:len(bundled)]          # the bundled sample is the head of the real file
    task = tmp_path / "jcqa_full.yaml"
    task.write_text(json.dumps({"include": str(TASKS_DIR / "btx_jcommonsenseqa.yaml"), "task": "jcqa_full",
                                "dataset_kwargs": {"data_files": {"train": str(jglue / "train-v1.3.json"),
                                                                  "validation": str(jglue / "valid-v1.3.json")}}}))
    out = tmp_path / "out"
    handlers = {name: list(logging.getLogger(name).handlers) for name in ("", "lm-eval", "lm_eval")}
    rc = main(["--model", "btx", "--model_args", f"pretrained={dirs['stories']}", "--tasks", str(task),
               "--limit", "2", "--batch_size", "4", "--output_path", str(out)])
    for name, hs in handlers.items():                  # lm-eval's CLI set up logging on this test's stderr
        logging.getLogger(name).handlers[:] = hs
    assert rc == 0
    results = json.loads(next(out.rglob("results_*.json")).read_text())
    assert results["n-samples"]["jcqa_full"] == {"original": len(full_valid), "effective": 2}
    assert "acc,none" in results["results"]["jcqa_full"]
