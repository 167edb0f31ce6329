"""Conversations to token ids and loss labels, through the LLM's own chat template.

Why this way: the seed system's users lost runs to hand-written templates that drifted from the model's, which
silently masked samples to zero loss. Here the text is always rendered by `tokenizer.apply_chat_template`
(the Jinja template shipped with the tokenizer), so training text is byte-for-byte what the model sees at
inference, and the ids equal `apply_chat_template(..., tokenize=True)`'s.

Finding what to train on, robustly:
1. For assistant message k, render messages[:k] with `add_generation_prompt=True`; for every sane template
   that text is a prefix of the full rendering and ends exactly where the assistant's content begins.
   (If a template breaks the prefix property, we fall back to searching after the previous span.)
2. The content is located verbatim from there (or stripped, for templates that `trim`); then the first
   special token after it, past whitespace only, is its end-of-turn token (`<|im_end|>`, `<|eot_id|>`,
   `</s>`...). Content + end-of-turn (and whitespace between) is the label span, in characters.
3. The text is tokenised once with offsets; a token is labelled iff its characters overlap a label span.
If a message can't be located or has no end-of-turn token, the sample fails with reason `template_mismatch`
(never a zero-loss sample). Image tokens and their tags/wrappers are never labelled.

Images: every `<image>` placeholder becomes `wrapper_open + (tile_tag + IMG_CONTEXT x tokens_per_tile) per
tile + wrapper_close` (`<Image>...</Image>` NVLM, `<img>...</img>` InternVL; tags `<tile_1>`..`<tile_N>`,
`<tile_global_thumbnail>`). For speed the text carries one IMG_CONTEXT per tile and the ids are expanded
afterwards; the image token is an added special token, so this is exactly what tokenising the full text gives.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from stitch.data.skips import SampleError
from stitch.errors import StitchConfigError
from stitch.models.image_token import add_image_token as add_model_image_token

__all__ = [
    "IMAGE_PLACEHOLDER",
    "IGNORE_INDEX",
    "add_image_token",
    "image_token_text",
    "validate_conversation",
    "Encoded",
    "ChatEncoder",
]

IMAGE_PLACEHOLDER = "<image>"
IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")


def add_image_token(tokenizer, config) -> int:
    """Make `config.image_token` a single special token of `tokenizer` (added if absent); return its id.

    Called when a checkpoint is built so the id can be stored in `config.image_token_id`
    (`stitch.models.image_token.add_image_token`, which `stitch.checkpoint` uses too).
    """
    return add_model_image_token(tokenizer, config.image_token)


def image_token_text(num_grid_tiles: int, thumbnail: bool, config, per_tile: int = 1) -> str:
    """The text an `<image>` becomes, with `per_tile` image tokens per tile (1 = compressed form)."""
    img = config.image_token * per_tile
    n = num_grid_tiles + (1 if thumbnail else 0)
    if config.tile_tags == "nvlm":
        tags = [f"<tile_{i + 1}>" for i in range(num_grid_tiles)] + (["<tile_global_thumbnail>"] if thumbnail else [])
        body = "".join(tag + img for tag in tags)
    else:
        body = img * n
    if config.image_wrapper == "nvlm":
        return f"<Image>{body}</Image>"
    if config.image_wrapper == "internvl":
        return f"<img>{body}</img>"
    return body


def validate_conversation(conversation: Sequence[dict], for_generation: bool) -> list[dict[str, str]]:
    """Check roles and contents; returns plain {"role", "content"} dicts. Raises SampleError on bad shape.

    Shape: an optional system turn, then user/assistant alternating from user. Training conversations end with
    an assistant turn; generation prompts end with a user turn.
    """
    if not conversation:
        raise SampleError("empty_conversation", "no messages")
    out = []
    for i, msg in enumerate(conversation):
        if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
            raise SampleError("malformed_record", f"message {i} is not a {{'role', 'content'}} object")
        role, content = msg["role"], msg["content"]
        if role not in ROLES:
            raise SampleError("bad_roles", f"message {i}: unknown role {role!r}")
        if not isinstance(content, str):
            raise SampleError("malformed_record", f"message {i}: content is not a string")
        if not content.strip():
            raise SampleError("empty_conversation", f"message {i} ({role}) is empty")
        out.append({"role": role, "content": content})
    offset = 1 if out[0]["role"] == "system" else 0
    body = out[offset:]
    if not body:
        raise SampleError("empty_conversation", "only a system message")
    for i, msg in enumerate(body):
        want = "user" if i % 2 == 0 else "assistant"
        if msg["role"] != want:
            raise SampleError("bad_roles", f"message {i + offset} is {msg['role']!r}, expected {want!r} (after an "
                              "optional system message, user and assistant turns alternate)")
    if for_generation:
        if body[-1]["role"] != "user":
            raise SampleError("bad_roles", "a generation prompt must end with a user turn")
    elif not any(m["role"] == "assistant" for m in body):
        raise SampleError("no_assistant_turn", "no assistant turn to train on")
    elif body[-1]["role"] != "assistant":
        raise SampleError("bad_roles", "a training conversation must end with an assistant turn")
    return out


@dataclass
class Encoded:
    """Token ids (images expanded), labels (None for generation prompts) and each image's token range."""

    input_ids: np.ndarray  # int64 [T]
    labels: np.ndarray | None  # int64 [T], IGNORE_INDEX where no loss
    image_ranges: list[tuple[int, int]]  # per image: [start, end) in input_ids, wrapper and tags included
    text: str  # the rendered text (compressed image form)

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def truncate(self, max_length: int) -> int:
        """Cut to `max_length` tokens, never inside an image: an image that doesn't fit is dropped with all the
        text after it. Returns the number of images kept."""
        cut = max_length
        kept = len(self.image_ranges)
        for k, (start, end) in enumerate(self.image_ranges):
            if end > cut:
                cut, kept = min(cut, start), k
                break
        self.input_ids = self.input_ids[:cut]
        if self.labels is not None:
            self.labels = self.labels[:cut]
        self.image_ranges = self.image_ranges[:kept]
        return kept


class ChatEncoder:
    """Renders conversations with the tokenizer's chat template and tokenises them with exact loss labels."""

    def __init__(self, tokenizer, config, image_token_id: int):
        if not getattr(tokenizer, "chat_template", None):
            raise StitchConfigError("the tokenizer has no chat template (chat_template.jinja / tokenizer_config.json)")
        if not getattr(tokenizer, "is_fast", True):
            raise StitchConfigError("a fast (tokenizers-backed) tokenizer is needed for exact loss masks")
        self.tokenizer = tokenizer
        self.config = config
        self.image_token_id = image_token_id
        self.tokens_per_tile = config.tokens_per_tile
        specials = set(getattr(tokenizer, "all_special_tokens", []) or [])
        for tok in getattr(tokenizer, "added_tokens_decoder", {}).values():
            if getattr(tok, "special", False):
                specials.add(str(tok))
        specials.discard(config.image_token)
        # Longest first so "<|im_end|>" wins over a shorter special that is its prefix.
        self._specials = sorted((s for s in specials if s), key=len, reverse=True)

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def encode(
        self,
        messages: list[dict[str, str]],
        images: Sequence[tuple[int, bool]],
        add_generation_prompt: bool = False,
        with_labels: bool = True,
    ) -> Encoded:
        """Encode validated `messages`; `images` gives (grid tiles, has thumbnail) per placeholder, in order."""
        expanded, image_spans = self._expand_images(messages, images)
        text = self.render(expanded, add_generation_prompt)
        label_spans = self._label_spans(expanded, text) if with_labels else []
        image_chars = _absolute_image_spans(text, expanded, image_spans)
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = np.asarray(enc["input_ids"], dtype=np.int64)
        offsets = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
        is_img = ids == self.image_token_id
        want = sum(n + int(t) for n, t in images)
        if int(is_img.sum()) != want:
            raise SampleError(
                "image_count_mismatch",
                f"{int(is_img.sum())} image-context tokens for {want} tiles (is {self.config.image_token!r} "
                "written literally in the text?)",
            )
        labels = None
        if with_labels:
            labelled = np.zeros(len(ids), dtype=bool)
            for start, end in label_spans:
                labelled |= (offsets[:, 0] < end) & (offsets[:, 1] > start) & (offsets[:, 1] > offsets[:, 0])
            for start, end in image_chars:
                labelled &= ~((offsets[:, 0] < end) & (offsets[:, 1] > start))
            labelled &= ~is_img
            labels = np.where(labelled, ids, IGNORE_INDEX)
        # Image ranges (in compressed token space) from the placeholders' character spans.
        ranges_c = []
        for start, end in image_chars:
            inside = np.nonzero((offsets[:, 0] < end) & (offsets[:, 1] > start))[0]
            ranges_c.append((int(inside[0]), int(inside[-1]) + 1))
        # Expand each image token to tokens_per_tile copies.
        repeats = np.where(is_img, self.tokens_per_tile, 1)
        new_pos = np.concatenate([[0], np.cumsum(repeats)])
        ids = np.repeat(ids, repeats)
        if labels is not None:
            labels = np.repeat(labels, repeats)
        ranges = [(int(new_pos[s]), int(new_pos[e])) for s, e in ranges_c]
        return Encoded(input_ids=ids, labels=labels, image_ranges=ranges, text=text)

    def _expand_images(
        self, messages: list[dict[str, str]], images: Sequence[tuple[int, bool]]
    ) -> tuple[list[dict[str, str]], list[list[tuple[int, int]]]]:
        """Replace placeholders by their image text; returns the messages and, per message, the character
        spans of the image texts within that message's content."""
        out, spans, k = [], [], 0
        for msg in messages:
            parts = msg["content"].split(IMAGE_PLACEHOLDER)
            content, msg_spans = parts[0], []
            for part in parts[1:]:
                if k >= len(images):
                    raise SampleError("image_count_mismatch", f"more {IMAGE_PLACEHOLDER} placeholders than images")
                rep = image_token_text(images[k][0], images[k][1], self.config)
                msg_spans.append((len(content), len(content) + len(rep)))
                content += rep + part
                k += 1
            out.append({"role": msg["role"], "content": content})
            spans.append(msg_spans)
        if k != len(images):
            raise SampleError("image_count_mismatch", f"{k} {IMAGE_PLACEHOLDER} placeholders for {len(images)} images")
        return out, spans

    @staticmethod
    def _locate(text: str, content: str, start: int) -> tuple[int, int]:
        """(position, length) of `content` in `text` at or after `start`, trying the content as given and then
        stripped (for templates that trim); (-1, 0) when the template did not reproduce it."""
        for candidate in (content, content.strip()):
            pos = text.find(candidate, start)
            if pos >= 0:
                return pos, len(candidate)
        return -1, 0

    def _label_spans(self, messages: list[dict[str, str]], text: str) -> list[tuple[int, int]]:
        spans: list[tuple[int, int]] = []
        cursor = 0
        for k, msg in enumerate(messages):
            if msg["role"] != "assistant":
                # Only needed when a template breaks the prefix property: then assistant content is searched
                # after everything before it, so a reply that also occurs in an earlier turn is not mistaken.
                pos, length = self._locate(text, msg["content"], cursor)
                cursor = pos + length if pos >= 0 else cursor
                continue
            prefix = self.render(messages[:k], add_generation_prompt=True)
            start = len(prefix) if text.startswith(prefix) else cursor
            pos, length = self._locate(text, msg["content"], start)
            if pos < 0:
                raise SampleError(
                    "template_mismatch", f"assistant message {k} is not reproduced by the chat template"
                )
            end = pos + length
            eot_end = self._end_of_turn(text, end)
            if eot_end is None:
                nxt = text[end : end + 30]
                raise SampleError(
                    "template_mismatch",
                    f"no end-of-turn special token after assistant message {k} (template continues {nxt!r})",
                )
            spans.append((pos, eot_end))
            cursor = eot_end
        return spans

    def _end_of_turn(self, text: str, end: int) -> int | None:
        """End of the first special token after `end`, if only whitespace lies between."""
        i = end
        while i < len(text) and text[i].isspace() and not any(text.startswith(s, i) for s in self._specials):
            i += 1
        for s in self._specials:
            if text.startswith(s, i):
                return i + len(s)
        return None


def _absolute_image_spans(
    text: str, messages: list[dict[str, str]], image_spans: list[list[tuple[int, int]]]
) -> list[tuple[int, int]]:
    """Character spans of image texts in the rendered `text` (messages located in order)."""
    out, cursor = [], 0
    for msg, spans in zip(messages, image_spans):
        if not spans:
            continue
        pos = text.find(msg["content"], cursor)
        if pos < 0:
            # The template altered the content (e.g. trimmed it): find each image text on its own.
            for s, e in spans:
                rep = msg["content"][s:e]
                p = text.find(rep, cursor)
                if p < 0:
                    raise SampleError("template_mismatch", "an image placeholder is not reproduced by the template")
                out.append((p, p + len(rep)))
                cursor = p + len(rep)
            continue
        out.extend((pos + s, pos + e) for s, e in spans)
        cursor = pos + len(msg["content"])
    return out
