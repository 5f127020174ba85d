"""Worker processes and transports; installed as ``workbench.backends``."""
