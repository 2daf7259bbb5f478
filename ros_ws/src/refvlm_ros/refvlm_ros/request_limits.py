"""What one request may cost the node: prompt tokens, generation time, memory kept after.

A prompt's cost is its tokens, not its characters: an emoji or a rare character is
several tokens, so 2000 characters can be 6000-8000 tokens and a minute of prefill.
Prompts over the token limit are refused before the model sees them; generation still
running at the deadline, or when the node shuts down, is stopped from the Predictor's
``on_token`` callback. A large request leaves freed tensors in the C heap, where glibc
keeps them: ``returned_memory`` hands them back to the system. No ROS imports.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import os
import threading
import time
from typing import Any, Callable, Iterator

from refvlm_core.errors import InputError, RefVLMError

# Growth of the resident set over one request above which freed memory is handed back.
TRIM_ABOVE_MB = 32.0


class RequestTimeout(RefVLMError):
    """Raised inside generation when a request runs past its deadline."""


def prompt_tokens(predictor: Any, prompt: str) -> int:
    """LLM tokens of the user's prompt as the Predictor will see it (tags neutralised)."""
    processor = predictor.processor
    return len(processor.tokenizer(processor.neutralize(prompt), add_special_tokens=False).input_ids)


def check_prompt_tokens(predictor: Any, prompt: str, limit: int) -> None:
    count = prompt_tokens(predictor, prompt)
    if count > limit:
        raise InputError(f"the prompt is {count} tokens ({len(prompt)} characters); the limit is {limit} "
                         "(parameter max_prompt_tokens): shorten it (emoji and rare characters cost "
                         "several tokens each)")


def with_deadline(on_token: Callable | None, seconds: float) -> Callable | None:
    """``on_token`` that also ends generation ``seconds`` from now (0: no deadline)."""
    if seconds <= 0:
        return on_token
    deadline = time.monotonic() + seconds

    def checked(token_id: int, answer_so_far: str) -> None:
        if time.monotonic() > deadline:
            raise RequestTimeout(f"the answer took longer than {seconds:g} s (parameter max_request_s) "
                                 "and was stopped: ask a shorter question or raise the limit")
        if on_token is not None:
            on_token(token_id, answer_so_far)

    return checked


class ShuttingDown(RefVLMError):
    """Raised inside generation when the node shuts down under a running request."""


def until(stopped: threading.Event, on_token: Callable | None) -> Callable:
    """``on_token`` that also ends generation at the next token once ``stopped`` is set, so
    a node asked to stop (Ctrl-C) does not first finish a long answer."""

    def checked(token_id: int, answer_so_far: str) -> None:
        if stopped.is_set():
            raise ShuttingDown("the node is shutting down: the answer was stopped")
        if on_token is not None:
            on_token(token_id, answer_so_far)

    return checked


def rss_mb() -> float:
    """Resident memory of this process in MB (Linux; NaN elsewhere)."""
    try:
        with open(f"/proc/{os.getpid()}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
        return None


_TRIM = _malloc_trim()


@contextlib.contextmanager
def returned_memory(above_mb: float = TRIM_ABOVE_MB) -> Iterator[None]:
    """Around one request: if the process grew by more than ``above_mb``, what the request
    freed goes back to the system (glibc keeps freed heap memory for reuse otherwise)."""
    before = rss_mb()
    try:
        yield
    finally:
        if _TRIM is not None and rss_mb() - before > above_mb:
            gc.collect()
            _TRIM(0)
