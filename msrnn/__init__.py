"""msrnn: "Transformers are Multi-State RNNs" (Oren et al., 2024) as a from-scratch PyTorch Llama/Mistral.

    model = msrnn.Transformer.from_pretrained(path)        # HF directory, hub id, or .gguf
    state = model.init_state(batch_size=1, policy=policy)
    logits, state = model.step(tokens, state, policy)       # one token per row: the recurrence
"""
from . import policies
from .config import Config
from .errors import CheckpointError, ConfigError, InputError, MsrnnError
from .model import Transformer
from .policies import make_policy
from .state import LayerState, State
from .weights import load

__version__ = "0.1.0"
__all__ = ["Transformer", "load", "Config", "State", "LayerState", "policies", "make_policy", "MsrnnError",
           "ConfigError", "CheckpointError", "InputError"]
