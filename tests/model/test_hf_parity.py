"""Logits equal transformers' DeepseekV3ForCausalLM on the same random weights, both directions."""

from __future__ import annotations

import pytest
import torch
import transformers

from dsv3.model.hf import load_hf, save_hf
from dsv3.model.transformer import Transformer

YARN = dict(type="yarn", factor=4.0, original_max_position_embeddings=32, beta_fast=32, beta_slow=1)
CONFIGS = {
    "q_lora+groups+dense": {},
    "no_q_lora+one_group+all_moe": dict(q_lora_rank=None, n_group=1, topk_group=1, first_k_dense_replace=0),
    "yarn_published_mscale": dict(rope_scaling={**YARN, "mscale": 1.0, "mscale_all_dim": 1.0}),
    "yarn_uneven_mscale+half_split_rope": dict(
        rope_scaling={**YARN, "mscale": 1.0, "mscale_all_dim": 0.7},
        rope_interleave=False,
        first_k_dense_replace=2,
    ),
    "unnormalized_topk+two_shared": dict(norm_topk_prob=False, n_shared_experts=2, n_group=2, topk_group=1),
    "tied_embeddings": dict(tie_word_embeddings=True, num_nextn_predict_layers=0),
}
SEQ_LENS = (1, 7, 33, 64)


def _hf_model(cfg, seed: int = 0):
    """A transformers DeepseekV3ForCausalLM of `cfg` with every tensor random, router bias included."""
    hf_cfg = transformers.DeepseekV3Config(**cfg.to_hf_dict())
    torch.manual_seed(seed)
    model = transformers.DeepseekV3ForCausalLM(hf_cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.15)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.3 * torch.randn_like(b))  # big enough to change which experts win
    return model


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers(name, tmp_path, make_config):
    cfg = make_config(**CONFIGS[name])
    hf = _hf_model(cfg)
    hf.save_pretrained(tmp_path / "hf")
    ours = load_hf(tmp_path / "hf").eval()
    assert ours.config.num_nextn_predict_layers == 0  # save_pretrained writes no MTP layer
    gen = torch.Generator().manual_seed(1)
    for T in SEQ_LENS:
        ids = torch.randint(0, cfg.vocab_size, (2, T), generator=gen)
        with torch.no_grad():
            expected = hf(ids).logits
            got = ours(ids)
        assert got.shape == (2, T, cfg.vocab_size)
        assert (got - expected).abs().max() <= 1e-4, f"{name}, T={T}"


@pytest.mark.parametrize("name", ["q_lora+groups+dense", "yarn_uneven_mscale+half_split_rope"])
def test_save_hf_loads_in_transformers(name, tmp_path, make_config):
    cfg = make_config(**CONFIGS[name])
    ours = Transformer(cfg, seed=3).eval()
    with torch.no_grad():  # the DeepSeek init (std 0.006) gives near-uniform logits: widen it
        for p in ours.parameters():
            p.mul_(25)
        for moe in ours.moe_layers():
            moe.gate.e_score_correction_bias.normal_(0, 0.3)
    save_hf(ours, tmp_path / "ours")
    hf = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path / "ours").eval()
    ids = torch.randint(0, cfg.vocab_size, (3, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():  # logits of ±40 here: float32 sums in another order differ by ~1e-5 of them
        torch.testing.assert_close(ours(ids), hf(ids).logits, rtol=1e-5, atol=1e-4)


def test_mtp_logits_match_transformers_mtp_layer(tmp_path, make_config):
    from transformers.modeling_layers import MtpModel

    cfg = make_config()
    ours = Transformer(cfg, seed=4).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.mul_(10)
    save_hf(ours, tmp_path / "ours")
    hf = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path / "ours").eval()
    mtp = MtpModel(hf, 1).eval()
    L = cfg.num_hidden_layers
    ours_state = ours.state_dict()
    hf_mtp_state = {}
    for key, t in ours_state.items():
        if key.startswith("mtp.0."):
            rest = key.removeprefix("mtp.0.")
            rest = "mtp_block." + rest.removeprefix("block.") if rest.startswith("block.") else rest
            hf_mtp_state["layers.0." + rest.replace("head_norm.", "post_norm.")] = t
    missing, unexpected = mtp.load_state_dict(hf_mtp_state, strict=False)
    assert not unexpected and all(k in ("embed_tokens.weight", "shared_head.weight") for k in missing)
    mtp.tie_with_main_model(hf)

    T = 24
    ids = torch.randint(0, cfg.vocab_size, (2, T), generator=torch.Generator().manual_seed(5))
    shifted = torch.nn.functional.pad(ids[:, 1:], (0, 1))  # token t+1 at position t, as ours pads
    # transformers' drafting loop numbers the MTP positions from 1; RoPE only sees differences, so
    # numbering from 0 (as ours does in training) is the same function, and compares bit-closer.
    with torch.no_grad():
        last_hidden = hf.model(ids).last_hidden_state
        h = mtp.forward_layer(0, last_hidden, torch.arange(T)[None], None, input_ids=shifted)
        expected = mtp.shared_head(h)
        got = ours.mtp_logits(ids)[0]
    assert L == 3 and (got - expected).abs().max() <= 1e-4


def test_training_losses_match_transformers(tmp_path, make_config):
    """Backward through every path (router choice, grouped experts, MLA, shared head) is the same
    function as transformers': ten AdamW steps from the same weights give the same losses."""
    cfg = make_config(num_nextn_predict_layers=0)
    hf = _hf_model(cfg)
    with torch.no_grad():  # keep the losses in a range where AdamW steps move them by a lot
        for p in hf.parameters():
            p.mul_(0.2)
    hf.save_pretrained(tmp_path / "hf")
    ours = load_hf(tmp_path / "hf")
    data = torch.randint(0, cfg.vocab_size, (4, 33), generator=torch.Generator().manual_seed(5))
    ids, labels = data[:, :-1].contiguous(), data[:, 1:].contiguous()

    def losses(model, step_loss) -> list[float]:
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
        out = []
        for _ in range(10):
            loss = step_loss(model)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            out.append(loss.item())
        return out

    expected = losses(hf, lambda m: m(input_ids=ids, labels=labels, shift_labels=labels).loss)
    got = losses(ours, lambda m: m.forward_with_losses(ids, labels, mtp_lambda=0.0).loss)
    assert expected[-1] < expected[0] - 0.3  # the steps really change the model
    assert got == pytest.approx(expected, abs=1e-4)
