"""`kind = "ge2e"`: a GE2E speaker encoder (Wan et al. 2018), its weights a torch state
dict (resemblyzer's `pretrained.pt`): an LSTM over mel frames, whose last hidden state
goes through a linear layer and a ReLU to a unit-length embedding.

The whole computation is one graph, waveform in: what an exported head takes away is what
the server runs. The inputs are `waveform` ([batch, samples], float PCM at the declared
rate, rows padded with zeros) and `samples` ([batch], each row's own length). In order:

1. volume: a row quieter than `target_dbfs` is raised to it (never lowered);
2. frames: centred windows of `window_ms` every `hop_ms` (a Hann-windowed DFT, as a
   strided convolution), their power spectrum through a Slaney mel filter bank: librosa's
   `melspectrogram` with zero padding, which is what resemblyzer computes (not a log-mel);
3. partials: `partial_frames`-frame windows every `1 / partials_per_second` s, the last
   kept only if the clip covers `min_coverage` of it (resemblyzer's `compute_partial_slices`);
4. each partial through the LSTM; the partials' unit-length embeddings are averaged over
   each row's own partials and normalised again.

Depths (models/depths.py): each lower LSTM layer's outputs averaged over the frames of a
row's partials; an LSTM's last state is what it was trained to summarise a voice in, its
mean over time keeps more of what was said.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from models.registry import AudioPreprocessing


def mel_filter_bank(sample_rate: int, n_fft: int, n_mels: int) -> np.ndarray:
    """Slaney-style mel filters, area-normalised ([n_mels, n_fft // 2 + 1]): librosa's
    `filters.mel` with its defaults (fmin 0, fmax at Nyquist, htk=False, norm="slaney")."""

    def hz_to_mel(hz: np.ndarray) -> np.ndarray:
        linear = hz / (200.0 / 3)
        log_part = 15.0 + np.log(np.maximum(hz, 1e-10) / 1000.0) / (np.log(6.4) / 27.0)
        return np.where(hz >= 1000.0, log_part, linear)

    def mel_to_hz(mel: np.ndarray) -> np.ndarray:
        linear = mel * (200.0 / 3)
        log_part = 1000.0 * np.exp((np.log(6.4) / 27.0) * (mel - 15.0))
        return np.where(mel >= 15.0, log_part, linear)

    fft_hz = np.linspace(0, sample_rate / 2, n_fft // 2 + 1)
    top = hz_to_mel(np.array(sample_rate / 2))
    edges = mel_to_hz(np.linspace(0.0, float(top), n_mels + 2))
    gaps = np.diff(edges)
    ramps = edges[:, None] - fft_hz[None, :]
    lower = -ramps[:-2] / gaps[:-1, None]
    upper = ramps[2:] / gaps[1:, None]
    weights = np.maximum(0, np.minimum(lower, upper))
    weights *= (2.0 / (edges[2 : n_mels + 2] - edges[:n_mels]))[:, None]
    return weights.astype(np.float32)


def partial_counts(samples: torch.Tensor, pre: AudioPreprocessing) -> torch.Tensor:
    """How many partials each row's clip gives (at least one), as resemblyzer slices them."""
    hop, frames, step = pre.hop_samples, pre.partial_frames, pre.partial_step_frames
    n_frames = torch.div(samples + hop, hop, rounding_mode="floor")  # ceil((n + 1) / hop)
    steps = torch.clamp(n_frames - frames + step + 1, min=1)
    count = torch.div(steps + step - 1, step, rounding_mode="floor")
    last_start = (count - 1) * step * hop
    coverage = (samples - last_start).to(torch.float32) / float(frames * hop)
    return torch.where((coverage < pre.min_coverage) & (count > 1), count - 1, count)


class SpeakerEncoder(nn.Module):
    dft: torch.Tensor  # buffers
    mel: torch.Tensor

    def __init__(self, state: dict[str, torch.Tensor], pre: AudioPreprocessing) -> None:
        super().__init__()
        self.pre = pre
        n_layers = sum(1 for key in state if key.startswith("lstm.weight_ih_l"))
        hidden = self.hidden = int(state["lstm.weight_hh_l0"].shape[1])
        # One LSTM per layer (the same weights as one 3-layer LSTM) so that the lower
        # layers' outputs can be read as depths.
        self.layers = nn.ModuleList(
            nn.LSTM(pre.n_mels if k == 0 else hidden, hidden, 1, batch_first=True)
            for k in range(n_layers)
        )
        for k, layer in enumerate(self.layers):
            layer.load_state_dict(
                {
                    f"{name}_l0": state[f"lstm.{name}_l{k}"]
                    for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
                }
            )
        self.linear = nn.Linear(hidden, state["linear.weight"].shape[0])
        self.linear.load_state_dict(
            {"weight": state["linear.weight"], "bias": state["linear.bias"]}
        )
        n_fft = pre.window_samples
        # A periodic Hann window (scipy's `get_window("hann", n, fftbins=True)`) folded into
        # the DFT's real and imaginary rows: one strided convolution frames and transforms.
        window = np.hanning(n_fft + 1)[:-1]
        angle = np.arange(n_fft // 2 + 1)[:, None] * np.arange(n_fft) * (2 * np.pi / n_fft)
        dft = np.concatenate([np.cos(angle), -np.sin(angle)]) * window
        self.register_buffer("dft", torch.from_numpy(dft[:, None, :].astype(np.float32)))
        self.register_buffer(
            "mel", torch.from_numpy(mel_filter_bank(pre.sample_rate, n_fft, pre.n_mels))
        )

    def depth_widths(self) -> list[int]:
        return [self.hidden] * (len(self.layers) - 1)

    def forward(self, waveform: torch.Tensor, samples: torch.Tensor) -> torch.Tensor:
        return self.forward_with_depths(waveform, samples)[0]

    def mel_frames(self, waveform: torch.Tensor, samples: torch.Tensor) -> torch.Tensor:
        """[batch, samples] to mel power frames [batch, frames, n_mels], the volume raised
        first; zeros follow each row for a whole partial past its end."""
        pre = self.pre
        count = samples.clamp(min=1).to(torch.float32)
        mean_square = (waveform * waveform).sum(dim=1) / count
        # dBFS of the row's RMS; a silent row (refused before it gets here) stays finite.
        dbfs = 10 * torch.log10(mean_square.clamp(min=1e-10))
        gain = torch.pow(10.0, ((pre.target_dbfs - dbfs) / 20).clamp(min=0))
        half = pre.window_samples // 2
        padded = nn.functional.pad(waveform * gain[:, None], (half, half + pre.partial_samples))
        spectrum = nn.functional.conv1d(padded[:, None, :], self.dft, stride=pre.hop_samples)
        bins = self.dft.shape[0] // 2
        power = spectrum[:, :bins] ** 2 + spectrum[:, bins:] ** 2
        return torch.matmul(self.mel, power).transpose(1, 2)

    def forward_with_depths(
        self, waveform: torch.Tensor, samples: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        pre = self.pre
        mel = self.mel_frames(waveform, samples)
        count = partial_counts(samples, pre)
        # A tensor bound keeps the count computed from the lengths in the traced graph.
        positions = torch.arange(count.max(), device=mel.device)  # type: ignore[call-overload]
        window = positions[:, None] * pre.partial_step_frames + torch.arange(pre.partial_frames)
        batch = mel.shape[0]
        # [batch, partials, frames, mels] -> one row per partial.
        x = mel[:, window].reshape(-1, pre.partial_frames, pre.n_mels)
        layer_means = []
        for layer in self.layers:
            x, (last, _) = layer(x)
            layer_means.append(x.mean(dim=1))
        embeds = nn.functional.relu(self.linear(last[0]))
        embeds = nn.functional.normalize(embeds, dim=1)
        keep = (positions[None, :] < count[:, None]).to(mel.dtype)[:, :, None]

        def over_partials(rows: torch.Tensor) -> torch.Tensor:
            """Per-partial rows to one unit-length mean per clip, over its own partials."""
            rows = rows.reshape(batch, -1, rows.shape[-1])
            return nn.functional.normalize((rows * keep).sum(dim=1), dim=1)

        depths = torch.cat([over_partials(m) for m in layer_means[:-1]], dim=1)
        return over_partials(embeds), depths


def speaker_encoder_module(weights: Path, pre: AudioPreprocessing) -> SpeakerEncoder:
    """The encoder with a state dict's weights: a file of its own, or a training
    checkpoint that holds it under `model_state` (resemblyzer's)."""
    checkpoint = torch.load(weights, map_location="cpu", weights_only=True)
    state = checkpoint.get("model_state", checkpoint)
    return SpeakerEncoder(state, pre).eval()
