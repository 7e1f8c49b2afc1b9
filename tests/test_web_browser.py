"""`memplan serve` and `memplan report --html` in a real headless browser: the distribution's Chromium
(/usr/bin/chromium, or $MEMPLAN_CHROMIUM) driven by Playwright; never a downloaded browser.

The page is changed as a user would (model, sequence length, a select), and what it displays is checked against
`memplan estimate --json` run as a separate process; an invalid value shows the CLI's own one-line message; a
shared URL restores the view; the HTML report opens offline and shows the figures it claims. Skips, with the
reason, when Playwright or Chromium is missing (README: "Browser tests"). Set MEMPLAN_SCREENSHOT_DIR=reports to
refresh the README's screenshots (scripts/screenshots.sh).
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from memplan.catalog import gpu_list

pytest.importorskip("starlette", reason="memplan serve needs the web extra: pip install 'memplan[web]'")
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (dev extra) is not installed")

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = (os.environ.get("MEMPLAN_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
            or "/usr/bin/chromium")
if not os.access(CHROMIUM, os.X_OK):
    pytest.skip(f"no Chromium at {CHROMIUM} (Debian: apt-get install chromium; or set MEMPLAN_CHROMIUM)",
                allow_module_level=True)
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
GIB = 2**30


def cli(*argv, env=None):
    """The CLI run in this process (the server under test runs in its own): (returncode, stdout, stderr)."""
    import contextlib
    import io

    from memplan.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


def shown(n: int) -> str:
    return f"{n / GIB:,.2f} GiB"  # as the CLI prints GiB


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """No calibration, for the server and for the CLI run here: both use the default overheads."""
    from memplan import calibrate

    folder = str(tmp_path_factory.mktemp("calibrations"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(calibrate.ENV_DIR, folder)
        calibrate.select.cache_clear()
        yield dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    calibrate.select.cache_clear()


@pytest.fixture(scope="module")
def server(env):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "memplan", "serve", "--port", str(port)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while True:
        try:
            with urllib.request.urlopen(url + "/api/health", timeout=2) as r:
                if json.load(r)["ok"]:
                    break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                pytest.fail(f"memplan serve did not start: {proc.communicate()[1][-2000:]}")
            time.sleep(0.2)
    yield url
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    pw = sync_api.sync_playwright().start()
    try:
        ctx = pw.chromium.launch_persistent_context(str(tmp_path_factory.mktemp("chromium-profile")),
                                                    executable_path=CHROMIUM, args=ARGS, headless=True,
                                                    viewport={"width": 1400, "height": 1000})
    except Exception as e:  # noqa: BLE001 - a Chromium that will not start is a reason to skip, said why
        pw.stop()
        pytest.skip(f"Chromium at {CHROMIUM} does not start under Playwright: {str(e).splitlines()[0]}")
    yield ctx
    ctx.close()
    pw.stop()


@pytest.fixture
def page(browser):
    p = browser.new_page()
    p.errors = []
    p.on("pageerror", lambda e: p.errors.append(str(e)))
    p.on("console", lambda m: p.errors.append(m.text) if m.type == "error" else None)
    yield p
    p.close()


def settled(page, state: str = "ok", query: str | None = None) -> None:
    """Wait until the page shows the answer to `query` (its current inputs when None)."""
    page.wait_for_function(
        "([state, q]) => { const s = document.getElementById('status');"
        " return s.dataset.state === state && (q === null || s.dataset.query === q); }",
        arg=[state, query], timeout=30000)


def screenshot(page, name: str, env) -> Path:
    """Into $MEMPLAN_SCREENSHOT_DIR (scripts/screenshots.sh: reports/, for the README), else a temporary folder."""
    folder = Path(os.environ.get("MEMPLAN_SCREENSHOT_DIR") or env["MEMPLAN_CALIBRATIONS"])
    path = folder / name
    page.screenshot(path=str(path), full_page=True)
    return path


def expected(*argv, env):
    r = cli("estimate", *argv, "--json", env=env)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_change_model_and_seq_len_shows_the_cli_figures(server, page, env):
    page.goto(server + "/")
    settled(page, query="")
    default = expected("llama-3.1-8b", "--gpu", "rtx-4090", env=env)
    assert int(page.get_attribute("#peak", "data-bytes")) == default["peak_bytes"]
    page.fill("#f-model", "qwen2.5-7b")
    page.fill("#f-seq-len", "8192")
    page.select_option("#f-optimizer", "adamw-8bit")
    settled(page, query="model=qwen2.5-7b&optimizer=adamw-8bit&seq-len=8192")
    want = expected("qwen2.5-7b", "--seq-len", "8192", "--optimizer", "adamw-8bit", "--gpu", "rtx-4090", env=env)
    assert int(page.get_attribute("#peak", "data-bytes")) == want["peak_bytes"]
    assert page.inner_text("#peak") == shown(want["peak_bytes"])
    assert int(page.get_attribute("#device-total", "data-bytes")) == want["device_total_bytes"]
    assert page.inner_text("#device-total") == shown(want["device_total_bytes"])
    assert page.inner_text("#peak-phase") == want["peak_phase"]
    phases = page.inner_text("#phases")
    for phase, b in want["phases"].items():
        assert f"{b / GIB:,.2f}" in phases and phase in phases
    assert page.locator("#chart .main-svg").count() >= 1  # plotly drew the stacked bar
    assert page.locator("#chart g.trace.bars").count() == sum(
        1 for c in want["components"] if any(want["phase_components"][p][c] for p in want["phases"]))
    assert page.locator("#gpus tbody tr").count() == len(gpu_list())
    assert "qwen2.5-7b" in page.url and "seq-len=8192" in page.url
    assert page.errors == []
    shot = screenshot(page, "serve_changed.png", env)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 50_000


def test_invalid_input_shows_the_cli_message(server, page, env):
    page.goto(server + "/?model=llama-2-7b")
    settled(page)
    page.fill("#f-seq-len", "4k")
    settled(page, "error")
    r = cli("estimate", "llama-2-7b", "--seq-len", "4k", env=env)
    assert r.returncode == 2
    message = r.stderr.strip().split(": error: ", 1)[1]  # memplan estimate: error: MESSAGE
    assert page.inner_text("#error") == f"error: {message}"
    assert page.is_hidden("#result")
    assert "Traceback" not in page.content()
    page.fill("#f-seq-len", "4096")  # and it recovers
    settled(page, query="model=llama-2-7b&seq-len=4096")
    assert page.is_hidden("#error")


def test_a_shared_url_restores_the_view(server, browser, env):
    query = "model=mistral-7b-v0.3&gpu=a100-80gb&bits=8&checkpointing=off&seq-len=1024&batch-size=4"
    first = browser.new_page()
    first.goto(f"{server}/?{query}")
    settled(first)
    link = first.url
    peak = first.get_attribute("#peak", "data-bytes")
    first.close()
    second = browser.new_page()  # a colleague opens the link
    second.goto(link)
    settled(second)
    assert second.input_value("#f-model") == "mistral-7b-v0.3"
    assert second.input_value("#f-gpu") == "a100-80gb"
    assert second.input_value("#f-bits") == "8" and second.input_value("#f-checkpointing") == "off"
    assert second.input_value("#f-seq-len") == "1024" and second.input_value("#f-batch-size") == "4"
    want = expected("mistral-7b-v0.3", "--bits", "8", "--checkpointing", "off", "--seq-len", "1024",
                    "--batch-size", "4", "--gpu", "a100-80gb", env=env)
    assert int(second.get_attribute("#peak", "data-bytes")) == want["peak_bytes"] == int(peak)
    fit = json.loads(cli("fit", "mistral-7b-v0.3", "--bits", "8", "--checkpointing", "off", "--seq-len", "1024",
                         "--batch-size", "4", "--gpu", "a100-80gb", "--json", env=env).stdout)
    assert second.inner_text("#fit-max-seq") == f"{fit['max_seq_len']:,}" + ("+" if fit["max_seq_len_capped"] else "")
    second.close()


def test_a_plan_that_does_not_fit_lists_fits_changes(server, page, env):
    page.goto(server + "/?model=llama-3.1-8b&gpu=rtx-4090&bits=16&seq-len=8192&checkpointing=off")
    settled(page)
    fit = json.loads(cli("fit", "llama-3.1-8b", "--gpu", "rtx-4090", "--bits", "16", "--seq-len", "8192",
                         "--checkpointing", "off", "--json", env=env).stdout)
    assert not fit["fits"] and page.inner_text("#fit-verdict") == "does not fit"
    rows = page.locator("#fit-options tbody tr")
    assert rows.count() == len(fit["options"])
    for i, option in enumerate(fit["options"]):
        assert option["label"] in rows.nth(i).inner_text()
    screenshot(page, "serve.png", env)


def test_html_report_opens_offline_and_shows_its_figures(browser, tmp_path, env):
    out = tmp_path / "report.html"
    r = cli("report", "llama-2-7b", "--seq-len", "4096", "--gpu", "rtx-4090", "--html", str(out), env=env)
    assert r.returncode == 0, r.stderr
    want = expected("llama-2-7b", "--seq-len", "4096", "--gpu", "rtx-4090", env=env)
    page = browser.new_page()
    requests = []
    page.on("request", lambda req: requests.append(req.url))
    page.route("http*://**", lambda route: route.abort())  # offline: nothing may load from the network
    page.goto(out.as_uri())
    page.wait_for_selector(".main-svg", timeout=30000)
    assert page.inner_text("#peak") == shown(want["peak_bytes"])
    assert page.inner_text("#device-total") == shown(want["device_total_bytes"])
    assert [u for u in requests if not u.startswith("file:")] == []
    assert page.locator("#fig1 g.trace.bars").count() >= 5  # the stacked components
    legend = page.text_content("#fig1 .legend")
    assert "weights_quantized" in legend and "activations" in legend
    gpus = page.locator("#gpus tbody tr")
    assert gpus.count() == len(gpu_list())
    page.set_viewport_size({"width": 1200, "height": 1000})
    page.screenshot(path=str(Path(os.environ.get("MEMPLAN_SCREENSHOT_DIR") or tmp_path) / "report.png"))
    page.close()


def test_html_grid_report_in_the_browser(browser, tmp_path, env):
    out = tmp_path / "grid.html"
    r = cli("report", "qwen2.5-0.5b", "llama-3.2-1b", "--seq-len", "1024,4096", "--html", str(out), env=env)
    assert r.returncode == 0, r.stderr
    grid = expected("qwen2.5-0.5b", "--seq-len", "1024,4096", env=env) + expected(
        "llama-3.2-1b", "--seq-len", "1024,4096", env=env)
    page = browser.new_page()
    page.goto(out.as_uri())
    page.wait_for_selector(".main-svg", timeout=30000)
    cells = page.locator("#grid tbody td[data-bytes]")
    assert [int(cells.nth(i).get_attribute("data-bytes")) for i in range(cells.count())] == [
        g["peak_bytes"] for g in grid]
    assert [cells.nth(i).inner_text() for i in range(cells.count())] == [f"{g['peak_bytes'] / GIB:,.2f}" for g in grid]
    page.close()
