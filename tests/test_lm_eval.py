"""lm-evaluation-harness on the jitted decoder (issue #13): `evaluation.harness.MixatLM` and the
`python -m mixat_jax.lm_eval` entry point, on a tiny local multiple-choice task (hub datasets are
not reachable here). The harness's acc must equal the accuracy computed independently from the
decoder's own full-sequence log-probabilities, with and without a LoRA adapter."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

pytest.importorskip("lm_eval")

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = [
    ("What color is the sky on a clear day?", ["blue", "green", "loud", "seven"], 0),
    ("How many legs does a cat have?", ["three", "four", "a river", "yesterday"], 1),
    ("Which one is a fruit?", ["a stone", "apple", "the moon", "running"], 1),
    ("What do bees make?", ["bricks", "songs", "honey", "cars"], 2),
    ("Where do fish live?", ["water", "sand", "a cloud", "fire"], 0),
    ("What is frozen water called?", ["steam", "smoke", "glass", "ice"], 3),
]
PLAIN_SCORES: list[list[float]] = []  # the base model's direct scores (first test)
TASK_YAML = """task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{label}}}}"
doc_to_choice: "{{{{choices}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def tiny_model_adapter_and_task(root: Path, seed: int) -> tuple[Path, Path, Path]:
    """A tiny checkpoint, a LoRA adapter that visibly changes it, and the local `tiny_mc` task
    (directory of the YAML + JSONL) under ``root``."""
    from mixat_jax.hf.export import save_adapter
    from mixat_jax.hf.load import load_pretrained
    from mixat_jax.lora import LoraConfig
    from mixat_jax.tiny_model import build_tiny_checkpoint
    from mixat_jax.tokenizer_build import default_corpus

    base = build_tiny_checkpoint(
        root / "model", vocab_size=512, hidden_size=32, num_layers=1, corpus=default_corpus(20_000)
    )
    model, _ = load_pretrained(base)
    model.add_lora(LoraConfig.make(r=2, alpha=16, dropout=0.0, targets="all-linear"), seed=seed)
    for i, lin in enumerate(model.layers.linears().values()):
        key = jax.random.fold_in(jax.random.key(seed), i)
        lin.lora_b.set_value(jax.random.normal(key, lin.lora_b.shape) * 2.0)
    adapter = save_adapter(model, root / "adapter", base_model=str(base))
    tasks = root / "tasks"
    tasks.mkdir()
    data = tasks / "tiny_mc.jsonl"
    data.write_text(
        "".join(
            json.dumps({"question": q, "choices": c, "label": y}) + "\n" for q, c, y in QUESTIONS
        )
    )
    (tasks / "tiny_mc.yaml").write_text(TASK_YAML.format(data=data))
    return base, adapter, tasks


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return tiny_model_adapter_and_task(tmp_path_factory.mktemp("lm_eval"), seed=3)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def full_logits(graphdef, state, ids_1xL):
    return nnx.merge(graphdef, state)(ids_1xL)


def token_loglik(model, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
    """sum log p(cont | ctx) from one full-sequence forward (every position's logits; right
    padding to 64 tokens cannot change a causal model's earlier positions)."""
    whole = ctx + cont
    ids = np.zeros((1, 64), np.int32)
    ids[0, : len(whole)] = whole
    logits = np.asarray(full_logits(*nnx.split(model), ids), np.float64)[0]
    top = logits.max(-1, keepdims=True)
    logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    pos = range(len(ctx) - 1, len(whole) - 1)
    total = sum(logp[p, t] for p, t in zip(pos, cont, strict=True))
    greedy = all(int(np.argmax(logp[p])) == t for p, t in zip(pos, cont, strict=True))
    return float(total), greedy


def direct_loglik(model, tok, context: str, continuation: str) -> tuple[float, bool]:
    """No harness code: encode context + continuation whole, split at the context's length."""
    ctx = tok(context)["input_ids"]
    whole = tok(context + continuation)["input_ids"]
    return token_loglik(model, ctx, whole[len(ctx) :])


def independent_acc(model, tok) -> tuple[float, list[list[float]]]:
    scores = [
        [direct_loglik(model, tok, f"Question: {q}\nAnswer:", " " + c)[0] for c in choices]
        for q, choices, _ in QUESTIONS
    ]
    hits = [int(np.argmax(s)) == y for s, (_, _, y) in zip(scores, QUESTIONS, strict=True)]
    return float(np.mean(hits)), scores


class Req:
    def __init__(self, *args):
        self.args = args


def test_harness_acc_and_loglikelihood_match_the_decoder(setup):
    from lm_eval import evaluator
    from lm_eval.tasks import TaskManager

    from mixat_jax.evaluation.harness import MixatLM
    from mixat_jax.hf.load import load_pretrained
    from mixat_jax.sampling import TextGenerator

    base, _, tasks = setup
    model, tok = load_pretrained(base)
    lm = MixatLM(generator=TextGenerator(model, tok), batch_size=4, max_length=256)
    res = evaluator.simple_evaluate(
        model=lm, tasks=["tiny_mc"], task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
        log_samples=False, bootstrap_iters=0,
    )  # fmt: skip
    acc, scores = independent_acc(model, tok)
    assert res["results"]["tiny_mc"]["acc,none"] == pytest.approx(acc)
    PLAIN_SCORES.extend(scores)

    # the class's loglikelihood: every (question, choice) equals the direct computation
    reqs = [Req(f"Question: {q}\nAnswer:", " " + c) for q, cs, _ in QUESTIONS for c in cs]
    got = lm.loglikelihood(reqs, disable_tqdm=True)
    want = [direct_loglik(model, tok, *r.args) for r in reqs]
    np.testing.assert_allclose([g[0] for g in got], [w[0] for w in want], rtol=1e-4, atol=1e-4)
    assert [g[1] for g in got] == [w[1] for w in want]
    assert [w[0] for w in want] == pytest.approx([s for row in scores for s in row])

    # the harness's own construction path (model="mixat_jax", model_args=...) loads the same
    by_args = MixatLM.create_from_arg_string(
        f"pretrained={base},max_length=256", {"batch_size": None, "device": None}
    )
    assert by_args.loglikelihood(reqs[:1], disable_tqdm=True)[0][0] == pytest.approx(got[0][0])

    # rolling log-likelihood of a short text = sum log p(token | BOS + previous tokens)
    text = "Bees make honey in the summer."
    ids = tok(text, add_special_tokens=False)["input_ids"]
    (rolling,) = lm.loglikelihood_rolling([Req(text)], disable_tqdm=True)
    assert rolling == pytest.approx(token_loglik(model, [lm.prefix_token_id], ids)[0], abs=1e-3)

    # generate_until: greedy continuation, cut at the first stop string
    prompt = "Question: What do bees make?\nAnswer:"
    (free,) = lm.generate_until([Req(prompt, {"until": [], "max_gen_toks": 12})])
    assert len(free) >= 4, free
    stop = free[2:4]
    (cut,) = lm.generate_until([Req(prompt, {"until": [stop], "max_gen_toks": 12})])
    assert cut == free[: free.index(stop)]


def test_cli_with_adapter_writes_the_harness_results(setup, tmp_path):
    from mixat_jax.hf.load import load_pretrained

    base, adapter, tasks = setup
    out = tmp_path / "out"
    cmd = [
        sys.executable, "-m", "mixat_jax.lm_eval", "--model", str(base), "--adapter", str(adapter),
        "--tasks", "tiny_mc", "--include_path", str(tasks), "--output_path", str(out),
        "--batch_size", "4", "--max_length", "256",
    ]  # fmt: skip
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "JAX_PLATFORMS": "cpu"}
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert "tiny_mc" in (out / "results.md").read_text() and "tiny_mc" in p.stdout
    adapted, tok = load_pretrained(base, adapter=adapter)
    acc, scores = independent_acc(adapted, tok)
    assert res["results"]["tiny_mc"]["acc,none"] == pytest.approx(acc)
    if PLAIN_SCORES:  # the adapter changes the scores the harness ranks
        assert not np.allclose(scores, PLAIN_SCORES, atol=1e-3)


@pytest.mark.parametrize(
    "block, extra, message",
    [
        (
            True,
            [],
            "error: mixat_jax.lm_eval needs the lm-eval package; pip install 'lm-eval>=0.4.9'",
        ),
        (False, ["--num_fewshot", "-1"], "error: --num_fewshot=-1 must be >= 0"),
    ],
    ids=["missing-lm-eval", "bad-flag"],
)
def test_missing_lm_eval_or_bad_flag_is_one_line(tmp_path, block, extra, message):
    argv = ["lm_eval", "--model", str(tmp_path), "--tasks", "arc_easy", *extra]
    code = (
        "import sys; sys.modules['lm_eval'] = None; " if block else "import sys; "
    ) + f"sys.argv = {argv!r}; from mixat_jax.lm_eval import run; run()"
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == [message]
    assert not any(tmp_path.iterdir())  # nothing written
