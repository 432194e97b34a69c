"""Write OUTDIR/summary.md for scripts/gpu_check.sh from its stage records.

stages.tsv rows: name, rc, seconds, timeout_s, log, junit (or -), note. Test counts
come from each stage's junit file (pytest writes it even when stopped by SIGINT);
smoke and benchmark numbers from their logs. Only the standard library: it runs on
a machine with nothing but torch.
"""
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def junit_counts(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        return {"error": f"unreadable junit ({e})"}
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    c = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    c["time"] = sum(float(s.get("time", 0)) for s in suites)
    c["passed"] = c["tests"] - c["failures"] - c["errors"] - c["skipped"]
    c["failed_ids"] = [f"{tc.get('classname')}::{tc.get('name')}" for s in suites for tc in s.iter("testcase")
                       if tc.find("failure") is not None or tc.find("error") is not None]
    reasons: dict[str, int] = {}
    for s in suites:
        for tc in s.iter("testcase"):
            sk = tc.find("skipped")
            if sk is not None:
                msg = (sk.get("message") or "").split("\n")[0][:120]
                reasons[msg] = reasons.get(msg, 0) + 1
    c["skip_reasons"] = sorted(reasons.items(), key=lambda kv: -kv[1])[:8]
    return c


def main(outdir: str) -> int:
    out = Path(outdir)
    header = (out / "header.txt").read_text() if (out / "header.txt").exists() else ""
    rows = [line.rstrip("\n").split("\t") for line in (out / "stages.tsv").read_text().splitlines() if line]
    md = ["# amp_engine gpu_check", "", header.strip(), "",
          "| stage | result | rc | time s (limit) | ran | passed | failed | errors | skipped | log |",
          "|---|---|---|---|---|---|---|---|---|---|"]
    details = []
    for name, rc, secs, limit, log, junit, note in rows:
        c = junit_counts(out / junit) if junit != "-" else None
        result = {"0": "ok", "5": "no tests", "124": "TIMED OUT", "130": "TIMED OUT", "137": "KILLED",
                  "-": "not run"}.get(rc, "FAILED")
        if rc == "1" and c and not c.get("error") and c["failures"] + c["errors"] == 0:
            result = "FAILED"
        nums = ["", "", "", "", ""]
        if c and "error" not in c:
            nums = [str(c[k]) for k in ("tests", "passed", "failures", "errors", "skipped")]
        elif c:
            nums[0] = c["error"]
        md.append(f"| {name} | {result}{': ' + note if note else ''} | {rc} | {secs} ({limit}) | "
                  + " | ".join(nums) + f" | {log} |")
        if c and "error" not in c:
            if c["failed_ids"]:
                details.append(f"**{name}**: failed/errored: " + ", ".join(f"`{t}`" for t in c["failed_ids"][:30])
                               + (f" … (+{len(c['failed_ids']) - 30})" if len(c["failed_ids"]) > 30 else ""))
            if c["skip_reasons"]:
                details.append(f"**{name}**: skip reasons: " + "; ".join(f"{n}× {m}" for m, n in c["skip_reasons"]))
    for log_name in ("smoke.log", "launches.log", "bench.log"):
        log = out / log_name
        if log.exists():
            text = log.read_text(errors="replace")
            picked = [ln for ln in text.splitlines() if re.match(r"(TIME|FAIL|SMOKE)\b", ln)
                      or (log_name in ("bench.log", "launches.log") and ln.startswith("|"))]
            if log_name == "smoke.log":
                n_pass, n_fail = len(re.findall(r"^PASS ", text, re.M)), len(re.findall(r"^FAIL ", text, re.M))
                picked.insert(0, f"smoke checks: {n_pass} passed, {n_fail} failed")
            if picked:
                details.append(f"**{log_name}** (measured numbers, verbatim):\n\n```\n" + "\n".join(picked[:80]) + "\n```")
    md += ["", *[d + "\n" for d in details]]
    (out / "summary.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
