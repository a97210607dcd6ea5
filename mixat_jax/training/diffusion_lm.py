"""A small trainer for masked-diffusion LMs (DAT spec §5.1 loss; §5.5 "tiny trainable task").

`train_diffusion_lm(model, data, *, steps, lr, lora=None, ...)` fine-tunes a bidirectional
`Decoder` (`cfg.causal=False`, `cfg.mask_token_id` set) on the masked-diffusion loss of
`diffusion.objectives` — pre-training form, or the SFT form (`sft=True`: only `maskable`
positions are ever masked, loss normalised by answer length). Full fine-tuning updates every
`nnx.Param`; with a `LoraConfig` the adapters are attached (`lora.ensure_lora`) and only they are
trained, through the same split as MixAT (`lora.split`) and the same optimizer
(`training.optim.make_optimizer`: clip + AdamW + cosine). One jitted step with static shapes;
batches of `batch_size` rows are drawn with a numpy Generator seeded by `seed`, step keys are
`fold_in(key(seed), step)`.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np
import optax
from flax import nnx

from mixat_jax import lora as lora_lib
from mixat_jax.diffusion.denoiser import decoder_logits_fn
from mixat_jax.diffusion.objectives import masked_diffusion_loss
from mixat_jax.models.config import LoraConfig
from mixat_jax.models.decoder import Decoder
from mixat_jax.training.optim import OptimConfig, make_optimizer


class DiffusionData(NamedTuple):
    """Right- or left-padded training rows; `maskable` marks what the forward process may mask."""

    ids_NxL: np.ndarray
    attn_mask_NxL: np.ndarray
    maskable_NxL: np.ndarray


@dataclasses.dataclass(frozen=True)
class DiffusionLossConfig:
    mask_token_id: int
    shift_logits: bool = False
    sft: bool = False
    lora_dropout: bool = False  # pass a dropout key to the model (LoRA dropout on)


@functools.partial(
    jax.jit, static_argnames=("graphdef", "tx", "cfg"), donate_argnames=("trainable", "opt_state")
)
def diffusion_train_step(
    graphdef: nnx.GraphDef,
    trainable: nnx.State,
    opt_state: optax.OptState,
    frozen: nnx.State,
    batch: DiffusionData,
    key: jax.Array,
    *,
    tx: optax.GradientTransformation,
    cfg: DiffusionLossConfig,
) -> tuple[nnx.State, optax.OptState, jax.Array]:
    """One optimizer step on the masked-diffusion loss; gradients w.r.t. `trainable` only."""
    key_loss, key_dropout = jax.random.split(key)

    def loss_of(params: nnx.State) -> jax.Array:
        logits_fn = decoder_logits_fn(
            graphdef, params, frozen, dropout_key=key_dropout if cfg.lora_dropout else None
        )
        return masked_diffusion_loss(
            logits_fn,
            batch.ids_NxL,
            batch.attn_mask_NxL,
            batch.maskable_NxL,
            key_loss,
            mask_token_id=cfg.mask_token_id,
            shift_logits=cfg.shift_logits,
            sft=cfg.sft,
        )

    loss, grads = jax.value_and_grad(loss_of)(trainable)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, loss


def train_diffusion_lm(
    model: Decoder,
    data: DiffusionData,
    *,
    steps: int,
    lr: float,
    lora: LoraConfig | None = None,
    sft: bool = False,
    batch_size: int = 32,
    seed: int = 0,
    log_every: int = 0,
    optim: OptimConfig | None = None,
    log: Callable[[str], None] | None = None,
    compiler_options: dict[str, Any] | None = None,
) -> tuple[Decoder, list[float]]:
    """Trains `model` in place (returned too) and gives the per-step losses.

    The step is compiled once, ahead of time (`compiler_options` go to XLA, e.g.
    `{"xla_backend_optimization_level": 0}` for quick CPU tests)."""
    cfg = model.cfg
    if cfg.mask_token_id is None:
        raise ValueError("the model config has no mask_token_id; it is not a masked-diffusion LM")
    if cfg.causal:
        raise ValueError("masked-diffusion training needs a bidirectional model (causal=False)")
    data = DiffusionData(*(np.asarray(a) for a in data))
    n = len(data.ids_NxL)
    if n == 0 or steps < 1:
        raise ValueError(f"need at least one training row and one step; got {n} rows, {steps}")
    tx = make_optimizer(dataclasses.replace(optim or OptimConfig(), learning_rate=lr), steps)
    if lora is not None:
        lora_lib.ensure_lora(model, lora, seed)
        graphdef, trainable, frozen = lora_lib.split(model)
    else:
        graphdef, trainable, frozen = nnx.split(model, nnx.Param, ...)
    loss_cfg = DiffusionLossConfig(
        mask_token_id=cfg.mask_token_id,
        shift_logits=cfg.shift_logits,
        sft=sft,
        lora_dropout=lora is not None and lora.dropout > 0,
    )
    opt_state = tx.init(trainable)
    rng = np.random.default_rng(seed)
    key = jax.random.key(seed)
    log = log or (lambda s: print(s, file=sys.stderr))
    losses = []
    t0 = time.time()
    step_fn = None
    for step in range(steps):
        idx = rng.integers(0, n, batch_size)
        batch = DiffusionData(*(a[idx] for a in data))
        step_key = jax.random.fold_in(key, step)
        if step_fn is None:
            lowered = diffusion_train_step.lower(
                graphdef, trainable, opt_state, frozen, batch, step_key, tx=tx, cfg=loss_cfg
            )
            step_fn = lowered.compile(compiler_options)
        trainable, opt_state, loss = step_fn(trainable, opt_state, frozen, batch, step_key)
        losses.append(loss)
        if log_every and (step % log_every == 0 or step == steps - 1):
            log(f"[diffusion lm] step {step + 1}/{steps} loss {float(loss):.4f} | "
                f"{time.time() - t0:.0f}s")  # fmt: skip
    nnx.update(model, trainable)
    return model, [float(x) for x in losses]
