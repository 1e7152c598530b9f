"""Sequence parallelism: one image's transformer pass spread over the ranks of an `mx.distributed` group.

Each rank keeps 1/N of the text tokens and 1/N of the image tokens (its shard of the joint sequence),
computes q, k and v for them only, and all-gathers k and v once per block so its queries attend to the
whole sequence. Everything per token (the matmuls, MLPs, norms, rope, residuals) runs on the shard; the
modulations are per image, so every rank computes them whole. At the end each rank's velocity rows are
all-gathered back into the full image, so every rank steps the same latents.

Why all_gather and not send/recv: MLX 0.32's NCCL backend has no send/recv and its ring backend has no
sum_scatter or all-to-all, but both have all_gather (checked on the installed MLX, docs/PERFORMANCE.md).
The gathered k and v are put back in the single-process token order (text then image), so attention
sums over exactly the same keys in the same order as one process does.

A shard length that does not divide is padded with zeros at the end of the text and the image; the
padding rows are cut from the gathered k and v before attention, so they never reach a real token.
"""

import math
from dataclasses import dataclass, field

import mlx.core as mx


@dataclass
class SequenceParallel:
    group: "mx.distributed.Group"
    sent_bytes: int = 0  # bytes this rank has passed to all_gather so far (the volume check)
    _txt: int = field(default=0, init=False)  # full text length S of the current pass
    _img: int = field(default=0, init=False)  # full image length L

    @property
    def rank(self) -> int:
        return self.group.rank()

    @property
    def size(self) -> int:
        return self.group.size()

    def shard(
        self, img: mx.array, txt: mx.array, pe: tuple[mx.array, mx.array]
    ) -> tuple[mx.array, mx.array, tuple[mx.array, mx.array]]:
        """This rank's image rows (B, l, C), text rows (B, s, C) and rope rows (text then image)."""
        S, L = txt.shape[1], img.shape[1]
        self._txt, self._img = S, L
        pe = tuple(mx.concatenate([self._slice(t[:, :S], S), self._slice(t[:, S:], L)], axis=1) for t in pe)
        return self._slice(img, L), self._slice(txt, S), pe

    def gather_kv(self, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array]:
        """Every rank's k and v (B, s + l, H, D) -> the whole sequence's (B, S + L, H, D), text then image."""
        kv = mx.stack([k, v], axis=2)  # (B, s+l, 2, H, D): one collective per block, not two
        B, n = k.shape[0], self.size
        s = _shard_len(self._txt, n)
        every = self._all_gather(kv).reshape(n, B, *kv.shape[1:])  # (N, B, s+l, 2, H, D)
        txt = _unshard(every[:, :, :s], self._txt)
        img = _unshard(every[:, :, s:], self._img)
        whole = mx.concatenate([txt, img], axis=1)  # (B, S+L, 2, H, D)
        return whole[:, :, 0], whole[:, :, 1]

    def gather_image(self, x: mx.array) -> mx.array:
        """Every rank's image rows (B, l, C) -> (B, L, C)."""
        every = self._all_gather(x).reshape(self.size, *x.shape)
        return _unshard(every, self._img)

    def step_bytes(
        self, batch: int, txt_len: int, img_len: int, hidden: int, out: int, blocks: int, itemsize: int
    ) -> int:
        """Bytes this rank passes to all_gather in one transformer pass: its k and v shard per block,
        then its velocity rows. A ring all_gather moves (N - 1) times this through each rank's link."""
        s, l = _shard_len(txt_len, self.size), _shard_len(img_len, self.size)
        return itemsize * batch * (blocks * (s + l) * 2 * hidden + l * out)

    def _slice(self, x: mx.array, length: int) -> mx.array:
        n = _shard_len(length, self.size)
        start = self.rank * n
        rows = x[:, start : min(start + n, length)]
        pad = n - rows.shape[1]
        if pad:
            rows = mx.concatenate([rows, mx.zeros((x.shape[0], pad, *x.shape[2:]), x.dtype)], axis=1)
        return rows

    def _all_gather(self, x: mx.array) -> mx.array:
        self.sent_bytes += x.nbytes
        return mx.distributed.all_gather(x, group=self.group)


def _shard_len(length: int, n: int) -> int:
    return math.ceil(length / n)


def _unshard(every: mx.array, length: int) -> mx.array:
    """(N, B, n, ...) shards in rank order -> (B, length, ...), the padding cut."""
    N, B, n = every.shape[:3]
    whole = mx.swapaxes(every, 0, 1).reshape(B, N * n, *every.shape[3:])
    return whole[:, :length]


def shard_rows(count: int, rank: int, size: int) -> list[int]:
    """Data parallelism: the rows (images) of a request that `rank` of `size` makes, every size-th one.
    Noise comes from each image's seed, never the rank, so each image equals a single process's."""
    return list(range(rank, count, size))


def average_gradients(grads, group: "mx.distributed.Group"):
    """Data-parallel training: the mean of every rank's gradients, in one all_sum. With each rank's loss
    the mean over its B rows, N ranks then step exactly as one process with the N*B rows would."""
    from mlx.utils import tree_flatten, tree_unflatten

    n = group.size()
    if n == 1:
        return grads
    flat = tree_flatten(grads)
    summed = all_sum_arrays([g for _, g in flat], group, divide=n)
    return tree_unflatten([(name, g) for (name, _), g in zip(flat, summed)])


def all_sum_arrays(
    arrays: list[mx.array], group: "mx.distributed.Group", dtype=mx.float32, divide: int = 1
) -> list[mx.array]:
    """Each array summed over the ranks (then divided by `divide`), shapes and dtypes kept: one all_sum
    of `dtype` for the whole list, since a LoRA has hundreds of small tensors."""
    joined = mx.concatenate([a.astype(dtype).reshape(-1) for a in arrays])
    joined = mx.distributed.all_sum(joined, group=group)
    if divide != 1:
        joined = joined / divide
    out, start = [], 0
    for a in arrays:
        out.append(joined[start : start + a.size].reshape(a.shape).astype(a.dtype))
        start += a.size
    return out
