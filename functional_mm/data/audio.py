"""Audio: decoding (soundfile), band-limited resampling, and Whisper log-mel features.

:func:`log_mel_spectrogram` reproduces ``transformers.WhisperFeatureExtractor`` (its torch path: Hann-window
STFT, power spectrum, Slaney mel filters, log10, clamp to max - 8, ``(x + 4) / 4``) and agrees with it to
float32 rounding (tests/test_data_audio.py asserts max abs difference <= 1e-5).

Example::

    >>> wave, sr = load_audio("speech.flac", sampling_rate=16000)     # doctest: +SKIP
    >>> log_mel_spectrogram(wave).shape                                 # doctest: +SKIP
    torch.Size([80, 3000])
"""

from __future__ import annotations

import math
import os
from functools import lru_cache

import numpy as np
import torch

from functional_mm.data.sources import MediaError


def load_audio(path: str, sampling_rate: int | None = None) -> tuple[torch.Tensor, int]:
    """Mono float32 waveform ``[N]`` in [-1, 1] and its rate (resampled to ``sampling_rate`` if given)."""
    import soundfile as sf

    if not os.path.exists(path):  # libsndfile reports a missing file as a generic "System error"
        raise MediaError(path, "file not found")
    try:
        data, sr = sf.read(path, dtype="float32", always_2d=True)  # [N, channels]
    except FileNotFoundError:
        raise MediaError(path, "file not found") from None
    except (sf.LibsndfileError, RuntimeError, ValueError, OSError) as e:
        raise MediaError(path, f"cannot decode audio ({type(e).__name__}: {e})") from None
    if data.shape[0] == 0:
        raise MediaError(path, "no audio samples")
    wave = torch.from_numpy(data.mean(axis=1) if data.shape[1] > 1 else data[:, 0].copy())
    if sampling_rate is not None and sampling_rate != sr:
        wave, sr = resample(wave, sr, sampling_rate), sampling_rate
    return wave, sr


@lru_cache(maxsize=16)
def _sinc_kernel(orig: int, new: int, width_zeros: int, rolloff: float) -> tuple[torch.Tensor, int]:
    # Polyphase Hann-windowed sinc (the torchaudio "sinc_interp_hann" design): one filter per output phase.
    base = min(orig, new) * rolloff  # cutoff below the lower Nyquist, so no aliasing
    width = math.ceil(width_zeros * orig / base)
    idx = torch.arange(-width, width + orig, dtype=torch.float64)[None] / orig  # [1, L]
    t = (torch.arange(0, -new, -1, dtype=torch.float64)[:, None] / new + idx) * base  # [new, L]
    t = t.clamp(-width_zeros, width_zeros)
    window = torch.cos(t * math.pi / width_zeros / 2) ** 2
    t = t * math.pi
    kernel = torch.where(t == 0, torch.ones_like(t), torch.sin(t) / t) * window * (base / orig)
    return kernel[:, None].to(torch.float32), width  # [new, 1, L]


def resample(
    wave: torch.Tensor, orig_sr: int, new_sr: int, width_zeros: int = 6, rolloff: float = 0.99
) -> torch.Tensor:
    """Band-limited resampling of ``[..., N]`` to ``ceil(N * new_sr / orig_sr)`` samples."""
    if orig_sr == new_sr:
        return wave
    g = math.gcd(orig_sr, new_sr)
    orig, new = orig_sr // g, new_sr // g
    kernel, width = _sinc_kernel(orig, new, width_zeros, rolloff)
    shape, n = wave.shape[:-1], wave.shape[-1]
    x = torch.nn.functional.pad(wave.reshape(-1, 1, n).float(), (width, width + orig))
    y = torch.nn.functional.conv1d(x, kernel, stride=orig)  # [B, new, frames]
    y = y.transpose(1, 2).reshape(x.shape[0], -1)[:, : math.ceil(new * n / orig)]
    return y.reshape(*shape, -1)


def _hz_to_mel(f: np.ndarray) -> np.ndarray:
    # Slaney scale: linear below 1 kHz, logarithmic above.
    f = np.asarray(f, dtype=np.float64)
    mel = 3.0 * f / 200.0
    log = f >= 1000.0
    return np.where(log, 15.0 + np.log(np.maximum(f, 1e-10) / 1000.0) * (27.0 / np.log(6.4)), mel)


def _mel_to_hz(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, dtype=np.float64)
    return np.where(m >= 15.0, 1000.0 * np.exp((np.log(6.4) / 27.0) * (m - 15.0)), 200.0 * m / 3.0)


@lru_cache(maxsize=8)
def mel_filter_bank(
    n_freqs: int, n_mels: int, sampling_rate: int, f_min: float = 0.0, f_max: float = 8000.0
) -> np.ndarray:
    """Slaney-scale, Slaney-normalised triangular filters ``float64 [n_freqs, n_mels]`` (librosa's default,
    Whisper's choice)."""
    filter_freqs = _mel_to_hz(np.linspace(_hz_to_mel(f_min), _hz_to_mel(f_max), n_mels + 2))
    fft_freqs = np.linspace(0, sampling_rate // 2, n_freqs)
    diff = np.diff(filter_freqs)
    slopes = filter_freqs[None, :] - fft_freqs[:, None]
    down, up = -slopes[:, :-2] / diff[:-1], slopes[:, 2:] / diff[1:]
    fb = np.maximum(0.0, np.minimum(down, up))
    return fb * (2.0 / (filter_freqs[2 : n_mels + 2] - filter_freqs[:n_mels]))[None, :]


def log_mel_spectrogram(
    wave: torch.Tensor,
    *,
    n_mels: int = 80,
    n_fft: int = 400,
    hop_length: int = 160,
    sampling_rate: int = 16000,
    num_samples: int | None = 30 * 16000,
) -> torch.Tensor:
    """Whisper features ``float32 [n_mels, num_samples // hop_length]`` from a mono waveform ``[N]``.

    The waveform is zero-padded or truncated to ``num_samples`` (Whisper's 30 s window; ``None`` keeps its
    length), as the feature extractor does with its default ``padding="max_length"``.
    """
    x = torch.as_tensor(wave, dtype=torch.float32)
    if num_samples is not None:
        x = torch.nn.functional.pad(x[:num_samples], (0, max(0, num_samples - x.shape[-1])))
    stft = torch.stft(x, n_fft, hop_length, window=torch.hann_window(n_fft), return_complex=True)
    power = stft[..., :-1].abs() ** 2  # the last frame is dropped, as in Whisper
    filters = torch.from_numpy(mel_filter_bank(n_fft // 2 + 1, n_mels, sampling_rate)).to(torch.float32)
    log_spec = torch.clamp(filters.T @ power, min=1e-10).log10()
    log_spec = torch.maximum(log_spec, log_spec.max() - 8.0)
    return (log_spec + 4.0) / 4.0
