"""Where `--compile` keeps what it compiled, so that the next process does not compile it again.

torch.compile's inductor writes each compiled graph (its generated C++ and the built library) into an on-disk FX
graph cache, and AOTAutograd a cache of its own on top: a second process that traces the same graphs finds them
there and skips the code generation and the C++ build, which are most of a compile. msrnn points both at one folder
of its own instead of torch's default (/tmp/torchinductor_USER, which a reboot empties):

    $MSRNN_CACHE/compile         when MSRNN_CACHE is set
    ~/.cache/msrnn/compile       otherwise ($XDG_CACHE_HOME/msrnn/compile when that is set)

A TORCHINDUCTOR_CACHE_DIR of the user's own wins over both (torch itself sets the variable to its default once it
has looked: that value is not taken for a choice). Deleting the folder (`rm -rf ~/.cache/msrnn/compile`) is always
safe: the next `--compile` builds it again. Entries are keyed by torch's version, the graph and the machine's
compiler, so a stale entry is never used, only left unread.
"""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """The folder `--compile` caches in (see the module docstring)."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    chosen = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if chosen and os.path.abspath(chosen) != os.path.abspath(default_cache_dir()):  # torch writes its default there
        return Path(chosen)
    if os.environ.get("MSRNN_CACHE"):
        return Path(os.environ["MSRNN_CACHE"]) / "compile"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "msrnn" / "compile"


def use_cache() -> Path:
    """Point torch's inductor (and AOTAutograd, which keeps its entries beside it) at cache_dir(), with the local
    caches on; returns the folder. torch reads the variable at every cache access, so setting it before the first
    compile is enough."""
    import torch._functorch.config
    import torch._inductor.config

    folder = cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)
    torch._inductor.config.fx_graph_cache = True
    torch._functorch.config.enable_autograd_cache = True
    return folder
