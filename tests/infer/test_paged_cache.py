"""The paged latent cache under the model: scattered blocks give the full forward's logits."""

from __future__ import annotations

import pytest
import torch

from dsv3.infer.engine.paged_cache import PagedLatentCache
from tests.conftest import YARN
from tests.infer.conftest import scaled_model
from tests.infer.test_cache import FP8_RELATIVE_ROUNDING

BLOCK = 4


def _paged_logits(model, ids: torch.Tensor, chunks: list[int], absorb_decode: bool = True, fp8: bool = False):
    """Logits (B, T, V) of `ids` fed in `chunks` through a paged cache whose blocks are scattered:
    row b's blocks are a shuffled, interleaved set of ids (what a long-running block pool looks like)."""
    cfg = model.config
    B, T = ids.shape
    per_row = -(-T // BLOCK)
    order = torch.randperm(B * per_row + 3, generator=torch.Generator().manual_seed(0))[: B * per_row]
    tables = order.view(B, per_row)
    cache = PagedLatentCache(cfg.num_hidden_layers, B * per_row + 3, BLOCK, cfg.kv_latent_dim,
                             dtype=torch.float32, fp8=fp8)  # fmt: skip
    out, start = [], 0
    for n in chunks:
        pos = torch.arange(start, start + n).expand(B, n)
        slots = tables.gather(1, pos // BLOCK) * BLOCK + pos % BLOCK
        width = -(-(start + n) // BLOCK)
        batch = cache.batch(slots, tables[:, :width], pos, absorb=absorb_decode and n <= 2)
        h, _, _ = model.hidden_states(
            ids[:, start : start + n], pos, cache=batch.layers(0, cfg.num_hidden_layers)
        )
        out.append(model.lm_head(h))
        start += n
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("overrides", [{}, {"q_lora_rank": None}, {"rope_scaling": YARN}])
def test_paged_decode_equals_full_recomputation(make_config, overrides):
    """fp32: a prompt in uneven chunks (crossing block edges), then one- and two-token steps (decode and
    verification), absorbed and expanded, equal one forward without a cache to 1e-4."""
    model = scaled_model(make_config(**overrides), blocks=5.0)
    ids = torch.randint(0, 128, (3, 23), generator=torch.Generator().manual_seed(1))
    chunks = [5, 6, 1, 2, 1, 2, 1, 1, 4]
    with torch.no_grad():
        full = model(ids)
        absorbed = _paged_logits(model, ids, chunks)
        expanded = _paged_logits(model, ids, chunks, absorb_decode=False)
    assert full.abs().amax() > 1.0  # logits far from uniform: the bound is not vacuous
    assert (absorbed - full).abs().max() <= 1e-4
    assert (expanded - full).abs().max() <= 1e-4


def test_padding_rows_and_tokens_write_only_to_the_scratch_block(make_config):
    """A batch padded with rows and tokens that write to the scratch block leaves real rows as they were."""
    cfg = make_config()
    model = scaled_model(cfg, blocks=5.0)
    cache = PagedLatentCache(cfg.num_hidden_layers, 4, BLOCK, cfg.kv_latent_dim, dtype=torch.float32)
    ids = torch.tensor([[5, 6, 7, 0], [0, 0, 0, 0]])  # row 0: 3 tokens + 1 pad; row 1: all padding
    pos = torch.tensor([[0, 1, 2, 0], [0, 0, 0, 0]])
    s = cache.scratch_slot
    slots = torch.tensor([[4, 5, 6, s], [s, s, s, s]])
    tables = torch.tensor([[1], [cache.scratch_block]])
    with torch.no_grad():
        h, _, _ = model.hidden_states(ids, pos, cache=cache.batch(slots, tables, pos, False).layers(0, 3))
        alone = model(ids[:1, :3])
    assert (model.lm_head(h[0, :3]) - alone[0]).abs().max() <= 1e-4
    written = cache.latent[:, : 4 * BLOCK].abs().sum(-1) > 0  # (layers, slots) outside scratch
    assert written[:, 4:7].all() and not written[:, :4].any() and not written[:, 7:].any()


def test_fp8_paged_cache_stays_within_e4m3_rounding(make_config):
    """The FP8 tolerance of the paged cache: logits within 2^-4 relative L2 of the exact cache's."""
    model = scaled_model(make_config(), blocks=3.0, head=5.0)
    ids = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(4))
    chunks = [8] + [1] * 12
    with torch.no_grad():
        exact = _paged_logits(model, ids, chunks)
        fp8 = _paged_logits(model, ids, chunks, fp8=True)
    rel = (fp8 - exact).norm(dim=-1) / exact.norm(dim=-1)
    assert 0 < rel.max() <= FP8_RELATIVE_ROUNDING


def test_misshaped_batches_are_errors(make_config):
    cfg = make_config()
    cache = PagedLatentCache(cfg.num_hidden_layers, 4, BLOCK, cfg.kv_latent_dim, dtype=torch.float32)
    with pytest.raises(ValueError, match="disagree"):
        cache.batch(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 1, dtype=torch.long),
                    torch.zeros(2, 2, dtype=torch.long), absorb=True)  # fmt: skip
    batch = cache.batch(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 1, dtype=torch.long),
                        torch.zeros(2, 3, dtype=torch.long), absorb=True)  # fmt: skip
    with pytest.raises(ValueError, match=r"a chunk of shape \(2, 1\)"):
        batch.layer(0).update(torch.zeros(2, 1, cfg.kv_lora_rank), torch.zeros(2, 1, cfg.qk_rope_head_dim))
    assert PagedLatentCache.bytes_per_block(3, BLOCK, 40, torch.bfloat16, fp8=False) == 3 * BLOCK * 80
    assert PagedLatentCache.bytes_per_block(3, BLOCK, 40, torch.bfloat16, fp8=True) == 3 * BLOCK * 44
