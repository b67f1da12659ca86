"""The report in a real browser: headless Chromium opens the page from disk, with no network, and every chart draws,
no script error or console message appears, record text stays text, and a screenshot is not blank.

Needs Debian's `chromium` (apt-get install -y chromium; .ci/run installs it), or KVBENCH_CHROMIUM=/path/to/chrome.
Skipped without one, unless KVBENCH_REQUIRE_BROWSER is set (CI), where it fails instead."""

import json
import os
import re
import shutil
import struct
import subprocess
import zlib

import pytest

pytest.importorskip("plotly", reason="the report needs plotly (the GPU machine has none)")
from kvbench.reports.build import build_report

from test_report import CPU_ENV, GPU_ENV, rec, synthetic_records, write_records

CHROMIUM = os.environ.get("KVBENCH_CHROMIUM") or next(
    (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
     if shutil.which(n)), None)
# CI sets KVBENCH_REQUIRE_BROWSER=1: there a missing browser fails these tests instead of skipping them
pytestmark = pytest.mark.skipif(CHROMIUM is None and not os.environ.get("KVBENCH_REQUIRE_BROWSER"),
                                reason="no Chromium found: apt-get install -y chromium (or set KVBENCH_CHROMIUM); "
                                       ".ci/run installs it")
# without the background-networking flags Chromium keeps trying to reach Google's services on a closed network
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--enable-logging=stderr", "--v=0", "--virtual-time-budget=30000"]
EVIL = "<script>alert(1)</script>"


def chromium(tmp_path, name, *args):
    assert CHROMIUM, "KVBENCH_REQUIRE_BROWSER is set but no Chromium was found: apt-get install -y chromium"
    profile = tmp_path / f"profile-{name}"  # a new, empty profile for every run
    r = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True, text=True,
                       timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    d = tmp_path_factory.mktemp("browser")
    recs = synthetic_records()
    recs["accuracy"].append(rec("accuracy", EVIL, {"model": "embedded", "task": "passkey", "context": 512,
                                                   "depth": 0.5, "protocol": "query-aware", "seed": 0},
                                {"score": 1.0, "bytes_per_token": 99.0}, env={**CPU_ENV, "host": "<b>h</b>"}))
    more_methods(recs)
    # the CPU now has memory records, which the Pareto chart takes its bytes from: one for the evil label too
    recs["memory"].append(rec("memory", EVIL, {"shape": "smollm2-135m", "task": "hold", "context": 256, "batch": 1},
                              {"bytes_per_token": 99.0}, params={}))
    write_records(d / "res", recs)
    (d / "res" / "bad.jsonl").write_text('{"schema": 1, "suite": "accuracy"\n')  # a problem: the page still works
    out, inp = build_report([d / "res"], d / "report.html")
    return d, out


def more_methods(recs):
    """Ten methods with long labels, and memory fits on two machines: what crowded the old charts."""
    extra = ["streaming", "snapkv", "kivi:bits=4", "selfindex:budget=160", "selfindex:budget=160,setting=16+1"]
    for i, m in enumerate(extra):
        for ctx in (4096, 32768):
            recs["kernels"].append(rec("kernels", m, {"shape": "llama-3.1-8b", "context": ctx, "batch": 1,
                                                      "mode": "decode"}, {"time_us": 10.0 + i + ctx / 1e3},
                                       env=GPU_ENV, params={}))
        recs["memory"].append(rec("memory", m, {"shape": "llama-3.1-8b", "search": "max_context", "batch": 1},
                                  {"max_context": 600000 + 100000 * i, "budget_bytes": 8.4e10}, env=GPU_ENV,
                                  params={}))
    for m in ("full", "selfindex:budget=160,setting=16+1", "snapkv:capacity=0.1"):
        recs["memory"].append(rec("memory", m, {"shape": "smollm2-135m", "task": "max_context", "batch": 1},
                                  {"max_context": 2560, "budget_bytes": 16 * 2**20}, params={}))
        recs["memory"].append(rec("memory", m, {"shape": "smollm2-135m", "task": "hold", "context": 256, "batch": 1},
                                  {"bytes_per_token": 46080.0}, params={}))


def test_every_chart_draws_without_errors(page, tmp_path):
    d, out = page
    html = out.read_text()
    r = chromium(tmp_path, "dom", "--dump-dom", out.as_uri())
    dom = r.stdout
    charts = re.findall(r'<div class="chart" id="(chart-[a-z-]+)">', html)
    assert {"chart-pareto", "chart-kernels", "chart-throughput", "chart-steps", "chart-memory"} <= set(charts), charts
    assert f'data-charts-drawn="{len(charts)}"' in dom, "the drawing script did not finish"
    for cid in charts:
        inside = dom.split(f'id="{cid}"', 1)[1].split("<section", 1)[0]
        assert 'class="main-svg"' in inside, f"{cid} holds no rendered plot"
    assert re.search(r'<div id="kv-errors"></div>', dom), "the page reported a script error"
    console = [line for line in r.stderr.splitlines() if ":CONSOLE" in line]
    assert not console, console  # no error, warning or log of any kind, CSP refusals included
    # record text stays text: no element was created from it, in tables or in chart legends
    assert EVIL not in dom and "<b>h</b>" not in dom
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in dom
    assert 'class="legendtext"' in dom and "alert(1)" in dom.split('id="chart-pareto"', 1)[1].split("<section")[0]
    assert "not valid JSON" in dom  # the bad line is listed among the problems


def png_pixels(path):
    """Decode an 8-bit RGB/RGBA non-interlaced PNG with zlib: (width, height, channels, rows of bytes)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, ihdr = 8, b"", None
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + n]
        if kind == b"IHDR":
            ihdr = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + n
    w, h, depth, ctype, _, _, interlace = ihdr
    assert depth == 8 and ctype in (2, 6) and interlace == 0, ihdr
    ch = 3 if ctype == 2 else 4
    raw, stride, rows, prev = zlib.decompress(idat), w * ch, [], bytearray(w * ch)
    for y in range(h):
        f, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        if f == 1:
            for i in range(ch, stride):
                line[i] = (line[i] + line[i - ch]) & 255
        elif f == 2:
            line = bytearray((a + b) & 255 for a, b in zip(line, prev))
        elif f == 3:
            for i in range(stride):
                line[i] = (line[i] + ((line[i - ch] if i >= ch else 0) + prev[i]) // 2) & 255
        elif f == 4:
            for i in range(stride):
                a, b, c = (line[i - ch] if i >= ch else 0), prev[i], (prev[i - ch] if i >= ch else 0)
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append(bytes(line))
        prev = line
    return w, h, ch, rows


def test_screenshot_is_not_blank(page, tmp_path):
    d, out = page
    shot = tmp_path / "shot.png"
    chromium(tmp_path, "shot", "--window-size=1280,1600", "--hide-scrollbars", f"--screenshot={shot}", out.as_uri())
    w, h, ch, rows = png_pixels(shot)
    assert (w, h) == (1280, 1600)
    colors, non_white = set(), 0
    for row in rows[::4]:
        for x in range(0, w * ch, 4 * ch):
            px = row[x:x + 3]
            colors.add(px)
            non_white += px < b"\xf0\xf0\xf0"
    samples = len(rows[::4]) * len(range(0, w * ch, 4 * ch))
    assert len(colors) > 200, f"only {len(colors)} distinct colours: a blank or broken page"
    assert non_white / samples > 0.1, json.dumps({"non_white": non_white, "samples": samples})


# Run in the page after the charts are drawn: every pair of chart texts (titles, tick labels, legend entries, bar
# values, annotations) whose boxes overlap, and each method's colours over every chart. The result lands in
# <body data-layout="..."> for --dump-dom to read.
LAYOUT_JS = """
window.addEventListener('load', function(){ setTimeout(function(){
  var overlaps = [], colours = {};
  document.querySelectorAll('div.chart').forEach(function(div){
    var boxes = [];
    div.querySelectorAll('svg text').forEach(function(t){
      var s = (t.textContent || '').trim(), r = t.getBoundingClientRect();
      if (s && r.width > 0 && r.height > 0 && !t.closest('.hoverlayer')) boxes.push([s, r]);
    });
    for (var i = 0; i < boxes.length; i++) for (var j = i + 1; j < boxes.length; j++) {
      var a = boxes[i][1], b = boxes[j][1];
      var dx = Math.min(a.right, b.right) - Math.max(a.left, b.left);
      var dy = Math.min(a.bottom, b.bottom) - Math.max(a.top, b.top);
      if (dx > 2 && dy > 2) overlaps.push(div.id + ': ' + boxes[i][0] + ' / ' + boxes[j][0]);
    }
    // a tick label sits outside every plot area: inside one, it covers another panel's bars or lines
    var areas = Array.prototype.map.call(div.querySelectorAll('rect.nsewdrag'), function(e){
      return e.getBoundingClientRect(); });
    div.querySelectorAll('g.xtick text, g.ytick text').forEach(function(t){
      var r = t.getBoundingClientRect();
      areas.forEach(function(a){
        if (Math.min(a.right, r.right) - Math.max(a.left, r.left) > 2 &&
            Math.min(a.bottom, r.bottom) - Math.max(a.top, r.top) > 2)
          overlaps.push(div.id + ': tick ' + t.textContent + ' inside a plot area'); });
    });
    (div.data || []).forEach(function(tr){
      var c = (tr.line && tr.line.color) || (tr.marker && typeof tr.marker.color === 'string' && tr.marker.color);
      if (tr.name && c && tr.name.indexOf('failed') < 0 && tr.name.indexOf('Pareto') < 0) {
        var name = tr.name.replace(/ \\(query-[a-z]+\\)$/, '').replace(/ floor$/, '');
        (colours[name] = colours[name] || {})[c] = div.id;
      }
    });
  });
  document.body.setAttribute('data-layout', JSON.stringify({overlaps: overlaps, colours: colours}));
}, 500); });
"""


def lab(hex_colour):
    """CIE L*a*b* of an sRGB '#rrggbb' colour (D65), for colour distances."""
    rgb = [int(hex_colour[i:i + 2], 16) / 255 for i in (1, 3, 5)]
    r, g, b = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in rgb]
    xyz = ((0.4124 * r + 0.3576 * g + 0.1805 * b) / 0.95047, 0.2126 * r + 0.7152 * g + 0.0722 * b,
           (0.0193 * r + 0.1192 * g + 0.9505 * b) / 1.08883)
    f = [t ** (1 / 3) if t > 0.008856 else 7.787 * t + 16 / 116 for t in xyz]
    return 116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2])


def layout_facts(tmp_path, out):
    page = out.with_name("layout.html")
    page.write_text(out.read_text().replace("</body>", f"<script>{LAYOUT_JS}</script></body>"))
    dom = chromium(tmp_path, "layout", "--window-size=1400,3000", "--dump-dom", page.as_uri()).stdout
    found = re.search(r'data-layout="([^"]*)"', dom)
    assert found, "the layout script did not run"
    return json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))


def test_no_chart_text_overlaps_at_1400px(page, tmp_path):
    facts = layout_facts(tmp_path, page[1])
    assert not facts["overlaps"], facts["overlaps"][:20]


def test_one_distinct_colour_per_method_across_charts(page, tmp_path):
    colours = layout_facts(tmp_path, page[1])["colours"]
    assert {"full", "kivi", "snapkv:capacity=0.1"} <= set(colours), colours  # kivi: bits=2 is its default
    for name, seen in colours.items():
        assert len(seen) == 1, f"{name} is drawn in several colours: {seen}"
    one = {name: next(iter(seen)) for name, seen in colours.items()}
    names = sorted(one)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            d = sum((x - y) ** 2 for x, y in zip(lab(one[a]), lab(one[b]))) ** 0.5
            assert d > 20, f"{a} ({one[a]}) and {b} ({one[b]}) look alike (Lab distance {d:.1f})"
