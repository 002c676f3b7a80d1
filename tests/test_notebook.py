"""notebooks/colab.ipynb runs top to bottom headless (nbclient) on CPU with tiny settings."""
import os

import nbformat
from nbclient import NotebookClient

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_colab_notebook_executes_and_shows_the_results(tmp_path, monkeypatch):
  nb = nbformat.read(os.path.join(REPO, "notebooks", "colab.ipynb"), as_version=4)
  params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
  assert len(params) == 1
  # Papermill-style: a cell after the parameters cell overrides them.
  nb.cells.insert(nb.cells.index(params[0]) + 1, nbformat.v4.new_code_cell(
      f"STEPS, TRAIN_SIZE, EVAL_SIZE, BOOTSTRAP = 10, 600, 100, 20\nWORKDIR = {str(tmp_path)!r}"))
  # The kernel imports the package from this checkout (as Colab does after its install cell).
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
      filter(None, [REPO, os.environ.get("PYTHONPATH", "")])))
  NotebookClient(nb, timeout=None, kernel_name="python3",
                 resources={"metadata": {"path": REPO}}).execute()
  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
  assert not [o for o in outputs if o.get("output_type") == "error"]
  markdown = "".join(o["data"].get("text/markdown", "") for o in outputs if "data" in o)
  assert "bias/rb" in markdown and "balanced" in markdown
  assert sum("image/png" in o.get("data", {}) for o in outputs) == 3
  assert (tmp_path / "summary.json").exists()
