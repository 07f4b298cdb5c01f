"""Every ```python block of README.md runs as written, in order, on the bundled model.

The blocks are read like a notebook: one namespace, top to bottom, so a later block may use
what an earlier one defined (and nothing else). A block with top-level `await` / `async
with` is run as a coroutine, which is what its reader wraps it in.
"""
from __future__ import annotations

import ast
import asyncio
import inspect
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```", README.read_text(encoding="utf-8"), re.S | re.M)


def test_readme_has_python_blocks():
    assert BLOCKS, "README.md has no ```python block"


def test_every_python_block_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("INFERCEPT_CACHE_DIR", str(tmp_path))  # the cost model's measurements stay here
    namespace: dict = {"__name__": "__readme__"}
    for i, code in enumerate(BLOCKS, 1):
        compiled = compile(code, f"README.md python block {i}", "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
        try:
            if compiled.co_flags & inspect.CO_COROUTINE:
                asyncio.run(eval(compiled, namespace))
            else:
                exec(compiled, namespace)
        except Exception as exc:
            pytest.fail(f"README.md python block {i} raised {type(exc).__name__}: {exc}\n{code}")
    engine = namespace.get("engine")
    if engine is not None:  # every engine a block opened was closed by it, with every block given back
        assert engine.closed
        engine.cache.check_integrity()
        assert engine.cache.is_empty()
