"""Shared pieces of the masked-diffusion tests: a character-level tokenizer, tiny models, and the
sampler tests' canvases with their invariant checks (DAT spec §5.5)."""

from __future__ import annotations

import numpy as np
import transformers
from flax import nnx
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from mixat_jax.models.config import tiny_config
from mixat_jax.models.decoder import Decoder

SPECIALS = ("[PAD]", "[BOS]", "[EOS]", "[UNK]", "[MASK]")  # ids 0..4
CANVAS_V, CANVAS_MASK, CANVAS_PAD = 64, 63, 0  # the sampler tests' vocabulary
PAD, BOS, EOS, UNK, MASK = range(5)
ANSWER_PREFIX = "\nAnswer: "


def char_tokenizer(chars: str) -> transformers.PreTrainedTokenizerFast:
    """One token per character of `chars` (+ the answer prefix's), BOS prepended on encode."""
    alphabet = sorted(set(chars) | set(ANSWER_PREFIX))
    vocab = {t: i for i, t in enumerate([*SPECIALS, *alphabet])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.post_processor = processors.TemplateProcessing(
        single="[BOS] $A", pair="[BOS] $A [BOS] $B", special_tokens=[("[BOS]", BOS)]
    )
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="[BOS]",
        eos_token="[EOS]",
        pad_token="[PAD]",
        unk_token="[UNK]",
        mask_token="[MASK]",
    )
    return tok


def tiny_diffusion_model(vocab_size: int = 32, seed: int = 0, **kw) -> Decoder:
    cfg = tiny_config(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=4,
        head_dim=16,
        causal=False,
        mask_token_id=MASK,
        pad_token_id=PAD,
        max_position_embeddings=64,
    )
    return Decoder(cfg.replace(**kw), rngs=nnx.Rngs(seed))


# ----------------------------------------------------------------------------- sampler canvases
def make_canvas(b=8, l=16, seed=0):
    """Rows with right and left padding; the editable span holds masks and one known token."""
    rng = np.random.RandomState(seed)
    canvas = rng.randint(3, CANVAS_MASK, size=(b, l)).astype(np.int32)
    attn = np.ones((b, l), bool)
    editable = np.zeros((b, l), bool)
    for i in range(b):
        pad = i % 3
        if i % 2:  # left padded: [pad | span | answer]
            attn[i, :pad] = False
            canvas[i, :pad] = CANVAS_PAD
            span = slice(pad, pad + 7)
        else:  # right padded: [answer | span | pad]
            attn[i, l - pad :] = False
            canvas[i, l - pad :] = CANVAS_PAD
            span = slice(3, 10)
        editable[i, span] = True
        canvas[i, span] = CANVAS_MASK
        if i % 4 == 0:
            canvas[i, span.start + 2] = 5  # an editable position that is already known
    canvas[0, l - 2] = CANVAS_MASK  # a non-editable mask stays a mask (conditioning)
    return canvas, attn, editable


def schedule_reference(canvas, attn, editable, cfg):
    """[S, B] reveal counts from the spec's recipe, in NumPy."""
    b, _ = canvas.shape
    spb = cfg.steps_per_block
    out = np.zeros((cfg.steps, b), np.int64)
    for i in range(b):
        span = np.flatnonzero(editable[i] & attn[i])
        fill = canvas[i, span] == cfg.mask_token_id
        blocks = np.arange(len(span)) * cfg.num_blocks // len(span)
        for s in range(cfg.steps):
            n = int(fill[blocks == s // spb].sum())
            out[s, i] = n // spb + (s % spb < n % spb)
    return out


def check_invariants(out, canvas, attn, editable, cfg, exact_counts=True):
    """Spec §5.5: fixed tokens never change, the span ends unmasked, suppressed ids never appear,
    the path log-likelihood is finite and <= 0, and each step reveals the scheduled count."""
    got = np.asarray(out.canvas_BxL)
    fixed = ~(editable & attn) | (canvas != CANVAS_MASK)
    np.testing.assert_array_equal(got[fixed], canvas[fixed])  # non-editable never changes
    assert not np.any(got[editable & attn] == CANVAS_MASK)  # nothing left masked in the span
    assert not np.isin(got[editable & (canvas == CANVAS_MASK)], cfg.suppress_ids).any()
    logp = np.asarray(out.logp_B)
    assert np.all(np.isfinite(logp)) and np.all(logp <= 0)
    revealed = np.asarray(out.revealed_SxB)
    want = schedule_reference(canvas, attn, editable, cfg)
    if exact_counts:
        np.testing.assert_array_equal(revealed, want)
    else:  # Dream's origin: random counts, every block complete at its last step
        spb = cfg.steps_per_block
        np.testing.assert_array_equal(
            revealed.reshape(cfg.num_blocks, spb, -1).sum(1),
            want.reshape(cfg.num_blocks, spb, -1).sum(1),
        )
