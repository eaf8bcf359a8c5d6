"""The example's model in PyTorch, for comparing training speed on the same
machine: `python -m benchmarks.peer_torch [--compile] [--steps N]`.

Needs PyTorch, which tfgpt does not depend on: run it with a Python that has
`torch` installed. The model is the Keras example's (token and position
embeddings, one post-layer-norm block of 2 heads of key size 256, feed-forward
256, dropout 0.1, a dense output over 20,000 words, 80 positions), trained
with Adam on random windows at the global batch 128 x 80. Prints one JSON
line: the median step time after the warm-up steps and tokens/s.

`--compile` runs the step under `torch.compile` (inductor's C++ kernels). On
an AVX-512 CPU, `--isa avx2` makes PyTorch use its AVX2 kernels, as
`ONEDNN_MAX_CPU_ISA=AVX2` does for TensorFlow: the matrix products (MKL) and
the compiled element-wise kernels.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

VOCAB, MAXLEN, WIDTH, HEADS, KEY, FF, BATCH = 20000, 80, 256, 2, 256, 256, 128


def build(torch):
    nn = torch.nn

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.q = nn.Linear(WIDTH, HEADS * KEY)
            self.k = nn.Linear(WIDTH, HEADS * KEY)
            self.v = nn.Linear(WIDTH, HEADS * KEY)
            self.o = nn.Linear(HEADS * KEY, WIDTH)
            self.ln1 = nn.LayerNorm(WIDTH, eps=1e-6)
            self.ln2 = nn.LayerNorm(WIDTH, eps=1e-6)
            self.fc1 = nn.Linear(WIDTH, FF)
            self.fc2 = nn.Linear(FF, WIDTH)
            self.drop = nn.Dropout(0.1)

        def forward(self, x):  # x [B, T, D]
            b, t, _ = x.shape

            def heads(z):  # [B, T, H*K] -> [B, H, T, K]
                return z.view(b, t, HEADS, KEY).transpose(1, 2)

            a = torch.nn.functional.scaled_dot_product_attention(
                heads(self.q(x)), heads(self.k(x)), heads(self.v(x)), is_causal=True
            )
            a = self.o(a.transpose(1, 2).reshape(b, t, HEADS * KEY))
            x = self.ln1(x + self.drop(a))
            f = self.fc2(torch.relu(self.fc1(x)))
            return self.ln2(x + self.drop(f))

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok = nn.Embedding(VOCAB, WIDTH)
            self.pos = nn.Embedding(MAXLEN, WIDTH)
            self.block = Block()
            self.out = nn.Linear(WIDTH, VOCAB)

        def forward(self, ids):  # ids [B, T] -> logits [B, T, V]
            x = self.tok(ids) + self.pos(torch.arange(ids.shape[1]))[None]
            return self.out(self.block(x))

    return Model()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="peer_torch", description=__doc__.splitlines()[0])
    parser.add_argument("--compile", action="store_true", help="torch.compile the training step")
    parser.add_argument("--steps", type=int, default=14, help="steps in all (default: 14)")
    parser.add_argument("--warmup", type=int, default=4, help="steps left out of the median (default: 4)")
    parser.add_argument("--isa", choices=["native", "avx2"], default="native")
    args = parser.parse_args(argv)
    if args.isa == "avx2":  # read when the libraries load, so before `import torch`
        os.environ["MKL_ENABLE_INSTRUCTIONS"] = "AVX2"
        os.environ["ONEDNN_MAX_CPU_ISA"] = "AVX2"
        os.environ["ATEN_CPU_CAPABILITY"] = "avx2"
    import torch  # lazy: only this benchmark needs PyTorch, and the ISA settings must come first

    if args.isa == "avx2":
        import torch._inductor.config as inductor  # lazy: as above

        inductor.cpp.simdlen = 256  # AVX2 vectors in the compiled kernels
    torch.manual_seed(0)
    model = build(torch)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step(x, y):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x).reshape(-1, VOCAB), y.reshape(-1))
        loss.backward()
        opt.step()
        return loss

    run = torch.compile(step) if args.compile else step
    windows = torch.randint(2, VOCAB, (args.steps, BATCH, MAXLEN + 1))
    times = []
    for i in range(args.steps):
        t0 = time.perf_counter()
        run(windows[i, :, :-1], windows[i, :, 1:]).item()
        times.append(time.perf_counter() - t0)
    timed = sorted(times[args.warmup :])
    median = timed[len(timed) // 2] if len(timed) % 2 else sum(timed[len(timed) // 2 - 1 : len(timed) // 2 + 1]) / 2
    print(
        json.dumps(
            dict(
                system="torch.compile" if args.compile else "torch eager",
                torch=torch.__version__,
                isa=args.isa,
                threads=torch.get_num_threads(),
                ms_per_step=1000 * median,
                tokens_per_s=BATCH * MAXLEN / median,
            )
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
