"""notebooks/quickstart.ipynb runs top to bottom (nbclient), so it cannot rot."""

import os

import nbformat
import pytest
from conftest import ROOT, subprocess_env
from nbclient import NotebookClient

pytestmark = pytest.mark.xdist_group("notebook")


def test_quickstart_notebook_executes(monkeypatch):
  for key, value in subprocess_env().items():  # the kernel inherits the tests' JAX settings
    monkeypatch.setenv(key, value)
  path = os.path.join(ROOT, "notebooks", "quickstart.ipynb")
  notebook = nbformat.read(path, as_version=4)
  NotebookClient(
    notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": ROOT}}
  ).execute()
  outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
  assert not [o for o in outputs if o.output_type == "error"]
  images = [o for o in outputs if "image/png" in o.get("data", {})]
  assert len(images) >= 5  # degradations x2, sub-bands, decodes, restoration
  text = "".join(o.get("text", "") for o in outputs)
  assert "-> restored (256, 256, 3) float32" in text
