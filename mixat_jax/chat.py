"""Chat rendering: chat template -> token ids with prompt/response masks.

Implements ``ChatRenderer``, the single place where conversations become token ids. Masks are
derived from the rendering itself, never from per-model offsets: the prompt is rendered with the
generation prompt, the full conversation without it, the former must be a prefix of the latter,
and the tokenizer's offset mapping on the full text decides which tokens fall in the response
(response text plus whatever end-of-turn text the template writes after it, e.g. ``<|eot_id|>``,
``</s>`` or ``<|im_end|>\\n``).

BOS handling: ids are always produced by tokenising the rendered text without special tokens;
BOS is prepended only when the tokenizer adds one by default *and* the rendering does not
already start with it (templates such as Llama-3's write BOS themselves, Zephyr's does not).

``use_chat_template=False`` renders plain text: ``[system + "\\n\\n"] + instruction`` as the prompt,
then ``response + eos_token``.

GCG support: ``prompt_text_with_slot`` splits the rendered prompt around ``{optim_str}``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import transformers

OPTIM_STR = "{optim_str}"
TRAIN_ON_MODES = ("assistant", "after_first_response")
# Added tokens that end an assistant turn in common chat formats (used only if present as added
# tokens of the tokenizer); the template-derived end-of-turn token and eos are always included.
_KNOWN_END_TOKENS = (
    "<|eot_id|>",
    "<|end_of_text|>",
    "<|eom_id|>",
    "<|im_end|>",
    "<|endoftext|>",
    "</s>",
    "<end_of_turn>",
    "<eos>",
)
_SENTINEL = "MIXATRESPONSESENTINEL"

Message = dict[str, str]


@dataclasses.dataclass(frozen=True)
class Rendered:
    """Token ids of one rendered conversation with per-token masks.

    ``prompt_mask`` marks the prefix before the first trained token (``ids[:prompt_len]``);
    ``response_mask`` marks the trained tokens (assistant text plus its end-of-turn tokens).
    """

    ids: list[int]
    prompt_mask: list[bool]
    response_mask: list[bool]
    prompt_len: int

    def __post_init__(self):
        n = len(self.ids)
        if len(self.prompt_mask) != n or len(self.response_mask) != n:
            raise ValueError(
                f"Rendered masks must match ids length {n}, got prompt_mask="
                f"{len(self.prompt_mask)} response_mask={len(self.response_mask)}"
            )
        if not 0 <= self.prompt_len <= n:
            raise ValueError(f"prompt_len={self.prompt_len} out of range for {n} ids")


class ChatRenderer:
    """Renders instructions/conversations with a tokenizer's chat template (or as plain text)."""

    def __init__(
        self,
        tokenizer: transformers.PreTrainedTokenizerBase,
        *,
        system_prompt: str | None = None,
        use_chat_template: bool = True,
    ):
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError(
                "ChatRenderer needs a fast tokenizer (offset mappings); load it with "
                "AutoTokenizer.from_pretrained(..., use_fast=True)"
            )
        if use_chat_template and not tokenizer.chat_template:
            raise ValueError(
                "tokenizer has no chat_template; set tokenizer.chat_template or pass "
                "use_chat_template=False to render plain text"
            )
        if not use_chat_template and tokenizer.eos_token is None:
            raise ValueError("plain-text rendering appends eos but the tokenizer has no eos_token")
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt
        self.use_chat_template = use_chat_template
        self._prepend_bos = _tokenizer_prepends_bos(tokenizer)
        self._eot_ids: list[int] | None = None

    # ------------------------------------------------------------------ rendering to text

    def render(self, messages: Sequence[Message], *, add_generation_prompt: bool) -> str:
        """Renders ``messages`` to text (chat template, or the plain-text format)."""
        _check_messages(messages)
        if not self.use_chat_template:
            return self._render_plain(messages)
        text = self.tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
        )
        if not isinstance(text, str):
            raise ValueError(f"apply_chat_template returned {type(text).__name__}, expected str")
        return text

    def _render_plain(self, messages: Sequence[Message]) -> str:
        parts = []
        for message in messages:
            if message["role"] == "system":
                parts.append(message["content"] + "\n\n")
            elif message["role"] == "assistant":
                parts.append(message["content"] + self.tokenizer.eos_token)
            else:
                parts.append(message["content"])
        return "".join(parts)

    def _single_turn(self, instruction: str, system: str | None) -> list[Message]:
        system = self.system_prompt if system is None else system
        messages: list[Message] = []
        if system is not None:
            messages.append({"role": "system", "content": system})
        messages.append({"role": "user", "content": instruction})
        return messages

    def prompt_text(self, instruction: str, system: str | None = None) -> str:
        """Rendered prompt up to and including the assistant header (generation prompt)."""
        return self.render(self._single_turn(instruction, system), add_generation_prompt=True)

    def prompt_text_with_slot(
        self, instruction_with_placeholder: str, system: str | None = None
    ) -> tuple[str, str]:
        """Splits the rendered prompt around ``{optim_str}`` -> (before, after), for GCG.

        Without a placeholder in the instruction, it is appended after one space.
        """
        count = instruction_with_placeholder.count(OPTIM_STR)
        if count > 1:
            raise ValueError(
                f"instruction contains {OPTIM_STR} {count} times; GCG needs exactly one slot"
            )
        instruction = instruction_with_placeholder
        if count == 0:
            instruction = f"{instruction_with_placeholder} {OPTIM_STR}"
        text = self.prompt_text(instruction, system)
        if text.count(OPTIM_STR) != 1:
            raise ValueError(
                f"rendered prompt contains {OPTIM_STR} {text.count(OPTIM_STR)} times (expected 1);"
                " remove the placeholder from the system prompt"
            )
        before, after = text.split(OPTIM_STR)
        return before, after

    # ------------------------------------------------------------------ tokenisation

    def encode(self, text: str) -> list[int]:
        """Tokenises rendered text, prepending BOS only if the tokenizer adds one and the text
        does not already start with it."""
        return self._encode_with_offsets(text)[0]

    def _encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        offsets = [tuple(o) for o in enc["offset_mapping"]]
        bos = self.tokenizer.bos_token
        if self._prepend_bos and not text.startswith(bos):
            ids = [self.tokenizer.bos_token_id, *ids]
            offsets = [(0, 0), *offsets]
        return ids, offsets

    def prompt_ids(self, instruction: str, system: str | None = None) -> list[int]:
        """Token ids of ``prompt_text`` (special tokens never added twice)."""
        return self.encode(self.prompt_text(instruction, system))

    # ------------------------------------------------------------------ masked examples

    def example(self, instruction: str, response: str, system: str | None = None) -> Rendered:
        """Single-turn training example; response_mask covers response + end-of-turn tokens."""
        messages = self._single_turn(instruction, system)
        prompt = self.render(messages, add_generation_prompt=True)
        full = self.render(
            [*messages, {"role": "assistant", "content": response}], add_generation_prompt=False
        )
        _check_prefix(prompt, full, "the prompt (with generation prompt)", "the full conversation")
        ids, offsets = self._encode_with_offsets(full)
        response_mask = _span_mask(offsets, [(len(prompt), len(full))], full)
        rendered = _finish(ids, response_mask)
        if ids[: rendered.prompt_len] != self.encode(prompt):
            raise ValueError(
                "tokenising the prompt alone does not give a prefix of the full example's ids "
                "(the tokenizer merges across the prompt/response boundary); adjust the template "
                "or the response's leading characters"
            )
        return rendered

    def conversation(self, messages: Sequence[Message], *, train_on: str = "assistant") -> Rendered:
        """Multi-turn example. ``train_on="assistant"`` masks every assistant turn (text plus its
        end-of-turn tokens); ``"after_first_response"`` masks everything from the first assistant
        turn's text to the end."""
        if train_on not in TRAIN_ON_MODES:
            raise ValueError(f"train_on must be one of {TRAIN_ON_MODES}, got {train_on!r}")
        _check_messages(messages)
        messages = list(messages)
        if self.system_prompt is not None and messages and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        first_non_system = next((m["role"] for m in messages if m["role"] != "system"), None)
        if first_non_system != "user":
            raise ValueError(
                "conversation must start with a user message (after an optional system message)"
            )
        assistant_idx = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if not assistant_idx:
            raise ValueError("conversation has no assistant message to train on")

        full = self.render(messages, add_generation_prompt=False)
        spans = []
        for i in assistant_idx:
            before = self.render(messages[:i], add_generation_prompt=True)
            through = self.render(messages[: i + 1], add_generation_prompt=False)
            _check_prefix(before, through, f"turns before message {i}", f"turns through {i}")
            _check_prefix(through, full, f"turns through message {i}", "the full conversation")
            spans.append((len(before), len(through)))
        if train_on == "after_first_response":
            spans = [(spans[0][0], len(full))]
        ids, offsets = self._encode_with_offsets(full)
        return _finish(ids, _span_mask(offsets, spans, full))

    # ------------------------------------------------------------------ generation stopping

    @property
    def eot_token_ids(self) -> list[int]:
        """Token ids that end an assistant turn: eos, the token the template writes right after
        an assistant message, and known end-of-turn added tokens present in the tokenizer."""
        if self._eot_ids is None:
            self._eot_ids = self._compute_eot_ids()
        return list(self._eot_ids)

    def stop_ids(self) -> list[int]:
        """Sorted ids that stop generation: :attr:`eot_token_ids` plus the tokenizer's eos."""
        stops = set(self.eot_token_ids)
        if self.tokenizer.eos_token_id is not None:
            stops.add(int(self.tokenizer.eos_token_id))
        return sorted(stops)

    def _compute_eot_ids(self) -> list[int]:
        tok = self.tokenizer
        ids: list[int] = []
        if tok.eos_token_id is not None:
            ids.append(tok.eos_token_id)
        added = tok.get_added_vocab()
        if self.use_chat_template:
            user = {"role": "user", "content": "x"}
            before = self.render([user], add_generation_prompt=True)
            full = self.render(
                [user, {"role": "assistant", "content": _SENTINEL}], add_generation_prompt=False
            )
            tail = full[len(before) :] if full.startswith(before) else full
            cut = tail.rfind(_SENTINEL)
            suffix = tail[cut + len(_SENTINEL) :] if cut >= 0 else ""
            suffix_ids = tok(suffix, add_special_tokens=False)["input_ids"] if suffix else []
            if suffix_ids and suffix_ids[0] in added.values():
                ids.append(suffix_ids[0])
        ids.extend(added[name] for name in _KNOWN_END_TOKENS if name in added)
        return list(dict.fromkeys(ids))


# ---------------------------------------------------------------------- helpers


def _tokenizer_prepends_bos(tokenizer: transformers.PreTrainedTokenizerBase) -> bool:
    """True if the tokenizer adds BOS itself when called with add_special_tokens=True."""
    bos_id = tokenizer.bos_token_id
    if bos_id is None:
        return False
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    return len(with_special) > len(without) and with_special[0] == bos_id


def _check_messages(messages: Sequence[Message]) -> None:
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise ValueError(f"message {i} must be a dict with a str 'content', got {message!r}")
        if message.get("role") not in ("system", "user", "assistant"):
            raise ValueError(
                f"message {i} has role {message.get('role')!r}; use system, user or assistant"
            )


def _check_prefix(prefix: str, text: str, prefix_name: str, text_name: str) -> None:
    if not text.startswith(prefix):
        raise ValueError(
            f"chat template rendering of {prefix_name} is not a prefix of the rendering of "
            f"{text_name}, so response masks cannot be derived; prefix={prefix[-80:]!r} "
            f"text={text[: len(prefix) + 40][-120:]!r}"
        )


def _span_mask(
    offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]], text: str
) -> list[bool]:
    """Per-token membership in character ``spans``; raises if a token straddles a span edge."""
    mask = [False] * len(offsets)
    for lo, hi in spans:
        for t, (start, end) in enumerate(offsets):
            if start == end:  # zero-width (e.g. a prepended BOS)
                inside = lo <= start < hi
            else:
                if start < lo < end or start < hi < end:
                    raise ValueError(
                        f"token {t} covering {text[start:end]!r} straddles the response boundary "
                        f"at character {lo if start < lo < end else hi}; the tokenizer merges "
                        "across turns, so masks cannot be exact"
                    )
                inside = lo <= start and end <= hi
            mask[t] = mask[t] or inside
    return mask


def _finish(ids: list[int], response_mask: list[bool]) -> Rendered:
    if not any(response_mask):
        raise ValueError("rendering produced no response tokens to train on")
    prompt_len = response_mask.index(True)
    prompt_mask = [t < prompt_len for t in range(len(ids))]
    return Rendered(
        ids=ids, prompt_mask=prompt_mask, response_mask=response_mask, prompt_len=prompt_len
    )


def pad_token_id(tokenizer) -> int:
    """The id batches are padded with: the tokenizer's pad token, else its eos, else 0."""
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    return int(pad)
