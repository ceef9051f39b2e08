"""notebooks/quickstart.ipynb runs end to end (CPU, a few steps, 4 frames)."""

import os

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")  # the notebook draws its figures with it (the plot extra)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "notebooks", "quickstart.ipynb")


def _outputs(nb, kind):
  return [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])
          if kind(o)]


def test_quickstart_notebook_runs(monkeypatch):
  monkeypatch.setenv("MODJAX_NOTEBOOK_STEPS", "5")    # warm-up 2, interval 2: map map sparse refresh sparse
  monkeypatch.setenv("MODJAX_NOTEBOOK_FRAMES", "4")
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.delenv("MPLBACKEND", raising=False)   # the kernel's inline backend renders the figures
  # the kernel finds this checkout even when modjax is not pip-installed
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
  nb = nbformat.read(NOTEBOOK, as_version=4)
  client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                   resources={"metadata": {"path": os.path.join(ROOT, "notebooks")}})
  client.execute()

  errors = _outputs(nb, lambda o: o.get("output_type") == "error")
  assert not errors, errors
  text = "".join(o.get("text", "") for o in _outputs(nb, lambda o: o.get("output_type") == "stream"))
  assert "MOD-DiT sparsity (sparse steps):" in text and "PSNR of MOD-DiT vs dense:" in text
  assert "map map sparse refresh sparse" in text
  html = [o for o in _outputs(nb, lambda o: "data" in o) if "text/html" in o["data"]]
  assert any("data:image/gif;base64," in o["data"]["text/html"] for o in html)
  pngs = _outputs(nb, lambda o: "data" in o and "image/png" in o["data"])
  assert len(pngs) >= 3, "frames, masks and density figures"


def test_notebook_is_clean():
  """Committed without outputs or execution counts, with a Python 3 kernelspec."""
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  assert nb.metadata["kernelspec"]["name"] == "python3"
  for cell in nb.cells:
    if cell.cell_type == "code":
      assert not cell.outputs and cell.execution_count is None
  assert "pip install" in nb.cells[1].source and "import modjax" in nb.cells[1].source
