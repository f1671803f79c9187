"""Zero-shot evaluation with lm-eval (0.4): the compiled model under its ``HFLM`` harness, local tasks offline.

``HFLM`` accepts an already-built model object; ``HFStyleModel`` gives the compiled model the face it expects
(``.config``, ``.device``, ``forward(...).logits``, ``generate``). ``write_mc_tasks`` turns JSONL files of
``{"question", "choices", "label"}`` records into lm-eval task YAMLs (``dataset_path: json``), so nothing is
fetched from a hub.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn


class HFStyleModel(nn.Module):
    """What lm-eval's HFLM calls: ``model(input_ids).logits``, ``model.config``, ``model.device``."""

    def __init__(self, qmodel, hf_config):
        super().__init__()
        self.qmodel = qmodel
        self.config = hf_config

    @property
    def device(self) -> torch.device:
        return self.qmodel.device

    @property
    def dtype(self) -> torch.dtype:
        return self.qmodel.dtype

    def tie_weights(self) -> None:  # HFLM may call it; the compiled model's weights are already tied
        pass

    def forward(self, input_ids, attention_mask=None, **_):
        from transformers.modeling_outputs import CausalLMOutput

        # causal model, right-padded batches: padding after a sequence cannot change its logits
        return CausalLMOutput(logits=self.qmodel(input_ids))

    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, max_length=None, max_new_tokens=None, pad_token_id=None,
                 eos_token_id=None, **_):
        """Greedy generation, one (left-padded) row at a time through the compiled model's KV cache."""
        T = input_ids.shape[1]
        new = max_new_tokens if max_new_tokens is not None else max(1, (max_length or T + 1) - T)
        rows = []
        for b in range(input_ids.shape[0]):
            ids = input_ids[b : b + 1]
            if attention_mask is not None:
                ids = ids[:, attention_mask[b].bool()]
            out = self.qmodel.generate(ids, max_new_tokens=new, eos_token_id=eos_token_id)
            pad = torch.full((1, T + new - out.shape[1]), pad_token_id or 0, dtype=out.dtype, device=out.device)
            rows.append(torch.cat([pad, out], dim=1))
        return torch.cat(rows)


def hflm(qmodel, tokenizer, batch_size: int = 8):
    """An lm-eval ``HFLM`` around a compiled (or loaded) model."""
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoConfig

    if qmodel.hf_config is None:
        raise ValueError("the compiled model has no source config; compile from a transformers model")
    hf = dict(qmodel.hf_config)
    config = AutoConfig.for_model(hf.pop("model_type"), **hf)
    return HFLM(pretrained=HFStyleModel(qmodel, config), tokenizer=tokenizer, batch_size=batch_size,
                max_length=getattr(config, "max_position_embeddings", 2048))


MC_TEMPLATE = {
    "dataset_path": "json",
    "test_split": "train",
    "output_type": "multiple_choice",
    "doc_to_text": "{{question}}\nAnswer:",
    "doc_to_choice": "{{choices}}",
    "doc_to_target": "{{label}}",
    "metric_list": [
        {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
        {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
    ],
    "metadata": {"version": 1.0},
}


def write_mc_tasks(data_dir: str | Path, out_dir: str | Path, prefix: str = "local_") -> list[str]:
    """One lm-eval task per ``*.jsonl`` file of multiple-choice records; returns the task names."""
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    files = sorted(data_dir.glob("*.jsonl"))
    if not files:
        raise FileNotFoundError(f"no *.jsonl files in {data_dir}")
    out_dir.mkdir(parents=True, exist_ok=True)
    names = []
    for f in files:
        first = json.loads(f.open().readline())
        if not {"question", "choices", "label"} <= set(first):
            raise ValueError(f"{f}: records need question, choices and label fields, found {sorted(first)}")
        name = f"{prefix}{f.stem}"
        task = {"task": name, "dataset_kwargs": {"data_files": {"train": str(f.resolve())}}, **MC_TEMPLATE}
        (out_dir / f"{name}.yaml").write_text(json.dumps(task, indent=2))  # JSON is valid YAML
        names.append(name)
    return names


def evaluate(qmodel, tokenizer, tasks: list[str], include_path: str | None = None, limit: int | None = None,
             batch_size: int = 8) -> dict:
    """lm_eval.simple_evaluate on the compiled model; returns lm-eval's results dict."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=include_path) if include_path else TaskManager()
    return lm_eval.simple_evaluate(model=hflm(qmodel, tokenizer, batch_size), tasks=tasks, task_manager=manager,
                                   limit=limit, log_samples=False)
