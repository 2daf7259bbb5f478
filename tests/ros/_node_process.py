"""Runs refvlm_node in its own process for the DDS tests:

    python tests/ros/_node_process.py --answer "<Phrase>...</Phrase> (...)" --delay 0.2 [ROS args]

The node and the tiny preset's Predictor are the real ones. The tiny model has random
weights, so the answer text is forced with the Predictor's logits hook (constrained
decoding): the real LLM still runs and the real decoders turn the hidden states at the
forced <REF>s into boxes and masks. ``--delay`` makes each prediction that much slower,
to test a model slower than the camera; ``--token-delay`` makes each answer token that
much slower (a slow LLM, to interrupt a generating answer); ``--load-delay`` makes loading
the model (in configure) that much slower, to interrupt it.
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Any, Callable

import torch


LOADING = "loading the model (configure)"


class ForcedAnswerPredictor:
    """The real Predictor, decoding a fixed TRP text instead of its random-weight choice."""

    def __init__(self, predictor: Any, answer: str, delay_s: float, token_delay_s: float = 0.0) -> None:
        self._predictor, self._delay_s, self._token_delay_s = predictor, delay_s, token_delay_s
        tokenizer = predictor.model.llm.tokenizer
        stop = sorted(predictor.model.llm.stop_ids())
        self._forced = tokenizer.encode(answer, add_special_tokens=False) + stop[:1]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._predictor, name)

    def _force(self, step: int, logits: torch.Tensor) -> torch.Tensor:
        forced = torch.full_like(logits, float("-inf"))
        forced[..., self._forced[min(step, len(self._forced) - 1)]] = 0.0
        return forced

    def predict(self, image: Any, prompt: str, visual_prompts: Any = (),
                on_token: Callable | None = None) -> Any:
        time.sleep(self._delay_s)
        return self._predictor.predict(image, prompt, visual_prompts, logits_hook=self._force,
                                       on_token=self._slowed(on_token))

    def _slowed(self, on_token: Callable | None) -> Callable | None:
        if not self._token_delay_s:
            return on_token

        def slow(token_id: int, answer_so_far: str) -> None:
            time.sleep(self._token_delay_s)
            if on_token is not None:
                on_token(token_id, answer_so_far)

        return slow


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--answer", required=True)
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--load-delay", type=float, default=0.0)
    parser.add_argument("--token-delay", type=float, default=0.0)
    args, ros_args = parser.parse_known_args()
    torch.set_num_threads(1)

    import rclpy
    from refvlm_ros.node import RefVLMNode, load_predictor, run

    def factory(p: Any) -> ForcedAnswerPredictor:
        print(LOADING, flush=True)  # tests that interrupt the load wait for this line
        time.sleep(args.load_delay)
        return ForcedAnswerPredictor(load_predictor(p), args.answer, args.delay, args.token_delay)

    rclpy.init(args=[sys.argv[0], *ros_args])
    run(RefVLMNode(predictor_factory=factory))


if __name__ == "__main__":
    main()
