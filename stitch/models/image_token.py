"""The image-context token: the one contract between a tokenizer and the VLM, which scatters image embeddings
into the positions that hold `VLMConfig.image_token_id`.

Here, below both `stitch.checkpoint` (which builds checkpoints and records the id) and `stitch.data` (whose
processor expands `<image>` into these tokens), so the two add the token the same way: as one special token that
normalisation leaves alone and that tokenises to exactly one id, or a config error.
"""

from __future__ import annotations

from stitch.errors import StitchConfigError

__all__ = ["add_image_token"]


def add_image_token(tokenizer, token: str) -> int:
    """Make `token` a single special token of `tokenizer` (added if absent); return its id."""
    from tokenizers import AddedToken

    if token not in tokenizer.get_vocab():
        tokenizer.add_tokens([AddedToken(token, special=True, normalized=False)], special_tokens=True)
    token_id = tokenizer.convert_tokens_to_ids(token)
    ids = tokenizer(token, add_special_tokens=False)["input_ids"]
    if ids != [token_id]:
        raise StitchConfigError(f"image token {token!r} does not tokenise to a single id (got {ids})")
    return int(token_id)
