"""Spoken words synthesised offline with espeak-ng: real speech audio for the audio tests, examples and benchmarks.

espeak-ng is a formant speech synthesiser from Debian's packages (`apt-get install espeak-ng`); each word is spoken
by several voices at several speeds and pitches, so a model has to generalise over speakers, not memorise one clip.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence

import numpy as np
from datasets import Dataset
from scipy.io import wavfile
from scipy.signal import resample_poly

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
VOICES = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-us+f3", "en-gb+f4")
SPEEDS = (130, 175)
PITCHES = (35, 65)


def espeak_available() -> bool:
    return shutil.which("espeak-ng") is not None


def speak(
    text: str, voice: str = "en-us", speed: int = 150, pitch: int = 50, sampling_rate: int = 16000
) -> np.ndarray:
    """The waveform of `text` spoken by espeak-ng: float32 in [-1, 1], mono, at `sampling_rate`."""
    if not espeak_available():
        raise RuntimeError("espeak-ng is not installed; on Debian/Ubuntu: apt-get install espeak-ng")
    with tempfile.TemporaryDirectory() as folder:  # --stdout writes a streaming header that scipy rejects
        path = os.path.join(folder, "speech.wav")
        subprocess.run(
            ["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", path, text],
            check=True,
            capture_output=True,
        )
        rate, samples = wavfile.read(path)
    audio = samples.astype(np.float32) / 32768.0
    if rate != sampling_rate:
        gcd = np.gcd(rate, sampling_rate)
        audio = resample_poly(audio, sampling_rate // gcd, rate // gcd).astype(np.float32)
    return audio


def spoken_words(
    words: Sequence[str] = DIGIT_WORDS,
    voices: Sequence[str] = VOICES,
    speeds: Sequence[int] = SPEEDS,
    pitches: Sequence[int] = PITCHES,
    sampling_rate: int = 16000,
) -> Dataset:
    """One row per (word, voice, speed, pitch): `audio` (float32 list), `text` (the word), `label` (its index in
    `words`), `voice`, `speed`, `pitch`."""
    rows = [
        {
            "audio": speak(word, voice, speed, pitch, sampling_rate),
            "text": word,
            "label": label,
            "voice": voice,
            "speed": speed,
            "pitch": pitch,
        }
        for (label, word), voice, speed, pitch in itertools.product(enumerate(words), voices, speeds, pitches)
    ]
    return Dataset.from_list(rows)
