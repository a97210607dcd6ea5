"""GCG token filters and tokenisation in the full prompt context (spec mixat.md §6.4, peers.md §1).

Implements:
  * ``banned_token_mask``: the precomputed [V] mask of tokens GCG may never place in the suffix
    (nanoGCG ``get_nonascii_toks`` / HarmBench ``allow_non_ascii=False``): non-printable or
    non-ASCII tokens, every special/added token (BOS/EOS/PAD/UNK, chat markers), tokens that decode
    to nothing, and embedding rows beyond the tokenizer (padded vocabularies).
  * ``PromptSlots`` / ``slot_prompt``: the prompt split into ``before ⊕ suffix ⊕ after`` ids *as
    the full rendered prompt tokenises* (nanoGCG #24): the suffix span is the set of tokens that
    overlap the ``{optim_str}`` text in the full tokenisation, so a space the template puts
    before the slot joins the first suffix token (" x") exactly as it would in the real prompt.
  * ``PromptSlots.retokenizes``: decode→encode of a candidate *in context* reproduces the ids.
  * ``retokenizes_alone``: HarmBench's check — decode→encode of the suffix *on its own* (no
    special tokens) reproduces the ids (``filter_mode="harmbench"``, issue #17).
"""

from __future__ import annotations

import dataclasses
import weakref

import numpy as np

from mixat_jax.chat import OPTIM_STR, ChatRenderer

_BANNED_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _decode(tokenizer, ids) -> str:
    return tokenizer.decode(
        list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False
    )


def retokenizes_alone(tokenizer, suffix_ids) -> bool:
    """HarmBench's filter: the decoded suffix re-encodes (no special tokens) to the same ids."""
    ids = [int(t) for t in suffix_ids]
    return tokenizer(_decode(tokenizer, ids), add_special_tokens=False)["input_ids"] == ids


def banned_token_mask(tokenizer, vocab_size: int, *, allow_non_ascii: bool = False) -> np.ndarray:
    """Bool [vocab_size]: True for tokens GCG must not use (cached per tokenizer)."""
    try:
        per_tok = _BANNED_CACHE.setdefault(tokenizer, {})
    except TypeError:  # tokenizer not weak-referenceable: no caching
        per_tok = {}
    key = (int(vocab_size), bool(allow_non_ascii))
    if key in per_tok:
        return per_tok[key]
    n = min(len(tokenizer), vocab_size)
    banned = np.ones((vocab_size,), bool)
    texts = tokenizer.batch_decode(
        [[i] for i in range(n)], skip_special_tokens=False, clean_up_tokenization_spaces=False
    )
    for i, s in enumerate(texts):
        banned[i] = (not s) or (not allow_non_ascii and not (s.isascii() and s.isprintable()))
    special = set(tokenizer.all_special_ids) | set(tokenizer.get_added_vocab().values())
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        if getattr(tokenizer, name, None) is not None:
            special.add(int(getattr(tokenizer, name)))
    special = [i for i in special if 0 <= i < vocab_size]
    banned[special] = True
    per_tok[key] = banned
    return banned


def allowed_token_mask(tokenizer, vocab_size: int, *, allow_non_ascii: bool = False) -> np.ndarray:
    """Bool [vocab_size] of usable suffix tokens; raises if there are none."""
    allowed = ~banned_token_mask(tokenizer, vocab_size, allow_non_ascii=allow_non_ascii)
    if not allowed.any():
        raise ValueError(
            f"no token of the {vocab_size}-token vocabulary is allowed in the GCG suffix "
            f"(allow_non_ascii={allow_non_ascii}); every token is special, empty or non-ASCII"
        )
    return allowed


@dataclasses.dataclass(frozen=True)
class PromptSlots:
    """A rendered prompt split around the optimised span, as the full prompt tokenises.

    ``before_text + decode(suffix_ids) + after_text`` is the full prompt text; ``before_ids``,
    ``suffix_ids``, ``after_ids`` its ids. ``instruction_head + suffix_text + instruction_tail``
    is the user instruction (test case) that renders to that prompt.
    """

    before_text: str
    after_text: str
    before_ids: tuple[int, ...]
    suffix_ids: tuple[int, ...]
    after_ids: tuple[int, ...]
    instruction_head: str
    instruction_tail: str

    def prompt_ids(self, suffix_ids) -> list[int]:
        return [*self.before_ids, *map(int, suffix_ids), *self.after_ids]

    def retokenizes(self, renderer: ChatRenderer, suffix_ids) -> bool:
        """True if the full prompt with this suffix tokenises back to exactly these ids."""
        text = self.before_text + _decode(renderer.tokenizer, suffix_ids) + self.after_text
        return renderer.encode(text) == self.prompt_ids(suffix_ids)

    def test_case(self, tokenizer, suffix_ids) -> str:
        """The instruction (behaviour with the suffix in its slot) for this suffix."""
        return self.instruction_head + _decode(tokenizer, suffix_ids) + self.instruction_tail


def _offsets(renderer: ChatRenderer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    ids = renderer.encode(text)
    enc = renderer.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = [tuple(o) for o in enc["offset_mapping"]]
    extra = len(ids) - len(offsets)
    if extra not in (0, 1):
        raise ValueError("ChatRenderer.encode and the tokenizer disagree on the prompt length")
    return ids, [(0, 0)] * extra + offsets


def slot_prompt(
    renderer: ChatRenderer,
    behavior: str,
    suffix_init: str,
    *,
    system: str | None = None,
    suffix_len: int | None = None,
) -> PromptSlots:
    """Renders ``behavior`` (``{optim_str}`` placed by the user, else appended after a space)
    with ``suffix_init`` in the slot and splits the full tokenisation around the slot."""
    if not suffix_init:
        raise ValueError("optim_str_init is empty; give the initial adversarial string")
    instruction = behavior if OPTIM_STR in behavior else f"{behavior} {OPTIM_STR}"
    inst_head, inst_tail = instruction.split(OPTIM_STR, 1)
    before_raw, after_raw = renderer.prompt_text_with_slot(behavior, system)
    full = before_raw + suffix_init + after_raw
    ids, offsets = _offsets(renderer, full)
    lo, hi = len(before_raw), len(before_raw) + len(suffix_init)
    overlap = [s < hi and e > lo and s != e for s, e in offsets]
    if not any(overlap):
        raise ValueError(f"optim_str_init {suffix_init!r} produces no tokens in the prompt")
    first = overlap.index(True)
    last = len(overlap) - 1 - overlap[::-1].index(True)
    if not all(overlap[first : last + 1]):
        raise ValueError("the suffix tokens are not contiguous in the tokenised prompt")
    cut_lo, cut_hi = offsets[first][0], offsets[last][1]
    lead, trail = before_raw[cut_lo:], after_raw[: cut_hi - hi]
    if len(lead) > len(inst_head) or len(trail) > len(inst_tail):
        raise ValueError(
            "the optimised string merges with chat-template text around the slot; put "
            f"{OPTIM_STR} inside the instruction with text on both sides"
        )
    slots = PromptSlots(
        before_text=full[:cut_lo],
        after_text=full[cut_hi:],
        before_ids=tuple(ids[:first]),
        suffix_ids=tuple(ids[first : last + 1]),
        after_ids=tuple(ids[last + 1 :]),
        instruction_head=inst_head[: len(inst_head) - len(lead)],
        instruction_tail=inst_tail[len(trail) :],
    )
    n = len(slots.suffix_ids)
    if suffix_len is not None and n != suffix_len:
        raise ValueError(
            f"optim_str_init {suffix_init!r} tokenises to {n} tokens in the prompt, expected "
            f"suffix_len={suffix_len}; change the init string or suffix_len"
        )
    if not slots.retokenizes(renderer, slots.suffix_ids):
        raise ValueError(
            f"optim_str_init {suffix_init!r} does not survive decode->encode in the prompt "
            "context; choose an init string of plain ASCII words"
        )
    return slots
