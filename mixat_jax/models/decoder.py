"""The decoder family MixAT trains (Llama 2/3/3.1, Mistral/Zephyr, Qwen2/2.5) as one NNX module.

The one model API every attack uses (DESIGN.md rule 3):
  * `embed(ids_BxL) -> emb_BxLxD`
  * `forward(emb_BxLxD, mask_BxL, positions_BxL, cache=..., logits_at_BxT=...) -> (logits, cache)`
  * `apply_embeddings(emb_BxLxD, mask_BxL, positions_BxL) -> logits_BxLxV`
  * `__call__(input_ids_BxL, attention_mask_BxL) -> logits_BxLxV`

Positions default to `cumsum(mask) - 1`, so left- and right-padded batches give identical logits
for the real tokens (MixAT spec §11.16). Blocks are stacked on a leading layer axis and applied with
`lax.scan` (optionally `jax.checkpoint`-ed), which keeps compile time flat in depth. A KV cache
(`init_cache`) serves generation and the GCG prefix; `cfg.causal=False` gives the bidirectional
attention of masked-diffusion LMs (DAT).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mixat_jax.models import layers
from mixat_jax.models.config import LINEAR_NAMES, LoraConfig, ModelConfig

Cache = dict[str, jax.Array]  # k, v: [N, B, S, K, Dh]; mask: [B, S] (bool, slot holds a real token)


class Block(nnx.Module):
    """One pre-norm decoder block; parameters stacked over `stack` leading axes."""

    def __init__(self, cfg: ModelConfig, stack: tuple[int, ...], rngs: nnx.Rngs):
        dt = layers.dtype_from_name(cfg.dtype)
        d, f = cfg.hidden_size, cfg.intermediate_size

        def lin(d_in, d_out, axes, bias):
            return layers.Linear(stack, d_in, d_out, axes, use_bias=bias, dtype=dt, rngs=rngs)

        self.input_layernorm = layers.RMSNorm(stack, d, cfg.rms_norm_eps, dt)
        self.q_proj = lin(d, cfg.q_size, ("embed", "heads"), cfg.qkv_bias)
        self.k_proj = lin(d, cfg.kv_size, ("embed", "kv_heads"), cfg.qkv_bias)
        self.v_proj = lin(d, cfg.kv_size, ("embed", "kv_heads"), cfg.qkv_bias)
        self.o_proj = lin(cfg.q_size, d, ("heads", "embed"), cfg.o_bias)
        self.post_attention_layernorm = layers.RMSNorm(stack, d, cfg.rms_norm_eps, dt)
        self.gate_proj = lin(d, f, ("embed", "mlp"), cfg.mlp_bias)
        self.up_proj = lin(d, f, ("embed", "mlp"), cfg.mlp_bias)
        self.down_proj = lin(f, d, ("mlp", "embed"), cfg.mlp_bias)

    def linears(self) -> dict[str, layers.Linear]:
        return {name: getattr(self, name) for name in LINEAR_NAMES}

    def __call__(
        self,
        cfg: ModelConfig,
        x_BxLxD: jax.Array,
        cos_sin: tuple[jax.Array, jax.Array],
        kv: tuple[jax.Array, jax.Array] | None,
        allowed_BxLxS: jax.Array | tuple[jax.Array, jax.Array],
        cache_index: jax.Array,
        key: jax.Array | None,
        shared_prefix: bool = False,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        keys = [None] * 7 if key is None else list(layers.split_keys(key, 7))
        b, l, _ = x_BxLxD.shape
        dt = self.q_proj.kernel[...].dtype  # compute dtype; the residual stream stays fp32
        h = self.input_layernorm(x_BxLxD).astype(dt)
        q = self.q_proj(h, keys[0]).reshape(b, l, cfg.num_heads, cfg.head_dim)
        k = self.k_proj(h, keys[1]).reshape(b, l, cfg.num_kv_heads, cfg.head_dim)
        v = self.v_proj(h, keys[2]).reshape(b, l, cfg.num_kv_heads, cfg.head_dim)
        q = layers.apply_rope(q, *cos_sin)
        k = layers.apply_rope(k, *cos_sin)
        if shared_prefix:
            pk, pv = kv  # [1, S, K, Dh], read-only
            attn = layers.attend_with_prefix(
                q, pk[0].astype(q.dtype), pv[0].astype(q.dtype), k, v, *allowed_BxLxS
            )
            kv = None
        elif kv is not None:
            k_cache, v_cache = kv
            k_cache = jax.lax.dynamic_update_slice(
                k_cache, k.astype(k_cache.dtype), (0, cache_index, 0, 0)
            )
            v_cache = jax.lax.dynamic_update_slice(
                v_cache, v.astype(v_cache.dtype), (0, cache_index, 0, 0)
            )
            k_all, v_all = k_cache.astype(q.dtype), v_cache.astype(q.dtype)
        else:
            k_all, v_all = k, v
        if not shared_prefix:
            attn = layers.attend(q, k_all, v_all, allowed_BxLxS)
        x = x_BxLxD + self.o_proj(attn, keys[3]).astype(x_BxLxD.dtype)
        h = self.post_attention_layernorm(x).astype(dt)
        gate = self.gate_proj(h, keys[4])
        up = self.up_proj(h, keys[5])
        x = x + self.down_proj(jax.nn.silu(gate) * up, keys[6]).astype(x.dtype)
        return x, ((k_all, v_all) if kv is not None else None)


class Decoder(nnx.Module):
    """Token embedding, N stacked blocks (scanned), final norm, LM head (tied or not)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        dt = layers.dtype_from_name(cfg.dtype)
        self.cfg = cfg
        init = jax.nn.initializers.normal(0.02)
        self.embed_tokens = nnx.Param(
            init(rngs.params(), (cfg.vocab_size, cfg.hidden_size), dt), axes=("vocab", "embed")
        )
        self.layers = Block(cfg, (cfg.num_layers,), rngs)
        self.norm = layers.RMSNorm((), cfg.hidden_size, cfg.rms_norm_eps, dt)
        self.lm_head = (
            None
            if cfg.tie_word_embeddings
            else nnx.Param(
                init(rngs.params(), (cfg.hidden_size, cfg.vocab_size), dt), axes=("embed", "vocab")
            )
        )

    # ------------------------------------------------------------------ LoRA
    def add_lora(self, lora: LoraConfig, seed: int = 0) -> None:
        """Attaches fresh LoRA factors (A random, B zero: the adapted model equals the base)."""
        key = jax.random.key(seed)
        for i, (name, lin) in enumerate(self.layers.linears().items()):
            if name in lora.targets:
                lin.add_lora(lora, jax.random.fold_in(key, i))

    def lora_config(self) -> LoraConfig | None:
        lins = [(n, m) for n, m in self.layers.linears().items() if m.lora_a is not None]
        if not lins:
            return None
        _, first = lins[0]
        r = first.lora_a.shape[-1]
        return LoraConfig(
            r=r,
            alpha=first.lora_scale * r,
            dropout=first.lora_dropout,
            targets=tuple(n for n, _ in lins),
        )

    def set_lora_dropout(self, rate: float) -> None:
        for lin in self.layers.linears().values():
            if lin.lora_a is not None:
                lin.lora_dropout = float(rate)

    # ------------------------------------------------------------------ API
    @property
    def embedding_matrix(self) -> jax.Array:
        return self.embed_tokens[...]

    def embed(self, ids_BxL: jax.Array) -> jax.Array:
        return jnp.take(self.embed_tokens[...], ids_BxL, axis=0)

    def head(self, h_BxTxD: jax.Array) -> jax.Array:
        """Final norm + LM head, fp32 logits."""
        w = self.embed_tokens[...].T if self.lm_head is None else self.lm_head[...]
        h = self.norm(h_BxTxD).astype(w.dtype)
        return jnp.einsum("btd,dv->btv", h, w, preferred_element_type=jnp.float32)

    def init_cache(self, batch: int, max_len: int, dtype: jnp.dtype | None = None) -> Cache:
        cfg = self.cfg
        dt = dtype or layers.dtype_from_name(cfg.dtype)
        shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
        return {
            "k": jnp.zeros(shape, dt),
            "v": jnp.zeros(shape, dt),
            "mask": jnp.zeros((batch, max_len), bool),
        }

    def forward(
        self,
        emb_BxLxD: jax.Array,
        mask_BxL: jax.Array,
        positions_BxL: jax.Array | None = None,
        *,
        cache: Cache | None = None,
        cache_index: jax.Array | int = 0,
        logits_at_BxT: jax.Array | None = None,
        dropout_key: jax.Array | None = None,
        return_hidden: bool = False,
    ) -> tuple[jax.Array, Cache | None]:
        """Runs the decoder on input embeddings.

        Args:
          emb_BxLxD: input embeddings (any float dtype; cast to the compute dtype).
          mask_BxL: 1 for real tokens, 0 for padding.
          positions_BxL: RoPE positions; default `cumsum(mask) - 1` (+ tokens already cached).
          cache: optional KV cache; the L new tokens are written at slots
            [cache_index, cache_index + L). A cache of batch 1 with B > 1 is a *shared prefix*
            (GCG): it is attended without being copied per row, and is not updated (the
            returned cache is None).
          logits_at_BxT: if given, logits only at these positions ([B, T, V]) — the LM head never
            sees the other positions.
          dropout_key: enables LoRA dropout (training-mode attacks and steps); None = deterministic.
            One key for the batch, or one key per row ([B] keys: each row's masks depend only on
            its own key, so results do not depend on how rows are batched).
          return_hidden: return final hidden states (pre-norm) instead of logits.
        Returns:
          (logits fp32 [B, L or T, V] or hidden [B, L or T, D], updated cache or None).
        """
        cfg = self.cfg
        # Residual stream in fp32 (as the reference, whose non-quantised params are upcast to fp32):
        # a 1e-4 perturbation of an embedding survives; matmuls run in the compute dtype.
        x = emb_BxLxD.astype(jnp.float32)
        b, l, _ = x.shape
        mask = mask_BxL.astype(bool)
        cache_index = jnp.asarray(cache_index, jnp.int32)
        shared = cache is not None and cache["mask"].shape[0] == 1 and b > 1
        if shared:
            pre_mask = cache["mask"]  # [1, S]
            s = pre_mask.shape[1]
            prior = jnp.broadcast_to(jnp.sum(pre_mask, axis=-1, dtype=jnp.int32)[:, None], (b, 1))
            key_mask = mask
            q_slot = cache_index + jnp.arange(l)
        elif cache is not None:
            prior = jnp.sum(cache["mask"], axis=-1, dtype=jnp.int32)[:, None]
            key_mask = jax.lax.dynamic_update_slice(cache["mask"], mask, (0, cache_index))
            s = key_mask.shape[1]
            q_slot = cache_index + jnp.arange(l)
        else:
            prior = jnp.zeros((b, 1), jnp.int32)
            key_mask = mask
            s = l
            q_slot = jnp.arange(l)
        if positions_BxL is None:
            positions_BxL = prior + jnp.maximum(jnp.cumsum(mask, axis=-1, dtype=jnp.int32) - 1, 0)
        if shared:
            pre_slot = jnp.arange(s)
            allowed_pre = jnp.broadcast_to(
                (pre_mask & (pre_slot < cache_index)[None])[:, None, :], (b, l, s)
            )
            allowed_own = self._allowed(mask, q_slot, q_slot)
            if cfg.sliding_window is not None:
                allowed_pre = allowed_pre & (
                    pre_slot[None, None, :] > q_slot[None, :, None] - cfg.sliding_window
                )
            allowed = (allowed_pre, allowed_own)
        else:
            allowed = self._allowed(key_mask, q_slot, jnp.arange(s))
        cos_sin = layers.rope_tables(cfg, positions_BxL)

        graphdef, state = nnx.split(self.layers)
        layer_keys = None if dropout_key is None else layers.split_keys(dropout_key, cfg.num_layers)
        kv_in = None if cache is None else (cache["k"], cache["v"])

        def body(carry, xs):
            st, kv, key = xs
            block = nnx.merge(graphdef, st)
            return block(cfg, carry, cos_sin, kv, allowed, cache_index, key, shared)

        if cfg.remat:
            body = jax.checkpoint(body, prevent_cse=False)
        x, kv_out = jax.lax.scan(body, x, (state, kv_in, layer_keys))
        new_cache = None
        if cache is not None and not shared:
            k_new, v_new = kv_out
            new_cache = {
                "k": k_new.astype(cache["k"].dtype),
                "v": v_new.astype(cache["v"].dtype),
                "mask": key_mask,
            }
        if logits_at_BxT is not None:
            x = jnp.take_along_axis(x, logits_at_BxT[..., None], axis=1)
        if return_hidden:
            return x, new_cache
        return self.head(x), new_cache

    def _allowed(
        self, key_mask_BxS: jax.Array, q_slot_L: jax.Array, k_slot_S: jax.Array
    ) -> jax.Array:
        """Boolean [B, L, S]: key valid, causal by slot, inside the sliding window."""
        cfg = self.cfg
        b, s = key_mask_BxS.shape
        allowed = jnp.broadcast_to(key_mask_BxS[:, None, :], (b, q_slot_L.shape[0], s))
        if cfg.causal:
            allowed = allowed & (k_slot_S[None, None, :] <= q_slot_L[None, :, None])
            if cfg.sliding_window is not None:
                allowed = allowed & (
                    k_slot_S[None, None, :] > q_slot_L[None, :, None] - cfg.sliding_window
                )
        return allowed

    def apply_embeddings(
        self,
        emb_BxLxD: jax.Array,
        mask_BxL: jax.Array,
        positions_BxL: jax.Array | None = None,
        **kw,
    ) -> jax.Array:
        return self.forward(emb_BxLxD, mask_BxL, positions_BxL, **kw)[0]

    def __call__(
        self, input_ids_BxL: jax.Array, attention_mask_BxL: jax.Array | None = None
    ) -> jax.Array:
        ids = jnp.asarray(input_ids_BxL)
        mask = jnp.ones(ids.shape, bool) if attention_mask_BxL is None else attention_mask_BxL
        return self.apply_embeddings(self.embed(ids), mask)
