"""The only place prompt text is built. Training, batch extraction and serving all call PromptBuilder, so the
model sees the same tokens everywhere.

Layout: chat messages (system = instruction [+ compact schema], user = [context line +] source text), rendered with the
tokenizer's chat template when it has one, else PLAIN_TEMPLATE. Training appends the canonical target JSON and
eos as separate tokens after the rendered prompt; inference generates from the rendered prompt. Because both
tokenise the same prompt string on its own, the prompt tokens are identical by construction (a test checks it).
PROMPT_VERSION changes whenever the rendered text would change; adapters record it and loading refuses a
mismatch.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jsonextract.config.core import PromptConfig
from jsonextract.data.records import Example
from jsonextract.data.schema import canonical_json, load_schema, order_like_schema

PROMPT_VERSION = "2"  # 2: an optional context line before the text

PLAIN_TEMPLATE = "### Instruction:\n{system}\n\n### Input:\n{user}\n\n### Response:\n"


def load_dataset_schema(data_dir: str | Path) -> dict:
    return load_schema(Path(data_dir) / "schema.json")


def context_text(context: Any) -> str | None:
    """How the prompt writes a context: a string as it is, an object as compact JSON in its own key order (the
    order the data gives), nothing for None."""
    if context is None:
        return None
    return context if isinstance(context, str) else canonical_json(context)


@dataclass(frozen=True)
class EncodedPrompt:
    ids: list[int]
    truncated: bool  # the source text was cut to fit the token budget


class PromptBuilder:
    def __init__(self, cfg: PromptConfig, schema: dict | None):
        self.cfg = cfg
        self.schema = schema

    def instruction_text(self, schema: dict | None = None) -> str:
        schema = schema if schema is not None else self.schema
        if self.cfg.include_schema and schema is not None:
            return f"{self.cfg.instruction}\nJSON Schema: {canonical_json(schema)}"
        return self.cfg.instruction

    def messages(self, text: str, schema: dict | None = None, context: Any = None) -> list[dict[str, str]]:
        ctx = context_text(context)
        user = text if ctx is None else f"Context: {ctx}\n{text}"
        return [{"role": "system", "content": self.instruction_text(schema)}, {"role": "user", "content": user}]

    def render(self, tokenizer: Any, text: str, schema: dict | None = None, context: Any = None) -> str:
        msgs = self.messages(text, schema, context)
        if getattr(tokenizer, "chat_template", None):
            return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        return PLAIN_TEMPLATE.format(system=msgs[0]["content"], user=msgs[1]["content"])

    @staticmethod
    def _encode(tokenizer: Any, rendered: str) -> list[int]:
        # A chat template writes bos itself; a plain template relies on the tokenizer adding it (Llama-2 base).
        add_special = not getattr(tokenizer, "chat_template", None)
        return list(tokenizer(rendered, add_special_tokens=add_special)["input_ids"])

    def encode_prompt(self, tokenizer: Any, text: str, schema: dict | None = None,
                      max_tokens: int | None = None, context: Any = None) -> EncodedPrompt:
        """Prompt token ids; if longer than `max_tokens`, the source text is cut (from the end) and flagged. The
        context is never cut."""
        ids = self._encode(tokenizer, self.render(tokenizer, text, schema, context))
        if max_tokens is None or len(ids) <= max_tokens:
            return EncodedPrompt(ids, False)
        text_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        keep = max(len(text_ids) - (len(ids) - max_tokens), 0)
        for _ in range(8):  # decoding/re-encoding can shift a few tokens; shrink until it fits
            cut = tokenizer.decode(text_ids[:keep])
            ids = self._encode(tokenizer, self.render(tokenizer, cut, schema, context))
            if len(ids) <= max_tokens or keep == 0:
                break
            keep = max(keep - (len(ids) - max_tokens) - 1, 0)
        return EncodedPrompt(ids, True)

    def answer_text(self, target: Any, schema: dict | None = None) -> str:
        """Canonical target JSON: compact, keys in schema order. The constrained decoder allows exactly this form."""
        return canonical_json(order_like_schema(target, schema if schema is not None else self.schema))

    def encode_answer(self, tokenizer: Any, target: Any, schema: dict | None = None) -> list[int]:
        return list(tokenizer(self.answer_text(target, schema), add_special_tokens=False)["input_ids"]) + \
            [tokenizer.eos_token_id]

    def encode_example(self, tokenizer: Any, text: str, target: Any, max_length: int, context: Any = None):
        """(input_ids, labels) with labels -100 on the prompt; None if prompt + answer exceed max_length."""
        prompt = self.encode_prompt(tokenizer, text, context=context).ids
        answer = self.encode_answer(tokenizer, target)
        if len(prompt) + len(answer) > max_length:
            return None
        return Example(prompt + answer, [-100] * len(prompt) + answer)
