"""After a step: append sampled tokens, detokenise, and decide who has finished and why."""
from __future__ import annotations

import time

from distserve.engine.detokenizer import IncrementalDetokenizer
from distserve.cluster.messages import RequestOutput
from distserve.engine.sampler import SampleResult
from distserve.request import FinishReason, Request


class StopChecker:
    """Applies EOS, stop token ids, stop strings, max_tokens and the context limit."""

    def __init__(self, eos_token_ids: set[int], max_model_len: int) -> None:
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len

    def check(self, req: Request, detok: IncrementalDetokenizer, delta: str) -> str:
        """Returns the delta to emit (trimmed at a stop string) and finishes `req` if done."""
        p = req.sampling_params
        token = req.output_token_ids[-1]
        if not p.ignore_eos and token in self.eos_token_ids:
            req.finish(FinishReason.STOP, token)
            return delta
        if token in p.stop_token_ids:
            req.finish(FinishReason.STOP, token)
            return delta
        if p.stop and delta:
            delta = self._trim_at_stop(req, detok, delta)
            if req.is_finished:
                return delta
        if p.max_tokens is not None and len(req.output_token_ids) >= p.max_tokens:
            req.finish(FinishReason.LENGTH)
        elif req.num_tokens >= self.max_model_len:
            req.finish(FinishReason.LENGTH)
        return delta

    @staticmethod
    def _trim_at_stop(req: Request, detok: IncrementalDetokenizer, delta: str) -> str:
        p = req.sampling_params
        longest = max(len(s) for s in p.stop)
        search_from = max(0, len(detok.text) - len(delta) - longest + 1)
        best = None
        for s in p.stop:
            i = detok.text.find(s, search_from)
            if i != -1 and (best is None or i < best[0]):
                best = (i, s)
        if best is None:
            return delta
        i, s = best
        end = i + len(s) if p.include_stop_str_in_output else i
        emitted_before = len(detok.text) - len(delta)
        detok.text = detok.text[:end]
        req.finish(FinishReason.STOP, s)
        return detok.text[emitted_before:] if end > emitted_before else ""


def apply_samples(requests: list[Request], result: SampleResult,
                  detoks: dict[str, IncrementalDetokenizer],
                  stop: StopChecker) -> list[RequestOutput]:
    now = time.monotonic()
    outputs = []
    for i, req in enumerate(requests):
        token = result.token_ids[i]
        req.append_token(token, result.logprobs[i] if result.logprobs else None, now)
        if result.top_logprobs:
            req.output_top_logprobs.append(result.top_logprobs[i])
        detok = detoks[req.request_id]
        delta = stop.check(req, detok, detok.add(token))
        outputs.append(RequestOutput(
            request_id=req.request_id,
            new_token_ids=[token],
            new_text=delta,
            finished=req.is_finished,
            finish_reason=req.finish_reason.value if req.finish_reason else None,
            new_logprobs=[result.logprobs[i]] if result.logprobs else None,
            new_top_logprobs=[result.top_logprobs[i]] if result.top_logprobs else None,
            num_prompt_tokens=req.num_prompt_tokens,
            num_output_tokens=len(req.output_token_ids),
            arrival_time=req.arrival_time,
            first_token_time=req.first_token_time,
            finish_time=now if req.is_finished else None,
        ))
    return outputs
