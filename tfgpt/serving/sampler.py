"""The in-graph sampler: the `generate`, `serving_default` and `score`
functions of the exported SavedModel, their input checks, and the
generation loop.

`Sampler` wraps a trained `GPT` and its tokenizer (the word one of
vocab.txt or the subword one of subword.json). Its `tf.function`s take
and return plain tensors (strings in, strings and numbers out), so the
exported SavedModel runs on TensorFlow alone:

  generate(prompt, max_tokens, top_k, top_p, temperature,
           repetition_penalty, seed) -> text, completion, token_ids, lengths
      every input has the batch dimension N (one value per prompt), so
      that TensorFlow Serving can batch requests by concatenating them
  serving_default(prompt)   generate with 40 tokens, top-k 10, top-p 1,
                            temperature 1, no penalty, a fresh seed per row
  score(text) -> log_prob, num_tokens, perplexity

How a batch is generated (in `tf.while_loop`s):

  1. The prompts are tokenized and right-padded. The last `maxlen` tokens of
     each prompt are its context; the whole prompt is still returned as text.
  2. One pass over the contexts fills a preallocated key/value cache per
     layer (`GPT.prefill`, the decode step's arithmetic) and gives each
     row's hidden state at its own last token.
  3. Each step turns the hidden states into logits, picks one token per
     row with the row's settings and random numbers (`tfgpt.serving.sampling`),
     appends it to the row's history, and computes the next hidden states.
     While a row fits in `maxlen` positions this is one position's
     attention against the cache (`tfgpt.serving.decode.cached_hidden`);
     past `maxlen` the row runs the model again over its last `maxlen`
     tokens (`tfgpt.serving.decode.window_hidden`). A first loop, whose step
     is the cached one alone, runs while every row will still fit after its
     next token; a second one, whose step can also run windows
     (`tfgpt.serving.decode.next_hidden`), takes over from there.
  4. A row ends when it samples the padding id 0 (the end of a review) or
     has its max_tokens; the loop ends when every row has ended, at most
     after the largest max_tokens of the batch.

A row's result depends on its own prompt, settings and seed only: the
random numbers are per row (`tfgpt.serving.sampling.row_uniforms`), nothing a row
computes reads another row, and the decode step's kernels are the same
whatever the batch's size (in float32 a one-row request runs as two rows,
see `_generate`; exp and rsqrt stay in their vector kernels,
`tfgpt.model.batch_invariant`), so that its sums are added in the same order.

Shapes: N = B = batch, C = context length (<= maxlen), L = maxlen, S = cache
slots, W = history width, V = vocabulary, D = model width.
"""

from __future__ import annotations

import tensorflow as tf

from tfgpt.model.loss import token_log_probs
from tfgpt.serving import decode, sampling, tokenizers

# The most tokens one request may generate per prompt, and the most prompts
# (or texts to score) one request may hold. Larger requests are refused with
# an InvalidArgumentError instead of exhausting memory.
MAX_TOKENS = 1024
MAX_BATCH = 1024

# The settings `serving_default` uses: the Keras example's.
DEFAULTS = {"max_tokens": 40, "top_k": 10, "top_p": 1.0, "temperature": 1.0, "repetition_penalty": 1.0}

# Windows per step when `score` slides over long texts, and rows per step
# when it turns hidden states into log-probabilities.
SCORE_WINDOWS = 64
SCORE_ROWS = 512

SIGNATURES = ("serving_default", "generate", "score")

# The inputs of `generate`, in order, each with its batch dimension.
GENERATE_INPUTS = (
    tf.TensorSpec([None], tf.string, name="prompt"),
    tf.TensorSpec([None], tf.int32, name="max_tokens"),
    tf.TensorSpec([None], tf.int32, name="top_k"),
    tf.TensorSpec([None], tf.float32, name="top_p"),
    tf.TensorSpec([None], tf.float32, name="temperature"),
    tf.TensorSpec([None], tf.float32, name="repetition_penalty"),
    tf.TensorSpec([None], tf.int64, name="seed"),
)


def refuse_rows(bad, message: str, values=None):
    """A tensor to depend on that fails, if any row is bad, with one
    InvalidArgumentError line: "<message>; row R has V" for the first bad
    row R (its value V from `values`, if given), else "<message>; row R".

    bad bool [B]; values [B] or None. The message is built only when a row
    is bad (inside the branch), so a good batch pays one reduction.
    """

    def fail():
        row = tf.argmax(tf.cast(bad, tf.int32), output_type=tf.int32)
        if values is None:
            text = tf.strings.format(message + "; row {}", [row])
        else:
            text = tf.strings.format(message + "; row {} has {}", [row, tf.gather(values, row)])
        with tf.control_dependencies([tf.debugging.Assert(False, [text])]):
            return tf.constant(True)

    return tf.cond(tf.reduce_any(bad), fail, lambda: tf.constant(True))


class Sampler(tf.Module):
    """A GPT plus its tokenizer, with in-graph `generate`, `serving_default`
    and `score` functions.

    model: the trained GPT (its variables may be mirrored over devices).
    vocab_path: the tokenizer's file, which becomes an asset of the
      SavedModel: a vocabulary file (`tfgpt.data.text.write_vocab`) for the
      word tokenizer, subword.json for the subword one
      (`tfgpt.serving.tokenizers`). A word prompt and its completion are
      joined by a space (the words are); a subword text is its tokens'
      bytes, in order, so the prompt keeps its own spacing.
    frozen: the model's weights will not change any more (an export): the
      decode step's matrices are prepared once, here, instead of at every
      call (`tfgpt.serving.decode.DecodeWeights`).
    """

    def __init__(self, model: tf.Module, vocab_path, frozen: bool = False, name="sampler"):
        super().__init__(name=name)
        self.model = model
        self.weights = decode.DecodeWeights(model, frozen)
        # The tables are created here, outside any tf.function, so that the
        # SavedModel tracks them and carries the tokenizer's file as an asset.
        self.tokenizer = tokenizers.load(vocab_path)
        self.subword = tokenizers.kind_of(vocab_path) == "subword"
        self.maxlen = model.config.maxlen
        self.vocab_size = model.config.vocab_size

    # --- the exported functions -------------------------------------------------

    @tf.function(input_signature=GENERATE_INPUTS)
    def generate(self, prompt, max_tokens, top_k, top_p, temperature, repetition_penalty, seed):
        """Continues each prompt with its own settings.

        Every input is [N], one entry per prompt:
          prompt string; max_tokens int32 in [0, MAX_TOKENS]; top_k int32
          (clamped to [1, V]; >= V: off); top_p float32 (>= 1: off, <= 0:
          the most likely token); temperature float32 (<= 0: greedy);
          repetition_penalty float32 > 0 (1: off); seed int64.
        Returns a dict:
          text string [N]: prompt and completion (word: joined by a space;
            subword: the prompt as given, then the completion)
          completion string [N]: the generated tokens only
          token_ids int32 [N, S]: the generated ids, 0-padded (S = the longest row)
          lengths int32 [N]: generated tokens per row (the ending 0 not counted)
        """
        return self._generate(prompt, max_tokens, top_k, top_p, temperature, repetition_penalty, seed)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="prompt")])
    def serving_default(self, prompt):
        """`generate` with the Keras example's settings and a new random seed per row."""
        n = tf.shape(prompt)[0]

        def fill(name, dtype):
            return tf.fill([n], tf.constant(DEFAULTS[name], dtype))

        seed = tf.random.uniform([n], minval=0, maxval=tf.int64.max, dtype=tf.int64)
        return self._generate(
            prompt,
            fill("max_tokens", tf.int32),
            fill("top_k", tf.int32),
            fill("top_p", tf.float32),
            fill("temperature", tf.float32),
            fill("repetition_penalty", tf.float32),
            seed,
        )

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="text")])
    def score(self, text):
        """How likely each text is under the model.

        text string [N], each of at least two tokens. Returns a dict:
          log_prob float32 [N]: sum of log p(token | the tokens before it), over
            every token but the first; a token more than `maxlen` positions in
            sees the `maxlen` tokens before it, as in generation
          num_tokens int32 [N]: how many tokens were scored (tokens - 1)
          perplexity float32 [N]: exp(-log_prob / num_tokens)
        """
        ids = self._tokenize(text, "text")
        n = tf.cast(ids.row_lengths(), tf.int32)  # [N]
        with tf.control_dependencies([refuse_rows(n < 2, "every text to score needs at least two tokens", n)]):
            dense = tf.identity(ids.to_tensor())  # [N, T]
        log_prob = self._score_first_window(dense, n) + self._score_slides(dense, n)
        num = n - 1
        return {
            "log_prob": log_prob,
            "num_tokens": num,
            "perplexity": tf.exp(-log_prob / tf.cast(num, tf.float32)),
        }

    def signatures(self) -> dict:
        """The functions to export, by signature name: the tf.functions
        themselves (each has its input signature), which the SavedModel
        writer traces once. Concrete functions traced before it would be
        traced again inside it (its tracing is keyed apart), doubling an
        export's time."""
        return {name: getattr(self, name) for name in SIGNATURES}

    # --- input ------------------------------------------------------------------

    def _tokenize(self, strings, what):
        """string [N] -> ragged int32 [N, None], after checking the batch size.

        Any bytes are accepted: what is not UTF-8 becomes U+FFFD, and for
        the word tokenizer NUL becomes a space (lowercasing would otherwise
        cut the string there)."""
        with tf.control_dependencies(
            [
                tf.debugging.Assert(
                    tf.size(strings) <= MAX_BATCH, [f"at most {MAX_BATCH} {what}s per request; got", tf.size(strings)]
                )
            ]
        ):
            strings = tf.strings.unicode_transcode(strings, "UTF-8", "UTF-8", errors="replace", replacement_char=0xFFFD)
        if self.subword:
            return self.tokenizer(strings)
        return self.tokenizer(tf.strings.regex_replace(strings, r"\x00", " "))

    def _checks(self, prompt, lengths, settings):
        """The refusals of `generate`: inputs whose batch differs from the
        prompts', and per row, the first bad value of each input."""
        n = tf.shape(prompt)[0]
        checks = [
            tf.debugging.Assert(
                tf.shape(value)[0] == n,
                [
                    tf.strings.format(
                        name + " has {} rows and prompt {}: every input needs one row per prompt",
                        [tf.shape(value)[0], n],
                    )
                ],
            )
            for name, value in settings.items()
        ]
        with tf.control_dependencies(checks):  # the per-row checks index rows of every input
            mt, t = settings["max_tokens"], settings["temperature"]
            top_p, penalty = settings["top_p"], settings["repetition_penalty"]
            finite = tf.math.is_finite
            return checks + [
                refuse_rows(
                    lengths == 0,
                    "every prompt needs at least one token"
                    if self.subword
                    else "every prompt needs at least one word after standardization",
                ),
                refuse_rows((mt < 0) | (mt > MAX_TOKENS), f"max_tokens must be between 0 and {MAX_TOKENS}", mt),
                refuse_rows(~finite(t), "temperature must be a finite number", t),
                refuse_rows(~finite(top_p), "top_p must be a finite number (1 = off)", top_p),
                refuse_rows(
                    ~finite(penalty) | (penalty <= 0),
                    "repetition_penalty must be a finite number above 0 (1 = off)",
                    penalty,
                ),
            ]

    def _generate(self, prompt, max_tokens, top_k, top_p, temperature, repetition_penalty, seed):
        ids = self._tokenize(prompt, "prompt")
        lengths = tf.cast(ids.row_lengths(), tf.int32)  # [N]
        settings = {
            "max_tokens": max_tokens,
            "top_k": top_k,
            "top_p": top_p,
            "temperature": temperature,
            "repetition_penalty": repetition_penalty,
            "seed": seed,
        }
        with tf.control_dependencies(self._checks(prompt, lengths, settings)):
            # Past maxlen tokens only the last maxlen can be seen by the model.
            context = tf.identity(ids[:, -self.maxlen :].to_tensor())  # [N, C]
            # Nothing reads a setting before the checks have passed.
            s = {name: tf.identity(value) for name, value in settings.items()}
        # In float32 a request of one row runs as two, the second a copy that
        # generates nothing: oneDNN multiplies a single float32 row with
        # another kernel than several (a matrix-vector product), whose sums
        # round differently, and a row must give the same numbers alone as
        # batched with others. Its bfloat16 products give a row the same bits
        # at any batch size, and the second row would cost a batch-1 request
        # a slower kernel.
        rows = tf.shape(context)[0]
        single = tf.equal(rows, 1) if self.model.compute_dtype == tf.float32 else tf.constant(False)
        copy = tf.cast(single, tf.int32)  # [] 1: add the copy

        def two(x):
            return tf.concat([x, x[:copy]], 0)

        token_ids, num = self._sample(
            two(context),
            two(tf.minimum(lengths, self.maxlen)),
            tf.concat([s["max_tokens"], tf.zeros([copy], tf.int32)], 0),
            sampling.plan(two(s["top_k"]), two(s["top_p"]), two(s["temperature"]), self.vocab_size),
            two(s["repetition_penalty"]),
            two(s["seed"]),
        )
        token_ids, num = token_ids[:rows], num[:rows]
        prompt_text = self.tokenizer.detokenize(ids.to_tensor())
        completion = self.tokenizer.detokenize(token_ids)
        if self.subword:  # the tokens' bytes in order: the text's own spacing
            text = tf.strings.join([prompt_text, completion])
        else:
            text = tf.where(completion == "", prompt_text, tf.strings.join([prompt_text, completion], separator=" "))
        return {"text": text, "completion": completion, "token_ids": token_ids, "lengths": num}

    # --- the generation loop ----------------------------------------------------

    def _sample(self, context, context_len, max_tokens, plan, penalty, seed):
        """The sampling loop.

        context int32 [B, C] (right-padded), context_len int32 [B] (>= 1),
        max_tokens int32 [B], plan from `sampling.plan`, penalty float32 [B],
        seed int64 [B]. Returns (token_ids int32 [B, S], lengths int32 [B]):
        the generated ids, 0-padded to S = the longest row.
        """
        batch, c = tf.shape(context)[0], tf.shape(context)[1]
        steps = tf.reduce_max(tf.concat([max_tokens, [0]], 0))
        # Each row's tokens so far (context, then generated) in one buffer, at
        # least L wide so that a full window can always be read from it. Past
        # a row's tokens it holds the row's first token: the buffer is also
        # the list of ids the repetition penalty reads, where a repeat is
        # harmless and a 0 would penalise the end of the review.
        width = tf.maximum(c + steps, self.maxlen)
        column = tf.range(width)[None, :]  # [1, W]
        first = tf.pad(context, [[0, 0], [0, 1]])[:, :1]  # [B, 1] (also when C = 0: an empty batch)
        history = tf.where(column < context_len[:, None], tf.pad(context, [[0, 0], [0, width - c]]), first)  # [B, W]
        # A row uses the cache while it fits in L positions.
        slots = decode.cache_slots(context_len + max_tokens, self.maxlen)
        weights = self.weights()
        hidden, caches = self.model.prefill(context, context_len, slots, weights)
        setup = decode.decode_setup(self.model, batch, slots, weights)
        uniforms = sampling.row_uniforms(seed, steps)  # [B, steps]
        penalised = tf.reduce_any(penalty != 1.0)
        offsets = tf.broadcast_to(tf.range(batch)[:, None] * self.vocab_size, [batch, width])  # [B, W]
        n = context_len  # [B] tokens in each row's history
        done = max_tokens <= 0  # [B]

        def more(i, hidden, caches, history, n, done):
            return (i < steps) & ~tf.reduce_all(done)

        def make_step(next_hidden, any_way):
            """The loop's step, with next_hidden for the next hidden states;
            any_way: `sampling.pick` with the branches of every way of
            choosing a token, else the fast way's only."""

            def step(i, hidden, caches, history, n, done):
                # The output layer runs here only, on each row's newest hidden
                # state: one matrix product per step.
                logits = decode.logits(hidden, weights)  # [B, V]
                logits = tf.cond(
                    penalised, lambda: sampling.penalize(logits, history, penalty, offsets), lambda: logits
                )
                token = sampling.pick(logits, plan, uniforms[:, i : i + 1], any_way)
                token = tf.where(done, 0, token)  # [B]
                history = _write(history, n, token)
                ended = token == 0
                n += tf.cast(~done & ~ended, tf.int32)
                done = done | ended | (i + 1 >= max_tokens)
                # No hidden state is needed for a row that has ended.
                hidden, caches = next_hidden(token, n, ~done, hidden, caches, history)
                return i + 1, hidden, caches, history, n, done

            return step

        def cached(token, n, live, hidden, caches, history):
            return decode.cached_hidden(self.model, token, n, caches, setup)

        def general(token, n, live, hidden, caches, history):
            return decode.next_hidden(self.model, token, n, live, hidden, caches, history, setup)

        def fits(i, hidden, caches, history, n, done):
            return more(i, hidden, caches, history, n, done) & tf.reduce_all(done | (n < self.maxlen))

        def loops(any_way):
            state = (tf.constant(0), hidden, caches, history, n, done)
            # First, while every row will still fit in L positions after the
            # next token, a loop whose step is the cached decode alone,
            # without the general step's branches (which cost time at every
            # step).
            state = tf.while_loop(fits, make_step(cached, any_way), state)
            # Then the general step, in which rows may decode from the cache
            # or run a window.
            _, _, _, history_out, n_out, _ = tf.while_loop(more, make_step(general, any_way), state)
            return history_out, n_out

        # The loops twice: for requests whose every row takes the fast way of
        # choosing its token (`sampling.plan`), a step without the branches
        # the other ways need.
        history, n = tf.cond(plan["fast"], lambda: loops(False), lambda: loops(True))
        lengths = n - context_len  # [B]
        columns = tf.range(tf.reduce_max(tf.concat([lengths, [0]], 0)))  # [S]
        index = tf.minimum(context_len[:, None] + columns[None, :], width - 1)  # [B, S]
        token_ids = tf.gather(history, index, batch_dims=1)
        token_ids = tf.where(columns[None, :] < lengths[:, None], token_ids, 0)  # [B, S]
        return token_ids, lengths

    # --- scoring ------------------------------------------------------------------

    def _score_first_window(self, dense, n):
        """Sum of log p over the tokens at positions 1 .. min(n, L) - 1, which all
        come from one pass over each text's first L tokens.

        dense int32 [B, T] (0-padded), n int32 [B] -> float32 [B].
        """
        first = dense[:, : self.maxlen]  # [B, T0]
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
            index = tf.stack(
                [tf.repeat(r[:, None], size, axis=1), i[:, None] - size + tf.range(size)[None, :]], -1
            )  # [P, L, 2]
            window = tf.gather_nd(dense, index)  # [P, L]
            last = self.model.hidden(window)[:, -1]  # [P, D]
            log_p = self._log_probs(last, tf.gather_nd(dense, tf.stack([r, i], -1)))
            return end, acc + tf.math.unsorted_segment_sum(log_p, r, tf.shape(dense)[0])

        _, acc = tf.while_loop(more, step, (tf.constant(0), tf.zeros([tf.shape(dense)[0]])))
        return acc

    def _log_probs(self, hidden, targets):
        """log softmax(head(hidden))[target] (the loss's `token_log_probs`),
        SCORE_ROWS rows at a time, so the [rows, V] logits never grow with the
        input.

        hidden float32 [N, D], targets int32 [N] -> float32 [N].
        """
        total = tf.shape(targets)[0]

        def more(j, out):
            return j < total

        def step(j, out):
            end = tf.minimum(j + SCORE_ROWS, total)
            logits = self.model.head(hidden[j:end])  # [R, V]
            return end, out.write(out.size(), token_log_probs(logits, targets[j:end]))

        parts = tf.TensorArray(
            tf.float32, size=0, dynamic_size=True, infer_shape=False, element_shape=tf.TensorShape([None])
        )
        _, parts = tf.while_loop(more, step, (tf.constant(0), parts))
        return tf.cond(total > 0, parts.concat, lambda: tf.zeros([0]))


def _write(history, n, token):
    """history int32 [B, W] with history[b, n[b]] set to token[b]."""
    at = tf.one_hot(n, tf.shape(history)[1], on_value=True, off_value=False)  # [B, W]
    return tf.where(at, token[:, None], history)
