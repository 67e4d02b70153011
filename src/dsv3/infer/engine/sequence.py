"""A sequence: one completion of one request, from waiting through running to finished.

`token_ids` holds the prompt and every token sampled so far. `num_computed` counts the leading
tokens whose latent is in the paged cache: while running, the last token has been sampled but
not yet fed (`num_computed == len(token_ids) - 1`), and a step feeds what remains. Prefill,
chunked prefill, recompute after preemption and decode are all "feed tokens
[num_computed, len(token_ids)) and, when the last one is fed, sample the next"; they differ only
in how many tokens a step feeds.
"""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field

from dsv3.infer.sampling import SamplingParams

__all__ = ["SequenceStatus", "Sequence"]

_ids = itertools.count()


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request_id: str
    index: int  # which of the request's n completions
    prompt_ids: list[int]
    params: SamplingParams
    seed: int  # the request's seed for this completion (drawn by the engine when the request has none)
    arrival_time: float = field(default_factory=time.monotonic)
    seq_id: int = field(default_factory=lambda: next(_ids))
    token_ids: list[int] = field(init=False)
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed: int = 0
    block_table: list[int] = field(default_factory=list)
    block_keys: list[int] = field(default_factory=list)  # prefix keys of the leading full blocks
    draft: int | None = None  # the MTP module's guess for the token after the last one
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache at first admission
    admitted: bool = False
    num_preemptions: int = 0
    # output: text, logprobs, how and when it ended
    output_text: str = ""
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    # prompt_logprobs: the log-probability of prompt tokens 1, 2, ... (token 0 has none), their top
    # pairs and their ranks in the vocabulary
    prompt_logprobs: list[float] = field(default_factory=list)
    prompt_top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    prompt_ranks: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop", "length" or "abort"
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    first_token_time: float | None = None
    finish_time: float | None = None

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt_ids)

    @property
    def num_prompt(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt :]

    @property
    def num_output(self) -> int:
        return len(self.token_ids) - self.num_prompt

    @property
    def num_uncomputed(self) -> int:
        """Tokens a step still has to feed before the next token can be sampled."""
        return len(self.token_ids) - self.num_computed

    @property
    def scores_prompt(self) -> bool:
        """Whether this sequence still has prompt logprobs to compute. Only a request's first
        completion computes them (they are the same for all n), and it bypasses the prefix cache
        until they are all known: cached positions are never fed, so their logprobs would be missing."""
        wanted = self.params.prompt_logprobs is not None and self.index == 0
        return wanted and len(self.prompt_logprobs) < self.num_prompt - 1

    @property
    def finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def reset_for_recompute(self) -> None:
        """Forget the cached state (preemption): every token so far will be fed again."""
        self.num_computed = 0
        self.block_table = []
        self.block_keys = []
        self.draft = None
        self.status = SequenceStatus.WAITING
        self.num_preemptions += 1
