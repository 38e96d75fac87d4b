"""Give the notebooks the kernel metadata JupyterLab would write, so that opening one changes nothing.

JupyterLab rewrites a notebook's `kernelspec` and `language_info` with the running kernel's on open
(checked in headless Chromium: with "Python 3" as display name and no `language_info` the tab turns
modified as soon as the kernel is idle, and autosave rewrites the tracked file). `make sync` stamps
both from this environment's `python3` kernel: `python -m permkv.harness.notebooks [PATH ...]`.
"""

from __future__ import annotations

import sys
from pathlib import Path

from permkv.harness.tracking import ROOT


def kernel_metadata() -> dict:
    """`kernelspec` and `language_info` as this environment's `python3` kernel reports them."""
    from ipykernel.ipkernel import IPythonKernel
    from jupyter_client.kernelspec import KernelSpecManager

    spec = KernelSpecManager().get_kernel_spec("python3")
    return {"kernelspec": {"display_name": spec.display_name, "language": spec.language, "name": "python3"},
            "language_info": dict(IPythonKernel.language_info)}


def stamp(paths: list[Path]) -> list[Path]:
    """Write `kernel_metadata()` into each notebook that differs; returns the notebooks changed."""
    import nbformat

    meta, changed = kernel_metadata(), []
    for path in paths:
        nb = nbformat.read(path, as_version=4)
        if all(nb.metadata.get(key) == value for key, value in meta.items()):
            continue
        nb.metadata.update(meta)
        nbformat.write(nb, path)
        changed.append(path)
    return changed


if __name__ == "__main__":
    paths = [Path(p) for p in sys.argv[1:]] or sorted((ROOT / "notebooks").glob("*.ipynb"))
    for path in stamp(paths):
        print(f"stamped kernel metadata: {path}")
