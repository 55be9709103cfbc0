"""The gateway's web page in headless Chromium (Selenium): the demo-weights banner, where the key is,
the job options, uploading a clip and audio, watching the progress, a playable result with its download
link in view, and the key's recent jobs. Each state is kept as a screenshot in the test's tmp dir."""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx2
import pytest

from gateway.core.auth import LOCAL_KEY_FILE
from lipsync.media import VideoReader
from support.clips import demo_frames, speech, write_video, write_wav
from support.gateway_process import KEYS

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

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
    assert str(key_file) in hint and "LIPSYNC_API_KEYS" in hint and "a-local-key" not in browser.page_source
    for name in ("inference_steps", "guidance_scale", "seed", "loop_mode", "mode", "version"):
        assert browser.find_element(By.ID, name).is_displayed(), name
    loop_modes = [option.get_attribute("value") for option in browser.find_elements(By.CSS_SELECTOR, "#loop_mode option")]
    assert loop_modes == ["", "pingpong", "loop", "cut"]
    assert browser.find_element(By.ID, "inference_steps").get_attribute("max") == "999"


def test_upload_watch_progress_play_and_download(gateway, browser, tmp_path: Path) -> None:
    video = write_video(tmp_path / "face.mp4", demo_frames(50))  # portrait, 540×960
    audio = write_wav(tmp_path / "speech.wav", speech(2.0))
    browser.get(gateway.url + "/")
    browser.find_element(By.ID, "key").send_keys(KEYS[0])
    browser.find_element(By.ID, "video").send_keys(str(video))
    browser.find_element(By.ID, "audio").send_keys(str(audio))
    browser.find_element(By.ID, "inference_steps").send_keys("10")
    browser.find_element(By.ID, "seed").send_keys("7")
    Select(browser.find_element(By.ID, "loop_mode")).select_by_value("loop")
    browser.find_element(By.ID, "submit").click()

    states: list[str] = []

    def finished(driver) -> bool:
        states.append(driver.find_element(By.ID, "state").text)
        if states[-1].startswith("Working: generate") and not (tmp_path / "running.png").exists():
            driver.save_screenshot(str(tmp_path / "running.png"))
            assert in_viewport(driver, driver.find_element(By.ID, "progress"))
            assert not driver.find_element(By.ID, "result").is_displayed()
        return driver.find_element(By.ID, "download").is_displayed() or "Failed" in states[-1]

    WebDriverWait(browser, 300, poll_frequency=0.2).until(finished)
    assert states[-1].startswith("Done"), states[-1]
    assert "tiny-demo" in states[-1]
    assert (tmp_path / "running.png").exists(), states
    assert any(" s left" in state for state in states), states
    assert float(browser.find_element(By.ID, "progress").get_attribute("value")) == 1.0
    player = browser.find_element(By.ID, "result")
    WebDriverWait(browser, 60).until(lambda d: d.execute_script("return arguments[0].readyState >= 1", player))
    WebDriverWait(browser, 10).until(lambda d: in_viewport(d, player))  # once its height is known
    browser.save_screenshot(str(tmp_path / "result.png"))
    assert browser.execute_script("return arguments[0].duration", player) == pytest.approx(2.0, abs=0.1)
    assert in_viewport(browser, browser.find_element(By.ID, "download"))
    WebDriverWait(browser, 30).until(lambda d: "Succeed" in d.find_element(By.ID, "jobs").text)
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
