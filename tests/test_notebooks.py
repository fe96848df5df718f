"""The notebooks of notebooks/: committed executed, with the sources of `notebooks/_build.py`.

`python notebooks/_build.py` writes and executes them. The fast tests check the committed files
(sources up to date, executed top to bottom with outputs and plots, small); the slow ones execute
each notebook again in a fresh kernel, in memory (the committed files are never rewritten), and
fail on any cell that raises.
"""

import importlib.util
import time
from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
# Per-cell limit; the three notebooks together take about a minute on an idle 2-core CPU.
CELL_TIMEOUT_S = 240
MAX_BYTES = 300_000  # per committed notebook, plots included


def _load_build():
    spec = importlib.util.spec_from_file_location("notebooks_build", NOTEBOOKS / "_build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


BUILD = _load_build()
NAMES = tuple(BUILD.NOTEBOOKS)
REGENERATE = "regenerate with `python notebooks/_build.py`"


def _code_cells(nb):
    return [cell for cell in nb.cells if cell.cell_type == "code"]


def test_every_notebook_is_listed():
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == sorted(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_committed_sources_match_the_build_script(name):
    committed = nbformat.read(NOTEBOOKS / name, as_version=4)
    built = BUILD.build(name)
    got = [(cell.cell_type, cell.source) for cell in committed.cells]
    want = [(cell.cell_type, cell.source) for cell in built.cells]
    assert got == want, f"{name} differs from notebooks/_build.py: {REGENERATE}"


@pytest.mark.parametrize("name", NAMES)
def test_committed_notebook_is_executed(name):
    path = NOTEBOOKS / name
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    cells = _code_cells(nb)
    counts = [cell.execution_count for cell in cells]
    assert counts == list(range(1, len(cells) + 1)), (
        f"{name} was not executed top to bottom in one kernel (execution counts {counts}): "
        f"{REGENERATE}"
    )
    outputs = [out for cell in cells for out in cell.outputs]
    errors = [out for out in outputs if out.output_type == "error"]
    assert not errors, f"{name} was committed with errors: {errors}"
    if any("plt." in cell.source for cell in cells):
        images = [out for out in outputs if "image/png" in out.get("data", {})]
        assert images, f"{name} draws plots but carries no image: {REGENERATE}"
    size = path.stat().st_size
    assert size < MAX_BYTES, f"{name} is {size} bytes (limit {MAX_BYTES}): shrink its plots"


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs(name, tmp_path):
    # A fresh kernel of this interpreter (jupyter_client maps "python3" to sys.executable) on the
    # CPU; it starts without this process's 8 fake devices, as a user's would.
    path = NOTEBOOKS / name
    before = path.read_bytes()
    nb = nbformat.read(path, as_version=4)
    t0 = time.perf_counter()
    BUILD.execute(nb, timeout=CELL_TIMEOUT_S, env=BUILD.kernel_env(TMPDIR=str(tmp_path)))
    print(f"{name}: {time.perf_counter() - t0:.1f}s")
    errors = [out for cell in _code_cells(nb) for out in cell.outputs if out.output_type == "error"]
    assert not errors, errors
    assert path.read_bytes() == before, f"executing {name} rewrote the committed file"
