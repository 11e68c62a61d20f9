"""Loading a base model through Unsloth, with the errors a user can cause turned into one line; what it loaded."""
import bitsandbytes as bnb
from unsloth import FastLanguageModel

from common.errors import UserError
from common.hardware import torch_dtype


def load_model(model_name: str, max_seq_length: int, precision: str, load_in_4bit: bool,
               fix: str = "check --model-name, or use --smoke to run offline on a tiny model", **kwargs):
    """FastLanguageModel.from_pretrained in the run's precision; fp32 (CPU) lets Unsloth's CPU backend choose. `fix`
    ends the one-line error when the model cannot be loaded."""
    try:
        return FastLanguageModel.from_pretrained(
            model_name=model_name,
            max_seq_length=max_seq_length,
            dtype=None if precision == "fp32" else torch_dtype(precision),
            load_in_4bit=load_in_4bit,
            **kwargs,
        )
    except (OSError, ValueError) as error:
        first_line = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
        raise UserError(f"could not load model {model_name!r} ({first_line}); {fix}") from None


def quantization_in_use(model) -> dict | None:
    """What the loaded 4-bit layers really use, read from bitsandbytes (None when the base was not quantized)."""
    layer = next((m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)), None)
    if layer is None:
        return None
    state = layer.weight.quant_state
    return {"quant_type": state.quant_type, "double_quant": state.nested, "blocksize": state.blocksize,
            "compute_dtype": str(layer.compute_dtype)}
