"""The committed notebooks open in JupyterLab without turning modified."""

from pathlib import Path

import nbformat
import pytest

from permkv.harness import notebooks

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


@pytest.fixture(scope="module")
def kernel_info() -> dict:
    """What a real `python3` kernel of this environment reports (JupyterLab copies it into the notebook)."""
    from jupyter_client.manager import start_new_kernel

    manager, client = start_new_kernel(kernel_name="python3")
    try:
        return client.kernel_info(reply=True, timeout=60)["content"]
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=True)


def test_stamped_metadata_is_what_the_kernel_reports(kernel_info):
    assert notebooks.kernel_metadata()["language_info"] == kernel_info["language_info"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_carries_the_kernel_metadata(path, kernel_info):
    meta = nbformat.read(path, as_version=4).metadata
    assert meta.get("language_info") == kernel_info["language_info"], f"run `make sync` to stamp {path.name}"
    assert meta.get("kernelspec") == notebooks.kernel_metadata()["kernelspec"], f"run `make sync` to stamp {path.name}"


def test_stamp_writes_only_what_differs(tmp_path):
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    path = tmp_path / "x.ipynb"
    nbformat.write(nb, path)
    assert notebooks.stamp([path]) == [path]
    assert nbformat.read(path, as_version=4).metadata["kernelspec"]["display_name"] == \
        notebooks.kernel_metadata()["kernelspec"]["display_name"]
    assert notebooks.stamp([path]) == []
