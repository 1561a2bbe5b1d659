"""Self-attention replay: a pass under replay attends with the recorded pass's queries and keys over its own values;
cross-attention is untouched and the hooks go away on exit."""

import pytest
import torch

from ldmkit.errors import InputError
from ldmkit.nn.attention import Attention, TransformerBlock
from ldmkit.nn.attention_replay import SelfAttentionReplay


def inputs(seed: int, n: int = 5):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, n, 8, generator=g), torch.randn(2, 3, 6, generator=g)


@torch.no_grad()
def test_replay_uses_the_source_map_with_the_edit_values():
    torch.manual_seed(0)
    attn = Attention(8, 2)
    src, _ = inputs(1)
    tgt, _ = inputs(2)
    with SelfAttentionReplay(attn) as replay:
        replay.record()
        attn(src)
        replay.replay()
        out = attn(tgt)
    # by hand: softmax(q_src k_src^T / sqrt(d)) v_tgt, per head
    q, k, v = (t.view(2, 5, 2, 4).transpose(1, 2) for t in (attn.to_q(src), attn.to_k(src), attn.to_v(tgt)))
    expected = attn.to_out((torch.softmax(q @ k.transpose(-1, -2) / 2.0, -1) @ v).transpose(1, 2).reshape(2, 5, 8))
    torch.testing.assert_close(out, expected)
    assert not torch.allclose(out, attn(tgt))  # hooks gone after exit: the plain pass differs
    assert not attn.to_q._forward_hooks and not attn._forward_pre_hooks


@torch.no_grad()
def test_cross_attention_is_not_replayed_and_mismatched_shapes_are_refused():
    torch.manual_seed(0)
    block = TransformerBlock(8, 2, context_dim=6)
    src, ctx = inputs(1)
    tgt, _ = inputs(2)
    with SelfAttentionReplay(block) as replay:
        replay.record()
        block(src, ctx)
        assert len(replay.saved) == 2  # q and k of attn1 only
        replay.replay()
        block(tgt, ctx)
        assert replay.pos == 2
        replay.replay()
        with pytest.raises(InputError, match="does not match"):
            block(inputs(3, n=4)[0], ctx)
