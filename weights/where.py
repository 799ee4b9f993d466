"""Print where the bundled SmolLM2-135M-Instruct GGUF is, its size and its sha256.

    python weights/where.py

Weights never go into git; this script only tells you which file msrnn will load by default.
"""
import hashlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing msrnn

from msrnn.errors import MsrnnError  # noqa: E402
from msrnn.gguf import bundled_gguf_path  # noqa: E402


def main() -> int:
    try:
        path = bundled_gguf_path()
    except MsrnnError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    size = path.stat().st_size
    print(f"path:   {path}\nsize:   {size} bytes ({size / 2**20:.1f} MiB)\nsha256: {digest.hexdigest()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
