"""The run of the Hugging Face integration tests (tests/integrations/test_transformers.py, and the
torchrun script it starts): a tiny BERT built from a config (no download), its data set with an
'ids' column, and the Trainer's arguments. Needs transformers."""
from __future__ import annotations

import torch
import transformers

N, BATCH, ACCUMULATE, EPOCHS = 24, 4, 2, 2
STEPS = EPOCHS * N // (BATCH * ACCUMULATE)  # 6 optimizer steps
IDS = list(range(500, 500 + N))


def model():
    config = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16, num_labels=2)
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(config)


def dataset():
    """A list of feature dicts: a torch-style dataset, which the Trainer strips of the columns
    forward() does not name in its collator wrapper (remove_unused_columns=True, the default)."""
    gen = torch.Generator().manual_seed(1)
    rows = []
    for i in IDS:
        tokens = torch.randint(1, 40, (8,), generator=gen)
        rows.append({"input_ids": tokens.tolist(), "attention_mask": [1] * 8, "labels": int(tokens[0] % 2),
                     "ids": i})
    return rows


def args(root, **options):
    base = dict(output_dir=str(root), per_device_train_batch_size=BATCH, gradient_accumulation_steps=ACCUMULATE,
                num_train_epochs=EPOCHS, learning_rate=1e-3, seed=0, use_cpu=True, report_to="none",
                disable_tqdm=True, logging_strategy="no", save_strategy="no")
    return transformers.TrainingArguments(**{**base, **options})
