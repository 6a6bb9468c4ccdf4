"""Cross-entropy through a linear output layer without materializing the [B, T, V] logits:
chunks of sequence positions under ``lax.scan``, gradients computed in the same pass as the
loss, batch sharding kept inside the loop. The memory and sharding layout is described in
docs/models.md.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from discreteflow_jax.models.sharding import axis_shards, constrain

# Layout of a weight matrix: "vk" = [V, K] (the embedding table), "kv" = [K, V] (a linear kernel).
LAYOUTS = ("vk", "kv")


def cross_entropy(logits_BTV: jax.Array, labels_BT: jax.Array) -> jax.Array:
    """Per-token cross-entropy in fp32, written so XLA fuses it with the logits (no log-softmax
    buffer is kept: logsumexp minus the label logit)."""
    logits = logits_BTV.astype(jnp.float32)
    label_logit = jnp.take_along_axis(logits, labels_BT[..., None], axis=-1)[..., 0]
    return jax.nn.logsumexp(logits, axis=-1) - label_logit


def chunk_positions(batch: int, seq_len: int, tokens_per_chunk: int, shards: int = 1) -> int:
    """Sequence positions per chunk so that each device handles about ``tokens_per_chunk`` tokens
    (its batch rows × positions); at least 1, at most the sequence length."""
    rows = max(batch // max(shards, 1), 1)
    return max(1, min(seq_len, tokens_per_chunk // rows))


def linear_cross_entropy(
    features: Sequence[jax.Array],
    weights: Sequence[jax.Array],
    layouts: Sequence[str],
    labels_BT: jax.Array,
    loss_weights_BT: jax.Array,
    *,
    tokens_per_chunk: int,
    scales: Sequence[jax.Array | None] | None = None,
) -> tuple[jax.Array, jax.Array]:
    """(Σ loss_weights·CE, CE per token [B, T]) for ``logits = Σ_i (features[i] · weights[i]ᵀ) ⊙ scales[i]``.

    ``features[i]`` is [B, T, K_i] and ``weights[i]`` [V, K_i] (layout "vk") or [K_i, V] ("kv").
    ``scales[i]`` (optional, [V]) scales the logit columns of term i: a row-normalized embedding
    ``E = diag(s)·raw`` enters as ``raw`` with scale ``s``, so E itself is never formed. The
    logits are formed in fp32 one chunk of positions at a time (``chunk_positions``); a
    sequence length the chunk does not divide is padded with zero-weight positions. Equal to
    ``sum(cross_entropy(logits, labels) * loss_weights)`` and its gradients (w.r.t. features,
    weights, scales and loss weights) up to float32 rounding.
    """
    if tokens_per_chunk < 1:
        raise ValueError(f"tokens_per_chunk must be a positive number of tokens, got {tokens_per_chunk}")
    scales = list(scales) if scales is not None else [None] * len(features)
    if not features or not len(features) == len(weights) == len(layouts) == len(scales):
        raise ValueError("linear_cross_entropy needs matching, non-empty lists of features, weights, layouts, scales")
    for layout in layouts:
        if layout not in LAYOUTS:
            raise ValueError(f"unknown weight layout {layout!r}; valid: {', '.join(LAYOUTS)}")
    b, t = labels_BT.shape
    shards = axis_shards("batch")
    if b % shards:
        shards = 1
    vocab = weights[0].shape[0 if layouts[0] == "vk" else 1]
    vocab_shards = axis_shards("vocab")
    if vocab % vocab_shards:
        vocab_shards = 1
    plan = _Plan(
        positions=chunk_positions(b, t, tokens_per_chunk, shards), layouts=tuple(layouts), shards=shards,
        vocab_shards=vocab_shards, blocks=_vocab_blocks(vocab // vocab_shards),
    )
    weights = [constrain(w, ("vocab", None) if lay == "vk" else (None, "vocab")) for w, lay in zip(weights, layouts)]
    scales = [None if sc is None else constrain(sc, ("vocab",)) for sc in scales]
    return _linear_ce(
        plan, list(features), weights, scales, labels_BT.astype(jnp.int32), loss_weights_BT.astype(jnp.float32)
    )


# -- implementation ----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Plan:
    positions: int  # sequence positions per chunk
    layouts: tuple[str, ...]
    shards: int  # batch shards: one partial weight gradient each
    vocab_shards: int  # tensor-parallel shards of the vocabulary
    blocks: tuple[int, int]  # (n, rows): a shard's vocabulary in n blocks of `rows` (last ones padded)


def _vocab_blocks(rows: int, most: int = 16) -> tuple[int, int]:
    """(n, rows per block) for a shard's vocabulary of ``rows``: 8 to ``most`` blocks that divide it
    when possible (GPT-2's 50257 = 29·1733 has none, so its last block is padded)."""
    for n in range(most, 7, -1):
        if rows % n == 0:
            return n, rows // n
    n = min(most, rows)
    return n, -(-rows // n)


def _logits(f_BPK: jax.Array, w: jax.Array, layout: str) -> jax.Array:
    spec = "bpk,vk->bpv" if layout == "vk" else "bpk,kv->bpv"
    return jnp.einsum(spec, f_BPK, w, preferred_element_type=jnp.float32)


def _feature_grad(g_BPV: jax.Array, w: jax.Array, layout: str, dtype) -> jax.Array:
    spec = "bpv,vk->bpk" if layout == "vk" else "bpv,kv->bpk"
    return jnp.einsum(spec, g_BPV, w, preferred_element_type=jnp.float32).astype(dtype)


def _split_shards(x: jax.Array, shards: int) -> jax.Array:
    """[B, ...] -> [S, B/S, ...]."""
    return x.reshape(shards, x.shape[0] // shards, *x.shape[1:])


def _acc_shape(w: jax.Array, layout: str, plan: _Plan) -> tuple[int, ...]:
    """Weight-gradient accumulator: vocabulary split as (shard t, block j, row a) so that block j
    of every shard is one contiguous slab: [(S,) tp, n, rows, K] ("vk") or [(S,) K, tp, n, rows] ("kv")."""
    lead = (plan.shards,) if plan.shards > 1 else ()
    tp, (n, rows) = plan.vocab_shards, plan.blocks
    if layout == "vk":
        return (*lead, tp, n, rows, w.shape[1])
    return (*lead, w.shape[0], tp, n, rows)


def _acc_to_weight(a: jax.Array, w: jax.Array, layout: str, plan: _Plan) -> jax.Array:
    """The accumulator (batch shards summed) in the weight's own layout, block padding dropped."""
    a = a.sum(axis=0) if plan.shards > 1 else a
    tp, (n, rows) = plan.vocab_shards, plan.blocks
    shard_rows = (w.shape[0] if layout == "vk" else w.shape[1]) // tp
    if layout == "vk":
        a = a.reshape(tp, n * rows, a.shape[-1])[:, :shard_rows]
    else:
        a = a.reshape(a.shape[0], tp, n * rows)[:, :, :shard_rows]
    return a.reshape(w.shape)


def _acc_axes(layout: str, plan: _Plan) -> tuple[str | None, ...]:
    lead = ("batch",) if plan.shards > 1 else ()
    return lead + (("vocab", None, None, None) if layout == "vk" else (None, "vocab", None, None))


def _add_weight_grad(acc: jax.Array, g_BPV: jax.Array, f_BPK: jax.Array, plan: _Plan, layout: str) -> jax.Array:
    """acc += g_BPVᵀ·f_BPK, one vocabulary block at a time, updated in place: a whole [V, K]
    product per chunk would be a second table-sized temporary next to the accumulator."""
    b, p, v = g_BPV.shape
    tp, (n, rows) = plan.vocab_shards, plan.blocks
    g = g_BPV.reshape(b, p, tp, v // tp)
    if n * rows > v // tp:
        g = jnp.pad(g, ((0, 0), (0, 0), (0, 0), (0, n * rows - v // tp)))
    g = g.reshape(b, p, tp, n, rows)
    f = f_BPK.astype(jnp.float32)
    s = ""
    if plan.shards > 1:
        g, f, s = _split_shards(g, plan.shards), _split_shards(f, plan.shards), "s"
    spec = f"{s}bpta,{s}bpk->{s}tak" if layout == "vk" else f"{s}bpta,{s}bpk->{s}kta"
    axis = acc.ndim - 3 if layout == "vk" else acc.ndim - 2  # the block axis j

    # A loop rather than unrolled blocks: XLA could otherwise compute all blocks' products at once.
    def add_block(j, acc):
        g_j = jax.lax.dynamic_index_in_dim(g, j, axis=g.ndim - 2, keepdims=False)
        block = jnp.expand_dims(jnp.einsum(spec, g_j, f, preferred_element_type=jnp.float32), axis)
        old = jax.lax.dynamic_slice_in_dim(acc, j, 1, axis=axis)
        return jax.lax.dynamic_update_slice_in_dim(acc, old + block, j, axis=axis)

    return jax.lax.fori_loop(0, n, add_block, acc) if n > 1 else add_block(0, acc)


def _to_chunks(x: jax.Array, positions: int) -> jax.Array:
    """[B, T, ...] -> [T/P, B, P, ...] (T padded with zeros to a multiple of P)."""
    b, t = x.shape[:2]
    num = -(-t // positions)
    pad = num * positions - t
    if pad:
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    x = x.reshape(b, num, positions, *x.shape[2:])
    return jnp.moveaxis(x, 1, 0)


def _from_chunks(x: jax.Array, seq_len: int) -> jax.Array:
    """Inverse of ``_to_chunks``: [T/P, B, P, ...] -> [B, T, ...]."""
    num, b, p = x.shape[:3]
    x = jnp.moveaxis(x, 0, 1).reshape(b, num * p, *x.shape[3:])
    return x[:, :seq_len]


def _chunk_loop(plan: _Plan, features, weights, scales, labels, loss_weights, with_grads):
    """Per-token CE [B, T]; with ``with_grads`` also the gradients of Σ loss_weights·CE:
    (features grads [B, T, K_i], weight grads in the layout of each weight, scale grads [V] or None)."""
    t = labels.shape[1]
    layouts = plan.layouts
    xs = ([_to_chunks(f, plan.positions) for f in features], _to_chunks(labels, plan.positions),
          _to_chunks(loss_weights, plan.positions))

    def chunk_logits(f_chunks, y_BP):
        terms = [_logits(f, w, lay) for f, w, lay in zip(f_chunks, weights, layouts)]
        logits = sum(u if sc is None else u * sc for u, sc in zip(terms, scales))
        logits = constrain(logits, ("batch", "length", "vocab"))
        lse = jax.nn.logsumexp(logits, axis=-1)
        loss = lse - jnp.take_along_axis(logits, y_BP[..., None], axis=-1)[..., 0]
        return logits, lse, loss

    if not with_grads:
        def body(carry, x):
            f_chunks, y, _ = x
            return carry, chunk_logits(f_chunks, y)[2]

        _, losses = jax.lax.scan(body, None, xs)
        return _from_chunks(losses, t)

    # For a scaled term (logits u·s) the accumulator holds A = Σ dlogitsᵀ·F without the scale:
    # then d weight = s ⊙ A and d s = Σ_k weight ⊙ A come from A once, after the loop.
    def body(acc, x):
        f_chunks, y, w_BP = x
        logits, lse, loss = chunk_logits(f_chunks, y)
        # d(Σ w·CE)/d logits = w·(softmax − onehot); elementwise, so XLA fuses it into one pass.
        onehot = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 2) == y[..., None]
        dlogits = w_BP[..., None] * (jnp.exp(logits - lse[..., None]) - onehot.astype(jnp.float32))
        df, new_acc = [], []
        for f, w, sc, lay, a in zip(f_chunks, weights, scales, layouts, acc):
            df.append(_feature_grad(dlogits if sc is None else dlogits * sc, w, lay, f.dtype))
            new_acc.append(constrain(_add_weight_grad(a, dlogits, f, plan, lay), _acc_axes(lay, plan)))
        return new_acc, (loss, df)

    acc0 = [constrain(jnp.zeros(_acc_shape(w, lay, plan), jnp.float32), _acc_axes(lay, plan))
            for w, lay in zip(weights, layouts)]
    acc, (losses, df) = jax.lax.scan(body, acc0, xs)
    acc = [_acc_to_weight(a, w, lay, plan) for a, w, lay in zip(acc, weights, layouts)]
    return _from_chunks(losses, t), [_from_chunks(d, t) for d in df], acc


def _weight_grads(plan: _Plan, acc, weights, scales, g: jax.Array):
    """(weight grads, scale grads) from the accumulators A_i = Σ dlogitsᵀ·F_i, times the scalar g."""
    dw, ds = [], []
    for a, w, sc, lay in zip(acc, weights, scales, plan.layouts):
        if sc is None:
            dw.append((g * a).astype(w.dtype))
            ds.append(None)
            continue
        k_axis = 1 if lay == "vk" else 0
        dw.append((a * jnp.expand_dims(g * sc, k_axis)).astype(w.dtype))
        ds.append((g * jnp.sum(a * w, axis=k_axis)).astype(sc.dtype))
    return dw, ds


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _linear_ce(plan, features, weights, scales, labels, loss_weights):
    token_loss = _chunk_loop(plan, features, weights, scales, labels, loss_weights, False)
    return jnp.sum(token_loss * loss_weights), token_loss


def _value(x):
    return None if x is None else x.value


def _linear_ce_fwd(plan, features, weights, scales, labels, loss_weights):
    # symbolic_zeros=True wraps every differentiable input; only the values matter here.
    features = [f.value for f in features]
    weights = [w.value for w in weights]
    scales = [_value(sc) for sc in scales]
    labels, loss_weights = labels.value, loss_weights.value
    token_loss, df, acc = _chunk_loop(plan, features, weights, scales, labels, loss_weights, True)
    residuals = (df, acc, token_loss, features, weights, scales, labels, loss_weights)
    return (jnp.sum(token_loss * loss_weights), token_loss), residuals


def _linear_ce_bwd(plan, residuals, cotangents):
    df, acc, token_loss, features, weights, scales, labels, loss_weights = residuals
    g_sum, g_tokens = cotangents
    if isinstance(g_sum, SymbolicZero):
        g_sum = jnp.zeros((), jnp.float32)
    if isinstance(g_tokens, SymbolicZero):
        # The usual case (the per-token losses only feed metrics): scale the gradients that the
        # forward pass already computed. The unused residuals are dead code for XLA.
        d_features = [(g_sum * d).astype(d.dtype) for d in df]
        d_weights, d_scales = _weight_grads(plan, acc, weights, scales, g_sum)
    else:
        # The per-token losses are differentiated too: one more exact pass with the combined
        # per-token cotangent, recomputing each chunk's logits.
        combined = g_sum * loss_weights + g_tokens
        _, d_features, acc = _chunk_loop(plan, features, weights, scales, labels, combined, True)
        d_weights, d_scales = _weight_grads(plan, acc, weights, scales, jnp.ones((), jnp.float32))
    return d_features, d_weights, d_scales, None, (g_sum * token_loss).astype(loss_weights.dtype)


_linear_ce.defvjp(_linear_ce_fwd, _linear_ce_bwd, symbolic_zeros=True)
