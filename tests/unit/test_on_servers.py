"""runner.cli.on_servers.each, what `runner app|proxy|accessory` run on their servers with, and
deployers.proxy_reboot.image_note (pure)."""
from __future__ import annotations

import _thread
import threading
import time

from deployers.proxy_reboot import image_note
from runner.cli.on_servers import each


def test_each_returns_results_and_exceptions_in_order_under_the_limit():
    running, most = [0], [0]
    lock = threading.Lock()
    names = []

    def fn(n: int) -> int:
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
            names.append(threading.current_thread().name)
        time.sleep(0.05)
        with lock:
            running[0] -= 1
        if n == 2:
            raise ValueError("two")
        return n * 10

    results, interrupted = each(threading.Event(), fn, [1, 2, 3, 4], lambda n: f"t-{n}", 2)
    assert not interrupted
    assert results[0] == 10 and results[2] == 30 and results[3] == 40
    assert isinstance(results[1], ValueError) and str(results[1]) == "two"
    assert most[0] == 2
    assert sorted(names) == ["t-1", "t-2", "t-3", "t-4"]
    assert each(threading.Event(), fn, [], str) == ([], False)


def test_ctrl_c_sets_the_cancel_event_and_says_interrupted():
    """A real KeyboardInterrupt in the waiting thread (what Ctrl-C raises): the cancel event is
    set, and the threads, which stop on it, report."""
    cancel = threading.Event()
    second = threading.Event()

    def fn(n: int) -> str:
        if n == 1:
            second.wait(10)
            time.sleep(0.3)  # each() waits on the threads by now: Ctrl-C reaches that wait
            _thread.interrupt_main()
        else:
            second.set()
        return f"{n} cancelled" if cancel.wait(10) else f"{n} never cancelled"

    results, interrupted = each(cancel, fn, [1, 2], str)
    assert interrupted and cancel.is_set()
    assert results == ["1 cancelled", "2 cancelled"]


def test_image_note():
    assert image_note("caddy:2.8", "caddy:2.8") == ""
    assert image_note("caddy:2.8", "caddy:2.7") == ("it runs caddy:2.7, this pipeline says "
                                                    "caddy:2.8: `runner proxy reboot` replaces it")
    assert image_note("caddy:2.8", "").startswith("it runs ?,")
