"""The training loss: the weighted sum of the cross-entropies of the output
layer's logits, computed a chunk of rows at a time together with its
gradient, so that the [N, V] logits never exist at once; and the
per-token log-probability that `score` reports, from the same code.

Shapes: N = rows (positions), C = rows of one chunk, D = model width,
V = vocabulary.
"""

from __future__ import annotations

import tensorflow as tf

# Bytes of float32 logits one loss chunk may take, by device type: on a CPU a
# block that stays in its cache; a GPU has the memory for all of a replica's
# rows at the default size, and each extra chunk is one more kernel sequence.
CHUNK_BUDGET = {"CPU": 32 << 20, "GPU": 1 << 30}

_TINY = 2.0**-126  # the smallest normal float32


def auto_chunk(n: int, vocab: int, budget_bytes: int = CHUNK_BUDGET["CPU"]) -> int:
    """The largest divisor of n whose [chunk, vocab] float32 logits fit the budget."""
    target = max(1, budget_bytes // (4 * vocab))
    if n <= target:
        return n
    for c in range(target, 0, -1):
        if n % c == 0:
            return c
    return 1


# --- one block of rows ----------------------------------------------------------


def block_logits(h_rows, w_cd, b_cd):
    """h_rows [C, D], w_cd [D, V] and b_cd [V] in the compute dtype -> float32 [C, V].

    The bias is added inside the product, before its result is rounded to
    the compute type: no separate float32 pass over the block."""
    return tf.cast(tf.nn.bias_add(tf.matmul(tf.cast(h_rows, w_cd.dtype), w_cd), b_cd), tf.float32)


def _log_sum_exp(logits, p):
    """lse_i = max_j logits[i, j] - log(max_j p[i, j]) for logits [C, V] and
    p = softmax(logits) -> [C]. The largest probability is at least 1 / V,
    so its log never underflows."""
    return tf.reduce_max(logits, -1) - tf.math.log(tf.reduce_max(p, -1))


def token_losses(logits, targets, weights, branch_free=False, smoothing=0.0):
    """Per-row cross-entropy of one block.

    logits float32 [C, V], targets int32 [C], weights float32 [C] ->
    (p = softmax(logits) [C, V], loss [C]).

    loss_i = -log p[i, t_i]. Where p[i, t_i] of a weighted row is below the
    smallest normal float32 (its logit more than about 87 below the row's
    largest), the loss comes from the log-sum-exp instead, lse_i -
    logits[i, t_i]. Without `branch_free` a tf.cond takes the whole block's
    loss that way when one of its rows needs it (two reductions over the
    block spent only then); with it both are computed and selected per row,
    because under XLA on a GPU a data-dependent conditional copies its
    predicate to the host and waits for it. Rows of weight 0 (padding) never
    need the exact value: clamping their p[i, t_i] keeps 0 * log(0) out of
    a weighted sum.

    Label smoothing e > 0 trains on (1 - e) one_hot(t) + e / V:
    loss_i = (1 - e)(-log p[i, t_i]) + e (lse_i - mean_j logits[i, j]).
    """
    p = tf.nn.softmax(logits)  # [C, V] float32
    p_t = tf.gather(p, targets, batch_dims=1)  # [C]
    exact_rows = (p_t >= _TINY) | (weights == 0.0)

    def from_p():
        return -tf.math.log(tf.maximum(p_t, _TINY))

    def from_lse():
        return _log_sum_exp(logits, p) - tf.gather(logits, targets, batch_dims=1)

    if branch_free:
        loss = tf.where(exact_rows, from_p(), from_lse())  # [C]
    else:
        loss = tf.cond(tf.reduce_all(exact_rows), from_p, from_lse)
    if smoothing:
        loss = (1.0 - smoothing) * loss + smoothing * (_log_sum_exp(logits, p) - tf.reduce_mean(logits, -1))
    return p, loss


def token_log_probs(logits, targets):
    """log softmax(logits)[i, targets[i]]: logits float32 [C, V], targets int32
    [C] -> float32 [C]. The loss's own per-row value (`token_losses`, each row
    exact), negated."""
    return -token_losses(logits, targets, tf.ones(tf.shape(targets)), branch_free=True)[1]


# --- the chunked sum -------------------------------------------------------------


def _rows_after(h, rows, previous):
    """h[rows], read only once `previous` is computed: one block at a time.
    Without this dependency the executor may run several blocks at once,
    each with its own [C, V] buffers."""
    with tf.control_dependencies([previous]):
        return tf.identity(h[rows])


def _blocks(n, chunk):
    """The row slices of the n // chunk blocks."""
    return [slice(i * chunk, (i + 1) * chunk) for i in range(n // chunk)]


def _loss_only(h, w_cd, b_cd, targets, weights, chunk, branch_free, smoothing):
    """The weighted loss sum, without any gradient work (evaluation)."""
    total = tf.zeros([])
    for rows in _blocks(h.shape[0], chunk):
        logits = block_logits(_rows_after(h, rows, total), w_cd, b_cd)  # [C, V]
        _, loss = token_losses(logits, targets[rows], weights[rows], branch_free, smoothing)
        total += tf.reduce_sum(weights[rows] * loss)
    return total


def _loss_and_softmax_grads(h, hw, w_cd, b_cd, targets, weights, chunk, branch_free, smoothing):
    """The weighted loss sum and the softmax part of each gradient, one block
    at a time: with p = softmax(logits), row weights r and hw = h scaled by
    them, dh = r * (p @ w^T), dw = hw^T @ p, db = p^T @ r.

    In bfloat16, dw is summed as its transpose, p^T @ hw ([V, D]), which
    `_minus_target_grads` transposes once: oneDNN's bfloat16 hw^T @ p is the
    slower product on CPUs (docs/performance.md).

    -> (total [], dh [N, D], dw [D, V] or [V, D] (`_transposed_dw`), db [V]),
    all float32."""
    cd = w_cd.dtype
    transposed = _transposed_dw(cd)
    total, dh, db = tf.zeros([]), [], tf.zeros(b_cd.shape)
    dw = tf.zeros([w_cd.shape[1], w_cd.shape[0]] if transposed else w_cd.shape)
    for rows in _blocks(h.shape[0], chunk):
        logits = block_logits(_rows_after(h, rows, dw), w_cd, b_cd)  # [C, V]
        p, loss = token_losses(logits, targets[rows], weights[rows], branch_free, smoothing)
        total += tf.reduce_sum(weights[rows] * loss)
        db += tf.linalg.matvec(p, weights[rows], transpose_a=True)  # [V]
        p_cd, hw_cd = tf.cast(p, cd), tf.cast(hw[rows], cd)
        dh.append(weights[rows][:, None] * tf.cast(tf.matmul(p_cd, w_cd, transpose_b=True), tf.float32))  # [C, D]
        if transposed:
            dw += tf.cast(tf.matmul(p_cd, hw_cd, transpose_a=True), tf.float32)  # [V, D]
        else:
            dw += tf.cast(tf.matmul(hw_cd, p_cd, transpose_a=True), tf.float32)  # [D, V]
    return total, tf.concat(dh, 0), dw, db


def _transposed_dw(compute_dtype) -> bool:
    """Whether the output layer's weight gradient is summed as [V, D]."""
    return compute_dtype == tf.bfloat16


def _minus_target_grads(dh, dw, db, hw, w, targets, weights, smoothing, transposed):
    """The softmax parts of the gradients minus the target distribution's,
    (1 - e) one_hot(t) + e / V, for all N rows at once.

    The one-hot share never becomes an [N, V] tensor: it is a gather of w's
    columns and segment sums over the targets. It is computed after the last
    block (it depends on none): computed early, its tensors stayed alive
    through the block loop, where the training step's memory peaks. dw comes
    as summed ([V, D] when `transposed`) and leaves as [D, V], transposed once.
    -> (dh [N, D], dw [D, V], db [V])."""
    v = w.shape[1]
    with tf.control_dependencies([dw]):
        w_t = tf.gather(w, targets, axis=1)  # [D, N]
        hw_t = tf.math.unsorted_segment_sum(hw, targets, v)  # [V, D]
    hot = 1.0 - smoothing  # the one-hot share of the target distribution
    dh = dh - hot * weights[:, None] * tf.transpose(w_t)  # [N, D]
    dw = tf.transpose(dw - hot * hw_t) if transposed else dw - hot * tf.transpose(hw_t)  # [D, V]
    db = db - hot * tf.math.unsorted_segment_sum(weights, targets, v)  # [V]
    if smoothing:  # the uniform share, e / V for every column
        u = smoothing / v
        dh -= u * weights[:, None] * tf.reduce_sum(w, axis=1)[None, :]
        dw -= u * tf.reduce_sum(hw, axis=0)[:, None]
        db -= u * tf.reduce_sum(weights)
    return dh, dw, db


def chunked_xent_sum(
    h, w, b, targets, weights, chunk=0, compute_dtype=tf.float32, with_grad=True, branch_free=False, smoothing=0.0
):
    """sum_i weights[i] * CE(h[i] @ w + b, targets[i]), `chunk` rows at a time.

    h [N, D], w [D, V], b [V], targets int32 [N], weights float32 [N] -> scalar.

    The loss and its gradient are computed together, in one pass over each
    [chunk, V] block of logits, so the output layer costs three matrix
    products (no recomputation) and no more than one block of logits is alive
    at a time. Per block, with p = softmax(logits):

        loss_i = -log p[i, t_i]        (`token_losses`)
        dlogits = w_i (p - one_hot(t))

    With `with_grad=False` (evaluation) only the loss is computed.
    `branch_free`: no data-dependent conditional (for XLA on GPUs).
    `chunk` must divide N (static); 0 picks one (`auto_chunk`).
    Label smoothing (`smoothing` = e > 0): dlogits = w_i (p - (1 - e) one_hot(t) - e / V).
    """
    # Plain tensors: a custom gradient must not capture the variables themselves.
    w, b = tf.convert_to_tensor(w), tf.convert_to_tensor(b)
    n, v = h.shape[0], w.shape[1]
    if n is None:
        raise ValueError("chunked_xent_sum needs a static number of rows")
    chunk = chunk or auto_chunk(n, v)
    if n % chunk:
        raise ValueError(f"loss chunk {chunk} does not divide {n} positions")
    b_cd = tf.cast(b, compute_dtype)
    if not with_grad:
        return _loss_only(h, tf.cast(w, compute_dtype), b_cd, targets, weights, chunk, branch_free, smoothing)

    @tf.custom_gradient
    def xent(h, w, b):
        w_cd = tf.cast(w, compute_dtype)  # [D, V], cast once for all blocks
        hw = h * weights[:, None]  # [N, D]: rows scaled by their weight
        total, dh, dw, db = _loss_and_softmax_grads(h, hw, w_cd, b_cd, targets, weights, chunk, branch_free, smoothing)
        transposed = _transposed_dw(compute_dtype)
        dh, dw, db = _minus_target_grads(dh, dw, db, hw, w, targets, weights, smoothing, transposed)

        def grad(upstream):
            return upstream * dh, upstream * dw, upstream * db

        return total, grad

    return xent(h, w, b)
