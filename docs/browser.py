"""A headless Chromium (Debian's `chromium` and `chromium-driver` packages) on the built site, served from a local
HTTP server: for tests/test_docs.py and docs/screenshots.py. Nothing here reaches the internet: Chromium is started
without its background services (else it tries to reach Google), and Selenium is given the driver (so Selenium
Manager does not download one)."""
import contextlib, functools, os, shutil, tempfile, threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SITE = ROOT/'_site'
CHROMIUM = os.environ.get('CHROMIUM', shutil.which('chromium') or '/usr/bin/chromium')
CHROMEDRIVER = os.environ.get('CHROMEDRIVER', shutil.which('chromedriver') or '/usr/bin/chromedriver')
FLAGS = ['--headless=new', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
         '--disable-background-networking', '--disable-component-update', '--disable-sync',
         '--disable-default-apps', '--disable-extensions', '--disable-dev-shm-usage', '--hide-scrollbars',
         '--force-device-scale-factor=1', '--window-size=1280,900']


def have_browser(): return Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args): pass


@contextlib.contextmanager
def serve(site=SITE):
    "Serve `site` on 127.0.0.1 (a free port) in a thread; yields the base URL"
    srv = ThreadingHTTPServer(('127.0.0.1', 0), functools.partial(_Quiet, directory=str(site)))
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try: yield f'http://127.0.0.1:{srv.server_address[1]}/'
    finally: srv.shutdown(); srv.server_close()


@contextlib.contextmanager
def chromium(width=1280, height=900):
    "A Selenium driver on a headless Chromium with a fresh profile"
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    prof = tempfile.mkdtemp(prefix='chromium-profile-')
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for f in FLAGS: opts.add_argument(f)
    opts.add_argument(f'--user-data-dir={prof}')
    drv = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
    try:
        drv.set_window_size(width, height)
        drv.set_page_load_timeout(30)
        yield drv
    finally:
        drv.quit()
        shutil.rmtree(prof, ignore_errors=True)


def wait_loaded(drv, timeout=10):
    "Until the page and its images have loaded"
    from selenium.webdriver.support.ui import WebDriverWait
    WebDriverWait(drv, timeout).until(lambda d: d.execute_script(
        "return document.readyState === 'complete' && Array.from(document.images).every(i => i.complete)"))
