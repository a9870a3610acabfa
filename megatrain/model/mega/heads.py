"""The four downstream heads of transformers' MEGA (fine-tuning), on megatrain's backbone.

Use:
    from megatrain.model import MegaConfig, MegaForSequenceClassification
    model = MegaForSequenceClassification(MegaConfig(vocab_size=256, hidden_size=64), num_labels=3)
    out = model(input_ids, attention_mask=None, token_type_ids=None, labels=None)   # out.logits [B, 3]; out.loss
    MegaForTokenClassification(config, num_labels)   logits [B, L, num_labels]; labels [B, L] (-100 ignored)
    MegaForQuestionAnswering(config, num_labels=2)   out.start_logits / out.end_logits [B, L];
                                                     start_positions / end_positions [B]
    MegaForMultipleChoice(config)                    input_ids [B, C, L] -> logits [B, C]; labels [B]
    MegaModelWithPooler(config, add_pooling_layer)   transformers' bare MegaModel: last_hidden_state, pooler_output
Tests: PYTHONPATH=. python -m pytest -q tests/hf/test_hf_heads.py

Same modules, parameter layout and numbers as transformers 4.57.6 (the HF key map is megatrain/hf/format.py):
sequence classification = first position -> dropout -> dense -> tanh -> dropout -> out_proj (RoBERTa's head);
token classification = dropout -> linear per position; QA = linear to (start, end) per position; multiple choice
= every choice through the backbone, pooler (first position -> dense -> tanh) -> dropout -> linear to 1 score.
The losses follow transformers too (problem_type regression / single_label / multi_label for sequence
classification; QA positions clamped to L and ignored there). The label count is a constructor argument, not a
MegaConfig field: in a Hugging Face config.json it is len(id2label).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from megatrain.model.mega.config import MegaConfig
from megatrain.model.mega.backbone import MegaModel, init_weights_

PROBLEM_TYPES = ("regression", "single_label_classification", "multi_label_classification")


@dataclass
class HeadOutput:
    logits: Optional[torch.Tensor] = None
    loss: Optional[torch.Tensor] = None
    start_logits: Optional[torch.Tensor] = None
    end_logits: Optional[torch.Tensor] = None
    last_hidden_state: Optional[torch.Tensor] = None
    pooler_output: Optional[torch.Tensor] = None


class _MegaHead(nn.Module):
    """Backbone + a task head. The backbone is called as self.mega(input_ids, attention_mask, token_type_ids)."""

    def __init__(self, config: MegaConfig, num_labels: int):
        super().__init__()
        if not isinstance(num_labels, int) or isinstance(num_labels, bool) or num_labels < 1:
            raise ValueError(f"num_labels={num_labels!r}: must be an int >= 1")
        self.config = config
        self.num_labels = num_labels
        self.mega = MegaModel(config)
        self.classifier_dropout = (config.classifier_dropout if config.classifier_dropout is not None
                                   else config.hidden_dropout_prob)

    def init_weights(self) -> None:
        init_weights_(self, self.config)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.mega.embeddings.word_embeddings


class ClassificationHead(nn.Module):
    """x[:, 0] -> dropout -> dense -> tanh -> dropout -> out_proj."""

    def __init__(self, hidden_size: int, num_labels: int, dropout: float):
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.dropout = nn.Dropout(dropout)
        self.out_proj = nn.Linear(hidden_size, num_labels)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = self.dropout(h[:, 0])
        x = self.dropout(torch.tanh(self.dense(x)))
        return self.out_proj(x)


class MegaForSequenceClassification(_MegaHead):
    def __init__(self, config: MegaConfig, num_labels: int = 2, problem_type: Optional[str] = None):
        super().__init__(config, num_labels)
        if problem_type is not None and problem_type not in PROBLEM_TYPES:
            raise ValueError(f"problem_type={problem_type!r}: expected None or one of {PROBLEM_TYPES}")
        self.problem_type = problem_type
        self.classifier = ClassificationHead(config.hidden_size, num_labels, self.classifier_dropout)
        self.init_weights()

    def _problem_type(self, labels: torch.Tensor) -> str:
        # transformers' rule, decided from the first labels seen when the config does not say
        if self.problem_type is None:
            if self.num_labels == 1:
                self.problem_type = "regression"
            elif labels.dtype in (torch.long, torch.int):
                self.problem_type = "single_label_classification"
            else:
                self.problem_type = "multi_label_classification"
        return self.problem_type

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None) -> HeadOutput:
        h = self.mega(input_ids, attention_mask, token_type_ids)
        logits = self.classifier(h)
        out = HeadOutput(logits=logits, last_hidden_state=h)
        if labels is not None:
            kind = self._problem_type(labels)
            if kind == "regression":
                out.loss = (F.mse_loss(logits.squeeze(), labels.squeeze().to(logits.dtype)) if self.num_labels == 1
                            else F.mse_loss(logits, labels.to(logits.dtype)))
            elif kind == "single_label_classification":
                out.loss = F.cross_entropy(logits.view(-1, self.num_labels), labels.view(-1))
            else:
                out.loss = F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))
        return out


class MegaForTokenClassification(_MegaHead):
    def __init__(self, config: MegaConfig, num_labels: int = 2):
        super().__init__(config, num_labels)
        self.dropout = nn.Dropout(self.classifier_dropout)
        self.classifier = nn.Linear(config.hidden_size, num_labels)
        self.init_weights()

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None) -> HeadOutput:
        h = self.mega(input_ids, attention_mask, token_type_ids)
        logits = self.classifier(self.dropout(h))
        out = HeadOutput(logits=logits, last_hidden_state=h)
        if labels is not None:
            out.loss = F.cross_entropy(logits.view(-1, self.num_labels), labels.view(-1))
        return out


class MegaForQuestionAnswering(_MegaHead):
    def __init__(self, config: MegaConfig, num_labels: int = 2):
        super().__init__(config, num_labels)
        if num_labels != 2:  # start and end scores (transformers splits its num_labels outputs in two)
            raise ValueError(f"MegaForQuestionAnswering needs num_labels=2 (start, end), got {num_labels}")
        self.qa_outputs = nn.Linear(config.hidden_size, num_labels)
        self.init_weights()

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, start_positions=None,
                end_positions=None) -> HeadOutput:
        h = self.mega(input_ids, attention_mask, token_type_ids)
        start, end = (t.squeeze(-1).contiguous() for t in self.qa_outputs(h).split(1, dim=-1))
        out = HeadOutput(start_logits=start, end_logits=end, last_hidden_state=h)
        if start_positions is not None and end_positions is not None:
            ignored = start.shape[1]  # positions outside the input are clamped to L and ignored
            sp = start_positions.reshape(-1).clamp(0, ignored)
            ep = end_positions.reshape(-1).clamp(0, ignored)
            out.loss = (F.cross_entropy(start, sp, ignore_index=ignored)
                        + F.cross_entropy(end, ep, ignore_index=ignored)) / 2
        return out


class Pooler(nn.Module):
    """First position -> dense -> tanh (transformers' MegaPooler)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(h[:, 0]))


class MegaForMultipleChoice(_MegaHead):
    def __init__(self, config: MegaConfig, num_labels: int = 2):
        # num_labels is unused by the computation (one score per choice); kept for the config round trip
        super().__init__(config, num_labels)
        self.pooler = Pooler(config.hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.classifier = nn.Linear(config.hidden_size, 1)
        self.init_weights()

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None) -> HeadOutput:
        if input_ids.dim() != 3:
            raise ValueError(f"MegaForMultipleChoice: input_ids must be [batch, choices, length], "
                             f"got shape {tuple(input_ids.shape)}")
        choices = input_ids.shape[1]
        flat = lambda t: None if t is None else t.reshape(-1, t.shape[-1])  # noqa: E731
        h = self.mega(flat(input_ids), flat(attention_mask), flat(token_type_ids))
        logits = self.classifier(self.dropout(self.pooler(h))).view(-1, choices)
        out = HeadOutput(logits=logits, last_hidden_state=h)
        if labels is not None:
            out.loss = F.cross_entropy(logits, labels)
        return out


class MegaModelWithPooler(nn.Module):
    """transformers' bare MegaModel: the backbone and, with add_pooling_layer, its pooler (first position -> dense
    -> tanh). `backbone`: an existing MegaModel to share (the exported LMs expose theirs this way), else a new one."""

    def __init__(self, config: MegaConfig, add_pooling_layer: bool = True, backbone: Optional[MegaModel] = None):
        super().__init__()
        self.config = config
        self.mega = backbone if backbone is not None else MegaModel(config)
        self.pooler = Pooler(config.hidden_size) if add_pooling_layer else None
        if self.pooler is not None:
            init_weights_(self.pooler, config)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.mega.embeddings.word_embeddings

    def forward(self, input_ids, attention_mask=None, token_type_ids=None) -> HeadOutput:
        h = self.mega(input_ids, attention_mask, token_type_ids)
        return HeadOutput(last_hidden_state=h, pooler_output=None if self.pooler is None else self.pooler(h))

