"""The paper's equations, each checked against a hand computation on tiny tensors.

Every expected value here is computed in the test itself -- explicit loops or plain tensor
arithmetic in float64, reading the module's weights but never calling the module under test -- and
compared with what the code returns:

* eq. 2-4, the residual bridge: ``Q = F_q(gamma * sum_i p_i C_i)`` with a Bernoulli ``p_i`` per
  image in training and its expectation ``p`` in eval, ``K, V`` from the *current* expert's
  ``f_k``, scaled dot-product attention per head, output projection and the tanh gate; and which
  ``C_i`` the model feeds each bridge (the earlier experts' projector outputs, in stage order);
* the projector and token resampling that put every expert on one token grid (eq. 10 sums experts
  token by token);
* eq. 9-10, the fusion: top-k, softmax over the kept logits only, the adapters ``F_i``, the
  weighted sum, and the load-balancing term (the router's *input* is another issue's: these tests
  feed the fusion fixed router logits, so they hold whatever the router reads);
* eq. 5-8, momentum contrast: the query/key embeddings, the row/column loss with its weighting and
  temperature, the FIFO queue, the momentum update of every parameter;
* eq. 11 through the trainer: ``L_total = L_reg + mu * L_moco`` with ``L_reg`` on the answer tokens
  only, recomputed from the model's logits;
* the preprocessing each expert receives (side, mean, std, filter) against the released towers' own.
"""

from __future__ import annotations

import copy
import functools
import itertools
import math

import pytest
import torch

from astrea_vlm.configuration import get_preset
from astrea_vlm.modeling import AstreaForConditionalGeneration, ExpertProjector, ResidualBridge, resample_tokens
from astrea_vlm.processing import AstreaImageProcessor
from astrea_vlm.train.moco import MomentumContrast, _random_half_mean

ATOL = 1e-5


# ------------------------------------------------------------------------------- hand helpers
def _d(x: torch.Tensor) -> torch.Tensor:
    return x.detach().double()


def _linear(x: torch.Tensor, layer: torch.nn.Linear) -> torch.Tensor:
    """``W x + b`` for every row of ``x``."""
    return _d(x) @ _d(layer.weight).T + _d(layer.bias)


def _gelu(x: torch.Tensor) -> torch.Tensor:
    """The exact GELU, ``x * Phi(x)``."""
    return x * 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def _softmax(values: list[float]) -> list[float]:
    top = max(values)
    exps = [math.exp(v - top) for v in values]
    return [e / sum(exps) for e in exps]


def _bridge_by_hand(bridge, current, previous, p_per_image, gamma, gate, num_heads):
    """Eq. 2-4 for every image: ``current`` is f_k ``(B, N, D)``, ``previous`` the C_i, ``p_per_image[i][b]`` is p_i."""
    batch, n, dim = current.shape
    head_dim = dim // num_heads
    out = torch.empty(batch, n, dim, dtype=torch.float64)
    for b in range(batch):
        query_input = sum(p_per_image[i][b] * _d(c[b]) for i, c in enumerate(previous)) * gamma  # (N, D)
        q = _linear(query_input, bridge.q_proj)
        k = _linear(current[b], bridge.k_proj)  # keys and values: the CURRENT expert's tokens
        v = _linear(current[b], bridge.v_proj)
        attended = torch.zeros(n, dim, dtype=torch.float64)
        for h in range(num_heads):
            cols = slice(h * head_dim, (h + 1) * head_dim)
            for t in range(n):
                weights = _softmax([float(q[t, cols] @ k[s, cols]) / math.sqrt(head_dim) for s in range(n)])
                attended[t, cols] = sum(w * v[s, cols] for s, w in enumerate(weights))
        out[b] = _d(current[b]) + math.tanh(gate) * _linear(attended, bridge.o_proj)
    return out


def _randomise(module: torch.nn.Module, seed: int, scale: float = 0.5) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(scale * torch.randn(param.shape, generator=generator))


# --------------------------------------------------------------------------------- eq. 2-4
GAMMA, P, GATE, HEADS = 0.7, 0.3, 0.4, 2


def _bridge_case(batch=3, seed=0):
    torch.manual_seed(seed)
    bridge = ResidualBridge(4, HEADS, gamma=GAMMA, p=P)
    _randomise(bridge, seed + 1, scale=0.8)
    with torch.no_grad():
        bridge.gate.fill_(GATE)
    generator = torch.Generator().manual_seed(seed + 2)
    current = torch.randn(batch, 3, 4, generator=generator)
    previous = [torch.randn(batch, 3, 4, generator=generator) for _ in range(2)]
    return bridge, current, previous


def test_bridge_in_eval_is_eq_2_to_4_with_p_at_its_expectation():
    bridge, current, previous = _bridge_case()
    bridge.eval()
    with torch.no_grad():
        got = bridge(current, previous)
    expected = _bridge_by_hand(bridge, current, previous, [[P] * 3, [P] * 3], GAMMA, GATE, HEADS)
    torch.testing.assert_close(_d(got), expected, rtol=0, atol=ATOL)


def test_bridge_keys_and_values_come_from_the_current_expert():
    # Changing the current expert's tokens changes the attention's keys and values; changing an
    # earlier expert's only the query. Both checked against the hand computation, so an
    # implementation that reads K/V from an earlier expert (eq. 4 turned around) fails here.
    bridge, current, previous = _bridge_case(seed=5)
    bridge.eval()
    other = [previous[0], current]  # the current expert's tokens as the last earlier expert
    with torch.no_grad():
        got = bridge(previous[1], other)
    expected = _bridge_by_hand(bridge, previous[1], other, [[P] * 3, [P] * 3], GAMMA, GATE, HEADS)
    torch.testing.assert_close(_d(got), expected, rtol=0, atol=ATOL)


def test_bridge_in_training_draws_one_bernoulli_p_i_per_image_and_expert():
    batch = 48
    bridge, current, previous = _bridge_case(batch=batch, seed=3)
    bridge.train()
    with torch.no_grad():
        got = _d(bridge(current, previous, torch.Generator().manual_seed(11)))
    drawn = []
    for b in range(batch):
        matches = []
        for mask in itertools.product((0.0, 1.0), repeat=len(previous)):
            expected = _bridge_by_hand(bridge, current[b : b + 1], [c[b : b + 1] for c in previous], [[m] for m in mask],
                                       GAMMA, GATE, HEADS)
            if torch.allclose(got[b : b + 1], expected, rtol=0, atol=ATOL):
                matches.append(mask)
        assert len(matches) == 1, f"image {b}: output matches {len(matches)} of the p_i in {{0, 1}} choices"
        drawn.append(matches[0])
    assert set(drawn) == set(itertools.product((0.0, 1.0), repeat=2))  # every combination occurs
    kept = sum(sum(mask) for mask in drawn) / (2 * batch)
    assert 0.15 < kept < 0.45  # p = 0.3: 96 draws


def test_bridge_gate_scales_the_attention_branch_by_tanh():
    bridge, current, previous = _bridge_case(seed=7)
    bridge.eval()
    for gate in (0.0, -1.3, 2.0):
        with torch.no_grad():
            bridge.gate.fill_(gate)
            got = bridge(current, previous)
        expected = _bridge_by_hand(bridge, current, previous, [[P] * 3, [P] * 3], GAMMA, gate, HEADS)
        torch.testing.assert_close(_d(got), expected, rtol=0, atol=ATOL)
    assert torch.equal(bridge(current, []), current)  # the first expert has no bridge
    fresh = ResidualBridge(4, HEADS, gamma=GAMMA, p=P).eval()  # the gate starts at 0: a new bridge is the identity
    torch.testing.assert_close(fresh(current, previous), current, rtol=0, atol=0)


def test_model_feeds_each_bridge_the_earlier_experts_projector_outputs_in_stage_order():
    config = get_preset("tiny", bridge_gamma=GAMMA, bridge_p=P, expert_order=["segmentation", "caption", "detection", "classification"])
    torch.manual_seed(0)
    model = AstreaForConditionalGeneration(config).eval()
    for index, bridge in enumerate(model.model.bridges.values()):
        _randomise(bridge, 20 + index, scale=0.3)
    generator = torch.Generator().manual_seed(4)
    features = {role: torch.randn(2, config.num_visual_tokens, config.text_config.hidden_size, generator=generator)
                for role in config.expert_order}
    with torch.no_grad():
        visual = model.model.get_image_features(expert_features=features)
    order = config.expert_order
    assert torch.equal(visual.bridged_features[order[0]], features[order[0]])
    for position, role in enumerate(order[1:], start=1):
        bridge = model.model.bridges[role]
        earlier = [features[r] for r in order[:position]]
        expected = _bridge_by_hand(bridge, features[role], earlier, [[P, P]] * position, GAMMA, float(bridge.gate.detach()),
                                   config.bridge_num_heads)
        torch.testing.assert_close(_d(visual.bridged_features[role]), expected, rtol=0, atol=ATOL, msg=role)


# ------------------------------------------------------------------- projector and token grid
@pytest.mark.parametrize("depth", [1, 2, 3])
def test_projector_is_linear_gelu_linear(depth):
    projector = ExpertProjector(3, 4, depth=depth)
    _randomise(projector, depth)
    linears = [m for m in projector.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(3, 4)] + [(4, 4)] * (depth - 1)
    tokens = torch.randn(2, 5, 3, generator=torch.Generator().manual_seed(0))
    expected = _linear(tokens, linears[0])
    for layer in linears[1:]:
        expected = _linear(_gelu(expected), layer)
    torch.testing.assert_close(_d(projector(tokens)), expected, rtol=0, atol=ATOL)


def _grid(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Row-major tokens ``(N, C)`` as ``(h, w, C)``: token ``r * w + c`` is cell (r, c)."""
    return tokens.reshape(h, w, -1)


def _area_bins(size_in: int, size_out: int) -> list[range]:
    return [range(math.floor(i * size_in / size_out), math.ceil((i + 1) * size_in / size_out)) for i in range(size_out)]


def _bilinear_taps(size_in: int, size_out: int) -> list[tuple[int, int, float]]:
    """Source cells and weight of each output cell (half-pixel centres, edges clamped)."""
    taps = []
    for i in range(size_out):
        source = max((i + 0.5) * size_in / size_out - 0.5, 0.0)
        low = math.floor(source)
        taps.append((low, min(low + 1, size_in - 1), source - low))
    return taps


@pytest.mark.parametrize("grid, side", [((4, 4), 2), ((6, 6), 4), ((4, 6), 2), ((2, 2), 4), ((2, 3), 3), ((2, 4), 3)])
def test_resampling_to_the_shared_grid_by_hand(grid, side):
    h, w = grid
    tokens = torch.randn(2, h * w, 3, generator=torch.Generator().manual_seed(h * 10 + w))
    got = _d(resample_tokens(tokens, grid, side * side))
    expected = torch.empty(2, side * side, 3, dtype=torch.float64)
    for b in range(2):
        cells = _grid(_d(tokens[b]), h, w)
        for r in range(side):
            for c in range(side):
                if side <= h and side <= w:  # area pooling
                    rows, cols = _area_bins(h, side)[r], _area_bins(w, side)[c]
                    value = sum(cells[i, j] for i in rows for j in cols) / (len(rows) * len(cols))
                else:  # bilinear
                    r0, r1, fr = _bilinear_taps(h, side)[r]
                    c0, c1, fc = _bilinear_taps(w, side)[c]
                    value = ((1 - fr) * ((1 - fc) * cells[r0, c0] + fc * cells[r0, c1])
                             + fr * ((1 - fc) * cells[r1, c0] + fc * cells[r1, c1]))
                expected[b, r * side + c] = value
    torch.testing.assert_close(got, expected, rtol=0, atol=ATOL)


def test_query_tokens_keep_the_first_n_and_a_matching_grid_is_untouched():
    tokens = torch.randn(2, 9, 3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(resample_tokens(tokens, None, 4), tokens[:, :4])
    assert torch.equal(resample_tokens(tokens, (3, 3), 9), tokens)


# ------------------------------------------------------------------------------- eq. 9-10
class _FixedLogits(torch.nn.Module):
    """Stands in for the router: returns given logits whatever it is fed."""

    def __init__(self, logits: torch.Tensor, like: torch.nn.Module):
        super().__init__()
        self.logits = logits
        self.use_text = getattr(like, "use_text", False)

    def forward(self, *args, **kwargs):
        return self.logits.clone()


@functools.cache
def _tiny_fusion(top_k: int):
    config = get_preset("tiny", fusion_top_k=top_k, fusion_adapter_dim=8)
    torch.manual_seed(0)
    return AstreaForConditionalGeneration(config).model.fusion, config


def _fusion(top_k: int):
    """The tiny model's MoE fusion (built as the model builds it), with adapters that are not the identity."""
    fusion, config = _tiny_fusion(top_k)
    fusion = copy.deepcopy(fusion)
    for index, adapter in enumerate(fusion.adapters):
        _randomise(adapter, 100 + index, scale=0.3)  # fc2 starts at zero: make the branch count
    return fusion, config


def _route_by_hand(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    probs = torch.zeros(logits.shape, dtype=torch.float64)
    for b, row in enumerate(logits.tolist()):
        kept = sorted(range(len(row)), key=lambda i: row[i], reverse=True)[:top_k]
        for i, p in zip(kept, _softmax([row[i] for i in kept])):
            probs[b, i] = p
    return probs


# Top-1 picks experts 2, 0, 3, 2, 0: expert 1 is nobody's first choice but later experts are.
LOGITS = torch.tensor([[0.3, -1.2, 2.0, 0.9], [1.5, 0.2, -0.4, 1.1], [-0.7, 0.8, 0.1, 1.2], [0.0, 0.6, 1.7, 0.5], [2.2, -0.3, 0.4, 1.9]])


@pytest.mark.parametrize("top_k", [1, 2, 3, 4])
def test_route_keeps_the_top_k_and_softmaxes_over_the_kept_logits_only(top_k):
    fusion, _ = _fusion(top_k)
    torch.testing.assert_close(_d(fusion.route(LOGITS)), _route_by_hand(LOGITS, top_k), rtol=0, atol=1e-6)


def test_adapter_is_identity_plus_mlp():
    fusion, config = _fusion(2)
    adapter = fusion.adapters[1]
    x = torch.randn(2, 3, config.text_config.hidden_size, generator=torch.Generator().manual_seed(0))
    expected = _d(x) + _linear(_gelu(_linear(x, adapter.fc1)), adapter.fc2)
    torch.testing.assert_close(_d(adapter(x)), expected, rtol=0, atol=ATOL)


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_fused_tokens_are_the_probability_weighted_sum_of_the_kept_adapters(top_k):
    fusion, config = _fusion(top_k)
    fusion.router = _FixedLogits(LOGITS, fusion.router)
    generator = torch.Generator().manual_seed(1)
    features = [torch.randn(5, 4, config.text_config.hidden_size, generator=generator) for _ in range(4)]
    with torch.no_grad():
        out = fusion(features)
    probs = _route_by_hand(LOGITS, top_k)
    expected = torch.zeros(5, 4, config.text_config.hidden_size, dtype=torch.float64)
    for b in range(5):
        for i, adapter in enumerate(fusion.adapters):
            if probs[b, i] > 0:
                adapted = _d(features[i][b]) + _linear(_gelu(_linear(features[i][b], adapter.fc1)), adapter.fc2)
                expected[b] += probs[b, i] * adapted
    torch.testing.assert_close(_d(out.fused), expected, rtol=0, atol=ATOL)
    torch.testing.assert_close(_d(out.router_probs), probs, rtol=0, atol=1e-6)


def test_router_softmax_runs_in_float32_when_the_fusion_runs_in_bf16():
    """Mixed precision: eq. 9's P_i come from float32 logits (bf16 would keep about 3 significant digits)."""
    fusion, config = _fusion(3)
    fusion = fusion.to(torch.bfloat16)
    generator = torch.Generator().manual_seed(2)
    features = [torch.randn(5, 4, config.text_config.hidden_size, generator=generator).bfloat16() for _ in range(4)]
    with torch.no_grad():
        out = fusion(features)
    assert out.router_logits.dtype == out.router_probs.dtype == torch.float32
    torch.testing.assert_close(_d(out.router_probs), _route_by_hand(out.router_logits, 3), rtol=0, atol=1e-6)


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_load_balance_term_is_experts_times_slot_share_times_mean_probability(top_k):
    fusion, config = _fusion(top_k)
    fusion.router = _FixedLogits(LOGITS, fusion.router)
    features = [torch.randn(5, 4, config.text_config.hidden_size) for _ in range(4)]
    with torch.no_grad():
        out = fusion(features)
    batch, experts = LOGITS.shape
    kept = _route_by_hand(LOGITS, top_k) > 0
    expected = 0.0
    for i in range(experts):
        share = sum(bool(kept[b, i]) for b in range(batch)) / (batch * top_k)  # share of the B * k slots
        mean_prob = sum(_softmax(LOGITS[b].tolist())[i] for b in range(batch)) / batch  # full softmax
        expected += share * mean_prob
    assert float(out.load_balance_loss) == pytest.approx(experts * expected, rel=1e-6)


# ------------------------------------------------------------------------------- eq. 5-8
def _backbone(seed: int = 0):
    config = get_preset("tiny", moco_dim=8)
    torch.manual_seed(seed)
    return AstreaForConditionalGeneration(config).model


def _moco_loss_by_hand(q, k, queue, temperature, lam):
    """Rows: ``q_i`` against ``[k; queue]``; columns: ``k_i`` against every ``q_j``; mean over the batch."""
    total = 0.0
    batch = q.shape[0]
    keys = [_d(k[j]) for j in range(batch)] + [_d(v) for v in queue]
    for i in range(batch):
        row = _softmax([float(_d(q[i]) @ key) / temperature for key in keys])
        col = _softmax([float(_d(k[i]) @ _d(q[j])) / temperature for j in range(batch)])
        total += lam * math.log(row[i]) + (1 - lam) * math.log(col[i])
    return -total / batch


@pytest.mark.parametrize("temperature, lam", [(0.2, 0.3), (1.5, 0.8)])
def test_moco_loss_is_eq_5_to_7_by_hand(temperature, lam):
    moco = MomentumContrast(_backbone(), queue_size=5, momentum=0.9, temperature=temperature, lam=lam)
    generator = torch.Generator().manual_seed(2)
    q = torch.nn.functional.normalize(torch.randn(3, 8, generator=generator), dim=-1)
    k = torch.nn.functional.normalize(torch.randn(3, 8, generator=generator), dim=-1)
    expected = _moco_loss_by_hand(q, k, moco.queue.clone(), temperature, lam)
    assert moco.loss(q, k).item() == pytest.approx(expected, rel=1e-5)


def test_random_half_mean_averages_half_of_each_images_tokens():
    # Token values 1, 2, 4, 8 (times a direction): every pair has its own mean, none equals the full mean.
    tokens = torch.tensor([1.0, 2.0, 4.0, 8.0])[None, :, None] * torch.ones(32, 4, 3)
    pooled = _random_half_mean(tokens, torch.Generator().manual_seed(0))
    pair_means = {(a + b) / 2: (a, b) for a, b in itertools.combinations([1.0, 2.0, 4.0, 8.0], 2)}
    seen = set()
    for row in pooled:
        assert torch.equal(row, row[0].expand(3))
        match = [m for m in pair_means if abs(float(row[0]) - m) < 1e-6]
        assert len(match) == 1, f"{float(row[0])} is not the mean of two of the four tokens"
        seen.add(match[0])
    assert len(seen) >= 4  # the half is drawn per image


def _head_by_hand(head, x):
    return _linear(_gelu(_linear(x, head[0])), head[2])


def _unit(x):
    return x / x.norm(dim=-1, keepdim=True)


def test_query_and_key_are_unit_embeddings_from_the_online_and_momentum_encoders():
    backbone = _backbone()
    moco = MomentumContrast(backbone, queue_size=4, momentum=0.9, temperature=0.1, lam=0.5)
    # Make the momentum encoder differ from the online one, so that using the wrong one shows.
    _randomise(moco.head, 7)
    _randomise(moco.fusion, 8, scale=0.1)
    d = backbone.config.text_config.hidden_size
    # Tokens equal within each image, so any random half has the same mean as the whole image.
    per_image = torch.randn(3, 1, d, generator=torch.Generator().manual_seed(3))
    fused = per_image.expand(3, 6, d)
    with torch.no_grad():
        q = moco.query(backbone, fused)
    torch.testing.assert_close(_d(q), _unit(_head_by_hand(backbone.moco_head, per_image[:, 0])), rtol=0, atol=ATOL)

    bridged = [per_image.expand(3, 6, d) * (i + 1) for i in range(4)]
    with torch.no_grad():
        momentum_fused = moco.fusion(bridged).fused  # the fusion itself is pinned by the eq. 9-10 tests
        k = moco.key(bridged)
    assert torch.allclose(momentum_fused, momentum_fused[:, :1].expand_as(momentum_fused), atol=1e-6)
    torch.testing.assert_close(_d(k), _unit(_head_by_hand(moco.head, momentum_fused[:, 0])), rtol=0, atol=ATOL)
    assert not k.requires_grad


def test_momentum_update_is_eq_8_on_every_parameter_of_the_momentum_encoder():
    backbone = _backbone()
    moco = MomentumContrast(backbone, queue_size=4, momentum=0.75, temperature=0.1, lam=0.5)
    _randomise(backbone.fusion, 1)
    _randomise(backbone.moco_head, 2)
    pairs = [(moco.fusion, backbone.fusion), (moco.head, backbone.moco_head)]
    before = {id(p): _d(p).clone() for m, _ in pairs for p in m.parameters()}
    moco.update(backbone)
    count = 0
    for momentum_module, online_module in pairs:
        online = dict(online_module.named_parameters())
        for name, theta_m in momentum_module.named_parameters():
            expected = 0.75 * before[id(theta_m)] + 0.25 * _d(online[name])
            torch.testing.assert_close(_d(theta_m), expected, rtol=0, atol=1e-6, msg=name)
            assert not theta_m.requires_grad
            count += 1
    assert count == len(list(backbone.fusion.parameters())) + len(list(backbone.moco_head.parameters()))


def test_queue_is_fifo_over_several_batches():
    moco = MomentumContrast(_backbone(), queue_size=5, momentum=0.9, temperature=0.1, lam=0.5)
    expected = [list(row) for row in moco.queue.tolist()]
    oldest = 0
    for step in range(4):  # 3 keys a step into 5 slots: wraps around twice
        keys = torch.randn(3, 8, generator=torch.Generator().manual_seed(step))
        moco.enqueue(keys)
        for row in keys.tolist():
            expected[oldest] = row
            oldest = (oldest + 1) % 5
        torch.testing.assert_close(moco.queue, torch.tensor(expected))
        assert int(moco.queue_ptr) == oldest


# ---------------------------------------------------------------------------------- eq. 11
def _chat_dataset():
    from astrea_vlm.train.distributed_check import textured_colour_dataset

    return textured_colour_dataset(4)


@pytest.mark.parametrize("balance", [0.0, 0.3])
def test_trainer_loss_is_l_reg_on_answer_tokens_plus_mu_l_moco(tmp_path, balance):
    from astrea_vlm.processing import build_processor
    from astrea_vlm.train.trainer import AstreaSFTConfig, AstreaSFTTrainer

    # bridge_p = 1 makes the training forward deterministic, so the logits can be recomputed.
    config = get_preset("tiny", bridge_p=1.0)
    torch.manual_seed(0)
    model = AstreaForConditionalGeneration(config)
    processor = build_processor(config)
    args = AstreaSFTConfig(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2, bf16=False,
                           activation_checkpointing=False, report_to=[], assistant_only_loss=True, save_strategy="no",
                           max_length=None, use_cpu=True, disable_tqdm=True, moco_queue_size=64, moco_mu=0.5,
                           moco_temperature=0.5, moco_lambda=0.3, fusion_load_balance_coef=balance)
    trainer = AstreaSFTTrainer(model=model, args=args, train_dataset=_chat_dataset(), processing_class=processor)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])

    seen = {}
    loss_fn = trainer.moco.loss

    def record(q, k):
        seen.update(q=q.detach().clone(), k=k.detach().clone(), queue=trainer.moco.queue.clone())
        return loss_fn(q, k)

    trainer.moco.loss = record
    model.train()
    loss = trainer.compute_loss(model, dict(batch))

    # L_reg by hand: the next-token cross-entropy over the answer tokens (" red</s>") alone.
    with torch.no_grad():
        out = model(**{k: v for k, v in batch.items() if k != "labels"})
    logits = _d(out.logits)
    terms = []
    for b, ids in enumerate(batch["input_ids"]):
        answer = processor.tokenizer(" " + trainer.train_dataset[b]["messages"][1]["content"][0]["text"] + "</s>",
                                     add_special_tokens=False)["input_ids"]
        end = max(t for t in range(len(ids)) if ids[t] == processor.tokenizer.eos_token_id) + 1
        assert ids[end - len(answer) : end].tolist() == answer
        for t in range(end - len(answer), end):
            terms.append(-float(torch.log_softmax(logits[b, t - 1], dim=-1)[ids[t]]))
    l_reg = sum(terms) / len(terms)
    l_moco = _moco_loss_by_hand(seen["q"], seen["k"], seen["queue"], 0.5, 0.3)
    expected = l_reg + 0.5 * l_moco + balance * float(out.load_balance_loss)
    assert l_moco > 0.05  # the MoCo term is large enough to show if it were left out
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    # ...and the keys were enqueued after the loss read the queue.
    torch.testing.assert_close(trainer.moco.queue[:2], seen["k"])


# ------------------------------------------------------------- preprocessing of the released towers
# Written out from each checkpoint's own preprocessing, not from astrea's constants:
# google/siglip-so400m-patch14-384 (preprocessor_config.json): 384x384, resample 3 (bicubic), mean = std = 0.5;
# RAM++ (recognize-anything's get_transform): Resize((384, 384)) (torchvision's bilinear default), ImageNet mean/std;
# IDEA-Research/grounding-dino-base (preprocessor_config.json): shortest edge 800, resample 2 (bilinear), ImageNet mean/std;
# facebook/sam2.1-hiera-large (SAM2Transforms / Sam2ImageProcessor): 1024x1024, bilinear, ImageNet mean/std.
_IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
PUBLISHED = {
    "caption": {"kind": "siglip", "size": 384, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "resample": "bicubic"},
    "classification": {"kind": "ram_plus", "size": 384, "image_mean": _IMAGENET[0], "image_std": _IMAGENET[1], "resample": "bilinear"},
    "detection": {"kind": "grounding_dino", "size": 800, "image_mean": _IMAGENET[0], "image_std": _IMAGENET[1], "resample": "bilinear"},
    "segmentation": {"kind": "sam2", "size": 1024, "image_mean": _IMAGENET[0], "image_std": _IMAGENET[1], "resample": "bilinear"},
}


@pytest.mark.parametrize("preset", ["astrea-13b", "astrea-34b", "tiny"])
def test_each_expert_gets_its_released_towers_preprocessing(preset):
    config = get_preset(preset)
    processor = AstreaImageProcessor.from_model_config(config)
    assert list(processor.experts) == list(config.expert_order)
    for role, spec in processor.experts.items():
        published = PUBLISHED[role]
        assert config.expert_configs[role].kind == published["kind"], role
        assert spec["image_mean"] == pytest.approx(published["image_mean"], abs=0), role
        assert spec["image_std"] == pytest.approx(published["image_std"], abs=0), role
        assert spec["resample"] == published["resample"], role
        if preset != "tiny":  # the tiny towers are built for 32-pixel inputs
            assert spec["size"] == published["size"], role
