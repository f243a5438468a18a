"""The web console end to end in headless Chromium (Debian's package), driven by
Playwright: key → create a head from a folder per label → its metrics as pictures →
predict → download the ONNX model → delete. Screenshots of the main screens are saved
under tests/screenshots/ (git-ignored) for a person to look at."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from playwright.sync_api import Page, expect, sync_playwright

from graft import Client
from models.preprocess import decode_image
from tests.inputs import crops, exported_image_preprocessing, label_folders
from tests.speech import COMMANDS, VOICES, clip_folders, speak

pytestmark = pytest.mark.e2e

CHROMIUM = "/usr/bin/chromium"
# As ../shared/FACTS.md: headless, and nothing that calls out of this closed machine.
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    # A microphone that needs no prompt and plays Chromium's own test tone.
    "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
]  # fmt: skip
SCREENSHOTS = Path(__file__).parent / "screenshots"
TRAINING_S = 180_000  # ms: a head trains in the background on a shared 2-core machine


@pytest.fixture(scope="module")
def browser():
    assert Path(CHROMIUM).exists(), "apt-get install chromium (.ci/run does)"
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(accept_downloads=True, viewport={"width": 1280, "height": 900})
    page = context.new_page()
    problems: list[str] = []
    # A CSP violation ("Refused to …") or a script error shows here; the console must
    # have none. An API's 4xx answer is logged too, and shown in the page's alert.
    page.on(
        "console",
        lambda m: (
            m.type == "error"
            and "the server responded with a status of 4" not in m.text
            and problems.append(m.text)
        ),
    )
    page.on("pageerror", lambda e: problems.append(str(e)))
    yield page
    context.close()
    assert not problems, problems


# Each visible HTML element's own text against the first opaque background behind it:
# the WCAG 2 contrast ratio, where AA asks for 4.5:1 (3:1 for large text).
LOW_CONTRAST = """() => {
  const rgb = (c) => c.match(/[\\d.]+/g).map(Number);
  const lum = (c) => {
    const [r, g, b] = rgb(c).slice(0, 3).map((v) => {
      v /= 255;
      return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4;
    });
    return 0.2126 * r + 0.7152 * g + 0.0722 * b;
  };
  const background = (el) => {
    for (; el; el = el.parentElement) {
      const c = getComputedStyle(el).backgroundColor;
      if (rgb(c)[3] !== 0) return c;
    }
    return "rgb(255, 255, 255)";
  };
  const low = [];
  for (const el of document.body.querySelectorAll("*")) {
    if (el instanceof SVGElement || !el.checkVisibility()) continue;
    if (![...el.childNodes].some((n) => n.nodeType === 3 && n.textContent.trim())) continue;
    const [a, b] = [lum(getComputedStyle(el).color), lum(background(el))];
    const ratio = (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05);
    const text = el.textContent.trim().slice(0, 30);
    if (ratio < 4.5) low.push(`${el.tagName} "${text}": ${ratio.toFixed(2)}`);
  }
  return low;
}"""


def _tenant_key(server, name: str) -> str:
    with Client(server.base_url, server.admin_key) as admin:
        return admin.create_tenant(name).api_key


def _enter_key(page: Page, key: str) -> None:
    field = page.get_by_label("API key")
    field.fill(key)
    field.press("Enter")  # the keyboard alone submits it


def test_console_from_key_to_download(polling_server, page: Page, tmp_path) -> None:
    SCREENSHOTS.mkdir(exist_ok=True)
    answer = page.goto(f"{polling_server.base_url}/")
    policy = answer.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "script-src 'self'" in policy
    assert "unsafe-inline" not in policy
    # The first screen says what Graft does and where a key comes from.
    expect(page.locator("#welcome")).to_contain_text("trains a small head")
    expect(page.locator("#welcome")).to_contain_text("graft tenants create")
    page.screenshot(path=SCREENSHOTS / "1-key.png")

    _enter_key(page, _tenant_key(polling_server, "console"))
    expect(page.get_by_text("No heads yet")).to_be_visible()
    expect(page.locator("#welcome")).to_be_hidden()
    assert page.evaluate("sessionStorage.getItem('graft.key')").startswith("graft_")
    assert page.evaluate("localStorage.length") == 0

    # Create from a folder per label, watching upload and training.
    page.get_by_label("Name").fill("sights")
    page.get_by_label("Backbone").select_option("efficientnet_lite0")
    page.get_by_label("Fine-tune its top").select_option("off")
    folders = label_folders(tmp_path / "photos", 6, seed=3)
    page.get_by_label("Images, audio clips or .txt files").set_input_files(folders)
    expect(page.locator("#found")).to_have_text("12 examples, 2 labels: flower, temple")
    page.get_by_role("button", name="Create head").click()
    expect(page.locator("#create-progress")).to_be_visible()
    expect(page.locator("#head-title")).to_have_text("sights (v1)", timeout=TRAINING_S)
    expect(page.locator("#train-label")).to_have_text("Trained")
    assert page.locator("#upload-bar").evaluate("bar => bar.value") == 1

    # Its metrics as pictures.
    expect(page.locator("#head-summary")).to_contain_text("Held-out accuracy")
    expect(page.locator("#head-summary")).to_contain_text("±")
    assert page.locator("#confusion svg rect").count() == 4  # 2 labels × 2
    assert page.locator("#per-label svg rect").count() == 2 * 2 + 2  # bars + legend
    assert page.locator("#reliability svg circle").count() >= 1
    expect(page.locator("#backbone-choice")).to_contain_text("efficientnet_lite0, as asked")
    expect(page.locator("#heads tbody tr")).to_have_count(1)
    assert page.evaluate(LOW_CONTRAST) == []
    page.screenshot(path=SCREENSHOTS / "2-head.png", full_page=True)
    page.locator("#head-section").screenshot(path=SCREENSHOTS / "metrics.png")

    # Try it with two photos.
    temple, flower = tmp_path / "temple.jpg", tmp_path / "flower.jpg"
    temple.write_bytes(crops("china.jpg", 1, seed=21)[0])
    flower.write_bytes(crops("flower.jpg", 1, seed=21)[0])
    page.get_by_label("Images or audio clips", exact=True).set_input_files([temple, flower])
    page.get_by_role("button", name="Predict").click()
    rows = page.locator("#predictions tbody tr")
    expect(rows).to_have_count(2)
    expect(rows.nth(0).locator("td").nth(1)).to_have_text("temple")
    expect(rows.nth(1).locator("td").nth(1)).to_have_text("flower")
    page.locator("#predictions").scroll_into_view_if_needed()
    page.screenshot(path=SCREENSHOTS / "3-predict.png", full_page=True)

    # Download: backbone + head as one ONNX model that gives the same answer.
    with page.expect_download() as download:
        page.get_by_role("button", name="Download ONNX model").click()
    assert download.value.suggested_filename == "sights-v1.onnx"
    session = ort.InferenceSession(download.value.path(), providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    batch = decode_image(temple.read_bytes(), exported_image_preprocessing(meta), 10**8)[None]
    probabilities = session.run(["probabilities"], {"image": batch})[0][0]
    assert json.loads(meta["graft.labels"])[int(np.argmax(probabilities))] == "temple"

    # Delete, after the confirmation.
    page.once("dialog", lambda dialog: dialog.accept())
    page.get_by_role("button", name="Delete head").click()
    expect(page.locator("#head-section")).to_be_hidden()
    expect(page.get_by_text("No heads yet")).to_be_visible()


def test_console_voice_head_records_plays_and_predicts(
    polling_server, page: Page, tmp_path
) -> None:
    page.goto(f"{polling_server.base_url}/")
    _enter_key(page, _tenant_key(polling_server, "console voices"))
    page.get_by_label("Name").fill("commands")
    page.get_by_label("Backbone").select_option("resemblyzer_ge2e")
    folders = clip_folders(tmp_path / "clips", 4)
    page.get_by_label("Images, audio clips or .txt files").set_input_files(folders)
    expect(page.locator("#found")).to_have_text("16 examples, 4 labels: go, no, stop, yes")
    page.get_by_role("button", name="Create head").click()
    expect(page.locator("#head-title")).to_have_text("commands (v1)", timeout=TRAINING_S)
    expect(page.locator("#head-summary")).to_contain_text("on resemblyzer_ge2e")

    # A clip from a file, played back in its row.
    clip = tmp_path / "stop.wav"
    clip.write_bytes(speak("stop", VOICES[0], 4))
    page.get_by_label("Images or audio clips", exact=True).set_input_files([clip])
    page.get_by_role("button", name="Predict").click()
    row = page.locator("#predictions tbody tr").first
    expect(row.locator("td").nth(1)).to_have_text(re.compile("|".join(COMMANDS)))
    expect(row.locator("audio")).to_have_count(1)

    # The microphone (Chromium's fake one plays a tone): recorded, played back, sent.
    page.get_by_role("button", name="Record from the microphone").click()
    expect(page.locator("#record-status")).to_have_text("recording…")
    page.wait_for_timeout(1500)
    page.get_by_role("button", name="Stop recording").click()
    expect(page.locator("#playback")).to_be_visible()
    expect(page.locator("#record-status")).to_contain_text("s recorded")
    duration = page.locator("#playback").evaluate(
        "a => new Promise((ok) => a.readyState >= 1 ? ok(a.duration)"
        " : a.addEventListener('loadedmetadata', () => ok(a.duration)))"
    )
    assert duration > 0.5, duration
    page.get_by_role("button", name="Predict").click()
    expect(page.locator("#predictions tbody tr td").first).to_contain_text("recording.wav")
    page.locator("#predict-form").screenshot(path=SCREENSHOTS / "voice.png")


def test_console_texts_and_errors(polling_server, page: Page) -> None:
    page.goto(f"{polling_server.base_url}/")
    _enter_key(page, "graft_not_a_key")
    # The API's error, in its words, for a key it does not know.
    expect(page.get_by_role("alert")).to_have_text("invalid_api_key: the API key is not valid")
    expect(page.locator("#app")).to_be_hidden()

    _enter_key(page, _tenant_key(polling_server, "console texts"))
    expect(page.locator("#app")).to_be_visible()
    page.get_by_label("Name").fill("topics")
    page.get_by_label("Backbone").select_option("minilm_l6")
    page.get_by_label("Fine-tune its top").select_option("off")
    page.get_by_label("one per line as").fill(
        "\n".join(
            [
                f"sports: {t}"
                for t in (
                    "The striker scored twice.",
                    "She won the sprint.",
                    "The keeper saved a penalty.",
                    "He ran a marathon.",
                )
            ]
            + [
                f"cooking: {t}"
                for t in (
                    "Simmer the onions.",
                    "Whisk the eggs with sugar.",
                    "Knead the dough overnight.",
                    "Roast the chicken.",
                )
            ]
        )  # fmt: skip
    )
    page.get_by_role("button", name="Create head").click()
    expect(page.locator("#head-title")).to_have_text("topics (v1)", timeout=TRAINING_S)
    page.get_by_label("…or texts, one per line", exact=True).fill("Fry the garlic in olive oil")
    page.get_by_role("button", name="Predict").click()
    expect(page.locator("#predictions tbody tr td").nth(1)).to_contain_text("cooking")

    # A line that is not "label: text" is refused before anything is sent.
    page.get_by_label("Name").fill("broken")
    page.get_by_label("one per line as").fill("no label here")
    page.get_by_role("button", name="Create head").click()
    expect(page.get_by_role("alert")).to_contain_text('line 1: write it as "label: text"')


def test_console_is_labelled_keyboard_usable_and_legible(polling_server, page: Page) -> None:
    page.goto(f"{polling_server.base_url}/")
    assert page.evaluate(LOW_CONTRAST) == []
    _enter_key(page, _tenant_key(polling_server, "console a11y"))
    expect(page.locator("#app")).to_be_visible()
    # Every form control has a label, and every text is legible on its background.
    unlabelled = page.evaluate(
        "() => [...document.querySelectorAll('input, select, textarea')]"
        ".filter((el) => !el.labels.length && !el.ariaLabel).map((el) => el.id)"
    )
    assert unlabelled == []
    assert page.evaluate(LOW_CONTRAST) == []
    # The keyboard alone reaches the create form's controls, in reading order.
    page.get_by_label("Name").focus()
    reached = []
    for _ in range(8):
        reached.append(page.evaluate("document.activeElement.id"))
        page.keyboard.press("Tab")
    order = ["head-name", "backbone", "fine-tune", "folder", "texts", "create"]
    assert [r for r in reached if r in order] == order, reached
