"""Per-request sampling settings, validated on construction."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # `import moska` (and `moska --help`) must not pay torch's import
    import torch

# A logits processor (vLLM's two-argument form): called once per step for each request that
# lists it, with the request's output token ids so far and its row of logits [V] float32;
# returns the row to sample from (it may modify and return the one it was given). The
# sampler applies it after logit_bias and before the penalties and temperature.
LogitsProcessor = Callable[[list[int], "torch.Tensor"], "torch.Tensor"]

MAX_LOGPROBS = 20  # top alternatives per token (vLLM's default max_logprobs)


class SamplingParamsError(ValueError):
    """A sampling setting out of range; `param` names the field (as the OpenAI API does)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens for one request.

    temperature 0 means greedy. top_k 0 (or -1), top_p 1.0 and min_p 0.0 disable those
    filters. `stop` strings end generation and are cut from the returned text;
    `stop_token_ids` end it too (the token is not returned). `logprobs` asks for the
    log-probability of each sampled token plus that many top alternatives (0: only the
    sampled one); `prompt_logprobs` the same for every prompt token after the first (the
    request then skips the prefix cache: its prompt is computed in full). Logprobs are those
    of the model's raw logits, before biases, penalties and temperature (vLLM's default).

    Per step and row the logits go through: `logit_bias` (token id -> added bias, OpenAI),
    `logits_processors`, the penalties (`repetition_penalty` over prompt and output tokens,
    vLLM/HF: a positive logit is divided by it, a negative one multiplied; `frequency_penalty`
    times each token's count in the output and `presence_penalty` once per token present in
    the output are subtracted, OpenAI), then temperature, `min_p` (drop tokens whose
    probability is below min_p times the top token's), top-k and top-p.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    max_tokens: int = 16
    min_tokens: int = 0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    seed: int | None = None
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    # token id -> bias in [-100, 100]; given as a mapping, kept as sorted (id, bias) pairs
    logit_bias: tuple[tuple[int, float], ...] = ()
    logits_processors: tuple[LogitsProcessor, ...] = field(default=(), compare=False)
    # library requests: a moska.routing.RoutingPolicy (or a mapping of its fields over the
    # policy's defaults); None: the engine's (EngineConfig.routing_*)
    routing: Any = None
    extra: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop or ()))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids or ()))
        object.__setattr__(self, "logit_bias", _bias_pairs(self.logit_bias))
        object.__setattr__(self, "logits_processors", tuple(self.logits_processors or ()))
        object.__setattr__(self, "routing", _routing_policy(self.routing))
        if self.n < 1:
            raise SamplingParamsError("n", f"n must be at least 1, got {self.n}")
        if self.temperature < 0:
            raise SamplingParamsError(
                "temperature", f"temperature must be >= 0, got {self.temperature}"
            )
        if not 0.0 < self.top_p <= 1.0:
            raise SamplingParamsError("top_p", f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            raise SamplingParamsError(
                "top_k", f"top_k must be -1, 0 (disabled) or positive, got {self.top_k}"
            )
        if not 0.0 <= self.min_p <= 1.0:
            raise SamplingParamsError("min_p", f"min_p must be in [0, 1], got {self.min_p}")
        if self.max_tokens < 1:
            raise SamplingParamsError(
                "max_tokens", f"max_tokens must be at least 1, got {self.max_tokens}"
            )
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise SamplingParamsError("min_tokens", "min_tokens must be between 0 and max_tokens")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= MAX_LOGPROBS:
                raise SamplingParamsError(
                    name, f"{name} must be between 0 and {MAX_LOGPROBS}, got {value}"
                )
        if any(not s for s in self.stop):
            raise SamplingParamsError("stop", "stop strings must not be empty")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not -2.0 <= value <= 2.0:
                raise SamplingParamsError(name, f"{name} must be in [-2, 2], got {value}")
        if not self.repetition_penalty > 0.0:
            raise SamplingParamsError(
                "repetition_penalty",
                f"repetition_penalty must be > 0 (1 disables it), got {self.repetition_penalty}",
            )
        if any(not callable(p) for p in self.logits_processors):
            raise SamplingParamsError(
                "logits_processors",
                "logits_processors must be callables (output_token_ids, logits) -> logits",
            )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        return (
            self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
            or self.repetition_penalty != 1.0
        )

    @property
    def needs_history(self) -> bool:
        """The sampler reads this request's token ids (penalties, logits processors): a step
        sampling it cannot run ahead of its previous tokens (asynchronous scheduling)."""
        return self.has_penalties or bool(self.logits_processors)


def _routing_policy(routing: Any):
    """A RoutingPolicy from a policy, a mapping of its fields, or None."""
    from moska.routing.policy import RoutingPolicy, RoutingPolicyError

    if routing is None or isinstance(routing, RoutingPolicy):
        return routing
    if not isinstance(routing, Mapping):
        raise SamplingParamsError(
            "routing", f"routing must be a RoutingPolicy or a mapping, got {type(routing).__name__}"
        )
    try:
        return RoutingPolicy.from_dict(routing)
    except RoutingPolicyError as e:
        raise SamplingParamsError(f"routing.{e.param}", str(e)) from None
    except TypeError as e:
        raise SamplingParamsError("routing", f"routing: {e}") from None


def _bias_pairs(bias: Any) -> tuple[tuple[int, float], ...]:
    """A logit_bias mapping (or pairs) as sorted (token id, bias) pairs, checked."""
    if not bias:
        return ()
    items = bias.items() if isinstance(bias, Mapping) else bias
    pairs: dict[int, float] = {}
    for key, value in items:
        try:
            token = int(key)
            if isinstance(key, float) or token < 0:
                raise ValueError
        except (TypeError, ValueError):
            raise SamplingParamsError(
                "logit_bias", f"logit_bias keys must be token ids (integers >= 0), got {key!r}"
            ) from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SamplingParamsError(
                "logit_bias", f"logit_bias values must be numbers, got {value!r}"
            )
        if not -100.0 <= value <= 100.0:
            raise SamplingParamsError(
                "logit_bias", f"logit_bias values must be in [-100, 100], got {value} for {token}"
            )
        pairs[token] = float(value)
    return tuple(sorted(pairs.items()))
