"""The status page in a real headless browser (run by tests/operator.rs).

Usage: status_page.py BASE_URL CHROMIUM SCREENSHOT

Debian's chromium, driven by Playwright for Python (never a downloaded
browser). Asserts that a stream's progress bar advances while it uploads,
that a file named `<img src=x onerror=alert(1)>.mp4` shows as text with no
<img> element and no dialog, then saves a screenshot. Exits non-zero on any
failure, with the reason on stderr.
"""

import sys
import tempfile
import time

from playwright.sync_api import sync_playwright

HOSTILE = "<img src=x onerror=alert(1)>.mp4"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def progress(page, path):
    """The value of the progress bar in the row whose path cell is `path`."""
    return page.evaluate(
        """(path) => {
            for (const row of document.querySelectorAll("#streams tbody tr")) {
                if (row.cells[0].textContent === path) return row.querySelector("progress").value;
            }
            return null;
        }""",
        path,
    )


def main():
    base, chromium, screenshot = sys.argv[1:4]
    dialogs = []
    with tempfile.TemporaryDirectory() as profile, sync_playwright() as p:
        browser = p.chromium.launch_persistent_context(
            profile,
            executable_path=chromium,
            headless=True,
            args=FLAGS,
            viewport={"width": 1100, "height": 520},
        )
        try:
            page = browser.new_page()
            page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
            page.goto(base + "/")
            page.wait_for_function(
                "document.querySelectorAll('#streams tbody tr').length >= 2", timeout=60_000
            )
            recording = "site-a/cam1/recording.mp4"
            first = progress(page, recording)
            assert first is not None, "the recording has no row"
            deadline = time.monotonic() + 120
            later = first
            while later <= first and time.monotonic() < deadline:
                time.sleep(0.5)
                later = progress(page, recording)
            assert later > first, f"progress bar did not advance from {first}"
            paths = page.eval_on_selector_all(
                "#streams tbody td.path", "cells => cells.map(c => c.textContent)"
            )
            assert HOSTILE in paths, f"the hostile name is not shown as text: {paths}"
            assert page.locator("#streams img").count() == 0, "a file name became markup"
            assert not dialogs, f"a dialog fired: {dialogs}"
            health = page.inner_text("#health")
            for row in ("Redis", "S3", "S3 credentials", "Checksum verification", "Bandwidth limit"):
                assert row in health, f"health summary lacks {row}: {health}"
            assert "1.0 MiB/s" in health, f"bandwidth row: {health}"
            assert "ok: environment" in health, f"credentials row: {health}"
            page.screenshot(path=screenshot, full_page=True)
            print(f"progress {first} -> {later}; screenshot {screenshot}")
        finally:
            browser.close()


if __name__ == "__main__":
    main()
