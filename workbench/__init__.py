"""workbench: compress large language models from a terminal.

Importing this package is cheap and never imports torch: the engine modules
(``workbench.engine``, ``workbench.models``, ...) are imported only by the
process that runs compression (the worker, or a headless run).
"""

__version__ = "0.1.0"
