"""Builds small GLM-4.1V-shaped vision-language checkpoints (random weights), no model hub.

    make_vl_model("tiny-vl", Path("/tmp/tiny-vl"))    # ~1M parameters, for tests
    make_vl_model("small-vl", Path("/tmp/small-vl"))  # ~30M parameters, for the benchmark

The folder has the layout of the published `zai-org/AutoGLM-Phone-9B` / `GLM-4.1V-9B-Thinking`
checkpoints: `config.json` naming `Glm4vForConditionalGeneration` (text config with partial rotary
and an M-RoPE `mrope_section`, vision config with 14-px patches, 2x2 spatial merge, temporal patch
2), `model.safetensors`, `generation_config.json`, `preprocessor_config.json` (the Glm4v image
processor, with a smaller `size.longest_edge` so test images give few tokens), `tokenizer.json` with
GLM's special tokens (`[gMASK]`, `<sop>`, `<|begin_of_image|>`, `<|image|>`, `<|end_of_image|>`,
...) and a chat template in GLM-4.1V's format.
"""

from __future__ import annotations

from pathlib import Path

from .modelmaker import BOS, EOS, PAD, make_tokenizer, readable_by_all

__all__ = ["VL_SIZES", "VL_CHAT_TEMPLATE", "make_vl_model"]

IMAGE_TOKENS = (
    "[gMASK]",
    "<|begin_of_image|>",
    "<|end_of_image|>",
    "<|image|>",
    "<|begin_of_video|>",
    "<|end_of_video|>",
    "<|video|>",
)

# GLM-4.1V's template shape: `[gMASK]<sop>`, role tags, an image part becomes
# `<|begin_of_image|><|image|><|end_of_image|>` (the processor expands `<|image|>` to one token
# per merged 28x28 patch).
VL_CHAT_TEMPLATE = (
    "[gMASK]<sop>"
    "{%- for msg in messages %}"
    "{%- if msg.role == 'system' %}<|system|>\n{{ msg.content }}"
    "{%- elif msg.role == 'user' %}<|user|>\n"
    "{%- if msg.content is string %}{{ msg.content }}"
    "{%- else %}{%- for item in msg.content %}"
    "{%- if item.type == 'image' or 'image' in item %}<|begin_of_image|><|image|><|end_of_image|>"
    "{%- elif item.type == 'text' %}{{ item.text }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{%- elif msg.role == 'assistant' %}<|assistant|>\n"
    "{%- if msg.content is string %}{{ msg.content }}"
    "{%- else %}{%- for item in msg.content %}"
    "{%- if item.type == 'text' %}{{ item.text }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

VL_SIZES: dict[str, dict] = {
    "tiny-vl": dict(
        text=dict(
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=4096,
            mrope_section=[2, 3, 3],
        ),
        vision=dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=4, image_size=112),
        # <= 32 merged tokens per image (28x28 px each; the budget counts both temporal frames).
        longest_edge=28 * 28 * 64,
    ),
    "small-vl": dict(
        text=dict(
            hidden_size=512,
            intermediate_size=1536,
            num_hidden_layers=8,
            num_attention_heads=8,
            num_key_value_heads=2,
            max_position_embeddings=8192,
            mrope_section=[4, 6, 6],
        ),
        vision=dict(depth=4, hidden_size=256, intermediate_size=512, num_heads=4, image_size=336),
        # <= 128 merged tokens per image: a 1080x2400 screenshot becomes 7x16 = 112 merged patches.
        longest_edge=28 * 28 * 256,
    ),
}


def make_vl_model(size: str, out: Path | str, seed: int = 0) -> Path:
    import torch
    from transformers import GenerationConfig, Glm4vConfig, Glm4vForConditionalGeneration
    from transformers.models.glm4v.image_processing_pil_glm4v import Glm4vImageProcessorPil

    if size not in VL_SIZES:
        raise ValueError(f"unknown size {size!r}; choose one of {', '.join(VL_SIZES)}")
    spec = VL_SIZES[size]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = make_tokenizer(extra_special_tokens=IMAGE_TOKENS)
    tokenizer.chat_template = VL_CHAT_TEMPLATE
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in (PAD, BOS, EOS, "<|user|>", "<|observation|>", *IMAGE_TOKENS)}
    vocab_padded = (len(tokenizer) + 63) // 64 * 64
    text = dict(spec["text"])
    mrope = text.pop("mrope_section")
    text_config = dict(
        vocab_size=vocab_padded,
        hidden_act="silu",
        rms_norm_eps=1e-5,
        pad_token_id=ids[PAD],
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0,
            "partial_rotary_factor": 0.5,
            "mrope_section": mrope,
        },
        **text,
    )
    vision_config = dict(
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        in_channels=3,
        hidden_act="silu",
        rms_norm_eps=1e-5,
        out_hidden_size=text["hidden_size"],
        **spec["vision"],
    )
    config = Glm4vConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=ids["<|image|>"],
        video_token_id=ids["<|video|>"],
        image_start_token_id=ids["<|begin_of_image|>"],
        image_end_token_id=ids["<|end_of_image|>"],
        video_start_token_id=ids["<|begin_of_video|>"],
        video_end_token_id=ids["<|end_of_video|>"],
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Glm4vForConditionalGeneration(config)
    model.eval()
    eos = [ids[EOS], ids["<|user|>"], ids["<|observation|>"]]
    model.generation_config = GenerationConfig(
        bos_token_id=ids[BOS], eos_token_id=eos, pad_token_id=ids[PAD], do_sample=False
    )
    model.save_pretrained(out, safe_serialization=True)

    image_processor = Glm4vImageProcessorPil(size={"shortest_edge": 28 * 28 * 4, "longest_edge": spec["longest_edge"]})
    # Saved as `"image_processor_type": "Glm4vImageProcessor"`, as in the published folders
    # (AutoImageProcessor picks the PIL backend when torchvision is absent).
    image_processor.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return readable_by_all(out)
