"""Screenshots of TensorBoard dashboards, taken by a headless browser (Debian's chromium).

    python scripts/tb_screenshots.py --logdir runs/h15 --out runs/h15/screenshots

Starts ``tensorboard --logdir LOGDIR --port PORT --host 127.0.0.1``, waits until it answers, loads each
dashboard (scalars filtered to the held-out metrics, images, histograms, HParams, text) in a fresh headless
chromium profile and writes one PNG per dashboard; stops TensorBoard afterwards. Install the browser with
``apt-get install -y chromium``. Look at the PNGs: a script cannot tell whether a chart says what it should.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

PAGES = {
    "scalars_heldout": "#scalars&tagFilter=heldout%2F(epochs|success|learned|final|divergence|above)",
    "scalars_episode": "#scalars&tagFilter=episode%2F",
    "scalars_eval_curves": "#scalars&tagFilter=curve%2F",
    "images": "#images",
    "histograms": "#histograms&tagFilter=scale",
    "hparams": "#hparams",
    "text": "#text",
}
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--disable-dev-shm-usage")


def find_browser(name: str | None) -> str:
    for candidate in ([name] if name else ["chromium", "chromium-browser", "google-chrome"]):
        path = shutil.which(candidate)
        if path:
            return path
    raise SystemExit("no chromium found: install it with `apt-get install -y chromium` (or pass --browser)")


def wait_for(url: str, timeout: float, proc: subprocess.Popen) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"tensorboard exited with code {proc.returncode} before answering at {url}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"tensorboard did not answer at {url} within {timeout:.0f} s")


def screenshot(browser: str, url: str, path: Path, size: str, budget_ms: int) -> None:
    with tempfile.TemporaryDirectory(prefix="tb-chromium-") as profile:
        cmd = [browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={size}",
               f"--virtual-time-budget={budget_ms}", f"--screenshot={path}", url]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    if not path.exists():
        raise SystemExit(f"chromium wrote no screenshot for {url} (exit {out.returncode}): {out.stderr[-1500:]}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--logdir", required=True, help="TensorBoard log directory (e.g. runs/)")
    p.add_argument("--out", required=True, help="directory for the PNGs")
    p.add_argument("--port", type=int, default=6123)
    p.add_argument("--browser", default=None, help="chromium executable (default: found on PATH)")
    p.add_argument("--size", default="1600,1300", help="window size W,H in pixels")
    p.add_argument("--wait-ms", type=int, default=20000, help="virtual time the page gets to load its data")
    p.add_argument("--pages", default=",".join(PAGES), help=f"comma list of {', '.join(PAGES)}")
    args = p.parse_args(argv)
    browser = find_browser(args.browser)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = f"http://127.0.0.1:{args.port}/"
    tb = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", args.logdir, "--port", str(args.port),
                           "--host", "127.0.0.1", "--reload_interval", "0"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(base, 120, tb)
        time.sleep(3)  # first load of the event files
        for name in [s.strip() for s in args.pages.split(",") if s.strip()]:
            path = out / f"{name}.png"
            screenshot(browser, base + PAGES[name], path, args.size, args.wait_ms)
            print(f"{path} ({path.stat().st_size // 1024} KB)")
    finally:
        tb.terminate()
        try:
            tb.wait(10)
        except subprocess.TimeoutExpired:
            tb.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
