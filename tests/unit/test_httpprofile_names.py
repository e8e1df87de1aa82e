"""The HTTP profile (loadtest/httpprofile.py) reads py-spy 0.4's stacks, which name a method
by its qualified name: a thread waiting for work is still left out, and a system call's
leaf is still named apart. Counted as work, the event loop's wait in epoll and the
housekeeping thread's wait on its queue were ~45 % of the samples of a warm run's profile."""

from __future__ import annotations

from loadtest.httpprofile import LOOP, shares

MAIN = ("_run_module_as_main (<frozen runpy>:198);_serve (service/cli.py:103);"
        "run (asyncio/runners.py:190);Runner.run (asyncio/runners.py:118);"
        "BaseEventLoop.run_until_complete (asyncio/base_events.py:640);"
        "BaseEventLoop.run_forever (asyncio/base_events.py:607)")
RUN_ONCE = MAIN + ";BaseEventLoop._run_once (asyncio/base_events.py:1922)"
HANDLER = (RUN_ONCE + ";Handle._run (asyncio/events.py:80);"
           "RequestHandler._handle_request (aiohttp/web_protocol.py:477)")
HOUSEKEEPING = ("Thread._bootstrap (threading.py:995);Thread._bootstrap_inner "
                "(threading.py:1038);Thread.run (threading.py:975);"
                "Housekeeper._serve (sandbox/runtime/housekeeping.py:62)")


def test_waits_named_by_qualified_names_are_idle() -> None:
    raw = "\n".join([
        f"{RUN_ONCE};EpollSelector.select (selectors.py:468) 50",
        f"{HOUSEKEEPING} 40",
        f"{HOUSEKEEPING};V1Cgroup._renew (sandbox/runtime/cgroups/v1.py:120) 7",
        f"{RUN_ONCE} 2",
        f"{HANDLER};StreamResponse.write (aiohttp/web_response.py:500);"
        "_SelectorSocketTransport.write (asyncio/selector_events.py:1060) 5",
        f"{HANDLER} 3",
    ])
    counts, total = shares(raw)
    assert counts == {
        "engine + runtime (sandbox/)": 7,
        LOOP: 2,
        "aiohttp (HTTP parse, routing, response write): socket send (kernel)": 5,
        "aiohttp (HTTP parse, routing, response write)": 3,
    }
    assert total == 17
