"""Skipped samples: the error a sample raises when it can't be used, and the counter that tallies them.

Principle 4 ("nothing silent"): a sample that can't be used is skipped *and counted by reason*, and a
dataset that skips more than `max_skip_fraction` of what it is asked for stops the run with an error that
names the dataset and its top reasons. Reasons are short stable names so reports and JSON can be compared
between runs.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from stitch.errors import DataError

__all__ = ["SampleError", "SkipStats", "REASONS"]

# Every reason a sample may be skipped for, with what it means (shown by `stitch data check`).
REASONS: dict[str, str] = {
    "missing_file": "an image file named by the sample does not exist",
    "unreadable_image": "the image file is not an image PIL can open",
    "truncated_image": "the image file ends early or is corrupt",
    "decompression_bomb": "the image has more pixels than max_image_pixels",
    "malformed_record": "the line/record is not valid JSON or lacks the fields its format needs",
    "empty_conversation": "no messages, or a message with empty content",
    "bad_roles": "an unknown role, or turns that do not alternate user/assistant",
    "no_assistant_turn": "nothing to learn: the conversation has no assistant turn",
    "image_count_mismatch": "the number of <image> placeholders differs from the number of images",
    "fully_masked": "after truncation no assistant token is left to train on",
    "template_mismatch": "the chat template did not reproduce an assistant message (loss mask unknowable)",
    "unreadable_video": "the video file is not a video FFmpeg can open (corrupt, or cut before its index)",
    "truncated_video": "the video ends before a frame its header declares, or a frame fails to decode",
    "empty_video": "the video (or frame folder) has no video stream or no frames",
    "video_too_large": "the video is over a limit: bytes, duration, pixels per frame or frames",
    "video_count_mismatch": "the number of <video> placeholders differs from the number of videos",
}


class SampleError(DataError):
    """This sample can't be used; `reason` is one of `REASONS`. Caught, counted and skipped by the stream."""

    def __init__(self, reason: str, message: str):
        if reason not in REASONS:
            raise ValueError(f"unknown skip reason {reason!r}")
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.detail = message


@dataclass
class SkipStats:
    """Per-dataset tallies of attempts, successes and skips (by reason); plain data so it travels in state."""

    attempted: Counter = field(default_factory=Counter)  # dataset name -> samples tried
    used: Counter = field(default_factory=Counter)  # dataset name -> samples produced
    skipped: dict[str, Counter] = field(default_factory=dict)  # dataset name -> reason -> count
    examples: dict[str, str] = field(default_factory=dict)  # "dataset/reason" -> first message seen

    def record_ok(self, dataset: str) -> None:
        self.attempted[dataset] += 1
        self.used[dataset] += 1

    def record_skip(self, dataset: str, err: SampleError) -> None:
        self.attempted[dataset] += 1
        self.skipped.setdefault(dataset, Counter())[err.reason] += 1
        self.examples.setdefault(f"{dataset}/{err.reason}", err.detail)

    def skip_fraction(self, dataset: str) -> float:
        n = self.attempted[dataset]
        return (n - self.used[dataset]) / n if n else 0.0

    def check(self, dataset: str, max_fraction: float, min_attempts: int) -> None:
        """Raise DataError when `dataset` skips too much (judged once it has had `min_attempts` tries)."""
        n = self.attempted[dataset]
        if n < min_attempts or self.skip_fraction(dataset) <= max_fraction:
            return
        reasons = self.skipped.get(dataset, Counter()).most_common(3)
        detail = ", ".join(f"{r}: {c}" for r, c in reasons)
        example = self.examples.get(f"{dataset}/{reasons[0][0]}", "") if reasons else ""
        raise DataError(
            f"dataset {dataset}: {n - self.used[dataset]} of {n} samples skipped "
            f"({self.skip_fraction(dataset):.1%} > max_skip_fraction {max_fraction:.1%}; {detail})"
            + (f"; e.g. {example}" if example else "")
        )

    def state_dict(self) -> dict:
        return {
            "attempted": dict(self.attempted),
            "used": dict(self.used),
            "skipped": {d: dict(c) for d, c in self.skipped.items()},
            "examples": dict(self.examples),
        }

    @classmethod
    def from_state(cls, state: dict) -> SkipStats:
        return cls(
            attempted=Counter(state.get("attempted", {})),
            used=Counter(state.get("used", {})),
            skipped={d: Counter(c) for d, c in state.get("skipped", {}).items()},
            examples=dict(state.get("examples", {})),
        )

    def merge(self, other: SkipStats) -> None:
        self.attempted.update(other.attempted)
        self.used.update(other.used)
        for d, c in other.skipped.items():
            self.skipped.setdefault(d, Counter()).update(c)
        for k, v in other.examples.items():
            self.examples.setdefault(k, v)

    def skip_totals(self) -> Counter:
        total: Counter = Counter()
        for c in self.skipped.values():
            total.update(c)
        return total
