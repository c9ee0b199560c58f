"""run.py serve: the Flask page and its JSON endpoint (test client), and the page driven in Debian's headless
Chromium through selenium (chromium and chromium-driver from apt; nothing downloads a browser)."""
import os
import select
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.predict import Predictor
from pipeline.serve import BUSY, create_app, is_loopback

REPO = Path(__file__).resolve().parents[1]
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
PAIR = {"prompt": "What is the capital of France?", "response_a": "Paris.",
        "response_b": "The capital of France is Paris, on the Seine; it has been the capital since the 10th century."}


@pytest.fixture(scope="module")
def predictor(finished_run):
    return Predictor.load(finished_run, progress=False)


@pytest.fixture(scope="module")
def client(predictor):
    app = create_app(predictor, max_bytes=4096)
    return app, app.test_client()


def shown(probs) -> list[str]:
    return [f"{p:.4f}" for p in probs]


def test_page_and_api_show_predict_proba(client, predictor):
    app, c = client
    page = c.get("/")
    assert page.status_code == 200 and b'<textarea id="response_b"' in page.data and b'id="verdict"' not in page.data
    expected = predictor.predict_proba([PAIR])[0]
    answer = c.post("/", data=PAIR)
    assert answer.status_code == 200
    text = answer.get_data(as_text=True)
    for cls, value in zip(("a", "b", "tie"), shown(expected)):
        assert f'id="p-{cls}">{value}</span>' in text
    assert all(f"<td>{name}</td>" in text for name in predictor.stage_names) and "<td>B/A</td>" in text
    api = c.post("/api/score", json=PAIR)
    assert api.status_code == 200
    probs = api.get_json()["probs"]
    np.testing.assert_allclose([probs[k] for k in ("a", "b", "tie")], expected, atol=1e-12)
    assert {s["stage"] for s in api.get_json()["stages"]} == set(predictor.stage_names)


@pytest.mark.parametrize("body, status, message", [
    ({"prompt": "p", "response_a": "a"}, 400, "missing field(s) [&#39;response_b&#39;]"),
    ({"prompt": "p", "response_a": "  ", "response_b": "b"}, 400, "response_a: empty"),
    ({"prompt": "p", "response_a": "a" * 5000, "response_b": "b"}, 413, "request too large: at most 4096 bytes"),
])
def test_bad_input_is_a_clear_message(client, body, status, message):
    _, c = client
    answer = c.post("/", data=body)
    assert answer.status_code == status
    assert message in answer.get_data(as_text=True)


def test_api_bad_input_and_one_job_at_a_time(client):
    app, c = client
    assert c.post("/api/score", data="not json", content_type="application/json").status_code == 400
    missing = c.post("/api/score", json={"prompt": "p"})
    assert missing.status_code == 400 and "missing field(s)" in missing.get_json()["error"]
    too_big = c.post("/api/score", json={**PAIR, "response_a": "x" * 5000})
    assert too_big.status_code == 413 and "at most 4096 bytes" in too_big.get_json()["error"]
    lock = app.extensions["arena_score_lock"]
    with lock:  # a job is running
        busy = c.post("/api/score", json=PAIR)
        assert busy.status_code == 503 and busy.get_json()["error"] == BUSY
        assert c.post("/", data=PAIR).status_code == 503
    assert c.post("/api/score", json=PAIR).status_code == 200  # free again


def test_loopback_addresses():
    assert all(is_loopback(h) for h in ("127.0.0.1", "localhost", "::1", "127.0.0.2"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "192.168.1.5", "::", "example.org"))


# ------------------------------------------------------------------------------------------- the real browser
def _browser_or_skip():
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium (pip install -e '.[dev]')")
    if missing:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{missing} missing: .ci/run installs chromium and chromium-driver (apt) and the dev extras")
        pytest.skip(f"{missing} missing (apt-get install -y chromium chromium-driver)")


@pytest.fixture
def served(finished_run):
    """``run.py serve`` in a subprocess on a free loopback port; yields its address."""
    proc = subprocess.Popen([sys.executable, "run.py", "serve", "--run", str(finished_run), "--port", "0"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        deadline, line = time.time() + 180, ""
        while time.time() < deadline and not line.startswith("serving"):
            if proc.poll() is not None:
                pytest.fail(f"run.py serve exited with {proc.returncode}")
            if select.select([proc.stdout], [], [], 1)[0]:
                line = proc.stdout.readline()
        assert line.startswith("serving"), "run.py serve did not start within 180 s"
        url = line.split(" on ")[1].split()[0]
        assert url.startswith("http://127.0.0.1:")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_page_in_headless_chromium_shows_predict_proba(served, predictor, tmp_path, monkeypatch):
    _browser_or_skip()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    monkeypatch.setenv("SE_OFFLINE", "true")  # selenium-manager may not fetch anything
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,1300"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        driver.get(served)
        for field, text in PAIR.items():
            driver.find_element(By.ID, field).send_keys(text)
        driver.find_element(By.ID, "score").click()
        expected = predictor.predict_proba([PAIR])[0]
        assert [driver.find_element(By.ID, f"p-{c}").text for c in ("a", "b", "tie")] == shown(expected)
        verdict = ("A wins", "B wins", "tie")[int(np.argmax(expected))]
        assert driver.find_element(By.ID, "verdict").text == f"Verdict: {verdict}"
        stages = driver.find_element(By.ID, "stages").text
        assert all(name in stages for name in predictor.stage_names)
        orders = driver.find_element(By.ID, "orders").find_elements(By.TAG_NAME, "tr")
        assert len(orders) == 1 + 2 * (1 + len(predictor.stage_names))  # header, ensemble and each stage x 2 orders
        assert driver.find_element(By.ID, "prompt").get_attribute("value") == PAIR["prompt"]  # the form keeps the pair
        driver.save_screenshot(str(tmp_path / "serve.png"))
        assert (tmp_path / "serve.png").stat().st_size > 10_000
    finally:
        driver.quit()


def test_serve_prints_its_address_and_warns_off_loopback(finished_run, monkeypatch, capsys, caplog):
    """``serve`` on another address than loopback says so; a port it cannot listen on is one line."""
    import werkzeug.serving

    from kernel.errors import UserError
    from pipeline import serve as page

    class Server:
        server_port = 54321

        def serve_forever(self):
            raise KeyboardInterrupt  # Ctrl-C

        def server_close(self):
            pass

    monkeypatch.setattr(werkzeug.serving, "make_server", lambda host, port, app, threaded: Server())
    page.serve(finished_run, host="0.0.0.0", port=0)
    assert "on http://0.0.0.0:54321/" in capsys.readouterr().out
    assert any("no authentication" in r.getMessage() for r in caplog.records if r.levelname == "WARNING")

    def taken(*_, **__):
        raise OSError(98, "Address already in use")

    monkeypatch.setattr(werkzeug.serving, "make_server", taken)
    with pytest.raises(UserError, match="cannot listen on 127.0.0.1:8000: Address already in use"):
        page.serve(finished_run)
