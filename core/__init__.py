"""ptlab.core: the simulated machine, the kernel paths, the backends, analysis and the probe.

Before any of the compiled hot-path modules is imported, the build switch decides whether each
runs compiled or as plain Python (``PTLAB_PURE=1``, or a source edited since the build):
core/machine/build.py."""

from ptlab.core.machine import build as _build

_build.install()
