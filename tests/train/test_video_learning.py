"""A tiny model trained from scratch on generated clips reads time: a bar drifting left vs right (wrapping
around, from a random start, so every single frame is equally likely under both answers) is answered right
on held-out clips, and the same clips with their frames reversed get the opposite answer.

The clips are real mp4 files (PyAV), read through the data pipeline (JSONL records with `"video"`, the
Processor's frame sampling and NVLM layout); the training loop is the plain forward/backward of the model on
padded batches, with the 49k-token input embedding frozen so the few hundred steps stay within the time
budget on two CPU cores (everything else — vision encoder, projector, transformer — trains from random init).
"""

from __future__ import annotations

import json

import pytest
import torch

import stitch
from stitch.checkpoint.build import stitch_build
from stitch.data.collate import collate
from stitch.data.config import DataConfig, DatasetSpec
from stitch.data.prompts import PromptLibrary
from stitch.data.sources import open_source
from tests.data.video_clips import drifting_bar, encode

FRAMES, TRAIN_CLIPS, HELD_OUT, STEPS, BATCH = 8, 128, 40, 320, 16
QUESTION = "Which way does the bar move?"


def _record(i: int, direction: int) -> dict:
    return {"video": f"clip{i}.mp4", "conversations": [
        {"from": "human", "value": f"<video>\n{QUESTION}"},
        {"from": "gpt", "value": "right" if direction > 0 else "left"}]}


@pytest.mark.slow
def test_tiny_model_learns_motion_direction_and_needs_frame_order(tmp_path):
    torch.manual_seed(0)
    rows = []
    for i in range(TRAIN_CLIPS):
        direction = 1 if i % 2 == 0 else -1
        encode(drifting_bar(FRAMES, direction=direction, seed=i), tmp_path / f"clip{i}.mp4", fps=6)
        rows.append(_record(i, direction))
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ckpt = stitch_build(vision="internvit-tiny", llm="llama-tiny", out=tmp_path / "ckpt", tile_tags="none")
    model, processor = stitch.load(ckpt)
    processor.config.video_layout = "nvlm"  # frames spliced at the placeholder, no per-frame text
    processor = processor.with_options(num_frames=FRAMES, system_prompt="Answer.")

    # the data pipeline: JSONL records -> videos decoded and sampled -> samples
    source = open_source(DatasetSpec(path=str(tmp_path / "train.jsonl")), PromptLibrary.load())
    data_cfg = DataConfig(datasets=[{"path": str(tmp_path / "train.jsonl")}])
    samples = []
    for i in range(len(source)):
        rec = source.get(i)
        samples.append(processor.encode(rec.conversation, rec.images, rec.videos, max_length=data_cfg.seq_length))
    assert all(s.pixel_values.shape[0] == FRAMES for s in samples)

    for name, p in model.named_parameters():
        if "embed_tokens" in name:
            p.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=3e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 20, (STEPS - s) / (0.25 * STEPS)))  # warm up, hold, decay the last 25%
    gen = torch.Generator().manual_seed(0)
    model.train()
    losses = []
    for _ in range(STEPS):
        batch = collate([samples[i] for i in torch.randint(0, len(samples), (BATCH,), generator=gen).tolist()],
                        pack=False, pad_token_id=processor.pad_token_id)
        out = model(batch["input_ids"], pixel_values=batch["pixel_values"], labels=batch["labels"],
                    attention_mask=batch["attention_mask"], position_ids=batch["position_ids"], return_logits=False)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(out.loss.item())
    model.eval()

    right = processor.tokenizer("right", add_special_tokens=False)["input_ids"][0]
    left = processor.tokenizer("left", add_special_tokens=False)["input_ids"][0]
    conv = [{"role": "user", "content": f"<video>\n{QUESTION}"}]

    def accuracy(reverse: bool) -> float:
        correct = 0
        for i in range(HELD_OUT):
            direction = 1 if i % 2 == 0 else -1
            path = tmp_path / f"held{i}.mp4"
            encode(drifting_bar(FRAMES, direction=direction, seed=10_000 + i), path, fps=6)
            video = path
            if reverse:  # the very frames the pipeline decodes, in reverse order
                from stitch.data.video import load_video

                video = load_video(path, FRAMES).frames[::-1]
            s = processor.encode(conv, videos=[video], add_generation_prompt=True)
            with torch.no_grad():
                logits = model(s.input_ids[None], pixel_values=s.pixel_values, logits_to_keep=1).logits[0, -1]
            correct += int(bool(logits[right] > logits[left]) == (direction > 0))
        return correct / HELD_OUT

    forward, backward = accuracy(False), accuracy(True)
    print(f"held-out accuracy {forward:.0%}, frames reversed {backward:.0%}, final loss {losses[-1]:.3f}")
    assert forward >= 0.9, (forward, losses[::20])
    assert backward <= 0.6, (backward, forward)
