"""Loading a base model through Unsloth, with the errors a user can cause turned into one line; what it loaded."""
import bitsandbytes as bnb
from unsloth import FastLanguageModel

from common.errors import UserError
from common.hardware import torch_dtype


def load_model(model_name: str, max_seq_length: int, precision: str, load_in_4bit: bool,
               fix: str = "check --model-name, or use --smoke to run offline on a tiny model",
               target_modules: tuple[str, ...] = (), **kwargs):
    """FastLanguageModel.from_pretrained in the run's precision; fp32 (CPU) lets Unsloth's CPU backend choose. `fix`
    ends the one-line error when the model cannot be loaded; `target_modules`, the LoRA's, are checked against the
    architecture before any weight loads."""
    check_target_modules(model_name, target_modules)
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


def check_target_modules(model_name: str, target_modules: tuple[str, ...]):
    """Each LoRA target names a module of the model's architecture, read from its config.json alone (the model is
    built on the meta device: no weights, no memory); otherwise PEFT would fail after the whole load."""
    if not target_modules:
        return
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    try:
        config = AutoConfig.from_pretrained(model_name)
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
    except (OSError, ValueError):
        return  # no config to read (offline, a typo): the load says so in its own line
    linear = sorted({name.rsplit(".", 1)[-1] for name, module in skeleton.named_modules()
                     if type(module).__name__ in ("Linear", "Conv1D") and name.rsplit(".", 1)[-1] != "lm_head"})
    missing = [name for name in target_modules if name not in linear]
    if missing:
        raise UserError(f"--target-modules {','.join(missing)}: {config.model_type} has no such layer; its linear "
                        f"layers are {','.join(linear)}")


def quantization_in_use(model) -> dict | None:
    """What the loaded 4-bit layers really use, read from bitsandbytes (None when the base was not quantized)."""
    layer = next((m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)), None)
    if layer is None:
        return None
    state = layer.weight.quant_state
    return {"quant_type": state.quant_type, "double_quant": state.nested, "blocksize": state.blocksize,
            "compute_dtype": str(layer.compute_dtype)}
