"""Attribution: which component and module each live tensor belongs to (parameters by type, module hooks for
activations, the logits/loss window), and what each phase leaves alive."""
from __future__ import annotations

from memplan.trace.tracker import LiveBytesTracker


def register_model(tracker: LiveBytesTracker, model) -> None:
    """Every parameter (a sharded one by its local shard: FSDP2's DTensors) and buffer by component."""
    import bitsandbytes as bnb

    seen = set()
    for mname, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            full = f"{mname}.{pname}"
            local = p.to_local() if hasattr(p, "to_local") else p  # a DTensor holds its shard
            if isinstance(p, (bnb.nn.Params4bit, bnb.nn.Int8Params)) or (
                    isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)) and pname == "weight"):
                tracker.register(local, "weights_quantized", mname)
                qs = getattr(p, "quant_state", None) or getattr(module, "quant_state", None)
                extra = _quant_state_tensors(qs) if qs is not None else [getattr(p, "SCB", None)]
                for t in extra:
                    if t is not None:
                        tracker.register(t, "quant_state", mname)
            elif p.requires_grad and ("lora_" in full or "modules_to_save" in full):
                tracker.register(local, "lora", mname)
            else:
                tracker.register(local, "weights_unquantized", mname)
    for name, b in model.named_buffers():
        tracker.register(b, "weights_unquantized", name.rsplit(".", 1)[0])


def _quant_state_tensors(qs):
    out = [qs.absmax, qs.code, getattr(qs, "offset", None)]
    s2 = getattr(qs, "state2", None)
    if s2 is not None:
        out += [s2.absmax, s2.code]
    return [t for t in out if t is not None and hasattr(t, "untyped_storage")]


class Attribution:
    """Module names for allocations, and the logits/loss window, via global module hooks."""

    def __init__(self, tracker: LiveBytesTracker, model):
        import torch

        self.tracker = tracker
        self.names = {id(m): n for n, m in model.named_modules()}
        self.stack: list[str] = []
        self.bwd_module = ""
        self.tail = False  # forward: after the output layer began; backward: until the logits' grad is ready
        self.head_ids = {id(m) for n, m in model.named_modules() if n.split(".")[-1] == "lm_head"}
        self.handles = [
            torch.nn.modules.module.register_module_forward_pre_hook(self._pre),
            torch.nn.modules.module.register_module_forward_hook(self._post),
        ]
        tracker.classify = self._classify

    def _pre(self, module, args):
        name = self.names.get(id(module))
        if name is None:
            return
        self.stack.append(name)
        self.tracker.module = name
        if id(module) in self.head_ids and self.tracker.phase == "forward":
            self.tail = True

    def _post(self, module, args, output):
        name = self.names.get(id(module))
        if name is None:
            return
        if self.stack and self.stack[-1] == name:
            self.stack.pop()
        self.tracker.module = self.stack[-1] if self.stack else ""
        import torch

        if isinstance(output, torch.Tensor) and output.grad_fn is not None:
            if self.tracker.phase == "forward" and output.requires_grad:
                if id(module) in self.head_ids:
                    output.register_hook(self._logits_grad_ready)
                output.register_hook(lambda grad, name=name: self._backward_of(name))

    def _backward_of(self, name):
        self.bwd_module = name
        return None

    def _logits_grad_ready(self, grad):
        self.tail = False
        return None

    def _classify(self, tensor, rec):
        phase = self.tracker.phase
        if phase == "forward":
            if self.tail:
                rec.category = "logits_loss"
        elif phase == "backward":
            import torch

            if self.stack:  # checkpoint recomputation: the forward hooks name the module
                rec.module = self.stack[-1] + " (recompute)"
            else:
                node = torch._C._current_autograd_node()
                where = self.bwd_module or "loss"
                rec.module = f"{where} ({node.name()})" if node is not None else where
            if self.tail:
                rec.category = "logits_loss"

    def start_phase(self, phase: str) -> None:
        if phase == "backward":
            self.tail = True  # the loss and logits gradients come first
        elif phase == "forward":
            self.tail = False
        self.stack.clear()
        self.tracker.module = ""

    def close(self):
        for h in self.handles:
            h.remove()
        self.tracker.classify = None


def finish_phase(tracker: LiveBytesTracker, phase: str, since: int, model, optimizer) -> None:
    """Label what a phase leaves alive: forward -> activations, backward -> gradients, optimizer -> states."""
    survivors = [r for r in tracker._live.values() if r.event >= since and r.phase == phase]
    if phase == "forward":
        for r in survivors:
            if r.category == "temporaries":
                r.category = "activations"
    elif phase == "backward":
        for p in model.parameters():
            if p.grad is not None:
                tracker.label(p.grad, "gradients")
    elif phase == "optimizer":
        for r in survivors:
            r.category = "optimizer_states"
