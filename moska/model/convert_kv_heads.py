"""Fewer KV heads (MHA -> GQA, GQA -> MQA) by low-rank projections fitted on calibration text.

Groups of ``r = Hkv / N`` consecutive KV heads become one head. What each group keeps is
fitted on the model's own keys and values over calibration tokens (second moments, not
centred: the projections are linear, without a bias to carry a mean), and folded into the
weights, so the output is a plain GQA checkpoint — no new module, transformers loads it.

- **V**: the group's values, stacked ``[r * D]``, are projected on their top ``D``
  principal directions ``U [r * D, D]``. New ``v_proj = U^T v_proj_group``; head ``j`` of the
  group is read back as ``U_j v'`` (``U_j``: rows ``j*D:(j+1)*D``), and since attention is
  linear in V, ``U_j`` folds into the columns of ``o_proj`` that read head ``j``'s queries.
- **K, with RoPE respected**: RoPE rotates each 2-D pair ``(i, i + D/2)`` of a key by an
  angle that depends on the position; seen as one complex number per pair, it multiplies by
  ``e^{i theta_i pos}``. A map that is complex-linear *per pair* commutes with that, so K is
  fitted on pre-RoPE keys (recovered from the rotated ones by the inverse rotation), per
  frequency ``i``: the group's ``r`` complex values are kept as one, ``k'_i = u_i^H z_i``
  with ``u_i`` the top eigenvector of their ``r x r`` complex second moment. Head ``j``'s key
  is read back as ``u_ij k'_i``; the score ``Re(conj(q_i) u_ij k'_i)`` is what a query
  scaled by ``conj(u_ij)`` sees, a 2x2 rotation-and-scale of each of the query's pairs that
  folds into ``q_proj`` rows before RoPE (so RoPE still applies to q and k as usual).
  (The paper fits keys after RoPE with its own correction; this is the pair-wise variant.)
- **Baseline** (``method="mean"``): the mean of the group's ``k_proj`` / ``v_proj`` rows, q
  and o unchanged — the GQA paper's conversion.

A checkpoint whose group heads are exact low-rank images of one another (per-pair complex
multiples for K, any ``D``-dim subspace for V) is converted losslessly (tested). Every
layer is calibrated on the original model in one pass. Qwen3's per-head k_norm is not
linear and cannot be folded: such models are refused.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from moska.model.config import ModelConfig
from moska.model.convert import Checkpoint, ConvertError, write_checkpoint
from moska.model.loader import load_model
from moska.model.reference import DenseAttention

METHODS = ("fit", "mean")


@dataclass(frozen=True)
class KVHeadsReport:
    out: Path
    method: str
    kv_heads_before: int
    kv_heads_after: int
    calibration_tokens: int
    # per layer, the share of the second moment (energy) the kept components hold
    k_energy: tuple[float, ...] = field(default_factory=tuple)
    v_energy: tuple[float, ...] = field(default_factory=tuple)

    def describe(self) -> str:
        head = f"wrote {self.out}: KV heads {self.kv_heads_before} -> {self.kv_heads_after} "
        if self.method != "fit":  # mean-pooling fits nothing: no energy kept to report
            return head + f"({self.method}: the group's k/v projections averaged, q/o unchanged)"
        lines = [head + f"({self.method}, {self.calibration_tokens} calibration tokens)"]
        for i, (k, v) in enumerate(zip(self.k_energy, self.v_energy)):
            lines.append(f"  layer {i:>3}: energy kept K {k:.4f}  V {v:.4f}")
        return "\n".join(lines)


class _Moments:
    """Second moments of each layer's pre-RoPE keys (complex, per pair) and values."""

    def __init__(self, config: ModelConfig, r: int) -> None:
        self.c, self.r = config, r
        self.k: dict[int, torch.Tensor] = {}  # layer -> [N, D/2, r, r] complex128
        self.v: dict[int, torch.Tensor] = {}  # layer -> [N, r*D, r*D] float64
        self.tokens = 0

    def add(self, layer: int, k_pre: torch.Tensor, v: torch.Tensor) -> None:
        """k_pre, v [T, Hkv, D] (keys before RoPE)."""
        r = self.r
        t, hkv, d = v.shape
        n = hkv // r
        kd = k_pre.double().view(t, n, r, d)
        z = torch.complex(kd[..., : d // 2], kd[..., d // 2 :])  # [T, N, r, D/2]
        z = z.permute(1, 3, 2, 0)  # [N, D/2, r, T]
        ck = z @ z.conj().transpose(-1, -2)  # [N, D/2, r, r]
        y = v.double().reshape(t, n, r * d).permute(1, 2, 0)  # [N, r*D, T]
        cv = y @ y.transpose(-1, -2)  # [N, r*D, r*D]
        if layer in self.k:
            self.k[layer] += ck
            self.v[layer] += cv
        else:
            self.k[layer], self.v[layer] = ck, cv


class _Recorder(DenseAttention):
    """Dense attention that also records each layer's pre-RoPE keys and values."""

    def __init__(self, moments: _Moments, cos: torch.Tensor, sin: torch.Tensor) -> None:
        super().__init__(moments.c.sm_scale)
        self.moments, self.cos, self.sin = moments, cos, sin

    def __call__(self, layer, q, k, v):
        from moska.model.layers import apply_rope

        self.moments.add(layer, apply_rope(k, self.cos, -self.sin), v)  # undo the rotation
        return super().__call__(layer, q, k, v)


@torch.inference_mode()
def calibrate(model, config: ModelConfig, r: int, sequences: Sequence[Sequence[int]]) -> _Moments:
    moments = _Moments(config, r)
    for ids in tqdm(sequences, desc="calibrate", unit="seq"):
        pos = torch.arange(len(ids))
        cos, sin = model.rotary.cos_sin(pos, torch.float32)  # [T, 1, D]
        model(torch.tensor(list(ids)), pos, _Recorder(moments, cos, sin))
        moments.tokens += len(ids)
    return moments


def _fit_k(ck: torch.Tensor) -> tuple[torch.Tensor, float]:
    """ck [D/2, r, r] Hermitian -> (u [D/2, r] complex unit vectors, energy kept)."""
    vals, vecs = torch.linalg.eigh(ck)  # ascending
    u = vecs[..., -1]  # [D/2, r]
    total = vals.sum().real.item()
    return u, (vals[..., -1].sum().item() / total) if total > 0 else 1.0


def _fit_v(cv: torch.Tensor, d: int) -> tuple[torch.Tensor, float]:
    """cv [r*D, r*D] -> (U [r*D, D] orthonormal columns, energy kept)."""
    vals, vecs = torch.linalg.eigh(cv)
    total = vals.sum().item()
    return vecs[:, -d:], (vals[-d:].sum().item() / total) if total > 0 else 1.0


def _sum(terms: Iterable[torch.Tensor]) -> torch.Tensor:
    """The sum of a non-empty sequence of tensors (typed: ``sum`` starts from 0)."""
    it = iter(terms)
    total = next(it)
    for t in it:
        total = total + t
    return total


def _pairwise(w: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Rows of one head [D, ...] (pairs (i, i + D/2)) multiplied, pair i, by conj(u_i):
    (a + jb)(c - jd) = (ca + db) + j(cb - da). u [D/2] complex."""
    h = w.shape[0] // 2
    a, b = w[:h], w[h:]
    c = u.real.to(w.dtype).view(-1, *([1] * (w.dim() - 1)))
    s = u.imag.to(w.dtype).view(-1, *([1] * (w.dim() - 1)))
    return torch.cat((c * a + s * b, c * b - s * a))


def convert_kv_heads(
    model: str | Path,
    out: str | Path,
    *,
    kv_heads: int,
    calibration: Sequence[Sequence[int]] = (),
    method: str = "fit",
) -> KVHeadsReport:
    """Write ``model`` with ``kv_heads`` KV heads to ``out``. ``calibration``: token id
    sequences (each at most the model's context), needed by ``method="fit"``."""
    if method not in METHODS:
        raise ConvertError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    src = Checkpoint(model)
    c = ModelConfig.from_dict(src.config)
    if c.qk_norm:
        raise ConvertError(f"{src.path}: per-head k_norm (Qwen3) cannot be folded; not supported")
    if c.kv_source_layers:
        raise ConvertError(f"{src.path}: an MLKV model; compress KV heads before sharing layers")
    if kv_heads < 1 or c.num_kv_heads % kv_heads or kv_heads >= c.num_kv_heads:
        raise ConvertError(
            f"--kv-heads must divide the model's {c.num_kv_heads} KV heads and be fewer, "
            f"got {kv_heads}"
        )
    if method == "fit" and not calibration:
        raise ConvertError("the fitted method needs calibration text (--calibration FILES)")
    r, d, g_new = c.num_kv_heads // kv_heads, c.head_dim, c.num_heads // kv_heads
    g_old = c.group_size
    moments = None
    if method == "fit":
        lm = load_model(src.path, dtype="float32")
        moments = calibrate(lm.model, c, r, calibration)
        del lm
    k_energy, v_energy = [], []
    new: dict[str, torch.Tensor] = {}
    for layer in tqdm(range(c.num_layers), desc="fold", unit="layer"):
        p = f"model.layers.{layer}.self_attn."
        w = {n: src.get(p + n).double() for n in _names(src, p)}
        wk = w["k_proj.weight"].view(c.num_kv_heads, d, -1)  # [Hkv, D, H]
        wv = w["v_proj.weight"].view(c.num_kv_heads, d, -1)
        bk = w["k_proj.bias"].view(c.num_kv_heads, d) if "k_proj.bias" in w else None
        bv = w["v_proj.bias"].view(c.num_kv_heads, d) if "v_proj.bias" in w else None
        wq = w["q_proj.weight"].view(c.num_heads, d, -1).clone()  # [Hq, D, H]
        bq = w["q_proj.bias"].view(c.num_heads, d).clone() if "q_proj.bias" in w else None
        wo = w["o_proj.weight"].view(c.hidden_size, c.num_heads, d).clone()  # [H, Hq, D]
        nk, nv, nbk, nbv = [], [], [], []
        ke = ve = 0.0
        for g in range(kv_heads):
            heads = range(g * r, (g + 1) * r)
            if method == "mean":
                nk.append(wk[heads.start : heads.stop].mean(0))
                nv.append(wv[heads.start : heads.stop].mean(0))
                if bk is not None and bv is not None:
                    nbk.append(bk[heads.start : heads.stop].mean(0))
                    nbv.append(bv[heads.start : heads.stop].mean(0))
                continue
            assert moments is not None  # method "fit" calibrated above
            u, e_k = _fit_k(moments.k[layer][g])  # [D/2, r]
            uv, e_v = _fit_v(moments.v[layer][g], d)  # [r*D, D]
            ke, ve = ke + e_k / kv_heads, ve + e_v / kv_heads
            # k' = sum_j conj(u_j) z_j, per pair
            nk.append(_sum(_pairwise(wk[h], u[:, j]) for j, h in enumerate(heads)))
            nv.append(uv.T @ wv[heads.start : heads.stop].reshape(r * d, -1))
            if bk is not None and bv is not None:
                nbk.append(_sum(_pairwise(bk[h], u[:, j]) for j, h in enumerate(heads)))
                nbv.append(uv.T @ bv[heads.start : heads.stop].reshape(r * d))
            for qh in range(g * g_new, (g + 1) * g_new):
                j = qh // g_old - g * r  # the query head's old KV head, within the group
                uj = u[:, j]  # q' = conj(u_j) q per pair, so Re(conj(q') k') ~ q . k_j
                wq[qh] = _pairwise(wq[qh], uj)
                if bq is not None:
                    bq[qh] = _pairwise(bq[qh], uj)
                wo[:, qh] = wo[:, qh] @ uv[j * d : (j + 1) * d]
        k_energy.append(ke if method == "fit" else math.nan)
        v_energy.append(ve if method == "fit" else math.nan)
        dtype = src.get(p + "k_proj.weight").dtype
        out_t = {
            "k_proj.weight": torch.cat(nk),
            "v_proj.weight": torch.cat(nv),
            "q_proj.weight": wq.reshape(c.q_size, -1),
            "o_proj.weight": wo.reshape(c.hidden_size, c.q_size),
        }
        if bk is not None:
            out_t["k_proj.bias"], out_t["v_proj.bias"] = torch.cat(nbk), torch.cat(nbv)
        if bq is not None:
            out_t["q_proj.bias"] = bq.reshape(-1)
        new.update({p + n: t.to(dtype) for n, t in out_t.items()})
    tensors_of_file = {
        fname: {n: new[n] if n in new else src.get(n) for n in names}
        for fname, names in src.by_file()
    }
    config = {**src.config, "num_key_value_heads": kv_heads}
    config["kv_heads_conversion"] = {"from": c.num_kv_heads, "method": method, "trained": False}
    write_checkpoint(src, out, config, tensors_of_file)
    return KVHeadsReport(
        Path(out),
        method,
        c.num_kv_heads,
        kv_heads,
        moments.tokens if moments else 0,
        tuple(k_energy),
        tuple(v_energy),
    )


def _names(src: Checkpoint, prefix: str) -> list[str]:
    names = ["q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight"]
    names += [n for n in ("q_proj.bias", "k_proj.bias", "v_proj.bias") if prefix + n in src]
    return names


def calibration_sequences(
    model: str | Path, files: Sequence[str | Path], length: int, max_tokens: int
) -> list[list[int]]:
    """Text files -> token windows of ``length`` (the model's tokenizer; each file starts
    with its BOS as in the model's use), packed in order, up to ``max_tokens`` in all."""
    from moska.model.tokenizer import Tokenizer

    if not files:
        raise ConvertError("--calibration needs at least one text file")
    tok = Tokenizer.from_pretrained(model)
    stream: list[int] = []
    for f in files:
        path = Path(f)
        if not path.is_file():
            raise ConvertError(f"{path}: calibration file not found")
        stream.extend(tok.encode(path.read_text(encoding="utf-8", errors="replace")))
        if len(stream) >= max_tokens:
            break
    stream = stream[:max_tokens]
    return [stream[i : i + length] for i in range(0, len(stream), length) if stream[i : i + length]]
