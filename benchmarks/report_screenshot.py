"""Build a run's report and screenshot index.html in headless Chromium, to look at what a reader sees.

Builds RUN/reports/ with `flextron report`'s own function, then renders the page with the
`chromium` on PATH (Debian: `apt-get install chromium`) at a fixed window width, optionally crops
the screenshot to its top part, and prints the PNG's path, its size and the page's sections (the
<h2> headings, in order). Exits with a message saying how to install Chromium when there is none.

    python benchmarks/report_screenshot.py --run runs/demo --out /tmp/report.png
    python benchmarks/report_screenshot.py --run runs/demo --out docs/report_demo.png --crop 2200
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from html.parser import HTMLParser
from pathlib import Path


class _Headings(HTMLParser):
    """The page's <h1> and <h2> texts, in order."""

    def __init__(self):
        super().__init__()
        self.h1, self.h2, self._in, self._text = [], [], None, []

    def handle_starttag(self, tag, attrs):
        if tag in ("h1", "h2"):
            self._in, self._text = tag, []

    def handle_endtag(self, tag):
        if tag == self._in:
            (self.h1 if tag == "h1" else self.h2).append("".join(self._text).strip())
            self._in = None

    def handle_data(self, data):
        if self._in:
            self._text.append(data)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="the run directory to report on")
    ap.add_argument("--out", required=True, help="the screenshot to write (.png)")
    ap.add_argument("--width", type=int, default=1280, help="browser window width in pixels")
    ap.add_argument("--height", type=int, default=6000, help="browser window height: how much of the page is drawn")
    ap.add_argument("--crop", type=int, default=0, help="keep only the top N pixels of the screenshot (0: keep all)")
    args = ap.parse_args()

    browser = shutil.which("chromium")
    if browser is None:
        print("report_screenshot: no `chromium` on PATH; install it (Debian/Ubuntu: `apt-get install -y chromium`) "
              "or open RUN/reports/index.html in any browser", file=sys.stderr)
        return 2

    from reports.build import ReportConfig, build_report

    summary = build_report(ReportConfig(run=args.run))
    page = Path(summary["report"]).resolve()
    out = Path(args.out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as profile_dir:  # a throwaway browser profile: nothing of the user's
        shot = Path(profile_dir) / "page.png"
        cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
               f"--user-data-dir={profile_dir}", f"--screenshot={shot}", f"--window-size={args.width},{args.height}",
               page.as_uri()]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if res.returncode != 0 or not shot.is_file():
            print(f"report_screenshot: chromium failed ({res.returncode}): {res.stderr[-2000:]}", file=sys.stderr)
            return 1
        from PIL import Image

        with Image.open(shot) as im:
            if args.crop and args.crop < im.height:
                im = im.crop((0, 0, im.width, args.crop))
            im.save(out, optimize=True)
            size = im.size

    headings = _Headings()
    headings.feed(page.read_text())
    print(f"report: {page}")
    print(f"screenshot: {out} ({size[0]}x{size[1]} px, {out.stat().st_size / 1024:.0f} KiB)")
    print(f"title: {headings.h1[0] if headings.h1 else '(none)'}")
    for i, h in enumerate(headings.h2, 1):
        print(f"  {i:2d}. {h}")
    print(json.dumps({"report": str(page), "screenshot": str(out), "width": size[0], "height": size[1],
                      "sections": headings.h2, "not_yet": summary["not_yet"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
