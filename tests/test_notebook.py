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


WAN_NOTEBOOK = os.path.join(ROOT, "notebooks", "wan_text_to_video.ipynb")


def test_wan_notebook_runs_against_a_tiny_folder(monkeypatch, tmp_path):
  """notebooks/wan_text_to_video.ipynb end to end on CPU: a tiny diffusers-written Wan2.1
  folder, dense and MOD-DiT, the side-by-side video, the mask plots."""
  pytest.importorskip("diffusers")
  from tests.pipelines.tiny_wan import tiny_wan_folder
  folder = tiny_wan_folder(tmp_path)
  for name, value in (("MODJAX_WAN_FOLDER", str(folder)), ("MODJAX_NOTEBOOK_HEIGHT", "64"),
                      ("MODJAX_NOTEBOOK_WIDTH", "128"), ("MODJAX_NOTEBOOK_FRAMES", "17"),
                      ("MODJAX_NOTEBOOK_STEPS", "6"), ("JAX_PLATFORMS", "cpu")):
    monkeypatch.setenv(name, value)
  monkeypatch.delenv("MPLBACKEND", raising=False)
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
  nb = nbformat.read(WAN_NOTEBOOK, as_version=4)
  client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                   resources={"metadata": {"path": str(tmp_path)}})
  client.execute()
  errors = _outputs(nb, lambda o: o.get("output_type") == "error")
  assert not errors, errors
  text = "".join(o.get("text", "") for o in _outputs(nb, lambda o: o.get("output_type") == "stream"))
  for fragment in ("memory estimate", "denoising speedup of MOD-DiT over dense", "PSNR of MOD-DiT vs dense"):
    assert fragment in text, fragment
  html = [o for o in _outputs(nb, lambda o: "data" in o) if "text/html" in o["data"]]
  assert any("base64," in o["data"]["text/html"] for o in html)
  pngs = _outputs(nb, lambda o: "data" in o and "image/png" in o["data"])
  assert len(pngs) >= 3, "masks and density figures"
  assert (tmp_path / "wan_dense_vs_mod.mp4").exists() or (tmp_path / "wan_dense_vs_mod.gif").exists()


@pytest.mark.parametrize("path", [NOTEBOOK, WAN_NOTEBOOK], ids=["quickstart", "wan"])
def test_setup_cell_installs_what_the_notebook_imports(path, monkeypatch):
  """After the README's `pip install -e ".[video]"` matplotlib is missing: the setup cell
  must notice and install the plot extra (it used to check modjax only)."""
  import importlib.util
  nb = nbformat.read(path, as_version=4)
  source = nb.cells[1].source
  installs = []
  lines = []
  for line in source.splitlines():
    stripped = line.strip()
    if stripped.startswith("%pip install"):
      indent = line[: len(line) - len(line.lstrip())]
      lines.append(f"{indent}installs.append(f{stripped[len('%pip install'):].strip()!r})")
    elif stripped.startswith(("import modjax", "import jax", "print(")) or "sys.path.insert" in stripped:
      lines.append(line[: len(line) - len(line.lstrip())] + "pass")
    else:
      lines.append(line)
  real_find_spec = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name == "matplotlib" else real_find_spec(name, *a))
  monkeypatch.chdir(ROOT)
  exec(compile("\n".join(lines), path, "exec"), {"installs": installs, "__name__": "nb"})
  assert installs and "plot" in installs[0], installs
