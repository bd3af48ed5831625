"""Router statistics of FM layers over a window of tokens: entropy, dead rows, max/mean load, usage heatmap.

Torch only (no DeepSpeed, no MLflow): the FM layer hands its routing weights to a `RouterStatsAccumulator`
every step; the trainer reads `compute()` at its log interval and logs the result as metrics
`router/layer<i>/<stat>` (`metric_key`). `plot_usage_heatmap` draws the window's row usage (layer x row).

Input: the routing weights of one layer, `weights (..., H, m)` with any leading token dims: the dense softmax
over the m memory rows of each head, or the sparse variant's top-k weights scattered into m rows (zeros
elsewhere; `fm.py: route` returns exactly this as `a`), optionally with the kept row indices `rows (..., H, k)`.

Definitions, per layer, over the tokens of the window (a mask can leave tokens out):

- `entropy`: mean over tokens and heads of the routing distribution's entropy, `-sum_r w_r log w_r` in nats.
  A collapsed router (every token to one row) gives 0, a uniform dense one `log(m)`; a top-k router at most
  `log(k)` (its renormalised k weights are the distribution the layer uses).
- `dead_rows`: rows never selected in the window, counted per head and **averaged over the heads** (so it is
  comparable across layers and between 0 and m - 1; multiply by H for the layer's total). "Selected": for the
  sparse variant (given `rows`, or weights that are exactly zero outside the kept rows), being among a token's
  top-k; for the dense softmax, where every row gets some weight, receiving at least `alive_share / m` of a
  token's weight (default a tenth of the uniform share 1/m) from at least one token.
- `max_load`: the busiest row's share of the window's routing mass (the sum of the weights it received over
  the sum over all rows), averaged over heads: 1/m when perfectly balanced, 1 when collapsed.
- `mean_load`: the mean share of the rows that are not dead, averaged over heads: 1/(m - dead rows).
  `max_load / mean_load` is the imbalance among the live rows (1: balanced).

The accumulator keeps sums on the weights' device and never synchronises with the host in `update`
(no `.item()`, no boolean indexing), so calling it every step costs a few reductions; `compute` moves the
sums to the host once (optionally all-reducing them over a process group first) and resets the window.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch

ROUTER_STATS = ("entropy", "dead_rows", "max_load", "mean_load")
METRIC_PREFIX = "router"
DEFAULT_ALIVE_SHARE = 0.1


def metric_key(layer: int, stat: str) -> str:
    """The MLflow metric name of one statistic of one layer, e.g. `router/layer3/entropy`."""
    if stat not in ROUTER_STATS:
        raise ValueError(f"unknown router statistic '{stat}'; choose from {ROUTER_STATS}")
    return f"{METRIC_PREFIX}/layer{layer}/{stat}"


def routing_entropy(weights: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of each routing distribution: (..., H, m) -> (..., H); zero weights contribute 0."""
    w = weights.detach().float()
    return -torch.special.xlogy(w, w).sum(-1)


def selected_rows(
    weights: torch.Tensor, rows: torch.Tensor | None = None, alive_share: float = DEFAULT_ALIVE_SHARE
) -> torch.Tensor:
    """(..., H, m) float 0/1: whether each token selected each row (see the module docstring)."""
    w = weights.detach()
    if rows is not None:
        return torch.zeros(w.shape, dtype=torch.float32, device=w.device).scatter_(-1, rows, 1.0)
    return (w.float() >= alive_share / w.shape[-1]).float()


def window_stats(
    mass: torch.Tensor, hits: torch.Tensor, entropy_sum: float, n_tokens: float
) -> dict[str, float] | None:
    """The four statistics of one layer from its window sums (None for an empty window).

    mass (H, m): summed routing weights per row; hits (H, m): tokens that selected each row;
    entropy_sum: entropies summed over tokens and heads; n_tokens: tokens in the window."""
    if n_tokens <= 0:
        return None
    H, m = mass.shape
    mass, hits = mass.double(), hits.double()
    share = mass / mass.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    dead = hits == 0
    n_live = (~dead).sum(-1)  # (H,)
    live_share = torch.where(dead, torch.zeros_like(share), share).sum(-1) / n_live.clamp_min(1)
    return {
        "entropy": float(entropy_sum) / (n_tokens * H),
        "dead_rows": float(dead.sum(-1).double().mean()),
        "max_load": float(share.max(-1).values.mean()),
        "mean_load": float(torch.where(n_live > 0, live_share, torch.zeros_like(live_share)).mean()),
    }


class RouterStatsAccumulator:
    """Window sums of the routing statistics of several FM layers, updated every step on the device.

    layers: the model's layer indices that route (the metric keys use them, e.g. [0, 2, 4] in a hybrid);
    n_heads (this rank's heads), n_memories (m). `update(layer, weights, rows=None, mask=None)` after each
    forward, `compute()` at log time, `usage()` for the heatmap of the last computed window.
    """

    def __init__(
        self,
        layers: Sequence[int],
        n_heads: int,
        n_memories: int,
        device: torch.device | str | None = None,
        alive_share: float = DEFAULT_ALIVE_SHARE,
    ):
        if not layers:
            raise ValueError("RouterStatsAccumulator: layers is empty (no layer routes)")
        if len(set(layers)) != len(layers):
            raise ValueError(f"RouterStatsAccumulator: repeated layer index in {list(layers)}")
        if n_heads < 1 or n_memories < 1:
            raise ValueError(f"RouterStatsAccumulator: need n_heads >= 1 and n_memories >= 1, got {n_heads}, "
                             f"{n_memories}")  # fmt: skip
        if not 0 < alive_share <= 1:
            raise ValueError(f"RouterStatsAccumulator: alive_share must be in (0, 1], got {alive_share}")
        self.layers = list(layers)
        self.n_heads, self.n_memories, self.alive_share = n_heads, n_memories, alive_share
        self._slot = {layer: i for i, layer in enumerate(self.layers)}
        L, H, m = len(self.layers), n_heads, n_memories
        kw = {"dtype": torch.float64, "device": device}
        self.mass = torch.zeros(L, H, m, **kw)
        self.hits = torch.zeros(L, H, m, **kw)
        self.entropy_sum = torch.zeros(L, **kw)
        self.tokens = torch.zeros(L, **kw)
        self._usage: torch.Tensor | None = None

    @torch.no_grad()
    def update(
        self, layer: int, weights: torch.Tensor, rows: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> None:
        """Add one forward's routing of `layer`, with no host synchronisation. Either
        weights (..., H, m) over every row (rows (..., H, k) or None: see `selected_rows`), or the sparse layer's
        weights (..., H, k) at `rows` (..., H, k), added into the (H, m) sums by index (nothing (..., m) formed);
        mask (...) of the tokens to count (e.g. labels != -100) or None for all."""
        if layer not in self._slot:
            raise KeyError(f"router stats: layer {layer} is not one of the tracked layers {self.layers}")
        H, m = self.n_heads, self.n_memories
        at_rows = rows is not None and weights.shape == rows.shape and weights.shape[-1] != m
        if weights.dim() < 2 or weights.shape[-2] != H or (weights.shape[-1] != m and not at_rows):
            raise ValueError(f"router stats of layer {layer}: weights must be (..., {H}, {m}) or (..., {H}, k) with "
                             f"rows of the same shape, got {tuple(weights.shape)}")  # fmt: skip
        if rows is not None and (rows.shape[:-1] != weights.shape[:-1]):
            raise ValueError(f"router stats of layer {layer}: rows {tuple(rows.shape)} do not match weights "
                             f"{tuple(weights.shape)}")  # fmt: skip
        i = self._slot[layer]
        width = weights.shape[-1]
        w = weights.detach().float().reshape(-1, H, width)
        ent = routing_entropy(w)  # (N, H)
        hit = torch.ones_like(w) if at_rows else selected_rows(weights, rows, self.alive_share).reshape(-1, H, m)
        if mask is None:
            n: torch.Tensor | float = float(w.shape[0])  # a Python scalar: adding it needs no host-device copy
        else:
            if mask.numel() != w.shape[0]:
                raise ValueError(f"router stats of layer {layer}: mask has {mask.numel()} tokens, weights "
                                 f"{w.shape[0]}")  # fmt: skip
            keep = mask.reshape(-1).to(device=w.device, dtype=torch.float32)
            w, hit, ent = w * keep[:, None, None], hit * keep[:, None, None], ent * keep[:, None]
            n = keep.double().sum()
        if at_rows:  # flat index h * m + row of every (token, head, kept row)
            flat = (rows.reshape(-1, H, width) + torch.arange(H, device=rows.device)[None, :, None] * m).reshape(-1)
            self.mass[i].view(-1).index_add_(0, flat, w.reshape(-1).to(self.mass))
            self.hits[i].view(-1).index_add_(0, flat, hit.reshape(-1).to(self.hits))
        else:
            self.mass[i] += w.sum(0).to(self.mass)
            self.hits[i] += hit.sum(0).to(self.hits)
        self.entropy_sum[i] += ent.double().sum().to(self.entropy_sum)
        self.tokens[i] += n.to(self.tokens) if isinstance(n, torch.Tensor) else n

    def reset(self) -> None:
        for t in (self.mass, self.hits, self.entropy_sum, self.tokens):
            t.zero_()

    @torch.no_grad()
    def compute(self, reset: bool = True, process_group=None, all_reduce: bool = False) -> dict[str, float]:
        """{router/layer<i>/<stat>: value} of the window (layers without tokens are left out); one host sync.

        all_reduce: sum the window over `process_group` first (every rank of the group must call it), e.g.
        the data-parallel group so that the statistics cover the global batch."""
        flat = torch.cat([self.mass.flatten(), self.hits.flatten(), self.entropy_sum, self.tokens])
        if all_reduce:
            import torch.distributed as dist

            dist.all_reduce(flat, group=process_group)
        flat = flat.cpu()
        L, H, m = len(self.layers), self.n_heads, self.n_memories
        n = L * H * m
        mass, hits = flat[:n].view(L, H, m), flat[n : 2 * n].view(L, H, m)
        entropy_sum, tokens = flat[2 * n : 2 * n + L], flat[2 * n + L :]
        out: dict[str, float] = {}
        share = mass / mass.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
        self._usage = share.mean(1)  # (L, m), for the heatmap
        for i, layer in enumerate(self.layers):
            stats = window_stats(mass[i], hits[i], float(entropy_sum[i]), float(tokens[i]))
            for stat, value in (stats or {}).items():
                out[metric_key(layer, stat)] = value
        if reset:
            self.reset()
        return out

    def usage(self) -> torch.Tensor:
        """(layers, m) share of the routing mass per row, averaged over heads, of the last `compute` window."""
        if self._usage is None:
            raise RuntimeError("router stats: call compute() before usage()")
        return self._usage


def plot_usage_heatmap(
    usage: torch.Tensor, out: str | Path, layers: Sequence[int] | None = None, title: str = "router usage"
) -> Path:
    """Draw `usage` (layers x m, each row's share of the routing mass) as a heatmap PNG at `out`.

    Colours show share x m on a log scale: 1 is the uniform share, below 1/10 reads as unused."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import LogNorm
    from matplotlib.figure import Figure

    u = torch.as_tensor(usage, dtype=torch.float64).cpu()
    if u.dim() != 2:
        raise ValueError(f"plot_usage_heatmap: usage must be (layers, m), got {tuple(u.shape)}")
    L, m = u.shape
    layers = list(layers) if layers is not None else list(range(L))
    if len(layers) != L:
        raise ValueError(f"plot_usage_heatmap: {len(layers)} layer labels for {L} rows of usage")
    rel = (u * m).clamp_min(1e-3).numpy()
    fig = Figure(figsize=(min(14.0, 3.0 + 0.08 * m), 1.2 + 0.35 * L))
    FigureCanvasAgg(fig)  # no pyplot: no global state in the host process
    ax = fig.subplots()
    img = ax.imshow(rel, aspect="auto", interpolation="nearest", cmap="viridis",
                    norm=LogNorm(vmin=1e-3, vmax=max(float(m), 10.0)))  # fmt: skip
    ax.set_yticks(range(L), [str(layer) for layer in layers])
    ax.set_xlabel(f"memory row (m = {m})")
    ax.set_ylabel("layer")
    ax.set_title(title)
    fig.colorbar(img, ax=ax, label="share of routing mass x m (1 = uniform)")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return out


def uniform_entropy(m: int) -> float:
    """The entropy of a uniform router over m rows, log(m): the upper bound of `entropy`."""
    return math.log(m)
