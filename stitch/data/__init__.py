"""Training and inference data for Stitch: images to tiles, conversations to tokens and labels, blends to batches.

Modules (import the one you need; nothing heavy is imported here):
- `processor`: `Processor(tokenizer, config)`: conversation + images -> model inputs (training and generation);
  `add_image_token(tokenizer, config)`.
- `image`: dynamic tiling (InternVL/NVLM rule), safe image loading, normalisation.
- `chat`: chat-template rendering with exact loss labels; image placeholder expansion (tile tags, wrappers).
- `prompts`: prompt-variety files (task -> variant -> templates).
- `sources`: LLaVA JSON/JSONL, captioning/VQA records, WebDataset shards, Energon folders, easy-vqa.
- `blend`: weighted deterministic interleaving, per-rank/worker streams, exact resume (`build_train_stream`).
- `packing`, `collate`: padded and packed batches (CONTRACTS.md layout).
- `metadataset`: `DatasetSpec` and blend YAML files (`load_blend`); `config`: `DataConfig`; `skips`: skip reasons
  and counters; `check`: `stitch data check`.
"""
