"""report.html in a real headless browser: it renders, offline, with accounting and checks."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import DEMO_SYNTHEA
from tests.pipeline_helpers import run, write_config

BROWSER = next((b for b in ("chromium", "chromium-browser") if shutil.which(b)), None)


def _headless(*args: str) -> subprocess.CompletedProcess:
    assert BROWSER is not None
    return subprocess.run(
        [BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--disable-background-networking", "--user-data-dir=/tmp/omop-etl-chromium", *args],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip


@pytest.mark.skipif(BROWSER is None, reason="no chromium (make test installs it with apt-get)")
def test_report_html_renders_in_a_headless_browser(duckdb_wh, tmp_path: Path) -> None:
    wh, schema = duckdb_wh
    result = run(write_config(tmp_path, wh, schema, DEMO_SYNTHEA), tmp_path)
    assert result.status == "published"
    page = result.run_dir / "report.html"
    source = page.read_text(encoding="utf-8")
    # self-contained: no outside asset is ever fetched (data never leave the hospital)
    assert not re.search(r"""(src|href)=['"]?(https?:)?//""", source)

    dom = _headless("--dump-dom", page.as_uri()).stdout
    text = re.sub(r"<[^>]+>", " ", dom)
    assert f"Run {result.run_id}: published" in text
    headings = ["What came in and where it went", "CDM tables", "Quarantined, by reason",
                "Filtered, by rule", "Unmapped codes", "Quality checks", "Timings"]  # fmt: skip
    for heading in headings:
        assert heading in text, heading
    feed = result.report["feeds"]["ehr"]
    # the accounting row of the feed, as the browser laid it out
    totals = re.search(r"<td>ehr</td><td>\(all files\)</td><td></td>((?:<td>[^<]*</td>){4})", dom)
    assert totals is not None
    cells = re.findall(r"<td>([^<]*)</td>", totals.group(1))
    assert [int(c) for c in cells] == [
        feed["records_in"],
        feed["loaded"],
        feed["quarantined"],
        feed["filtered"],
    ]
    assert cells and int(cells[0]) == int(cells[1]) + int(cells[2]) + int(cells[3])
    # every check is listed with its result
    assert dom.count("<td>pass</td>") + dom.count("<td>FAIL</td>") >= len(result.report["checks"])
    assert "Great Expectations Data Docs" in text

    # printable: the browser prints it to a PDF
    pdf = tmp_path / "report.pdf"
    _headless("--no-pdf-header-footer", f"--print-to-pdf={pdf}", page.as_uri())
    assert pdf.read_bytes()[:5] == b"%PDF-" and pdf.stat().st_size > 10_000
