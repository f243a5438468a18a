"""`kind = "transformers"`: any transformers encoder folder, pooled to one embedding.

Encoder-decoder models (T5) contribute their encoder. Pooling: `mean` of the last hidden
state over the attention mask (sentence-transformers), `cls` (the first token: BERT's
[CLS]) or `last` (the last real token: GPT-2 and XLNet summarise there). Rows are padded
on the right, so the last real token is at `mask.sum() - 1`.
"""

from __future__ import annotations

from pathlib import Path


def pooled(hidden, attention_mask, pooling: str):
    """[batch, tokens, dim] and its mask to [batch, dim], L2-normalised."""
    import torch

    if pooling == "mean":
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        vectors = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
    elif pooling == "cls":
        vectors = hidden[:, 0]
    else:
        last = (attention_mask.sum(dim=1) - 1).clamp(min=0)
        vectors = hidden[torch.arange(hidden.shape[0]), last]
    return torch.nn.functional.normalize(vectors, dim=1)


def sentence_embedding_module(model_dir: Path, pooling: str = "mean"):
    """Token ids and mask in; the pooled last hidden state, L2-normalised, out."""
    import torch
    from transformers import AutoModel

    class SentenceEmbedding(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            model = AutoModel.from_pretrained(str(model_dir), local_files_only=True)
            if model.config.is_encoder_decoder:
                model = model.get_encoder()
            self.encoder = model

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask)[0]
            return pooled(hidden, attention_mask, pooling)

        def depth_widths(self) -> list[int]:
            """Each layer's width but the last's (models/depths.py)."""
            config = self.encoder.config
            return [int(config.hidden_size)] * (int(config.num_hidden_layers) - 1)

        def forward_with_depths(
            self, input_ids: torch.Tensor, attention_mask: torch.Tensor
        ) -> tuple[torch.Tensor, torch.Tensor]:
            """The embedding and every layer's masked mean but the last's, in one pass."""
            from models.depths import pooled_text_depths

            out = self.encoder(
                input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True
            )
            # hidden_states: the token embeddings, then each layer's output.
            layers = list(out.hidden_states[1:-1])
            return pooled(out[0], attention_mask, pooling), pooled_text_depths(
                layers, attention_mask
            )

    return SentenceEmbedding().eval()
