"""The PEF engine: one forward pass, one backward pass per class slot, layer rules.

One forward pass of a batch records the input and output of every layer that has a rule
(:mod:`sknpeff.pef.rules`). The class-slot cotangents at the logits
(:mod:`sknpeff.pef._classes`) are back-propagated to those layer outputs only (one
backward of the batch per slot on a CPU, which measured faster there; one
``torch.autograd.grad(..., is_grads_batched=True)`` on GPUs), and the rules turn them into
per-example, per-slot parameter gradients. Parameters of layers without a rule go through
the generic ``torch.func`` path (:mod:`sknpeff.pef._generic`).

On the first batch of every computation the rules are checked exactly: for random
positive weights over (slot, example), the weighted sum of the per-example gradients
must equal one ordinary backward pass to the parameters. A parameter that fails (used
outside its module's ``forward``, a module whose first axis is not the batch axis, an
input modified in place) is moved to the generic path, so results are exact either way.

Rows are then assembled a few examples at a time (:mod:`sknpeff.pef._rows`), normalized
and reduced to their top entries (:mod:`sknpeff.pef._topk`), so memory depends on the
batch size and the model, never on the number of examples. Projected PEFs
(``compression="projection"``) skip the rows: each contribution goes through its block
of the random projection (:mod:`sknpeff.pef._projected`), normalized by the exact norm.
"""

from __future__ import annotations

import threading
import warnings
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..layout import ParameterLayout, select_parameters
from ..utils import user_stacklevel
from ._classes import class_cotangents
from ._generic import generic_grads
from ._inputs import as_logits, check_logits, default_forward, tree_leaves
from ._inputs import to_device as to_device_tree
from ._projected import ProjectedRows
from ._rows import RowAssembler
from ._shared import SharedOutputs
from ._topk import (
    DEFER_MAX_FRAC,
    BlockMax,
    Deferred,
    pad_cat,
    padded,
    rows_to_csr_parts,
    select_topk,
    wants_blocks,
)
from .rules import Contribution, LayerRule, rule_for

if TYPE_CHECKING:
    from ._transformer import PEFTransformer

__all__ = ["Engine", "NeedsOneThread"]

#: smallest norm divided by when normalizing
EPS = 1e-12


class NeedsOneThread(Exception):
    """A batch run on a worker thread needs parameters moved to the generic path."""


class _Record:
    __slots__ = ("module", "x", "out", "version")

    def __init__(self, module, x, out):
        self.module, self.x, self.out = module, x, out
        self.version = x._version


class Engine:
    """Computes the PEF rows of batches for one :class:`~sknpeff.PEFTransformer` call.

    Holds the parameter plan (which parameters a rule covers, which go to the generic
    path), the forward hooks, the reusable row buffers and the selection's statistics.
    One engine per thread.

    Parameters
    ----------
    est : PEFTransformer
        The fitted transformer (its parameters are read, never changed).
    layout : ParameterLayout
        The flat order of the selected parameters.
    n_slots : int
        Class slots per example.
    """

    def __init__(self, est: PEFTransformer, layout: ParameterLayout, n_slots: int):
        self.est = est
        self.model = est.model
        self.forward = est.forward if est.forward is not None else default_forward
        self.layout = layout
        self.n_slots = n_slots
        self.output = est.output_
        # the class axis; the seed of its random draws is fixed once per computation
        self.class_axis = getattr(est, "class_axis", "top")
        self.seed = getattr(est, "_class_seed", None)
        self.kind = est.kind
        self.k = int(est.n_values)
        self.out_dtype = np.dtype(est.dtype)
        chosen = select_parameters(self.model, est.params)
        self.names = [n for n, _ in chosen]
        self.params = [p for _, p in chosen]
        self.pid_of = {id(p): i for i, p in enumerate(self.params)}
        self.offsets = list(layout.offsets)
        self.sizes = list(layout.sizes)
        self.m = layout.n_params
        self.device = self.params[0].device
        self.generator = torch.Generator(device="cpu").manual_seed(0)
        self.chunk_elements = getattr(est, "_chunk_elements", 2**25)
        # leave outer-product blocks unwritten where the block filter allows (Deferred)
        self.defer = getattr(est, "_defer_outer", True)
        self._plan()
        self.records: list[_Record] = []
        self.rows = RowAssembler(self.offsets, self.sizes, self.device)
        # projected PEFs: R a_ij straight from the contributions (None: top-K rows)
        self.projected = None
        if getattr(est, "compression", "topk") == "projection":
            self.projected = ProjectedRows(est.projection_, self.sizes, self.device)
        self.select_state: dict = {}
        self.block_plans: dict = {}  # index plans of BlockMax.outer, per region
        self.batch_terms: dict[int, dict] = {}  # per batch, see _chunk_contribs
        self.no_expand: set[int] = set()
        self.expanded: set[int] = set()
        self.shared_outputs: SharedOutputs | None = None  # during a forward pass
        self.batch_hint: int | None = None
        # the thread whose forward pass the hooks record (None: none); engines of other
        # worker threads hook the same modules
        self.recording_thread: int | None = None
        self.handles: list = []
        # whether engines of other threads run batches of the same model concurrently
        self.shared = False
        self.verified = False
        self.loop_warned = False

    # -- plan ----------------------------------------------------------------------------------
    def _plan(self):
        owners: dict[int, list] = {}
        found: dict[int, LayerRule | None] = {}  # each module's rule, looked up once
        named = list(self.model.named_modules(remove_duplicate=False))
        for name, mod in named:
            if id(mod) not in found:
                found[id(mod)] = rule_for(mod)
            for _, p in mod.named_parameters(recurse=False):
                owners.setdefault(id(p), []).append((name, mod))
        # A module without a rule that uses a parameter of its own may also use its
        # children's parameters in its forward (MultiheadAttention reads out_proj's
        # weight directly): their rules cannot see that, so nothing below it is hooked.
        # A parameter it only shares with a module that has a rule (a tied bias such as
        # BERT's prediction head's) does not block.
        blocked = []
        for name, mod in named:
            if found[id(mod)] is None and any(
                    all(found[id(m)] is None for _, m in owners[id(p)])
                    for p in mod.parameters(recurse=False)):
                blocked.append(name + "." if name else "")
        self.hooked_modules = {}
        self.rules: dict[int, LayerRule] = {}
        fallback = set()
        for pid, p in enumerate(self.params):
            # the owners that have a rule compute it (the first-batch check moves it to
            # the generic path if another owner uses it outside their forward)
            mods = [(n, m) for n, m in owners.get(id(p), []) if found[id(m)] is not None]
            ok = bool(mods) and not any(
                (n + ".").startswith(bp) and n + "." != bp for n, _ in mods for bp in blocked)
            if ok:
                for _, mod in mods:
                    self.hooked_modules[id(mod)] = mod
                    self.rules[id(mod)] = found[id(mod)]
            else:
                fallback.add(pid)
        self.fallback = fallback
        self._refresh_hooked()

    def _refresh_hooked(self):
        # modules whose every selected parameter went to the generic path need no hook
        keep = {}
        for key, mod in self.hooked_modules.items():
            ps = [p for p in mod.parameters(recurse=False) if id(p) in self.pid_of]
            if any(self.pid_of[id(p)] not in self.fallback for p in ps):
                keep[key] = mod
        self.hooked_modules = keep
        self._wanted: dict[int, frozenset[str]] = {}

    def move_to_fallback(self, pids):
        self.fallback |= set(pids)
        self._refresh_hooked()
        self.remove_hooks()
        self.add_hooks()

    # -- hooks -------------------------------------------------------------------------------
    def _close_shared_outputs(self):
        """Leave the forward pass's :class:`SharedOutputs` and record what it saw:
        per-example copies, or the shared output as it was (found by _check_records)."""
        shared, self.shared_outputs = self.shared_outputs, None
        if shared is None:
            return
        shared.__exit__(None, None, None)
        for module, x, copies in shared.resolved():
            self.records.append(_Record(module, x, copies))
        for module, x, out in shared.unresolved():
            self.records.append(_Record(module, x, out))

    def _hook(self, module, args, output):
        if (self.recording_thread != threading.get_ident() or not args
                or not isinstance(args[0], torch.Tensor)):
            return None
        if not isinstance(output, torch.Tensor):
            return None
        x = args[0]
        B = self.batch_hint
        if (self.rules[id(module)].expand_shared_batch and B and B > 1 and output.dim() >= 1
                and output.shape[0] == 1 and x.dim() >= 1 and x.shape[0] == 1
                and id(module) not in self.no_expand):
            # e.g. an embedding of ids shared by the batch (position ids of shape (1, T)),
            # broadcast later: give every example its own copy so that its gradient stays
            # per example. Checked by _verify; undone if the model rejects it.
            self.expanded.add(id(module))
            x = x.expand(B, *x.shape[1:])
            output = output.expand(B, *output.shape[1:]).clone()
        elif (self.rules[id(module)].expand_shared_batch and B and x.dim() >= 1
              and output.dim() >= 1 and x.shape[0] != B and id(module) not in self.no_expand):
            # an output computed once for the batch (position ids of shape (T,)) and
            # broadcast into it later: SharedOutputs gives every example its own copy
            # where it meets the batch (checked by _verify)
            if self.shared_outputs is None:
                self.shared_outputs = SharedOutputs(B)
                self.shared_outputs.__enter__()
            self.expanded.add(id(module))
            out = output.clone()
            self.shared_outputs.track(module, x, out)
            return out
        self.records.append(_Record(module, x, output))
        return output.clone()

    def add_hooks(self):
        for mod in self.hooked_modules.values():
            self.handles.append(mod.register_forward_hook(self._hook))

    def remove_hooks(self):
        for h in self.handles:
            h.remove()
        self.handles = []

    # -- helpers -------------------------------------------------------------------------------
    def to_device(self, batch):
        return to_device_tree(batch, self.device, self.params[0].dtype)

    # -- per-example gradients -----------------------------------------------------------------
    def _fallback_grads(self, batch, cot) -> dict[int, torch.Tensor]:
        """``{pid: (B, c, numel)}`` for the parameters on the generic path."""
        grads, used_loop = generic_grads(
            self.model, self.forward, self.names, self.params, sorted(self.fallback), batch,
            cot, allow_train_mode=self.est.allow_train_mode, warn_loop=not self.loop_warned)
        self.loop_warned |= used_loop
        return grads

    def _backward(self, logits, inputs, cot_cb, stack: bool = True):
        """Gradients of ``<cot_cb[j], logits>`` w.r.t. ``inputs``, stacked over ``j``."""
        mode = getattr(self.est, "_backward_mode", "auto")
        if mode == "auto":
            # measured: on CPU c backward passes of the batch beat one vmap-ed backward
            # (vmap over the backward graph adds copies); on GPUs the batched one wins.
            mode = "loop" if self.device.type == "cpu" else "batched"
        if mode == "batched":
            try:
                return list(torch.autograd.grad(
                    logits, inputs, grad_outputs=cot_cb, is_grads_batched=True,
                    allow_unused=True, retain_graph=True,
                ))
            except RuntimeError:
                pass
        per = [torch.autograd.grad(logits, inputs, grad_outputs=cot_cb[j],
                                   allow_unused=True, retain_graph=True)
               for j in range(cot_cb.shape[0])]
        if not stack:
            return [None if per[0][t] is None else [pj[t] for pj in per]
                    for t in range(len(inputs))]
        return [None if per[0][t] is None else torch.stack([pj[t] for pj in per])
                for t in range(len(inputs))]

    def _layer_grads(self, logits, cot_cb):
        """Per-class cotangents at every recorded layer output.

        Each entry is a ``(c, B, ...)`` tensor or a list of ``c`` tensors ``(B, ...)``
        (stacked per row chunk, in the layout the per-layer rules want).
        """
        self.batch_terms: dict[int, dict[str, torch.Tensor]] = {}
        outs = [r.out for r in self.records]
        if not outs:
            return []
        return self._backward(logits, outs, cot_cb, stack=False)

    def _wanted_names(self, mod) -> frozenset[str]:
        """Names of ``mod``'s own parameters that its rule computes (selected, not on
        the generic path)."""
        names = self._wanted.get(id(mod))
        if names is None:
            names = frozenset(
                n for n, p in mod.named_parameters(recurse=False)
                if id(p) in self.pid_of and self.pid_of[id(p)] not in self.fallback)
            self._wanted[id(mod)] = names
        return names

    def _chunk_contribs(self, gouts, fb, b0, b1) -> dict[int, list[Contribution]]:
        """Every parameter's contributions for examples ``b0:b1`` of the batch."""
        contribs: dict[int, list[Contribution]] = {}
        for i, (rec, g) in enumerate(zip(self.records, gouts, strict=True)):
            if g is None:
                continue
            mod = rec.module
            rule = self.rules[id(mod)]
            wanted = self._wanted_names(mod)
            x = rec.x[b0:b1]
            terms = {}
            if isinstance(g, list):
                if rule.per_class(mod, rec.x):
                    if i not in self.batch_terms:  # once per batch
                        self.batch_terms[i] = rule.per_batch(mod, rec.x, g, wanted)
                    terms = {k: t[:, b0:b1] for k, t in self.batch_terms[i].items()}
                    gc = [t[b0:b1] for t in g]
                else:
                    # (Bc, c, ...) contiguous, seen as (c, Bc, ...): the layout rules want
                    gc = torch.stack([t[b0:b1] for t in g], dim=1).transpose(0, 1)
            else:
                gc = g[:, b0:b1]
            for name, cb in rule.contributions(mod, x, gc, wanted, terms).items():
                pid = self.pid_of[id(getattr(mod, name))]
                contribs.setdefault(pid, []).append(cb)
        for pid, t in fb.items():
            contribs[pid] = [Contribution.dense(t[b0:b1].transpose(0, 1))]
        return contribs

    def _params_of(self, module) -> list[int]:
        return [self.pid_of[id(p)] for p in module.parameters(recurse=False)
                if id(p) in self.pid_of and self.pid_of[id(p)] not in self.fallback]

    def _check_records(self, B) -> list[int]:
        """Hooked parameters whose module saw no batch axis of size ``B`` first."""
        bad = []
        for rec in self.records:
            if rec.x.dim() == 0 or rec.x.shape[0] != B or rec.out.shape[0] != B:
                bad.extend(self._params_of(rec.module))
        return sorted(set(bad))

    def _verify(self, logits, gouts, cot_cb, B) -> list[int]:
        """Hooked parameters whose per-example gradients fail an exact check.

        With random positive weights ``w`` over (class slot, example), ``sum_jb w_jb a_bj``
        computed from the per-layer rules must equal the gradient of
        ``sum_jb w_jb <cot_bj, logits_b>`` obtained by one ordinary backward pass to the
        parameters. This catches parameters
        used outside their module's ``forward`` and modules whose first input axis is
        not the batch axis.
        """
        hooked = sorted(set(range(len(self.params))) - self.fallback)
        if not hooked:
            return []
        gen = torch.Generator(device="cpu").manual_seed(12345)
        c = cot_cb.shape[0]
        w = (0.5 + torch.rand(c, B, generator=gen, dtype=torch.float64)).to(
            device=cot_cb.device, dtype=cot_cb.dtype)
        # a single backward pass of one random mix of all (class, example) cotangents
        true = torch.autograd.grad(logits, [self.params[i] for i in hooked],
                                   grad_outputs=(cot_cb * w[:, :, None]).sum(0),
                                   allow_unused=True, retain_graph=True)
        tol = 1e-3 if self.params[0].dtype in (torch.float32, torch.float16,
                                               torch.bfloat16) else 1e-8
        sums: dict[int, torch.Tensor] = {}
        step = max(1, min(B, self.chunk_elements // max(1, self.m * 4)))
        with torch.no_grad():
            for b0 in range(0, B, step):
                b1 = min(B, b0 + step)
                contribs = self._chunk_contribs(gouts, {}, b0, b1)
                for pid, cl in contribs.items():
                    for cb in cl:
                        s = cb.weighted_sum(w[:, b0:b1])
                        sums[pid] = s if pid not in sums else sums[pid] + s
        bad = []
        pairs = []
        for pid, t in zip(hooked, true, strict=True):
            t = (torch.zeros(self.sizes[pid], dtype=cot_cb.dtype, device=cot_cb.device)
                 if t is None else t.detach().reshape(-1))
            got = sums.get(pid)
            got = torch.zeros_like(t) if got is None else got.reshape(-1)
            pairs.append((pid, t, got))
        # gradients that vanish in exact arithmetic (e.g. attention key biases) are
        # rounding noise: compare them against the scale of the whole gradient too
        overall = max(float(t.abs().max()) for _, t, _ in pairs)
        for pid, t, got in pairs:
            scale = float(t.abs().max()) + float(got.abs().max()) + 1e-3 * overall
            if float((got - t).abs().max()) > tol * scale + 1e-30:
                bad.append(pid)
        for rec in self.records:
            if rec.x._version != rec.version:
                bad.extend(self._params_of(rec.module))
        return sorted(set(bad))

    # -- one batch -----------------------------------------------------------------------------
    def run_batch(self, batch, start: int = 0):
        """Return (counts, indices, data, norms, logits) for one batch whose first
        example is example ``start`` of the data (it seeds random class slots)."""
        est = self.est
        batch = self.to_device(batch)
        while True:
            self.records = []
            self.recording_thread = threading.get_ident()
            self.expanded = set()
            leaves = [v for v in tree_leaves(batch) if isinstance(v, torch.Tensor) and v.dim()]
            self.batch_hint = int(leaves[0].shape[0]) if leaves else None
            try:
                with torch.enable_grad():
                    logits = as_logits(self.forward(self.model, batch))
            except Exception:
                if not self.expanded:
                    raise
                self.no_expand |= self.expanded
                continue
            finally:
                self.recording_thread = None
                self._close_shared_outputs()
            check_logits(logits)
            B = logits.shape[0]
            cot, c_eff = class_cotangents(logits, self.n_slots, est.min_class_prob,
                                          self.output, self.class_axis, self.seed, start)
            if c_eff == 0:
                gouts, fb = [], {}
                break
            cot_cb = cot.transpose(0, 1).contiguous()
            bad = self._check_records(B)
            gouts = [] if bad else self._layer_grads(logits, cot_cb)
            if not bad and not self.verified:
                bad = self._verify(logits, gouts, cot_cb, B)
                self.verified = True
            if bad and self.shared:
                # moving parameters to the generic path re-hooks modules and swaps their
                # parameters, which other threads' forward passes would see: nothing is
                # changed here, the caller goes on with one thread
                raise NeedsOneThread(bad)
            if bad:
                warnings.warn(
                    "per-layer rules do not apply to parameters "
                    f"{[self.names[i] for i in bad][:5]} (used outside their module's "
                    "forward, without a leading batch axis, or modified in place); computing "
                    "them with the generic torch.func path (exact, slower).",
                    stacklevel=user_stacklevel(),
                )
                self.move_to_fallback(bad)
                continue
            fb = self._fallback_grads(batch, cot.detach())
            break
        logits_np = logits.detach().to(torch.float64).cpu().numpy()
        if self.projected is not None:
            return self._projected_batch(gouts, fb, B, c_eff, logits.dtype, logits_np)
        if c_eff == 0:
            return (np.zeros(B, np.int64), np.zeros(0, np.int64), np.zeros(0, self.out_dtype),
                    np.zeros(B), logits_np)
        width = c_eff * self.m if self.kind == "low_rank" else self.m
        step = max(1, min(B, self.chunk_elements // max(1, width)))
        step = -(-B // -(-B // step))  # equal chunks
        sels, picked, scales, norms = [], [], [], []
        lowrank = self.kind == "low_rank"
        n_valid = c_eff * self.m if lowrank else self.m
        col_map = self.rows.low_rank_col_map(c_eff) if lowrank else None
        with torch.no_grad():
            for b0 in range(0, B, step):
                b1 = min(B, b0 + step)
                contribs = self._chunk_contribs(gouts, fb, b0, b1)
                bm = dfr = None
                if wants_blocks(self.select_state, self.device):
                    bm = BlockMax(b1 - b0, padded(n_valid), logits.dtype, self.device,
                                   signed=lowrank, plans=self.block_plans)
                    # computing entries where read beats writing them only when the
                    # filter reads few blocks (measured: 5-6% of them for the benchmark
                    # models' low-rank rows: faster; 28-44% for their diagonal rows: not)
                    frac = self.select_state.get("block_frac", 1.0)
                    dfr = Deferred() if self.defer and frac < DEFER_MAX_FRAC else None
                if lowrank:
                    vals, nrm = self.rows.low_rank(contribs, b1 - b0, c_eff, logits.dtype, bm,
                                                   dfr)
                    scale = torch.where(nrm > 0, 1.0 / torch.sqrt(nrm.clamp(min=EPS)),
                                        torch.zeros_like(nrm))
                else:
                    vals, nrm = self.rows.diagonal(contribs, b1 - b0, logits.dtype, bm, dfr)
                    scale = torch.where(nrm > 0, 1.0 / nrm.clamp(min=EPS),
                                        torch.zeros_like(nrm))
                if not est.normalize:
                    scale = torch.ones_like(nrm)
                sel = select_topk(vals, self.k, signed=lowrank, n_valid=n_valid,
                                   generator=self.generator, state=self.select_state,
                                   block_max=None if bm is None else bm.bmag, deferred=dfr)
                if est.min_norm is not None:  # below the floor: an empty row
                    sel[nrm < float(est.min_norm)] = -1
                # the values leave the reused buffer now; sorting and conversion to CSR
                # run once per batch
                sels.append(sel)
                cols = sel.clamp(min=0)
                picked.append(vals.gather(1, cols))
                if dfr:
                    dfr.patch(picked[-1], cols)
                scales.append(scale)
                norms.append(nrm)
        counts, idx, data = rows_to_csr_parts(pad_cat(picked, 0), pad_cat(sels, -1),
                                               torch.cat(scales), self.out_dtype, col_map)
        return counts, idx, data, torch.cat(norms).cpu().numpy(), logits_np

    def _projected_batch(self, gouts, fb, B, c_eff, dtype, logits_np):
        """``(None, None, rows, norms, logits)`` of projected PEFs: ``rows`` dense
        ``(B, n_slots * d)``, slot ``j`` of row ``i`` holding ``R a_ij``, scaled by
        ``1 / sqrt(||F_i||_F)`` (the exact norm)."""
        d = self.projected.projection.n_components
        out = np.zeros((B, self.n_slots, d), dtype=self.out_dtype)
        norms = np.zeros(B)
        if c_eff == 0:
            return None, None, out.reshape(B, -1), norms, logits_np
        est = self.est
        # chunk so that the dense blocks (sparse-block and generic-path parameters) and
        # the projected rows of a chunk stay within chunk_elements
        dense = [self.sizes[p] for p in set(self.projected.projection.sparse_offset)
                 | self.fallback]
        width = c_eff * max([d, *dense])
        step = max(1, min(B, self.chunk_elements // max(1, width)))
        with torch.no_grad():
            for b0 in range(0, B, step):
                b1 = min(B, b0 + step)
                contribs = self._chunk_contribs(gouts, fb, b0, b1)
                Y, nrm = self.projected.rows(contribs, b1 - b0, c_eff, dtype)
                if est.normalize:
                    scale = torch.where(nrm > 0, 1.0 / torch.sqrt(nrm.clamp(min=EPS)),
                                        torch.zeros_like(nrm))
                else:
                    scale = torch.ones_like(nrm)
                if est.min_norm is not None:  # below the floor: an empty row
                    scale[nrm < float(est.min_norm)] = 0.0
                Y = Y * scale.to(Y.dtype)[:, None, None]
                out[b0:b1, :c_eff] = Y.cpu().numpy()
                norms[b0:b1] = nrm.cpu().numpy()
        return None, None, out.reshape(B, -1), norms, logits_np
