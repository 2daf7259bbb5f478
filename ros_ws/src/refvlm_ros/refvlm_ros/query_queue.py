"""~/query requests and ~/ground goals answered off the executor, so a burst of callers
never waits unseen and never holds the executor.

rclpy service callbacks are synchronous: a callback blocked on the model holds an
executor thread, and requests beyond the executor's threads sit in the DDS history,
where the default depth (10) drops the oldest. Here the callback only enqueues the
request and returns at once; one worker thread answers the queue in order, and the
reply goes out when both the answer and the request header (which the executor hands
to ``send_response`` after the callback returns) are there. Goals queue the same way
(``submit_call``), counted against the same limit. Past ``max_pending`` waiting
requests, a request gets a quick "busy, retry" reply instead. No ROS imports.
"""
from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Any, Callable

WORKER_NAME = "refvlm-queries"
SHUTTING_DOWN = "the node is shutting down"


@dataclass
class _Job:
    """What the worker does with one queued request: ``run`` it, or ``refuse`` it (closed);
    then ``finished`` (once it no longer counts as pending)."""

    run: Callable[[], None]
    refuse: Callable[[str], None]
    finished: Callable[[], None] = lambda: None


class PendingReply:
    """One request whose reply is sent once it is answered and its header is known."""

    def __init__(self, request: Any, response: Any) -> None:
        self.request, self.response = request, response
        self._lock = threading.Lock()
        self._answered = False
        self._send: Callable[[], None] | None = None

    def attach(self, send: Callable[[Any, Any], None], header: Any) -> None:
        with self._lock:
            self._send = lambda: send(self.response, header)
            ready = self._answered
        if ready:
            self._send()

    def answered(self) -> None:
        with self._lock:
            self._answered = True
            send = self._send
        if send is not None:
            send()


class QueryQueue:
    """Bounded queue of ~/query requests (and ~/ground goals) answered by one worker thread.

    ``answer(request, response)`` fills the response (it must not raise);
    ``refuse(response, reason)`` fills a refusal."""

    def __init__(self, answer: Callable[[Any, Any], Any], refuse: Callable[[Any, Any, str], None],
                 max_pending: int) -> None:
        self._answer, self._refuse = answer, refuse
        self.max_pending = max_pending
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self._deferred: dict[int, PendingReply] = {}
        self._lock = threading.Lock()
        self._pending = 0
        self.busy_replies = 0
        self._closed = False
        self._worker = threading.Thread(target=self._run, name=WORKER_NAME, daemon=True)
        self._worker.start()

    @property
    def pending(self) -> int:
        return self._pending

    def install(self, service: Any) -> None:
        """Makes ``service`` hold back replies of queued requests until they are answered."""
        send = service.send_response

        def send_or_defer(response: Any, header: Any) -> None:
            with self._lock:
                job = self._deferred.pop(id(response), None)
            if job is None:
                send(response, header)
            else:
                job.attach(send, header)

        service.send_response = send_or_defer

    def submit(self, request: Any, response: Any) -> Any:
        """The service callback: queue the request, or fill a busy reply at once."""
        pending = PendingReply(request, response)
        with self._lock:
            refusal = self._admit()
            if refusal is None:
                self._deferred[id(response)] = pending
        if refusal is not None:
            self._refuse(request, response, refusal)
            return response
        self._jobs.put(_Job(run=lambda: self._answer(request, response),
                            refuse=lambda reason: self._refuse(request, response, reason),
                            finished=pending.answered))
        return response

    def submit_call(self, run: Callable[[], None], refuse: Callable[[str], None]) -> None:
        """Queues ``run`` (a ~/ground goal) behind the waiting requests, counted like them.
        ``refuse(reason)`` is called instead, at once when the queue is full or closed, or
        by the worker when the queue closes before ``run``'s turn."""
        with self._lock:
            refusal = self._admit()
        if refusal is not None:
            refuse(refusal)
        else:
            self._jobs.put(_Job(run, refuse))

    def _admit(self) -> str | None:
        """Under the lock: counts one more pending request, or says why it is refused."""
        if self._closed:
            return SHUTTING_DOWN
        if self._pending >= self.max_pending:
            self.busy_replies += 1
            return (f"busy: {self._pending} queries are waiting "
                    f"(parameter max_pending_queries={self.max_pending}); retry shortly")
        self._pending += 1
        return None

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            if self._closed:
                job.refuse(SHUTTING_DOWN)
            else:
                job.run()
            with self._lock:
                self._pending -= 1
            job.finished()

    def close(self, timeout: float = 10.0) -> None:
        """Refuses what is still queued, stops the worker (after its current answer)."""
        with self._lock:
            self._closed = True
        self._jobs.put(None)
        self._worker.join(timeout)
