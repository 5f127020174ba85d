"""What the worker tests share: running async tests, fake and scripted workers, a tiny spec."""

from __future__ import annotations

import asyncio
import functools
import sys
import textwrap

from workbench.backends.transports import LocalTransport

FAKE = ["--fake", "--fake-delay", "0.005"]
# a tiny run: one prune step on the fake (or demo) model, three evaluation windows
SPEC = {"name": "tiny", "steps": [{"type": "prune", "method": "wanda", "sparsity": 0.5}],
        "calibration": {"nsamples": 4, "seqlen": 64}, "evaluate": {"limit": 3, "seqlen": 64}}


def async_test(fn):
    """Run an async test function in a fresh event loop, failing it after 90 s instead of hanging."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return asyncio.run(asyncio.wait_for(fn(*args, **kwargs), 90))

    return wrapper


def fake(*args: str, **kwargs) -> LocalTransport:
    """A local fake worker with extra ``workbench worker`` options."""
    return LocalTransport(args=[*FAKE, *args], **kwargs)


def scripted(code: str) -> LocalTransport:
    """A 'worker' that is a short Python script: for testing what a broken or foreign worker does."""
    return LocalTransport(command=[sys.executable, "-c", textwrap.dedent(code)])


async def follow(client, job: str) -> list:
    """Every update of one job, up to its result or error."""
    return [update async for update in client.events(job)]


def event_types(updates) -> list[str]:
    return [u.event.type for u in updates if u.kind == "event"]
