"""What the engine hands back for a request after each step."""

from dataclasses import dataclass, field


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)   # (token_id, logprob), best first


@dataclass
class RequestOutput:
    """A request's state after one engine step. `new_text` is the text added by this step,
    `text` all text so far (stop strings already cut off)."""
    request_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    text: str
    new_text: str
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprob] | None
    finished: bool
    finish_reason: str | None = None        # "stop" | "length" | "abort"
