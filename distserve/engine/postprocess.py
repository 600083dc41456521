"""After a step: append sampled tokens, detokenise, and decide who has finished and why."""
from __future__ import annotations

import time

from distserve.engine.detokenizer import IncrementalDetokenizer
from distserve.cluster.messages import RequestOutput
from distserve.engine.sampler import SampleResult
from distserve.request import FinishReason, Request


class StopChecker:
    """Applies EOS, stop token ids, stop strings, max_tokens and the context limit.

    With stop strings (not included in the output), the last (longest - 1) characters are held
    back until the request finishes, as vLLM does: a stop string that arrives over several
    tokens is never streamed in part."""

    def __init__(self, eos_token_ids: set[int], max_model_len: int) -> None:
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len

    def check(self, req: Request, detok: IncrementalDetokenizer) -> str:
        """Finishes `req` if it is done; returns the text to send on now."""
        p = req.sampling_params
        token = req.output_token_ids[-1]
        if not p.ignore_eos and token in self.eos_token_ids:
            req.finish(FinishReason.STOP, token)
        elif token in p.stop_token_ids:
            req.finish(FinishReason.STOP, token)
        elif p.stop and self._cut_at_stop(req, detok):
            pass
        elif p.max_tokens is not None and len(req.output_token_ids) >= p.max_tokens:
            req.finish(FinishReason.LENGTH)
        elif req.num_tokens >= self.max_model_len:
            req.finish(FinishReason.LENGTH)
        return self.release(req, detok)

    def tokens_left(self, req: Request) -> int:
        """Tokens `req` may still get before max_tokens or the context ends it (check's rules)."""
        left = self.max_model_len - req.num_tokens
        p = req.sampling_params
        return left if p.max_tokens is None else min(left, p.max_tokens - len(req.output_token_ids))

    @staticmethod
    def release(req: Request, detok: IncrementalDetokenizer) -> str:
        """The text not yet sent on, but for what a stop string could still begin with."""
        p = req.sampling_params
        hold = 0
        if p.stop and not p.include_stop_str_in_output and not req.is_finished:
            hold = max(len(s) for s in p.stop) - 1
        end = max(detok.emitted, len(detok.text) - hold)
        delta = detok.text[detok.emitted:end]
        detok.emitted = end
        return delta

    @staticmethod
    def _cut_at_stop(req: Request, detok: IncrementalDetokenizer) -> bool:
        """Finds the first stop string in the text not yet sent on (and the characters before
        it that one could span); cuts the text there and finishes the request."""
        p = req.sampling_params
        longest = max(len(s) for s in p.stop)
        search_from = max(0, detok.emitted - longest + 1)
        best = None
        for s in p.stop:
            i = detok.text.find(s, search_from)
            if i != -1 and (best is None or i < best[0]):
                best = (i, s)
        if best is None:
            return False
        i, s = best
        detok.text = detok.text[:max(i + len(s) if p.include_stop_str_in_output else i,
                                     detok.emitted)]
        req.finish(FinishReason.STOP, s)
        return True


def apply_samples(requests: list[Request], result: SampleResult,
                  detoks: dict[str, IncrementalDetokenizer],
                  stop: StopChecker) -> list[RequestOutput]:
    now = time.monotonic()
    outputs = []
    for i, req in enumerate(requests):
        if i in result.errors:   # its sampling failed: it ends here, the others go on
            req.finish(FinishReason.ERROR)
            outputs.append(RequestOutput(
                req.request_id, [], "", True, FinishReason.ERROR.value,
                num_prompt_tokens=req.num_prompt_tokens,
                num_output_tokens=len(req.output_token_ids), arrival_time=req.arrival_time,
                first_token_time=req.first_token_time, finish_time=now,
                extra={"error": result.errors[i]}))
            continue
        token = result.token_ids[i]
        req.append_token(token, result.logprobs[i] if result.logprobs else None, now)
        if result.top_logprobs:
            req.output_top_logprobs.append(result.top_logprobs[i])
        detok = detoks[req.request_id]
        detok.add(token)
        delta = stop.check(req, detok)
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
