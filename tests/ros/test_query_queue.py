"""The ~/query queue's hand-over (refvlm_ros.query_queue, no ROS): a reply goes out
exactly once, whichever comes first, the answer (worker thread) or the request header
(the executor, after the service callback returned); past the limit, busy at once."""
from __future__ import annotations

import threading
import time

from refvlm_ros.query_queue import PendingReply, QueryQueue


class Reply:
    def __init__(self) -> None:
        self.success, self.error = None, ""


def test_a_reply_is_sent_once_whichever_comes_first():
    for answer_first in (True, False):
        sent = []
        job = PendingReply("request", Reply())
        send = lambda response, header: sent.append((response, header))  # noqa: E731
        if answer_first:
            job.answered()
            assert not sent
            job.attach(send, "header")
        else:
            job.attach(send, "header")
            assert not sent
            job.answered()
        assert sent == [(job.response, "header")]


def test_the_queue_answers_in_order_and_refuses_past_the_limit():
    gate, order = threading.Event(), []

    def answer(request, reply):
        gate.wait(10)
        order.append(request)
        reply.success = True

    def refuse(request, reply, reason):
        reply.success, reply.error = False, reason

    queue = QueryQueue(answer, refuse, max_pending=3)
    sent = []

    class Service:  # what QueryQueue.install needs of an rclpy Service
        def send_response(self, response, header):
            sent.append(header)

    service = Service()
    queue.install(service)
    replies = [queue.submit(i, Reply()) for i in range(5)]
    for i, reply in enumerate(replies):
        service.send_response(reply, i)  # the executor, after each callback returned
    assert [r.success for r in replies[3:]] == [False, False]
    assert all("busy" in r.error and "max_pending_queries=3" in r.error for r in replies[3:])
    assert sorted(sent) == [3, 4] and queue.busy_replies == 2 and queue.pending == 3
    gate.set()
    deadline = time.monotonic() + 10
    while len(sent) < 5 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert order == [0, 1, 2] and sorted(sent) == [0, 1, 2, 3, 4] and queue.pending == 0
    queue.close()
    closed = queue.submit(9, Reply())
    assert closed.success is False and "shutting down" in closed.error
