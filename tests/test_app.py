"""The web page (zipir_jax.app) in a real headless Chromium: upload, restore, see the result at
the right size; upload a broken file, see the error as text. Chromium and chromedriver come from
the Debian packages; selenium drives them by path, so nothing is downloaded."""

import io
import os
import shutil
import tempfile
import threading
import urllib.error
import urllib.request

import numpy as np
import pytest
from PIL import Image

from zipir_jax import api, app

pytestmark = pytest.mark.xdist_group("tiny_bundle")

CHROMIUM_FLAGS = (
  "--headless",
  "--no-sandbox",
  "--disable-gpu",
  "--disable-quic",
  "--no-first-run",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
  "--disable-dev-shm-usage",
)


def _chromium():
  """(chromium, chromedriver) paths; a skip where they are missing, a failure under CI."""
  chromium = shutil.which("chromium") or shutil.which("chromium-browser")
  driver = shutil.which("chromedriver")
  try:
    import selenium  # noqa: F401
  except ImportError:
    chromium = None
  if chromium and driver:
    return chromium, driver
  message = "the browser test needs chromium, chromedriver (Debian) and selenium (requirements)"
  if os.environ.get("CI") == "true":
    pytest.fail(message + "; .ci/run installs them")
  pytest.skip(message)


@pytest.fixture(scope="module")
def server(tiny_bundle):
  httpd = app.make_server(api.ZipIRPipeline(tiny_bundle), "127.0.0.1", 0, "tiny")
  thread = threading.Thread(target=httpd.serve_forever, daemon=True)
  thread.start()
  yield f"http://127.0.0.1:{httpd.server_address[1]}/"
  httpd.shutdown()
  httpd.server_close()


@pytest.fixture(scope="module")
def browser(monkeypatch_module):
  chromium, driver_path = _chromium()
  from selenium import webdriver
  from selenium.webdriver.chrome.service import Service

  monkeypatch_module.setenv("SE_AVOID_STATS", "true")
  profile = tempfile.mkdtemp(prefix="zipir-chromium-")
  options = webdriver.ChromeOptions()
  options.binary_location = chromium
  for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}"):
    options.add_argument(flag)
  driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
  yield driver
  driver.quit()
  shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def monkeypatch_module():
  with pytest.MonkeyPatch.context() as patch:
    yield patch


def _submit(driver, url, path, **fields):
  from selenium.webdriver.common.by import By
  from selenium.webdriver.support.ui import WebDriverWait

  driver.get(url)
  driver.find_element(By.ID, "image").send_keys(str(path))
  for name, value in fields.items():
    element = driver.find_element(By.ID, name)
    element.clear()
    element.send_keys(str(value))
  driver.find_element(By.ID, "restore").click()
  WebDriverWait(driver, 300).until(
    lambda d: (
      d.find_element(By.ID, "error").text
      or d.execute_script("return document.getElementById('after').naturalWidth")
    )
  )


def test_page_restores_an_upload_and_shows_errors_as_text(browser, server, tmp_path):
  from selenium.webdriver.common.by import By

  photo = tmp_path / "photo.png"
  Image.fromarray(np.random.default_rng(0).integers(0, 256, (21, 30, 3), np.uint8)).save(photo)
  _submit(browser, server, photo, scale=2, steps=2, prompt="a cat")
  assert browser.find_element(By.ID, "error").text == ""
  size = browser.execute_script(
    "const a = document.getElementById('after'); return [a.naturalWidth, a.naturalHeight]"
  )
  assert size == [60, 42]
  link = browser.find_element(By.ID, "download")
  assert link.get_attribute("href").startswith("blob:")
  assert link.get_attribute("download") == "photo_zipir.png"
  assert "60x42" in browser.find_element(By.ID, "status").text

  broken = tmp_path / "broken.jpg"
  broken.write_bytes(b"definitely not a jpeg " * 40)
  _submit(browser, server, broken, steps=2)
  error = browser.find_element(By.ID, "error").text
  assert error.startswith("broken.jpg: not an image"), error
  assert "Traceback" not in browser.page_source and " at 0x" not in error


def _post(url, parts):
  """A multipart/form-data POST of (name, file name or None, bytes) parts: (status, text)."""
  boundary = "zipirboundary"
  body = (
    b"".join(
      f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"'.encode()
      + (f'; filename="{filename}"'.encode() if filename else b"")
      + b"\r\n\r\n"
      + value
      + b"\r\n"
      for name, filename, value in parts
    )
    + f"--{boundary}--\r\n".encode()
  )
  request = urllib.request.Request(
    url, data=body, headers={"Content-Type": f"multipart/form-data; boundary={boundary}"}
  )
  try:
    with urllib.request.urlopen(request, timeout=60) as response:
      return response.status, response.read()
  except urllib.error.HTTPError as e:
    return e.code, e.read().decode()


def test_bad_values_and_tiny_images_are_one_line_answers(server):
  assert _post(server + "restore", [("image", "a.png", b"x"), ("steps", None, b"two")]) == (
    400,
    "steps='two': not an integer",
  )
  tiny = io.BytesIO()
  Image.fromarray(np.zeros((4, 6, 3), np.uint8)).save(tiny, format="PNG")
  assert _post(
    server + "restore", [("image", "tiny.png", tiny.getvalue()), ("scale", None, b"2")]
  ) == (
    400,
    "tiny.png: 4x6 is too small (sides of at least 8 px)",
  )
