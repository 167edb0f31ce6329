"""Named sizes: real ones (to build on the meta device, count parameters, or train from random init) and
`<family>-tiny` ones for tests. Vision presets live beside the encoder (`stitch.models.vision`)."""

from __future__ import annotations

from stitch.config import LLMConfig, ProjectorConfig, VisionConfig, VLMConfig
from stitch.errors import StitchConfigError
from stitch.models.vision import VISION_PRESETS

_QWEN = dict(family="qwen2", attention_bias=True, rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=32768)

LLM_PRESETS: dict[str, LLMConfig] = {
    "qwen2.5-0.5b": LLMConfig(**_QWEN, vocab_size=151936, hidden_size=896, intermediate_size=4864, num_layers=24,
                              num_heads=14, num_kv_heads=2, tie_word_embeddings=True),
    "qwen2.5-1.5b": LLMConfig(**_QWEN, vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_layers=28,
                              num_heads=12, num_kv_heads=2, tie_word_embeddings=True),
    "qwen2.5-7b": LLMConfig(**_QWEN, vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28,
                            num_heads=28, num_kv_heads=4),
    "qwen2-72b": LLMConfig(**_QWEN, vocab_size=152064, hidden_size=8192, intermediate_size=29568, num_layers=80,
                           num_heads=64, num_kv_heads=8),
    "yi-34b": LLMConfig(family="llama", vocab_size=64000, hidden_size=7168, intermediate_size=20480, num_layers=60,
                        num_heads=56, num_kv_heads=8, rms_norm_eps=1e-5, rope_theta=5e6,
                        max_position_embeddings=4096),
    "llama3-8b": LLMConfig(family="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                           num_layers=32, num_heads=32, num_kv_heads=8, rms_norm_eps=1e-5, rope_theta=5e5,
                           max_position_embeddings=8192),
    "llama3.1-8b": LLMConfig(family="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                             num_layers=32, num_heads=32, num_kv_heads=8, rms_norm_eps=1e-5, rope_theta=5e5,
                             max_position_embeddings=131072,
                             rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                           "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    "mistral-7b": LLMConfig(family="mistral", vocab_size=32768, hidden_size=4096, intermediate_size=14336,
                            num_layers=32, num_heads=32, num_kv_heads=8, rms_norm_eps=1e-5, rope_theta=1e6,
                            max_position_embeddings=32768),
    "smollm2-135m": LLMConfig(family="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                              num_layers=30, num_heads=9, num_kv_heads=3, rms_norm_eps=1e-5, rope_theta=1e5,
                              max_position_embeddings=8192, tie_word_embeddings=True),
}
# Tiny models share SmolLM2's 49,152-token vocabulary so the bundled real tokenizer serves them in tests.
_TINY = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2)
LLM_PRESETS.update({
    "llama-tiny": LLMConfig(family="llama", rms_norm_eps=1e-5, **_TINY),
    "qwen2-tiny": LLMConfig(family="qwen2", attention_bias=True, tie_word_embeddings=True, rope_theta=1e6, **_TINY),
    "mistral-tiny": LLMConfig(family="mistral", rms_norm_eps=1e-5, rope_theta=1e6, **_TINY),
    "smollm2-tiny": LLMConfig(family="llama", rms_norm_eps=1e-5, rope_theta=1e5, tie_word_embeddings=True, **_TINY),
})

# Whole models: (vision preset, llm preset, projector, extra VLMConfig fields).
VLM_PRESETS: dict[str, tuple[str, str, ProjectorConfig, dict]] = {
    # NVLM-D 72B: InternViT-6B + Qwen2-72B; projector 12800 -> 29568 -> 8192, 1-D tile tags, <Image> wrapper.
    "nvlm-d-72b": ("internvit-6b", "qwen2-72b", ProjectorConfig(kind="mlp", hidden_size=29568),
                   dict(tile_tags="nvlm", image_wrapper="nvlm", max_tiles=6)),
    # InternVL2-2B-style: InternViT-300M + Qwen2.5-1.5B.
    "internvl-2b": ("internvit-300m", "qwen2.5-1.5b", ProjectorConfig(kind="mlp"),
                    dict(tile_tags="none", image_wrapper="internvl", max_tiles=6)),
    "internvl-8b": ("internvit-300m", "qwen2.5-7b", ProjectorConfig(kind="mlp"),
                    dict(tile_tags="none", image_wrapper="internvl", max_tiles=6)),
    # The seed system's video SFT shape: InternViT-6B + Qwen2.5-7B, 12 tiles + thumbnail with NVLM tags for images,
    # one 448px tile per video frame spliced at <video> (sft_qwen2p5_7b_internvit_6b_video.sh).
    "nvlm-video-7b": ("internvit-6b", "qwen2.5-7b", ProjectorConfig(kind="mlp"),
                      dict(tile_tags="nvlm", image_wrapper="nvlm", max_tiles=12, video_layout="nvlm",
                           video_frames=16)),
    "vlm-tiny": ("internvit-tiny", "llama-tiny", ProjectorConfig(kind="mlp"), dict(max_tiles=4)),
}


def vision_preset(name: str) -> VisionConfig:
    if name not in VISION_PRESETS:
        raise StitchConfigError(f"unknown vision preset '{name}' (known: {', '.join(sorted(VISION_PRESETS))})")
    return VISION_PRESETS[name].model_copy(deep=True)


def llm_preset(name: str) -> LLMConfig:
    if name not in LLM_PRESETS:
        raise StitchConfigError(f"unknown LLM preset '{name}' (known: {', '.join(sorted(LLM_PRESETS))})")
    return LLM_PRESETS[name].model_copy(deep=True)


def vlm_preset(name: str) -> VLMConfig:
    if name not in VLM_PRESETS:
        raise StitchConfigError(f"unknown model preset '{name}' (known: {', '.join(sorted(VLM_PRESETS))})")
    vision, llm, projector, extra = VLM_PRESETS[name]
    return VLMConfig(vision=vision_preset(vision), llm=llm_preset(llm), projector=projector.model_copy(), **extra)
