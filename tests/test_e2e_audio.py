"""Voice heads over HTTP against the real server and the real speech encoder, on speech
the tests make with espeak-ng (tests/speech.py): who speaks, which command was said."""

from __future__ import annotations

import io
import json
import zipfile

import numpy as np
import onnxruntime as ort
import pytest
import soundfile

from graft.inputs import clip_bytes
from tests.inputs import assert_error
from tests.speech import (
    COMMANDS,
    VOICES,
    b64,
    sox,
    speak,
    speaker_examples,
)

pytestmark = pytest.mark.e2e

BACKBONE = "resemblyzer_ge2e"


def _predict(client, head_id: str, clips: list[bytes]) -> list[dict]:
    answer = client.post(
        f"/v1/heads/{head_id}/predict", json={"inputs": [{"audio": b64(c)} for c in clips]}
    )
    assert answer.status_code == 200, answer.text
    return answer.json()["predictions"]


def _decoded(data: bytes) -> np.ndarray:
    """A clip as the download takes it: mono float32 PCM at 16 kHz (sox resamples)."""
    resampled = sox(data, "rate", "16000", "channels", "1")
    pcm, rate = soundfile.read(io.BytesIO(resampled), dtype="float32")
    assert rate == 16000
    return pcm


def test_speaker_head_json_and_its_download(server) -> None:
    with server.new_tenant("voices") as client:
        listed = {b["id"]: b for b in client.get("/v1/backbones").json()["backbones"]}
        assert listed[BACKBONE]["modality"] == "audio"
        assert listed[BACKBONE]["preprocessing"]["sample_rate"] == 16000
        assert set(listed[BACKBONE]["onnx_inputs"]) == {"waveform", "samples"}
        # The API document states this server's limits, a clip's length among them.
        document = client.get("/v1/openapi.json").json()
        assert "clips of at most 30 s each" in document["info"]["description"]

        created = client.post(
            "/v1/heads",
            json={"name": "who", "backbone": BACKBONE, "examples": speaker_examples(5)},
        )
        assert created.status_code == 201, created.text
        head = created.json()
        assert head["status"] == "ready" and head["labels"] == sorted(VOICES)
        assert head["metrics"]["cv_accuracy"] >= 0.8, head["metrics"]
        assert [c["depths"] for c in head["metrics"]["depths"]["candidates"]] == [0, 1, 2]

        # Words none of its examples said, in each voice.
        clips = [speak(word, voice, 1) for voice in VOICES for word in ("hello", "thank you")]
        served = _predict(client, head["id"], clips)
        labels = [p["label"] for p in served]
        assert sum(a == b for a, b in zip(labels, np.repeat(VOICES, 2), strict=True)) >= 5, labels

        # The download takes the waveform alone and agrees with the server.
        download = client.get(f"/v1/heads/{head['id']}/model.onnx")
        assert download.status_code == 200
        session = ort.InferenceSession(download.content, providers=["CPUExecutionProvider"])
        meta = session.get_modelmeta().custom_metadata_map
        assert json.loads(meta["graft.inputs"]) == ["waveform"]
        assert [i.name for i in session.get_inputs()] == ["waveform"]
        for clip, answer in zip(clips, served, strict=True):
            probabilities = session.run(["probabilities"], {"waveform": _decoded(clip)[None]})[0]
            scores = dict(zip(json.loads(meta["graft.labels"]), probabilities[0], strict=True))
            assert max(scores, key=scores.get) == answer["label"]
            # sox's resampler is not soxr's defaults: close, not equal.
            assert scores[answer["label"]] == pytest.approx(answer["score"], abs=0.05)

        # Examples added later: version 2 on all of them; no other tenant sees the head.
        added = client.post(
            f"/v1/heads/{head['id']}/examples", json={"examples": speaker_examples(2, offset=5)}
        )
        assert added.status_code == 200, added.text
        assert added.json()["version"] == 2 and added.json()["metrics"]["n_examples"] == 21
        with server.new_tenant("eavesdropper") as other:
            assert_error(other.get(f"/v1/heads/{head['id']}"), 404, "head_not_found")
            assert_error(
                other.post(
                    f"/v1/heads/{head['id']}/predict", json={"inputs": [{"audio": b64(clips[0])}]}
                ),
                404,
                "head_not_found",
            )


def test_command_head_from_a_zip_with_auto_and_raw_bodies(server) -> None:
    """Clips in folders per label, in three formats, at other rates and channel counts;
    `auto` picks the audio backbone by the files' names."""
    archive = io.BytesIO()
    formats = ("wav", "flac", "ogg")
    with zipfile.ZipFile(archive, "w") as zipped:
        for word in COMMANDS:
            for i in range(6):
                data = speak(word, VOICES[i % len(VOICES)], i)
                kind = formats[i % len(formats)]
                converted = data if kind == "wav" else sox(data, out_type=kind)
                zipped.writestr(f"commands/{word}/{i}.{kind}", converted)
    with server.new_tenant("commands") as client:
        created = client.post(
            "/v1/heads",
            data={"name": "commands", "backbone": "auto", "fine_tune": "auto"},
            files={"archive": ("commands.zip", archive.getvalue(), "application/zip")},
        )
        assert created.status_code == 201, created.text
        head = created.json()
        assert head["backbone"] == BACKBONE and head["labels"] == sorted(COMMANDS)
        assert head["metrics"]["cv_accuracy"] >= 0.75, head["metrics"]
        # Audio backbones are served whole: `auto` keeps the head frozen, and says why.
        fine_tuning = head["metrics"]["fine_tuning"]
        assert fine_tuning["chosen"] == "frozen" and fine_tuning["reason"], fine_tuning

        # A new style of a voice: as a raw body, 8 kHz stereo; as FLAC; as a form's files.
        go = speak("go", VOICES[0], 4)
        stereo_8k = sox(go, "rate", "8000", "channels", "2")
        with soundfile.SoundFile(io.BytesIO(stereo_8k)) as clip:
            assert (clip.samplerate, clip.channels) == (8000, 2)
        raw = client.post(
            f"/v1/heads/{head['id']}/predict",
            content=stereo_8k,
            headers={"content-type": "audio/wav"},
        )
        assert raw.status_code == 200, raw.text
        flac = client.post(
            f"/v1/heads/{head['id']}/predict?top_k=2",
            content=sox(go, out_type="flac"),
            headers={"content-type": "audio/flac"},
        )
        assert flac.status_code == 200, flac.text
        assert len(flac.json()["predictions"][0]["top_k"]) == 2
        form = client.post(
            f"/v1/heads/{head['id']}/predict",
            files=[("audio", (f"{w}.wav", speak(w, VOICES[1], 4), "audio/wav")) for w in COMMANDS],
        )
        assert form.status_code == 200, form.text
        said = [p["label"] for p in form.json()["predictions"]]
        assert sum(a == b for a, b in zip(said, COMMANDS, strict=True)) >= 3, said
        assert raw.json()["predictions"][0]["label"] == flac.json()["predictions"][0]["label"]


def test_bad_audio_is_refused_and_changes_nothing(server) -> None:
    with server.new_tenant("bad-audio") as client:
        head = client.post(
            "/v1/heads",
            json={"name": "who", "backbone": BACKBONE, "examples": speaker_examples(3)},
        ).json()
        before = client.get(f"/v1/heads/{head['id']}").json()
        speech = speak("seven", VOICES[0])
        tone = np.sin(np.arange(16000) * 2 * np.pi * 440 / 16000) * 0.5
        bad = {
            "invalid_audio": b"RIFF not really a wave file",
            "empty_audio": clip_bytes(np.zeros(0)),
            "silent_audio": clip_bytes(np.zeros(16000)),
            "audio_too_long": clip_bytes(np.tile(tone, 31)),
        }
        # A WAV cut short: its header says more bytes than follow (espeak-ng's streamed
        # header declares the largest size: it is not one).
        whole = clip_bytes(tone)
        bad_truncated = whole[: len(whole) // 2]
        for code, data in [*bad.items(), ("invalid_audio", bad_truncated)]:
            status = 413 if code == "audio_too_long" else 422
            answer = client.post(
                f"/v1/heads/{head['id']}/predict", json={"inputs": [{"audio": b64(data)}]}
            )
            assert_error(answer, status, code)
            added = client.post(
                f"/v1/heads/{head['id']}/examples",
                json={"examples": [{"label": VOICES[0], "audio": b64(data)}]},
            )
            assert_error(added, status, code)
        raw = client.post(
            f"/v1/heads/{head['id']}/predict",
            content=b"\x00" * 100,
            headers={"content-type": "audio/ogg"},
        )
        assert_error(raw, 422, "invalid_audio")
        assert_error(
            client.post(
                f"/v1/heads/{head['id']}/predict", json={"inputs": [{"audio": "not base64!"}]}
            ),
            422,
            "invalid_base64",
        )
        assert_error(
            client.post(f"/v1/heads/{head['id']}/predict", json={"inputs": [{"text": "seven"}]}),
            422,
            "wrong_modality",
        )
        after = client.get(f"/v1/heads/{head['id']}").json()
        assert after["version"] == before["version"]
        assert after["metrics"]["n_examples"] == before["metrics"]["n_examples"]
        # The clips below the limit still work, MP3 too (libsndfile writes it here).
        mp3 = io.BytesIO()
        pcm, rate = soundfile.read(io.BytesIO(speech), dtype="float32")
        soundfile.write(mp3, pcm, rate, format="MP3")
        answers = _predict(client, head["id"], [clip_bytes(tone), speech, mp3.getvalue()])
        assert answers[2]["label"] == answers[1]["label"] in VOICES


def test_a_head_that_cannot_hear_its_labels_says_so(server) -> None:
    """Labels the encoder cannot hear: each (voice, word) said in two styles, one under
    each label, so that the labels differ only in which style goes with which word."""
    words = ("one", "two", "three", "four")
    examples = [
        {"label": label, "audio": b64(speak(word, voice, (i + flip) % 2))}
        for voice in VOICES
        for i, word in enumerate(words)
        for label, flip in (("a", 0), ("b", 1))
    ]
    with server.new_tenant("unheard") as client:
        created = client.post(
            "/v1/heads", json={"name": "unheard", "backbone": BACKBONE, "examples": examples}
        )
        assert created.status_code == 201, created.text
        metrics = created.json()["metrics"]
        assert metrics["majority_baseline"] == 0.5
        assert any("not clearly above always answering" in w for w in metrics["warnings"]), metrics
