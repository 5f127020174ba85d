"""Worker processes and transports; installed as ``workbench.backends``.

The UI and headless runs never run torch themselves: they start workers
(``workbench worker``) and speak a JSON-lines protocol with them (see
``PROTOCOL.md``).

- ``protocol``: message framing and validation (standard library only);
- ``worker``: the worker process (the real engine; torch imported there);
- ``fake``: ``workbench worker --fake``, deterministic event streams without torch;
- ``transports``: how a worker starts (a local subprocess, or ssh);
- ``client``: the asyncio client, a pool of workers and a synchronous wrapper;
- ``cli``: the ``workbench worker`` command.
"""
