"""A tiny masked-diffusion LM trained in the test (DAT spec §5.5 "tiny trainable task"): the
prompt x is a per-character lookup of the response y; after a short SFT-style training run
(`training.diffusion_lm`), inpainting x given y (`diffusion.inpaint`) recovers it. LoRA training
touches only the adapters."""

import jax
import numpy as np
import pytest

from mixat_jax import lora as lora_lib
from mixat_jax.diffusion.inpaint import inpaint_prompts
from mixat_jax.diffusion.sampler import SamplerConfig
from mixat_jax.models.config import LoraConfig
from mixat_jax.training.diffusion_lm import DiffusionData, train_diffusion_lm
from mixat_jax.training.optim import OptimConfig
from tests.diffusion_helpers import ANSWER_PREFIX, MASK, char_tokenizer, tiny_diffusion_model

FAST = {"xla_backend_optimization_level": 0}  # quick XLA:CPU compiles, same numerics
ALPHABET = "abcdefgh"
LOOKUP = dict(zip(ALPHABET, "cahbgfed", strict=True))
P = 6


def prompt_for(y: str) -> str:
    return "".join(LOOKUP[c] for c in y)


def task_data(tok, n, seed):
    """Rows `x | [BOS] answer_prefix y` with only x maskable (the SFT form: y never masked)."""
    rng = np.random.default_rng(seed)
    ys = ["".join(rng.choice(list(ALPHABET), P)) for _ in range(n)]
    rows = [
        tok(prompt_for(y), add_special_tokens=False)["input_ids"]
        + tok(ANSWER_PREFIX + y)["input_ids"]
        for y in ys
    ]
    ids = np.asarray(rows, np.int32)
    maskable = np.zeros(ids.shape, bool)
    maskable[:, :P] = True
    return DiffusionData(ids, np.ones(ids.shape, bool), maskable), ys


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer(ALPHABET)


@pytest.fixture(scope="module")
def trained(tok):
    data, _ = task_data(tok, 512, seed=0)
    model = tiny_diffusion_model(vocab_size=32)
    model, losses = train_diffusion_lm(
        model, data, steps=100, lr=3e-3, sft=True, batch_size=64, seed=0,
        optim=OptimConfig(max_grad_norm=1.0, weight_decay=0.0), compiler_options=FAST,
    )  # fmt: skip
    return model, losses


def test_trained_model_inpaints_the_prompt(trained, tok):
    model, losses = trained
    assert np.mean(losses[-10:]) < 0.25 * np.mean(losses[:10])
    rng = np.random.default_rng(123)
    responses = ["".join(rng.choice(list(ALPHABET), P)) for _ in range(12)]
    sampler = SamplerConfig(mask_token_id=MASK, steps=P)
    out = inpaint_prompts(
        model, tok, responses, prompt_length=P, num_samples=2, sampler=sampler, batch_size=16
    )
    assert [len(o) for o in out] == [2] * len(responses)
    hits = [
        a == b
        for samples, y in zip(out, responses, strict=True)
        for s in samples
        for a, b in zip(s.prompt.ljust(P), prompt_for(y), strict=True)
    ]
    assert np.mean(hits) >= 0.9, np.mean(hits)  # chance is 1/8
    for samples in out:
        assert all(s.log_likelihood <= 0 and len(s.token_ids) == P for s in samples)
        assert samples[0] == samples[1]  # T = 0 without conditioning dropout: deterministic


def test_lora_training_updates_only_adapters(tok):
    data, _ = task_data(tok, 64, seed=1)
    model = tiny_diffusion_model(vocab_size=32, seed=1)
    lora = LoraConfig.make(r=4, alpha=8, dropout=0.1)
    model.add_lora(lora, seed=0)
    _, lora_before, frozen_before = lora_lib.split(model)
    frozen_before = [np.asarray(x) for x in jax.tree.leaves(frozen_before)]
    lora_before = [np.asarray(x) for x in jax.tree.leaves(lora_before)]
    model, losses = train_diffusion_lm(
        model, data, steps=30, lr=1e-2, lora=lora, batch_size=16, seed=0, compiler_options=FAST
    )
    assert np.all(np.isfinite(losses))
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    _, lora_after, frozen_after = lora_lib.split(model)
    for old, new in zip(frozen_before, jax.tree.leaves(frozen_after), strict=True):
        np.testing.assert_array_equal(np.asarray(new), old)  # the base is untouched
    moved = [
        np.abs(np.asarray(new) - old).max()
        for old, new in zip(lora_before, jax.tree.leaves(lora_after), strict=True)
    ]
    assert min(moved) > 0  # every adapter factor was trained


def test_trainer_refuses_non_diffusion_models(tok):
    data, _ = task_data(tok, 4, seed=2)
    causal = tiny_diffusion_model(vocab_size=32, causal=True)
    with pytest.raises(ValueError, match="bidirectional"):
        train_diffusion_lm(causal, data, steps=1, lr=1e-3)
    no_mask = tiny_diffusion_model(vocab_size=32, mask_token_id=None)
    with pytest.raises(ValueError, match="mask_token_id"):
        train_diffusion_lm(no_mask, data, steps=1, lr=1e-3)
