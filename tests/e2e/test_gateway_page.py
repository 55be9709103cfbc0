"""The gateway's web page in headless Chromium (Selenium): the demo-weights banner, where the key is,
the job options, uploading a clip and audio, watching the progress, a playable result with its download
link in view, the key's recent jobs following the running ones, failures and durations as sentences, the key
remembered for the tab, the face picked with a click on the first frame. One screenshot per job state (queued,
running, done, failed) and of the picked face goes to docs/screenshots/."""

from __future__ import annotations

import io
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import httpx2
import pytest
from PIL import Image
from support.clips import (
    COMPOSITE_HALF,
    demo_frames,
    flat,
    speech,
    two_person_composite,
    write_video,
    write_wav,
)
from support.gateway_process import KEYS

from gateway.core.auth import LOCAL_KEY_FILE
from lipsync.media import VideoReader

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
CHROMEDRIVER = shutil.which("chromedriver")
SCREENSHOTS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        CHROMIUM is None or CHROMEDRIVER is None,
        reason="no headless browser: install Debian's chromium and chromium-driver (.ci/run does when it can)",
    ),
]


@pytest.fixture
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--mute-audio"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    driver.set_window_size(1024, 768)
    yield driver
    driver.quit()


def in_viewport(driver, element) -> bool:
    """The whole element is inside the browser window, without scrolling."""
    return driver.execute_script(
        "const box = arguments[0].getBoundingClientRect();"
        "return box.top >= 0 && box.left >= 0 && box.bottom <= window.innerHeight && box.right <= window.innerWidth;",
        element,
    )


def test_idle_page_shows_the_demo_banner_the_key_file_and_the_options(gateway, browser, tmp_path: Path) -> None:
    key_file = gateway.data_dir / LOCAL_KEY_FILE  # where `lipsync-serve up` keeps the key it made
    key_file.write_text("a-local-key\n")
    try:
        browser.get(gateway.url + "/")
        banner = browser.find_element(By.ID, "banner")
        WebDriverWait(browser, 30).until(lambda d: banner.is_displayed())
        browser.save_screenshot(str(tmp_path / "idle.png"))
        hint = browser.find_element(By.ID, "key-hint").text
    finally:
        key_file.unlink()
    assert "tiny-demo" in banner.text and "scripts/download_weights.py" in banner.text
    assert "tiny-demo" in browser.find_element(By.ID, "served").text
    assert f"{LOCAL_KEY_FILE} in the gateway's data folder" in hint and "LIPSYNC_API_KEYS" in hint
    assert str(gateway.data_dir) not in browser.page_source and "a-local-key" not in browser.page_source
    for name in ("inference_steps", "guidance_scale", "seed", "loop_mode", "mode", "version", "face", "face_box"):
        assert browser.find_element(By.ID, name).is_displayed(), name
    faces = [option.get_attribute("value") for option in browser.find_elements(By.CSS_SELECTOR, "#face option")]
    assert faces == ["", "largest", "box", "active_speaker"]
    assert not browser.find_element(By.ID, "picker").is_displayed()  # until a video is chosen
    loop_modes = [option.get_attribute("value") for option in browser.find_elements(By.CSS_SELECTOR, "#loop_mode option")]
    assert loop_modes == ["", "pingpong", "loop", "cut"]
    assert browser.find_element(By.ID, "inference_steps").get_attribute("max") == "999"


def api(gateway, path: str, **kwargs) -> dict:
    answer = httpx2.post(f"{gateway.url}{path}", headers={"Authorization": f"Bearer {KEYS[0]}"}, timeout=60, **kwargs)
    assert answer.status_code == 200, answer.text
    return answer.json()


def screenshot(driver, name: str) -> None:
    """One screenshot per state of the page, kept in docs/screenshots/ (the documentation shows them), in 64
    colours so that the repository stays small."""
    SCREENSHOTS.mkdir(exist_ok=True)
    image = Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("RGB")
    image.quantize(64).save(SCREENSHOTS / f"{name}.png", optimize=True)


def state_when(driver, done: Callable[[str], bool], timeout_s: float = 300) -> str:
    """The job state line, once ``done`` holds for it (read once per check, so no later update slips in)."""
    seen: list[str] = []

    def check(d) -> bool:
        seen.append(d.find_element(By.ID, "state").text)
        return done(seen[-1])

    WebDriverWait(driver, timeout_s, poll_frequency=0.2).until(check)
    return seen[-1]


def test_upload_watch_progress_play_and_download(gateway, browser, tmp_path: Path) -> None:
    video = write_video(tmp_path / "face.mp4", demo_frames(50))  # portrait, 540×960
    audio = write_wav(tmp_path / "speech.wav", speech(2.0))
    short = write_wav(tmp_path / "short.wav", speech(0.64))
    with open(video, "rb") as v, open(short, "rb") as a:  # keeps the gateway's one worker busy
        blocker = api(gateway, "/lipsync/upload", files={"video": v, "audio": a}, data={"inference_steps": "500"})["request_id"]
    try:
        browser.get(gateway.url + "/")
        browser.find_element(By.ID, "key").send_keys(KEYS[0])
        browser.find_element(By.ID, "video").send_keys(str(video))
        browser.find_element(By.ID, "audio").send_keys(str(audio))
        browser.find_element(By.ID, "inference_steps").send_keys("10")
        browser.find_element(By.ID, "seed").send_keys("7")
        Select(browser.find_element(By.ID, "loop_mode")).select_by_value("loop")
        browser.find_element(By.ID, "submit").click()

        assert state_when(browser, lambda text: text.startswith("Queued")) == "Queued: next in line."
        screenshot(browser, "queued")
        # The recent jobs list follows the running job by itself (no Refresh): its percentage moves.
        jobs = browser.find_element(By.ID, "jobs")
        first = WebDriverWait(browser, 300, poll_frequency=0.2).until(
            lambda d: text if "generating the mouth: " in (text := jobs.text) else False
        )
        WebDriverWait(browser, 300, poll_frequency=0.2).until(lambda d: jobs.text not in (first, ""))
    finally:
        api(gateway, "/lipsync/cancel", json={"request_id": blocker})

    state_when(browser, lambda text: text.startswith("Generating the mouth: ") and " left" in text)  # with an ETA
    screenshot(browser, "running")
    assert in_viewport(browser, browser.find_element(By.ID, "progress"))
    assert not browser.find_element(By.ID, "result").is_displayed()
    final = state_when(browser, lambda text: text.startswith(("Done", "Failed")))
    assert re.fullmatch(r"Done in (\d+\.\d s|\d+ s|\d+ min \d+ s)\. Weights: tiny-demo\.", final), final
    WebDriverWait(browser, 60).until(lambda d: "cancelled." in d.find_element(By.ID, "jobs").text)
    assert float(browser.find_element(By.ID, "progress").get_attribute("value")) == 1.0
    player = browser.find_element(By.ID, "result")
    WebDriverWait(browser, 60).until(lambda d: d.execute_script("return arguments[0].readyState >= 1", player))
    WebDriverWait(browser, 10).until(lambda d: in_viewport(d, player))  # once its height is known
    screenshot(browser, "done")
    assert browser.execute_script("return arguments[0].duration", player) == pytest.approx(2.0, abs=0.1)
    assert in_viewport(browser, browser.find_element(By.ID, "download"))
    WebDriverWait(browser, 30).until(lambda d: "done in " in d.find_element(By.ID, "jobs").text)
    link = browser.find_element(By.ID, "download").get_attribute("href")
    download = httpx2.get(link, timeout=60)
    assert download.status_code == 200
    (tmp_path / "result.mp4").write_bytes(download.content)
    with VideoReader(tmp_path / "result.mp4") as reader:
        assert len(list(reader)) == 50


def test_a_failed_job_reads_as_a_sentence_and_the_key_is_remembered_for_the_tab(gateway, browser, tmp_path: Path) -> None:
    video = write_video(tmp_path / "no-face.mp4", [flat(128)] * 5)
    audio = write_wav(tmp_path / "speech.wav", speech(0.2))
    browser.get(gateway.url + "/")
    browser.find_element(By.ID, "key").send_keys(KEYS[0])
    browser.find_element(By.ID, "remember").click()
    browser.find_element(By.ID, "video").send_keys(str(video))
    browser.find_element(By.ID, "audio").send_keys(str(audio))
    browser.find_element(By.ID, "submit").click()
    final = state_when(browser, lambda text: text.startswith(("Done", "Failed")))
    assert re.fullmatch(r"Failed: No face was found in any of the 5 frames of (the )?video\.", final), final
    assert browser.find_element(By.ID, "state").get_attribute("class") == "error"
    WebDriverWait(browser, 30).until(lambda d: "failed: no face was found" in d.find_element(By.ID, "jobs").text.lower())
    screenshot(browser, "failed")
    browser.refresh()  # the same tab: the key comes back, and with it the list
    WebDriverWait(browser, 30).until(lambda d: "failed: no face was found" in d.find_element(By.ID, "jobs").text.lower())
    assert browser.find_element(By.ID, "key").get_attribute("value") == KEYS[0]
    assert browser.find_element(By.ID, "remember").is_selected()


def test_a_wrong_key_shows_the_error(gateway, browser, tmp_path: Path) -> None:
    video = write_video(tmp_path / "face.mp4", demo_frames(5))
    audio = write_wav(tmp_path / "speech.wav", speech(0.2))
    browser.get(gateway.url + "/")
    browser.find_element(By.ID, "key").send_keys("not-a-key")
    browser.find_element(By.ID, "video").send_keys(str(video))
    browser.find_element(By.ID, "audio").send_keys(str(audio))
    browser.find_element(By.ID, "submit").click()
    message = state_when(browser, lambda text: "API key" in text, timeout_s=30)
    assert message == "The API key was not accepted: check it against the hint below the key field."
    assert browser.find_element(By.ID, "state").get_attribute("class") == "error"


def test_a_click_on_the_first_frame_picks_the_face_to_sync(gateway, browser, tmp_path: Path) -> None:
    """Two people, the right one speaking: a click on the left (still) face asks for that one."""
    clip = two_person_composite(tmp_path / "two.mp4", "right")
    point = (151, 183)  # the centre of the left face on the first frame (540×480)
    browser.get(gateway.url + "/")
    browser.find_element(By.ID, "key").send_keys(KEYS[0])
    browser.find_element(By.ID, "video").send_keys(str(clip))
    browser.find_element(By.ID, "audio").send_keys(str(clip))
    canvas = browser.find_element(By.ID, "first-frame")
    WebDriverWait(browser, 60).until(lambda d: canvas.is_displayed())
    assert (canvas.get_attribute("width"), canvas.get_attribute("height")) == ("540", "480")
    # Wholly in view: W3C actions take offsets from the centre of the element's visible part.
    shown = browser.execute_script(
        "arguments[0].scrollIntoView({block: 'center'});"
        "const box = arguments[0].getBoundingClientRect(); return [box.width, box.height];", canvas,
    )
    scale = shown[0] / 540
    ActionChains(browser).move_to_element_with_offset(
        canvas, round(point[0] * scale - shown[0] / 2), round(point[1] * scale - shown[1] / 2)
    ).click().perform()
    assert Select(browser.find_element(By.ID, "face")).first_selected_option.get_attribute("value") == "box"
    x, y = (int(value) for value in browser.find_element(By.ID, "face_box").get_attribute("value").split(","))
    assert abs(x - point[0]) <= 2 / scale + 1 and abs(y - point[1]) <= 2 / scale + 1
    screenshot(browser, "pick-face")
    browser.find_element(By.ID, "inference_steps").send_keys("1")
    browser.find_element(By.ID, "submit").click()
    final = state_when(browser, lambda text: text.startswith(("Done", "Failed")))
    match = re.search(r"Face: box at (\d+),(\d+),(\d+),(\d+) \(confidence (\d\.\d\d)\)\.", final)
    assert match, final
    x0, y0, x1, y1 = (int(value) for value in match.groups()[:4])
    assert x0 <= point[0] <= x1 and y0 <= point[1] <= y1 and x1 < COMPOSITE_HALF[0]
