"""The agent's side of a worker's control pipe never blocks its loop: a message larger than the pipe takes
(a restarted worker's `shared_state`, a big fleet) goes out as the worker reads it, in order, framed as
`multiprocessing.Connection` frames it. Negative control: `Connection.send` of the same message does not
return while the worker is not reading."""

from __future__ import annotations

import asyncio
import multiprocessing
import threading

from overlay.runtime.workers import WorkerPool

BIG = ("shared", ("learned", "edge1", "x" * 8_000_000))


def test_a_message_the_pipe_cannot_take_at_once_waits_in_order_and_the_loop_goes_on() -> None:
    async def scenario() -> list[object]:
        loop = asyncio.get_running_loop()
        pool = WorkerPool(2, loop, state=lambda: ({}, {}, frozenset()))
        ours, theirs = multiprocessing.Pipe()
        pool._controls[1] = ours
        pool._send(1, BIG)             # returns at once: the pipe took what it could
        pool._send(1, ("state", 1))    # queued behind it, never ahead
        assert len(pool._outbox[1]) > 1_000_000, "most of it waits for the worker"
        received: list[object] = []
        reader = threading.Thread(target=lambda: received.extend((theirs.recv(), theirs.recv())), daemon=True)
        reader.start()
        for _ in range(500):             # the loop keeps running; the writer callback drains the rest
            if not reader.is_alive():
                break
            await asyncio.sleep(0.01)
        assert 1 not in pool._outbox, "all of it went out"
        ours.close()
        theirs.close()
        return received

    assert asyncio.run(scenario()) == [BIG, ("state", 1)]


def test_the_negative_control_a_blocking_send_waits_for_the_reader() -> None:
    ours, theirs = multiprocessing.Pipe()
    sender = threading.Thread(target=ours.send, args=(BIG,), daemon=True)
    sender.start()
    sender.join(0.5)
    assert sender.is_alive(), "Connection.send has not returned: nobody read"
    assert theirs.recv() == BIG
    sender.join(5)
    assert not sender.is_alive()
