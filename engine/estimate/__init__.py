"""Estimates: memory, speed, accuracy, cost. Pure Python; never imports torch.

Public API (what the CLI, the advisor and the UI call):
    estimate_train(model, method, precision="bf16", seq_len=512, batch_size=4,
                   grad_ckpt=True, lora_rank=16, gpu=None) -> dict
    estimate_infer(model, weights="bf16", batch_size=1, prompt_len=512,
                   new_tokens=128, gpu=None) -> dict
    estimate_accuracy(family, params_b, method, w_bits, a_bits=16, group_size=None,
                      per_channel=False, finetune="none") -> dict
"""
