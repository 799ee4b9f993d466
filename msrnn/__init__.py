"""msrnn: "Transformers are Multi-State RNNs" (Oren et al., 2024) as a from-scratch PyTorch Llama/Mistral.

    model, tok = msrnn.load(path)                          # HF directory, hub id, .gguf, or None (bundled)
    state = model.init_state(batch_size=1, policy=policy)
    logits, state = model.step(tokens, state, policy)       # one token per row: the recurrence
"""
from . import policies
from .config import Config
from .errors import CheckpointError, ConfigError, InputError, MsrnnError
from .model import Transformer
from .policies import make_policy
from .state import LayerState, State
from .weights import load, load_model

__version__ = "0.1.0"
__all__ = ["Transformer", "load", "load_model", "Config", "State", "LayerState", "policies", "make_policy", "MsrnnError",
           "ConfigError", "CheckpointError", "InputError"]
