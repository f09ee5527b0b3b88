"""The training loss: the reference recipe's, or a chunked linear cross-entropy that never
holds the B x T x V logits.

Reference (DESIGN.md): ``model(**batch).loss``. transformers computes every position's logits,
upcasts them to fp32 and runs cross-entropy; at the start of backward the fp32 log-softmax,
the grad of nll and the grad of log-softmax are alive together: about 12 x B x T x V bytes
(3 GiB for a 128k vocabulary at 4 x 512 tokens).

Chunked (``train.loss: chunked``, the default): the decoder runs alone (``get_decoder()``, so
the hidden states come from the same modules, LoRA/QLoRA/QAT layers and gradient checkpointing
included), then ``LinearCrossEntropy`` takes the hidden states, the output head's weight and
the labels, and walks the tokens in chunks: per chunk the logits, their fp32 softmax and the
gradient ``softmax - onehot`` are computed and turned at once into the gradient of the hidden
states (and of the head weight when it trains), then dropped. Backward only scales those
stored gradients. Same arithmetic as the reference (logits in the head's dtype, upcast to
fp32, mean over non-ignored labels after the one-token shift), same matmul count (the head's
forward, grad-input and grad-weight products: nothing is recomputed), and the largest
loss buffer is chunk x V instead of B x T x V.

Where it cannot apply (a head that is not a plain linear weight, logit soft-capping or
scaling, MoE router aux loss, a model without ``get_decoder``) the reference loss is used and
``make_loss`` says why; on the first batch the chunked loss is also checked against the
reference on one sequence and falls back if they disagree.
"""
from __future__ import annotations

from engine.estimate.memory import loss_chunk_tokens as auto_chunk   # pure Python: the estimate models this
from engine.vocab import LOSS_MODES                                    # one list for the estimate and the stage

IGNORE = -100
# config attributes that change the logits after the head: the chunked path would be wrong
LOGIT_MODIFIERS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def _linear_ce_forward(hidden, weight, bias, labels, chunk: int, need_w: bool, need_b: bool, need_h: bool):
    """(loss, grad_hidden, grad_weight, grad_bias) of mean CE over labels != -100, chunk by chunk.

    hidden (N, h), labels (N,) already shifted. Logits are computed in the compute dtype
    (autocast's, if on, else the weight's), upcast to fp32 like transformers' loss."""
    import torch
    n_valid = (labels != IGNORE).sum()
    denom = n_valid.clamp(min=1).to(torch.float32)
    dev = hidden.device.type
    cdt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else weight.dtype
    w = weight.to(cdt)
    b = bias.to(cdt) if bias is not None else None
    loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
    grad_h = torch.empty_like(hidden) if need_h else None
    grad_w = torch.zeros_like(weight) if need_w else None
    grad_b = torch.zeros_like(bias) if need_b else None
    with torch.autocast(dev, enabled=False):
        for i in range(0, hidden.shape[0], chunk):
            h = hidden[i:i + chunk].to(cdt)
            y = labels[i:i + chunk]
            logits = torch.nn.functional.linear(h, w, b)
            # fp32 log-softmax of the upcast logits (transformers' loss: logits.float(), cross_entropy),
            # in place: one fp32 C x V buffer (log_softmax(dtype=fp32) would add a second)
            logp = logits.float()                    # a new tensor, or the same one if fp32 already
            del logits
            logp.sub_(torch.logsumexp(logp, dim=-1, keepdim=True))
            valid = y != IGNORE
            yc = y.clamp(min=0)
            loss -= (logp.gather(1, yc[:, None])[:, 0] * valid).sum()
            # softmax - onehot, masked, / n_valid: the gradient of the mean loss w.r.t. the logits
            g = logp.exp_()                          # in place: one fp32 C x V buffer
            g[torch.arange(g.shape[0], device=g.device), yc] -= 1.0
            g.mul_((valid.to(torch.float32) / denom)[:, None])
            g = g.to(cdt)
            if need_h:
                grad_h[i:i + chunk] = (g @ w).to(hidden.dtype)
            if need_w:
                if grad_w.dtype == cdt:
                    grad_w.addmm_(g.t(), h)              # in place: no V x h temporary
                else:
                    grad_w += (g.t() @ h).to(grad_w.dtype)
            if need_b:
                grad_b += g.sum(0).to(grad_b.dtype)
            del g, logp
    return loss / denom, grad_h, grad_w, grad_b


def linear_cross_entropy(hidden, weight, bias, labels, chunk: int):
    """Mean cross-entropy of ``hidden @ weight.T + bias`` against ``labels`` (ignore -100),
    differentiable in hidden, weight and bias, never holding more than ``chunk`` rows of logits."""
    import torch

    class LinearCrossEntropy(torch.autograd.Function):
        @staticmethod
        def forward(ctx, hidden, weight, bias, labels):
            need_w, need_b = weight.requires_grad, bias is not None and bias.requires_grad
            loss, gh, gw, gb = _linear_ce_forward(hidden, weight, bias, labels, chunk, need_w, need_b,
                                                  hidden.requires_grad)
            ctx.save_for_backward(gh, gw, gb)
            return loss

        @staticmethod
        def backward(ctx, go):
            gh, gw, gb = ctx.saved_tensors
            return tuple(None if t is None else t * go.to(t.dtype) for t in (gh, gw, gb)) + (None,)

    return LinearCrossEntropy.apply(hidden, weight, bias, labels)


def shifted_labels(labels):
    """labels[:, 1:] padded with -100 at the end (position t predicts token t+1), flattened."""
    import torch
    pad = torch.full_like(labels[:, :1], IGNORE)
    return torch.cat([labels[:, 1:], pad], dim=1).reshape(-1)


def unwrap(model):
    """The transformers CausalLM under a peft wrapper (LoRA layers stay injected in it)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def why_not_chunked(model) -> str | None:
    """None when the chunked loss applies to this model, else the reason it does not."""
    import torch
    base = unwrap(model)
    cfg = getattr(base, "config", None)
    for a in LOGIT_MODIFIERS:
        v = getattr(cfg, a, None) if cfg is not None else None
        if v not in (None, 1, 1.0):
            return f"the model modifies its logits after the head ({a}={v})"
    if cfg is not None and getattr(cfg, "output_router_logits", False):
        return "the model adds a router aux loss (output_router_logits)"
    if not hasattr(base, "get_decoder") or not hasattr(base, "get_output_embeddings"):
        return f"{type(base).__name__} has no get_decoder/get_output_embeddings"
    try:
        dec, head = base.get_decoder(), base.get_output_embeddings()
    except Exception as e:                      # noqa: BLE001 - a model without them
        return f"{type(base).__name__}: {type(e).__name__} {e}"
    if dec is None or dec is base:
        return f"{type(base).__name__}.get_decoder() gives no separate decoder"
    if type(head) is not torch.nn.Linear:
        return f"the output head is a {type(head).__name__}, not a plain Linear"
    if type(head.weight.data) not in (torch.Tensor,) or head.weight.dtype not in (torch.float32, torch.bfloat16,
                                                                                     torch.float16):
        return f"the output head's weight is a {type(head.weight.data).__name__} {head.weight.dtype}"
    return None


def chunked_loss(model, batch: dict, chunk: int | None = None):
    """The chunked loss of one batch (input_ids, attention_mask, labels)."""
    base = unwrap(model)
    dec, head = base.get_decoder(), base.get_output_embeddings()
    kw = {k: v for k, v in batch.items() if k != "labels"}
    out = dec(**kw, use_cache=False)
    hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state
    h2 = hidden.reshape(-1, hidden.shape[-1])
    labels = shifted_labels(batch["labels"]).to(h2.device)
    c = chunk or auto_chunk(head.weight.shape[0], h2.shape[0])
    return linear_cross_entropy(h2, head.weight, head.bias, labels, c)


def reference_loss(model, batch: dict):
    return model(**batch).loss


def make_loss(model, mode: str = "chunked", chunk: int | None = None, first_batch: dict | None = None,
              log=None, warn=None):
    """(loss_fn(model, batch) -> scalar, the mode used, why the reference is used or None).

    ``first_batch``: checked on its first sequence, chunked vs reference (no grad); a mismatch
    falls back to the reference loss."""
    if mode not in LOSS_MODES:
        from engine.errors import InputError
        raise InputError(f"train.loss must be one of {', '.join(LOSS_MODES)}, got {mode!r}", field="train.loss")
    if mode == "reference":
        return reference_loss, "reference", None
    why = why_not_chunked(model)
    if why is None and first_batch is not None:
        why = check_against_reference(model, first_batch, chunk)
    if why is not None:
        if warn or log:
            (warn or log)(f"chunked loss not used: {why}; using the reference loss (B x T x V fp32 logits)")
        return reference_loss, "reference", why
    if log:
        log("loss: chunked linear cross-entropy (logits never held for all tokens at once)")
    return (lambda m, b: chunked_loss(m, b, chunk)), "chunked", None


def check_against_reference(model, batch: dict, chunk: int | None = None, rtol: float = 5e-3) -> str | None:
    """Compare both losses on the batch's first sequence without gradients; None when they agree."""
    import torch
    one = {k: v[:1] for k, v in batch.items()}
    if int((one["labels"][:, 1:] != IGNORE).sum()) == 0:
        return None
    was = model.training
    model.eval()                                      # no dropout: the two forwards must see the same model
    try:
        with torch.no_grad():
            ref = float(reference_loss(model, one))
            got = float(chunked_loss(model, one, chunk))
    finally:
        model.train(was)
    if not (abs(ref - got) <= rtol * max(1.0, abs(ref))):
        return f"on the first sequence the chunked loss {got:.5f} differs from the model's own {ref:.5f}"
    return None
