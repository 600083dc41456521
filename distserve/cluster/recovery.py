"""Running a request again after the instance that held it died, so its stream continues.

The request is sent once more as a new prompt: its own prompt plus every token already
streamed, asking only for the tokens still wanted. Its outputs are then rewritten to read as
the one request the client started (token counts and timestamps from the start), so the
client sees neither a repeated token nor a gap. The new run is told which of its prompt's
tokens were outputs and how much of their text was streamed (messages.Resume), so a stop
string that straddles the point of the re-run is seen and text held back for one is not
lost. With greedy decoding, or a seed (each token is drawn from the seed and its position),
the text is the same as without the fault; unseeded sampling draws the rest anew. Imports no
torch.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from distserve.cluster.messages import RequestOutput, Resume
from distserve.request import SamplingParams


@dataclass
class Progress:
    """What the client has been sent of one request so far."""
    prompt_ids: list[int]
    arrival_time: float
    generated: list[int] = field(default_factory=list)
    first_token_time: float | None = None
    rerun_from: int = 0      # tokens generated before the current run started
    reruns: int = 0
    emitted_chars: int = 0   # characters of output text the client has been sent

    def continuation(self, params: SamplingParams
                     ) -> tuple[list[int], SamplingParams, Resume] | None:
        """(prompt, params, resume) of the run that continues the request; None when nothing
        is left to generate."""
        left = None if params.max_tokens is None else params.max_tokens - len(self.generated)
        if left is not None and left <= 0:
            return None
        self.rerun_from = len(self.generated)
        self.reruns += 1
        return (self.prompt_ids + self.generated, dataclasses.replace(params, max_tokens=left),
                Resume(len(self.generated), self.emitted_chars))

    def seen(self, out: RequestOutput) -> RequestOutput:
        """Records an output and rewrites one of a re-run as part of the original request."""
        self.generated.extend(out.new_token_ids)
        self.emitted_chars += len(out.new_text)
        if self.first_token_time is None and out.first_token_time is not None:
            self.first_token_time = out.first_token_time
        if self.reruns:
            out.num_prompt_tokens = len(self.prompt_ids)
            out.num_output_tokens += self.rerun_from
            out.arrival_time = self.arrival_time
            out.first_token_time = self.first_token_time
        return out
