"""The key/value cache the loop decodes with: the shared prompt prefix kept between calls (`PrefixCache`), the
prompt groups written in place into one buffer per layer (`Slab`), and layers that grow in place instead of
concatenating (`growing_cache`)."""
from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass, field

from jsonextract.decoding.scheduling import common_prefix
from jsonextract.lazy import lazy

cache_utils = lazy("transformers.cache_utils")
torch = lazy("torch")


@dataclass
class PrefixCache:
    """Keys/values of the prompt start shared by all rows; recomputed only when a batch does not start with it."""
    ids: tuple[int, ...] = ()
    kv: list = field(default_factory=list)  # per layer (keys, values), batch 1
    dtype: object = None  # the cache dtype they were stored in (attention.cache_dtype)
    hits: int = 0  # batches that reused the cached prefix
    misses: int = 0  # batches that computed it

    def for_batch(self, model, prompts: list[list[int]], device, dtype=None) -> int:
        """Length of the cached prefix to use for `prompts` (0: none), computing it if needed."""
        n = common_prefix(prompts)
        n = min(n, min(len(p) for p in prompts) - 1)  # every row keeps at least one token of its own
        if n < 1:
            return 0
        if (self.ids and len(self.ids) <= n and tuple(prompts[0][:len(self.ids)]) == self.ids
                and self.dtype == dtype):
            self.hits += 1
            return len(self.ids)
        with torch.inference_mode():
            out = model(input_ids=torch.tensor([prompts[0][:n]], device=device), use_cache=True, logits_to_keep=1,
                        cache=growing_cache(dtype=dtype))
        self.misses += 1
        self.ids, self.dtype = tuple(prompts[0][:n]), dtype
        self.kv = [(layer.keys, layer.values) for layer in out.cache.layers]
        return n

    def expand(self, batch: int, cache=None):
        """`cache` (by default a new growing one) holding the prefix for `batch` rows."""
        cache = cache if cache is not None else growing_cache(dtype=self.dtype)
        for i, (k, v) in enumerate(self.kv):
            cache.update(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1), i)  # copied once, into room
        return cache


class Slab:
    """The prompt groups' key/value caches as one buffer pair per layer, [rows, heads, width, head_dim], the groups'
    rows one after another: group g's cache writes in place from position `holes[g]` on (its masked holes, zeros,
    come first: attention reads keys by mask, not by place), so the groups' caches are already the joined cache of
    all rows. Joining them by concatenation instead would copy every layer's cache three times into fresh memory."""

    def __init__(self, sizes: list[int], holes: list[int], width: int, dtype=None):
        self.sizes, self.holes, self.width, self.dtype = sizes, holes, width, dtype
        self.starts = [sum(sizes[:g]) for g in range(len(sizes))]
        self.buffers = []  # per layer (keys, values), allocated at the layer's first write

    def layer(self, i: int, like):
        if i == len(self.buffers):
            shape = (sum(self.sizes), like.shape[1], self.width, like.shape[3])
            bufs = tuple(like.new_empty(shape, dtype=self.dtype or like.dtype) for _ in range(2))
            for start, n, h in zip(self.starts, self.sizes, self.holes):  # never written, but read: 0 * NaN = NaN
                for b in bufs:
                    b[start:start + n, :, :h].zero_()
            self.buffers.append(bufs)
        return self.buffers[i]

    def group(self, g: int):
        """Group g's cache: growing layers over its rows of the buffers, from its first position after the holes."""
        rows, h = slice(self.starts[g], self.starts[g] + self.sizes[g]), self.holes[g]
        index = itertools.count()  # Cache makes its layers in order, one per layer index
        return cache_utils.Cache(layer_class_to_replicate=lambda: growing_layer_class(self.dtype)(
            room=lambda like, i=next(index): tuple(b[rows, :, h:] for b in self.layer(i, like))))

    def joined(self, length: int):
        """The cache of every row: the buffers' first `length` positions, growing in place from there."""
        layers = []
        for k, v in self.buffers:
            layer = growing_layer_class(self.dtype)()
            layer.seed(k, v, length)
            layers.append(layer)
        return cache_utils.Cache(layers=layers)


def growing_cache(dtype=None):
    """An empty cache whose layers grow in place (`GrowingLayer`), storing keys and values in `dtype` (None: as
    the layers compute them)."""
    return cache_utils.Cache(layer_class_to_replicate=growing_layer_class(dtype))


@functools.lru_cache(maxsize=4)
def growing_layer_class(dtype=None):
    class GrowingLayer(cache_utils.DynamicLayer):
        """Keys and values in buffers with room to grow along the sequence: a pass writes its positions in place
        and the layer hands out views, where transformers' DynamicLayer concatenates, copying the whole cache of
        every layer on every pass. With a `store_dtype`, each
        pass's new positions are rounded to it on the way in (a bf16 cache for attention.HALF)."""
        store_dtype = dtype

        def __init__(self, room=None):
            super().__init__()
            self._room = room  # called with the first keys written: the (keys, values) buffers to grow in

        def seed(self, k, v, length: int) -> None:
            """Grow in the buffers `k` and `v`, whose first `length` positions are filled."""
            self.device, self.is_initialized, self._room = k.device, True, None
            self._k, self._v = k, v
            self.keys, self.values = k[:, :, :length], v[:, :, :length]

        def update(self, key_states, value_states, *args, **kwargs):
            if self.store_dtype is not None:
                key_states, value_states = key_states.to(self.store_dtype), value_states.to(self.store_dtype)
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
                self._k, self._v = self._room(key_states) if self._room is not None else (None, None)
            n, t = self.get_seq_length(), key_states.shape[-2]
            with torch.inference_mode():  # an inference-only cache: its buffers may be made in or out of it
                if self._k is None or n + t > self._k.shape[-2]:
                    self._k, self._v = (_with_room(old, new, n, n + t + max(64, n // 2))
                                        for old, new in ((self.keys, key_states), (self.values, value_states)))
                self._k[:, :, n:n + t] = key_states
                self._v[:, :, n:n + t] = value_states
            self.keys, self.values = self._k[:, :, :n + t], self._v[:, :, :n + t]
            return self.keys, self.values

        def batch_select_indices(self, indices) -> None:
            n = self.get_seq_length()
            if not n:
                return
            dst = torch.nonzero(indices != torch.arange(len(indices), device=indices.device)).flatten()
            with torch.inference_mode():
                if len(dst) and int(indices[dst].min()) >= len(indices):  # `fill_holes` order: move only those
                    for buf in (self._k, self._v):
                        buf[dst, :, :n] = buf[indices[dst], :, :n]
                    self._k, self._v = self._k[:len(indices)], self._v[:len(indices)]
                else:
                    self._k, self._v = self._k[indices], self._v[indices]
            self.keys, self.values = self._k[:, :, :n], self._v[:, :, :n]

    return GrowingLayer


def _with_room(old, new, n: int, capacity: int):
    """A [batch, heads, capacity, dim] buffer shaped like `new`, holding the first `n` positions of `old`."""
    buf = new.new_empty(*new.shape[:2], capacity, new.shape[3])
    if n:
        buf[:, :, :n] = old[:, :, :n]
    return buf
