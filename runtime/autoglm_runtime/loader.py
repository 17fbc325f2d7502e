"""Loads any Hugging Face causal LM directory (safetensors are memory-mapped by from_pretrained).

    loaded = load_model("/models/glm", dtype="auto", device="auto")

Every failure raises `ModelLoadError` with a one-line message meant for a human; the CLI prints it
and exits non-zero.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["InsufficientMemoryError", "LoadedModel", "ModelLoadError", "load_model", "resolve_device", "resolve_dtype"]

DTYPES = ("auto", "float16", "bfloat16", "float32")
DEVICES = ("auto", "cpu", "cuda")


class ModelLoadError(RuntimeError):
    """The model directory cannot be loaded; the message says why in one line."""


class InsufficientMemoryError(ModelLoadError):
    """A reload's model and KV cache do not fit next to the model that is serving."""


@dataclass
class LoadedModel:
    model: Any  # transformers PreTrainedModel (causal LM), eval mode, on `device`
    tokenizer: Any  # PreTrainedTokenizerFast (or slow)
    config: Any
    device: Any  # torch.device
    dtype: Any  # torch.dtype
    model_dir: Path
    max_model_len: int
    image_processor: Any = None  # vision-language models only (preprocessor_config.json)

    @property
    def is_vision_language(self) -> bool:
        return self.image_processor is not None

    @property
    def eos_token_ids(self) -> list[int]:
        ids: set[int] = set()
        for src in (getattr(self.model, "generation_config", None), self.config):
            eos = getattr(src, "eos_token_id", None) if src is not None else None
            if isinstance(eos, int):
                ids.add(eos)
            elif isinstance(eos, (list, tuple)):
                ids.update(int(e) for e in eos)
        if getattr(self.tokenizer, "eos_token_id", None) is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        return sorted(ids)


def resolve_device(device: str):
    import torch

    if device not in DEVICES:
        raise ModelLoadError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("device 'cuda' was requested but CUDA is not available")
    return torch.device(device)


def resolve_dtype(dtype: str, device, config: Any = None):
    import torch

    if dtype not in DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if device.type == "cpu":
        if dtype in ("auto", "float32"):
            return torch.float32
        if dtype == "float16":
            raise ModelLoadError("dtype float16 is not supported on CPU; use float32 or bfloat16")
        return torch.bfloat16
    # CUDA
    if dtype == "auto":
        want = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        if isinstance(want, str):
            want = getattr(torch, want, None)
        if want in (torch.float16, torch.bfloat16):
            return want
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]


def _check_dir(model_dir: Path) -> dict:
    if not model_dir.exists():
        raise ModelLoadError(f"model directory {model_dir} does not exist")
    if not model_dir.is_dir():
        raise ModelLoadError(f"model path {model_dir} is not a directory")
    cfg_path = model_dir / "config.json"
    if not cfg_path.is_file():
        raise ModelLoadError(f"{model_dir} has no config.json")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{cfg_path} is not valid JSON: {exc}") from None
    if not isinstance(cfg, dict) or "model_type" not in cfg:
        raise ModelLoadError(f"{cfg_path} has no model_type")
    if not any(model_dir.glob("*.safetensors")) and not any(model_dir.glob("*.bin")):
        raise ModelLoadError(f"{model_dir} has no weights (*.safetensors)")
    if not (model_dir / "tokenizer.json").is_file() and not (model_dir / "tokenizer_config.json").is_file():
        raise ModelLoadError(f"{model_dir} has no tokenizer (tokenizer.json)")
    return cfg


def load_model(model_dir: str | Path, dtype: str = "auto", device: str = "auto") -> LoadedModel:
    model_dir = Path(model_dir)
    _check_dir(model_dir)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    dev = resolve_device(device)
    try:
        config = AutoConfig.from_pretrained(model_dir)
    except Exception as exc:  # noqa: BLE001 - any parse/validation error is a load error
        raise ModelLoadError(f"cannot read {model_dir / 'config.json'}: {_one_line(exc)}") from None
    torch_dtype = resolve_dtype(dtype, dev, config)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"cannot load the tokenizer in {model_dir}: {_one_line(exc)}") from None
    from .vision import is_vision_language

    vl = is_vision_language(config)
    image_processor = None
    if vl:  # GLM-4.1V family (AutoGLM-Phone-9B): the image processor comes with the folder
        from transformers import AutoImageProcessor, AutoModelForImageTextToText

        if not (model_dir / "preprocessor_config.json").is_file():
            raise ModelLoadError(f"{model_dir} is a vision-language model but has no preprocessor_config.json")
        try:
            # The Pillow backend always: the same preprocessing with or without torchvision installed.
            image_processor = AutoImageProcessor.from_pretrained(model_dir, backend="pil")
        except Exception as exc:  # noqa: BLE001
            raise ModelLoadError(f"cannot load the image processor in {model_dir}: {_one_line(exc)}") from None
    try:
        model = (AutoModelForImageTextToText if vl else AutoModelForCausalLM).from_pretrained(
            model_dir, dtype=torch_dtype, attn_implementation="sdpa", device_map=None
        )
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"cannot load the model in {model_dir}: {_one_line(exc)}") from None
    model.to(dev)
    model.eval()
    model.requires_grad_(False)

    text_cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    max_len = getattr(text_cfg, "max_position_embeddings", None) or getattr(tokenizer, "model_max_length", None)
    if not isinstance(max_len, int) or max_len <= 0 or max_len > 1 << 20:
        max_len = 2048
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        config=config,
        device=dev,
        dtype=torch_dtype,
        model_dir=model_dir,
        max_model_len=int(max_len),
        image_processor=image_processor,
    )


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"
