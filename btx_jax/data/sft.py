"""SFT formatting: instruction/input/output records and chat `messages` -> tokens + response mask.

Each example becomes a list of text pieces, each marked prompt or response; pieces are tokenised
separately (no special tokens) and concatenated, so the response mask is exact at piece borders.
The loss counts only response tokens (and the EOS closing each response).

Template choice (`chat_template` in the pipeline config):
  "auto"     the tokenizer's own chat template when it has one, else the default below
  "default"  always the default below
With the tokenizer's template, instruction records become [user: instruction + "\\n\\n" + input,
assistant: output]; assistant spans are found by rendering the conversation up to each assistant
turn with `add_generation_prompt=True` (prompt) and up to its end (prompt + response, including
the template's end-of-turn text). BOS/EOS are whatever the template writes.

DEFAULT TEMPLATE (BOS at the start when add_bos; "{...}" are the record's fields):

  ### System:\\n{system}\\n\\n                      (only with a system prompt)
  ### Instruction:\\n{instruction}\\n\\n           (instruction records)
  ### Input:\\n{input}\\n\\n                       (only when input is not empty)
  ### Response:\\n{output}<EOS>                 <- loss on "{output}<EOS>"

  chat records, per message:  ### System:\\n{content}\\n\\n | ### User:\\n{content}\\n\\n |
                              ### Assistant:\\n{content}<EOS>   <- loss on "{content}<EOS>"
"""

from __future__ import annotations

from btx_jax.data.errors import DataError
from btx_jax.data.sources import Source

Piece = tuple[str, bool]  # (text, is_response)
_ROLE_HEADERS = {"system": "### System:\n", "user": "### User:\n", "assistant": "### Assistant:\n"}


def record_messages(source: Source, record: dict) -> list[dict]:
    """A record as a chat: its `messages` field, or instruction/input/output as user + assistant."""
    if source.messages_field in record:
        messages = [{"role": m["role"], "content": m["content"]} for m in record[source.messages_field]]
    else:
        prompt = record[source.instruction_field]
        if record.get(source.input_field):
            prompt += "\n\n" + record[source.input_field]
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": record[source.output_field]}]
    if source.system is not None and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": source.system}] + messages
    for m in messages:
        if m["role"] not in _ROLE_HEADERS:
            raise DataError(f"source {source.name!r}: unknown role {m['role']!r} in field {source.messages_field!r}")
    return messages


def default_template_pieces(source: Source, record: dict) -> list[Piece]:
    """The documented default template; EOS after each response is added by `tokenize_sft`."""
    if source.messages_field in record:
        pieces: list[Piece] = []
        for m in record_messages(source, record):
            if m["role"] == "assistant":
                pieces += [(_ROLE_HEADERS["assistant"], False), (m["content"], True)]
            else:
                pieces.append((_ROLE_HEADERS[m["role"]] + m["content"] + "\n\n", False))
        return pieces
    prompt = instruction_prompt(record[source.instruction_field], record.get(source.input_field) or "", source.system)
    return [(prompt, False), (record[source.output_field], True)]


def instruction_prompt(instruction: str, input_text: str = "", system: str | None = None) -> str:
    """The default template's prompt, up to and including the response header (used for generation too)."""
    prompt = f"### System:\n{system}\n\n" if system is not None else ""
    prompt += f"### Instruction:\n{instruction}\n\n"
    if input_text:
        prompt += f"### Input:\n{input_text}\n\n"
    return prompt + "### Response:\n"


def chat_template_pieces(source: Source, record: dict, tokenizer) -> list[Piece]:
    """Pieces from the tokenizer's own chat template (see module docstring)."""
    messages = record_messages(source, record)
    full = tokenizer.render_chat(messages, add_generation_prompt=False)
    pieces: list[Piece] = []
    done = 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(tokenizer.render_chat(messages[:i], add_generation_prompt=True))
        end = len(tokenizer.render_chat(messages[: i + 1], add_generation_prompt=False))
        if not (done <= start <= end <= len(full)):
            raise DataError(
                f"source {source.name!r}: the tokenizer's chat template does not render "
                "conversations prefix by prefix; use chat_template='default'"
            )
        pieces += [(full[done:start], False), (full[start:end], True)]
        done = end
    return pieces + [(full[done:], False)]


def encode_sft(source: Source, tokenizer, records: list[dict], *, add_bos: bool, use_tokenizer_template: bool,
               num_threads: int = 1):
    """Token ids and response masks (lists, one per record) of a batch of SFT records."""
    if use_tokenizer_template:
        examples = [chat_template_pieces(source, r, tokenizer) for r in records]
    else:
        examples = [default_template_pieces(source, r) for r in records]
    texts = [text for ex in examples for text, _ in ex if text]
    piece_ids = iter(tokenizer.encode_batch(texts, num_threads=num_threads))
    bos = [tokenizer.bos_id] if add_bos and not use_tokenizer_template else []
    eos = [] if use_tokenizer_template else [tokenizer.eos_id]
    ids, masks = [], []
    for ex in examples:
        toks, mask = list(bos), [False] * len(bos)
        for text, is_response in ex:
            piece = (next(piece_ids) if text else []) + (eos if is_response else [])
            toks += piece
            mask += [is_response] * len(piece)
        ids.append(toks)
        masks.append(mask)
    return ids, masks


def missing_field(source: Source, record: dict) -> str | None:
    """The prompt or response field the record lacks (absent, null or with a null message content), or None."""
    if source.messages_field in record:
        messages = record[source.messages_field]
        if not messages or any(m.get("role") is None or m.get("content") is None for m in messages):
            return source.messages_field
        return None
    return next((f for f in (source.instruction_field, source.output_field) if record.get(f) is None), None)


def sft_fields(source: Source, column_names: list[str]) -> list[str]:
    """The record fields an SFT source needs (checked before tokenising)."""
    if source.messages_field in column_names:
        return [source.messages_field]
    return [source.instruction_field, source.output_field]
