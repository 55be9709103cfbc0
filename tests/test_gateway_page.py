"""The gateway's web page in headless Chromium (Selenium): upload a clip and audio, watch the progress,
get a playable result and a download link."""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx2
import pytest

from clips import demo_frames, speech, write_video, write_wav
from gateway_process import KEYS
from lipsync.media import VideoReader

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
CHROMEDRIVER = shutil.which("chromedriver")

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
    yield driver
    driver.quit()


def test_upload_watch_progress_play_and_download(gateway, browser, tmp_path: Path) -> None:
    video = write_video(tmp_path / "face.mp4", demo_frames(50))
    audio = write_wav(tmp_path / "speech.wav", speech(2.0))
    browser.get(gateway.url + "/")
    browser.find_element(By.ID, "key").send_keys(KEYS[0])
    browser.find_element(By.ID, "video").send_keys(str(video))
    browser.find_element(By.ID, "audio").send_keys(str(audio))
    steps = browser.find_element(By.ID, "steps")
    steps.clear()
    steps.send_keys("3")
    browser.find_element(By.ID, "submit").click()

    states: list[str] = []

    def finished(driver) -> bool:
        states.append(driver.find_element(By.ID, "state").text)
        return driver.find_element(By.ID, "download").is_displayed() or "Failed" in states[-1]

    WebDriverWait(browser, 300, poll_frequency=0.2).until(finished)
    assert states[-1].startswith("Done"), states[-1]
    assert any(state.startswith(("Queued", "Working")) for state in states), states
    assert float(browser.find_element(By.ID, "progress").get_attribute("value")) == 1.0
    player = browser.find_element(By.ID, "result")
    WebDriverWait(browser, 60).until(lambda d: d.execute_script("return arguments[0].readyState >= 1", player))
    assert browser.execute_script("return arguments[0].duration", player) == pytest.approx(2.0, abs=0.1)
    link = browser.find_element(By.ID, "download").get_attribute("href")
    download = httpx2.get(link, timeout=60)
    assert download.status_code == 200
    (tmp_path / "result.mp4").write_bytes(download.content)
    with VideoReader(tmp_path / "result.mp4") as reader:
        assert len(list(reader)) == 50


def test_a_wrong_key_shows_the_error(gateway, browser, tmp_path: Path) -> None:
    video = write_video(tmp_path / "face.mp4", demo_frames(5))
    audio = write_wav(tmp_path / "speech.wav", speech(0.2))
    browser.get(gateway.url + "/")
    browser.find_element(By.ID, "key").send_keys("not-a-key")
    browser.find_element(By.ID, "video").send_keys(str(video))
    browser.find_element(By.ID, "audio").send_keys(str(audio))
    browser.find_element(By.ID, "submit").click()
    WebDriverWait(browser, 30).until(lambda d: "API key" in d.find_element(By.ID, "state").text)
    assert browser.find_element(By.ID, "state").get_attribute("class") == "error"
