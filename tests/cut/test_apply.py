"""Truncated backward: exact gradients, no graph below the cut, exact restore, refused bad input."""

import copy

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from freezekern import discover, tiny_model
from freezekern.cut import active_handle, apply, move_boundary, trainable_parameters
from freezekern.policy.rules import plan as make_plan

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

L = 6
SETUPS = ["plain", "gc_reentrant", "gc_nonreentrant", "input_grads"]


def _model(kind="llama", tie=False, seed=0):
    model = tiny_model(kind, num_layers=L, hidden=64, vocab=257, tie=tie, seed=seed)
    model.train()
    return model


def _batch(seed=0, batch=2, seq=12):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 257, (batch, seq), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # some left padding
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _setup(model, setup):
    if setup == "gc_reentrant":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    elif setup == "gc_nonreentrant":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif setup == "input_grads":
        model.enable_input_require_grads()
    return model


def _freeze_like(reference, handled):
    """Freeze in ``reference`` the parameters (by name) that ``handled`` has frozen."""
    trainable = {n for n, p in handled.named_parameters() if p.requires_grad}
    for n, p in reference.named_parameters():
        p.requires_grad_(n in trainable)


def _step(model, batch, inputs_embeds=False):
    model.zero_grad(set_to_none=True)
    if inputs_embeds:
        # a detached lookup; a leaf that requires grad, as reentrant checkpointing needs one
        embeds = model.get_input_embeddings()(batch["input_ids"]).detach().requires_grad_(True)
        out = model(inputs_embeds=embeds, attention_mask=batch["attention_mask"], labels=batch["labels"],
                    use_cache=False)
    else:
        out = model(**batch, use_cache=False)
    out.loss.backward()
    return out.loss.detach()


def _assert_same_grads(handled, reference, loss_h, loss_r):
    assert torch.equal(loss_h, loss_r) or torch.allclose(loss_h, loss_r, rtol=1e-6, atol=1e-7)
    ref = dict(reference.named_parameters())
    checked = 0
    for name, p in handled.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"{name} got no gradient"
            torch.testing.assert_close(p.grad, ref[name].grad, rtol=1e-5, atol=1e-7, msg=name)
            checked += 1
        else:
            assert p.grad is None, f"frozen {name} got a gradient"
    assert checked > 0


def _exact(model, k, setup, *, train_head=None, inputs_embeds_ref=False, seed=0):
    reference = copy.deepcopy(model)
    handle = apply(model, k, train_head=train_head)
    _freeze_like(reference, model)
    _setup(model, setup)
    _setup(reference, setup)
    batch = _batch(seed)
    loss_h = _step(model, batch)
    loss_r = _step(reference, batch, inputs_embeds=inputs_embeds_ref)
    _assert_same_grads(model, reference, loss_h, loss_r)
    return handle, reference


@pytest.mark.parametrize("setup", SETUPS)
@pytest.mark.parametrize("k", [0, 3, L])
def test_llama_gradients_exact(setup, k):
    _exact(_model("llama"), k, setup)


@pytest.mark.parametrize("setup", ["plain", "gc_reentrant", "gc_nonreentrant"])
def test_gpt2_gradients_exact(setup):
    model = _model("gpt2", tie=True)  # tied: head frozen by default
    handle, _ = _exact(model, 2, setup)
    assert handle.parts.tied and not handle.train_head
    assert not model.lm_head.weight.requires_grad


@pytest.mark.parametrize("setup", ["plain", "gc_reentrant", "gc_nonreentrant"])
def test_tied_head_frozen_by_default(setup):
    model = _model("llama", tie=True)
    handle, _ = _exact(model, 4, setup)
    assert handle.parts.tied and not handle.train_head
    assert not model.get_input_embeddings().weight.requires_grad
    assert model.get_input_embeddings().weight.grad is None


@pytest.mark.parametrize("setup", ["plain", "gc_reentrant", "gc_nonreentrant"])
def test_tied_head_trained_through_output_use_only(setup):
    model = _model("llama", tie=True)
    # Reference: the plain model whose embedding lookup is detached, i.e. the tied matrix learns from the head.
    handle, reference = _exact(model, 4, setup, train_head=True, inputs_embeds_ref=True)
    shared = model.get_input_embeddings().weight
    assert shared is model.lm_head.weight and shared.requires_grad and shared.grad is not None
    # The cut stays: the embedding lookup built no graph, so the head gradient is all it got.
    plain = copy.deepcopy(reference)
    _step(plain, _batch(0))
    assert not torch.allclose(plain.lm_head.weight.grad, shared.grad)  # a full backward would add the lookup


def test_plan_from_trace_applies_and_is_exact():
    model = _model("llama", tie=True)
    parts = discover(model)
    plan = make_plan(parts.summary(), "fixed", boundary=3)
    reference = copy.deepcopy(model)
    handle = apply(model, plan)
    assert handle.boundary == 3 and handle.plan is plan and not handle.train_head
    _freeze_like(reference, model)
    batch = _batch(1)
    _assert_same_grads(model, reference, _step(model, batch), _step(reference, batch))


# -- no graph below the cut --------------------------------------------------------------------

def _graph_leaves(loss):
    """Variables of all AccumulateGrad nodes reachable from loss.grad_fn."""
    seen, stack, leaves = set(), [loss.grad_fn], []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if hasattr(node, "variable"):
            leaves.append(node.variable)
        stack.extend(next_fn for next_fn, _ in node.next_functions)
    return leaves, len(seen)


@pytest.mark.parametrize("setup", SETUPS)
def test_no_graph_below_cut_and_no_frozen_backward(setup):
    k = 4
    model = _model("llama")
    reference = copy.deepcopy(model)
    apply(model, k)
    _freeze_like(reference, model)
    for m in (model, reference):
        _setup(m, setup)

    seen = {"cut_input": None, "frozen_outputs": []}
    model.model.layers[k].register_forward_pre_hook(lambda mod, args: seen.__setitem__("cut_input", args[0]))
    backward_calls = {"handled": 0, "reference": 0}

    def count(tag):
        def hook(module, grad_input, grad_output):
            backward_calls[tag] += 1
        return hook

    for i in range(k):
        model.model.layers[i].register_forward_hook(lambda mod, a, out: seen["frozen_outputs"].append(out))
        model.model.layers[i].register_full_backward_hook(count("handled"))
        reference.model.layers[i].register_full_backward_hook(count("reference"))
    embed_out = []
    model.get_input_embeddings().register_forward_hook(lambda mod, a, out: embed_out.append(out))

    batch = _batch(2)
    with FlopCounterMode(display=False) as flops_h:
        out = model(**batch, use_cache=False)
    cut = seen["cut_input"]
    assert cut.grad_fn is None and cut.is_leaf
    assert cut.requires_grad == (setup == "gc_reentrant")  # a leaf only where reentrant checkpointing needs one
    for o in seen["frozen_outputs"]:
        assert o.grad_fn is None and not o.requires_grad
    assert all(e.grad_fn is None for e in embed_out)
    leaves, nodes_h = _graph_leaves(out.loss)
    trainable = {id(p) for p in trainable_parameters(model)}
    assert {id(v) for v in leaves} <= trainable | {id(cut)}

    with FlopCounterMode(display=False) as bwd_h:
        out.loss.backward()
    out_r = reference(**batch, use_cache=False)
    _, nodes_r = _graph_leaves(out_r.loss)
    with FlopCounterMode(display=False) as bwd_r:
        out_r.loss.backward()
    assert backward_calls["handled"] == 0
    if setup != "plain":  # the plain-freezing trap: input grads make the backward run through frozen blocks
        assert backward_calls["reference"] > 0
        # with checkpointing the reference also recomputes every frozen block; without, it runs their input grads
        limit = 0.7 if setup == "input_grads" else 0.5
        assert bwd_h.get_total_flops() < limit * bwd_r.get_total_flops()
    assert nodes_h < nodes_r or setup == "plain"
    assert flops_h.get_total_flops() > 0
    for p in model.parameters():
        if not p.requires_grad:
            assert p.grad is None


def test_frozen_prefix_saves_no_activations():
    model = _model("llama")
    _setup(model, "input_grads")
    reference = copy.deepcopy(model)
    apply(model, 4)
    _freeze_like(reference, model)
    saved = {}

    def measure(m, tag):
        total = [0]

        def pack(t):
            total[0] += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            m(**_batch(3), use_cache=False).loss.backward()
        saved[tag] = total[0]

    measure(model, "handled")
    measure(reference, "reference")
    assert saved["handled"] < 0.6 * saved["reference"]


# -- exact restore ----------------------------------------------------------------------------

def _hook_counts(model):
    return {name: (len(m._forward_pre_hooks), len(m._forward_hooks), "forward" in m.__dict__)
            for name, m in model.named_modules()}


@pytest.mark.parametrize("setup", ["plain", "gc_reentrant"])
def test_remove_restores_exactly(setup):
    model = _model("llama", tie=True)
    _setup(model, setup)
    untouched = copy.deepcopy(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    hooks = _hook_counts(model)
    handle = apply(model, 3)
    assert active_handle(model) is handle
    _step(model, _batch(4))
    handle.remove()
    assert not handle.active and active_handle(model) is None
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert _hook_counts(model) == hooks
    batch = _batch(5)
    _assert_same_grads(model, untouched, _step(model, batch), _step(untouched, batch))
    with pytest.raises(RuntimeError, match="already removed"):
        handle.remove()


def test_context_manager_and_reapply():
    model = _model("llama")
    with apply(model, 2) as handle:
        assert handle.boundary == 2
    assert not handle.active
    again = apply(model, 5)
    assert again.boundary == 5
    again.remove()


def test_remove_refuses_when_forward_rewrapped():
    model = _model("llama")
    handle = apply(model, 2)
    block = model.model.layers[0]
    wrapped = block.forward
    block.forward = lambda *a, **kw: wrapped(*a, **kw)
    with pytest.raises(RuntimeError, match="something replaced"):
        handle.remove()
    block.forward = wrapped
    handle.remove()


def test_exception_inside_prefix_leaves_grad_mode_on():
    model = _model("llama")
    apply(model, 3)

    def boom(module, args, output):
        raise ValueError("boom")

    hook = model.model.layers[1].register_forward_hook(boom)
    with pytest.raises(ValueError, match="boom"):
        model(**_batch(0))
    assert torch.is_grad_enabled()
    hook.remove()
    _step(model, _batch(0))


def test_generate_and_eval_under_plan():
    model = _model("llama")
    handle = apply(model, 3)
    model.eval()
    with torch.no_grad():
        out = model.generate(_batch(0)["input_ids"][:1, :5], max_new_tokens=3, do_sample=False)
    assert out.shape[1] == 8
    handle.remove()


# -- bad input --------------------------------------------------------------------------------

def test_bad_boundaries_and_plans():
    model = _model("llama")
    for k in (-1, L + 1):
        with pytest.raises(ValueError, match="outside"):
            apply(model, k)
    with pytest.raises(TypeError):
        apply(model, True)
    other = tiny_model("llama", num_layers=L, hidden=32, vocab=257)
    foreign = make_plan(discover(other).summary(), "fixed", boundary=2)
    with pytest.raises(ValueError, match="another model"):
        apply(model, foreign)
    deeper = tiny_model("llama", num_layers=L + 2, hidden=64, vocab=257)
    with pytest.raises(ValueError, match="blocks"):
        apply(model, make_plan(discover(deeper).summary(), "fixed", boundary=2))
    handle = apply(model, 2)
    with pytest.raises(RuntimeError, match="already applied"):
        apply(model, 3)
    handle.remove()
    with pytest.raises(ValueError, match="frozen_adapters"):
        apply(model, 2, frozen_adapters="ignore")


class _ToyBlock(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.linear = nn.Linear(dim, dim)

    def forward(self, hidden_states=None, x=None):
        h = hidden_states if hidden_states is not None else x
        return h + torch.tanh(self.linear(h))


class _ToyLM(nn.Module):
    """A causal LM whose forward can be made to bypass module calls or pass the state oddly."""

    def __init__(self, call_style="call", share=False):
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.layers = nn.ModuleList(_ToyBlock(16) for _ in range(4))
        if share:
            self.layers[3].linear = self.layers[0].linear
        self.norm = nn.LayerNorm(16)
        self.lm_head = nn.Linear(16, 50, bias=False)
        self.call_style = call_style

    def get_input_embeddings(self):
        return self.embed

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids):
        h = self.embed(input_ids)
        for block in self.layers:
            if self.call_style == "bypass":
                h = block.forward(h)
            elif self.call_style == "keyword":
                h = block(x=h)
            else:
                h = block(h)
        return self.lm_head(self.norm(h)).logsumexp(-1).mean()


def test_forward_that_cannot_be_cut_is_reported():
    ids = torch.randint(0, 50, (2, 5))
    ok = _ToyLM()
    apply(ok, 2)
    ok(ids).backward()
    assert ok.layers[0].linear.weight.grad is None and ok.layers[2].linear.weight.grad is not None

    bypass = _ToyLM("bypass")
    apply(bypass, 2)
    with pytest.raises(RuntimeError, match="cannot be cut cleanly"):
        bypass(ids)
    keyword = _ToyLM("keyword")
    apply(keyword, 2)
    with pytest.raises(TypeError, match="cannot cut the input of block 3"):
        keyword(ids)
    with pytest.raises(ValueError, match="shared between the frozen prefix"):
        apply(_ToyLM(share=True), 2)


def test_blocks_replaced_after_apply_are_reported():
    model = _model("llama")
    apply(model, 2)
    model.model.layers[1] = copy.deepcopy(model.model.layers[1])
    with pytest.raises(RuntimeError, match="replaced after the freeze plan"):
        model(**_batch(0))


# -- PEFT -------------------------------------------------------------------------------------

peft = pytest.importorskip("peft")


def _lora(model, layers, **extra):
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                             layers_to_transform=layers, layers_pattern="layers", lora_dropout=0.0,
                             task_type="CAUSAL_LM", **extra)
    lora = peft.get_peft_model(model, config)
    for name, p in lora.named_parameters():  # LoRA B starts at zero; make gradients of A non-trivial too
        if "lora_B" in name:
            nn.init.normal_(p, std=0.02)
    return lora


@pytest.mark.parametrize("setup", ["plain", "gc_reentrant", "gc_nonreentrant"])
@pytest.mark.parametrize("k,layers", [(4, [4, 5]), (2, [4, 5])])
def test_peft_lora_top_exact(setup, k, layers):
    model = _lora(_model("llama", tie=True), layers)
    handle, _ = _exact(model, k, setup)
    lora_grads = [n for n, p in model.named_parameters() if "lora_" in n and p.grad is not None]
    assert len(lora_grads) == len(layers) * 3 * 2
    assert handle.plan is None


def test_peft_plan_made_before_lora_is_accepted():
    base = _model("llama", tie=True)
    plan = make_plan(discover(base).summary(), "fixed", boundary=4)
    from freezekern.integrations.peft import lora_config_for_plan

    lora = peft.get_peft_model(base, lora_config_for_plan(plan, model=base, r=4, target_modules=["q_proj"]))
    handle = apply(lora, plan)
    assert handle.boundary == 4
    trained = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert trained and all(".layers.4." in n or ".layers.5." in n for n in trained)


def test_lora_in_frozen_blocks_refused_or_frozen():
    model = _lora(_model("llama"), list(range(L)))
    with pytest.raises(ValueError, match="lora_config_for_plan"):
        apply(model, 3)
    assert active_handle(model) is None
    reference = copy.deepcopy(model)
    handle = apply(model, 3, frozen_adapters="freeze")
    assert len(handle.frozen_adapter_names) == 3 * 3 * 2
    _freeze_like(reference, model)
    _setup(model, "gc_reentrant")
    _setup(reference, "gc_reentrant")
    batch = _batch(6)
    _assert_same_grads(model, reference, _step(model, batch), _step(reference, batch))
    handle.remove()
    assert sum(p.requires_grad for n, p in model.named_parameters() if "lora_" in n) == L * 3 * 2


# -- moving the boundary ----------------------------------------------------------------------

@pytest.mark.parametrize("setup", ["plain", "gc_reentrant"])
def test_move_boundary_deeper_keeps_exact_gradients(setup):
    model = _model("llama")
    _setup(model, setup)
    reference = copy.deepcopy(model)
    handle = apply(model, 2)
    optimizer = torch.optim.AdamW(trainable_parameters(model), lr=1e-3)
    _step(model, _batch(7))
    optimizer.step()
    moving = [p for p in model.model.layers[2].parameters()] + [p for p in model.model.layers[3].parameters()]
    assert all(p in optimizer.state for p in moving)
    with pytest.raises(ValueError, match="only moves deeper"):
        move_boundary(handle, 1)
    new = move_boundary(handle, 4, optimizer=optimizer)
    assert not handle.active and new.active and new.boundary == 4
    assert all(p not in optimizer.state and p.grad is None and not p.requires_grad for p in moving)
    reference.load_state_dict(model.state_dict())
    _freeze_like(reference, model)
    batch = _batch(8)
    _assert_same_grads(model, reference, _step(model, batch), _step(reference, batch))
    optimizer.step()  # the newly frozen parameters have no gradient: AdamW skips them
    assert all(p not in optimizer.state for p in moving)


def test_move_boundary_checks_before_it_changes_anything():
    model = _model("llama")
    handle = apply(model, 3)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    other = _model("llama")
    other.model.layers = other.model.layers[:4]
    foreign = make_plan(discover(other).summary(), "fixed", boundary=3)
    for bad, error in ((L + 1, ValueError), (2, ValueError), (foreign, ValueError), ("4", TypeError)):
        with pytest.raises(error):
            move_boundary(handle, bad)
        assert handle.active and active_handle(model) is handle
        assert {n for n, p in model.named_parameters() if not p.requires_grad} == frozen
    full = make_plan(discover(model).summary(), "none")
    with pytest.raises(ValueError, match="full-fine-tuning plan"):
        move_boundary(handle, full)
    assert handle.active


def test_move_boundary_restores_the_old_cut_when_applying_fails(monkeypatch):
    import freezekern.cut.freeze as truncate

    model = _model("llama")
    handle = apply(model, 2)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    real_wrap = truncate._wrap_forward
    calls = {"n": 0}

    def failing_wrap(h, module, state):
        calls["n"] += 1
        if calls["n"] == 3:  # part-way through applying the new boundary
            raise RuntimeError("wrapper failed")
        return real_wrap(h, module, state)

    monkeypatch.setattr(truncate, "_wrap_forward", failing_wrap)
    with pytest.raises(RuntimeError, match="wrapper failed"):
        move_boundary(handle, 4)
    monkeypatch.setattr(truncate, "_wrap_forward", real_wrap)
    restored = active_handle(model)
    assert restored is not None and restored.active and restored.boundary == 2
    assert {n for n, p in model.named_parameters() if not p.requires_grad} == frozen
    batch = _batch(1)
    loss = model(**batch, use_cache=False).loss
    loss.backward()
    assert all(p.grad is None for p in model.model.layers[1].parameters())
    assert all(p.grad is not None for p in model.model.layers[2].parameters())


def test_a_full_finetuning_plan_freezes_nothing():
    model = _model("llama", tie=True)
    before = [p.requires_grad for p in model.parameters()]
    handle = apply(model, make_plan(discover(model).summary(), "none"))
    assert not handle.cut and handle.boundary == 0 and all(p.requires_grad for p in model.parameters())
    assert model.model.embed_tokens.__dict__.get("forward") is None  # no forward was replaced
    model.train()
    model(**_batch(2), use_cache=False).loss.backward()
    assert model.model.embed_tokens.weight.grad is not None
    handle.remove()
    assert [p.requires_grad for p in model.parameters()] == before
    zero = apply(model, 0)  # a bare k = 0 is not full fine-tuning: the embeddings and the tied head freeze
    assert zero.cut and not model.model.embed_tokens.weight.requires_grad
    zero.remove()


def test_trainable_tensors_outside_embeddings_blocks_and_head_are_refused_by_name():
    model = _model()
    model.model.projector = nn.Linear(8, 8)  # a VLM-style projector: trainable, outside every part the cut knows
    with pytest.raises(ValueError, match=r"model\.projector\.weight.*freeze_outside=True"):
        apply(model, 2)
    assert all(p.requires_grad for p in model.parameters()) and active_handle(model) is None
    handle = apply(model, 2, freeze_outside=True)
    assert not model.model.projector.weight.requires_grad
    moved = move_boundary(handle, 3)  # the choice is kept across moves
    moved.remove()
    assert model.model.projector.weight.requires_grad
    model.model.projector.requires_grad_(False)  # frozen by the user: nothing to refuse
    apply(model, 2).remove()


def test_position_embeddings_are_part_of_the_frozen_embeddings():
    model = _model("gpt2")
    handle = apply(model, 2)
    frozen = {id(p) for p in handle.frozen_parameters()}
    assert id(model.transformer.wpe.weight) in frozen and id(model.transformer.wte.weight) in frozen
    handle.remove()


def test_calls_from_two_threads_keep_their_own_cut_state():
    import threading

    model = _model()
    apply(model, 2)
    ids = torch.randint(3, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    second_started, first_done, errors = threading.Event(), threading.Event(), []

    def call():
        try:
            model(input_ids=ids, labels=ids).loss.backward()
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)
        finally:
            if threading.current_thread().name == "first":
                first_done.set()

    second = threading.Thread(target=call, name="second")

    # above the cut, the first call starts the second one and waits until it has begun (its per-call state
    # set up); the second waits below its cut until the first call is done
    def start_second(module, args):
        if threading.current_thread().name == "first":
            second.start()
            second_started.wait(5)

    def wait_for_first(module, args):
        if threading.current_thread().name == "second":
            second_started.set()
            first_done.wait(5)

    model.model.layers[4].register_forward_pre_hook(start_second)
    model.model.layers[0].register_forward_pre_hook(wait_for_first)
    first = threading.Thread(target=call, name="first")
    first.start()
    first.join()
    second.join()
    assert errors == []
