"""Text generation and scoring inside the TensorFlow graph, and its export as a
SavedModel for TensorFlow Serving.

`Sampler` wraps a trained `GPT` and its vocabulary. Its three `tf.function`s
take and return plain tensors (strings in, strings and numbers out), so the
exported SavedModel runs on TensorFlow alone (TensorFlow Serving, or Python
without this package):

  generate(prompt, max_tokens, top_k, temperature, seed)
      -> text, completion, token_ids, lengths
  serving_default(prompt)   generate with 40 tokens, top-k 10, temperature 1
                            and a fresh random seed
  score(text) -> log_prob, num_tokens, perplexity

How a batch is generated (in `tf.while_loop`s):

  1. The prompts are tokenized and right-padded. The last `maxlen` tokens of
     each prompt are its context; the whole prompt is still returned as text.
  2. One pass over the contexts fills a preallocated key/value cache per
     layer ([B, H, S, K], S = min(maxlen, C + max_tokens) slots) and gives
     each row's hidden state at its own last token.
  3. Each step turns the hidden states into logits, samples one token per
     row, appends it to the row's history, and computes the next hidden
     states. While a row fits in `maxlen` positions this is one position's
     attention against the cache. Past `maxlen` the row runs the model again
     over its last `maxlen` tokens (see `_window_hidden`). A first loop,
     whose step is the cached one alone, runs while every row will still fit
     after its next token; a second one, whose step can also run windows,
     takes over from there (for the example's 40 tokens after a short
     prompt it never runs).
  4. A row ends when it samples the padding id 0 (the end of a review); the
     loop ends when every row has ended or `max_tokens` steps have run.

Shapes: B = batch, C = context length (<= maxlen), L = maxlen, S = cache
slots, W = history width, V = vocabulary, D = model width, H = heads,
K = key size.
"""

from __future__ import annotations

import math
import re
import shutil
from pathlib import Path

import tensorflow as tf

from tfgpt.data import Tokenizer
from tfgpt.layers import causal_mask, matmul
from tfgpt.model import GPT

# The most tokens one request may generate per prompt, and the most prompts
# (or texts to score) one request may hold. Larger requests are refused with
# an InvalidArgumentError instead of exhausting memory.
MAX_TOKENS = 1024
MAX_BATCH = 1024

# The settings of the Keras example, used by `serving_default`.
DEFAULT_MAX_TOKENS = 40
DEFAULT_TOP_K = 10
DEFAULT_TEMPERATURE = 1.0

# Windows per step when `score` slides over long texts, and rows per step
# when it turns hidden states into log-probabilities.
SCORE_WINDOWS = 64
SCORE_ROWS = 512

SIGNATURES = ("serving_default", "generate", "score")


def _check(condition, message, *data):
    """An assertion that fails with an InvalidArgumentError whose text starts
    with `message` (followed by `data`, if any)."""
    return tf.debugging.Assert(condition, [message, *data], summarize=16)


class Sampler(tf.Module):
    """A GPT plus its vocabulary, with in-graph `generate`, `serving_default`
    and `score` functions.

    model: the trained GPT (its variables may be mirrored over devices).
    vocab_path: the vocabulary file (`tfgpt.data.write_vocab`); it becomes
      an asset of the SavedModel.
    use_cache: False runs the whole model over each row's (growing, then
      sliding) sequence at every step. Only for benchmarks and comparisons.
    jit_compile: compile the one-token decode step with XLA. Off by default:
      it measured no faster on a 2-core CPU, and TensorFlow Serving's CPU
      build runs XLA only when started with --xla_cpu_compilation_enabled.
    """

    def __init__(self, model: GPT, vocab_path, use_cache: bool = True, jit_compile: bool = False,
                 name="sampler"):
        super().__init__(name=name)
        self.model = model
        # The tables are created here, outside any tf.function, so that the
        # SavedModel tracks them and carries the vocabulary file as an asset.
        self.tokenizer = Tokenizer(vocab_path)
        self.maxlen = model.config.maxlen
        self.vocab_size = model.config.vocab_size
        self.use_cache = use_cache
        self.jit_compile = jit_compile
        if jit_compile:
            self._decode_step = tf.function(self._decode_hidden, jit_compile=True)
        else:
            self._decode_step = self._decode_hidden

    # --- the exported functions -------------------------------------------------

    @tf.function(input_signature=[
        tf.TensorSpec([None], tf.string, name="prompt"),
        tf.TensorSpec([], tf.int32, name="max_tokens"),
        tf.TensorSpec([], tf.int32, name="top_k"),
        tf.TensorSpec([], tf.float32, name="temperature"),
        tf.TensorSpec([2], tf.int64, name="seed"),
    ])
    def generate(self, prompt, max_tokens, top_k, temperature, seed):
        """Continues each prompt.

        prompt string [B]; max_tokens int32 [] in [0, MAX_TOKENS]; top_k int32 []
        (clamped to [1, V]); temperature float32 [] (<= 0: greedy); seed int64 [2].
        Returns a dict:
          text string [B]: prompt and completion, tokens joined by spaces
          completion string [B]: the generated tokens only
          token_ids int32 [B, S]: the generated ids, 0-padded (S = max length)
          lengths int32 [B]: generated tokens per row (the ending 0 not counted)
        """
        return self._generate(prompt, max_tokens, top_k, temperature, seed)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="prompt")])
    def serving_default(self, prompt):
        """`generate` with the Keras example's settings and a new random seed."""
        seed = tf.random.uniform([2], minval=0, maxval=tf.int64.max, dtype=tf.int64)
        return self._generate(prompt, tf.constant(DEFAULT_MAX_TOKENS), tf.constant(DEFAULT_TOP_K),
                              tf.constant(DEFAULT_TEMPERATURE), seed)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="text")])
    def score(self, text):
        """How likely each text is under the model.

        text string [B], each of at least two tokens. Returns a dict:
          log_prob float32 [B]: sum of log p(token | the tokens before it), over
            every token but the first; a token more than `maxlen` positions in
            sees the `maxlen` tokens before it, as in generation
          num_tokens int32 [B]: how many tokens were scored (tokens - 1)
          perplexity float32 [B]: exp(-log_prob / num_tokens)
        """
        ids = self._tokenize(text, "text")
        n = tf.cast(ids.row_lengths(), tf.int32)  # [B]
        with tf.control_dependencies([_check(
                tf.reduce_all(n >= 2),
                "score needs at least two tokens in every text; too short at index:",
                tf.where(n < 2)[:, 0])]):
            dense = tf.identity(ids.to_tensor())  # [B, T]
        log_prob = self._score_first_window(dense, n) + self._score_slides(dense, n)
        num = n - 1
        return {
            "log_prob": log_prob,
            "num_tokens": num,
            "perplexity": tf.exp(-log_prob / tf.cast(num, tf.float32)),
        }

    def signatures(self) -> dict:
        """The concrete functions to export, by signature name."""
        return {name: getattr(self, name).get_concrete_function() for name in SIGNATURES}

    # --- input ------------------------------------------------------------------

    def _tokenize(self, strings, what):
        """string [B] -> ragged int32 [B, None], after checking the batch size.

        Any bytes are accepted: what is not UTF-8 becomes U+FFFD, and NUL
        becomes a space (lowercasing would otherwise cut the string there)."""
        with tf.control_dependencies([_check(
                tf.size(strings) <= MAX_BATCH,
                f"at most {MAX_BATCH} {what}s per request; got", tf.size(strings))]):
            strings = tf.strings.unicode_transcode(
                strings, "UTF-8", "UTF-8", errors="replace", replacement_char=0xFFFD)
        return self.tokenizer(tf.strings.regex_replace(strings, r"\x00", " "))

    def _generate(self, prompt, max_tokens, top_k, temperature, seed):
        ids = self._tokenize(prompt, "prompt")
        lengths = tf.cast(ids.row_lengths(), tf.int32)  # [B]
        checks = [
            _check(tf.reduce_all(lengths > 0),
                   "every prompt needs at least one word after standardization; empty at index:",
                   tf.where(lengths == 0)[:, 0]),
            _check((max_tokens >= 0) & (max_tokens <= MAX_TOKENS),
                   f"max_tokens must be between 0 and {MAX_TOKENS}; got", max_tokens),
            _check(tf.math.is_finite(temperature),
                   "temperature must be a finite number; got", temperature),
        ]
        with tf.control_dependencies(checks):
            # Past maxlen tokens only the last maxlen can be seen by the model.
            context = tf.identity(ids[:, -self.maxlen:].to_tensor())  # [B, C]
            max_tokens = tf.identity(max_tokens)
        top_k = tf.clip_by_value(top_k, 1, self.vocab_size)
        token_ids, num = self._sample(context, tf.minimum(lengths, self.maxlen),
                                      max_tokens, top_k, temperature, seed)
        prompt_text = self.tokenizer.detokenize(ids.to_tensor())
        completion = self.tokenizer.detokenize(token_ids)
        text = tf.where(completion == "", prompt_text,
                        tf.strings.join([prompt_text, completion], separator=" "))
        return {"text": text, "completion": completion, "token_ids": token_ids, "lengths": num}

    # --- the generation loop ----------------------------------------------------

    def _sample(self, context, context_len, max_tokens, top_k, temperature, seed):
        """The sampling loop.

        context int32 [B, C] (right-padded), context_len int32 [B] (>= 1).
        Returns (token_ids int32 [B, S], lengths int32 [B]): the generated ids,
        0-padded to S = the longest row.
        """
        batch, c = tf.shape(context)[0], tf.shape(context)[1]
        # Each row's tokens so far (context, then generated) in one buffer, at
        # least L wide so that a full window can always be read from it.
        width = tf.maximum(c + max_tokens, self.maxlen)
        history = tf.pad(context, [[0, 0], [0, width - c]])  # [B, W]
        head = self._head()
        setup = None
        if self.use_cache:
            # A row uses the cache while it fits in L positions, so no more
            # than min(L, C + max_tokens) slots are ever written.
            slots = tf.minimum(self.maxlen, c + max_tokens)
            hidden, caches = self._prefill(context, context_len, slots)
            setup = self._decode_setup(batch, slots)
            # In the loop each cache is kept as [B * H * S, K], the shape the
            # in-place row update takes.
            caches = [tuple(tf.reshape(t, [-1, tf.shape(t)[3]]) for t in kv) for kv in caches]
        else:
            hidden, caches = self._window_hidden(history, context_len), []
        n = context_len  # [B] tokens in each row's history
        done = tf.zeros([batch], tf.bool)  # [B]

        def more(i, hidden, caches, history, n, done):
            return (i < max_tokens) & ~tf.reduce_all(done)

        def make_step(next_hidden):
            def step(i, hidden, caches, history, n, done):
                # The output layer runs here only, on each row's newest hidden
                # state: one matrix product per step, the same graph node for
                # the first token and the rest.
                logits = self._logits(hidden, head)  # [B, V]
                token = self._pick(logits, top_k, temperature,
                                   tf.random.experimental.stateless_fold_in(seed, i))
                token = tf.where(done, 0, token)  # [B]
                history = _write(history, n, token)
                done = done | (token == 0)
                n += tf.cast(~done, tf.int32)
                # No hidden state is needed after the last step.
                live = ~done & (i + 1 < max_tokens)
                hidden, caches = next_hidden(token, n, live, hidden, caches, history)
                return i + 1, hidden, caches, history, n, done
            return step

        state = (tf.constant(0), hidden, caches, history, n, done)
        if self.use_cache:
            # First, while every row will still fit in L positions after the
            # next token, a loop whose step is the cached decode alone,
            # without the general step's branches (on a 2-core CPU they cost
            # 0.02 to 0.09 ms per step at batch 1 and 0.25 ms at batch 32).
            def cached(token, n, live, hidden, caches, history):
                return self._cached_hidden(token, n, caches, setup)

            def fits(i, hidden, caches, history, n, done):
                return more(i, hidden, caches, history, n, done) & tf.reduce_all(done | (n < self.maxlen))

            state = tf.while_loop(fits, make_step(cached), state)
        # Then (or, without the cache, from the start) the general step, in
        # which rows may decode from the cache or run a window.
        _, _, _, history, n, _ = tf.while_loop(
            more, make_step(lambda *a: self._next_hidden(*a, setup)), state)
        lengths = n - context_len  # [B]
        columns = tf.range(tf.reduce_max(tf.concat([lengths, [0]], 0)))  # [S]
        index = tf.minimum(context_len[:, None] + columns[None, :], width - 1)  # [B, S]
        token_ids = tf.gather(history, index, batch_dims=1)
        token_ids = tf.where(columns[None, :] < lengths[:, None], token_ids, 0)  # [B, S]
        return token_ids, lengths

    def _pick(self, logits, top_k, temperature, seed):
        """One token per row: the largest logit if temperature <= 0, else a draw
        from the softmax of the top_k largest logits divided by temperature.

        logits float32 [B, V]; top_k int32 [] in [1, V]; seed [2] -> int32 [B].
        """
        values, indices = top_k_logits(logits, top_k)  # [B, k], largest first
        greedy = indices[:, 0]
        # Shifting by the largest value first keeps a tiny temperature from
        # overflowing: the best token stays at 0, the rest go to -inf at worst.
        t = tf.where(temperature > 0, temperature, 1.0)
        scaled = (values - values[:, :1]) / t  # [B, k]
        choice = tf.random.stateless_categorical(scaled, 1, seed, dtype=tf.int32)[:, 0]  # [B]
        sampled = tf.gather(indices, tf.minimum(choice, top_k - 1), batch_dims=1)
        return tf.where(temperature > 0, sampled, greedy)

    def _head(self):
        """The output layer's (w [D, V], b [V]), w already in the compute dtype,
        so that a bfloat16 model does not cast the largest matrix at every step."""
        dense = self.model.head
        return tf.cast(dense.w, dense.compute_dtype), tf.convert_to_tensor(dense.b)

    def _logits(self, hidden, head):
        """hidden float32 [B, D] -> logits float32 [B, V], as `model.head` computes them."""
        w, b = head
        return matmul(hidden, w, w.dtype) + b

    def _prefill(self, context, context_len, slots):
        """Runs the contexts through the model's blocks once.

        context int32 [B, C], context_len int32 [B] -> (hidden float32 [B, D]
        at each row's last token, caches: per layer (k, v), each [B, H, slots, K]
        with the first C slots filled).
        """
        model = self.model
        x = model.embed(context, tf.range(tf.shape(context)[1]))  # [B, C, D]
        caches = []
        for block in model.blocks:
            x, k, v = block.prefill(x, slots)
            caches.append((k, v))
        return tf.gather(x, context_len - 1, batch_dims=1), caches  # [B, D]

    def _next_hidden(self, token, n, live, hidden, caches, history, setup):
        """The last block's output at each row's newest token (index n - 1 of
        its history).

        token int32 [B], n int32 [B], live bool [B] (rows that need it),
        hidden [B, D] (the previous step's) -> (hidden [B, D], caches); rows
        not live keep their old hidden state.
        Rows whose history fits in L positions decode against the cache; longer
        rows run a window. A batch may hold both kinds at once.
        """
        if not self.use_cache:
            return tf.cond(tf.reduce_any(live),
                           lambda: (self._window_hidden(history, n), caches),
                           lambda: (hidden, caches))
        sliding = n > self.maxlen  # [B]

        def cached():
            return self._cached_hidden(token, n, caches, setup)

        def windowed():
            return self._window_hidden(history, n), caches

        def both():
            from_cache, new_caches = cached()
            from_window, _ = windowed()
            return tf.where(sliding[:, None], from_window, from_cache), new_caches

        need_cache = tf.reduce_any(live & ~sliding)
        need_window = tf.reduce_any(live & sliding)
        return tf.cond(
            need_window,
            lambda: tf.cond(need_cache, both, windowed),
            lambda: tf.cond(need_cache, cached, lambda: (hidden, caches)))

    def _cached_hidden(self, token, n, caches, setup):
        """The decode step for each row's newest token, at slot n - 1.

        Rows already sliding still pass through it (the batch is one tensor);
        their slot is clamped and their result is not used."""
        return self._decode_step(token, tf.minimum(n - 1, setup["last_slot"]), caches, setup)

    def _decode_setup(self, batch, slots):
        """What the decode step needs, prepared once per call outside the
        loop, so that each step runs as few operations as possible:

          blocks: per block ((w_q, b_q), (w_k, b_k), (w_v, b_v), (w_out, b_out)),
            w_q/w_k/w_v [D, H * K] and w_out [H * K, D] in the compute dtype,
            biases float32, the attention's 1 / sqrt(K) folded into w_q, b_q.
            Three products of D x H * K took a third of the time of one of
            D x 3 * H * K at batch 1 (0.03 against 0.09 ms with oneDNN on a
            2-core CPU) and need no split.
          row_base, row_of int32 [B * H]: the cache row of (b, h, slot p),
            with a cache seen as [B * H * S, K], is row_base + p[row_of]
          blocked float32 [S, S]: row p is 0 at the slots a query in slot p
            sees (<= p) and -1e9 elsewhere
          last_slot int32 []: S - 1
          cache_shape int32 [4]: [B, H, S, K]
        """
        blocks = []
        for block in self.model.blocks:
            attn = block.attn
            d, hk = attn.dim, attn.num_heads * attn.key_dim
            scale = 1.0 / math.sqrt(attn.key_dim)
            cd = attn.compute_dtype
            blocks.append((_as_matrix(attn.wq, attn.bq, d, cd, scale), _as_matrix(attn.wk, attn.bk, d, cd),
                           _as_matrix(attn.wv, attn.bv, d, cd), _as_matrix(attn.wo, attn.bo, hk, cd)))
        heads = self.model.config.num_heads
        row_of = tf.repeat(tf.range(batch), heads)  # [B * H]: the row b of each (b, h)
        return {
            "blocks": blocks,
            "row_base": tf.range(batch * heads) * slots,
            "row_of": row_of,
            "blocked": (1.0 - causal_mask(slots)) * -1e9,
            "last_slot": slots - 1,
            "cache_shape": tf.stack([batch, heads, slots, self.model.config.key_dim]),
        }

    def _decode_hidden(self, token, pos, caches, setup):
        """One new token per row against the cache: the model's blocks for a
        single query position, without the output layer.

        token, pos int32 [B]; caches: per layer (k, v) [B * H * S, K]; setup
        from `_decode_setup` -> (hidden float32 [B, D], caches).

        The new key and value are written into their slots in place
        (`_write_rows`) rather than by blending whole caches, and the attention
        of one query is computed by `_attend_one`; the residuals, feed-forward
        and norms are the block's own (`Block.finish`).
        """
        model = self.model
        x = model.embed(token, pos)  # [B, D]
        blocked = tf.gather(setup["blocked"], pos)  # [B, S]
        rows = setup["row_base"] + tf.gather(pos, setup["row_of"])  # [B * H]
        shape = setup["cache_shape"]
        new = []
        for block, (*qkv, (w_out, b_out)), (k_cache, v_cache) in zip(model.blocks, setup["blocks"], caches):
            h, kd = block.attn.num_heads, block.attn.key_dim
            q, k, v = (tf.reshape(matmul(x, w, w.dtype) + b, [-1, h, kd]) for w, b in qkv)  # each [B, H, K], q scaled
            k_cache = _write_rows(k_cache, rows, k, in_place=not self.jit_compile)
            v_cache = _write_rows(v_cache, rows, v, in_place=not self.jit_compile)
            context = _attend_one(q, tf.reshape(k_cache, shape), tf.reshape(v_cache, shape), blocked)  # [B, H, K]
            out = matmul(tf.reshape(context, [-1, h * kd]), w_out, w_out.dtype) + b_out  # [B, D]
            # The residuals, feed-forward layer and norms are the block's own.
            x = block.finish(x, out, None, False)
            new.append((k_cache, v_cache))
        return x, new

    def _window_hidden(self, history, n):
        """The last block's output at position n - 1 of each row, from the
        model run over the row's last min(n, L) tokens.

        history int32 [B, W], n int32 [B] (1 <= n <= W) -> [B, D].

        The position embeddings are absolute: a token's keys and values depend
        on its position in the window. When the window slides by one token,
        every token moves to a new position, so the cache cannot be rolled
        over; the whole window is run again.
        """
        size = tf.minimum(self.maxlen, tf.reduce_max(n))  # narrower while all rows are short
        start = tf.maximum(n - size, 0)  # [B]
        index = start[:, None] + tf.range(size)[None, :]  # [B, size]
        window = tf.gather(history, index, batch_dims=1)  # [B, size]
        hidden = self.model.hidden(window)  # [B, size, D]
        return tf.gather(hidden, n - start - 1, batch_dims=1)  # [B, D]

    # --- scoring ------------------------------------------------------------------

    def _score_first_window(self, dense, n):
        """Sum of log p over the tokens at positions 1 .. min(n, L) - 1, which all
        come from one pass over each text's first L tokens.

        dense int32 [B, T] (0-padded), n int32 [B] -> float32 [B].
        """
        first = dense[:, :self.maxlen]  # [B, T0]
        hidden = self.model.hidden(first)[:, :-1]  # [B, T0 - 1, D] predicts first[:, 1:]
        targets = first[:, 1:]  # [B, T0 - 1]
        valid = tf.range(1, tf.shape(targets)[1] + 1)[None, :] < n[:, None]  # [B, T0 - 1]
        rows = tf.broadcast_to(tf.range(tf.shape(dense)[0])[:, None], tf.shape(targets))
        log_p = self._log_probs(tf.boolean_mask(hidden, valid), tf.boolean_mask(targets, valid))
        return tf.math.unsorted_segment_sum(log_p, tf.boolean_mask(rows, valid), tf.shape(dense)[0])

    def _score_slides(self, dense, n):
        """Sum of log p over the tokens at positions L .. n - 1; the token at
        position i is predicted from the window of tokens [i - L, i).

        dense int32 [B, T], n int32 [B] -> float32 [B].
        """
        size = self.maxlen
        targets_at = tf.ragged.range(size, tf.maximum(n, size))  # ragged [B, None]: positions
        rows = tf.cast(targets_at.value_rowids(), tf.int32)  # [M]
        at = targets_at.flat_values  # [M]
        total = tf.shape(at)[0]

        def more(j, acc):
            return j < total

        def step(j, acc):
            end = tf.minimum(j + SCORE_WINDOWS, total)
            r, i = rows[j:end], at[j:end]  # [P], P <= SCORE_WINDOWS windows
            index = tf.stack([tf.repeat(r[:, None], size, axis=1),
                              i[:, None] - size + tf.range(size)[None, :]], -1)  # [P, L, 2]
            window = tf.gather_nd(dense, index)  # [P, L]
            last = self.model.hidden(window)[:, -1]  # [P, D]
            log_p = self._log_probs(last, tf.gather_nd(dense, tf.stack([r, i], -1)))
            return end, acc + tf.math.unsorted_segment_sum(log_p, r, tf.shape(dense)[0])

        _, acc = tf.while_loop(more, step, (tf.constant(0), tf.zeros([tf.shape(dense)[0]])))
        return acc

    def _log_probs(self, hidden, targets):
        """log softmax(head(hidden))[target], SCORE_ROWS rows at a time, so the
        [rows, V] logits never grow with the input.

        hidden float32 [N, D], targets int32 [N] -> float32 [N].
        """
        total = tf.shape(targets)[0]

        def more(j, out):
            return j < total

        def step(j, out):
            end = tf.minimum(j + SCORE_ROWS, total)
            logits = self.model.head(hidden[j:end])  # [R, V]
            picked = tf.gather(logits, targets[j:end], batch_dims=1)
            return end, out.write(out.size(), picked - tf.reduce_logsumexp(logits, -1))

        parts = tf.TensorArray(tf.float32, size=0, dynamic_size=True, infer_shape=False,
                               element_shape=tf.TensorShape([None]))
        _, parts = tf.while_loop(more, step, (tf.constant(0), parts))
        return tf.cond(total > 0, parts.concat, lambda: tf.zeros([0]))


def _as_matrix(w, b, rows, dtype, scale=1.0):
    """A projection's weights as (w [rows, columns] in dtype, b float32 [columns]),
    both multiplied by scale."""
    return tf.cast(tf.reshape(w, [rows, -1]) * scale, dtype), tf.reshape(b * scale, [-1])


def _write_rows(cache, rows, new, in_place=True):
    """cache [B * H * S, K] with new [B, H, K] written at the given rows.

    in_place: InplaceUpdate writes into the cache's own buffer, where a
    scatter copies the whole cache at every step. It never copies, even when
    something else still reads the old value, so it is used only where the
    update is the old cache's last reader: in the decoding loop, each step's
    cache is read by nothing but the next step. XLA has no InplaceUpdate, so
    a compiled decode step uses the scatter.
    """
    new = tf.reshape(new, [-1, tf.shape(cache)[1]])  # [B * H, K]
    if in_place:
        return tf.raw_ops.InplaceUpdate(x=cache, i=rows, v=new)
    return tf.tensor_scatter_nd_update(cache, rows[:, None], new)


def _attend_one(q, k_cache, v_cache, blocked, small=1 << 16):
    """Attention of one (already scaled) query per row and head.

    q [B, H, K]; k_cache, v_cache [B, H, S, K]; blocked [B, S] (0 where
    visible, -1e9 where not) -> [B, H, K].

    Small caches are faster as a broadcast multiply and a sum, large ones
    as a batch of matrix products; the two agree up to rounding.
    """
    def as_sums():
        scores = tf.reduce_sum(q[:, :, None, :] * k_cache, -1) + blocked[:, None, :]  # [B, H, S]
        return tf.reduce_sum(_softmax(scores)[..., None] * v_cache, 2)

    def as_products():
        scores = tf.matmul(q[:, :, None, :], k_cache, transpose_b=True)[:, :, 0, :] + blocked[:, None, :]
        return tf.matmul(_softmax(scores)[:, :, None, :], v_cache)[:, :, 0, :]

    return tf.cond(tf.size(k_cache) <= small, as_sums, as_products)


def _softmax(x):
    """Softmax over the last axis, written out: for these small tensors it is
    faster than the fused kernel."""
    e = tf.exp(x - tf.reduce_max(x, -1, keepdims=True))
    return e / tf.reduce_sum(e, -1, keepdims=True)


def top_k_logits(logits, k, small=64):
    """tf.math.top_k(logits, k) over a vocabulary-sized last axis, faster for small k.

    logits float32 [B, V], k int32 [] in [1, V] -> (values [B, k], indices int32 [B, k]).

    For k <= small the logits are cut into G groups of R neighbours. The k
    largest logits all lie in the k groups with the largest maxima, so a
    top-k over those k * R candidates gives the same values and indices
    (ties, as in tf.math.top_k, go to the lower index).
    """
    v = logits.shape[-1]
    # A group size that divides V avoids padding the logits at every step.
    size = next((r for r in range(128, 63, -1) if v % r == 0), 128)
    groups = -(-v // size)
    if groups <= 2 * small:  # too small a vocabulary to gain anything
        return tuple(tf.math.top_k(logits, k))

    def two_stage():
        batch = tf.shape(logits)[0]
        padded = logits
        if groups * size != v:
            padded = tf.pad(logits, [[0, 0], [0, groups * size - v]], constant_values=-float("inf"))
        table = tf.reshape(padded, [batch, groups, size])  # [B, G, R]
        _, best = tf.math.top_k(tf.reduce_max(table, -1), k)  # [B, k] group ids
        best = tf.sort(best, -1)  # candidates in index order, so ties break as in top_k
        candidates = tf.reshape(tf.gather(table, best, batch_dims=1), [batch, -1])  # [B, k * R]
        values, at = tf.math.top_k(candidates, k)  # [B, k]
        indices = tf.gather(best, at // size, batch_dims=1) * size + at % size
        return values, indices

    return tf.cond(k <= small, two_stage, lambda: tuple(tf.math.top_k(logits, k)))


def _write(history, n, token):
    """history int32 [B, W] with history[b, n[b]] set to token[b]."""
    at = tf.one_hot(n, tf.shape(history)[1], on_value=True, off_value=False)  # [B, W]
    return tf.where(at, token[:, None], history)


# --- export -------------------------------------------------------------------

def next_version(export_base) -> int:
    """1 + the largest integer directory name under export_base (1 if none)."""
    base = Path(export_base)
    versions = [int(p.name) for p in base.iterdir() if p.is_dir() and re.fullmatch(r"\d+", p.name)] \
        if base.is_dir() else []
    return max(versions, default=0) + 1


def export_model(model: GPT, vocab_path, export_base, version: int | None = None) -> Path:
    """Writes a SavedModel with the signatures serving_default, generate and
    score to export_base/<version>/, the layout TensorFlow Serving loads
    (an integer version directory under a model base path).

    version None takes the next integer. The model is written to a temporary
    directory first and renamed, so a server watching export_base never sees
    a half-written version. Returns the version directory.
    """
    base = Path(export_base)
    version = next_version(base) if version is None else int(version)
    if version < 1:
        raise ValueError(f"export version must be a positive integer, got {version}")
    target = base / str(version)
    if target.exists():
        raise FileExistsError(f"export version {target} already exists")
    base.mkdir(parents=True, exist_ok=True)
    partial = base / f".partial-{version}"
    shutil.rmtree(partial, ignore_errors=True)
    sampler = Sampler(model, vocab_path)
    tf.saved_model.save(sampler, str(partial), signatures=sampler.signatures())
    partial.rename(target)
    return target
