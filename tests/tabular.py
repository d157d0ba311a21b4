"""A tabular causal LM over a finite set of candidate responses, and batches for it built by the library's collate.

The model is exact and fully expressive: every prefix of ``prompt + candidate`` owns a free row of next-token logits,
and tokens that would leave the candidate set are masked out, so ``softmax`` along the trie puts all of its mass on
the K candidates of each prompt and can represent every distribution in the interior of that simplex. It has the
forward signature of a plain causal LM (``input_ids``, ``attention_mask``, ``use_cache``; no ``logits_to_keep``), so
:meth:`sacpo_lightning.modules.base.AlignmentModule.sequence_logps` scores it through its full-logits path.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import SimpleNamespace

import torch
from torch import Tensor

from sacpo_lightning.data.collate import collate_kto, collate_pairs
from sacpo_lightning.models.policy import PolicySettings, frozen_copy

PAD, EOS = 0, 1
VOCAB_SIZE = 7
# Two-token prompts, so that masking the prompt out of the labels matters; every prompt shares the candidates.
PROMPTS: tuple[tuple[int, ...], ...] = ((2, 3), (3, 2))
# Variable lengths (2 to 4 tokens with EOS) force right padding; 5 is both a full response and a prefix of another.
CANDIDATES: tuple[tuple[int, ...], ...] = ((4, EOS), (5, EOS), (5, 4, EOS), (6, 5, 4, EOS))
# Finite, so that no inf reaches the log-softmax; exp(-1e4) underflows to exactly 0 in float32 and float64.
MASKED = -1.0e4


class TrieLM(torch.nn.Module):
    """Causal LM whose next-token logits are a free parameter for every node of the candidate trie.

    Args:
        logp: (P, K) log-probs of the candidates under each prompt; the trie logits are set to reproduce them.
        prompts: Token ids of the P prompts.
        candidates: Token ids of the K candidate responses (each ending with EOS), shared by all prompts.
    """

    def __init__(
        self,
        logp: Tensor,
        prompts: Sequence[Sequence[int]] = PROMPTS,
        candidates: Sequence[Sequence[int]] = CANDIDATES,
    ) -> None:
        super().__init__()
        self.prompts = [tuple(p) for p in prompts]
        self.candidates = [tuple(c) for c in candidates]
        nodes: dict[tuple[int, ...], int] = {}
        for prompt in self.prompts:
            for cand in self.candidates:
                for t in range(len(cand)):
                    nodes.setdefault(prompt + cand[:t], len(nodes))
        self.nodes = nodes
        mask = torch.full((len(nodes), VOCAB_SIZE), MASKED, dtype=torch.float64)
        init = torch.zeros(len(nodes), VOCAB_SIZE, dtype=torch.float64)
        for (p, prompt), (_, cand) in self._pairs():
            for t, token in enumerate(cand):
                node = nodes[prompt + cand[:t]]
                mask[node, token] = 0.0
                # Conditional log-prob of `token` at `node`: log of the mass of the candidates below node + token,
                # minus that below node (the latter is a per-row constant, which the softmax ignores).
                below = [j for j, c in enumerate(self.candidates) if c[: t + 1] == cand[: t + 1]]
                init[node, token] = torch.logsumexp(logp[p, below].to(torch.float64), dim=0)
        self.register_buffer("mask", mask)
        self.table = torch.nn.Parameter(init)
        # The (P * K, max_len) node and token of each scored step of each candidate, for candidate_logp().
        max_len = max(len(c) for c in self.candidates)
        steps = torch.zeros(len(self.prompts) * len(self.candidates), max_len, dtype=torch.long)
        tokens = torch.zeros_like(steps)
        valid = torch.zeros_like(steps, dtype=torch.bool)
        for (p, prompt), (k, cand) in self._pairs():
            row = p * len(self.candidates) + k
            for t, token in enumerate(cand):
                steps[row, t], tokens[row, t], valid[row, t] = nodes[prompt + cand[:t]], token, True
        self.register_buffer("steps", steps)
        self.register_buffer("tokens", tokens)
        self.register_buffer("valid", valid)
        self._index_cache: dict[tuple, Tensor] = {}
        self.forward_kwargs: set[str] = set()

    def _pairs(self):
        for p, prompt in enumerate(self.prompts):
            for k, cand in enumerate(self.candidates):
                yield (p, prompt), (k, cand)

    def _node_index(self, input_ids: Tensor) -> Tensor:
        """(B, S) trie node of each position's prefix, -1 off the trie (inside the prompt, after EOS, padding)."""
        key = (tuple(input_ids.shape), input_ids.cpu().numpy().tobytes())
        if key not in self._index_cache:
            rows = input_ids.tolist()
            index = [[self.nodes.get(tuple(row[: t + 1]), -1) for t in range(len(row))] for row in rows]
            self._index_cache[key] = torch.tensor(index, dtype=torch.long, device=input_ids.device)
        return self._index_cache[key]

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, use_cache: bool | None = None):
        # Recorded so that a test can check which path of sequence_logps called this model.
        passed = {"attention_mask": attention_mask, "use_cache": use_cache}
        self.forward_kwargs.update(name for name, value in passed.items() if value is not None)
        index = self._node_index(input_ids)
        rows = (self.table + self.mask)[index.clamp(min=0)]
        # Off-trie positions never predict a labelled token; uniform logits there keep everything finite.
        logits = torch.where((index >= 0).unsqueeze(-1), rows, torch.zeros_like(rows))
        return SimpleNamespace(logits=logits)

    def candidate_logp(self) -> Tensor:
        """(P, K) log-probs of the candidates, read off the trie directly (no labels, no shift, no padding)."""
        logp = torch.log_softmax(self.table + self.mask, dim=-1)
        per_step = logp[self.steps, self.tokens].masked_fill(~self.valid, 0.0)
        return per_step.sum(dim=-1).view(len(self.prompts), len(self.candidates))


def pair_batch(
    counts: Tensor,
    prompts: Sequence[Sequence[int]] = PROMPTS,
    candidates: Sequence[Sequence[int]] = CANDIDATES,
) -> dict[str, Tensor]:
    """A collated pair batch in which (prompt p, chosen i, rejected j) appears ``counts[p, i]`` times for each j != i.

    With Bradley-Terry preferences from the score ``s = log counts`` and unordered pairs {i, j} drawn with probability
    proportional to ``counts[p, i] + counts[p, j]``, the ordered pair (i over j) has probability proportional to
    ``counts[p, i]``, so the uniform mean over this batch is exactly the expected (infinite-data) loss.
    """
    examples = []
    for p, prompt in enumerate(prompts):
        for i, chosen in enumerate(candidates):
            for j, rejected in enumerate(candidates):
                if i != j:
                    for _ in range(int(counts[p, i])):
                        examples.append({"prompt_ids": list(prompt), "chosen_ids": list(chosen),
                                         "rejected_ids": list(rejected), "index": len(examples)})
    return collate_pairs(examples, pad_token_id=PAD)


def kto_batch(n_desirable: Tensor, n_undesirable: Tensor) -> tuple[dict[str, Tensor], Tensor]:
    """A collated KTO batch with ``n_desirable[p, k]`` desirable and ``n_undesirable[p, k]`` undesirable copies of
    (prompt p, candidate k). The fixed mismatched KL completion of an example with candidate k is candidate k + 1
    (mod K), so the KL rows follow another distribution than the data rows and a z0 taken from the wrong rows shows.

    Returns:
        The batch, and the (P, K) fraction of KL rows that pair prompt p with candidate k (what z0 averages over).
    """
    rows = []
    for p in range(len(PROMPTS)):
        for k in range(len(CANDIDATES)):
            rows += [(p, k, True)] * int(n_desirable[p, k]) + [(p, k, False)] * int(n_undesirable[p, k])
    kl_share = torch.zeros(n_desirable.shape, dtype=torch.float64)
    examples = []
    for index, (p, k, desirable) in enumerate(rows):
        kl_k = (k + 1) % len(CANDIDATES)
        kl_share[p, kl_k] += 1.0 / len(rows)
        examples.append({"prompt_ids": list(PROMPTS[p]), "completion_ids": list(CANDIDATES[k]),
                         "kl_completion_ids": list(CANDIDATES[kl_k]), "desirable": desirable, "index": index})
    return collate_kto(examples, pad_token_id=PAD), kl_share


def make_step(
    module_cls,
    policy_logp: Tensor,
    ref_logp: Tensor | None = None,
    *,
    prompts: Sequence[Sequence[int]] = PROMPTS,
    candidates: Sequence[Sequence[int]] = CANDIDATES,
    **coefficients,
):
    """A real step module whose policy is the tabular LM and whose reference is a frozen copy, as ``configure_model``
    sets them up for full fine-tuning (which it cannot do here: it loads a Hugging Face model).

    Args:
        module_cls: RewardDPO, SafetyDPO, RewardKTO or SafetyKTO.
        policy_logp: (P, K) policy to start from; for SACPO's step 2, the step-1 policy.
        ref_logp: (P, K) reference; by default the starting policy itself, which is what the real wiring does
            (the reference is a frozen copy of the loaded ``policy.name_or_path``). Only negative controls set it.
        prompts, candidates: The tabular problem (default: this module's).
        **coefficients: ``beta``, ``lam`` and the KTO class weights.
    """
    module = module_cls(policy=PolicySettings(finetune="full"), **coefficients)
    module.policy = TrieLM(policy_logp, prompts, candidates)
    module.ref_model = frozen_copy(TrieLM(policy_logp if ref_logp is None else ref_logp, prompts, candidates))
    return module


def train_step(module, batch: dict[str, Tensor], min_logp: float = -15.0) -> Tensor:
    """Minimises ``module.compute_loss(batch)`` over the policy's table and returns the learned (P, K) log-policy.

    L-BFGS: with a strong-Wolfe line search for the pairwise steps (a fixed convex objective in the log-ratios) and
    without one for KTO, whose reference point z0 is re-estimated (detached) at every evaluation, so that its loss is
    not one fixed function and a Wolfe line search stalls. Convergence is asserted on the gradient that
    ``compute_loss`` itself produces, and on the policy staying interior (a saturated KTO policy also has a ~0
    gradient, without being stationary); ``min_logp`` is that floor (lower it where the optimum itself is that
    peaked).
    """
    params = [p for p in module.policy.parameters() if p.requires_grad]
    assert params and not any(p.requires_grad for p in module.ref_model.parameters())
    line_search = None if module.data_kind == "kto" else "strong_wolfe"
    optimizer = torch.optim.LBFGS(
        params, lr=1.0, max_iter=100, tolerance_grad=1e-12, tolerance_change=1e-15, line_search_fn=line_search
    )

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss, _ = module.compute_loss(batch)
        loss.backward()
        return loss

    for _ in range(5):
        optimizer.step(closure)
    closure()
    grad = max(p.grad.abs().max().item() for p in params)
    assert grad < 1e-8, f"{type(module).__name__} did not converge: max |grad| = {grad:.3e}"
    logp = module.policy.candidate_logp().detach()
    assert logp.min().item() > min_logp, f"{type(module).__name__} saturated: min log-prob {logp.min().item():.1f}"
    return logp
