import numpy as np
import pytest
import soundfile as sf
import torch

from functional_mm.data import audio
from functional_mm.data.sources import MediaError


def _tone(freq, sr, seconds, amp=0.5):
    t = np.arange(int(sr * seconds)) / sr
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


@pytest.mark.parametrize("n_mels,seconds", [(80, 1.3), (128, 0.25)])
def test_log_mel_equals_whisper_feature_extractor(n_mels, seconds):
    from transformers import WhisperFeatureExtractor

    fe = WhisperFeatureExtractor(feature_size=n_mels)
    rng = np.random.default_rng(0)
    wave = _tone(440, 16000, seconds) + 0.05 * rng.standard_normal(int(16000 * seconds)).astype(np.float32)
    ref = fe(wave, sampling_rate=16000, return_tensors="np")["input_features"][0]
    ours = audio.log_mel_spectrogram(torch.from_numpy(wave), n_mels=n_mels)
    np.testing.assert_allclose(audio.mel_filter_bank(201, n_mels, 16000), fe.mel_filters, rtol=0, atol=1e-12)
    assert ours.shape == ref.shape == (n_mels, 3000)
    # Same float32 ops on the same inputs; 1e-5 leaves room for a different BLAS summation order.
    assert np.abs(ours.numpy() - ref).max() <= 1e-5


def test_resample_keeps_a_tone():
    wave = torch.from_numpy(_tone(440, 8000, 0.5))
    up = audio.resample(wave, 8000, 16000)
    assert up.shape == (8000,)
    ref = torch.from_numpy(_tone(440, 16000, 0.5))
    mid = slice(400, -400)  # away from the zero-padded edges
    assert (up[mid] - ref[mid]).abs().max() < 2e-3
    down = audio.resample(ref, 16000, 11025)
    assert down.shape == (int(np.ceil(8000 * 11025 / 16000)),)
    spec = np.abs(np.fft.rfft(down.numpy()))
    assert abs(np.argmax(spec) * 11025 / len(down) - 440) < 3
    assert audio.resample(wave, 8000, 8000) is wave


def test_load_audio_mono_resampled_and_errors(tmp_path):
    stereo = np.stack([_tone(300, 8000, 0.2), _tone(300, 8000, 0.2)], 1)
    sf.write(tmp_path / "a.wav", stereo, 8000)
    wave, sr = audio.load_audio(str(tmp_path / "a.wav"), sampling_rate=16000)
    assert sr == 16000 and wave.shape == (3200,) and wave.dtype == torch.float32
    with pytest.raises(MediaError, match="not found"):
        audio.load_audio(str(tmp_path / "missing.wav"))
    (tmp_path / "bad.wav").write_bytes(b"RIFF0000WAVEjunk")
    with pytest.raises(MediaError, match="bad.wav"):
        audio.load_audio(str(tmp_path / "bad.wav"))
