"""Token sampling for one step: logit bias, logits processors, penalties (engine/penalties.py),
temperature, min-p, top-k, top-p, per-request seeds, logprobs.

Sampling draws by dividing probabilities by exponential noise and taking the argmax (the
Gumbel-max trick in exponential form): no host sync and no multinomial kernel. Requests
with a seed draw their noise from their own generator, so their output does not depend on
what else shares the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moska.engine.penalties import apply_logit_bias, apply_penalties, apply_processors
from moska.engine.sampling_params import SamplingParams
from moska.engine.transfer import to_device, to_host_async


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[tuple[float, dict[int, float]] | None]  # (sampled logprob, top alternatives)


class SampledBatch:
    """One step's samples, still on their way to the host.

    ``tokens`` stays on the device (the next step can read its input tokens from it before
    the host has them); the host copies are queued at once, non-blocking into pinned memory
    on CUDA, and ``to_host()`` waits only for them, not for work queued after them.
    """

    def __init__(self, tokens: torch.Tensor, logprob_rows: list[int], logprob_ks: list[int],
                 chosen: torch.Tensor | None, top_v: torch.Tensor | None,
                 top_i: torch.Tensor | None) -> None:  # fmt: skip
        self.tokens = tokens  # [N] int64, on the logits' device
        self._rows, self._ks = logprob_rows, logprob_ks
        self._host = [to_host_async(t) for t in (tokens, chosen, top_v, top_i)]
        self._event = None
        if tokens.is_cuda:
            self._event = torch.cuda.Event()
            self._event.record()
        self._out: SamplerOutput | None = None

    def to_host(self) -> SamplerOutput:
        if self._out is None:
            if self._event is not None:
                self._event.synchronize()
            tokens, chosen, top_v, top_i = (None if t is None else t.tolist() for t in self._host)
            assert tokens is not None  # the sampled tokens are always copied
            logprobs: list[tuple[float, dict[int, float]] | None] = [None] * len(tokens)
            for j, (i, k) in enumerate(zip(self._rows, self._ks)):
                assert chosen is not None and top_v is not None and top_i is not None
                logprobs[i] = (chosen[j], dict(zip(top_i[j][:k], top_v[j][:k])))
            self._out = SamplerOutput(token_ids=tokens, logprobs=logprobs)
        return self._out


class Sampler:
    def __init__(self, seed: int = 0) -> None:
        self._seed = seed
        self._generators: dict[str, torch.Generator] = {}
        self._default: dict[str, torch.Generator] = {}

    def _shared_generator(self, device: torch.device) -> torch.Generator:
        """The generator of requests without a seed (one per device, seeded by the engine)."""
        gen = self._default.get(str(device))
        if gen is None:
            gen = torch.Generator(device=device).manual_seed(self._seed)
            self._default[str(device)] = gen
        return gen

    def _generator(self, request_id: str, params: SamplingParams, device: torch.device):
        if params.seed is None:
            return self._shared_generator(device)
        gen = self._generators.get(request_id)
        if gen is None:
            gen = torch.Generator(device=device).manual_seed(params.seed)
            self._generators[request_id] = gen
        return gen

    def release(self, request_id: str) -> None:
        self._generators.pop(request_id, None)

    def __call__(
        self,
        logits: torch.Tensor,  # [N, V] float32
        params: list[SamplingParams],
        request_ids: list[str],
        prompt_token_ids: list[list[int]] | None = None,
        output_token_ids: list[list[int]] | None = None,
    ) -> SamplerOutput:
        return self.sample(
            logits, params, request_ids, prompt_token_ids, output_token_ids
        ).to_host()

    @staticmethod
    def argmax_only(params: list[SamplingParams]) -> bool:
        """Whether sample() of these rows is logits.argmax(-1) and nothing else: all greedy,
        no logprobs, biases, penalties or processors (a tensor-parallel model can then
        take the argmax over its vocabulary shards without gathering the logits)."""
        return all(
            p.temperature == 0 and p.logprobs is None and not p.logit_bias and not p.needs_history
            for p in params
        )

    def sample(
        self,
        logits: torch.Tensor,  # [N, V] float32
        params: list[SamplingParams],
        request_ids: list[str],
        prompt_token_ids: list[list[int]] | None = None,
        output_token_ids: list[list[int]] | None = None,
    ) -> SampledBatch:
        """Queue the sampling of one step without waiting for it (see SampledBatch).

        `prompt_token_ids` / `output_token_ids`: each row's tokens so far, read by the
        penalties and logits processors (None: empty histories). Logprobs are those of the
        raw `logits`, before biases, processors and penalties."""
        assert logits.shape[0] == len(params) == len(request_ids)
        raw = logits.float()
        logits = self._process(raw, params, prompt_token_ids, output_token_ids)
        if all(p.temperature == 0 for p in params):  # greedy batch: one argmax, nothing else
            sampled = logits.argmax(-1)
        else:
            sampled = self._sample(logits, params, request_ids)
        want = [i for i, p in enumerate(params) if p.logprobs is not None]
        chosen = top_v = top_i = None
        if want:
            rows = to_device(want, logits.device)
            lp = torch.log_softmax(raw[rows], dim=-1)
            k = max(params[i].logprobs or 0 for i in want)
            top_v, top_i = lp.topk(max(k, 1), dim=-1)
            chosen = lp.gather(1, sampled[rows].unsqueeze(1)).squeeze(1)
        ks = [params[i].logprobs or 0 for i in want]
        return SampledBatch(sampled, want, ks, chosen, top_v, top_i)

    @staticmethod
    def _process(logits, params, prompt_token_ids, output_token_ids) -> torch.Tensor:
        """logit_bias, logits processors, penalties: on a copy of `logits` when any apply."""
        if not any(p.logit_bias or p.needs_history for p in params):
            return logits
        n = len(params)
        prompts = prompt_token_ids if prompt_token_ids is not None else [[]] * n
        outputs = output_token_ids if output_token_ids is not None else [[]] * n
        x = apply_logit_bias(logits.clone(), params)
        x = apply_processors(x, params, outputs)
        return apply_penalties(x, params, prompts, outputs)

    def _sample(self, logits, params, request_ids) -> torch.Tensor:
        dev = logits.device
        temps = to_device([p.temperature for p in params], dev, torch.float32)
        greedy = temps == 0
        scaled = logits / torch.where(greedy, 1.0, temps).unsqueeze(1)
        scaled = _apply_min_p(scaled, [p.min_p for p in params])
        scaled = _apply_top_k(scaled, [p.top_k for p in params])
        scaled = _apply_top_p(scaled, [p.top_p for p in params])
        probs = torch.softmax(scaled, dim=-1)
        # exponential noise: unseeded rows in one draw from the shared generator, seeded rows
        # each from their own (so their tokens do not depend on the batch); greedy rows 1
        free = [i for i, p in enumerate(params) if p.temperature > 0 and p.seed is None]
        if len(free) == len(params):
            noise = torch.empty_like(probs).exponential_(generator=self._shared_generator(dev))
        else:
            noise = torch.ones_like(probs)
            if free:
                draw = torch.empty(len(free), probs.shape[1], device=dev)
                draw.exponential_(generator=self._shared_generator(dev))
                noise[to_device(free, dev)] = draw
        for i, (p, rid) in enumerate(zip(params, request_ids)):
            if p.temperature > 0 and p.seed is not None:
                noise[i].exponential_(generator=self._generator(rid, p, dev))
        return torch.where(greedy, logits.argmax(-1), (probs / noise).argmax(-1))


def _apply_min_p(logits: torch.Tensor, min_ps: list[float]) -> torch.Tensor:
    """Drop tokens whose probability is below min_p times the most likely token's (vLLM)."""
    if all(p <= 0.0 for p in min_ps):
        return logits
    p_t = to_device(min_ps, logits.device, logits.dtype).unsqueeze(1)  # [N, 1]
    probs = torch.softmax(logits, dim=-1)
    threshold = probs.amax(dim=-1, keepdim=True) * p_t
    return logits.masked_fill(probs < threshold, float("-inf"))


def _apply_top_k(logits: torch.Tensor, top_ks: list[int]) -> torch.Tensor:
    vocab = logits.shape[1]
    ks = [k if 0 < k < vocab else vocab for k in top_ks]
    if all(k == vocab for k in ks):
        return logits
    k_t = to_device(ks, logits.device)
    sorted_desc = logits.sort(dim=-1, descending=True).values
    kth = sorted_desc.gather(1, (k_t - 1).unsqueeze(1))
    return logits.masked_fill(logits < kth, float("-inf"))


def _apply_top_p(logits: torch.Tensor, top_ps: list[float]) -> torch.Tensor:
    if all(p >= 1.0 for p in top_ps):
        return logits
    p_t = to_device(top_ps, logits.device, logits.dtype)
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
    # Drop a token when the mass before it already reaches top_p (the first always stays).
    drop_sorted = (cum - torch.softmax(sorted_logits, dim=-1)) >= p_t.unsqueeze(1)
    drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))
